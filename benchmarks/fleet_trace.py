"""One cluster budget over a simulated day: the fleet controller vs static per-node budgets.

A fleet of N nodes of 8 simulated H100s (default 125 nodes, 1,000 GPUs) replays one seeded
24-hour trace on a simulated clock (1 s steps, no waiting), once per strategy, in one run:

- ``controller``: the real :class:`~wattwarden.fleet.controller.FleetController` in apply mode
  (period 5 s, leases of 30 s, its default bands), reading what Prometheus would hold (each
  agent scraped every 15 s at its own offset, the recording rules evaluated every 15 s, as the
  shipped configuration does: the controller sees data 0-30 s old) and pushing leases to agents
  that take them; a node's budget moves one agent period (1 s) after the push answered. A lease
  that runs out leaves the node at its local budget, the static share.
- ``static``: every node's budget is the cluster budget over the number of nodes, for the day
  (what an operator does without a fleet layer; also the agents' local budget above);
- ``uncapped``: no budget, for reference (what the jobs would do).

The trace. Each node has two slots of 4 GPUs; each slot runs one job after another. Jobs last
20 minutes to 4 hours, have a priority (high 25 %, normal 45 %, low 30 %) and alternate compute
phases (utilization 0.85-1.0, 5-30 min) and light ones (0.2-0.6, 1-5 min: evaluation,
checkpoints, data loading). The gaps between jobs follow the time of day: the share of busy
slots aims at 30 % at 03:00 and 90 % at 15:00 (diurnal). Bursts (on average one every 3 hours)
start a high-priority job of 20-60 minutes on 30 % of the idle slots at once.

A node meets its budget as the agent's budget capper settles: its budget split into per-GPU
limits by the agent's own allocator (:func:`wattwarden.policies.budget.allocate`: minimums, then
each GPU's draw plus a margin by priority, then the rest), each GPU held to its limit by the
simulator's DVFS model (:class:`~wattwarden.hardware.sim.gpu.SimGpu` on a frozen clock, used as
a table: power ``idle + dynamic * u * f ** alpha``, throughput ``1 / ((1 - m) / f + m)``). The
capper's own pace (a few periods to converge) and learned margin are not modelled: they are the
same for every strategy. The agent reports its demand as the contract says: a GPU's draw, or its
default limit while its limit holds it back, above its minimum limit
(``wattwarden_power_demand_above_min_watts``, what the controller reads); GPUs without a job
count as ``low``.

Figures per strategy: the share of the day the cluster's GPU power is above the budget and the
worst excess; the budget used (mean power over the budget), over the day and while the budget
binds (the fleet's uncapped draw would be above it: there, watts left unused are throughput
lost); the steps of all jobs (a job makes
one step per second on an uncapped GPU, times its GPU's relative throughput) against the static
run; high-priority steps lost against the uncapped run; lease changes per node per hour (pushes
that change a node's lease: churn; renewals at the same value do not count). With ``--no-band
1`` also the controller without its deadband, to show what the band saves in churn.

    python -m benchmarks.fleet_trace [--nodes 125] [--hours 24] [--budget-fraction 0.65]
        [--seed 1] [--no-band 1] [--quick]
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import Option, run_benchmark, table
from benchmarks.fleet_fake import (
    AGENT_PORT,
    JOB,
    SCRAPE_INTERVAL_S,
    NodeFigures,
    RecordingLink,
    node_name,
    push_in_order,
    series,
)
from wattwarden.fleet.allocate import Bands
from wattwarden.fleet.controller import ControllerSettings, FleetController
from wattwarden.fleet.prom import Readings, Sample, Target
from wattwarden.fleet.prom import queries as prom_queries
from wattwarden.hardware.sim.gpu import SimGpu
from wattwarden.hardware.sim.models import MODELS, GpuModelSpec
from wattwarden.policies.budget import GpuDemand, allocate

NAME = "fleet_trace"
MODEL = "h100-sxm"
GPUS_PER_NODE = 8
SLOT_GPUS = 4
PRIORITY_MIX = (("high", 0.25), ("normal", 0.45), ("low", 0.30))
PRIORITIES = ("high", "normal", "low")
PERIOD_S = 5
"""The controller's period (its default)."""
LEASE_S = 30.0
NODE_PERIOD_S = 1
"""The agent's policy period (its default): a new budget is in force one period later."""
SCRAPE_S = int(SCRAPE_INTERVAL_S)
EVAL_OFFSET_S = 7
"""When, within each scrape interval, the recording rules run."""
WALL_T0 = 1_750_000_000.0
OVER_TOLERANCE_W = 1e-3
DAY_S = 86400.0
BUSY_MEAN, BUSY_AMPLITUDE, BUSY_PEAK_H = 0.6, 0.3, 15.0
BURST_MEAN_GAP_S = 3 * 3600.0
BURST_JOIN = 0.3


# ---------------------------------------------------------------------- the physics
class Physics:
    """The simulator's GPU, used as a table: power and throughput at a utilization and limit.

    One :class:`SimGpu` on a clock that never moves (so its thermal state stays cool and only
    the operating point is computed), memoized: utilizations are whole percents and limits are
    taken down to whole watts (never up: a node stays under its budget).
    """

    def __init__(self, spec: GpuModelSpec) -> None:
        self.spec = spec
        self.gpu = SimGpu(0, spec, uuid="GPU-fleet-trace", pci_bus_id="00000000:18:00.0",
                          clock=lambda: 0.0)  # fmt: skip
        self._draw: dict[float, float] = {}
        self._held: dict[tuple[float, int], tuple[float, float]] = {}

    def draw(self, util: float) -> float:
        """What the GPU draws at ``util`` under its default limit."""
        watts = self._draw.get(util)
        if watts is None:
            watts, _ = self._point(util, int(self.spec.power_default_w))
            self._draw[util] = watts
        return watts

    def at_limit(self, util: float, limit_w: float) -> tuple[float, float]:
        """Power and relative throughput at ``util`` under ``limit_w``."""
        key = (util, math.floor(limit_w))
        point = self._held.get(key)
        if point is None:
            point = self._point(*key)
            self._held[key] = point
        return point

    def _point(self, util: float, limit_w: int) -> tuple[float, float]:
        self.gpu.set_power_limit_mw(limit_w * 1000)
        self.gpu.set_load(util)
        return self.gpu.true_power_w(), self.gpu.relative_throughput()


# ---------------------------------------------------------------------- the trace
@dataclass(frozen=True, slots=True)
class Change:
    """A slot's new state at ``at_s``: a job's priority and utilization, or idle (None, 0)."""

    at_s: int
    node: int
    slot: int
    priority: str | None
    util: float


def busy_target(t: float) -> float:
    """The share of slots busy at time of day ``t`` (seconds after midnight)."""
    phase = 2 * math.pi * ((t % DAY_S) / 3600.0 - BUSY_PEAK_H) / 24.0
    return BUSY_MEAN + BUSY_AMPLITUDE * math.cos(phase)


def make_trace(nodes: int, duration_s: int, seed: int) -> list[Change]:
    """The seeded day: every slot's jobs, phases and idle gaps, bursts included."""
    rng = random.Random(seed)
    bursts: list[float] = []
    b = rng.expovariate(1 / BURST_MEAN_GAP_S)
    while b < duration_s:
        bursts.append(b)
        b += rng.expovariate(1 / BURST_MEAN_GAP_S)
    out: list[Change] = []
    for node in range(nodes):
        for slot in range(GPUS_PER_NODE // SLOT_GPUS):

            def add(at: float, priority: str | None, util: float) -> None:
                if at < duration_s:
                    out.append(Change(int(at), node, slot, priority, round(util, 2)))  # noqa: B023

            def job(start: float, end: float, priority: str, compute_only: bool) -> None:
                t, compute = start, True
                while t < end:
                    if compute:
                        add(t, priority, rng.uniform(0.85, 1.0))
                        t += rng.uniform(300, 1800)
                    else:
                        add(t, priority, rng.uniform(0.2, 0.6))
                        t += rng.uniform(60, 300)
                    compute = compute_only or not compute
                add(end, None, 0.0)

            mean_job = (1200 + 14400) / 2
            t = 0.0 if rng.random() < busy_target(0.0) else -1.0
            while t < duration_s:
                if t >= 0:  # a job now
                    end = t + rng.uniform(1200, 14400)
                    priority = rng.choices(PRIORITIES, [w for _, w in PRIORITY_MIX])[0]
                    job(t, end, priority, compute_only=False)
                    t = end
                free = max(t, 0.0)
                busy = busy_target(free)
                natural = free + rng.expovariate(busy / (mean_job * (1 - busy)))
                joined = None
                for b in bursts:
                    if free < b < natural and rng.random() < BURST_JOIN:
                        joined = b
                        break
                if joined is not None:
                    end = joined + rng.uniform(1200, 3600)
                    job(joined, end, "high", compute_only=True)
                    # a burst job ends in a gap: the next job follows after a gap of its own
                    t = end + rng.expovariate(busy_target(end) / (mean_job * (1 - busy)))
                else:
                    t = natural
    return sorted(out, key=lambda c: (c.at_s, c.node, c.slot))


# ---------------------------------------------------------------------- the nodes
@dataclass(slots=True)
class Node:
    """One simulated node: its slots' jobs, its budget in force, what it draws and does."""

    name: str
    slots: list[tuple[str | None, float]]
    budget_w: float | None
    """The budget in force (lease, else local); None: uncapped."""
    lease_w: float | None = None
    lease_until: float = -math.inf
    power_w: float = 0.0
    want_w: float = 0.0
    """What its GPUs would draw uncapped."""
    steps: dict[str, float] = field(default_factory=dict)
    """Steps per second by priority."""
    demand_w: dict[str, float] = field(default_factory=dict)
    starving: bool = False
    scraped: tuple[float, float, dict[str, float], bool, float | None] | None = None
    """(when, power, demand, starving, lease) at the last scrape."""
    recorded: tuple[float, float, dict[str, float]] | None = None
    """(when, power, demand) as the recording rules last saw them."""


class Simulation:
    """N nodes over one trace under one strategy; the figures of the run."""

    def __init__(self, nodes: int, budget_w: float, physics: Physics, strategy: str) -> None:
        self.spec = physics.spec
        self.physics = physics
        self.budget_w = budget_w
        self.local_w = None if strategy == "uncapped" else budget_w / nodes
        self.nodes = [
            Node(node_name(i), [(None, 0.0)] * (GPUS_PER_NODE // SLOT_GPUS), self.local_w)
            for i in range(nodes)
        ]
        self.offsets = [random.Random(i).randrange(SCRAPE_S) for i in range(nodes)]
        for n in self.nodes:
            self.settle(n)

    def settle(self, node: Node) -> None:
        """The node's power and throughput under its budget (the capper's split)."""
        phys, spec = self.physics, self.spec
        gpus = [s for s in node.slots for _ in range(SLOT_GPUS)]
        draws = [phys.draw(u) if p is not None else spec.idle_w for p, u in gpus]
        if node.budget_w is None:
            limits = [spec.power_default_w] * len(gpus)
        else:
            split = allocate(
                node.budget_w,
                [
                    GpuDemand(i, spec.power_min_w, spec.power_max_w, draws[i], p or "low")
                    for i, (p, _) in enumerate(gpus)
                ],
            )
            limits = [split.limits_w[i] for i in range(len(gpus))]
        power = 0.0
        steps = dict.fromkeys(PRIORITIES, 0.0)
        demand = dict.fromkeys(PRIORITIES, 0.0)
        starving = False
        floor = spec.power_min_w  # demand counts what a GPU wants above its minimum limit
        for (priority, util), draw, limit in zip(gpus, draws, limits, strict=True):
            if priority is None:
                power += draw
                demand["low"] += max(0.0, draw - floor)
                continue
            if draw <= limit:
                power += draw
                steps[priority] += 1.0
                demand[priority] += max(0.0, draw - floor)
                continue
            watts, throughput = phys.at_limit(util, limit)
            power += watts
            steps[priority] += throughput
            # held at its limit: it wants its default
            demand[priority] += max(0.0, spec.power_default_w - floor)
            starving = starving or priority == "high"
        node.power_w, node.steps, node.demand_w, node.starving = power, steps, demand, starving
        node.want_w = math.fsum(draws)

    def figure(self, n: Node) -> NodeFigures | None:
        """What Prometheus holds of node ``n`` (scraped every 15 s; rules every 15 s)."""
        if n.scraped is None or n.recorded is None:
            return None
        spec = self.spec
        scraped_at, _, _, starving, lease = n.scraped
        evaluated_at, power, demand = n.recorded
        return NodeFigures(
            instance=n.name,
            power_w=power,
            gpus=GPUS_PER_NODE,
            floor_w=GPUS_PER_NODE * spec.power_min_w,
            ceiling_w=GPUS_PER_NODE * spec.power_max_w,
            demand_w=dict(demand),
            scraped_at_s=WALL_T0 + scraped_at,
            evaluated_at_s=WALL_T0 + evaluated_at,
            starving=starving,
            lease_w=lease,
        )

    def run(
        self,
        trace: list[Change],
        duration_s: int,
        controller: FleetController | None,
        link: RecordingLink | None,
        clock: dict[str, float],
    ) -> dict[str, Any]:
        """Replay the trace second by second; the run's figures."""
        by_name = {n.name: n for n in self.nodes}
        index = {n.name: k for k, n in enumerate(self.nodes)}
        pending: dict[int, list[tuple[Node, float]]] = {}
        expiries: list[tuple[float, int]] = []
        scrape_groups: list[list[Node]] = [[] for _ in range(SCRAPE_S)]
        for k, n in enumerate(self.nodes):
            scrape_groups[self.offsets[k]].append(n)
        rate = dict.fromkeys(PRIORITIES, 0.0)
        for n in self.nodes:
            for p, s in n.steps.items():
                rate[p] += s
            # the fleet ran before the day began: Prometheus holds every node from the start
            n.scraped = (0, n.power_w, dict(n.demand_w), n.starving, n.lease_w)
            n.recorded = (0, n.power_w, dict(n.demand_w))
        steps = dict.fromkeys(PRIORITIES, 0.0)
        over_s, worst_w, energy_j, peak_w = 0, 0.0, 0.0, 0.0
        changes = pushes = 0
        last_lease: dict[str, float] = {}
        controller_s = 0.0
        binding_s, binding_j = 0, 0.0
        changed_want, want = True, 0.0
        i = 0
        for t in range(duration_s):
            dirty: set[int] = set()
            while i < len(trace) and trace[i].at_s <= t:
                c = trace[i]
                self.nodes[c.node].slots[c.slot] = (c.priority, c.util)
                dirty.add(c.node)
                i += 1
            for node, watts in pending.pop(t, []):
                node.lease_w, node.lease_until = watts, t + LEASE_S
                heapq.heappush(expiries, (node.lease_until, index[node.name]))
                if node.budget_w != watts:  # a renewal at the same budget changes nothing
                    node.budget_w = watts
                    dirty.add(index[node.name])
            while expiries and expiries[0][0] <= t:
                _, k = heapq.heappop(expiries)
                n = self.nodes[k]
                if n.lease_w is not None and n.lease_until <= t:
                    n.lease_w, n.budget_w = None, self.local_w  # the agent falls back itself
                    dirty.add(k)
            for k in dirty:
                n = self.nodes[k]
                for p, s in n.steps.items():
                    rate[p] -= s
                self.settle(n)
                for p, s in n.steps.items():
                    rate[p] += s
                changed_want = True
            if controller is not None and link is not None:
                for n in scrape_groups[t % SCRAPE_S]:
                    n.scraped = (t, n.power_w, dict(n.demand_w), n.starving, n.lease_w)
                if t % SCRAPE_S == EVAL_OFFSET_S:
                    for n in self.nodes:
                        if n.scraped is not None:
                            n.recorded = (t, n.scraped[1], n.scraped[2])
                if t % PERIOD_S == 0:
                    link.pushed.clear()
                    clock["t"] = float(t)
                    c0 = time.perf_counter()
                    controller.period()
                    controller_s += time.perf_counter() - c0
                    for lease in link.pushed:
                        name = lease.instance.rsplit(":", 1)[0]
                        pushes += 1
                        if abs(last_lease.get(name, -1.0) - lease.budget_w) > 1e-6:
                            changes += 1
                        last_lease[name] = lease.budget_w
                        pending.setdefault(t + NODE_PERIOD_S, []).append(
                            (by_name[name], lease.budget_w)
                        )
            power = math.fsum(n.power_w for n in self.nodes)
            if changed_want:
                want = math.fsum(n.want_w for n in self.nodes)
                changed_want = False
            if want > self.budget_w:  # uncapped, the fleet would be over its budget now
                binding_s += 1
                binding_j += power
            energy_j += power
            peak_w = max(peak_w, power)
            if power > self.budget_w + OVER_TOLERANCE_W:
                over_s += 1
                worst_w = max(worst_w, power - self.budget_w)
            for p, s in rate.items():
                steps[p] += s
        hours = duration_s / 3600.0
        return {
            "over_budget_pct": 100.0 * over_s / duration_s,
            "worst_excess_w": worst_w,
            "peak_power_over_budget": peak_w / self.budget_w,
            "budget_used_pct": 100.0 * energy_j / duration_s / self.budget_w,
            "binding_pct": 100.0 * binding_s / duration_s,
            "budget_used_while_binding_pct": 100.0 * binding_j / binding_s / self.budget_w
            if binding_s
            else math.nan,
            "energy_kwh": energy_j / 3.6e6,
            "steps": math.fsum(steps.values()),
            "steps_by_priority": steps,
            "lease_changes_per_node_hour": changes / len(self.nodes) / hours,
            "pushes_per_node_hour": pushes / len(self.nodes) / hours,
            "controller_period_ms_mean": 1000.0 * controller_s / max(1, duration_s // PERIOD_S)
            if controller is not None
            else None,
        }


class TraceReader:
    """The controller's reader: what Prometheus holds of the simulated fleet, at once.

    A node's series change only when it is scraped or the rules run: they are built again
    then, and kept in between (the samples themselves are new each period, stamped with it).
    """

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self._series: dict[str, tuple[object, object, list[tuple[str, dict[str, str], float]]]] = {}
        self._targets: dict[str, Target] = {}

    def read(self, at_s: float) -> Readings:
        """Every figure at ``at_s``."""
        results: dict[str, list[Sample]] = {k: [] for k in prom_queries(JOB)}
        found = []
        for n in self.sim.nodes:
            kept = self._series.get(n.name)
            if kept is None or kept[0] is not n.scraped or kept[1] is not n.recorded:
                figure = self.sim.figure(n)
                if figure is None:
                    continue
                kept = (n.scraped, n.recorded, list(series([figure])))
                self._series[n.name] = kept
            for name, labels, value in kept[2]:
                results[name].append(Sample(labels, value, at_s))
            found.append(self._target(n.name))
        return Readings(at_s, results, found)

    def _target(self, name: str) -> Target:
        target = self._targets.get(name)
        if target is None:
            target = Target(name, JOB, f"{name}:{AGENT_PORT}", "up", SCRAPE_INTERVAL_S)
            self._targets[name] = target
        return target


def replay(
    strategy: str, nodes: int, duration_s: int, budget_w: float, seed: int
) -> dict[str, Any]:
    """One strategy over the seeded trace on fresh nodes (in a process of its own)."""
    logging.getLogger("wattwarden").setLevel(logging.WARNING)  # one INFO line per lease change
    physics = Physics(MODELS[MODEL])
    trace = make_trace(nodes, duration_s, seed)
    sim = Simulation(nodes, budget_w, physics, "uncapped" if strategy == "uncapped" else "capped")
    controller: FleetController | None = None
    link: RecordingLink | None = None
    clock = {"t": 0.0}
    if strategy.startswith("controller"):
        link = RecordingLink(wall=lambda: WALL_T0 + clock["t"])
        bands = Bands(0.0, 0.0) if strategy == "controller_no_band" else Bands()
        settings = ControllerSettings(
            budget_w=budget_w,
            controller_id="fleet-trace",
            period_s=float(PERIOD_S),
            lease_s=LEASE_S,
            apply=True,
            bands=bands,
        )
        controller = FleetController(
            settings,
            TraceReader(sim),
            link,
            push=push_in_order,
            monotonic=lambda: clock["t"],
            wall=lambda: WALL_T0 + clock["t"],
        )
    t0 = time.perf_counter()
    figures = sim.run(trace, duration_s, controller, link, clock)
    return {"strategy": strategy, "wall_s": time.perf_counter() - t0, **figures}


def run(
    *, nodes: int, hours: float, budget_fraction: float, seed: int, no_band: int, workers: int
) -> dict[str, Any]:
    """Every strategy over one trace, each in a process of its own, ``workers`` at a time."""
    spec = MODELS[MODEL]
    duration_s = int(hours * 3600)
    budget = budget_fraction * nodes * GPUS_PER_NODE * spec.power_default_w
    trace = make_trace(nodes, duration_s, seed)
    # the controller runs first: they take longest
    strategies = (
        ["controller"]
        + (["controller_no_band"] if no_band else [])
        + [
            "static",
            "uncapped",
        ]
    )
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(replay, s, nodes, duration_s, budget, seed) for s in strategies]
        results = [f.result() for f in futures]
    wall_s = time.perf_counter() - t0
    by = {r["strategy"]: r for r in results}
    for r in results:
        r["steps_vs_static"] = r["steps"] / by["static"]["steps"]
        high_free = by["uncapped"]["steps_by_priority"]["high"]
        r["high_steps_lost_vs_uncapped_pct"] = 100.0 * (
            1 - r["steps_by_priority"]["high"] / high_free
        )
    return {
        "wall_s": wall_s,
        "params": {
            "workers": workers,
            "nodes": nodes,
            "gpus": nodes * GPUS_PER_NODE,
            "hours": hours,
            "budget_fraction_of_default_limits": budget_fraction,
            "budget_w": budget,
            "seed": seed,
            "gpu_model": MODEL,
            "controller_period_s": PERIOD_S,
            "lease_s": LEASE_S,
            "agent_period_s": NODE_PERIOD_S,
            "scrape_and_rule_interval_s": SCRAPE_S,
            "trace_changes": len(trace),
            "busy_share": {"mean": BUSY_MEAN, "amplitude": BUSY_AMPLITUDE, "peak_h": BUSY_PEAK_H},
            "bursts_mean_gap_s": BURST_MEAN_GAP_S,
            "burst_join": BURST_JOIN,
        },
        "results": results,
        "notes": [
            "Power and throughput per GPU from the simulator's model (SimGpu on a frozen "
            "clock), limits from the agent's allocator: the capper's settled state, without "
            "its pace or learned margin (the same for every strategy).",
            "The controller is the real FleetController; Prometheus is modelled by what it "
            "would hold (scrapes and rule evaluations every 15 s), the agents by a link that "
            "takes every lease; a budget is in force one agent period after its push.",
            "Time over budget counts 1 s steps whose cluster GPU power is above the budget.",
            "Prometheus holds every node from the first second (the fleet ran before the "
            "day began): a node the controller has not seen yet runs at its local budget, "
            "which no lease accounts for, and can take the cluster over its budget until the "
            "controller leases it.",
        ],
    }


def report(payload: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    rows = []
    for r in payload["results"]:
        rows.append(
            [
                r["strategy"],
                r["over_budget_pct"],
                r["worst_excess_w"],
                r["budget_used_pct"],
                r["budget_used_while_binding_pct"],
                r["steps_vs_static"],
                r["high_steps_lost_vs_uncapped_pct"],
                r["lease_changes_per_node_hour"] if r["strategy"].startswith("controller") else "",
                r["wall_s"],
            ]
        )
    p = payload["params"]
    return "\n".join(
        [
            f"{p['hours']:g} h, {p['nodes']} nodes x {GPUS_PER_NODE} GPUs, cluster budget "
            f"{p['budget_w'] / 1000:.0f} kW ({100 * p['budget_fraction_of_default_limits']:.0f} %"
            " of the default limits); the uncapped draw is above it "
            f"{payload['results'][0]['binding_pct']:.0f} % of the time (binding)",
            table(
                [
                    "strategy",
                    "over budget %",
                    "worst excess W",
                    "budget used %",
                    "used when binding %",
                    "steps vs static",
                    "high lost vs uncapped %",
                    "lease changes /node/h",
                    "wall s",
                ],
                rows,
            ),
        ]
    )


OPTIONS = (
    Option("--nodes", 125, "nodes of 8 GPUs", quick=16),
    Option("--hours", 24.0, "trace length", quick=2.0),
    Option("--budget-fraction", 0.65, "cluster budget, of the sum of the default limits"),
    Option("--seed", 1, "trace seed"),
    Option("--no-band", 1, "also run the controller without its deadband (0: not)", quick=0),
    Option("--workers", 2, "strategies run at once, each in a process"),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/fleet_trace.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
