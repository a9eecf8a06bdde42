"""Dependencies flow one way (DESIGN.md), only hardware/nvml.py imports pynvml, and the
simulator stays out of the production path unless the simulated backend is chosen."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wattwarden"

# what each layer may import from wattwarden (besides itself and the top-level __init__); HTTP
# clients may import the agent's HTTP contract (api.contract) and nothing else of the API
ALLOWED = {
    "hardware": set(),
    "collectors": {"hardware"},
    "exporters": {"hardware", "collectors"},
    "policies": {"hardware", "collectors", "waterfill"},
    "api": {"hardware", "collectors", "exporters", "policies"},
    "workloads": {"hardware", "collectors", "config", "cliutil", "api.contract"},
    "dashboard": {"config"},
    # the fleet controller talks HTTP only: the agent's contract, the HTTP server for its metrics
    "fleet": {"config", "api.contract", "api.http", "waterfill"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_import_only_the_layers_below_them() -> None:
    violations = []
    for layer, allowed in ALLOWED.items():
        for path in (PACKAGE / layer).rglob("*.py"):
            for name in imports_of(path):
                parts = name.split(".")
                if parts[0] != "wattwarden" or len(parts) < 2 or parts[1] == "__init__":
                    continue
                module = ".".join(parts[1:3])  # a layer's module named alone: api.contract
                if parts[1] != layer and parts[1] not in allowed and module not in allowed:
                    violations.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert violations == []


def test_only_hardware_nvml_imports_pynvml() -> None:
    importers = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if any(n == "pynvml" or n.startswith("pynvml.") for n in imports_of(p))
    )
    assert importers == ["hardware/nvml.py"]


SIM = "wattwarden.hardware.sim"
# Layers that see GPUs only through the GpuDevice protocol, whatever backend the agent opened.
BACKEND_BLIND = ("collectors", "exporters", "policies")
BACKENDS = ("wattwarden.hardware.nvml", SIM)


def _names(path: Path) -> set[str]:
    return {n for n in imports_of(path) if n.startswith("wattwarden.")}


def test_hardware_outside_the_simulator_never_imports_it() -> None:
    importers = sorted(
        str(p.relative_to(PACKAGE))
        for p in (PACKAGE / "hardware").rglob("*.py")
        if "sim" not in p.relative_to(PACKAGE / "hardware").parts
        and any(n == SIM or n.startswith(SIM + ".") for n in _names(p))
    )
    assert importers == []


def _simulator_modules_loaded_by(module: str) -> list[str]:
    """The simulator modules a fresh interpreter holds after importing ``module``."""
    code = (
        f"import sys, {module}; "
        f"print([m for m in sorted(sys.modules) if m == {SIM!r} or m.startswith({SIM + '.'!r})])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded: list[str] = ast.literal_eval(out.stdout.strip())
    return loaded


def test_importing_the_nvml_backend_loads_no_simulator_module() -> None:
    assert _simulator_modules_loaded_by("wattwarden.hardware.nvml") == []


@pytest.mark.parametrize("entry", ["wattwarden.agent", "wattwarden.cli"])
def test_the_agent_and_the_cli_load_the_simulator_only_when_it_is_chosen(entry: str) -> None:
    # the settings offer the simulated models by name: that table (and its package's lazy
    # __init__) is all they may load
    assert _simulator_modules_loaded_by(entry) == [SIM, SIM + ".models"]


def test_collectors_exporters_and_policies_name_no_gpu_backend() -> None:
    violations = sorted(
        f"{p.relative_to(PACKAGE)} imports {n}"
        for layer in BACKEND_BLIND
        for p in (PACKAGE / layer).rglob("*.py")
        for n in _names(p)
        if any(n == b or n.startswith(b + ".") for b in BACKENDS)
    )
    assert violations == []


def test_in_policies_only_the_actuator_holds_gpu_devices() -> None:
    """Policies and the engine decide from the store; the actuator alone acts on GPUs."""
    holders = sorted(
        str(p.relative_to(PACKAGE))
        for p in (PACKAGE / "policies").rglob("*.py")
        if "wattwarden.hardware.device" in _names(p)
    )
    assert holders == ["policies/actuator.py"]
