"""The dashboard talks HTTP only: it imports nothing that reads GPUs (DESIGN.md's layering)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "wattwarden" / "dashboard"
ALLOWED_WATTWARDEN = ("wattwarden.dashboard", "wattwarden.config")
"""wattwarden modules the dashboard may import (test_layering allows the dashboard config)."""
FORBIDDEN = ("pynvml", "psutil")


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_dashboard_modules_import_only_the_dashboard_and_config_of_wattwarden() -> None:
    files = sorted(DASHBOARD.rglob("*.py"))
    assert DASHBOARD / "sources.py" in files and DASHBOARD / "views" / "gpus.py" in files
    bad = []
    for path in files:
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in FORBIDDEN or (
                top == "wattwarden"
                and name != "wattwarden"
                and not name.startswith(tuple(p for p in ALLOWED_WATTWARDEN))
            ):
                bad.append(f"{path.relative_to(DASHBOARD)} imports {name}")
    assert bad == []


PROBE = """
import importlib, json, sys
before = set(sys.modules)
import wattwarden.config
config_modules = set(sys.modules) - before
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"config": sorted(config_modules), "all": sorted(sys.modules)}))
"""


def test_importing_the_dashboard_loads_no_gpu_reader() -> None:
    modules = [
        "wattwarden.dashboard",
        "wattwarden.dashboard.settings",
        "wattwarden.dashboard.sources",
        "wattwarden.dashboard.units",
        "wattwarden.dashboard.charts",
        "wattwarden.dashboard.ui",
        *(f"wattwarden.dashboard.views.{p.stem}" for p in (DASHBOARD / "views").glob("[!_]*.py")),
    ]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    everything = set(loaded["all"])
    assert "pynvml" not in everything
    assert "wattwarden.dashboard.views.gpus" in everything  # the probe imported the pages
    # wattwarden.config reads the simulated GPU models' table; the dashboard adds no other
    # module of the hardware, collectors, exporters, policies or the API
    from_config = set(loaded["config"])
    extra = sorted(
        m
        for m in everything - from_config
        if m.startswith(("wattwarden.hardware", "wattwarden.collectors", "wattwarden.api",
                         "wattwarden.exporters", "wattwarden.policies"))
    )  # fmt: skip
    assert extra == []
    assert not any(m.startswith("wattwarden.hardware.nvml") for m in everything)
    assert not any(m.startswith("wattwarden.hardware.sim.fleet") for m in everything)
