"""Start the dashboard: Streamlit's own server running ``app.py``, with the dashboard's flags.

The launcher adds nothing to Streamlit's server; it checks what a user can get wrong before
starting it (the listen address, the port being free, Streamlit being installed), runs
``python -m streamlit run app.py ... -- <flags>`` in a process group of its own, and says the
URL once ``/_stcore/health`` answers. ``wattwarden dashboard`` and ``wattwarden demo`` use it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import IO

from wattwarden.config import ConfigError, parse_listen
from wattwarden.dashboard.settings import DEFAULT_LISTEN, DashboardSettings

__all__ = [
    "DEFAULT_LISTEN",
    "INSTALL_HINT",
    "StreamlitMissing",
    "check_port_free",
    "dashboard_url",
    "listen_of",
    "listen_text",
    "parse_listen_flag",
    "require_streamlit",
    "serve",
    "stop",
    "streamlit_command",
    "wait_healthy",
]

INSTALL_HINT = "pip install 'wattwarden[dashboard]'"
HEALTH_PATH = "/_stcore/health"
STOP_TIMEOUT_S = 10.0


class StreamlitMissing(RuntimeError):
    """Streamlit is not installed: the message says how to install it."""


def require_streamlit() -> None:
    """Raise :class:`StreamlitMissing` unless Streamlit can be imported."""
    if importlib.util.find_spec("streamlit") is None:
        raise StreamlitMissing(
            f"the dashboard needs Streamlit, which is not installed: {INSTALL_HINT}"
        )


def parse_listen_flag(text: str, flag: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` as the agent reads it; ConfigError naming ``flag`` otherwise."""
    try:
        return parse_listen(text)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def _probe_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine (loopback for 0.0.0.0/::)."""
    if host == "localhost":
        return "127.0.0.1"
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen_text(host: str, port: int) -> str:
    """``HOST:PORT`` as :func:`parse_listen_flag` reads it back (brackets for IPv6)."""
    return f"{_url_host(host)}:{port}"


def dashboard_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens for a dashboard listening on ``host:port``."""
    return f"http://{_url_host(_probe_host(host))}:{port}"


def check_port_free(host: str, port: int, flag: str = "--listen") -> int:
    """Bind ``host:port`` for a moment: the port (a free one for port 0), or ConfigError.

    A port another program holds is the user's to change, hence ConfigError (exit 2).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "127.0.0.1" if host == "localhost" else host
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as a server binds: a port in TIME_WAIT after a previous run is free to take
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{flag}: port {port} on {host} is already in use; pick another with "
                    f"{flag} {_url_host(host)}:PORT"
                ) from None
            raise ConfigError(
                f"{flag}: cannot listen on {host}:{port}: {e.strerror or e}"
            ) from None
        return int(s.getsockname()[1])


def streamlit_command(settings: DashboardSettings, host: str, port: int) -> list[str]:
    """The command line that serves the dashboard app on ``host:port`` with ``settings``."""
    from wattwarden.dashboard import APP_PATH  # noqa: PLC0415 - the package's one constant

    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        # the app's files do not change under a running dashboard: no watcher threads
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        # operators, not app developers: no deploy button or developer menu entries
        "--client.toolbarMode",
        "viewer",
        "--",
        *settings.to_argv(),
    ]


def serve(
    settings: DashboardSettings,
    listen: str,
    *,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = None,
    environ: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start Streamlit serving the dashboard on ``listen`` (``HOST:PORT``); the process.

    Checks come first, each a one-line error: ConfigError for a bad ``listen`` or a port in
    use, :class:`StreamlitMissing` without Streamlit. Port 0 picks a free port. The process
    runs in a process group of its own (:func:`stop` ends the group), with Streamlit's own
    banner sent to ``stdout`` (discarded by default: :func:`dashboard_url` says the URL).
    """
    host, port = parse_listen_flag(listen)
    require_streamlit()
    port = check_port_free(host, port)
    env = dict(os.environ if environ is None else environ)
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    return subprocess.Popen(
        streamlit_command(settings, host, port),
        stdout=stdout,
        stderr=stderr,
        env=env,
        process_group=0,  # a terminal's Ctrl-C reaches the launcher, which stops it once
    )


def listen_of(proc: subprocess.Popen[bytes]) -> tuple[str, int]:
    """The host and port a process from :func:`serve` listens on (read from its command)."""
    command = proc.args
    assert isinstance(command, list), command  # serve() passes a list
    args = [str(a) for a in command]
    host = args[args.index("--server.address") + 1]
    port = int(args[args.index("--server.port") + 1])
    return host, port


def healthy(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when the dashboard on ``host:port`` answers its health check with 200."""
    url = dashboard_url(host, port) + HEALTH_PATH
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(
    proc: subprocess.Popen[bytes],
    *,
    timeout_s: float = 60.0,
    stop: threading.Event | None = None,
) -> bool:
    """Wait until the dashboard answers its health check (True).

    False when the process exited, ``stop`` was set or ``timeout_s`` passed first.
    """
    host, port = listen_of(proc)
    deadline = time.monotonic() + timeout_s
    stop = stop or threading.Event()
    while time.monotonic() < deadline and proc.poll() is None and not stop.is_set():
        if healthy(host, port):
            return True
        stop.wait(0.2)  # polling interval
    return False


def stop(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM the dashboard's process group, SIGKILL it after ``timeout_s``; the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    _signal_group(proc, signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        code = proc.wait()
    _signal_group(proc, signal.SIGKILL)  # anything Streamlit started and left behind
    return code


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
