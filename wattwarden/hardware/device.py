"""One protocol for a GPU, and the typed records it returns.

Backends (``nvml.NvmlBackend`` on real or fake NVML, ``sim.SimBackend`` on the simulator directly)
implement :class:`GpuBackend`; everything above the hardware layer uses only these types.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Protocol

from wattwarden.hardware.errors import NotSupported


class ClockEvent(IntFlag):
    """NVML clock-event (throttle) reason bits that wattwarden exports."""

    IDLE = 0x1
    SW_POWER_CAP = 0x4
    HW_SLOWDOWN = 0x8
    SW_THERMAL = 0x20
    HW_THERMAL = 0x40
    HW_POWER_BRAKE = 0x80


#: Label value for each exported clock-event reason, in export order.
CLOCK_EVENT_LABELS: tuple[tuple[ClockEvent, str], ...] = (
    (ClockEvent.IDLE, "idle"),
    (ClockEvent.SW_POWER_CAP, "sw_power_cap"),
    (ClockEvent.HW_SLOWDOWN, "hw_slowdown"),
    (ClockEvent.SW_THERMAL, "sw_thermal"),
    (ClockEvent.HW_THERMAL, "hw_thermal"),
    (ClockEvent.HW_POWER_BRAKE, "hw_power_brake"),
)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What does not change while a GPU is attached."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    driver_version: str
    memory_total_bytes: int | None
    power_limit_min_w: float | None
    power_limit_max_w: float | None
    power_limit_default_w: float | None
    temperature_slowdown_c: float | None = None
    """Hardware slowdown threshold (NVML threshold 1): above it the board halves its clocks."""
    temperature_max_operating_c: float | None = None
    """GPU max operating temperature (NVML threshold 3): software thermal slowdown starts here."""


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """One process's use of a GPU, where the driver reports it."""

    pid: int
    memory_used_bytes: int | None
    sm_utilization_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One batched read of a GPU. ``None`` means the device does not support that field."""

    power_w: float | None
    """The driver's power reading (a 1 s average on Ampere and newer)."""
    power_instant_w: float | None
    energy_j: float | None
    """Hardware energy counter since the driver was loaded."""
    power_limit_w: float | None
    """The enforced limit, which can be lower than the requested one."""
    temperature_gpu_c: float | None
    temperature_memory_c: float | None
    utilization_gpu_ratio: float | None
    utilization_memory_ratio: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    clock_sm_hz: float | None
    clock_memory_hz: float | None
    clock_event_mask: int | None
    processes: tuple[ProcessUsage, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class PowerReading:
    """The fast-changing part of a reading, read at the full sampling rate."""

    power_instant_w: float | None
    energy_j: float | None
    power_w: float | None = None
    """The averaged reading, only where the instant field is missing."""


@dataclass(frozen=True, slots=True)
class XidEvent:
    """An XID error reported by the driver for one GPU."""

    gpu_index: int
    xid: int


class GpuDevice(Protocol):
    """One GPU. Reads raise :class:`~wattwarden.hardware.errors.GpuLost` when it is gone."""

    @property
    def index(self) -> int:
        """The GPU's index as NVML numbers it."""
        ...

    def info(self) -> GpuInfo:
        """Static facts, read once and cached."""
        ...

    def read(self) -> GpuReading:
        """One batched read of everything that changes."""
        ...

    def read_power(self) -> PowerReading:
        """Only power and energy: one batched driver call, cheap enough for every tick."""
        ...

    def read_energy_j(self) -> float:
        """Only the hardware energy counter (J since the driver loaded): one cheap driver call.

        Raises :class:`~wattwarden.hardware.errors.NotSupported` where the GPU has no counter.
        """
        ...

    def read_power_limit_w(self) -> float:
        """Only the enforced power limit, in W: one driver call.

        Raises :class:`~wattwarden.hardware.errors.NotSupported` where the GPU cannot report it.
        """
        ...

    def set_power_limit(self, watts: float) -> float:
        """Request a power limit and return the enforced limit read back afterwards.

        Where the driver took the limit but cannot report the enforced one (NotSupported on the
        read), the requested limit is returned: the change was made, and saying it failed would
        hide a cap that is in place.
        """
        ...


class GpuBackend(Protocol):
    """A source of GPUs: NVML (real or fake) or the simulator read directly."""

    @property
    def name(self) -> str:
        """Short name for logs and labels, e.g. ``nvml`` or ``sim``."""
        ...

    def devices(self) -> Sequence[GpuDevice]:
        """The GPUs, in index order."""
        ...

    def drain_xid_events(self) -> list[XidEvent]:
        """XID events that arrived since the last call (never blocks)."""
        ...

    def close(self) -> None:
        """Release the driver."""
        ...


def limit_milliwatts(watts: float) -> int:
    """A power limit in the driver's whole milliwatts, never above the watts asked.

    A limit is a ceiling someone sized to fit a budget: rounding it up (200.3445 W to 200345 mW)
    could carry a node a fraction of a watt over that budget, so it is rounded down. Float noise
    (a limit of 250 W computed as 249.99999999999997) is forgiven, so whole watts stay whole.
    """
    return math.floor(watts * 1000 + 1e-6)


def enforced_or_requested(read_enforced_w: Callable[[], float], requested_mw: int) -> float:
    """After a set: the enforced limit read back, in W, else the requested one.

    Where the driver cannot report the enforced limit the set still went through: saying it
    failed would hide a cap that is in place.
    """
    try:
        return read_enforced_w()
    except NotSupported:
        return requested_mw / 1000.0
