"""One agent per state dir: a second one exits 2 and the first keeps its journal and its caps."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from helpers import http_get, http_json, run_agent, sim_limits


def test_second_agent_on_the_same_state_dir_exits_2_and_the_first_keeps_running(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    with run_agent(state, "--sim", "2", "--apply") as first:
        status, body = http_json(
            first.url + "/api/v1/power-limits", {"gpu": 0, "watts": 300}, token=first.token
        )
        assert (status, body["enforced_watts"]) == (200, 300.0)
        second = subprocess.run(
            [sys.executable, "-m", "wattwarden", "agent", "--sim", "2", "--apply",
             "--state-dir", str(state), "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"state dir {state} is in use" in lines[0]
        assert f"(pid {first.proc.pid})" in lines[0]
        # the first agent runs on, its cap untouched by the second
        assert first.proc.poll() is None
        assert http_get(first.url + "/healthz")[0] == 200
        assert sim_limits(state)[0] == 300.0
        assert first.stop(signal.SIGTERM) == 0
    assert sim_limits(state) == [700.0, 700.0]
    # the lock went with the first agent: the next one starts
    with run_agent(state, "--sim", "2") as third:
        assert http_get(third.url + "/healthz")[0] == 200
