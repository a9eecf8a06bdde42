"""A small client for the agent's HTTP API, for workloads and the job supervisor.

Workloads talk to the agent over HTTP(S) only. By default each request has a connection of its
own (about 1 ms on loopback). ``keep_alive=True`` reuses one connection (about 0.5 ms); the agent
disables Nagle's algorithm so that a kept connection does not wait out the client's delayed ACK
(40 ms) between headers and body. An agent behind a web config takes ``https://user:pass@host``
(basic auth for reads; writes send the bearer token) and the CA in ``$SSL_CERT_FILE``.
Routes, bodies and answers are :mod:`wattwarden.api.contract`'s, the ones the agent checks.
Errors are :class:`AgentError` with a one-line message naming the agent and the problem.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from wattwarden.api.contract import (
    ENERGY,
    HEALTHZ,
    JOB,
    JOB_PROGRESS,
    JOBS,
    ContractError,
    EnergySnapshot,
    GpuEnergy,
    JobProgress,
    JobRecord,
    JobRegistration,
    SchedulerRef,
    job_path,
)
from wattwarden.config import DEFAULT_LISTEN, ConfigError, default_state_dir

__all__ = [
    "AgentClient",
    "AgentError",
    "AgentUnreachable",
    "EnergySnapshot",
    "GpuEnergy",
    "JobRecord",
    "check_url",
    "resolve_token",
]

DEFAULT_AGENT_URL = f"http://{DEFAULT_LISTEN}"
ENV_AGENT_URL = "WATTWARDEN_AGENT_URL"
ENV_JOB_NAME = "WATTWARDEN_JOB_NAME"
ENV_TOKEN = "WATTWARDEN_TOKEN"
ENV_JOB_GPU = "WATTWARDEN_JOB_GPU"
TOKEN_FILE = "token"


class AgentError(Exception):
    """The agent answered with an error, or an unexpected body."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AgentUnreachable(AgentError):
    """No connection to the agent (refused, timed out, reset)."""


def check_url(url: str, what: str = "--agent") -> str:
    """Validate an agent URL (``http[s]://host[:port]``), or raise ConfigError naming ``what``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: expected a URL like http://127.0.0.1:9767, got {url!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{what}: bad port in {url!r}") from None
    return url.rstrip("/")


def resolve_token(token_file: Path | None) -> str | None:
    """The write token: ``token_file``, else ``$WATTWARDEN_TOKEN``, else the state dir's file."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"--token-file: cannot read {token_file}: {e.strerror or e}"
            ) from None
        if not token:
            raise ConfigError(f"--token-file: {token_file} is empty")
        return token
    env = os.environ.get(ENV_TOKEN, "").strip()
    if env:
        return env
    try:
        return (default_state_dir() / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def _error_text(status: int, body: bytes) -> str:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    text = body.decode(errors="replace").strip().splitlines()
    return text[0][:200] if text else http.client.responses.get(status, "error")


class AgentClient:
    """JSON over HTTP to a node agent. Thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 5.0,
        keep_alive: bool = False,
    ) -> None:
        self.url = check_url(url)
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        # an agent with a web config wants basic auth for reads: https://user:password@host:port
        self._basic = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._basic = "Basic " + base64.b64encode(pair.encode()).decode()
            netloc = parts.hostname or ""
            if parts.port is not None:
                netloc += f":{parts.port}"
            self.url = urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.keep_alive = keep_alive
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self, method: str, path: str, body: Any = None, *, auth: bool = False
    ) -> tuple[int, Any]:
        """Send one request and return (status, decoded JSON body or None).

        Raises :class:`AgentUnreachable` when no connection can be made or kept.
        """
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if not self.keep_alive:
            headers["Connection"] = "close"
        if data is not None:
            headers["Content-Type"] = "application/json"
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        elif self._basic is not None:
            headers["Authorization"] = self._basic
        with self._lock:
            for attempt in (0, 1):
                conn = self._connect()
                try:
                    conn.request(method, self._prefix + path, body=data, headers=headers)
                    resp = conn.getresponse()
                    raw = resp.read()
                    content_type = resp.getheader("Content-Type", "")
                    if not self.keep_alive or resp.getheader("Connection", "").lower() == "close":
                        self._drop()
                    break
                except (http.client.HTTPException, OSError) as e:
                    self._drop()
                    # A kept-alive connection the server closed fails on first use: retry once.
                    retry = isinstance(
                        e, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError
                    )
                    if attempt == 0 and retry:
                        continue
                    reason = "timed out" if isinstance(e, socket.timeout) else str(e) or type(e)
                    raise AgentUnreachable(f"cannot reach the agent at {self.url}: {reason}") from e
        status = resp.status
        if status >= 400:
            return status, {"error": _error_text(status, raw)}
        if not raw:
            return status, None
        if "json" not in content_type:
            return status, raw.decode(errors="replace")
        try:
            return status, json.loads(raw)
        except ValueError:
            raise AgentError(
                f"agent at {self.url} sent non-JSON for {method} {path}", status
            ) from None

    def _expect(self, method: str, path: str, body: Any = None, *, auth: bool = False) -> Any:
        status, data = self.request(method, path, body, auth=auth)
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            hint = ""
            if status == 401:
                hint = " (pass --token-file, or set WATTWARDEN_TOKEN to the agent's token)"
            raise AgentError(
                f"agent at {self.url} refused {method} {path}: {status} {message}{hint}", status
            )
        return data

    def _record(self, method: str, path: str, data: Any) -> JobRecord:
        try:
            return JobRecord.from_json(data)
        except ContractError as e:
            raise AgentError(f"agent at {self.url}: unexpected {method} {path} body ({e})") from e

    # ---------------------------------------------------------------- reads
    def healthz(self) -> int:
        """The status of ``GET /healthz`` (any answer means the agent is there)."""
        status, _ = self.request("GET", HEALTHZ)
        return status

    def energy(self) -> EnergySnapshot:
        """``GET /api/v1/energy``."""
        data = self._expect("GET", ENERGY)
        try:
            return EnergySnapshot.from_json(data)
        except ContractError as e:
            raise AgentError(f"agent at {self.url}: unexpected /api/v1/energy body ({e})") from e

    def job(self, name: str) -> JobRecord | None:
        """``GET /api/v1/jobs/{name}``; None when the agent does not know the job (404)."""
        path = job_path(JOB, name)
        status, data = self.request("GET", path)
        if status == HTTPStatus.NOT_FOUND:
            return None
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else data
            raise AgentError(f"agent at {self.url}: GET job {name}: {status} {message}", status)
        return self._record("GET", path, data)

    # --------------------------------------------------------------- writes
    def register_job(
        self,
        name: str,
        pid: int,
        gpu: int,
        priority: str,
        *,
        utilization: float | None = None,
        tune: bool = False,
        migratable: bool = False,
        scheduler: SchedulerRef | None = None,
    ) -> JobRecord:
        """``POST /api/v1/jobs``; ``utilization`` is the load a simulated GPU gets from the job.

        ``scheduler`` says where a scheduler runs it (a Kubernetes pod, a Slurm job).

        A name that a running job of another process holds is refused: AgentError, status 409.
        """
        body = JobRegistration(
            name, pid, gpu, priority, utilization, tune, migratable, scheduler
        ).to_json()
        return self._record("POST", JOBS, self._expect("POST", JOBS, body, auth=True))

    def unregister_job(self, name: str) -> JobRecord | None:
        """``DELETE /api/v1/jobs/{name}``: the job's final record, or None if unknown (404)."""
        path = job_path(JOB, name)
        status, data = self.request("DELETE", path, auth=True)
        if status == HTTPStatus.NOT_FOUND:
            return None
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else data
            raise AgentError(
                f"agent at {self.url} refused DELETE job {name}: {status} {message}", status
            )
        return self._record("DELETE", path, data)

    def post_progress(self, name: str, step: int, samples: int, tokens: int) -> None:
        """``POST /api/v1/jobs/{name}/progress``."""
        body = JobProgress(step, samples, tokens).to_json()
        self._expect("POST", job_path(JOB_PROGRESS, name), body, auth=True)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._drop()
