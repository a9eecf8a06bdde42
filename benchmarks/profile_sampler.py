"""Where a sampler pass spends its CPU: an in-process Sampler, as the agent wires it, profiled.

The agent's sampler (GpuCollector over the fake NVML on 8 simulated GPUs, plus the host collector)
runs in this process at its real pace (one pass per ``--interval-ms``, sleeping in between as the
agent does; caches go cold between passes, as in the agent). Two phases:

1. unprofiled: CPU per pass (``time.thread_time``, this thread only), paced and back-to-back;
2. under cProfile: own time (tottime) grouped by layer -- simulator physics, fake libnvidia-ml,
   pynvml, our NVML backend, collectors, store, psutil -- and the top functions.

The layers "simulator" and "fake NVML" stand in for the driver: on a real GPU they are replaced by
NVML's own cost. Everything else would run unchanged on metal.

    python -m benchmarks.profile_sampler [--passes 200] [--interval-ms 100] [--quick]
"""

from __future__ import annotations

import cProfile
import pstats
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Option, run_benchmark, summary, table
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.host import HostCollector
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml
from wattwarden.hardware.sim.fleet import SimFleet

NAME = "profile_sampler"
GPUS = 8
LOADS = (0.97, 0.95, 0.92, 0.9, 0.75, 0.5, 0.2, 0.0)

# (layer, predicate on the profiled function's file), first match wins
_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("simulator physics (sim/gpu.py, fleet.py)", ("wattwarden/hardware/sim/gpu.py",)),
    ("fake libnvidia-ml (sim/fake_nvml.py)", ("wattwarden/hardware/sim/fake_nvml.py",)),
    ("our NVML backend (hardware/nvml.py)", ("wattwarden/hardware/nvml.py",)),
    ("GpuCollector (collectors/gpu.py)", ("wattwarden/collectors/gpu.py",)),
    ("store (collectors/store.py)", ("wattwarden/collectors/store.py",)),
    ("sampler + other collectors", ("wattwarden/collectors/",)),
    ("other wattwarden", ("wattwarden/",)),
    ("pynvml (nvidia-ml-py)", ("pynvml.py",)),
    ("ctypes", ("ctypes/",)),
    ("psutil", ("psutil/",)),
    ("dataclasses / generated __init__", ("<string>",)),
)


def _short(path: str) -> str:
    """A path without the machine-specific prefix: from the package or file name on."""
    p = path.replace("\\", "/")
    for anchor in ("wattwarden/", "site-packages/", "lib/python"):
        i = p.rfind(anchor)
        if i >= 0:
            rest = p[i + len(anchor) :] if anchor != "wattwarden/" else p[i:]
            return rest.split("/", 1)[1] if anchor == "lib/python" and "/" in rest else rest
    return Path(p).name if "/" in p else p


def _layer(path: str) -> str:
    p = path.replace("\\", "/")
    if p.startswith("~") or p.startswith("<built-in") or p == "~":
        return "builtins (C functions)"
    for layer, needles in _LAYERS:
        if any(n in p for n in needles):
            return layer
    return "other (stdlib, threading, ...)"


def build(interval_s: float) -> Sampler:
    """The agent's sampler over a loaded simulated fleet behind the fake NVML."""
    fleet = SimFleet(GPUS, seed=2)
    for gpu, load in zip(fleet.gpus, LOADS, strict=True):
        gpu.set_load(load)
    install_fake_nvml(fleet)
    store = MetricStore(window_s=15.0, interval_s=interval_s)
    return Sampler(store, [GpuCollector(NvmlBackend()), HostCollector()], interval_s=interval_s)


def paced(
    sampler: Sampler,
    passes: int,
    interval_s: float,
    pace: bool,
    profiler: cProfile.Profile | None = None,
) -> list[float]:
    """CPU ms of each pass on this thread, sleeping to the next tick in between when ``pace``.

    With a profiler, only the passes are profiled, not the sleeps between them.
    """
    stop = threading.Event()
    out = []
    next_at = time.monotonic()
    for _ in range(passes):
        c0 = time.thread_time_ns()
        if profiler is not None:
            profiler.enable()
        sampler.run_once()
        if profiler is not None:
            profiler.disable()
        out.append((time.thread_time_ns() - c0) / 1e6)
        if pace:
            next_at += interval_s
            stop.wait(max(0.0, next_at - time.monotonic()))
    return out


def run(passes: int, interval_ms: int, top: int) -> dict[str, Any]:
    """Both phases; the JSON payload."""
    interval_s = interval_ms / 1000.0
    sampler = build(interval_s)
    for _ in range(10):
        sampler.run_once()
    per_pass_paced = paced(sampler, passes, interval_s, pace=True)
    per_pass_tight = paced(sampler, passes, interval_s, pace=False)

    profiler = cProfile.Profile()
    per_pass_profiled = paced(sampler, passes, interval_s, pace=True, profiler=profiler)
    stats = pstats.Stats(profiler)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    layers: dict[str, float] = {}
    funcs: list[dict[str, Any]] = []
    for (path, line, name), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        layers[_layer(path)] = layers.get(_layer(path), 0.0) + tottime
        funcs.append(
            {
                "function": f"{_short(path)}:{line}({name})",
                "layer": _layer(path),
                "calls_per_pass": ncalls / passes,
                "own_ms_per_pass": 1e3 * tottime / passes,
                "cum_ms_per_pass": 1e3 * cumtime / passes,
            }
        )
    funcs.sort(key=lambda f: -f["own_ms_per_pass"])
    by_cum = sorted(funcs, key=lambda f: -f["cum_ms_per_pass"])
    sampler.close()
    return {
        "params": {"gpus": GPUS, "loads": LOADS, "passes": passes, "interval_ms": interval_ms},
        "cpu_ms_per_pass": {
            "paced": summary(per_pass_paced),
            "back_to_back": summary(per_pass_tight),
        },
        "projected_cpu_pct_of_one_core_at_interval": 100.0
        * summary(per_pass_paced)["mean"]
        / interval_ms,
        "profile_total_ms_per_pass": 1e3 * total / passes,
        "layers_share_pct": {
            k: 100.0 * v / total for k, v in sorted(layers.items(), key=lambda kv: -kv[1])
        },
        "top_own_time": funcs[:top],
        "top_cumulative": by_cum[:top],
        "profiled_cpu_ms_per_pass": summary(per_pass_profiled),
        "notes": [
            "cProfile inflates absolute times (compare profiled_cpu_ms_per_pass with "
            "cpu_ms_per_pass.paced); use the shares, and the unprofiled figures as absolutes.",
        ],
    }


def report(payload: dict[str, Any]) -> str:
    """The tables printed at the end of a run."""
    p = payload["params"]
    cpp = payload["cpu_ms_per_pass"]
    out = [
        f"Sampler pass, {p['gpus']} simulated GPUs via fake NVML, {p['passes']} passes",
        table(
            ["pacing", "CPU ms/pass med", "p95", "mean"],
            [
                [
                    f"paced every {p['interval_ms']} ms",
                    *(cpp["paced"][k] for k in ("median", "p95", "mean")),
                ],
                ["back to back", *(cpp["back_to_back"][k] for k in ("median", "p95", "mean"))],
            ],
        ),
        f"projected sampler share at {p['interval_ms']} ms: "
        f"{payload['projected_cpu_pct_of_one_core_at_interval']:.2f}% of one core",
        "",
        "Own time by layer (cProfile):",
        table(["layer", "% of pass"], [[k, v] for k, v in payload["layers_share_pct"].items()]),
        "",
        "Top functions by own time:",
        table(
            ["function", "calls/pass", "own ms/pass", "cum ms/pass"],
            [
                [f["function"], f["calls_per_pass"], f["own_ms_per_pass"], f["cum_ms_per_pass"]]
                for f in payload["top_own_time"][:15]
            ],
        ),
    ]
    return "\n".join(out)


OPTIONS = (
    Option("--passes", 200, quick=50),
    Option("--interval-ms", 100),
    Option("--top", 30),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/profile_sampler.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
