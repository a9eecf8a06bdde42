"""A physically plausible simulated GPU fleet, and a pynvml-compatible fake NVML library over it."""

from wattwarden.hardware.sim.clock import ManualClock
from wattwarden.hardware.sim.fleet import SimFleet
from wattwarden.hardware.sim.gpu import SimGpu
from wattwarden.hardware.sim.models import MODELS, GpuModelSpec

__all__ = ["MODELS", "GpuModelSpec", "ManualClock", "SimFleet", "SimGpu"]
