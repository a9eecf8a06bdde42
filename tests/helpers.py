"""Shared test helpers: polling with deadlines, running the agent on a port it picks."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (racy: for programs that cannot bind
    port 0 and say which port they got)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections while held: bound, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout_s: float = 30.0,
    interval_s: float = 0.1,
    what: str = "",
) -> T:
    """Poll ``probe`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last_error, result = e, None
        if result:
            return result
        time.sleep(interval_s)  # polling interval of a deadline loop, not synchronisation
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or probe}: {last_error}")


def http_get(
    url: str,
    timeout_s: float = 5.0,
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """GET, returning (status, body) for any status."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(
    url: str, body: Any = None, *, token: str | None = None, method: str | None = None
) -> tuple[int, Any]:
    """Send JSON (POST when a body is given), return (status, decoded JSON)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def finish(proc: subprocess.Popen[str], timeout_s: float = 60) -> tuple[int, str]:
    """Wait for a process to exit (killed after ``timeout_s``): its exit code and stderr."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def require_binary(name: str) -> str:
    """Path of an external program; skip locally when missing, fail in CI (it must be installed)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} not installed")
    return path


@dataclass
class AgentProcess:
    """A ``wattwarden agent`` subprocess."""

    proc: subprocess.Popen[str]
    url: str
    state_dir: Path
    port: int
    log_path: Path

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)


_RUNS = itertools.count()
SERVING_LINE = re.compile(r"serving (https?)://127\.0\.0\.1:(\d+)/metrics")
"""The agent's start line, with the port it bound (``--listen 127.0.0.1:0``)."""


@contextmanager
def run_agent(
    state_dir: Path,
    *args: str,
    port: int = 0,
    tls: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
    timeout_s: float = 30.0,
) -> Iterator[AgentProcess]:
    """Start the agent on a loopback ``host`` and wait until /healthz answers; stop it afterwards.

    By default the agent binds port 0 and its start line says which port it got. With ``tls``
    (a client context trusting the agent's certificate) the agent is reached over https; its
    web config comes in ``args``. ``timeout_s`` bounds the start and the health check each
    (several agents starting at once on a busy machine need more than one).
    """
    cmd = [
        sys.executable,
        "-m",
        "wattwarden",
        "agent",
        "--listen",
        f"{host}:{port}",
        "--state-dir",
        str(state_dir),
        *args,
    ]
    serving_line = re.compile(rf"serving (https?)://{re.escape(host)}:(\d+)/metrics")
    log_path = state_dir.parent / f"agent-{state_dir.name}-{next(_RUNS)}.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:

            def started() -> re.Match[str] | None:
                if proc.poll() is not None:
                    raise AssertionError(f"agent exited {proc.returncode}: {log_path.read_text()}")
                return serving_line.search(log_path.read_text())

            serving = wait_for(started, timeout_s=timeout_s, what=f"agent {host}'s start line")
            bound = int(serving[2])
            assert port in (0, bound), (port, bound)
            url = f"{serving[1]}://{host}:{bound}"
            agent = AgentProcess(proc, url, state_dir, bound, log_path)

            def healthy() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"agent exited {proc.returncode}: {log_path.read_text()}")
                return http_get(agent.url + "/healthz", timeout_s=1, context=tls)[0] == 200

            wait_for(healthy, timeout_s=timeout_s, what=f"agent {host} /healthz")
            yield agent
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


CONTROLLER_SERVING = re.compile(r"/metrics and /healthz on (http://\S+)")
"""The fleet controller's start line, with the URL of its own /metrics and /healthz."""


@contextmanager
def run_controller(*args: str, log_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A ``wattwarden controller`` on 127.0.0.1 (a port it picks): the process and its URL.

    Waits for its start line; kills it afterwards if it still runs (a test that stops it
    itself, by signal, checks how it ended).
    """
    cmd = [sys.executable, "-m", "wattwarden", "controller", "--listen", "127.0.0.1:0", *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:

            def started() -> str | None:
                if proc.poll() is not None:
                    raise AssertionError(f"controller exited {proc.returncode}: "
                                         f"{log_path.read_text()}")  # fmt: skip
                m = CONTROLLER_SERVING.search(log_path.read_text())
                return m[1] if m else None

            url = wait_for(started, timeout_s=60, what="the controller's start line")
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(20)


@contextmanager
def serve_loopback(
    handler: type[BaseHTTPRequestHandler], *, tls: Path | None = None, backlog: int = 5
) -> Iterator[tuple[ThreadingHTTPServer, str]]:
    """A threaded HTTP server on 127.0.0.1 (a free port): the server and its base URL.

    With ``tls``, a directory holding ``server.crt`` and ``server.key`` (the ``pki`` fixture's),
    it speaks https. ``backlog`` is its listen queue (raise it for bursts of connections).
    Stopped, its thread joined, when the block ends.
    """

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = backlog

    server = Server(("127.0.0.1", 0), handler)
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls / "server.crt", tls / "server.key")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse Prometheus text exposition into {name: [(labels, value)]} with prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def gauge(url: str, name: str, gpu: str) -> float | None:
    """One GPU's value of a metric, scraped from the agent at ``url`` now (None if absent)."""
    metrics = parse_metrics(http_get(url + "/metrics")[1].decode())
    values = [v for labels, v in metrics.get(name, []) if labels.get("gpu") == gpu]
    return values[0] if values else None


def sim_limits(state_dir: Path) -> list[float]:
    """The power limits the simulated driver holds, from its saved state in the state dir."""
    data = json.loads((state_dir / "sim" / "driver-state.json").read_text())
    return [g["power_limit_w"] for g in data["gpus"]]


def crash_with_a_cap(state_dir: Path, *, gpu: int = 1, watts: float = 250) -> None:
    """Run an agent on 2 simulated GPUs with --apply, cap ``gpu``, and kill it with SIGKILL."""
    with run_agent(state_dir, "--sim", "2", "--apply") as agent:
        status, _ = http_json(
            agent.url + "/api/v1/power-limits", {"gpu": gpu, "watts": watts}, token=agent.token
        )
        assert status == 200
        agent.stop(signal.SIGKILL)
