"""The agent's HTTP server: /metrics, health, JSON state, and authenticated control endpoints.

One port, stdlib ``ThreadingHTTPServer``. Reads are open (bind to loopback, or put a proxy or the
exporter-toolkit-style TLS in front); writes need ``Authorization: Bearer <token>``, compared in
constant time.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CollectorRegistry

from wattwarden.api.state import history_json, state_json
from wattwarden.api.webconfig import WebConfig
from wattwarden.collectors.jobs import JobError, JobRegistry, JobView
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.prometheus import render
from wattwarden.hardware.errors import HardwareError, InvalidArgument
from wattwarden.hardware.sim.fleet import SimFleet
from wattwarden.policies.actuator import LimitActuator, RateLimited

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
TOKEN_FILE = "token"


def ensure_token(state_dir: Path) -> str:
    """Read the write token, creating it (mode 0600) at first start."""
    path = state_dir / TOKEN_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"{path} is empty; delete it to have a new token made") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class ApiError(Exception):
    """An error with an HTTP status, sent as ``{"error": message}``."""

    def __init__(self, status: HTTPStatus, message: str, *, challenge: str = "Bearer") -> None:
        super().__init__(message)
        self.status = status
        self.challenge = challenge


@dataclass
class AgentContext:
    """What the handlers need from the running agent."""

    store: MetricStore
    registry: CollectorRegistry
    token: str
    backend: str
    node: str
    interval_s: float
    actuator: LimitActuator | None = None
    fleet: SimFleet | None = None
    mode: str = "dry_run"
    jobs: JobRegistry = field(default_factory=JobRegistry)
    web: WebConfig | None = None
    energy: Callable[[], dict[str, Any]] | None = None
    """Reads the GPU energy counters now, for ``GET /api/v1/energy``."""


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in body:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"missing field {key!r}")
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field {key!r} has the wrong type: {value!r}")
    return value


def _gpu_index(body: dict[str, Any], count: int) -> int:
    gpu = int(_field(body, "gpu", int))
    if not 0 <= gpu < count:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no GPU {gpu} (this node has {count})")
    return gpu


class _Handler(BaseHTTPRequestHandler):
    server_version = "wattwarden"
    protocol_version = "HTTP/1.1"
    # keep-alive clients (EnergyMeter) would otherwise wait out delayed ACKs: ~40 ms a request
    disable_nagle_algorithm = True
    timeout = 60  # seconds a connection may sit idle or half-sent before its thread gives up
    ctx: AgentContext

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------ plumbing
    def handle(self) -> None:
        """Serve the connection; with TLS, shake hands first, here on its own thread."""
        try:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.do_handshake()
            super().handle()
        except (ssl.SSLError, ConnectionError, TimeoutError) as e:
            log.debug("connection from %s dropped: %s", self.client_address[0], e)

    def _send(self, status: int, body: bytes, content_type: str, challenge: str = "Bearer") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", f'{challenge} realm="wattwarden"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    def _authorize(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        ok = hmac.compare_digest(given.strip().encode(), self.ctx.token.encode())
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")

    def _dispatch(self, routes: dict[str, Callable[[], None]]) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            route = routes.get(path)
            if route is None and path.startswith(JOBS_PREFIX):
                route = routes.get(JOBS_PREFIX + "{name}" + _job_action(path))
            if route is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
            route()
        except JobError as e:
            missing = str(e).startswith("no job named")
            self._json(
                HTTPStatus.NOT_FOUND if missing else HTTPStatus.BAD_REQUEST, {"error": str(e)}
            )
        except ApiError as e:
            body = json.dumps({"error": str(e)}).encode()
            self._send(e.status, body, "application/json", e.challenge)
        except Exception:
            log.exception("handling %s %s", self.command, self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see agent log"})

    # --------------------------------------------------------------- reads
    def _authorize_read(self, route: Callable[[], None]) -> Callable[[], None]:
        """Basic auth for reads, where the web config names users."""
        web = self.ctx.web
        if web is None or not web.users:
            return route

        def guarded() -> None:
            scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
            try:
                user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if scheme.lower() != "basic" or not web.check_basic(user, password):
                raise ApiError(HTTPStatus.UNAUTHORIZED, "basic auth required", challenge="Basic")
            route()

        return guarded

    def do_GET(self) -> None:
        """Read endpoints (all but /healthz behind basic auth where configured)."""
        read = self._authorize_read
        self._dispatch(
            {
                "/metrics": read(self._metrics),
                "/healthz": self._healthz,
                "/api/v1/state": read(self._state),
                "/api/v1/history": read(self._history),
                "/api/v1/energy": read(self._energy),
                "/api/v1/jobs": read(self._jobs),
                JOBS_PREFIX + "{name}": read(self._job),
                "/": read(self._index),
            }
        )

    do_HEAD = do_GET

    def _index(self) -> None:
        body = b"wattwarden agent: /metrics /healthz /api/v1/state /api/v1/history?seconds=N\n"
        self._send(HTTPStatus.OK, body, "text/plain; charset=utf-8")

    def _metrics(self) -> None:
        body, content_type = render(self.ctx.registry, self.headers.get("Accept"))
        self._send(HTTPStatus.OK, body, content_type)

    def _healthz(self) -> None:
        last = self.ctx.store.snapshot().last_sample_s
        stale_after = max(5.0, 10 * self.ctx.interval_s)
        if last is None or time.time() - last > stale_after:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"sampler stalled\n", "text/plain")
        else:
            self._send(HTTPStatus.OK, b"ok\n", "text/plain")

    def _state(self) -> None:
        snap = self.ctx.store.snapshot()
        self._json(
            HTTPStatus.OK,
            state_json(snap, backend=self.ctx.backend, node=self.ctx.node, mode=self.ctx.mode),
        )

    def _history(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        raw = query.get("seconds", ["300"])[-1]
        try:
            seconds = float(raw)
        except ValueError:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"seconds must be a number, got {raw!r}"
            ) from None
        if not 1 <= seconds <= 86400:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"seconds must be within 1..86400, got {raw}")
        self._json(HTTPStatus.OK, history_json(self.ctx.store.history(seconds)))

    # -------------------------------------------------------------- writes
    def do_POST(self) -> None:
        """Write endpoints; all need the bearer token."""

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                self._authorize()
                fn()

            return run

        self._dispatch(
            {
                "/api/v1/power-limits": guarded(self._power_limit),
                "/api/v1/sim/faults": guarded(self._sim_fault),
                "/api/v1/sim/load": guarded(self._sim_load),
                "/api/v1/jobs": guarded(self._register_job),
                JOBS_PREFIX + "{name}/progress": guarded(self._job_progress),
                JOBS_PREFIX + "{name}/migrate": guarded(self._job_migrate),
            }
        )

    def do_DELETE(self) -> None:
        """Remove a job; needs the bearer token."""

        def remove() -> None:
            self._authorize()
            self._json(HTTPStatus.OK, job_json(self.ctx.jobs.unregister(self._job_name())))

        self._dispatch({JOBS_PREFIX + "{name}": remove})

    # ----------------------------------------------------------------- jobs
    def _job_name(self) -> str:
        rest = urlsplit(self.path).path[len(JOBS_PREFIX) :].strip("/")
        return unquote(rest.split("/")[0])

    def _jobs(self) -> None:
        self._json(HTTPStatus.OK, {"jobs": [job_json(j) for j in self.ctx.jobs.jobs()]})

    def _job(self) -> None:
        name = self._job_name()
        self.ctx.jobs.touch(name)  # the supervisor's poll doubles as its heartbeat
        self._json(HTTPStatus.OK, job_json(self.ctx.jobs.get(name)))

    def _register_job(self) -> None:
        body = self._body()
        gpu = _gpu_index(body, len(self.ctx.store.snapshot().gpus))
        utilization = body.get("utilization")
        if utilization is not None and (
            isinstance(utilization, bool) or not isinstance(utilization, int | float)
        ):
            raise ApiError(HTTPStatus.BAD_REQUEST, "field 'utilization' must be a number")
        view, created = self.ctx.jobs.register(
            str(_field(body, "name", str)),
            int(_field(body, "pid", int)),
            gpu,
            str(body.get("priority", "normal")),
            utilization=None if utilization is None else float(utilization),
        )
        log.info("job %s %s on GPU %d (pid %d)", view.name,
                 "registered" if created else "moved", view.gpu, view.pid)  # fmt: skip
        self._json(HTTPStatus.CREATED if created else HTTPStatus.OK, job_json(view))

    def _job_progress(self) -> None:
        body = self._body()
        counts = {k: int(_field(body, k, int)) for k in ("step", "samples", "tokens")}
        if any(v < 0 for v in counts.values()):
            raise ApiError(HTTPStatus.BAD_REQUEST, "step, samples and tokens must be >= 0")
        view = self.ctx.jobs.progress(self._job_name(), **counts)
        self._json(HTTPStatus.OK, job_json(view))

    def _job_migrate(self) -> None:
        body = self._body()
        gpu = _gpu_index(body, len(self.ctx.store.snapshot().gpus))
        view = self.ctx.jobs.request_migration(self._job_name(), gpu)
        self._json(HTTPStatus.OK, job_json(view))

    def _energy(self) -> None:
        if self.ctx.energy is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "energy readings are not available")
        self._json(HTTPStatus.OK, self.ctx.energy())

    def _power_limit(self) -> None:
        body = self._body()
        actuator = self.ctx.actuator
        count = len(self.ctx.store.snapshot().gpus)
        gpu = _gpu_index(body, count)
        watts = float(_field(body, "watts", (int, float)))
        if self.ctx.mode != "apply" or actuator is None:
            raise ApiError(
                HTTPStatus.CONFLICT,
                "the agent runs in dry-run mode; start it with --apply to change power limits",
            )
        try:
            change = actuator.set_limit(gpu, watts, reason="api")
        except InvalidArgument as e:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
        except RateLimited as e:
            raise ApiError(HTTPStatus.TOO_MANY_REQUESTS, str(e)) from None
        except HardwareError as e:
            self.ctx.store.count_policy_action("api", "set_power_limit_failed", "apply")
            raise ApiError(HTTPStatus.BAD_GATEWAY, f"driver refused: {e}") from None
        self.ctx.store.count_policy_action("api", "set_power_limit", "apply")
        self._json(
            HTTPStatus.OK,
            {
                "gpu": gpu,
                "requested_watts": change.requested_w,
                "enforced_watts": change.enforced_w,
            },
        )

    def _fleet(self) -> SimFleet:
        if self.ctx.fleet is None:
            raise ApiError(
                HTTPStatus.NOT_FOUND, "this agent reads real GPUs; sim endpoints are off"
            )
        return self.ctx.fleet

    def _sim_fault(self) -> None:
        fleet = self._fleet()
        body = self._body()
        gpu = _gpu_index(body, len(fleet))
        fault = str(_field(body, "fault", str))
        params = {k: v for k, v in body.items() if k not in ("gpu", "fault")}
        try:
            fleet[gpu].inject(fault, **params)
        except InvalidArgument as e:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
        except TypeError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"bad fault parameters: {e}") from None
        log.warning("sim: injected %s on GPU %d %s", fault, gpu, params or "")
        self._json(HTTPStatus.OK, {"gpu": gpu, "fault": fault})

    def _sim_load(self) -> None:
        fleet = self._fleet()
        body = self._body()
        gpu = _gpu_index(body, len(fleet))
        util = float(_field(body, "utilization", (int, float)))
        memory = body.get("memory_bytes")
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int)):
            raise ApiError(HTTPStatus.BAD_REQUEST, "field 'memory_bytes' must be an integer")
        try:
            fleet[gpu].set_load(util, memory)
        except InvalidArgument as e:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
        self._json(HTTPStatus.OK, {"gpu": gpu, "utilization": util})


JOBS_PREFIX = "/api/v1/jobs/"


def _job_action(path: str) -> str:
    """``/api/v1/jobs/NAME/progress`` -> ``/progress``; ``/api/v1/jobs/NAME`` -> ``""``."""
    parts = path[len(JOBS_PREFIX) :].split("/")
    return "/" + "/".join(parts[1:]) if len(parts) > 1 else ""


def job_json(job: JobView) -> dict[str, Any]:
    """A job as JSON."""
    return {
        "name": job.name,
        "pid": job.pid,
        "gpu": job.gpu,
        "priority": job.priority,
        "registered_at": job.registered_at_s,
        "step": job.step,
        "samples": job.samples,
        "tokens": job.tokens,
        "target_gpu": job.target_gpu,
        "energy_joules": job.energy_j,
        "energy_joules_by_gpu": {str(k): v for k, v in sorted(job.energy_by_gpu_j.items())},
        "power_watts": job.power_w,
        "tokens_per_joule": job.tokens_per_joule,
    }


class ApiServer:
    """The HTTP server on its own thread."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Bind now (so a taken port fails early); serve from :meth:`start`."""
        self._handler: type[_Handler] = type("Handler", (_Handler,), {})
        handler = self._handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        self._server = server_cls((host, port), handler)
        self._server.daemon_threads = True
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (port 0 resolves to the real one)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self, ctx: AgentContext) -> None:
        """Serve ``ctx`` on a daemon thread."""
        self._handler.ctx = ctx
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="wattwarden-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()
