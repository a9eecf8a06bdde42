"""What Prometheus says of each node, at one time: the controller's view of the fleet.

:func:`build_view` turns one period's :class:`~wattwarden.fleet.prom.Readings` into one
:class:`NodeObservation` per agent. Pure: no I/O, no clock (the readings carry their time).

Discovery: every series of ``up{job=J}`` is an agent, and so is every active target of that
job. The agent's API address (``HOST:PORT``) is the target's ``__address__``; without a targets
API it is the ``instance`` label when that carries a port, else the label and the agents'
default port.

Freshness: a node is *fresh* when the newest scrape of its GPU series and the oldest
evaluation of the recorded series the controller reads are both within the staleness bound of
the readings' time. The bound (:func:`stale_bound`) is, unless configured, the larger of three
controller periods and two scrape intervals (the target's as the targets API reports it, else
:data:`DEFAULT_SCRAPE_INTERVAL_S`): one missed scrape or one late rule evaluation is normal and
does not make a node stale, two in a row do. A node that is not fresh, or that lacks its floor
or ceiling (no GPU up, or rules missing), cannot be acted on: the controller holds its share
until its lease could have expired, and pushes it nothing built from old data.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from wattwarden.fleet.allocate import PRIORITIES, NodeDemand
from wattwarden.fleet.prom import Readings, Sample, Target, Vector

DEFAULT_SCRAPE_INTERVAL_S = 15.0
"""Prometheus's default scrape interval (and the shipped configuration's)."""
STALE_PERIODS = 3
STALE_SCRAPES = 2


class NodeObservation(NamedTuple):
    """One agent's node as Prometheus saw it (a tuple: a view builds one per node per period)."""

    instance: str
    """Prometheus's ``instance`` label."""
    address: str
    """``HOST:PORT`` of the agent's API."""
    scraped: bool
    """``up`` is 1: Prometheus's last scrape of the agent succeeded."""
    age_s: float | None
    """Age of its oldest series the controller reads; None when some are missing."""
    stale_after_s: float
    power_w: float | None
    gpus_up: int | None
    gpus: int | None
    floor_w: float | None
    ceiling_w: float | None
    demand_w: Mapping[str, float] = MappingProxyType({})
    starving: bool = False
    lease_w: float | None = None
    """The lease the agent reports in force (any controller's), when it has one."""

    @property
    def problem(self) -> str:
        """Why the node cannot be acted on now, in a few words; ``""`` when it can."""
        if self.age_s is None:
            return "no recent series"
        if self.age_s > self.stale_after_s:
            return f"series {self.age_s:.0f} s old (stale after {self.stale_after_s:g} s)"
        if self.floor_w is None or self.ceiling_w is None:
            return "no GPU power limit series (no GPU up?)"
        if self.ceiling_w <= 0:
            return "no GPU up"
        if self.floor_w > self.ceiling_w:
            return f"floor {self.floor_w:.0f} W above ceiling {self.ceiling_w:.0f} W"
        return ""

    @property
    def fresh(self) -> bool:
        """Its series are recent and complete enough to allocate from (no :attr:`problem`).

        The same tests as :attr:`problem`, without building its message: a period asks this
        of every node, more than once.
        """
        age, floor, ceiling = self.age_s, self.floor_w, self.ceiling_w
        return not (
            age is None
            or age > self.stale_after_s
            or floor is None
            or ceiling is None
            or ceiling <= 0
            or floor > ceiling
        )

    def demand(self) -> NodeDemand:
        """The node as the split sees it (only for a fresh node)."""
        if self.floor_w is None or self.ceiling_w is None:
            raise ValueError(f"node {self.instance}: no floor or ceiling")
        return NodeDemand(self.instance, self.floor_w, self.ceiling_w, dict(self.demand_w))


@dataclass(frozen=True, slots=True)
class FleetView:
    """Every node discovered at one time."""

    at_s: float
    nodes: dict[str, NodeObservation]
    """By instance label, sorted."""

    @property
    def cluster_power_w(self) -> float:
        """The GPU power of the fresh nodes."""
        return math.fsum(n.power_w or 0.0 for n in self.nodes.values() if n.fresh)


def stale_bound(period_s: float, scrape_interval_s: float | None) -> float:
    """The default staleness bound: 3 periods or 2 scrape intervals, the larger."""
    interval = scrape_interval_s if scrape_interval_s else DEFAULT_SCRAPE_INTERVAL_S
    return max(STALE_PERIODS * period_s, STALE_SCRAPES * interval)


def agent_address(instance: str, target: Target | None, agent_port: int) -> str:
    """Where the agent's API answers: the target's address, else from the instance label."""
    if target is not None:
        return target.address
    if instance.startswith("["):  # [v6]:port
        return instance
    try:
        ip = ipaddress.ip_address(instance)
    except ValueError:
        ip = None
    if ip is not None:
        return f"[{ip}]:{agent_port}" if ip.version == 6 else f"{ip}:{agent_port}"
    host, sep, port = instance.rpartition(":")
    if sep and host and port.isdigit():
        return instance
    return f"{instance}:{agent_port}"


def _columns(
    samples: Sequence[Sample], *labels: str
) -> tuple[Iterable[float], list[Iterable[str | None]]]:
    """The values of ``samples`` and the given label of each, as columns.

    A :class:`~wattwarden.fleet.prom.Vector` has them already (its reader took the labels out
    while the answer was fresh in memory); samples built by hand are read one by one.
    """
    if isinstance(samples, Vector):
        return samples.values, [samples.column(label) for label in labels]
    return [s.value for s in samples], [[s.labels.get(lb) for s in samples] for lb in labels]


def _by_instance(samples: Sequence[Sample]) -> dict[str, float]:
    """Finite values by instance (a NaN or infinite one is as good as missing)."""
    values, (instances,) = _columns(samples, "instance")
    if isinstance(values, list) and None not in instances and all(map(math.isfinite, values)):
        return dict(zip(instances, values, strict=True))  # type: ignore[arg-type]  # no None
    out: dict[str, float] = {}
    isfinite = math.isfinite
    for instance, value in zip(instances, values, strict=True):
        if instance is not None and isfinite(value):
            out[instance] = value
    return out


def _demand(samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    values, (instances, priorities) = _columns(samples, "instance", "priority")
    out: dict[str, dict[str, float]] = {}
    isfinite = math.isfinite
    for instance, priority, value in zip(instances, priorities, values, strict=True):
        if instance is None or priority not in PRIORITIES or not isfinite(value):
            continue
        node = out.get(instance)
        if node is None:
            node = out[instance] = {}
        node[priority] = node.get(priority, 0.0) + (value if value > 0.0 else 0.0)
    return out


def build_view(
    readings: Readings,
    *,
    period_s: float,
    agent_port: int,
    stale_after_s: float | None = None,
) -> FleetView:
    """One :class:`NodeObservation` per agent discovered in ``readings``."""
    r = readings.results
    at_s = readings.at_s
    targets: Mapping[str, Target] = {t.instance: t for t in readings.targets or []}
    up = _by_instance(r.get("up", ()))
    seen_at = _by_instance(r.get("seen_at", ()))
    power, floor, ceiling = (_by_instance(r.get(k, ())) for k in ("power", "floor", "ceiling"))
    gpus_up, gpus = _by_instance(r.get("gpus_up", ())), _by_instance(r.get("gpus", ()))
    starving, lease = _by_instance(r.get("starving", ())), _by_instance(r.get("lease", ()))
    demand = _demand(r.get("demand", ()))
    bounds: dict[float | None, float] = {}  # the default bound, by scrape interval
    nodes: dict[str, NodeObservation] = {}
    for instance in sorted(up.keys() | targets.keys()):
        target = targets.get(instance)
        bound = stale_after_s
        if bound is None:
            interval = target.scrape_interval_s if target else None
            bound = bounds.get(interval)
            if bound is None:
                bound = bounds[interval] = stale_bound(period_s, interval)
        seen_s = seen_at.get(instance)
        age = None if seen_s is None else at_s - seen_s
        up_value = up.get(instance)
        n_up, n_all = gpus_up.get(instance), gpus.get(instance)
        floor_w, ceiling_w, lease_w = (
            floor.get(instance),
            ceiling.get(instance),
            lease.get(instance),
        )
        nodes[instance] = NodeObservation(  # by position: 1,250 of them a period
            instance,  # instance
            target.address  # address
            if target is not None
            else agent_address(instance, None, agent_port),
            up_value == 1.0  # scraped
            if up_value is not None
            else (target is not None and target.health == "up"),
            age,  # age_s
            bound,  # stale_after_s
            power.get(instance),  # power_w
            None if n_up is None else round(n_up),  # gpus_up
            None if n_all is None else round(n_all),  # gpus
            None if floor_w is None or floor_w < 0 else floor_w,  # floor_w
            None if ceiling_w is None or ceiling_w < 0 else ceiling_w,  # ceiling_w
            demand.get(instance, {}),  # demand_w
            starving.get(instance, 0.0) >= 1.0,  # starving
            None if lease_w is None or lease_w < 0 else lease_w,  # lease_w
        )
    return FleetView(at_s, nodes)
