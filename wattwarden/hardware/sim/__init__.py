"""A physically plausible simulated GPU fleet, and a pynvml-compatible fake NVML library over it.

The names below load on first use (PEP 562), so that importing one small module of the package
(``sim.models``, the table of simulated models the agent's settings offer) does not load the
simulator itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wattwarden.hardware.sim.clock import ManualClock
    from wattwarden.hardware.sim.fleet import SimFleet
    from wattwarden.hardware.sim.gpu import SimGpu
    from wattwarden.hardware.sim.models import MODELS, GpuModelSpec

__all__ = ["MODELS", "GpuModelSpec", "ManualClock", "SimFleet", "SimGpu"]

_HOMES = {
    "MODELS": "models",
    "GpuModelSpec": "models",
    "ManualClock": "clock",
    "SimFleet": "fleet",
    "SimGpu": "gpu",
}


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
