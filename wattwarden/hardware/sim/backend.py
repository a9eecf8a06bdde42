"""The simulator read directly through the GpuDevice protocol (no NVML in between).

The agent runs the simulated fleet through the fake NVML library and ``hardware/nvml.py``,
the same code as on metal; this backend is the reference that path is checked against,
and a light test double.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from wattwarden.hardware.device import (
    GpuInfo,
    GpuReading,
    PowerReading,
    ProcessUsage,
    XidEvent,
    enforced_or_requested,
    limit_milliwatts,
)
from wattwarden.hardware.errors import NotSupported
from wattwarden.hardware.sim.fleet import DRIVER_VERSION, SimFleet
from wattwarden.hardware.sim.gpu import SimGpu

T = TypeVar("T")


def _opt(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except NotSupported:
        return None


class SimDevice:
    """One simulated GPU behind the GpuDevice protocol."""

    def __init__(self, gpu: SimGpu) -> None:
        self._gpu = gpu

    @property
    def index(self) -> int:
        """The GPU's index."""
        return self._gpu.index

    def info(self) -> GpuInfo:
        """Static facts."""
        g = self._gpu
        max_operating, slowdown = g.temperature_thresholds_c()
        return GpuInfo(
            index=g.index,
            uuid=g.uuid,
            name=g.spec.name,
            pci_bus_id=g.pci_bus_id,
            driver_version=DRIVER_VERSION,
            memory_total_bytes=g.spec.memory_total_bytes,
            power_limit_min_w=g.spec.power_min_w,
            power_limit_max_w=g.spec.power_max_w,
            power_limit_default_w=g.spec.power_default_w,
            temperature_slowdown_c=float(slowdown),
            temperature_max_operating_c=float(max_operating),
        )

    def read(self) -> GpuReading:
        """One read of everything that changes."""
        g = self._gpu
        power = _opt(g.power_average_mw)
        instant = _opt(g.power_instant_mw)
        energy = _opt(g.total_energy_mj)
        limit = _opt(g.enforced_power_limit_mw)
        util = _opt(g.utilization_pct)
        mem = _opt(g.memory_bytes)
        sm = _opt(lambda: g.clock_mhz("sm"))
        memclk = _opt(lambda: g.clock_mhz("mem"))
        procs = _opt(g.processes) or []
        return GpuReading(
            power_w=None if power is None else power / 1000.0,
            power_instant_w=None if instant is None else instant / 1000.0,
            energy_j=None if energy is None else energy / 1000.0,
            power_limit_w=None if limit is None else limit / 1000.0,
            temperature_gpu_c=_opt(lambda: float(g.temperature_c("gpu"))),
            temperature_memory_c=_opt(lambda: float(g.temperature_c("memory"))),
            utilization_gpu_ratio=None if util is None else util[0] / 100.0,
            utilization_memory_ratio=None if util is None else util[1] / 100.0,
            memory_used_bytes=None if mem is None else mem[1],
            memory_total_bytes=None if mem is None else mem[0],
            clock_sm_hz=None if sm is None else sm * 1e6,
            clock_memory_hz=None if memclk is None else memclk * 1e6,
            clock_event_mask=_opt(g.clock_event_reasons),
            processes=tuple(
                ProcessUsage(p.pid, p.memory_bytes, round(p.utilization * 100) / 100.0)
                for p in sorted(procs, key=lambda p: p.pid)
            ),
        )

    def read_power(self) -> PowerReading:
        """Instant power and the energy counter (the average only without the instant field)."""
        g = self._gpu
        instant = _opt(g.power_instant_mw)
        energy = _opt(g.total_energy_mj)
        average = _opt(g.power_average_mw) if instant is None else None
        return PowerReading(
            power_instant_w=None if instant is None else instant / 1000.0,
            energy_j=None if energy is None else energy / 1000.0,
            power_w=None if average is None else average / 1000.0,
        )

    def read_energy_j(self) -> float:
        """The energy counter alone, in J (NotSupported where the fault says so)."""
        return self._gpu.total_energy_mj() / 1000.0

    def read_power_limit_w(self) -> float:
        """The enforced power limit alone, in W (NotSupported where the fault says so)."""
        return self._gpu.enforced_power_limit_mw() / 1000.0

    def set_power_limit(self, watts: float) -> float:
        """Set the limit and read back the enforced one (the requested one if unreadable)."""
        milliwatts = limit_milliwatts(watts)
        self._gpu.set_power_limit_mw(milliwatts)
        return enforced_or_requested(self.read_power_limit_w, milliwatts)


class SimBackend:
    """A simulated fleet behind the GpuBackend protocol."""

    name = "sim"

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self._devices = [SimDevice(g) for g in fleet.gpus]

    def devices(self) -> Sequence[SimDevice]:
        """The GPUs in index order."""
        return self._devices

    def drain_xid_events(self) -> list[XidEvent]:
        """XIDs since the last call."""
        return [XidEvent(g.index, x) for g in self.fleet.gpus for x in g.pop_xids()]

    def close(self) -> None:
        """Persist driver state."""
        self.fleet.save()
