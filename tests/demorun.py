"""Running ``wattwarden demo`` from a test: start it, read its URL block, stop it whole."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from helpers import http_json

END_OF_BLOCK = "Ctrl-C stops everything."
START_TIMEOUT_S = 120.0


@dataclass
class DemoRun:
    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    stderr: Path
    block: str = ""
    later: list[str] = field(default_factory=list)

    def line(self, name: str) -> str:
        found = re.search(rf"^  {name}\s+(.*)$", self.block, re.MULTILINE)
        assert found is not None, (name, self.block)
        return found[1]

    @property
    def dashboard_url(self) -> str:
        return self.line("Dashboard").strip()

    @property
    def agent_url(self) -> str:
        return self.line("Agent").split()[0]

    @property
    def files(self) -> Path:
        return Path(self.line("Files").split()[0])

    def state(self) -> dict[str, Any]:
        status, state = http_json(self.agent_url + "/api/v1/state")
        assert status == 200
        return dict(state)

    def jobs(self) -> dict[str, dict[str, Any]]:
        status, data = http_json(self.agent_url + "/api/v1/jobs")
        assert status == 200
        return {j["name"]: j for j in data["jobs"]}

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def wait(self, timeout_s: float) -> tuple[int, str]:
        """The demo's exit code (killed after ``timeout_s``) and its stderr."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_demo(self)
            raise
        return code, self.stderr.read_text()

    def rest_of_stdout(self) -> str:
        while (line := self.lines.get(timeout=30)) is not None:
            self.later.append(line)
        return "".join(self.later)


def start_demo(tmp: Path, *args: str) -> DemoRun:
    """Start the demo (temporary files under ``tmp``) and read its stdout up to the URL block."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    stderr = tmp / "demo.stderr"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wattwarden", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            start_new_session=True,  # as from a terminal of its own: the test's signals are its
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    run = DemoRun(proc, lines, stderr)
    block = []
    while True:
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            stop_demo(run)
            raise AssertionError(f"no URL block within {START_TIMEOUT_S} s: {block}") from None
        if line is None:
            code, err = run.wait(30)
            raise AssertionError(f"demo exited {code} before its URL block: {block} {err}")
        block.append(line)
        if line.strip() == END_OF_BLOCK:
            break
    run.block = "".join(block)
    return run


def stop_demo(run: DemoRun) -> None:
    """End a demo a failed test left running, and everything it started."""
    if run.proc.poll() is None:
        left = run.descendants()
        run.proc.kill()
        run.proc.wait()
        for p in left:
            p.kill()
