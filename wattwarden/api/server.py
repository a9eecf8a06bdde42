"""The agent's HTTP server: /metrics, health, JSON state, and authenticated control endpoints.

One port: a Starlette application (this module: routes, auth, validation, handlers) served by
uvicorn with production limits (:mod:`wattwarden.api.http`: strict parsing, backlog, connection
cap, deadlines). Reads are open (bind to loopback, or use the exporter-toolkit-style TLS and basic
auth); writes need ``Authorization: Bearer <token>``, compared in constant time. Every body field
is checked at the edge: a bad one is a 4xx naming it.

Handlers are plain functions run in Starlette's thread pool (store snapshots, the /metrics render
and bcrypt checks never block the event loop), and the event loop runs on its own thread.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wattwarden.api.http import HttpLimits, HttpServer
from wattwarden.api.state import history_json, job_json, state_json
from wattwarden.api.webconfig import WebConfig
from wattwarden.collectors.jobs import (
    COUNT_MAX,
    NAME_PATTERN,
    PID_MAX,
    PRIORITIES,
    JobConflict,
    JobError,
    JobRegistry,
)
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.prometheus import render
from wattwarden.hardware.errors import HardwareError, InvalidArgument
from wattwarden.hardware.sim.fleet import SimFleet
from wattwarden.policies.actuator import LimitActuator, RateLimited

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 16
SIM_FAULT_PARAMS = frozenset({"delta_c", "xid", "field"})
JOBS_PREFIX = "/api/v1/jobs/"


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


# ------------------------------------------------------------------ bodies and fields
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(message: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message)


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def _json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest, counted without recursion (strings skipped)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRINGS.sub(b"", raw)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


class _NonFinite:
    """``NaN``, ``Infinity`` or ``-Infinity`` in a body: kept, so the field check can name it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; ApiError (400) naming what is wrong."""
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise _bad(f"body is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        body = json.loads(raw or b"null", parse_constant=_NonFinite)
    except ValueError as e:
        raise _bad(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("body must be a JSON object")
    return body


def _required(body: dict[str, Any], key: str) -> Any:
    if key not in body:
        raise _bad(f"missing field {key!r}")
    return body[key]


def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = _required(body, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"field {key!r} must be an integer, got {_short(value)}")
    if not lo <= value <= hi:
        raise _bad(f"field {key!r} must be within {lo}..{hi}, got {_short(value)}")
    return value


def _number(body: dict[str, Any], key: str) -> float:
    value = _required(body, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"field {key!r} must be a number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _bad(f"field {key!r} must be a finite number, got {_short(value)}")
    return number


def _str(body: dict[str, Any], key: str) -> str:
    value = _required(body, key)
    if not isinstance(value, str):
        raise _bad(f"field {key!r} must be a string, got {_short(value)}")
    return value


def _gpu(body: dict[str, Any], count: int) -> int:
    value = _required(body, "gpu")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"field 'gpu' must be an integer, got {_short(value)}")
    if not 0 <= value < count:
        raise ApiError(
            HTTPStatus.NOT_FOUND, f"field 'gpu': no GPU {_short(value)} (this node has {count})"
        )
    return value


# ------------------------------------------------------------------------ responses
def _json(status: int, obj: Any) -> Response:
    return Response(json.dumps(obj).encode(), status, media_type="application/json")


def _text(status: int, body: bytes) -> Response:
    return Response(body, status, media_type="text/plain; charset=utf-8")


def _error(status: int, message: str, challenge: str = "Bearer") -> Response:
    response = _json(status, {"error": message})
    if status == HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = f'{challenge} realm="wattwarden"'
    return response


Sync = Callable[[], Response]


class _Api:
    """The endpoints over one agent context."""

    def __init__(self, ctx: AgentContext, limits: HttpLimits) -> None:
        self.ctx = ctx
        self.limits = limits

    def routes(self) -> list[Route]:
        read, write = self._read, self._write
        get, post, delete = ["GET"], ["POST"], ["DELETE"]
        return [
            Route("/", read(self._index), methods=get),
            Route("/metrics", read(self._metrics), methods=get),
            Route("/healthz", read(self._healthz, open_=True), methods=get),
            Route("/api/v1/state", read(self._state), methods=get),
            Route("/api/v1/history", read(self._history), methods=get),
            Route("/api/v1/energy", read(self._energy), methods=get),
            Route("/api/v1/jobs", read(self._jobs), methods=get),
            Route("/api/v1/jobs", write(self._register_job), methods=post),
            Route(JOBS_PREFIX + "{name}", read(self._job), methods=get),
            Route(JOBS_PREFIX + "{name}", write(self._unregister_job, body=False), methods=delete),
            Route(JOBS_PREFIX + "{name}/progress", write(self._job_progress), methods=post),
            Route(JOBS_PREFIX + "{name}/migrate", write(self._job_migrate), methods=post),
            Route("/api/v1/power-limits", write(self._power_limit), methods=post),
            Route("/api/v1/sim/faults", write(self._sim_fault), methods=post),
            Route("/api/v1/sim/load", write(self._sim_load), methods=post),
        ]

    # ------------------------------------------------------------ plumbing
    def _read(
        self, fn: Callable[[Request], Response], *, open_: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """A read endpoint: basic auth (where configured, and not ``open_``), then ``fn``."""

        async def endpoint(request: Request) -> Response:
            def run() -> Response:
                if not open_:
                    self._check_basic(request)
                return fn(request)

            return await self._call(run)

        return endpoint

    def _write(
        self, fn: Callable[[Request, dict[str, Any]], Response], *, body: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """A write endpoint: the bearer token (before the body is read), the body, then ``fn``."""

        async def endpoint(request: Request) -> Response:
            try:
                self._check_bearer(request)
                data = await self._body(request) if body else {}
            except ApiError as e:
                return _error(e.status, str(e), e.challenge)
            except ClientDisconnect:
                log.debug("client %s went away mid-request", _client(request))
                return _error(HTTPStatus.BAD_REQUEST, "client disconnected")
            return await self._call(lambda: fn(request, data))

        return endpoint

    async def _call(self, run: Sync) -> Response:
        try:
            return await run_in_threadpool(run)
        except ApiError as e:
            return _error(e.status, str(e), e.challenge)
        except JobConflict as e:
            return _error(HTTPStatus.CONFLICT, str(e))
        except JobError as e:
            missing = str(e).startswith("no job named")
            return _error(HTTPStatus.NOT_FOUND if missing else HTTPStatus.BAD_REQUEST, str(e))
        except Exception:
            log.exception("internal error handling a request")
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see agent log")

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return parse_body(b"".join(chunks))

    def _check_bearer(self, request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        ok = hmac.compare_digest(given.strip().encode(), self.ctx.token.encode())
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")

    def _check_basic(self, request: Request) -> None:
        """Basic auth for reads, where the web config names users."""
        web = self.ctx.web
        if web is None or not web.users:
            return
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user, password = "", ""
        if scheme.lower() != "basic" or not web.check_basic(user, password):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "basic auth required", challenge="Basic")

    # --------------------------------------------------------------- reads
    def _index(self, request: Request) -> Response:
        body = b"wattwarden agent: /metrics /healthz /api/v1/state /api/v1/history?seconds=N\n"
        return _text(HTTPStatus.OK, body)

    def _metrics(self, request: Request) -> Response:
        body, content_type = render(self.ctx.registry, request.headers.get("accept"))
        return Response(body, HTTPStatus.OK, media_type=content_type)

    def _healthz(self, request: Request) -> Response:
        last = self.ctx.store.snapshot().last_sample_s
        stale_after = max(5.0, 10 * self.ctx.interval_s)
        if last is None or time.time() - last > stale_after:
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, b"sampler stalled\n")
        return _text(HTTPStatus.OK, b"ok\n")

    def _state(self, request: Request) -> Response:
        snap = self.ctx.store.snapshot()
        ctx = self.ctx
        return _json(
            HTTPStatus.OK, state_json(snap, backend=ctx.backend, node=ctx.node, mode=ctx.mode)
        )

    def _history(self, request: Request) -> Response:
        raw = request.query_params.getlist("seconds")[-1:] or ["300"]
        try:
            seconds = float(raw[0])
        except ValueError:
            raise _bad(f"seconds must be a number, got {_short(raw[0])}") from None
        if not 1 <= seconds <= 86400:
            raise _bad(f"seconds must be within 1..86400, got {_short(raw[0])}")
        return _json(HTTPStatus.OK, history_json(self.ctx.store.history(seconds)))

    def _energy(self, request: Request) -> Response:
        if self.ctx.energy is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "energy readings are not available")
        return _json(HTTPStatus.OK, self.ctx.energy())

    # ----------------------------------------------------------------- jobs
    def _jobs(self, request: Request) -> Response:
        return _json(HTTPStatus.OK, {"jobs": [job_json(j) for j in self.ctx.jobs.jobs()]})

    def _job(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.ctx.jobs.touch(name)  # the supervisor's poll doubles as its heartbeat
        return _json(HTTPStatus.OK, job_json(self.ctx.jobs.get(name)))

    def _unregister_job(self, request: Request, body: dict[str, Any]) -> Response:
        return _json(HTTPStatus.OK, job_json(self.ctx.jobs.unregister(request.path_params["name"])))

    def _register_job(self, request: Request, body: dict[str, Any]) -> Response:
        name = _str(body, "name")
        if not NAME_PATTERN.fullmatch(name):
            raise _bad(
                f"field 'name' must be 1-64 of A-Z a-z 0-9 _ . : - starting with a letter or "
                f"digit, got {_short(name)}"
            )
        pid = _int(body, "pid", 1, PID_MAX)
        gpu = _gpu(body, len(self.ctx.store.snapshot().gpus))
        priority = body.get("priority", "normal")
        if priority not in PRIORITIES:
            raise _bad(f"field 'priority' must be one of {', '.join(PRIORITIES)}")
        utilization = None
        if body.get("utilization") is not None:
            utilization = _number(body, "utilization")
            if not 0.0 < utilization <= 1.0:
                raise _bad(f"field 'utilization' must be within (0, 1], got {utilization}")
        view, created = self.ctx.jobs.register(name, pid, gpu, priority, utilization=utilization)
        log.info("job %s %s on GPU %d (pid %d)", view.name,
                 "registered" if created else "moved", view.gpu, view.pid)  # fmt: skip
        return _json(HTTPStatus.CREATED if created else HTTPStatus.OK, job_json(view))

    def _job_progress(self, request: Request, body: dict[str, Any]) -> Response:
        counts = {k: _int(body, k, 0, COUNT_MAX) for k in ("step", "samples", "tokens")}
        view = self.ctx.jobs.progress(request.path_params["name"], **counts)
        return _json(HTTPStatus.OK, job_json(view))

    def _job_migrate(self, request: Request, body: dict[str, Any]) -> Response:
        gpu = _gpu(body, len(self.ctx.store.snapshot().gpus))
        view = self.ctx.jobs.request_migration(request.path_params["name"], gpu)
        return _json(HTTPStatus.OK, job_json(view))

    # -------------------------------------------------------- power limits
    def _power_limit(self, request: Request, body: dict[str, Any]) -> Response:
        actuator = self.ctx.actuator
        gpu = _gpu(body, len(self.ctx.store.snapshot().gpus))
        watts = _number(body, "watts")
        if self.ctx.mode != "apply" or actuator is None:
            raise ApiError(
                HTTPStatus.CONFLICT,
                "the agent runs in dry-run mode; start it with --apply to change power limits",
            )
        try:
            change = actuator.set_limit(gpu, watts, reason="api")
        except InvalidArgument as e:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, f"field 'watts': {e}") from None
        except RateLimited as e:
            raise ApiError(HTTPStatus.TOO_MANY_REQUESTS, str(e)) from None
        except HardwareError as e:
            self.ctx.store.count_policy_action("api", "set_power_limit_failed", "apply")
            raise ApiError(HTTPStatus.BAD_GATEWAY, f"driver refused: {e}") from None
        self.ctx.store.count_policy_action("api", "set_power_limit", "apply")
        return _json(
            HTTPStatus.OK,
            {
                "gpu": gpu,
                "requested_watts": change.requested_w,
                "enforced_watts": change.enforced_w,
            },
        )

    # ------------------------------------------------------------- the sim
    def _fleet(self) -> SimFleet:
        if self.ctx.fleet is None:
            raise ApiError(
                HTTPStatus.NOT_FOUND, "this agent reads real GPUs; sim endpoints are off"
            )
        return self.ctx.fleet

    def _sim_fault(self, request: Request, body: dict[str, Any]) -> Response:
        fleet = self._fleet()
        gpu = _gpu(body, len(fleet))
        fault = _str(body, "fault")
        params = {k: v for k, v in body.items() if k not in ("gpu", "fault")}
        unknown = sorted(set(params) - SIM_FAULT_PARAMS)
        if unknown:
            raise _bad(f"field {_short(unknown[0])} is not a fault parameter")
        try:
            fleet[gpu].inject(fault, **params)
        except InvalidArgument as e:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
        log.warning("sim: injected %s on GPU %d %s", fault, gpu, params or "")
        return _json(HTTPStatus.OK, {"gpu": gpu, "fault": fault})

    def _sim_load(self, request: Request, body: dict[str, Any]) -> Response:
        fleet = self._fleet()
        gpu = _gpu(body, len(fleet))
        util = _number(body, "utilization")
        memory = None
        if body.get("memory_bytes") is not None:
            memory = _int(body, "memory_bytes", 0, COUNT_MAX)
        try:
            fleet[gpu].set_load(util, memory)
        except InvalidArgument as e:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
        return _json(HTTPStatus.OK, {"gpu": gpu, "utilization": util})


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


async def _http_error(request: Request, exc: Exception) -> Response:
    """404 and 405 from routing, as JSON like every other error."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == HTTPStatus.NOT_FOUND:
        message = f"no such endpoint: {request.url.path}"
    elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    response = _error(exc.status_code, message)
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


class _Edge:
    """Outermost ASGI layer: ``/path/`` is ``/path``, and no response is cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"cache-control", b"no-store")]
            await send(message)

        await self.app(scope, receive, send_no_store)


def build_app(ctx: AgentContext, limits: HttpLimits | None = None) -> ASGIApp:
    """The agent's API as an ASGI application."""
    api = _Api(ctx, limits or HttpLimits())
    app = Starlette(routes=api.routes(), exception_handlers={HTTPException: _http_error})
    return _Edge(app)


class ApiServer(HttpServer):
    """The agent's API (:func:`build_app`) on the production HTTP server (:mod:`.http`)."""

    def start(self, ctx: AgentContext, *, timeout_s: float = 10.0) -> None:  # type: ignore[override]
        """Serve the API over ``ctx`` from a daemon thread; return once it accepts connections."""
        super().start(build_app(ctx, self.limits), timeout_s=timeout_s)
