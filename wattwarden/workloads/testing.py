"""A stand-in for the agent's energy and job endpoints, for testing workloads without an agent.

:class:`FakeAgent` serves, on loopback, what workloads and the job supervisor use:
``GET /healthz``, ``GET /api/v1/energy`` (counters of a :class:`SimFleet` read at request time),
``POST /api/v1/jobs``, ``GET|DELETE /api/v1/jobs/{name}`` and
``POST /api/v1/jobs/{name}/progress``, writes guarded by a bearer token. It records every
request, and :meth:`FakeAgent.wait_until` waits (with a deadline) for a condition on them.
Setting a job's ``target_gpu`` asks its supervisor to move it, as the agent's policies do.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from wattwarden.hardware.errors import HardwareError
from wattwarden.hardware.sim.fleet import SimFleet
from wattwarden.hardware.sim.gpu import SimProcess


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the fake agent received."""

    method: str
    path: str
    body: Any
    authorization: str | None
    time_s: float = field(default_factory=time.monotonic)


class FakeAgent:
    """A threaded HTTP server with the agent's job and energy endpoints."""

    def __init__(
        self,
        fleet: SimFleet | None = None,
        *,
        token: str = "test-token",
        host_energy: Callable[[], dict[str, float]] | None = None,
        job_utilization: float = 0.0,
    ) -> None:
        self.fleet = fleet
        self.token = token
        self.host_energy = host_energy
        self.job_utilization = job_utilization
        self.requests: list[RecordedRequest] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self.on_request: Callable[[RecordedRequest], None] | None = None
        handler = type("Handler", (_Handler,), {"agent": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-agent", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def set_target_gpu(self, name: str, gpu: int | None) -> None:
        """Ask the job's supervisor to move it to ``gpu``."""
        with self._cond:
            self.jobs[name]["target_gpu"] = gpu

    def record(self, req: RecordedRequest) -> None:
        """Keep a request and wake waiters."""
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()
        if self.on_request is not None:
            self.on_request(req)

    def matching(self, method: str, path_prefix: str = "") -> list[RecordedRequest]:
        """Recorded requests with this method whose path starts with ``path_prefix``."""
        with self._cond:
            return [
                r for r in self.requests if r.method == method and r.path.startswith(path_prefix)
            ]

    def wait_until(
        self, predicate: Callable[[], bool], *, timeout_s: float = 30.0, what: str = ""
    ) -> None:
        """Block until ``predicate()`` holds after some request, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"fake agent: timed out waiting for {what or predicate}")
                self._cond.wait(remaining)

    # ---------------------------------------------------------------- state
    def place(self, job: dict[str, Any]) -> None:
        """Put a registered job's load on its simulated GPU."""
        if self.fleet is None or self.job_utilization <= 0:
            return
        gpu = int(job["gpu"])
        if 0 <= gpu < len(self.fleet):
            proc = SimProcess(int(job["pid"]), self.job_utilization, 2 * 2**30, str(job["name"]))
            self.fleet[gpu].add_process(proc)

    def unplace(self, job: dict[str, Any]) -> None:
        """Take a job's load off its simulated GPU."""
        if self.fleet is None:
            return
        gpu = int(job["gpu"])
        if 0 <= gpu < len(self.fleet):
            self.fleet[gpu].remove_process(int(job["pid"]))

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeAgent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once (no delayed-ACK stall)
    agent: FakeAgent

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._reply(400, {"error": "body is not JSON"})
            return
        path = urlsplit(self.path).path.rstrip("/")
        req = RecordedRequest(self.command, path, body, self.headers.get("Authorization"))
        self.agent.record(req)
        if self.command in ("POST", "DELETE"):
            given = (req.authorization or "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.agent.token.encode()):
                self._reply(401, {"error": "missing or wrong bearer token"})
                return
        status, reply = self._route(self.command, path, body)
        self._reply(status, reply)

    do_GET = do_POST = do_DELETE = _handle

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        agent = self.agent
        if method == "GET" and path == "/healthz":
            return 200, {"ok": True}
        if method == "GET" and path == "/api/v1/energy":
            return 200, self._energy()
        if method == "POST" and path == "/api/v1/jobs":
            if not isinstance(body, dict) or not {"name", "pid", "gpu", "priority"} <= set(body):
                return 400, {"error": "need name, pid, gpu, priority"}
            with agent._cond:
                old = agent.jobs.get(body["name"])
                if old is not None:
                    agent.unplace(old)
                new = {**body, "target_gpu": None}
                agent.jobs[body["name"]] = new
                agent.place(new)
            return (201 if old is None else 200), new
        if path.startswith("/api/v1/jobs/"):
            rest = path[len("/api/v1/jobs/") :]
            name, _, tail = rest.partition("/")
            name = unquote(name)
            with agent._cond:
                job = agent.jobs.get(name)
                if job is None:
                    return 404, {"error": f"no job {name}"}
                if method == "GET" and not tail:
                    return 200, dict(job)
                if method == "DELETE" and not tail:
                    agent.unplace(agent.jobs.pop(name))
                    return 200, {"name": name}
                if method == "POST" and tail == "progress":
                    job["progress"] = body
                    return 200, {"name": name}
        return 404, {"error": f"no such endpoint: {method} {path}"}

    def _energy(self) -> dict[str, Any]:
        gpus = []
        for g in self.agent.fleet.gpus if self.agent.fleet is not None else []:
            try:
                energy: float | None = g.total_energy_mj() / 1000.0
            except HardwareError:
                energy = None
            gpus.append({"index": g.index, "uuid": g.uuid, "energy_joules": energy})
        host = self.agent.host_energy() if self.agent.host_energy is not None else {}
        return {
            "timestamp": time.time(),
            "gpus": gpus,
            "host": [{"domain": d, "energy_joules": e} for d, e in host.items()],
        }
