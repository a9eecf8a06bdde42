"""Run every benchmark, each in a fresh interpreter, then print the goals they report.

Each benchmark installs the fake libnvidia-ml below pynvml for its whole process (and gpustat
patches pynvml when imported), so they never share a process.

    python -m benchmarks.run_all [--quick] [--only sample_cpu,metrics_render]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR

BENCHMARKS = (
    "sample_cpu",
    "metrics_render",
    "energy_accuracy",
    "agent_overhead",
    "profile_sampler",
    "bench_energymeter",
    "bench_train_overhead",
    "http_load",
    "tuner_vs_zeus",
    "policy_vs_uniform",
    "engine_timing",
    "dashboard_render",
    "fleet_pushes",
    "fleet_decision",
    "fleet_trace",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks in order; non-zero exit if any of them failed to run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke runs of each")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    args = parser.parse_args(argv)
    selected = [b for b in args.only.split(",") if b] or list(BENCHMARKS)
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    failed = []
    for name in selected:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if args.quick else [])]
        print(f"\n=== {name}: {' '.join(['python', *cmd[1:]])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd, cwd=REPO_ROOT)
        print(f"=== {name}: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)

    print("\nGoals reported (see benchmarks/results/*.json for the figures):")
    for name in selected:
        path = RESULTS_DIR / f"{name}.json"
        if name in failed or not path.exists():
            print(f"  {name:16s} FAILED to run")
            continue
        doc = json.loads(path.read_text())
        if "goal_met" in doc:
            print(f"  {name:16s} {doc['goal_met']}  -- {doc['goal']}")
        else:
            print(f"  {name:16s} (no goal: a measurement)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
