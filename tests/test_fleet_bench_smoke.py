"""The fleet benchmarks run end to end at a small size (their figures are in benchmarks/results).

Each runs in a child interpreter started at the repository root (where the ``benchmarks``
package is importable), through its ``run`` function, so no result file is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _child(script: str) -> Any:
    """Run ``script`` at the repository root; the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_fleet_decision_times_every_part_of_a_period_on_a_small_fleet() -> None:
    out = _child(
        "import json\n"
        "from benchmarks import fleet_decision as fd\n"
        "p = fd.run(nodes=20, periods=3, seed=1)\n"
        "full, tenth = p['results']\n"
        "print(json.dumps({'nodes': [full['nodes'], tenth['nodes']], 'periods': full['periods'],"
        " 'parts': sorted(full['parts_ms']), 'expected': sorted(fd.PARTS),"
        " 'leased': full['leased_w_at_end'], 'budget': full['budget_w'],"
        " 'report': fd.report(p)}))\n"
    )
    assert (out["nodes"], out["periods"]) == ([20, 2], 3)
    assert out["parts"] == out["expected"]
    assert 0 < out["leased"] <= out["budget"] + 1e-6
    assert "GPUs, period: goal" in out["report"]


def test_fleet_trace_controller_keeps_the_cluster_under_a_budget_that_binds() -> None:
    out = _child(
        "import json\n"
        "from benchmarks import fleet_trace as ft\n"
        "from wattwarden.hardware.sim.models import MODELS\n"
        "nodes, seconds = 6, 1800\n"
        "budget = 0.5 * nodes * ft.GPUS_PER_NODE * MODELS[ft.MODEL].power_default_w\n"
        "print(json.dumps({s: ft.replay(s, nodes, seconds, budget, seed=4)"
        " for s in ('controller', 'uncapped')}))\n"
    )
    assert out["uncapped"]["over_budget_pct"] > 0  # the budget binds on this trace
    assert out["controller"]["over_budget_pct"] == 0.0
    assert out["controller"]["lease_changes_per_node_hour"] > 0
