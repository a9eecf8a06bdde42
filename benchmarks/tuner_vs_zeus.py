"""Energy tuner vs Zeus's GlobalPowerLimitOptimizer, on the same simulated training job.

One training job on one simulated H100 (``SimFleet(model="h100-sxm")`` on a ``ManualClock``):
each step is a fixed amount of work, ``--work-s`` seconds at full clock, and lasts
``work / SimGpu.relative_throughput()`` at the GPU's current limit; the benchmark advances the
clock by that much, and the simulator integrates the power the limit allows (``P = idle +
dynamic * util * f**alpha``, the clock ``f`` lowered until the limit holds). Job shapes:

- ``compute``: utilization 1.0, 5 % of the work memory-bound (the simulator's default);
- ``partial``: utilization 0.6: the job draws 448 W at full clock, so limits above that do not
  bind and every one of them costs the same;
- ``memory``: utilization 1.0 with 60 % of the work memory-bound (the GPU's
  ``memory_bound_fraction`` set to 0.6 for the run): a lower clock slows it little.

Each shape runs with ``eta`` 0.5 and 1.0, with and without ``--jitter`` (each step's work drawn
uniformly within +-jitter of the mean; ``--seeds`` runs, each method with the same seeds, and
the means reported: on a flat cost, which limit noise lands on is a lottery that one run
would report as a difference), and with ``max_slowdown`` 0.05 at ``eta = 1`` (Zeus: its
``MaxSlowdownConstraint(1.05)``).

Methods, each from a GPU at its maximum limit:

- ``zeus``: ``zeus.optimizer.power_limit.GlobalPowerLimitOptimizer`` (zeus 0.16) *unchanged*,
  with its defaults (wait 1 step, then per limit 10 warm-up and 40 profiled steps, limits from
  700 W down to 200 W in 25 W strides) and ``ZeusCost(eta)`` (or ``MaxSlowdownConstraint``),
  over an unchanged ``ZeusMonitor(gpu_indices=[0], cpu_indices=[])`` (no RAPL), calling
  ``on_step_begin()`` before each step as its docs say (no epoch ends while it profiles). It
  talks to the simulator through the real pynvml over the fake ``libnvidia-ml``
  (``install_fake_nvml``). Two names are patched,
  both in ``zeus.monitor.energy`` and for the whole run: ``time`` (its ``from time import
  time``, the clock its windows read) becomes the simulator's ``ManualClock``, and
  ``sync_execution_fn`` (which waits for CUDA work with ``torch.cuda.synchronize``) becomes a
  no-op: the installed torch has no CUDA, so zeus's call raises "PyTorch is available but does
  not have CUDA support", and a simulated step has finished when it returns (nothing is
  asynchronous). Nothing of the optimizer, the selectors or the monitor's logic is changed.
- ``ours``: wattwarden's search (``wattwarden.policies.tuner.LimitSearch``, the policy's
  defaults: 25 W grid, windows of 50 steps and 10 s, first span at each limit discarded) driven
  directly, one span per step: the step's energy from the simulated driver counter that zeus
  reads through ``nvmlDeviceGetTotalEnergyConsumption``, its duration from the clock, and the
  enforced limit. This is what the goals compare: the same measurements Zeus gets.
- ``ours in the agent``: the ``EnergyTuner`` policy through the real path: a ``PolicyEngine``
  in apply mode over a ``MetricStore`` filled by a ``GpuCollector`` at 10 Hz, a journalled
  ``LimitActuator``, one-second periods, and a job that reports its *whole* step count once a
  period (as ``wattwarden job run`` does), its steps starting at a random phase of the period.
  Reported beside the others; it needs more steps,
  because whole-step counts blur a window's step rate (see ``DEFAULT_WINDOW_STEPS``).
- ``sweep``: the exhaustive sweep: every limit from 200 to 700 W in 1 W strides, 5 steps each
  without jitter after a warm-up step, from the simulator's true energy: the true optimum, and
  the truth each method's chosen limit is scored with.

Per method: the chosen limit; energy per step and step time there against the maximum limit
(energy saved, slowdown), its cost against the sweep's optimum, the limits profiled, and the
steps spent before the chosen limit was in force. Goals (the issue's): ours saves Zeus's energy
or more, within 2 points (``saved_ours >= saved_zeus - 2``), in at most half of Zeus's
profiling steps, in every scenario.

    python -m benchmarks.tuner_vs_zeus [--work-s 0.5] [--jitter 0.03] [--seeds 20] [--quick]

About a minute on 2 cores (``--quick``: no jitter, about 10 s).
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import Option, run_benchmark, table
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import JobView
from wattwarden.collectors.store import MetricStore
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml
from wattwarden.hardware.sim.gpu import SimGpu
from wattwarden.hardware.sim.models import MODELS
from wattwarden.policies.actuator import LimitActuator
from wattwarden.policies.engine import PolicyEngine
from wattwarden.policies.tuner import EnergyTuner, LimitSearch, zeus_cost

NAME = "tuner_vs_zeus"
MODEL = "h100-sxm"
ZEUS_GPU, AGENT_GPU = 0, 1
GOAL_SAVED_POINTS = 2.0
GOAL_STEPS_RATIO = 0.5
SWEEP_STEPS = 5


@dataclass(frozen=True, slots=True)
class Shape:
    """A job shape: its load on the GPU and the memory-bound share of its work."""

    name: str
    utilization: float
    memory_bound: float


SHAPES = (
    Shape("compute", 1.0, MODELS[MODEL].memory_bound_fraction),
    Shape("partial", 0.6, MODELS[MODEL].memory_bound_fraction),
    Shape("memory", 1.0, 0.6),
)


@dataclass(frozen=True, slots=True)
class Scenario:
    shape: Shape
    eta: float
    max_slowdown: float | None
    jitter: float

    @property
    def label(self) -> str:
        bound = "" if self.max_slowdown is None else f" <= {self.max_slowdown:.0%} slower"
        noisy = f" jitter {self.jitter:.0%}" if self.jitter else ""
        return f"{self.shape.name} eta={self.eta:g}{bound}{noisy}"


class Job:
    """The simulated training job on one GPU: steps of fixed work, the clock moved by each."""

    def __init__(
        self, gpu: SimGpu, clock: ManualClock, work_s: float, jitter: float, seed: int
    ) -> None:
        self.gpu = gpu
        self.clock = clock
        self.work_s = work_s
        self.jitter = jitter
        self.rng = random.Random(seed)

    def step(self) -> None:
        """Run one step at the GPU's current limit."""
        work = self.work_s * (1.0 + self.rng.uniform(-self.jitter, self.jitter))
        self.clock.advance(work / self.gpu.relative_throughput())

    def set_limit(self, watts: float) -> None:
        self.gpu.set_power_limit_mw(round(watts * 1000))


def prepare(gpu: SimGpu, shape: Shape) -> None:
    """The GPU at its maximum limit, loaded with the job's shape."""
    gpu.spec = replace(MODELS[MODEL], memory_bound_fraction=shape.memory_bound)
    gpu.set_power_limit_mw(round(gpu.spec.power_max_w * 1000))
    gpu.set_load(shape.utilization)


# ----------------------------------------------------------------------- methods
def sweep(gpu: SimGpu, clock: ManualClock, work_s: float) -> dict[int, tuple[float, float]]:
    """(energy, seconds) per step at every whole watt from the minimum to the maximum limit."""
    job = Job(gpu, clock, work_s, 0.0, 0)
    out = {}
    for watts in range(int(gpu.spec.power_min_w), int(gpu.spec.power_max_w) + 1):
        job.set_limit(watts)
        job.step()  # warm-up
        e0, t0 = gpu.true_energy_j(), clock()
        for _ in range(SWEEP_STEPS):
            job.step()
        out[watts] = ((gpu.true_energy_j() - e0) / SWEEP_STEPS, (clock() - t0) / SWEEP_STEPS)
    return out


def run_zeus(job: Job, scenario: Scenario) -> dict[str, Any]:
    """Zeus's optimizer, unchanged, until it has chosen its limit."""
    from zeus.monitor import ZeusMonitor
    from zeus.optimizer.power_limit import (
        Done,
        GlobalPowerLimitOptimizer,
        MaxSlowdownConstraint,
        OptimumSelector,
        ZeusCost,
    )

    selector: OptimumSelector = (
        ZeusCost(eta_knob=scenario.eta)
        if scenario.max_slowdown is None
        else MaxSlowdownConstraint(factor=1.0 + scenario.max_slowdown)
    )
    monitor = ZeusMonitor(gpu_indices=[ZEUS_GPU], cpu_indices=[])
    plo = GlobalPowerLimitOptimizer(monitor, optimum_selector=selector)
    steps = 0
    while True:
        plo.on_step_begin()
        if isinstance(plo.state, Done):
            break
        job.step()
        steps += 1
    return {
        "limit_w": plo.state.optimal_power_limit / 1000,
        "profiled_limits": len(plo.measurements),
        "profiling_steps": steps,
    }


def run_ours(job: Job, scenario: Scenario) -> dict[str, Any]:
    """Our search, fed one span per step from the driver's energy counter and the clock."""
    spec = job.gpu.spec
    search = LimitSearch(
        spec.power_min_w, spec.power_max_w, eta=scenario.eta, max_slowdown=scenario.max_slowdown
    )
    steps = 0
    while search.phase == "profiling":
        job.set_limit(search.target_w)
        e0, t0 = job.gpu.total_energy_mj(), job.clock()
        job.step()
        steps += 1
        search.observe(
            1,
            (job.gpu.total_energy_mj() - e0) / 1000,
            job.clock() - t0,
            job.gpu.enforced_power_limit_mw() / 1000,
        )
    return {
        "limit_w": search.target_w,
        "profiled_limits": len(search.profiles),
        "profiling_steps": steps,
    }


def run_agent(
    fleet: SimFleet, clock: ManualClock, scenario: Scenario, work_s: float, seed: int
) -> dict[str, Any]:
    """The EnergyTuner policy through the engine, the store and the actuator, 1 s periods."""
    gpu = fleet[AGENT_GPU]
    rng = random.Random(seed)
    backend = SimBackend(fleet)
    store = MetricStore(monotonic=clock)
    collector = GpuCollector(backend, monotonic=clock)
    tuner = EnergyTuner(eta=scenario.eta, max_slowdown=scenario.max_slowdown)
    steps = start = (
        rng.random()
    )  # the job is mid-step when tuning starts: reports fall anywhere in a step
    view = JobView("train", 4242, AGENT_GPU, "normal", 0.0, 0, 0, 0, None, {}, 0.0, tune=True)
    with tempfile.TemporaryDirectory() as tmp:
        actuator = LimitActuator(backend.devices(), Path(tmp) / "journal.sqlite3", monotonic=clock)
        try:
            engine = PolicyEngine([tuner], actuator, store, mode="apply", monotonic=clock)
            for _ in range(20_000):
                for _ in range(10):  # the sampler at 10 Hz; the job's work jittered per tick
                    noise = 1.0 + rng.uniform(-scenario.jitter, scenario.jitter)
                    steps += 0.1 * gpu.relative_throughput() / (work_s * noise)
                    clock.advance(0.1)
                    store.put(collector.collect())
                engine.step([replace(view, step=int(steps))])
                state = tuner.jobs()["train"]
                if state.phase == "settled":
                    break
        finally:
            actuator.close()
    return {
        "limit_w": state.target_w,
        "profiled_limits": state.profiled,
        "profiling_steps": int(steps - start),
    }


# ----------------------------------------------------------------------- scoring
def score(
    result: dict[str, Any], truth: dict[int, tuple[float, float]], scenario: Scenario
) -> dict[str, Any]:
    """A chosen limit against the sweep: savings, slowdown, cost over the optimum."""
    max_w = max(truth)
    e_max, t_max = truth[max_w]
    e, t = truth[round(result["limit_w"])]
    cost = zeus_cost(e, t, eta=scenario.eta, max_power_w=max_w)
    return {
        **result,
        "energy_per_step_j": e,
        "step_time_s": t,
        "energy_saved_pct": (1 - e / e_max) * 100,
        "slowdown_pct": (t / t_max - 1) * 100,
        "cost_per_step": cost,
    }


def optimum(truth: dict[int, tuple[float, float]], scenario: Scenario) -> dict[str, Any]:
    max_w = max(truth)
    t_max = truth[max_w][1]

    def cost(w: int) -> float:
        return zeus_cost(*truth[w], eta=scenario.eta, max_power_w=max_w)

    feasible = [
        w
        for w in truth
        if scenario.max_slowdown is None or truth[w][1] <= (1 + scenario.max_slowdown) * t_max
    ]
    best = min(feasible, key=lambda w: (cost(w), -w))
    return {"limit_w": float(best), "profiled_limits": len(truth), "profiling_steps": None}


def scenarios(jitter: float) -> list[Scenario]:
    out = []
    for shape in SHAPES:
        for noise in (0.0, jitter) if jitter else (0.0,):
            for eta in (0.5, 1.0):
                out.append(Scenario(shape, eta, None, noise))
        out.append(Scenario(shape, 1.0, 0.05, 0.0))
    return out


METRICS = (
    "limit_w", "profiled_limits", "profiling_steps", "energy_per_step_j", "step_time_s",
    "energy_saved_pct", "slowdown_pct", "cost_per_step", "cost_over_optimum",
)  # fmt: skip


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's runs of a scenario (one per seed): the mean of each figure, and each run."""
    out: dict[str, Any] = {}
    for key in METRICS:
        values = [r[key] for r in runs]
        if None in values or len(set(values)) == 1:
            out[key] = values[0]  # one run, or the same figure in each
        else:
            out[key] = sum(values) / len(values)
    chosen: dict[str, int] = {}
    for r in runs:
        chosen[f"{r['limit_w']:g}"] = chosen.get(f"{r['limit_w']:g}", 0) + 1
    out["limits_chosen"] = chosen
    if len(runs) > 1:  # each run's choice; its figures follow from the sweep
        out["runs"] = [
            {k: r[k] for k in ("limit_w", "profiled_limits", "profiling_steps")} for r in runs
        ]
    return out


def run_scenario(
    fleet: SimFleet, clock: ManualClock, scenario: Scenario, work_s: float, seed: int
) -> dict[str, dict[str, Any]]:
    """Every method on one scenario with one seed of the jitter (the sweep apart)."""
    gpu = fleet[ZEUS_GPU]
    prepare(gpu, scenario.shape)
    zeus = run_zeus(Job(gpu, clock, work_s, scenario.jitter, seed), scenario)
    prepare(gpu, scenario.shape)
    ours = run_ours(Job(gpu, clock, work_s, scenario.jitter, seed), scenario)
    prepare(fleet[AGENT_GPU], scenario.shape)
    agent = run_agent(fleet, clock, scenario, work_s, seed)
    return {"zeus": zeus, "ours": ours, "ours in the agent": agent}


def run(work_s: float, jitter: float, seeds: int, seed: int) -> dict[str, Any]:
    """Every scenario, every method, scored against the sweep; noisy ones over several seeds."""
    logging.getLogger("zeus").setLevel(logging.WARNING)
    clock = ManualClock()
    fleet = SimFleet(2, model=MODEL, clock=clock)
    install_fake_nvml(fleet)  # one fleet for the run: zeus keeps its device handles
    import zeus.monitor.energy as zeus_energy

    zeus_energy.time = clock  # the clock zeus's windows read
    no_sync: Callable[..., None] = lambda *args, **kwargs: None  # noqa: E731
    zeus_energy.sync_execution_fn = no_sync  # type: ignore[assignment]

    truths: dict[str, dict[int, tuple[float, float]]] = {}
    rows = []
    for scenario in scenarios(jitter):
        if scenario.shape.name not in truths:
            prepare(fleet[ZEUS_GPU], scenario.shape)
            truths[scenario.shape.name] = sweep(fleet[ZEUS_GPU], clock, work_s)
        truth = truths[scenario.shape.name]
        best = score(optimum(truth, scenario), truth, scenario)
        per_method: dict[str, list[dict[str, Any]]] = {}
        for k in range(seeds if scenario.jitter else 1):
            for name, result in run_scenario(fleet, clock, scenario, work_s, seed + k).items():
                scored = score(result, truth, scenario)
                scored["cost_over_optimum"] = scored["cost_per_step"] / best["cost_per_step"]
                per_method.setdefault(name, []).append(scored)
        best["cost_over_optimum"] = 1.0
        methods = {name: aggregate(runs) for name, runs in per_method.items()}
        methods["sweep"] = aggregate([best])
        zeus, ours, agent = methods["zeus"], methods["ours"], methods["ours in the agent"]
        rows.append(
            {
                "scenario": scenario.label,
                "shape": scenario.shape.name,
                "utilization": scenario.shape.utilization,
                "memory_bound": scenario.shape.memory_bound,
                "eta": scenario.eta,
                "max_slowdown": scenario.max_slowdown,
                "jitter": scenario.jitter,
                "seeds": seeds if scenario.jitter else 1,
                "methods": methods,
                "saved_points_vs_zeus": ours["energy_saved_pct"] - zeus["energy_saved_pct"],
                "steps_ratio_vs_zeus": ours["profiling_steps"] / zeus["profiling_steps"],
                "agent_saved_points_vs_zeus": agent["energy_saved_pct"] - zeus["energy_saved_pct"],
                "agent_steps_ratio_vs_zeus": agent["profiling_steps"] / zeus["profiling_steps"],
            }
        )
    for row in rows:
        row["goal_met"] = (
            row["saved_points_vs_zeus"] >= -GOAL_SAVED_POINTS
            and row["steps_ratio_vs_zeus"] <= GOAL_STEPS_RATIO
        )
    return {
        "params": {
            "model": MODEL,
            "work_s": work_s,
            "jitter": jitter,
            "seeds": seeds,
            "seed": seed,
            "zeus_version": importlib.metadata.version("zeus"),
            "zeus": "GlobalPowerLimitOptimizer defaults: wait_steps=1, warmup_steps=10, "
            "profile_steps=40, pl_step=25",
            "ours": "LimitSearch with the EnergyTuner's defaults: resolution 25 W, windows of "
            "50 steps and 10 s, warm-up span discarded",
            "sweep": f"1 W strides, {SWEEP_STEPS} steps each after a warm-up, no jitter",
        },
        "scenarios": rows,
        "goal": f"ours saves Zeus's energy or more within {GOAL_SAVED_POINTS:g} points, in at "
        f"most {GOAL_STEPS_RATIO:.0%} of Zeus's profiling steps, in every scenario (noisy "
        "ones: means over the seeds)",
        "goal_met": all(r["goal_met"] for r in rows),
        "notes": [
            "zeus runs unchanged over the fake NVML; patched in zeus.monitor.energy: time "
            "(to the ManualClock) and sync_execution_fn (to a no-op: no CUDA here, and a "
            "simulated step is synchronous)",
            "'ours' feeds the search one span per step, as Zeus measures; 'ours in the agent' "
            "is the policy through engine, store and actuator with whole-step reports once a "
            "second, reported but not part of the goal",
            "every chosen limit is scored on the sweep's truth (no jitter), so the table "
            "compares choices, not measurement noise",
            "'memory' sets the simulated GPU's memory_bound_fraction to 0.6 for the run",
        ],
    }


def report(p: dict[str, Any]) -> str:
    headers = ("scenario", "method", "limit W", "saved %", "slower %", "cost/opt", "limits",
               "steps", "limits chosen")  # fmt: skip
    rows = []
    for r in p["scenarios"]:
        for name, m in r["methods"].items():
            steps = m["profiling_steps"]
            chosen = " ".join(f"{w}x{n}" for w, n in sorted(m["limits_chosen"].items()))
            rows.append(
                (
                    r["scenario"], name, m["limit_w"], m["energy_saved_pct"], m["slowdown_pct"],
                    m["cost_over_optimum"], m["profiled_limits"],
                    "-" if steps is None else f"{steps:.0f}", chosen if r["seeds"] > 1 else "",
                )
            )  # fmt: skip
    goals = [
        (
            r["scenario"], r["saved_points_vs_zeus"], r["steps_ratio_vs_zeus"],
            r["agent_saved_points_vs_zeus"], r["agent_steps_ratio_vs_zeus"],
            "yes" if r["goal_met"] else "NO",
        )
        for r in p["scenarios"]
    ]  # fmt: skip
    goal_headers = ("scenario", "saved pts vs zeus", "steps / zeus", "agent: saved pts",
                    "agent: steps / zeus", "goal")  # fmt: skip
    return "\n".join(
        [
            f"one job on a simulated {p['params']['model']}, {p['params']['work_s']} s of work "
            "per step at full clock; steps = steps run before the chosen limit was in force; "
            f"jittered scenarios: means over {p['params']['seeds']} seeds",
            table(headers, rows),
            "",
            table(goal_headers, goals),
            f"goal: {p['goal']}: {'met' if p['goal_met'] else 'NOT met'}",
        ]
    )


OPTIONS = (
    Option("--work-s", 0.5, "seconds of work per step at full clock"),
    Option("--jitter", 0.03, "each step's work within +-this of the mean (noisy runs)", quick=0.0),
    Option("--seeds", 20, "seeds of the jitter per noisy scenario", quick=1),
    Option("--seed", 1, "the first seed"),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/tuner_vs_zeus.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
