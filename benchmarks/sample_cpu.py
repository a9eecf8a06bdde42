"""(a) CPU cost of one full sample of 8 GPUs: our NVML path vs gpustat and nvitop.

All tools read the SAME 8 simulated GPUs through the same fake ``libnvidia-ml`` installed below
the real pynvml module, so each tool pays the same price per NVML call and differs only in how many
calls it makes and how much Python it runs around them. Candidates run interleaved (one sample of
each per round, in rotating order) so drift on the machine hits them all alike.

Two clock modes, interleaved in the same rounds:

- ``live``: the simulated GPUs run on the real monotonic clock, so every read that needs the
  physics first advances the model (Python work that stands in for the driver's own cost, and that
  grows with the number of *fields* a tool reads);
- ``frozen``: the simulator's clock stands still, so no read advances the physics; what remains is
  each tool's own Python, pynvml's ctypes marshalling, and the fake library's per-call dispatch
  (the closest this machine gets to "tool overhead on a real driver").

Measured per sample: process CPU time (``time.process_time_ns``; the benchmark is single-threaded
and nothing else runs in the process) and wall time; median and p95 over many rounds. Also counted
once per candidate, outside the timed runs: NVML C calls per sample (a hardware-independent figure:
on a real GPU each NVML call is a driver round trip).

Goal (node-agent issue): our sample at least 3x cheaper in CPU than gpustat's and nvitop's.

    python -m benchmarks.sample_cpu [--rounds 400] [--quick]
"""

from __future__ import annotations

import collections
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import Option, measure_cpu_ns, run_benchmark, summary, table
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.hardware.nvml import NvmlBackend, pynvml_module
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml
from wattwarden.hardware.sim.fleet import SimFleet

NAME = "sample_cpu"
GPUS = 8
# A busy 8-GPU training node: most GPUs loaded, one finishing, one idle.
LOADS = (0.97, 0.95, 0.92, 0.9, 0.75, 0.5, 0.2, 0.0)
GOAL_RATIO = 3.0


class SwitchClock:
    """The fleet's clock: real monotonic time while ``live``, else a time before every read."""

    def __init__(self) -> None:
        self.live = True

    def __call__(self) -> float:
        """Now, or 0.0 (earlier than any GPU's last step, so nothing advances) when frozen."""
        return time.monotonic() if self.live else 0.0


MODES = ("live", "frozen")


@dataclass
class Candidate:
    """One way of taking a full sample of all GPUs."""

    key: str
    label: str
    fn: Callable[[], object]
    role: str  # "ours", "baseline" or "reference"
    cpu_ns: dict[str, list[int]]
    wall_ns: dict[str, list[int]]
    enter: Callable[[], None] = lambda: None
    """Run before each timed sample (outside the timing)."""
    nvml_calls: dict[str, int] | None = None


class _CountingLib:
    """Wraps the fake libnvidia-ml and counts every C function pynvml calls on it."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._lib, name)  # AttributeError -> pynvml's FunctionNotFound, as before
        if not callable(fn):
            return fn

        def counted(*args: Any) -> Any:
            self.calls[name] += 1
            return fn(*args)

        return counted


def count_nvml_calls(lib: Any, fn: Callable[[], object]) -> dict[str, int]:
    """NVML C calls one run of ``fn`` makes (pynvml's function-pointer cache is reset around it)."""
    pynvml: Any = pynvml_module()
    counting = _CountingLib(lib)
    pynvml.nvmlLib = counting
    pynvml._nvmlGetFunctionPointer_cache.clear()
    try:
        fn()
    finally:
        pynvml.nvmlLib = lib
        pynvml._nvmlGetFunctionPointer_cache.clear()
    return dict(sorted(counting.calls.items()))


def build_candidates() -> tuple[list[Candidate], Any, SwitchClock]:
    """Set up the fleet, the fake NVML and every tool over it."""
    clock = SwitchClock()
    fleet = SimFleet(GPUS, seed=0, clock=clock)
    for gpu, load in zip(fleet.gpus, LOADS, strict=True):
        gpu.set_load(load)
    lib = install_fake_nvml(fleet)

    backend = NvmlBackend()
    devices = backend.devices()
    for d in devices:
        d.info()  # static facts are read once at start, in the agent as here
    # The collector's own clock moves 100 ms per call, so each call is one pass of the 10 Hz
    # sampler: power and energy every pass, a full read every tenth (the agent's two tiers).
    ticks = [0.0]
    collector = GpuCollector(backend, monotonic=lambda: ticks[0])

    def ours_collect() -> object:
        ticks[0] += 0.1
        return collector.collect()

    # nvitop first: it binds pynvml._nvmlGetFunctionPointer at import, before gpustat patches it.
    import nvitop

    logging.getLogger("nvitop").setLevel(logging.ERROR)
    import gpustat.core
    import gpustat.nvml

    # Importing gpustat monkeypatches two pynvml functions process-wide (a function-pointer
    # fallback and a memory-info wrapper). Give them to gpustat only, and the originals to the rest.
    pynvml: Any = pynvml_module()
    patched = {
        "_nvmlGetFunctionPointer": pynvml._nvmlGetFunctionPointer,
        "nvmlDeviceGetMemoryInfo": pynvml.nvmlDeviceGetMemoryInfo,
    }
    original = {
        "_nvmlGetFunctionPointer": gpustat.nvml._original_nvmlGetFunctionPointer,
        "nvmlDeviceGetMemoryInfo": gpustat.nvml._original_nvmlDeviceGetMemoryInfo,
    }

    def use(functions: dict[str, Any]) -> Callable[[], None]:
        def enter() -> None:
            for name, fn in functions.items():
                setattr(pynvml, name, fn)

        return enter

    # gpustat sleeps 0.1 s per GPU (to measure per-process CPU%) whenever the driver answers the
    # process queries, even with no process to look at. Sleeping costs wall time, not CPU: patch it
    # out of gpustat's module so rounds stay short. Every NVML call and all other work remain.
    gpustat.core.time = types.SimpleNamespace(sleep=lambda _s: None)
    nv_devices = nvitop.Device.all()

    sim_devices = SimBackend(fleet).devices()

    def ours_read() -> object:
        return [d.read() for d in devices]

    def nvitop_all_snapshot() -> object:
        return [d.as_snapshot() for d in nvitop.Device.all()]

    def sim_only() -> object:
        return [d.read() for d in sim_devices]

    def fast_tier_only() -> object:
        return [d.read_power() for d in devices]

    rows = [
        ("ours_read", "wattwarden full read: each device .read()", ours_read, "ours"),
        ("ours_collect", "wattwarden GpuCollector.collect(), one 10 Hz pass", ours_collect, "ours"),
        (
            "gpustat",
            "gpustat GPUStatCollection.new_query()",
            gpustat.core.GPUStatCollection.new_query,
            "baseline",
        ),
        (
            "nvitop_snapshot",
            "nvitop Device.as_snapshot() x 8 (devices kept)",
            lambda: [d.as_snapshot() for d in nv_devices],
            "baseline",
        ),
        (
            "nvitop_all_snapshot",
            "nvitop Device.all() + as_snapshot() x 8",
            nvitop_all_snapshot,
            "baseline",
        ),
        ("sim_only", "reference: simulator read directly (no NVML)", sim_only, "reference"),
        (
            "fast_tier_only",
            "wattwarden fast tier alone: .read_power() per GPU",
            fast_tier_only,
            "reference",
        ),
    ]
    return (
        [
            Candidate(
                k,
                label,
                fn,
                role,
                {m: [] for m in MODES},
                {m: [] for m in MODES},
                use(patched if k == "gpustat" else original),
            )
            for k, label, fn, role in rows
        ],
        lib,
        clock,
    )


def run(rounds: int, warmup: int) -> dict[str, Any]:
    """Measure all candidates in both clock modes; return the JSON payload."""
    candidates, lib, clock = build_candidates()
    for c in candidates:
        c.enter()
        c.nvml_calls = count_nvml_calls(lib, c.fn)
        for _ in range(warmup):
            c.fn()
    n = len(candidates)
    for r in range(rounds):
        for j in range(n):
            c = candidates[(r + j) % n]
            c.enter()
            for mode in MODES:
                clock.live = mode == "live"
                cpu, wall = measure_cpu_ns(c.fn)
                c.cpu_ns[mode].append(cpu)
                c.wall_ns[mode].append(wall)
    clock.live = True

    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for mode in MODES:
        stats: dict[str, dict[str, Any]] = {}
        for c in candidates:
            stats[c.key] = {
                "label": c.label,
                "role": c.role,
                "cpu_ms": summary([v / 1e6 for v in c.cpu_ns[mode]]),
                "wall_ms": summary([v / 1e6 for v in c.wall_ns[mode]]),
                "nvml_calls_per_sample": sum((c.nvml_calls or {}).values()),
            }
        results[mode] = stats
        ratios[mode] = {}
        for ours in ("ours_read", "ours_collect"):
            for base in ("gpustat", "nvitop_snapshot", "nvitop_all_snapshot"):
                o, b = stats[ours]["cpu_ms"], stats[base]["cpu_ms"]
                ratios[mode][f"{base}/{ours}"] = {
                    "mean": b["mean"] / o["mean"],
                    "median": b["median"] / o["median"],
                    "p95": b["p95"] / o["p95"],
                }
    goal_met = {
        mode: all(
            ratios[mode][f"{base}/ours_collect"]["mean"] >= GOAL_RATIO
            for base in ("gpustat", "nvitop_snapshot")
        )
        for mode in MODES
    }
    return {
        "params": {"gpus": GPUS, "loads": LOADS, "rounds": rounds, "warmup": warmup},
        "results": results,
        "ratios_cpu": ratios,
        "nvml_calls": {c.key: c.nvml_calls for c in candidates},
        "goal": f"GpuCollector.collect() >= {GOAL_RATIO}x cheaper (mean CPU) than gpustat and "
        "nvitop (devices kept)",
        "goal_met": goal_met,
        "notes": [
            "gpustat's time.sleep(0.1) per GPU is patched out (wall time only, no CPU).",
            "gpustat's process-wide pynvml monkeypatches are active only while gpustat runs.",
            "ours_collect is one pass of the agent's 10 Hz sampler: one FieldValues call per GPU "
            "(instant power, energy counter) every pass and a full read every tenth pass, so its "
            "median is a fast pass and its p95 a full one; the mean is the per-pass cost.",
            "live: includes the simulator's physics per read (see sim_only); frozen: the "
            "simulator's clock stands still, leaving tool + pynvml + fake-NVML dispatch cost.",
            "The tools read different amounts: ours reads power (average and instant), the energy "
            "counter, the enforced limit, both temperatures, utilization, memory, both clocks, "
            "clock-event reasons and processes; gpustat has no energy, clocks or clock events.",
        ],
    }


def report(payload: dict[str, Any]) -> str:
    """The tables printed at the end of a run."""
    out = []
    for mode in MODES:
        stats = payload["results"][mode]
        ref = stats["ours_collect"]["cpu_ms"]["mean"]
        rows = [
            [
                s["label"],
                s["cpu_ms"]["mean"],
                s["cpu_ms"]["median"],
                s["cpu_ms"]["p95"],
                s["nvml_calls_per_sample"],
                s["cpu_ms"]["mean"] / ref,
            ]
            for s in stats.values()
        ]
        out += [
            f"[{mode} clock] one full sample of {GPUS} simulated GPUs "
            f"({payload['params']['rounds']} rounds)",
            table(
                ["candidate", "CPU ms mean", "CPU ms med", "CPU ms p95", "NVML calls", "/ collect"],
                rows,
            ),
            f"CPU ratio baseline/ours [{mode}] (mean; goal >= {GOAL_RATIO:g}):",
        ]
        for key, r in payload["ratios_cpu"][mode].items():
            out.append(f"  {key:38s} {r['mean']:6.2f}x  (median {r['median']:.2f}x)")
        out.append(f"goal met [{mode}]: {payload['goal_met'][mode]}")
        out.append("")
    out.append(f"goal: {payload['goal']}")
    return "\n".join(out)


OPTIONS = (
    Option("--rounds", 400, "samples of each candidate", quick=50),
    Option("--warmup", 20),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/sample_cpu.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
