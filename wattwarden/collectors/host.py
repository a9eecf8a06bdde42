"""Host CPU utilization and memory through psutil."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import psutil

from wattwarden.collectors.samples import HostSample


class HostCollector:
    """CPU utilization since the previous pass, and memory in use."""

    name = "host"

    def __init__(self, *, interval_s: float = 1.0, wall: Callable[[], float] = time.time) -> None:
        self.interval_s: float | None = interval_s
        self._wall = wall
        psutil.cpu_percent(interval=None)  # prime: the first call has no previous pass to compare

    def collect(self) -> Sequence[HostSample]:
        """One sample."""
        mem = psutil.virtual_memory()
        return [
            HostSample(
                timestamp_s=self._wall(),
                cpu_utilization_ratio=psutil.cpu_percent(interval=None) / 100.0,
                memory_used_bytes=int(mem.total - mem.available),
                memory_total_bytes=int(mem.total),
            )
        ]

    def close(self) -> None:
        """Nothing to release."""
