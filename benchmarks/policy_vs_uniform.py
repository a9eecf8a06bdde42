"""The budget capper vs one static uniform cap under the same budget, on a 30-minute trace.

A node of simulated H100s (``SimNode``: the agent's collector, store, registry, actuator and
policy engine on a manual clock, run faster than real time) replays one seeded trace of mixed
jobs three times, in the same process:

- ``policy``: the policy engine with the budget capper (``BudgetCapper``, its margin under the
  budget learned from how the GPUs hold their limits), ``--apply``;
- ``uniform``: what an operator does by hand to meet the same budget: one static cap per GPU,
  budget / GPUs (within [min, max]), set once (a trivial policy that wants it on every GPU);
- ``uncapped``: no policy, for reference (what the jobs would do without a budget);
- with ``--explain 1`` (the default), three more capper runs that explain its figure: the fixed
  2 % margin it had before (``policy_fixed_margin``: what learning the margin gains), no margin
  at all (``policy_no_margin``: what any margin costs on the simulator's exact limiter), and
  with every job at normal priority (``policy_one_priority``).

The trace: a few GPUs stay idle all along (one in eight); every other GPU runs a succession of
jobs (most start at once, the rest within minutes) separated by idle gaps (exponential, mean
90 s). A job lasts 3-15 minutes and has a priority (high 25 %, normal 45 %, low 30 %); it
alternates compute phases (utilization 0.85-1.0, 30-180 s) and light phases (0.2-0.6, 10-60 s:
evaluation, checkpoints, data loading, quieter inference). Each job makes one step per second
on an uncapped GPU, times the GPU's relative throughput (what its limit leaves of its clocks).

Figures, per run: the share of the run the node's true power (``SimNode.power_w``, the
simulator's ground truth, read after every sampler pass) is above the budget (goal: under 1 %),
the worst excess, the steps of all jobs (aggregate throughput; goal: at least 5 % more than the
uniform cap), the steps of high-priority jobs and what they lose against the uncapped run,
energy, the wall time the replay took, and for capper runs the margin under the budget (its
mean over the run's passes, its range, its value at the end, and the overshoot quantile it was
learned from).

    python -m benchmarks.policy_vs_uniform [--duration-s 1800] [--budget-fraction 0.65]
        [--interval-s 0.5] [--seed 1] [--explain 1] [--quick]
"""

from __future__ import annotations

import itertools
import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import Option, run_benchmark, table
from wattwarden.hardware.sim.gpu import SimProcess
from wattwarden.hardware.sim.models import MODELS
from wattwarden.nodesim import JOB_MEMORY_BYTES, SimJob, SimNode
from wattwarden.policies.base import Intent, Policy, PolicyInputs
from wattwarden.policies.capping import DEFAULT_MARGIN, BudgetCapper

NAME = "policy_vs_uniform"
MODEL = "h100-sxm"
SIZES = (8, 64)
PRIORITY_MIX = (("high", 0.25), ("normal", 0.45), ("low", 0.30))
IDLE_EVERY = 8
"""One GPU in this many stays idle for the whole trace."""
WARMUP_S = 2.0
OVER_TOLERANCE = 1e-9
"""Relative: a node exactly at its budget (the uniform cap's sum) is not over it."""


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happens in the trace, ``at_s`` seconds after it starts."""

    at_s: float
    kind: str
    """``start``, ``phase`` (a new utilization) or ``end``."""
    job: str
    gpu: int = -1
    priority: str = ""
    utilization: float = 0.0


def make_trace(gpus: int, duration_s: float, seed: int) -> list[Event]:
    """The seeded trace of jobs arriving, changing phase and ending."""
    rng = random.Random(seed)
    idle = set(rng.sample(range(gpus), max(1, gpus // IDLE_EVERY)))
    events: list[Event] = []
    count = 0
    for gpu in range(gpus):
        if gpu in idle:
            continue
        t = 0.0 if rng.random() < 0.8 else rng.uniform(0, 300)
        while t < duration_s:
            count += 1
            name = f"job{count}"
            priority = rng.choices([p for p, _ in PRIORITY_MIX], [w for _, w in PRIORITY_MIX])[0]
            end = min(duration_s, t + rng.uniform(180, 900))
            compute = True
            util = rng.uniform(0.85, 1.0)
            events.append(Event(t, "start", name, gpu, priority, util))
            phase_at = t + rng.uniform(30, 180)
            while phase_at < end:
                compute = not compute
                util = rng.uniform(0.85, 1.0) if compute else rng.uniform(0.2, 0.6)
                events.append(Event(phase_at, "phase", name, utilization=util))
                phase_at += rng.uniform(30, 180) if compute else rng.uniform(10, 60)
            events.append(Event(end, "end", name))
            t = end + rng.expovariate(1 / 90)
    order = {"end": 0, "start": 1, "phase": 2}  # a GPU is free before its next job starts
    return sorted(events, key=lambda e: (e.at_s, order[e.kind], e.job))


class UniformCap:
    """The operator's baseline: the same static cap on every GPU, set once and kept."""

    name = "uniform"

    def __init__(self, watts: float) -> None:
        self.watts = watts

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        """The cap on every GPU, within its bounds."""
        out = []
        for view in inputs.snapshot.gpus:
            info = view.sample.info
            lo, hi = info.power_limit_min_w, info.power_limit_max_w
            if lo is None or hi is None:
                continue
            watts = min(hi, max(lo, self.watts))
            out.append(Intent(info.index, watts, f"uniform cap {watts:.0f} W per GPU"))
        return out


@dataclass
class Meter:
    """Ground truth after every sampler pass: time over budget and the worst excess."""

    budget_w: float
    passes: int = 0
    over_passes: int = 0
    over_s: float = 0.0
    worst_over_w: float = 0.0
    spells: int = 0
    longest_spell_s: float = 0.0
    _spell_s: float = field(default=0.0, repr=False)

    def __call__(self, node: SimNode) -> None:
        """Read the node's true power after one pass."""
        self.passes += 1
        excess = node.power_w() - self.budget_w
        if excess > self.budget_w * OVER_TOLERANCE:
            self.over_passes += 1
            self.over_s += node.interval_s
            self.worst_over_w = max(self.worst_over_w, excess)
            if self._spell_s == 0.0:
                self.spells += 1
            self._spell_s += node.interval_s
            self.longest_spell_s = max(self.longest_spell_s, self._spell_s)
        else:
            self._spell_s = 0.0


def set_utilization(node: SimNode, name: str, utilization: float) -> None:
    """A job enters a new phase: its process on the GPU draws at another utilization."""
    job = node.sim_jobs[name]
    job.utilization = utilization
    gpu = node.fleet[job.gpu]
    gpu.remove_process(job.pid)
    gpu.add_process(SimProcess(job.pid, utilization, JOB_MEMORY_BYTES, name))


def replay(
    gpus: int,
    *,
    trace: list[Event],
    policies: list[Policy],
    budget_w: float,
    duration_s: float,
    interval_s: float,
) -> dict[str, Any]:
    """Replay the trace on a fresh node with these policies; the figures of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        node = SimNode(
            gpus,
            state_dir=Path(tmp),
            policies=policies,
            mode="apply",
            model=MODEL,
            interval_s=interval_s,
        )
        node.run(WARMUP_S)
        start = node.clock()
        energy0 = sum(g.true_energy_j() for g in node.fleet.gpus)
        meter = Meter(budget_w)
        cappers = [p for p in policies if isinstance(p, BudgetCapper)]
        margins: list[float] = []

        def on_pass(n: SimNode) -> None:
            meter(n)
            if cappers:
                margins.append(cappers[0].margin)

        priority: dict[str, str] = {}
        done: dict[str, float] = {}
        t0 = time.perf_counter()
        for event in trace:
            node.run(max(0.0, start + event.at_s - node.clock()), on_pass=on_pass)
            if event.kind == "start":
                priority[event.job] = event.priority
                node.add_job(SimJob(event.job, event.gpu, event.priority, event.utilization, 1.0))
            elif event.kind == "phase":
                set_utilization(node, event.job, event.utilization)
            else:
                done[event.job] = node.end_job(event.job).steps
        node.run(start + duration_s - node.clock(), on_pass=on_pass)
        wall_s = time.perf_counter() - t0
        for name, job in node.sim_jobs.items():
            done[name] = job.steps
        energy_j = sum(g.true_energy_j() for g in node.fleet.gpus) - energy0
        sets = sum(d.action == "set" for d in node.decisions)
        node.close()
    steps = {p: sum(s for n, s in done.items() if priority[n] == p) for p, _ in PRIORITY_MIX}
    total = sum(steps.values())
    margin: dict[str, Any] | None = None
    if cappers:
        capper = cappers[0]
        margin = {
            "source_at_end": capper.margin_source,
            "mean_pct": 100.0 * sum(margins) / len(margins),
            "min_pct": 100.0 * min(margins),
            "max_pct": 100.0 * max(margins),
            "at_end_pct": 100.0 * capper.margin,
            "changes": sum(a != b for a, b in itertools.pairwise(margins)),
            "overshoot_quantile_pct": None
            if capper.overshoot is None
            else 100.0 * capper.overshoot,
            "overshoot_readings": capper.overshoot_readings,
        }
    return {
        "over_budget_pct": 100.0 * meter.over_passes / max(1, meter.passes),
        "over_budget_s": meter.over_s,
        "over_spells": meter.spells,
        "longest_over_spell_s": meter.longest_spell_s,
        "worst_over_w": meter.worst_over_w,
        "steps": total,
        "steps_by_priority": steps,
        "energy_kwh": energy_j / 3.6e6,
        "joules_per_step": energy_j / total if total else float("nan"),
        "mean_power_w": energy_j / duration_s,
        "limit_changes": sets,
        "limit_changes_per_gpu_per_min": sets / gpus / (duration_s / 60),
        "wall_s": wall_s,
        "speedup_vs_real_time": duration_s / wall_s,
        "budget_margin": margin,
    }


def run(
    duration_s: float, budget_fraction: float, interval_s: float, seed: int, explain: int
) -> dict[str, Any]:
    """Replay one trace per node size with each setup (and the two explaining runs)."""
    spec = MODELS[MODEL]
    sizes = {}
    for gpus in SIZES:
        trace = make_trace(gpus, duration_s, seed)
        budget = budget_fraction * gpus * spec.power_default_w
        uniform = min(spec.power_max_w, max(spec.power_min_w, budget / gpus))
        common: dict[str, Any] = {
            "budget_w": budget,
            "duration_s": duration_s,
            "interval_s": interval_s,
        }
        runs = {
            "policy": replay(
                gpus, trace=trace, policies=[BudgetCapper(lambda b=budget: b)], **common
            ),
            "uniform": replay(gpus, trace=trace, policies=[UniformCap(uniform)], **common),
            "uncapped": replay(gpus, trace=trace, policies=[], **common),
        }
        if explain:
            # what learning the margin gains over the fixed 2 % of before, what any margin
            # costs, and what the priority order costs (the uniform and the uncapped runs ignore
            # priorities, so their figures hold for the one-priority trace)
            runs["policy_fixed_margin"] = replay(
                gpus,
                trace=trace,
                policies=[BudgetCapper(lambda b=budget: b, setpoint=1.0 - DEFAULT_MARGIN)],
                **common,
            )
            runs["policy_no_margin"] = replay(
                gpus,
                trace=trace,
                policies=[BudgetCapper(lambda b=budget: b, setpoint=1.0)],
                **common,
            )
            runs["policy_one_priority"] = replay(
                gpus,
                trace=[replace(e, priority="normal") if e.kind == "start" else e for e in trace],
                policies=[BudgetCapper(lambda b=budget: b)],
                **common,
            )
        pol, uni, free = runs["policy"], runs["uniform"], runs["uncapped"]
        high_free = free["steps_by_priority"]["high"]
        for r in runs.values():
            r["throughput_vs_uniform"] = _ratio(r["steps"], uni["steps"])
            r["high_steps_lost_vs_uncapped_pct"] = (
                100.0 * (1 - _ratio(r["steps_by_priority"]["high"], high_free))
                if r["steps_by_priority"]["high"]
                else float("nan")
            )
            r["steps_lost_vs_uncapped_pct"] = 100.0 * (1 - _ratio(r["steps"], free["steps"]))
        jobs = sum(e.kind == "start" for e in trace)
        sizes[str(gpus)] = {
            "gpus": gpus,
            "budget_w": budget,
            "uniform_cap_w": uniform,
            "jobs": jobs,
            "events": len(trace),
            "runs": runs,
            "ratios": {
                "throughput_policy_vs_uniform": _ratio(pol["steps"], uni["steps"]),
                "high_throughput_policy_vs_uniform": _ratio(
                    pol["steps_by_priority"]["high"], uni["steps_by_priority"]["high"]
                ),
                "energy_policy_vs_uniform": _ratio(pol["energy_kwh"], uni["energy_kwh"]),
                "joules_per_step_policy_vs_uniform": _ratio(
                    pol["joules_per_step"], uni["joules_per_step"]
                ),
                "throughput_policy_vs_fixed_margin": _ratio(
                    pol["steps"], runs["policy_fixed_margin"]["steps"]
                )
                if "policy_fixed_margin" in runs
                else None,
            },
            "goals_met": {
                "over_budget_under_1_pct": pol["over_budget_pct"] < 1.0,
                "throughput_at_least_5_pct_over_uniform": pol["steps"] >= 1.05 * uni["steps"],
            },
        }
    met = all(all(s["goals_met"].values()) for s in sizes.values())
    return {
        "params": {
            "duration_s": duration_s,
            "budget_fraction_of_default_limits": budget_fraction,
            "interval_s": interval_s,
            "period_s": 1.0,
            "seed": seed,
            "gpu_model": MODEL,
            "priority_mix": dict(PRIORITY_MIX),
            "idle_gpus": f"1 in {IDLE_EVERY}",
        },
        "sizes": sizes,
        "goal": "policy: node power above its budget under 1 % of the run, and aggregate "
        "throughput at least 5 % above the uniform cap's under the same budget (8 and 64 GPUs)",
        "goal_met": met,
        "notes": [
            "Power is the simulator's ground truth after every sampler pass; a pass is over "
            "budget when the node draws more than the budget (to float rounding: the uniform "
            "caps sum to the budget exactly, and the simulated power limiter holds a capped GPU "
            "exactly at its limit, where a real one ripples around it).",
            "The uniform cap never exceeds the budget by construction (the caps sum to it). The "
            "capper starts from the GPUs' own limits (uncapped: oversubscribed) and lets GPUs "
            "climb past their share while the node is under 80 % of its budget, so a sudden rise "
            "is over budget until the next period cuts it; once it has capped, its limits sum to "
            "at most the split budget (1 - margin) except after such climbs.",
            "The policy run's margin under the budget is learned: 1.5 x the 99th percentile of "
            "the node's overshoot over the limits of the GPUs held at them, within 0.5-5 %, 2 % "
            "until 60 readings; on the simulator (exact limiter, readings with up to 1 % noise) "
            "it is the readings' noise it learns. budget_margin gives its mean over the run's "
            "passes, range, value at the end and the overshoot quantile it rests on.",
            "policy_fixed_margin is the capper with the fixed 2 % margin it had before (setpoint "
            "0.98: what learning the margin gains); policy_no_margin aims at 100 % of the budget "
            "(what any margin costs on an exact limiter, an upper bound a real board does not "
            "allow); policy_one_priority is the capper on the same trace with every job at "
            "normal priority (what serving priorities first costs in aggregate throughput: a "
            "watt moved from a low- to a high-priority GPU buys less throughput than it costs, "
            "since throughput is concave in power).",
            "sets/GPU/min: limit changes the engine made (apply mode), per GPU per minute; each "
            "is journalled before it is made, which is most of the capper runs' extra wall "
            "time.",
            "Throughput is steps: each job makes one step per second on an uncapped GPU, times "
            "the GPU's relative throughput (DVFS model in hardware/sim/gpu.py, ~0.4 % of "
            "throughput per 1 % of power near TDP).",
        ],
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(payload: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    p = payload["params"]
    rows = []
    for size in payload["sizes"].values():
        for name, r in size["runs"].items():
            rows.append(
                [
                    size["gpus"],
                    name,
                    r["over_budget_pct"],
                    r["longest_over_spell_s"],
                    r["worst_over_w"],
                    r["steps"],
                    r["throughput_vs_uniform"],
                    r["steps_by_priority"]["high"],
                    r["high_steps_lost_vs_uncapped_pct"],
                    r["steps_by_priority"]["low"],
                    r["energy_kwh"],
                    r["joules_per_step"],
                    r["limit_changes_per_gpu_per_min"],
                    "-" if r["budget_margin"] is None else r["budget_margin"]["mean_pct"],
                    r["wall_s"],
                ]
            )
    lines = [
        f"{p['duration_s']:g} s trace (seed {p['seed']}), budget "
        f"{p['budget_fraction_of_default_limits']:.0%} of the default limits, sampler every "
        f"{p['interval_s']:g} s, policy period 1 s",
        table(
            [
                "GPUs",
                "run",
                "over %",
                "longest s",
                "worst W",
                "steps",
                "vs uniform",
                "high steps",
                "high lost %",
                "low steps",
                "kWh",
                "J/step",
                "sets/GPU/min",
                "margin %",
                "wall s",
            ],
            rows,
        ),
        "",
    ]
    for size in payload["sizes"].values():
        goals = size["goals_met"]
        pol = size["runs"]["policy"]
        lines.append(
            f"{size['gpus']} GPUs (budget {size['budget_w']:.0f} W, uniform cap "
            f"{size['uniform_cap_w']:.0f} W, {size['jobs']} jobs): over budget "
            f"{pol['over_budget_pct']:.2f} % of the run "
            f"({'met' if goals['over_budget_under_1_pct'] else 'MISSED'}: < 1 %); throughput "
            f"{size['ratios']['throughput_policy_vs_uniform']:.3f}x the uniform cap's "
            f"({'met' if goals['throughput_at_least_5_pct_over_uniform'] else 'MISSED'}: "
            ">= 1.05x); margin under the budget "
            f"{pol['budget_margin']['mean_pct']:.2f} % on average "
            f"({pol['budget_margin']['source_at_end']} at the end: "
            f"{pol['budget_margin']['at_end_pct']:.1f} %)"
        )
    return "\n".join(lines)


OPTIONS = (
    Option("--duration-s", 1800.0, "trace length in simulated seconds", quick=300.0),
    Option("--budget-fraction", 0.65, "budget as a fraction of the sum of default limits"),
    Option("--interval-s", 0.5, "sampler interval in simulated seconds"),
    Option("--seed", 1, "trace seed"),
    Option(
        "--explain", 1, "1: also the capper with a fixed 2 % margin, none, one priority", quick=0
    ),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/policy_vs_uniform.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
