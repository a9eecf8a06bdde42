"""Shared helpers: the command line, statistics, a plain-text table, JSON results, the environment.

Each benchmark is a measure function, a report function and its options; :func:`run_benchmark`
is its ``main``: parse the options (``--quick`` swaps in smoke-run values), measure, print the
table, write ``results/<name>.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True)
class Option:
    """A benchmark's option: ``--flag`` (its type is the default's), and its value under --quick."""

    flag: str
    default: int | float
    help: str | None = None
    quick: int | float | None = None
    """The smoke-run value; None: --quick keeps the given one."""

    @property
    def dest(self) -> str:
        """The measure function's keyword for this option."""
        return self.flag.lstrip("-").replace("-", "_")


def run_benchmark(
    name: str,
    doc: str | None,
    measure: Callable[..., dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    *,
    options: Sequence[Option],
    argv: list[str] | None = None,
) -> int:
    """A benchmark's ``main``: options, measure, print the table, write ``results/<name>.json``.

    ``measure`` gets every option as a keyword argument (``--mean-gap-s`` as ``mean_gap_s``)
    and returns the payload that ``report`` prints and :func:`write_result` writes.
    """
    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    for o in options:
        parser.add_argument(o.flag, type=type(o.default), default=o.default, help=o.help)
    smoke = ", ".join(f"{o.flag} {o.quick}" for o in options if o.quick is not None)
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {smoke}")
    args = parser.parse_args(argv)
    values = {
        o.dest: o.quick if args.quick and o.quick is not None else getattr(args, o.dest)
        for o in options
    }
    payload = measure(**values)
    print(report(payload))
    path = write_result(name, payload)
    print(f"wrote {path.name} under benchmarks/results/")
    return 0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, p95, mean, min and max of a sample, plus its size."""
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A fixed-width text table; numeric columns right-aligned, text left-aligned."""
    raw = [list(row) for row in rows]
    cells = [[_cell(v) for v in row] for row in raw]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = [
        bool(raw) and all(isinstance(row[i], int | float) for row in raw)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        out = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), sep, *(line(r) for r in cells)])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def environment() -> dict[str, Any]:
    """What the figures depend on: interpreter, CPU, package versions (no paths, no host name)."""
    versions: dict[str, str | None] = {}
    for dist in ("wattwarden", "nvidia-ml-py", "prometheus-client", "psutil", "gpustat", "nvitop"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "note": "simulated GPUs (SimFleet) behind the fake libnvidia-ml; no real GPU involved",
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def command_line() -> str:
    """How this benchmark was started, as a module command line."""
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else Path(sys.argv[0]).stem
    return " ".join(["python -m", name, *sys.argv[1:]])


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` with the payload, the environment and the command line."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "command": command_line(),
        "finished_at_unix_s": round(time.time(), 3),
        "environment": environment(),
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    text = json.dumps(_finite(doc), indent=2, default=_json_default, allow_nan=False)
    path.write_text(text + "\n")
    return path


def _finite(value: Any) -> Any:
    """NaN and infinities as null: they are not JSON, and strict readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: object) -> object:
    raise TypeError(f"cannot serialise {type(value).__name__}")


def measure_cpu_ns(fn: Callable[[], object]) -> tuple[int, int]:
    """Run ``fn`` once; process CPU time and wall time it took, in ns."""
    c0, w0 = time.process_time_ns(), time.perf_counter_ns()
    fn()
    return time.process_time_ns() - c0, time.perf_counter_ns() - w0
