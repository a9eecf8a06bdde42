"""What the fleet benchmarks feed the controller: Prometheus's answers and agents that say yes.

The controller's two boundaries, replaced without touching the code between them:

- **Prometheus.** :func:`answers` builds, from per-node figures (:class:`NodeFigures`), the
  instant vectors that Prometheus answers to each query of :func:`wattwarden.fleet.prom.queries`
  (the label sets its aggregations leave: ``instance``, and ``priority`` on demand), and
  :func:`targets` the active targets of the agents' job. The decision benchmark turns them into
  the JSON bodies Prometheus sends and hands them to the real :class:`~wattwarden.fleet.prom.
  FleetReader` through :class:`RecordedTransport`, which stands in for the socket only (the URL
  is still built, the body still read, decoded and parsed by ``prom.py``). The trace, which is
  about decisions over a day rather than parsing, builds :class:`~wattwarden.fleet.prom.Readings`
  straight from them (:func:`readings`).
- **Agents.** :class:`RecordingLink` answers every push ``ok`` (with the expiry an agent would
  give) and keeps the leases, so the caller can apply them to its simulated nodes;
  :func:`push_in_order` pushes one after the other in this thread (no HTTP, nothing to wait on).
"""

from __future__ import annotations

import io
import json
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wattwarden.fleet.leases import Lease, PushResult
from wattwarden.fleet.prom import FleetReader, PrometheusClient, Readings, Sample, Target
from wattwarden.fleet.prom import queries as prom_queries

JOB = "wattwarden"
AGENT_PORT = 9767
SCRAPE_INTERVAL_S = 15.0
"""The shipped Prometheus configuration's scrape and rule evaluation interval."""
SAMPLE_KEYS = ("power", "gpus_up", "gpus", "floor", "ceiling")
"""Queries answered from one recorded series each (``instance`` and ``job`` labels)."""


@dataclass(slots=True)
class NodeFigures:
    """One node as Prometheus knows it at one time."""

    instance: str
    """The ``instance`` label (the host: the shipped relabelling drops the port)."""
    power_w: float
    gpus: int
    floor_w: float
    ceiling_w: float
    demand_w: dict[str, float]
    """By priority: high, normal, low; above the GPUs' minimum limits (as the controller reads
    it)."""
    scraped_at_s: float
    """When its agent was last scraped (``timestamp(gpu_up)``)."""
    evaluated_at_s: float
    """When the recording rules last ran (``timestamp()`` of the recorded series)."""
    up: bool = True
    starving: bool = False
    lease_w: float | None = None
    """The lease in force on the agent, when it has one."""

    @property
    def address(self) -> str:
        """Where its agent's API answers."""
        return f"{self.instance}:{AGENT_PORT}"


def node_name(i: int) -> str:
    """The host name of node ``i``."""
    return f"gpu-{i:05d}"


# ---------------------------------------------------------------------- Prometheus's answers
def series(nodes: Sequence[NodeFigures]) -> Iterator[tuple[str, dict[str, str], float]]:
    """Every sample Prometheus answers: (query name, labels, value).

    As the queries aggregate them: ``instance`` alone (and ``priority`` on demand); ``starving``
    only for the nodes that are.
    """
    for n in nodes:
        node = {"instance": n.instance}
        yield "up", node, float(n.up)
        if not n.up:
            continue
        figures = (n.power_w, n.gpus, n.gpus, n.floor_w, n.ceiling_w)
        for key, value in zip(SAMPLE_KEYS, figures, strict=True):
            yield key, {"instance": n.instance}, value
        for priority, watts in sorted(n.demand_w.items()):
            yield "demand", {"instance": n.instance, "priority": priority}, watts
        if n.starving:
            yield "starving", {"instance": n.instance}, 1.0
        if n.lease_w is not None:
            yield "lease", {"instance": n.instance}, n.lease_w
        yield "seen_at", {"instance": n.instance}, min(n.scraped_at_s, n.evaluated_at_s)


def answers(nodes: Sequence[NodeFigures], at_s: float) -> dict[str, list[dict[str, Any]]]:
    """Each query's instant vector at ``at_s``, as the API's ``result`` list, by query name."""
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in prom_queries(JOB)}
    for name, labels, value in series(nodes):
        out[name].append({"metric": labels, "value": [at_s, _number(value)]})
    return out


def targets(nodes: Sequence[NodeFigures], last_scrape: str) -> list[dict[str, Any]]:
    """The active targets of the agents' job, as ``/api/v1/targets`` lists them."""
    interval = f"{SCRAPE_INTERVAL_S:g}s"
    return [
        {
            "discoveredLabels": {
                "__address__": n.address,
                "__metrics_path__": "/metrics",
                "__scheme__": "http",
                "__scrape_interval__": interval,
                "__scrape_timeout__": "10s",
                "job": JOB,
            },
            "labels": {"instance": n.instance, "job": JOB},
            "scrapePool": JOB,
            "scrapeUrl": f"http://{n.address}/metrics",
            "globalUrl": f"http://{n.address}/metrics",
            "lastError": "" if n.up else "connection refused",
            "lastScrape": last_scrape,
            "lastScrapeDuration": 0.012,
            "health": "up" if n.up else "down",
            "scrapeInterval": interval,
            "scrapeTimeout": "10s",
        }
        for n in nodes
    ]


def _number(value: float) -> str:
    """A sample value as Prometheus writes it (Go's shortest float form)."""
    f = float(value)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def success(data: Any) -> bytes:
    """A success answer's body."""
    return json.dumps({"status": "success", "data": data}, separators=(",", ":")).encode()


def bodies(nodes: Sequence[NodeFigures], at_s: float, last_scrape: str) -> dict[str, bytes]:
    """The body of every answer of one period, keyed by PromQL (``targets`` for the targets)."""
    exprs = prom_queries(JOB)
    out = {
        exprs[name]: success({"resultType": "vector", "result": result})
        for name, result in answers(nodes, at_s).items()
    }
    out["targets"] = success({"activeTargets": targets(nodes, last_scrape), "droppedTargets": []})
    return out


def readings(nodes: Sequence[NodeFigures], at_s: float) -> Readings:
    """What :class:`~wattwarden.fleet.prom.FleetReader` would return, built without JSON."""
    results: dict[str, list[Sample]] = {k: [] for k in prom_queries(JOB)}
    for name, labels, value in series(nodes):
        results[name].append(Sample(labels, float(value), at_s))
    found = [
        Target(n.instance, JOB, n.address, "up" if n.up else "down", SCRAPE_INTERVAL_S)
        for n in nodes
    ]
    return Readings(at_s, results, found)


# ---------------------------------------------------------------------- the transport
class _Response(io.BytesIO):
    """What the opener returns: a body with a status, usable as a context manager."""

    status = 200


class RecordedTransport:
    """Stands in for the HTTP opener of a :class:`PrometheusClient`: recorded bodies by query.

    ``bodies`` is replaced before each period (:func:`bodies`). A query it has no body for
    raises KeyError: the benchmark must answer exactly what the controller asks.
    """

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.requests = 0

    def open(self, request: Any, timeout: float | None = None) -> _Response:
        """Answer one request from the recorded bodies."""
        self.requests += 1
        url = urllib.parse.urlsplit(request.full_url)
        if url.path.endswith("/api/v1/targets"):
            return _Response(self.bodies["targets"])
        query = urllib.parse.parse_qs(url.query)["query"][0]
        return _Response(self.bodies[query])


def recorded_reader() -> tuple[FleetReader, RecordedTransport]:
    """The controller's own reader, whose client reads recorded bodies instead of a socket."""
    client = PrometheusClient("http://prometheus.invalid:9090", timeout_s=2.0)
    if not hasattr(client, "_opener"):
        raise RuntimeError("PrometheusClient no longer has an _opener to stand in for")
    transport = RecordedTransport()
    client._opener = transport  # type: ignore[assignment]  # the socket, and nothing else
    return FleetReader(client, JOB), transport


# ---------------------------------------------------------------------- the agents
@dataclass
class RecordingLink:
    """Agents that take every lease: answers ``ok`` and keeps what was pushed."""

    wall: Callable[[], float]
    pushed: list[Lease] = field(default_factory=list)
    """Every push since the caller last cleared it."""
    held: dict[str, Lease] = field(default_factory=dict)
    """The last lease of each agent, by address."""

    def push(self, lease: Lease) -> PushResult:
        """Take the lease, as an agent does when no one else holds it."""
        self.pushed.append(lease)
        self.held[lease.instance] = lease
        return PushResult(lease.instance, "ok", 200, "", self.wall() + lease.ttl_s)

    def read_lease(self, instance: str) -> dict[str, Any] | None:
        """No lease at the start (a controller's first run)."""
        return None

    def release(self, instance: str, controller: str) -> PushResult:
        """Hand a lease back."""
        self.held.pop(instance, None)
        return PushResult(instance, "ok", 200, "", None)

    def jobs(self, instance: str) -> list[dict[str, Any]]:
        """No job to move (the benchmarks run without a scheduler)."""
        return []


def push_in_order(link: Any, leases: Sequence[Lease], concurrency: int) -> list[PushResult]:
    """Push one lease after the other in this thread (the fake agents answer at once)."""
    return [link.push(lease) for lease in leases]


def demand_by_priority(
    gpus: Iterable[tuple[str | None, float]], above_w: float = 0.0
) -> dict[str, float]:
    """Sum GPUs' demand by priority; a GPU without a job counts as ``low`` (the agents' rule).

    With ``above_w`` (the GPUs' minimum limit), each counts only its draw above it, as the
    agents' ``wattwarden_power_demand_above_min_watts`` does.
    """
    out = {"high": 0.0, "normal": 0.0, "low": 0.0}
    for priority, watts in gpus:
        out[priority or "low"] += max(0.0, watts - above_w)
    return out


def leases_by_instance(held: Mapping[str, Lease]) -> dict[str, float]:
    """The leases held, by instance label (the address less the port)."""
    return {address.rsplit(":", 1)[0]: lease.budget_w for address, lease in held.items()}
