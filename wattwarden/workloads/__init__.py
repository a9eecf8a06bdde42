"""Workloads: EnergyMeter windows, reference PyTorch jobs, checkpoints, the job supervisor.

``from wattwarden.workloads import EnergyMeter`` is the public entry point; names load on first
use, so the command line can register its workload commands without loading the meter (or torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wattwarden.workloads.meter import EnergyMeter, EnergySourceError, Measurement, Window

__all__ = ["EnergyMeter", "EnergySourceError", "Measurement", "Window"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("wattwarden.workloads.meter"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
