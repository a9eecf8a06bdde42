"""Policy engine decision time per period on 8 and 64 simulated GPUs.

A ``SimNode`` (the agent's sampler, store, registry, actuator and engine on a manual clock) runs
a seeded mix of jobs (the trace of ``policy_vs_uniform``: priorities, compute and light phases,
idle GPUs) under a budget of 65 % of the default limits, sampled at the agent's default 10 Hz, so
the store's export windows hold what they hold in the agent. Composed policies: the budget capper
and, where the tree has them, the thermal guard and the idle capper (the JSON says which ran).

Each period's ``PolicyEngine.step`` is timed (wall clock, ``perf_counter_ns``, and the thread's
CPU time), split into its parts by wrapping them: the store snapshot (which computes every GPU's
export-window power mean and peak), each policy's ``intents``, and the rest (composing the
intents into decisions, counting them, the targets; in apply mode also the actuator: journal
write, set, read back). Two modes, each on a fresh node after a 60 s warm-up: ``dry_run`` (the
decision alone, what the goal is about) and ``apply`` (with actuation, for contrast). Goals: the
decision under 1 ms per period on 8 GPUs and under 5 ms on 64 (median and p99 reported).

    python -m benchmarks.engine_timing [--periods 600] [--quick]
"""

from __future__ import annotations

import importlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Option, percentile, run_benchmark, table
from benchmarks.policy_vs_uniform import Event, make_trace, set_utilization
from wattwarden.hardware.sim.models import MODELS
from wattwarden.nodesim import SimJob, SimNode
from wattwarden.policies.base import Mode, Policy
from wattwarden.policies.capping import BudgetCapper

NAME = "engine_timing"
MODEL = "h100-sxm"
SIZES = (8, 64)
GOAL_MS = {8: 1.0, 64: 5.0}
INTERVAL_S = 0.1
WARMUP_S = 60.0
BUDGET_FRACTION = 0.65
OPTIONAL = (  # (module, class, name): policies other work adds; timed when the tree has them
    ("wattwarden.policies.thermal", "ThermalGuard", "thermal"),
    ("wattwarden.policies.idle", "IdleCapper", "idle"),
)


def optional_policies() -> tuple[list[Policy], list[str], list[str]]:
    """The optional policies present in the tree (made with their defaults), and those absent."""
    made: list[Policy] = []
    ran: list[str] = []
    absent: list[str] = []
    for module, cls, name in OPTIONAL:
        try:
            made.append(getattr(importlib.import_module(module), cls)())
            ran.append(name)
        except (ImportError, AttributeError):
            absent.append(name)
    return made, ran, absent


class Timed:
    """Wraps a callable; keeps the wall time of each call (ns) made while ``on``."""

    def __init__(self, fn: Callable[..., Any], *, cpu: bool = False) -> None:
        self.fn = fn
        self.on = False
        self.cpu = cpu
        self.ns: list[int] = []
        self.cpu_ns: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.on:
            return self.fn(*args, **kwargs)
        c0 = time.thread_time_ns() if self.cpu else 0
        t0 = time.perf_counter_ns()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.ns.append(time.perf_counter_ns() - t0)
            if self.cpu:
                self.cpu_ns.append(time.thread_time_ns() - c0)


def measure(gpus: int, mode: Mode, periods: int, seed: int) -> dict[str, Any]:
    """Time ``periods`` engine steps on a fresh node in ``mode``."""
    spec = MODELS[MODEL]
    budget = BUDGET_FRACTION * gpus * spec.power_default_w
    others, ran, absent = optional_policies()
    policies: list[Policy] = [BudgetCapper(lambda: budget), *others]
    duration = WARMUP_S + periods + 1.0
    trace = make_trace(gpus, duration, seed)
    with tempfile.TemporaryDirectory() as tmp:
        node = SimNode(
            gpus,
            state_dir=Path(tmp),
            policies=policies,
            mode=mode,
            model=MODEL,
            interval_s=INTERVAL_S,
        )
        snapshot = Timed(node.store.snapshot)
        node.store.snapshot = snapshot  # type: ignore[method-assign]
        by_policy = {p.name: Timed(p.intents) for p in policies}
        for p in policies:
            p.intents = by_policy[p.name]  # type: ignore[method-assign]
        step = Timed(node.engine.step, cpu=True)
        node.engine.step = step  # type: ignore[method-assign]
        start = node.clock()
        pending = iter(trace)
        upcoming: list[Event] = []

        def replay_until(at_s: float) -> None:
            while True:
                event = upcoming.pop() if upcoming else next(pending, None)
                if event is None:
                    break
                if event.at_s >= at_s:
                    upcoming.append(event)
                    break
                node.run(max(0.0, start + event.at_s - node.clock()))
                if event.kind == "start":
                    node.add_job(SimJob(event.job, event.gpu, event.priority, event.utilization))
                elif event.kind == "phase":
                    set_utilization(node, event.job, event.utilization)
                else:
                    node.end_job(event.job)
            node.run(max(0.0, start + at_s - node.clock()))

        replay_until(WARMUP_S)
        for t in (step, snapshot, *by_policy.values()):
            t.on = True
        first = len(node.decisions)
        replay_until(duration)
        sets = sum(d.action == "set" for d in node.decisions[first:])
        node.close()
    n = min(len(step.ns), len(snapshot.ns), *(len(t.ns) for t in by_policy.values()))
    total = [ns / 1e6 for ns in step.ns[:n]]
    snap = [ns / 1e6 for ns in snapshot.ns[:n]]
    per_policy = {name: [ns / 1e6 for ns in t.ns[:n]] for name, t in by_policy.items()}
    rest = [total[i] - snap[i] - sum(per_policy[name][i] for name in per_policy) for i in range(n)]
    parts = {"snapshot": snap, **{f"policy:{k}": v for k, v in per_policy.items()}, "rest": rest}
    return {
        "gpus": gpus,
        "mode": mode,
        "periods": n,
        "sets": sets,
        "policies": ["budget", *ran],
        "policies_absent": absent,
        "step_ms": _stats(total),
        "step_cpu_ms": _stats([ns / 1e6 for ns in step.cpu_ns[:n]]),
        "parts_ms": {k: _stats(v) for k, v in parts.items()},
        "policies_and_compose_ms": _stats([total[i] - snap[i] for i in range(n)]),
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "max": max(values),
    }


def run(periods: int, seed: int) -> dict[str, Any]:
    """Both sizes, both modes."""
    results = [measure(g, mode, periods, seed) for g in SIZES for mode in ("dry_run", "apply")]
    goals = {}
    for r in results:
        if r["mode"] == "dry_run":
            goal = GOAL_MS[r["gpus"]]
            goals[str(r["gpus"])] = {
                "goal_ms": goal,
                "median_met": r["step_ms"]["median"] < goal,
                "p99_met": r["step_ms"]["p99"] < goal,
            }
    return {
        "params": {
            "periods": periods,
            "seed": seed,
            "interval_s": INTERVAL_S,
            "warmup_s": WARMUP_S,
            "budget_fraction_of_default_limits": BUDGET_FRACTION,
            "gpu_model": MODEL,
        },
        "results": results,
        "goals": goals,
        "goal": "engine decision (dry-run step: snapshot, policies, compose) under 1 ms per "
        "period on 8 GPUs and under 5 ms on 64, at the median and at p99",
        "goal_met": all(g["median_met"] and g["p99_met"] for g in goals.values()),
        "notes": [
            "Wall time per step on a shared 2-core machine; step_cpu_ms is the thread's CPU "
            "time for the same steps, less sensitive to other load.",
            "rest = step - snapshot - the policies' intents: composing the decisions, counting "
            "them, the targets for the store, and in apply mode the actuator (journal in "
            "SQLite, set, read back) for each set.",
            "The snapshot belongs to the store (every GPU's export-window mean and peak over "
            "the sub-second samples, 15 s at 10 Hz); the policies read only part of it.",
        ],
    }


def report(payload: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    rows = []
    for r in payload["results"]:
        parts = r["parts_ms"]
        rows.append(
            [
                r["gpus"],
                r["mode"],
                r["periods"],
                r["sets"],
                r["step_ms"]["median"],
                r["step_ms"]["p99"],
                r["step_cpu_ms"]["median"],
                parts["snapshot"]["median"],
                parts["snapshot"]["p99"],
                r["policies_and_compose_ms"]["median"],
                r["policies_and_compose_ms"]["p99"],
                *(parts[f"policy:{p}"]["median"] for p in r["policies"]),
                parts["rest"]["median"],
            ]
        )
    names = payload["results"][0]["policies"]
    lines = [
        "engine step per period, ms (policies: "
        + ", ".join(names)
        + (
            f"; absent from the tree: {', '.join(payload['results'][0]['policies_absent'])}"
            if payload["results"][0]["policies_absent"]
            else ""
        )
        + ")",
        table(
            [
                "GPUs",
                "mode",
                "periods",
                "sets",
                "step med",
                "step p99",
                "cpu med",
                "snap med",
                "snap p99",
                "pol+comp med",
                "pol+comp p99",
                *(f"{n} med" for n in names),
                "rest med",
            ],
            rows,
        ),
        "",
    ]
    for gpus, g in payload["goals"].items():
        lines.append(
            f"{gpus} GPUs, dry-run decision: goal < {g['goal_ms']:g} ms: median "
            f"{'met' if g['median_met'] else 'MISSED'}, p99 {'met' if g['p99_met'] else 'MISSED'}"
        )
    return "\n".join(lines)


OPTIONS = (
    Option("--periods", 600, "timed periods per size and mode", quick=100),
    Option("--seed", 1, "trace seed"),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/engine_timing.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
