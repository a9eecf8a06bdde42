"""The controller's own metrics and its small HTTP server (``/metrics``, ``/healthz``).

The loop publishes its state into :class:`ControllerMetrics` at the end of each period (one
lock, held only to copy); a scrape renders that state and does nothing slow. Each metric is
declared once in :data:`METRICS` (name, kind, help, labels) and rendered from it.

The server is the agent's connection layer (:class:`wattwarden.api.http.HttpServer`: uvicorn
with production limits) with a two-route Starlette application.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from wattwarden import __version__
from wattwarden.fleet.leases import RESULTS
from wattwarden.fleet.schedulers import MOVE_RESULTS

NODE_STATES = ("ok", "unreachable", "stale")
MODES = ("dry_run", "apply")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: name (without ``_total``), kind, help and labels."""

    name: str
    kind: str  # "gauge" | "counter"
    help: str
    labels: tuple[str, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("wattwarden_controller_budget_watts", "gauge", "The cluster power budget."),
    MetricSpec(
        "wattwarden_controller_cluster_power_watts",
        "gauge",
        "GPU power of the fresh nodes, as Prometheus reports it.",
    ),
    MetricSpec(
        "wattwarden_controller_node_budget_watts",
        "gauge",
        "Each node's lease from this controller (in dry-run: the lease it would push).",
        ("instance",),
    ),
    MetricSpec(
        "wattwarden_controller_nodes",
        "gauge",
        "Nodes by state: ok, unreachable, stale.",
        ("state",),
    ),
    MetricSpec(
        "wattwarden_controller_prometheus_up", "gauge", "1 if the last period read Prometheus."
    ),
    MetricSpec(
        "wattwarden_controller_holding",
        "gauge",
        "1 while the controller holds for lack of fresh data (Prometheus down or erroring).",
    ),
    MetricSpec(
        "wattwarden_controller_budget_shortfall_watts",
        "gauge",
        "By how much the nodes' floors exceed the budget (0 while it is reachable).",
    ),
    MetricSpec(
        "wattwarden_controller_lease_pushes",
        "counter",
        "Lease pushes by result: ok, conflict, unauthorized, unreachable, rejected.",
        ("result",),
    ),
    MetricSpec(
        "wattwarden_controller_lease_expiry_min_timestamp_seconds",
        "gauge",
        "When the first of this controller's live leases expires (absent when none is live).",
    ),
    MetricSpec(
        "wattwarden_controller_period_duration_seconds", "gauge", "How long the last period took."
    ),
    MetricSpec(
        "wattwarden_controller_last_period_timestamp_seconds",
        "gauge",
        "When the last period ended.",
    ),
    MetricSpec("wattwarden_controller_mode", "gauge", "1 for the mode in force.", ("mode",)),
    MetricSpec(
        "wattwarden_controller_migrations",
        "counter",
        "Job moves asked of a scheduler, by result: requested, refused, failed.",
        ("scheduler", "result"),
    ),
    MetricSpec("wattwarden_controller_build_info", "gauge", "Always 1.", ("version",)),
)


@dataclass(frozen=True, slots=True)
class ControllerState:
    """What the loop publishes each period (and what a scrape renders)."""

    budget_w: float
    mode: str
    cluster_power_w: float | None = None
    node_budget_w: Mapping[str, float] = field(default_factory=dict)
    nodes: Mapping[str, int] = field(default_factory=dict)
    prometheus_up: bool = False
    holding: bool = True
    shortfall_w: float = 0.0
    lease_expiry_min_s: float | None = None
    period_duration_s: float | None = None
    last_period_s: float | None = None
    last_period_mono: float | None = None
    """Monotonic time of the last period's end, for ``/healthz``."""
    holding_reason: str = "no period has run yet"


class ControllerMetrics:
    """The loop's state and counters, rendered at scrape time. Thread-safe."""

    def __init__(self, budget_w: float, mode: str, scheduler: str | None = None) -> None:
        """``scheduler``: the scheduler's name, whose move counters start at 0."""
        self._lock = threading.Lock()  # guards every attribute below; held only to copy
        self._state = ControllerState(budget_w=budget_w, mode=mode)
        self._pushes = dict.fromkeys(RESULTS, 0)
        self._migrations: dict[tuple[str, str], int] = (
            {} if scheduler is None else {(scheduler, r): 0 for r in MOVE_RESULTS}
        )

    @property
    def state(self) -> ControllerState:
        """The latest published state."""
        with self._lock:
            return self._state

    def publish(self, state: ControllerState) -> None:
        """Replace the published state (end of a period)."""
        with self._lock:
            self._state = state

    def update(self, **changes: object) -> None:
        """Change some fields of the published state."""
        with self._lock:
            self._state = replace(self._state, **changes)  # type: ignore[arg-type]

    def count_push(self, result: str) -> None:
        """Count one push by its result."""
        with self._lock:
            self._pushes[result] = self._pushes.get(result, 0) + 1

    def count_pushes(self, counts: Mapping[str, int]) -> None:
        """Count a batch of pushes: how many got each result."""
        with self._lock:
            for result, n in counts.items():
                self._pushes[result] = self._pushes.get(result, 0) + n

    def count_migration(self, scheduler: str, result: str) -> None:
        """Count one move asked of ``scheduler`` by its result."""
        with self._lock:
            key = (scheduler, result)
            self._migrations[key] = self._migrations.get(key, 0) + 1

    def pushes(self) -> dict[str, int]:
        """Pushes so far by result."""
        with self._lock:
            return dict(self._pushes)

    def migrations(self) -> dict[tuple[str, str], int]:
        """Moves so far by (scheduler, result)."""
        with self._lock:
            return dict(self._migrations)

    def collect(self) -> Iterator[Metric]:
        """The metric families (prometheus_client's collector protocol)."""
        with self._lock:
            s, pushes, moves = self._state, dict(self._pushes), dict(self._migrations)
        values: dict[str, list[tuple[tuple[str, ...], float]]] = {
            "wattwarden_controller_budget_watts": [((), s.budget_w)],
            "wattwarden_controller_cluster_power_watts": _one(s.cluster_power_w),
            "wattwarden_controller_node_budget_watts": [
                ((i,), w) for i, w in sorted(s.node_budget_w.items())
            ],
            "wattwarden_controller_nodes": [((k,), s.nodes.get(k, 0)) for k in NODE_STATES],
            "wattwarden_controller_prometheus_up": [((), float(s.prometheus_up))],
            "wattwarden_controller_holding": [((), float(s.holding))],
            "wattwarden_controller_budget_shortfall_watts": [((), s.shortfall_w)],
            "wattwarden_controller_lease_pushes": [((r,), pushes.get(r, 0)) for r in RESULTS],
            "wattwarden_controller_lease_expiry_min_timestamp_seconds": _one(s.lease_expiry_min_s),
            "wattwarden_controller_period_duration_seconds": _one(s.period_duration_s),
            "wattwarden_controller_last_period_timestamp_seconds": _one(s.last_period_s),
            "wattwarden_controller_mode": [((m,), float(m == s.mode)) for m in MODES],
            "wattwarden_controller_migrations": [
                ((sched, r), n) for (sched, r), n in sorted(moves.items())
            ],
            "wattwarden_controller_build_info": [((__version__,), 1.0)],
        }
        for spec in METRICS:
            family: GaugeMetricFamily | CounterMetricFamily
            if spec.kind == "counter":
                family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            else:
                family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            for labels, value in values[spec.name]:
                if math.isfinite(value):
                    family.add_metric(list(labels), value)
            yield family

    # ------------------------------------------------------------------ health
    def health(
        self, stalled_after_s: float, monotonic: Callable[[], float]
    ) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: healthy while periods keep ending (holding is healthy: it is by design)."""
        s = self.state
        age = None if s.last_period_mono is None else monotonic() - s.last_period_mono
        ok = age is not None and age <= stalled_after_s
        body = {
            "status": "ok" if ok else "stalled",
            "mode": s.mode,
            "holding": s.holding,
            "holding_reason": s.holding_reason if s.holding else None,
            "prometheus_up": s.prometheus_up,
            "last_period_age_seconds": None if age is None else round(age, 3),
        }
        return ok, body


def _one(value: float | None) -> list[tuple[tuple[str, ...], float]]:
    return [] if value is None else [((), value)]


def registry_of(metrics: ControllerMetrics) -> CollectorRegistry:
    """A registry holding only the controller's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry


def app(
    metrics: ControllerMetrics,
    *,
    stalled_after_s: float,
    monotonic: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The controller's HTTP application: ``/metrics`` and ``/healthz``."""
    registry = registry_of(metrics)

    def render(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    def healthz(request: Request) -> Response:
        ok, body = metrics.health(stalled_after_s, monotonic)
        return JSONResponse(body, status_code=200 if ok else 503)

    def index(request: Request) -> Response:
        return PlainTextResponse("wattwarden controller: /metrics /healthz\n")

    return Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/metrics", render, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
