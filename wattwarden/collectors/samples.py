"""The GPU sample, which the store keeps in windows and history.

Other samples live with their collector (e.g. :mod:`wattwarden.collectors.host`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wattwarden.hardware.device import GpuInfo, GpuReading


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU after one collection pass."""

    info: GpuInfo
    up: bool
    timestamp_s: float
    """Wall-clock time of the read."""
    reading: GpuReading | None
    """The latest full reading (its power and energy fields are that read's; this pass's are
    ``power_w`` and ``energy_j``); kept (stale) while the GPU is lost, None if never read."""
    energy_j: float
    """Monotonic energy counter for export (hardware counter deltas, else integrated power)."""
    energy_source: str
    """``counter`` or ``integrated``."""
    power_w: float | None = None
    """Power this pass (the exported gauge's input); None when nothing gives it now."""
    power_source: str | None = None
    """Where ``power_w`` came from: ``instant`` (the instant field), ``average`` (the driver's
    averaged reading), ``counter`` (the energy counter's delta over the pass, where neither
    power field can be read), or None."""
    read_mono_s: float | None = None
    """Monotonic time of the read that gave ``energy_j`` (None if never read)."""
    slow_read_mono_s: float | None = None
    """Monotonic time of the full read that gave the slow fields (utilization, temperatures,
    clocks, processes...); they hold that value until the next full read."""
    clock_event_seconds: dict[str, float] = field(default_factory=dict)
    xid_counts: dict[int, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """One sample per GPU index."""
        return str(self.info.index)
