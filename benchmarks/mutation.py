"""Mutation testing of the modules that act on GPUs and report energy (mutmut).

mutmut puts one small bug at a time into the modules named in ``[tool.mutmut]`` of pyproject.toml
(a flipped comparison, a changed constant, a dropped argument ...) and runs the tests that reach
the mutated function; a mutant the tests do not notice "survives". This script runs mutmut, then
reads its per-file results and writes the score per module (and per function) to
``benchmarks/results/mutation.json``, with every survivor named so each can be looked at
(``mutmut show NAME``).

    python -m benchmarks.mutation                       # run all, then report
    python -m benchmarks.mutation --only actuator       # one module (substring of its name)
    python -m benchmarks.mutation --report-only         # re-read the last run

Not part of CI (it takes tens of minutes on 2 cores); run it after changing these modules.
Score = killed / (killed + survived + no tests - equivalent), where a timeout or a type-check
failure counts as killed (the mutant was caught), "no tests" counts against (nothing reaches that
code), and a survivor listed in ``benchmarks/mutation_equivalent.toml`` with the reason it cannot
change behaviour (e.g. a cache size, a log's wording) is left out. The raw score is kept beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import table, write_result

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"
GOALS = {
    "wattwarden/policies/actuator.py": 0.90,
    "wattwarden/policies/engine.py": 0.90,
    "wattwarden/policies/control.py": 0.90,
    "wattwarden/policies/manual.py": 0.90,
    "wattwarden/api/server.py": 0.90,
    "wattwarden/api/auth.py": 0.90,
    "wattwarden/api/contract.py": 0.90,
    "wattwarden/api/webconfig.py": 0.90,
    "wattwarden/collectors/metrics.py": 0.80,
    "wattwarden/collectors/jobs.py": 0.80,
    "wattwarden/collectors/store.py": 0.80,
    "wattwarden/exporters/prometheus.py": 0.80,
}
"""Modules under mutation testing, and the share of their mutants the tests must kill."""

# mutmut's exit-code classes (mutmut.stats.status_by_exit_code)
_CAUGHT = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
           255: "timeout", 37: "caught by type check", -11: "segfault", -9: "segfault"}  # fmt: skip
_MISSED = {0: "survived", 5: "no tests", 33: "no tests"}


def module_key(mutant: str) -> tuple[str, str]:
    """``wattwarden.policies.actuator.xǁLimitActuatorǁset_limit__mutmut_3`` -> (path, function)."""
    head, _, _ = mutant.rpartition("__mutmut_")
    parts = head.split(".")
    for i, part in enumerate(parts):
        if part.startswith(("x_", "xǁ")):
            module = "/".join(parts[:i]) + ".py"
            function = ".".join(parts[i:])
            function = function.removeprefix("x_").removeprefix("xǁ").replace("ǁ", ".")
            return module, function
    return "/".join(parts[:-1]) + ".py", parts[-1]


def equivalents() -> dict[str, dict[str, str]]:
    """Survivors judged equivalent, by module: {mutant name: why it cannot change behaviour}."""
    if not EQUIVALENT.exists():
        return {}
    return {m: dict(v) for m, v in tomllib.loads(EQUIVALENT.read_text()).items()}


def collect(only: str | None) -> dict[str, Any]:
    """Per-module and per-function counts from mutmut's ``.meta`` files."""
    modules: dict[str, Any] = {}
    judged_equivalent = equivalents()
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        source = str(meta.relative_to(MUTANTS))[: -len(".meta")]
        if source not in GOALS or (only and only not in source):
            continue
        data = json.loads(meta.read_text())
        counts: Counter[str] = Counter()
        by_function: dict[str, Counter[str]] = {}
        survivors: list[str] = []
        equivalent = judged_equivalent.get(source, {})
        for mutant, code in sorted(data["exit_code_by_key"].items()):
            status = "caught" if code in _CAUGHT else _MISSED.get(code, f"other:{code}")
            if code in _MISSED and mutant in equivalent:
                status = "equivalent"
            counts[status] += 1
            _, function = module_key(mutant)
            by_function.setdefault(function, Counter())[status] += 1
            if status in _MISSED.values():
                survivors.append(mutant)
        modules[source] = {
            "goal": GOALS[source],
            **_score(counts),
            "functions": {f: _score(c) for f, c in sorted(by_function.items())},
            "survivors": survivors,
            "equivalent_mutants": {
                m: why for m, why in equivalent.items() if m in data["exit_code_by_key"]
            },
        }
    return modules


def _score(counts: Counter[str]) -> dict[str, Any]:
    caught = counts["caught"]
    judged = caught + counts["survived"] + counts["no tests"]
    return {
        "mutants": sum(counts.values()),
        "killed": caught,
        "survived": counts["survived"],
        "no_tests": counts["no tests"],
        "equivalent": counts["equivalent"],
        "not_run": sum(v for k, v in counts.items() if k.startswith("other")),
        "score": round(caught / judged, 4) if judged else None,
        "raw_score": round(caught / (judged + counts["equivalent"]), 4) if judged else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="substring of the module path to run and report")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--report-only", action="store_true", help="read the last run")
    args = parser.parse_args()

    elapsed = None
    if not args.report_only:
        cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
        if args.only:
            dotted = args.only.replace("/", ".").removesuffix(".py")
            cmd.append(f"*{dotted}*")
        started = time.monotonic()
        print("$", " ".join(cmd), flush=True)
        run = subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        elapsed = time.monotonic() - started
        if run.returncode not in (0, 1):
            print(f"mutmut exited {run.returncode}", file=sys.stderr)
            return 1

    modules = collect(args.only)
    if not modules:
        print("no mutmut results for these modules; run without --report-only", file=sys.stderr)
        return 1
    rows = [
        (m, r["mutants"], r["killed"], r["survived"], r["no_tests"], r["equivalent"],
         f"{100 * (r['score'] or 0):.1f}%", f"{100 * r['goal']:.0f}%")
        for m, r in modules.items()
    ]  # fmt: skip
    headers = ["module", "mutants", "killed", "survived", "no tests", "equivalent", "score", "goal"]
    print(table(headers, rows))

    path = ROOT / "benchmarks" / "results" / "mutation.json"
    last = json.loads(path.read_text()) if path.exists() else {}
    previous, previous_runs = last.get("modules", {}), last.get("elapsed_s_by_run", {})
    payload = {
        "tool": "mutmut",
        "max_children": args.max_children,
        "elapsed_s_by_run": {**previous_runs, **({args.only or "all": elapsed} if elapsed else {})},
        "modules": {**previous, **modules},
    }
    print(f"wrote {write_result('mutation', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
