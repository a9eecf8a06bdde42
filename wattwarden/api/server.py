"""The agent's HTTP server: routing, and the handlers of /metrics, health, state and jobs.

One port: a Starlette application (this module: the route table, auth and body plumbing, and
handlers that validate a body with :mod:`.contract` and delegate) served by uvicorn with
production limits (:mod:`.http`). Reads are open (bind to loopback, or use the
exporter-toolkit-style TLS and basic auth); writes need ``Authorization: Bearer <token>``
(:mod:`.auth`). Decisions are not taken here: a power-limit change is
:func:`wattwarden.policies.manual.set_power_limit`'s, simulator controls are :mod:`.sim_routes`.

Handlers are plain functions run in Starlette's thread pool (store snapshots, the /metrics render
and bcrypt checks never block the event loop), and the event loop runs on its own thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wattwarden.api import contract as c
from wattwarden.api import sim_routes
from wattwarden.api.auth import check_basic, check_bearer
from wattwarden.api.contract import (
    DECISIONS_DEFAULT,
    DECISIONS_MAX,
    ApiError,
    JobProgress,
    JobRecord,
    JobRegistration,
    LeaseRecord,
    LeaseRelease,
    LeaseRequest,
    Migration,
    PolicyStatus,
    PolicyUpdate,
    PowerLimitRequest,
    decision_record,
    lease_json,
    parse_body,
)
from wattwarden.api.http import HttpLimits, HttpServer
from wattwarden.api.sim_routes import SimulatedGpus
from wattwarden.api.state import HISTORY_STEP_MAX_S, history_json, state_json
from wattwarden.api.webconfig import WebConfig
from wattwarden.collectors.jobs import JobConflict, JobError, JobRegistry, JobView
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.prometheus import render
from wattwarden.hardware.device import GpuDevice
from wattwarden.hardware.errors import HardwareError, NotSupported
from wattwarden.policies.actuator import LimitActuator
from wattwarden.policies.control import LeaseConflict, PolicyLoop
from wattwarden.policies.manual import Refusal, Refused, set_power_limit

log = logging.getLogger(__name__)


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
    fleet: SimulatedGpus | None = None
    mode: str = "dry_run"
    """The mode without a control loop; with one, the loop's mode is in force."""
    jobs: JobRegistry = field(default_factory=JobRegistry)
    web: WebConfig | None = None
    energy: Callable[[], dict[str, Any]] | None = None
    """Reads the GPU energy counters now, for ``GET /api/v1/energy``."""
    policy: PolicyLoop | None = None
    """The policy engine's control loop (decisions, ``/api/v1/policy``), if the agent runs one."""

    @property
    def mode_in_force(self) -> str:
        """``apply`` or ``dry_run``: the control loop's (it may have fallen back), else ``mode``."""
        return self.mode if self.policy is None else self.policy.mode


def _bad(message: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------ responses
def _lines(*lines: str) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


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
            Route(c.INDEX, read(self._index), methods=get),
            Route(c.METRICS, read(self._metrics), methods=get),
            Route(c.HEALTHZ, read(self._healthz, open_=True), methods=get),
            Route(c.STATE, read(self._state), methods=get),
            Route(c.HISTORY, read(self._history), methods=get),
            Route(c.ENERGY, read(self._energy), methods=get),
            Route(c.JOBS, read(self._jobs), methods=get),
            Route(c.JOBS, write(self._register_job), methods=post),
            Route(c.JOB, read(self._job), methods=get),
            Route(c.JOB, write(self._unregister_job, body=False), methods=delete),
            Route(c.JOB_PROGRESS, write(self._job_progress), methods=post),
            Route(c.JOB_MIGRATE, write(self._job_migrate), methods=post),
            Route(c.POWER_LIMITS, write(self._power_limit), methods=post),
            Route(c.SIM_FAULTS, write(self._sim_fault), methods=post),
            Route(c.SIM_LOAD, write(self._sim_load), methods=post),
            Route(c.DECISIONS, read(self._decisions), methods=get),
            Route(c.POLICY, read(self._policy), methods=get),
            Route(c.POLICY, write(self._policy_update), methods=post),
            Route(c.POLICY_LEASE, read(self._lease), methods=get),
            Route(c.POLICY_LEASE, write(self._lease_set), methods=post),
            Route(c.POLICY_LEASE, write(self._lease_release), methods=delete),
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
        except (JobConflict, LeaseConflict) as e:
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
        check_bearer(request.headers, self.ctx.token)

    def _check_basic(self, request: Request) -> None:
        check_basic(request.headers, self.ctx.web)

    # --------------------------------------------------------------- reads
    def _index(self, request: Request) -> Response:
        body = b"wattwarden agent: /metrics /healthz /api/v1/state /api/v1/history?seconds=N\n"
        return _text(HTTPStatus.OK, body)

    def _metrics(self, request: Request) -> Response:
        self._expire_lease()
        body, content_type = render(self.ctx.registry, request.headers.get("accept"))
        return Response(body, HTTPStatus.OK, media_type=content_type)

    def _healthz(self, request: Request) -> Response:
        """Health: 200 ``ok``; 200 ``degraded`` with why; 503 ``sampler stalled``.

        Degraded: the policy engine holds, or apply fell back to dry-run (each said on a line
        of its own, after ``sampler stalled`` too).

        Only a stalled sampler is a 503: the agent then serves nothing current, and a restart
        may help. A hold or a fallback leave the agent serving and its limits safe (held, or
        restored), and a restart would not help, so probes must not kill it for them; the
        ``wattwarden_policy_holding`` and ``wattwarden_policy_apply_fallback`` alerts say so.
        """
        age_s = self.ctx.store.seconds_since_pass()
        stale_after = max(5.0, 10 * self.ctx.interval_s)
        loop = self.ctx.policy
        why = []
        if loop is not None:
            holding = loop.holding
            if holding is not None:
                why.append(f"policy engine holding: {holding}")
            fallback = loop.engine.fallback
            if fallback is not None:
                why.append(f"apply fell back to dry-run: {fallback}")
        if age_s is None or age_s > stale_after:
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, _lines("sampler stalled", *why))
        return _text(HTTPStatus.OK, _lines("degraded", *why) if why else b"ok\n")

    def _expire_lease(self) -> None:
        """Drop a lease that ran out before the store is read (every read checks its expiry)."""
        if self.ctx.policy is not None:
            self.ctx.policy.lease()

    def _state(self, request: Request) -> Response:
        self._expire_lease()
        snap = self.ctx.store.snapshot()
        ctx = self.ctx
        loop = ctx.policy
        return _json(
            HTTPStatus.OK,
            state_json(
                snap,
                backend=ctx.backend,
                node=ctx.node,
                mode=ctx.mode_in_force,
                holding=None if loop is None else loop.holding,
                fallback=None if loop is None else loop.engine.fallback,
            ),
        )

    def _history(self, request: Request) -> Response:
        raw = request.query_params.getlist("seconds")[-1:] or ["300"]
        try:
            seconds = float(raw[0])
        except ValueError:
            raise _bad(f"seconds must be a number, got {_short(raw[0])}") from None
        if not 1 <= seconds <= 86400:
            raise _bad(f"seconds must be within 1..86400, got {_short(raw[0])}")
        raw_step = request.query_params.getlist("step")[-1:] or ["1"]
        if not (raw_step[0].isascii() and raw_step[0].isdigit()):
            raise _bad(f"step must be a whole number of seconds, got {_short(raw_step[0])}")
        if len(raw_step[0]) > 9 or not 1 <= int(raw_step[0]) <= HISTORY_STEP_MAX_S:
            raise _bad(f"step must be within 1..{HISTORY_STEP_MAX_S}, got {_short(raw_step[0])}")
        step = int(raw_step[0])
        return _json(HTTPStatus.OK, history_json(self.ctx.store.history(seconds, step), step))

    def _energy(self, request: Request) -> Response:
        if self.ctx.energy is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "energy readings are not available")
        return _json(HTTPStatus.OK, self.ctx.energy())

    # ----------------------------------------------------------------- jobs
    def _gpu_count(self) -> int:
        return len(self.ctx.store.snapshot().gpus)

    def _jobs(self, request: Request) -> Response:
        return _json(HTTPStatus.OK, {"jobs": [_record(j) for j in self.ctx.jobs.jobs()]})

    def _job(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.ctx.jobs.touch(name)  # the supervisor's poll doubles as its heartbeat
        return _json(HTTPStatus.OK, _record(self.ctx.jobs.get(name)))

    def _unregister_job(self, request: Request, body: dict[str, Any]) -> Response:
        return _json(HTTPStatus.OK, _record(self.ctx.jobs.unregister(request.path_params["name"])))

    def _register_job(self, request: Request, body: dict[str, Any]) -> Response:
        req = JobRegistration.from_json(body, self._gpu_count())
        view, created = self.ctx.jobs.register(
            req.name,
            req.pid,
            req.gpu,
            req.priority,
            utilization=req.utilization,
            tune=req.tune,
            migratable=req.migratable,
            scheduler=req.scheduler,
        )
        log.info("job %s %s on GPU %d (pid %d)", view.name,
                 "registered" if created else "moved", view.gpu, view.pid)  # fmt: skip
        return _json(HTTPStatus.CREATED if created else HTTPStatus.OK, _record(view))

    def _job_progress(self, request: Request, body: dict[str, Any]) -> Response:
        req = JobProgress.from_json(body)
        view = self.ctx.jobs.progress(
            request.path_params["name"], step=req.step, samples=req.samples, tokens=req.tokens
        )
        return _json(HTTPStatus.OK, _record(view))

    def _job_migrate(self, request: Request, body: dict[str, Any]) -> Response:
        req = Migration.from_json(body, self._gpu_count())
        view = self.ctx.jobs.request_migration(request.path_params["name"], req.gpu)
        return _json(HTTPStatus.OK, _record(view))

    # -------------------------------------------------------- the policy engine
    def _loop(self) -> PolicyLoop:
        if self.ctx.policy is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "this agent runs no policy engine")
        return self.ctx.policy

    def _decisions(self, request: Request) -> Response:
        raw = request.query_params.getlist("limit")[-1:] or [str(DECISIONS_DEFAULT)]
        try:
            limit = int(raw[0])
        except ValueError:
            raise _bad(f"limit must be an integer, got {_short(raw[0])}") from None
        if not 1 <= limit <= DECISIONS_MAX:
            raise _bad(f"limit must be within 1..{DECISIONS_MAX}, got {_short(raw[0])}")
        records = [decision_record(d).to_json() for d in self._loop().decisions(limit)]
        return _json(HTTPStatus.OK, {"decisions": records})

    def _policy(self, request: Request) -> Response:
        return _json(HTTPStatus.OK, PolicyStatus.from_status(self._loop().status()).to_json())

    def _policy_update(self, request: Request, body: dict[str, Any]) -> Response:
        req = PolicyUpdate.from_json(body)
        loop = self._loop()
        status = loop.update(budget_w=req.power_budget_watts, mode=req.mode, policies=req.policies)
        log.info("policy changed over the API: %s", json.dumps(req.to_json()))
        return _json(HTTPStatus.OK, PolicyStatus.from_status(status).to_json())

    def _lease(self, request: Request) -> Response:
        return _json(HTTPStatus.OK, lease_json(self._loop().status()))

    def _lease_set(self, request: Request, body: dict[str, Any]) -> Response:
        req = LeaseRequest.from_json(body)
        loop = self._loop()
        lease = loop.set_lease(
            budget_w=req.power_budget_watts,
            ttl_s=req.ttl_s,
            controller=req.holder,
            generation=req.generation,
        )
        return _json(HTTPStatus.OK, LeaseRecord.from_lease(lease, lease.ttl_s).to_json())

    def _lease_release(self, request: Request, body: dict[str, Any]) -> Response:
        req = LeaseRelease.from_json(body)
        loop = self._loop()
        loop.release_lease(req.holder)
        return _json(HTTPStatus.OK, lease_json(loop.status()))

    # -------------------------------------------------------- power limits
    def _power_limit(self, request: Request, body: dict[str, Any]) -> Response:
        req = PowerLimitRequest.from_json(body, self._gpu_count())
        ctx = self.ctx
        try:
            change = set_power_limit(ctx.actuator, ctx.mode_in_force, ctx.store, req.gpu, req.watts)
        except Refused as e:
            status, message = _REFUSALS[e.kind]
            raise ApiError(status, message.format(e)) from None
        return _json(
            HTTPStatus.OK,
            {"gpu": req.gpu, "requested_watts": change.requested_w,
             "enforced_watts": change.enforced_w},
        )  # fmt: skip

    # ------------------------------------------------------------- the sim
    def _sim_fault(self, request: Request, body: dict[str, Any]) -> Response:
        return _json(HTTPStatus.OK, sim_routes.inject_fault(self.ctx.fleet, body))

    def _sim_load(self, request: Request, body: dict[str, Any]) -> Response:
        return _json(HTTPStatus.OK, sim_routes.set_load(self.ctx.fleet, body))


_REFUSALS: dict[Refusal, tuple[HTTPStatus, str]] = {
    Refusal.DRY_RUN: (HTTPStatus.CONFLICT, "{}"),
    Refusal.OUT_OF_RANGE: (HTTPStatus.UNPROCESSABLE_ENTITY, "field 'watts': {}"),
    Refusal.TOO_SOON: (HTTPStatus.TOO_MANY_REQUESTS, "{}"),
    Refusal.DRIVER: (HTTPStatus.BAD_GATEWAY, "driver refused: {}"),
}
"""The status of each kind of refused power-limit change, and how its reason is worded."""


class HostEnergy(Protocol):
    """A host energy counter (a RAPL domain's sample)."""

    @property
    def domain(self) -> str:
        """The domain's name."""

    @property
    def energy_j(self) -> float:
        """Its energy since the agent started."""


def energy_json(devices: Iterable[GpuDevice], host: Iterable[HostEnergy]) -> dict[str, Any]:
    """``GET /api/v1/energy``: each GPU's energy counter read now, and the host's latest."""
    gpus = []
    for device in devices:
        entry: dict[str, Any] = {"index": device.index, "uuid": device.info().uuid}
        try:
            entry["energy_joules"] = device.read_energy_j()
        except NotSupported:
            entry["energy_joules"] = None
        except HardwareError as e:
            entry["energy_joules"], entry["error"] = None, str(e)
        gpus.append(entry)
    return {
        "timestamp": time.time(),
        "gpus": gpus,
        "host": [{"domain": h.domain, "energy_joules": h.energy_j} for h in host],
    }


def _record(job: JobView) -> dict[str, Any]:
    return JobRecord.from_view(job).to_json()


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
