"""Host CPU utilization and memory through psutil."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil

from wattwarden.collectors.base import CollectorSettings, Registration
from wattwarden.collectors.metrics import MetricSpec, one


@dataclass(frozen=True, slots=True)
class HostSample:
    """Host CPU and memory."""

    timestamp_s: float
    cpu_utilization_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int

    @property
    def key(self) -> str:
        """One sample per host."""
        return ""


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


HOST_METRICS: tuple[MetricSpec[HostSample], ...] = (
    MetricSpec(
        "host_cpu_utilization_ratio",
        "gauge",
        "Host CPU utilization, all cores.",
        one(lambda h: h.cpu_utilization_ratio),
        json="cpu_utilization_ratio",
    ),
    MetricSpec(
        "host_memory_used_bytes",
        "gauge",
        "Host memory in use (total - available).",
        one(lambda h: h.memory_used_bytes),
        json="memory_used_bytes",
    ),
    MetricSpec(
        "host_memory_total_bytes",
        "gauge",
        "Host memory in total.",
        one(lambda h: h.memory_total_bytes),
        json="memory_total_bytes",
    ),
)


def _open(settings: CollectorSettings) -> HostCollector:
    return HostCollector()


REGISTRATION = Registration("host", True, _open, HostSample, HOST_METRICS)
