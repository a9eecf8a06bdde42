"""Fleet controller decision time per period: 10,000 GPUs on 1,250 nodes, from recorded answers.

A seeded fleet of 1,250 nodes of 8 simulated H100s (limits 200-700 W) runs a mix of jobs (one
GPU in four idle; priorities high 25 %, normal 45 %, low 30 %; utilization 0.2-1.0). Each period
it is turned into the bodies Prometheus would answer to every query the controller's reader
sends (:func:`wattwarden.fleet.prom.queries`, plus the targets API), with the label sets of the
shipped recording rules, and the real :class:`~wattwarden.fleet.controller.FleetController`
runs one period in apply mode over them: its own :class:`~wattwarden.fleet.prom.FleetReader`
and ``PrometheusClient`` (the socket alone replaced by the recorded bodies: the URL is built,
the body decoded and parsed by ``prom.py``), the model, the split, the plan and the grant, and
pushes to agents that answer ``ok`` at once without HTTP (push fan-out is ``fleet_pushes``).
Between periods the fleet changes a little, as it does in 5 s: 2 % of the GPUs start or end a
job or change phase, the others' draw drifts by up to 1 %, and each node's power follows the
lease it was pushed, so the bands, the forced decreases and the two-phase grant do real work.
The cluster budget is 65 % of the default limits.

Each period (``FleetController.period``, wall clock) is split by wrapping its parts: *parse*
(the reader: 11 queries and the targets, decoded and parsed), *model* (``build_view``), *split*
(``allocate.split``), *plan* (``allocate.plan`` less the split in it: bands, forced decreases,
order), *grant* (``allocate.grant``), *push* (the fake agents' answers, recorded) and *rest*
(discovery, sorting the nodes, the migration check, the metrics).

Baseline, side by side in the same run: the same fleet at a tenth of the size (125 nodes,
1,000 GPUs) through the same path. Their ratio says how the period scales (10x: linear), and so
how far past 10,000 GPUs the goal holds. For the split alone, a naive proportional split
(budget times each node's demand over the total, clamped to its bounds: no priority, no
water-filling) is timed on the same nodes each period, to show what the priority-aware split
costs over the simplest one. For parsing, each period's query answers are parsed again in one
thread, by the layout reader the controller uses and by the general path alone (the JSON
decoded, every sample checked), to show what reading Prometheus's layout as text saves. Goal:
a period under 50 ms at 10,000 GPUs (median and p99).

    python -m benchmarks.fleet_decision [--nodes 1250] [--periods 200] [--seed 1] [--quick]
"""

from __future__ import annotations

import gc
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import Option, percentile, run_benchmark, table
from benchmarks.fleet_fake import (
    SCRAPE_INTERVAL_S,
    NodeFigures,
    RecordingLink,
    bodies,
    demand_by_priority,
    leases_by_instance,
    node_name,
    push_in_order,
    recorded_reader,
)
from wattwarden.fleet import allocate, prom
from wattwarden.fleet import controller as controller_module
from wattwarden.fleet.allocate import NodeDemand
from wattwarden.fleet.controller import ControllerSettings, FleetController
from wattwarden.fleet.prom import Answer, PrometheusClient
from wattwarden.hardware.sim.models import MODELS

NAME = "fleet_decision"
MODEL = "h100-sxm"
GPUS_PER_NODE = 8
GOAL_MS = 50.0
PERIOD_S = 5.0
BUDGET_FRACTION = 0.65
WARMUP_PERIODS = 3
CHANGE_FRACTION = 0.02
"""GPUs that start or end a job or change phase between two periods."""
DRIFT = 0.01
IDLE_FRACTION = 0.25
PRIORITY_MIX = (("high", 0.25), ("normal", 0.45), ("low", 0.30))
WALL_T0 = 1_750_000_000.0
PARTS = ("parse", "model", "split", "plan", "grant", "push", "rest", "gc")
DECIDE = ("model", "split", "plan", "grant", "rest")
"""The decision proper: what the controller computes once the answers are parsed."""


class Fleet:
    """The simulated fleet: per GPU, its job's priority (None: idle) and utilization."""

    def __init__(self, nodes: int, seed: int) -> None:
        self.spec = MODELS[MODEL]
        self.rng = random.Random(seed)
        self.names = [node_name(i) for i in range(nodes)]
        self.gpus: list[list[tuple[str | None, float]]] = [
            [self._draw() for _ in range(GPUS_PER_NODE)] for _ in range(nodes)
        ]

    def _draw(self) -> tuple[str | None, float]:
        if self.rng.random() < IDLE_FRACTION:
            return None, 0.0
        priority = self.rng.choices([p for p, _ in PRIORITY_MIX], [w for _, w in PRIORITY_MIX])[0]
        compute = self.rng.random() < 0.7
        return priority, self.rng.uniform(0.85, 1.0) if compute else self.rng.uniform(0.2, 0.6)

    def step(self) -> None:
        """Five seconds later: a few GPUs change job or phase, the others drift."""
        rng = self.rng
        for node in self.gpus:
            for g, (priority, util) in enumerate(node):
                if rng.random() < CHANGE_FRACTION:
                    node[g] = self._draw()
                elif priority is not None:
                    node[g] = (priority, min(1.0, util * (1.0 + rng.uniform(-DRIFT, DRIFT))))

    def watts(self, util: float) -> float:
        """An uncapped GPU's draw at this utilization (the simulator's power model at f_max)."""
        return self.spec.idle_w + self.spec.dynamic_w * util

    def figures(self, at_s: float, leases: dict[str, float]) -> list[NodeFigures]:
        """What Prometheus knows of each node at ``at_s``; power held to its lease."""
        spec, rng = self.spec, self.rng
        evaluated = at_s - rng.uniform(0.0, SCRAPE_INTERVAL_S)
        out = []
        for name, node in zip(self.names, self.gpus, strict=True):
            per_gpu = [(p, self.watts(u)) for p, u in node]
            demand = demand_by_priority(per_gpu)
            wanted = math.fsum(demand.values())
            above_min = demand_by_priority(per_gpu, spec.power_min_w)
            lease = leases.get(name)
            power = wanted if lease is None else min(wanted, lease)
            held_others = sum(spec.power_min_w for p, _ in node if p != "high")
            starving = (
                lease is not None and demand["high"] > 0 and lease < demand["high"] + (held_others)
            )
            out.append(
                NodeFigures(
                    instance=name,
                    power_w=power * (1.0 + rng.uniform(-0.005, 0.005)),
                    gpus=GPUS_PER_NODE,
                    floor_w=GPUS_PER_NODE * spec.power_min_w,
                    ceiling_w=GPUS_PER_NODE * spec.power_max_w,
                    demand_w=above_min,
                    scraped_at_s=evaluated - rng.uniform(0.0, SCRAPE_INTERVAL_S),
                    evaluated_at_s=evaluated,
                    starving=starving,
                    lease_w=lease,
                )
            )
        return out


class GcMeter:
    """The wall time the garbage collector runs, in any thread, and how many full collections."""

    def __init__(self) -> None:
        self.ns = 0
        self.full = 0
        self._started = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` entry."""
        if phase == "start":
            self._started = time.perf_counter_ns()
            self.full += info["generation"] == 2
        else:
            self.ns += time.perf_counter_ns() - self._started


class Timed:
    """Wraps a callable; keeps the wall time of each call (ns) while ``on``, less the time the
    garbage collector ran inside it (counted apart)."""

    def __init__(self, fn: Callable[..., Any], gc_meter: GcMeter) -> None:
        self.fn = fn
        self.gc = gc_meter
        self.on = False
        self.ns: list[int] = []
        self.last_args: tuple[Any, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.last_args = args
        if not self.on:
            return self.fn(*args, **kwargs)
        g0, t0 = self.gc.ns, time.perf_counter_ns()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.ns.append(time.perf_counter_ns() - t0 - (self.gc.ns - g0))

    def take(self) -> float:
        """The calls' total since the last take, in ms (0 when not called)."""
        total = sum(self.ns) / 1e6
        self.ns.clear()
        return total


def naive_split(budget_w: float, nodes: Sequence[NodeDemand]) -> dict[str, float]:
    """Budget times each node's demand over the total, within its bounds: the simplest split."""
    wants = {n.instance: n.floor_w + math.fsum(n.demand_w.values()) for n in nodes}
    total = math.fsum(wants.values()) or 1.0
    return {
        n.instance: min(n.ceiling_w, max(n.floor_w, budget_w * wants[n.instance] / total))
        for n in nodes
    }


def parse_both(client: PrometheusClient, answers: dict[str, bytes]) -> tuple[float, float]:
    """Parse one period's query answers twice, in this thread: the layout reader the controller
    uses, then the general path alone (JSON decoded, each sample checked); ms each."""
    recorded = [(expr, Answer("/api/v1/query", 200, body)) for expr, body in answers.items()]
    recorded = [(expr, answer) for expr, answer in recorded if expr != "targets"]
    t0 = time.perf_counter_ns()
    for expr, answer in recorded:
        client.parse_query(expr, answer)
    t1 = time.perf_counter_ns()
    real = prom._read_layout
    prom._read_layout = lambda body: None  # type: ignore[assignment]
    try:
        for expr, answer in recorded:
            client.parse_query(expr, answer)
    finally:
        prom._read_layout = real
    t2 = time.perf_counter_ns()
    return (t1 - t0) / 1e6, (t2 - t1) / 1e6


def measure(nodes: int, periods: int, seed: int) -> dict[str, Any]:
    """Run ``periods`` timed periods (after a warm-up) on a fleet of ``nodes`` nodes."""
    fleet = Fleet(nodes, seed)
    spec = fleet.spec
    budget = BUDGET_FRACTION * nodes * GPUS_PER_NODE * spec.power_default_w
    clock = {"wall": WALL_T0, "mono": 1000.0}
    link = RecordingLink(wall=lambda: clock["wall"])
    reader, transport = recorded_reader()
    meter = GcMeter()
    parse = Timed(reader.read, meter)
    reader.read = parse  # type: ignore[method-assign]
    push = Timed(push_in_order, meter)
    settings = ControllerSettings(
        budget_w=budget, controller_id="fleet-bench", period_s=PERIOD_S, apply=True
    )
    ctl = FleetController(
        settings,
        reader,
        link,
        push=push,
        monotonic=lambda: clock["mono"],
        wall=lambda: clock["wall"],
    )
    timers = {
        "model": Timed(controller_module.build_view, meter),
        "split": Timed(allocate.split, meter),
        "plan": Timed(allocate.plan, meter),
        "grant": Timed(allocate.grant, meter),
    }
    saved = (controller_module.build_view, allocate.split, allocate.plan, allocate.grant)
    controller_module.build_view = timers["model"]  # type: ignore[assignment]
    allocate.split = timers["split"]  # type: ignore[assignment]
    allocate.plan = timers["plan"]  # type: ignore[assignment]
    allocate.grant = timers["grant"]  # type: ignore[assignment]
    rows: list[dict[str, float]] = []
    naive_ms: list[float] = []
    layout_ms: list[float] = []
    general_ms: list[float] = []
    changes: list[int] = []
    raises: list[int] = []
    forced: list[int] = []
    held: dict[str, float] = {}
    full_collections = 0
    gc.callbacks.append(meter)
    try:
        for k in range(WARMUP_PERIODS + periods):
            timed = k >= WARMUP_PERIODS
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock["wall"]))
            transport.bodies = bodies(fleet.figures(clock["wall"], held), clock["wall"], stamp)
            for t in (parse, push, *timers.values()):
                t.on = timed
            link.pushed.clear()
            gc.collect()  # each period starts from the same heap; a collection inside is its own
            g0, f0, t0 = meter.ns, meter.full, time.perf_counter_ns()
            report = ctl.period()
            total_ms = (time.perf_counter_ns() - t0) / 1e6
            gc_ms = (meter.ns - g0) / 1e6
            if report.holding is not None:
                raise RuntimeError(f"the controller held: {report.holding}")
            now = leases_by_instance(link.held)
            if timed:
                parts = {
                    "parse": parse.take(),
                    "push": push.take(),
                    **{name: t.take() for name, t in timers.items()},
                }
                parts["plan"] -= parts["split"]
                parts["gc"] = gc_ms
                parts["rest"] = total_ms - sum(parts.values())
                decide = sum(parts[p] for p in DECIDE)
                rows.append({"total": total_ms, "decide": decide, **parts})
                full_collections += meter.full - f0
                budget_arg, demands = timers["split"].last_args[:2]
                t1 = time.perf_counter_ns()
                naive_split(budget_arg, demands)
                naive_ms.append((time.perf_counter_ns() - t1) / 1e6)
                layout, general = parse_both(reader.client, transport.bodies)
                layout_ms.append(layout)
                general_ms.append(general)
                changes.append(sum(1 for i, w in now.items() if abs(held.get(i, -1.0) - w) > 1e-6))
                assert report.plan is not None
                raises.append(len(report.plan.raises))
                forced.append(len(report.plan.forced))
            held = now
            fleet.step()
            clock["wall"] += PERIOD_S
            clock["mono"] += PERIOD_S
    finally:
        gc.callbacks.remove(meter)
        controller_module.build_view, allocate.split, allocate.plan, allocate.grant = saved
        reader.close()
    leased = math.fsum(held.values())
    return {
        "nodes": nodes,
        "gpus": nodes * GPUS_PER_NODE,
        "periods": len(rows),
        "budget_w": budget,
        "leased_w_at_end": leased,
        "answer_bytes_per_period": sum(len(b) for b in transport.bodies.values()),
        "period_ms": _stats([r["total"] for r in rows]),
        "decide_ms": _stats([r["decide"] for r in rows]),
        "parts_ms": {p: _stats([r[p] for r in rows]) for p in PARTS},
        "full_collections_per_period": full_collections / len(rows),
        "naive_split_ms": _stats(naive_ms),
        "answers_parse_ms": {"layout": _stats(layout_ms), "general": _stats(general_ms)},
        "lease_changes_per_period": _stats([float(c) for c in changes]),
        "raises_per_period": _stats([float(c) for c in raises]),
        "forced_decreases_per_period": _stats([float(c) for c in forced]),
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "max": max(values),
    }


def run(nodes: int, periods: int, seed: int) -> dict[str, Any]:
    """The fleet and its tenth, the same path, in one run."""
    logging.getLogger("wattwarden").setLevel(logging.WARNING)  # the controller's INFO lines off
    tenth = max(1, nodes // 10)
    full = measure(nodes, periods, seed)
    small = measure(tenth, periods, seed)
    ratio = {
        "period_median": full["period_ms"]["median"] / small["period_ms"]["median"],
        "period_p99": full["period_ms"]["p99"] / small["period_ms"]["p99"],
        "decide_median": full["decide_ms"]["median"] / small["decide_ms"]["median"],
        "decide_p99": full["decide_ms"]["p99"] / small["decide_ms"]["p99"],
        **{
            f"{p}_median": _ratio(full["parts_ms"][p]["median"], small["parts_ms"][p]["median"])
            for p in PARTS
        },
    }
    split_vs_naive = _ratio(full["parts_ms"]["split"]["median"], full["naive_split_ms"]["median"])
    answers = full["answers_parse_ms"]
    layout_vs_general = _ratio(answers["layout"]["median"], answers["general"]["median"])
    return {
        "params": {
            "nodes": nodes,
            "gpus_per_node": GPUS_PER_NODE,
            "periods": periods,
            "warmup_periods": WARMUP_PERIODS,
            "seed": seed,
            "gpu_model": MODEL,
            "budget_fraction_of_default_limits": BUDGET_FRACTION,
            "change_fraction_per_period": CHANGE_FRACTION,
            "drift": DRIFT,
            "period_s": PERIOD_S,
            "mode": "apply (pushes to fake agents that answer ok at once)",
        },
        "results": [full, small],
        "scaling_full_over_tenth": ratio,
        "split_over_naive_split": split_vs_naive,
        "layout_parse_over_general_parse": layout_vs_general,
        "goal": f"a period (read, model, split, plan, grant) under {GOAL_MS:g} ms for "
        f"{nodes * GPUS_PER_NODE} GPUs on {nodes} nodes, median and p99",
        "goal_met": full["period_ms"]["median"] < GOAL_MS and full["period_ms"]["p99"] < GOAL_MS,
        "decision_goal_met": full["decide_ms"]["median"] < GOAL_MS
        and full["decide_ms"]["p99"] < GOAL_MS,
        "notes": [
            "Wall time on a shared 2-core machine, one process; the reader's queries run on "
            "its thread pool as in the controller, but parsing holds the interpreter lock.",
            "parse = FleetReader.read over recorded bodies: URL built, JSON decoded, every "
            "sample and target checked and typed by prom.py; no socket.",
            "rest = the period less the parts: discovery, sorting nodes into ok, unreachable "
            "and stale, the migration check and publishing the controller's metrics.",
            "The controller's INFO log lines (one per lease change) are off: at INFO the "
            "period also formats and writes those lines.",
            "A garbage collection is run before each period, so each starts from the same "
            "heap; collections the period itself triggers are counted in it.",
        ],
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def report(payload: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    rows: list[list[object]] = []
    for r in payload["results"]:
        parts = r["parts_ms"]
        rows.append(
            [
                r["gpus"],
                r["nodes"],
                r["period_ms"]["median"],
                r["period_ms"]["p99"],
                r["decide_ms"]["median"],
                r["decide_ms"]["p99"],
                *(parts[p]["median"] for p in PARTS),
                r["naive_split_ms"]["median"],
                r["lease_changes_per_period"]["median"],
            ]
        )
    ratio = payload["scaling_full_over_tenth"]
    rows.append(
        [
            "ratio",
            "",
            ratio["period_median"],
            ratio["period_p99"],
            ratio["decide_median"],
            ratio["decide_p99"],
            *(ratio[f"{p}_median"] for p in PARTS),
            "",
            "",
        ]
    )
    headers = ["GPUs", "nodes", "period med", "p99", "decide med", "p99", *PARTS]
    full = payload["results"][0]
    lines = [
        f"fleet controller period, ms ({full['periods']} periods each; parts are medians; "
        "apply mode, recorded Prometheus answers, fake agents)",
        table([*headers, "naive split", "lease changes"], rows),
        "",
        "decide = model + split + plan + grant + rest (the period less parsing, pushing and gc)",
        f"split / naive proportional split (full size, median): "
        f"{payload['split_over_naive_split']:.1f}x",
        f"query answers parsed by the layout reader / by the general path (full size, median, "
        f"same bodies, one thread): {full['answers_parse_ms']['layout']['median']:.1f} / "
        f"{full['answers_parse_ms']['general']['median']:.1f} ms = "
        f"{payload['layout_parse_over_general_parse']:.2f}",
    ]
    for what, key in (("period", "period_ms"), ("decision", "decide_ms")):
        med, p99 = full[key]["median"], full[key]["p99"]
        lines.append(
            f"{full['gpus']} GPUs, {what}: goal < {GOAL_MS:g} ms: "
            f"median {'met' if med < GOAL_MS else 'MISSED'} ({med:.1f} ms), "
            f"p99 {'met' if p99 < GOAL_MS else 'MISSED'} ({p99:.1f} ms)"
        )
    return "\n".join(lines)


OPTIONS = (
    Option("--nodes", 1250, "nodes of 8 GPUs (the baseline runs a tenth of them)", quick=125),
    Option("--periods", 200, "timed periods per size", quick=10),
    Option("--seed", 1, "fleet seed"),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/fleet_decision.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
