"""Dependencies flow one way (DESIGN.md), and only hardware/nvml.py imports pynvml."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "wattwarden"

# what each layer may import from wattwarden (besides itself and the top-level __init__); HTTP
# clients may import the agent's HTTP contract (api.contract) and nothing else of the API
ALLOWED = {
    "hardware": set(),
    "collectors": {"hardware"},
    "exporters": {"hardware", "collectors"},
    "policies": {"hardware", "collectors"},
    "api": {"hardware", "collectors", "exporters", "policies"},
    "workloads": {"hardware", "collectors", "config", "cliutil", "api.contract"},
    "dashboard": {"config"},
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
