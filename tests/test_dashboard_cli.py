"""``wattwarden dashboard``: flags checked before Streamlit starts, then Streamlit's own server.

Bad flags and a port in use are one line and exit 2; no Streamlit is one line naming the extra
and exit 1; once serving, the launcher says the URL, answers Streamlit's health check, and
SIGTERM or Ctrl-C stop Streamlit with it (exit 0), while Streamlit dying on its own is exit 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from helpers import finish, free_port, http_get, refused_port, wait_for

pytest.importorskip("streamlit")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wattwarden", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_help_lists_every_flag() -> None:
    result = run_cli("dashboard", "--help")
    assert result.returncode == 0, result.stderr
    for flag in (
        "--agent",
        "--prometheus",
        "--alertmanager",
        "--listen",
        "--token-file",
        "--refresh-s",
        "--timeout-s",
    ):
        assert flag in result.stdout
    assert "8501" in result.stdout  # the default listen address is said


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--listen", "nonsense"], "--listen: expected HOST:PORT"),
        (["--listen", "127.0.0.1:70000"], "--listen: port must be within 0..65535"),
        (["--listen", "dashboard.example:8501"], "--listen: host must be an IP address"),
        (["--agent", "ftp://127.0.0.1:9767"], "--agent: expected an http:// or https:// URL"),
        (["--agent", "http://127.0.0.1:port"], "--agent: not a valid URL"),
        (["--prometheus", "localhost:9090"], "--prometheus: expected an http"),
        (["--refresh-s", "0.1"], "--refresh-s: must be within 1..60"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(args: list[str], said: str) -> None:
    result = run_cli("dashboard", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert said in lines[0]


def test_a_port_in_use_is_named_and_exit_2() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run_cli("dashboard", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"--listen: port {port} on 127.0.0.1 is already in use" in lines[0]


def test_without_streamlit_says_how_to_install_it_and_exits_1(tmp_path: Path) -> None:
    # sitecustomize runs at interpreter start: Streamlit looks uninstalled to this process
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['streamlit'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = run_cli("dashboard", "--listen", f"127.0.0.1:{free_port()}", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'wattwarden[dashboard]'" in lines[0]


class Dashboard:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url

    @property
    def streamlit(self) -> psutil.Process:
        (child,) = psutil.Process(self.proc.pid).children()
        return child


@contextmanager
def dashboard() -> Iterator[Dashboard]:
    """``wattwarden dashboard`` on a free port, reading an agent that is not there."""
    port = free_port()
    with refused_port() as agent_port:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wattwarden",
                "dashboard",
                "--listen",
                f"127.0.0.1:{port}",
                "--agent",
                f"http://127.0.0.1:{agent_port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            started: list[psutil.Process] = []
            assert proc.stdout is not None
            line = proc.stdout.readline()  # said once the health check answers
            url = f"http://127.0.0.1:{port}"
            assert f"serving {url} " in line, (line, proc.poll())
            started = psutil.Process(proc.pid).children(recursive=True)
            yield Dashboard(proc, url)
        finally:  # after a failed test: end the launcher and what it started
            if proc.poll() is None:
                started += psutil.Process(proc.pid).children(recursive=True)
                proc.kill()
                proc.wait()
            for p in started:
                with contextlib.suppress(psutil.Error):
                    p.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_health_and_a_signal_stops_streamlit_too(sig: signal.Signals) -> None:
    with dashboard() as d:
        assert http_get(d.url + "/_stcore/health") == (200, b"ok")
        streamlit = d.streamlit
        assert "streamlit" in " ".join(streamlit.cmdline())
        d.proc.send_signal(sig)
        code, err = finish(d.proc, timeout_s=30)
        assert code == 0, err
        assert "Traceback" not in err
        wait_for(lambda: not streamlit.is_running(), timeout_s=15, what="Streamlit gone")
        with pytest.raises(OSError):
            http_get(d.url + "/_stcore/health", timeout_s=2)


def test_streamlit_dying_on_its_own_is_reported_and_exit_1() -> None:
    with dashboard() as d:
        d.streamlit.kill()
        code, err = finish(d.proc, timeout_s=30)
    assert code == 1
    assert "Streamlit exited unexpectedly" in err
