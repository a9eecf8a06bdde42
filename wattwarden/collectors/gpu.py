"""The GPU collector: reads every GPU of a backend, keeps energy and clock-event counters."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wattwarden.collectors.samples import GpuSample
from wattwarden.hardware.device import (
    CLOCK_EVENT_LABELS,
    GpuBackend,
    GpuDevice,
    GpuInfo,
    GpuReading,
)
from wattwarden.hardware.errors import GpuLost, HardwareError

log = logging.getLogger(__name__)

DEFAULT_FULL_INTERVAL_S = 1.0
"""Temperatures, utilization, memory, clocks, clock events, limits and processes are read this
often; power and energy on every pass (they are what sub-second sampling is for)."""


class PartialCollectionError(Exception):
    """Some sources failed while others were read; carries what was read."""

    def __init__(self, samples: Sequence[GpuSample], errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.samples = samples
        self.errors = errors


@dataclass(slots=True)
class _Track:
    """What the collector remembers about one GPU between passes."""

    device: GpuDevice
    info: GpuInfo
    info_complete: bool
    up: bool = True
    reading: GpuReading | None = None
    read_at_s: float = 0.0
    last_mono_s: float | None = None
    full_due_s: float = 0.0
    slow_mono_s: float | None = None
    power_w: float | None = None
    power_source: str | None = None
    last_counter_j: float | None = None
    last_power_w: float | None = None
    energy_j: float = 0.0
    energy_source: str = "counter"
    events_s: dict[str, float] = field(
        default_factory=lambda: {n: 0.0 for _, n in CLOCK_EVENT_LABELS}
    )
    xids: dict[int, int] = field(default_factory=dict)


def _placeholder_info(index: int) -> GpuInfo:
    return GpuInfo(
        index, f"unknown-{index}", "unknown", "unknown", "unknown", None, None, None, None
    )


class GpuCollector:
    """Reads all GPUs of a backend each pass; a lost GPU is reported down, the others go on.

    Two tiers: every pass reads power and energy (one batched call per GPU); a full read of
    everything else happens every ``full_interval_s``.
    """

    name = "gpu"
    interval_s: float | None = None

    def __init__(
        self,
        backend: GpuBackend,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        full_interval_s: float = DEFAULT_FULL_INTERVAL_S,
    ) -> None:
        self.backend = backend
        self._full_interval_s = full_interval_s
        self._monotonic = monotonic
        self._wall = wall
        self._tracks: list[_Track] = []
        self.latest: Sequence[GpuSample] = ()
        """Samples of the last pass (for attribution hooks)."""
        for device in backend.devices():
            try:
                info, complete = device.info(), True
            except HardwareError as e:
                log.warning("GPU %d: cannot read its identity yet: %s", device.index, e)
                info, complete = _placeholder_info(device.index), False
            self._tracks.append(_Track(device=device, info=info, info_complete=complete))

    @property
    def gpu_count(self) -> int:
        """How many GPUs the backend enumerated."""
        return len(self._tracks)

    def infos(self) -> list[GpuInfo]:
        """Identity of each GPU, in index order."""
        return [t.info for t in self._tracks]

    def collect(self) -> Sequence[GpuSample]:
        """Read every GPU once. Raises PartialCollectionError (with the samples) on errors."""
        errors: list[str] = []
        try:
            for event in self.backend.drain_xid_events():
                if 0 <= event.gpu_index < len(self._tracks):
                    xids = self._tracks[event.gpu_index].xids
                    xids[event.xid] = xids.get(event.xid, 0) + 1
                    log.warning("GPU %d: XID %d", event.gpu_index, event.xid)
        except HardwareError as e:
            errors.append(f"XID events: {e}")
        samples = []
        for track in self._tracks:
            try:
                self._read(track)
            except GpuLost as e:
                if track.up:
                    log.error("GPU %d (%s) is lost: %s", track.info.index, track.info.uuid, e)
                track.up = False
            except HardwareError as e:
                errors.append(f"GPU {track.info.index}: {e}")
            samples.append(
                GpuSample(
                    info=track.info,
                    up=track.up,
                    timestamp_s=track.read_at_s,
                    reading=track.reading,
                    energy_j=track.energy_j,
                    energy_source=track.energy_source,
                    power_w=track.power_w if track.up else None,
                    power_source=track.power_source if track.up else None,
                    read_mono_s=track.last_mono_s,
                    slow_read_mono_s=track.slow_mono_s,
                    clock_event_seconds=dict(track.events_s),
                    xid_counts=dict(track.xids),
                )
            )
        self.latest = samples
        if errors:
            raise PartialCollectionError(samples, errors)
        return samples

    def _read(self, track: _Track) -> None:
        if not track.info_complete:
            track.info = track.device.info()
            track.info_complete = True
        now = self._monotonic()
        full = track.reading is None or not track.up or now >= track.full_due_s
        if full:
            reading = track.device.read()
            track.full_due_s = now + self._full_interval_s
            instant, average, counter = reading.power_instant_w, reading.power_w, reading.energy_j
        else:  # fast tier: power and energy only; the last full reading keeps the slow fields
            assert track.reading is not None
            reading = track.reading
            fast = track.device.read_power()
            instant, average, counter = fast.power_instant_w, fast.power_w, fast.energy_j
        if not track.up:
            log.warning("GPU %d (%s) is back", track.info.index, track.info.uuid)
        track.up = True
        if full:
            track.slow_mono_s = now
        # Only what this pass read: a power field that stops answering must not leave its last
        # value behind (the fast tier would otherwise carry the last full read's average).
        power = instant if instant is not None else average
        dt = 0.0 if track.last_mono_s is None else max(0.0, now - track.last_mono_s)
        if power is not None:
            track.power_w = power
            track.power_source = "instant" if instant is not None else "average"
        elif (
            counter is not None
            and track.last_counter_j is not None
            and counter >= track.last_counter_j
            and dt > 0
        ):
            track.power_w, track.power_source = (counter - track.last_counter_j) / dt, "counter"
        else:
            track.power_w, track.power_source = None, None
        if (
            counter is not None
            and track.last_counter_j is not None
            and counter >= track.last_counter_j
        ):
            track.energy_j += counter - track.last_counter_j
            track.energy_source = "counter"
        elif power is not None and dt > 0:
            previous = track.last_power_w if track.last_power_w is not None else power
            track.energy_j += 0.5 * (previous + power) * dt
            track.energy_source = "counter" if counter is not None else "integrated"
        elif counter is None:
            track.energy_source = "integrated"
        mask = reading.clock_event_mask
        if mask and dt > 0:
            for bit, label in CLOCK_EVENT_LABELS:
                if mask & bit:
                    track.events_s[label] += dt
        track.last_counter_j = counter
        track.last_power_w = power
        track.last_mono_s = now
        track.reading = reading
        track.read_at_s = self._wall()

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()
