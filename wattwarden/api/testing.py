"""The agent's real HTTP API on a simulated fleet, in-process: a test double shipped with the agent.

Like OpenTelemetry's ``InMemoryMetricReader``, :class:`SimAgent` is the real pipeline minus the
hardware: a :class:`~wattwarden.hardware.sim.fleet.SimFleet` (on any clock) read by the GPU
collector (and, given a sysfs tree, the RAPL collector) into a store, the job registry, and the
API server itself (routes, auth, contract checks) on 127.0.0.1, port 0 (:attr:`SimAgent.url`
has the bound port). Sampler passes are taken by hand (:meth:`SimAgent.sample`), so a test on a
manual clock decides when readings move. Each request's method, path and status are recorded,
and :meth:`SimAgent.wait_until` waits (with a deadline) for a condition on them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wattwarden.api.http import HttpServer
from wattwarden.api.server import AgentContext, build_app, energy_json
from wattwarden.collectors.base import Collector
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.rapl import RaplCollector, RaplSample
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.hardware.sim.fleet import SimFleet

DEFAULT_TOKEN = "test-token"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the agent answered."""

    method: str
    path: str
    status: int


class SimAgent:
    """The agent's API over a simulated fleet, served on loopback from this process."""

    def __init__(
        self,
        fleet: SimFleet | None = None,
        *,
        token: str = DEFAULT_TOKEN,
        rapl_root: Path | None = None,
        mode: str = "dry_run",
    ) -> None:
        self.fleet = fleet if fleet is not None else SimFleet(2)
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.on_request: Callable[[str, str], None] | None = None
        """Called (in a worker thread) with each request's method and path before it is served."""
        self._cond = threading.Condition()
        backend = SimBackend(self.fleet)
        self.store = MetricStore()
        collectors: list[Collector] = [GpuCollector(backend)]
        if rapl_root is not None:
            rapl = RaplCollector(rapl_root)
            rapl.interval_s = None  # read at every pass: sample() says when
            collectors.append(rapl)
        self._sampler = Sampler(self.store, collectors)
        self.jobs = JobRegistry()
        self.context = AgentContext(
            store=self.store,
            registry=CollectorRegistry(auto_describe=False),
            token=token,
            backend="sim",
            node="sim-agent",
            interval_s=self._sampler.interval_s,
            fleet=self.fleet,
            mode=mode,
            jobs=self.jobs,
            energy=lambda: energy_json(
                backend.devices(), self.store.snapshot().samples(RaplSample)
            ),
        )
        self.sample()
        self._server = HttpServer("127.0.0.1", 0)
        try:
            self._server.start(_Recorder(build_app(self.context), self))
        except BaseException:
            self._server.close()
            raise

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._server.address
        return f"http://{host}:{port}"

    def sample(self) -> None:
        """One sampler pass: the store takes the fleet's (and host's) readings now."""
        self._sampler.run_once()

    def matching(self, method: str, path: str) -> list[RecordedRequest]:
        """Answered requests with this method and path."""
        with self._cond:
            return [r for r in self.requests if r.method == method and r.path == path]

    def wait_until(
        self, predicate: Callable[[], object], *, timeout_s: float = 30.0, what: str = ""
    ) -> None:
        """Block until ``predicate()`` holds after some request, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"sim agent: timed out waiting for {what or predicate}")
                self._cond.wait(remaining)

    def _record(self, request: RecordedRequest) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop serving."""
        self._server.close()

    def __enter__(self) -> SimAgent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Recorder:
    """ASGI layer that hands each request to ``on_request`` first and records its status."""

    def __init__(self, app: ASGIApp, agent: SimAgent) -> None:
        self.app = app
        self.agent = agent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = str(scope["method"]), str(scope["path"])
        hook = self.agent.on_request
        if hook is not None:
            await run_in_threadpool(hook, method, path)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                await send(message)
                self.agent._record(RecordedRequest(method, path, status))
                return
            await send(message)

        await self.app(scope, receive, recording_send)
