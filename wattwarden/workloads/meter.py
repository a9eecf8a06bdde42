"""Energy measurement windows for workloads, Zeus-style.

::

    meter = EnergyMeter(gpus=[0])
    meter.begin_window("epoch")
    with meter.measure("step") as step:
        train_step()
    print(step.measurement.gpu_energy_j[0])
    epoch = meter.end_window("epoch")

Windows are named; they nest and overlap freely. A window costs one read at each end: the GPU's
hardware energy counter (``nvmlDeviceGetTotalEnergyConsumption``, one driver call per GPU), so a
window is exact however short it is. Where a GPU has no counter, a background thread integrates its
power readings instead. Without NVML in this process (the simulated fleet lives in the agent), the
agent's ``GET /api/v1/energy`` serves the counters. Host (CPU package, DRAM) energy comes from RAPL
where it is readable. The sources live in :mod:`wattwarden.workloads.energy_sources`.

Durations come from ``clock`` (monotonic); the wall clock only stamps when a window began.
GPU indices are NVML indices, as the agent numbers GPUs: ``CUDA_VISIBLE_DEVICES`` does not renumber
them (:func:`visible_gpu` maps it).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from wattwarden.collectors.rapl import DEFAULT_ROOT as RAPL_ROOT
from wattwarden.hardware.device import GpuBackend
from wattwarden.workloads.energy_sources import (
    SOURCES,
    EnergySourceError,
    RaplCounters,
    open_source,
)

__all__ = [
    "DEFAULT_POLL_INTERVAL_S",
    "SOURCES",
    "EnergyMeter",
    "EnergySourceError",
    "Measurement",
    "Window",
    "visible_gpu",
]

DEFAULT_POLL_INTERVAL_S = 0.05


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one window measured."""

    name: str
    start_s: float
    """Wall-clock (unix) time the window began."""
    elapsed_s: float
    gpu_energy_j: dict[int, float]
    """Energy per GPU index; a GPU whose energy could not be read is left out."""
    host_energy_j: dict[str, float] = field(default_factory=dict)
    """Energy per RAPL domain (``package-0``, ``package-0/dram``), where readable."""
    source: str = "none"
    """``nvml``, ``agent`` or ``none``."""

    @property
    def gpu_total_j(self) -> float | None:
        """Energy of all measured GPUs, or None when none was measured."""
        return sum(self.gpu_energy_j.values()) if self.gpu_energy_j else None

    @property
    def host_total_j(self) -> float | None:
        """Energy of the top-level RAPL domains (sub-domains such as dram are inside package)."""
        top = [v for k, v in self.host_energy_j.items() if "/" not in k]
        return sum(top) if top else None

    @property
    def cpu_energy_j(self) -> float | None:
        """Energy of the CPU packages (``package-N``; not ``psys``, which holds them), or None."""
        packages = [
            v for k, v in self.host_energy_j.items() if "/" not in k and k.startswith("package")
        ]
        return sum(packages) if packages else None


@dataclass(slots=True)
class Window:
    """A window opened by :meth:`EnergyMeter.measure`; ``measurement`` is set when it closes."""

    name: str
    measurement: Measurement | None = None


@dataclass(slots=True)  # not frozen: a frozen __init__ costs microseconds on the hot path
class _Reading:
    mono_s: float
    wall_s: float
    gpu_j: dict[int, float]
    host_j: dict[str, float]


def visible_gpu(default: int = 0) -> int:
    """The NVML index of the first GPU this process may use, from ``CUDA_VISIBLE_DEVICES``.

    Integer entries only; anything else (UUIDs, MIG names, unset) gives ``default``.
    """
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else default


class EnergyMeter:
    """Named, nestable, overlapping energy measurement windows over GPUs (and the host).

    ``source``: ``nvml`` reads the GPUs through the hardware layer in this process; ``agent``
    asks the node agent (``agent_url``, else ``$WATTWARDEN_AGENT_URL``, else the default
    loopback address); ``none`` measures time only; ``auto`` tries them in that order.
    ``sync`` is called before each read (e.g. ``torch.cuda.synchronize``), so a window holds
    the GPU work queued inside it.
    """

    def __init__(
        self,
        gpus: Sequence[int] | None = None,
        *,
        source: str = "auto",
        agent_url: str | None = None,
        host: bool = True,
        rapl_root: Path = RAPL_ROOT,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        backend_factory: Callable[[], GpuBackend] | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self._clock = clock
        self._wall = wall_clock
        self._sync = sync
        self._windows: dict[str, _Reading] = {}
        self._lock = threading.Lock()
        self._source = open_source(
            source,
            gpus,
            agent_url=agent_url,
            poll_interval_s=poll_interval_s,
            clock=clock,
            backend_factory=backend_factory,
            timeout_s=timeout_s,
        )
        self._rapl = RaplCounters(rapl_root) if host and self._source.name != "agent" else None
        self._host_enabled = host

    # ------------------------------------------------------------- properties
    @property
    def source(self) -> str:
        """``nvml``, ``agent`` or ``none``: where GPU energy comes from."""
        return self._source.name

    @property
    def gpus(self) -> tuple[int, ...]:
        """The measured GPU indices."""
        return self._source.gpus

    @property
    def rapl_readable(self) -> bool:
        """Whether this process reads host (CPU package) energy from RAPL."""
        return self._rapl is not None and self._rapl.readable

    @property
    def polled_gpus(self) -> tuple[int, ...]:
        """GPUs measured by integrating power because they have no energy counter."""
        return self._source.polled

    # ---------------------------------------------------------------- windows
    def _read(self) -> _Reading:
        if self._sync is not None:
            self._sync()
        mono, wall = self._clock(), self._wall()
        gpu = self._source.read_gpus(mono)
        host: dict[str, float] | None = None
        if self._host_enabled:
            host = self._rapl.read() if self._rapl is not None else self._source.read_host()
        return _Reading(mono, wall, gpu, host or {})

    def begin_window(self, name: str) -> None:
        """Open a window; raises ValueError if one of that name is open."""
        reading = self._read()
        with self._lock:
            if name in self._windows:
                raise ValueError(f"measurement window {name!r} is already open")
            self._windows[name] = reading

    def end_window(self, name: str) -> Measurement:
        """Close a window and return what it measured; raises ValueError if it is not open."""
        end = self._read()
        with self._lock:
            start = self._windows.pop(name, None)
        if start is None:
            raise ValueError(f"measurement window {name!r} is not open")
        return self._measurement(name, start, end)

    def lap(self, name: str) -> Measurement:
        """Close a window and reopen it at the same instant (one read per loop iteration)."""
        end = self._read()
        with self._lock:
            start = self._windows.get(name)
            if start is None:
                raise ValueError(f"measurement window {name!r} is not open")
            self._windows[name] = end
        return self._measurement(name, start, end)

    def cancel_window(self, name: str) -> None:
        """Forget an open window (no read); unknown names are ignored."""
        with self._lock:
            self._windows.pop(name, None)

    @property
    def open_windows(self) -> tuple[str, ...]:
        """Names of the windows now open."""
        with self._lock:
            return tuple(self._windows)

    @contextmanager
    def measure(self, name: str) -> Iterator[Window]:
        """Measure the ``with`` body; the yielded Window holds the measurement afterwards.

        If the body raises, the window is cancelled and the exception propagates.
        """
        window = Window(name)
        self.begin_window(name)
        try:
            yield window
        except BaseException:
            self.cancel_window(name)
            raise
        window.measurement = self.end_window(name)

    def _measurement(self, name: str, start: _Reading, end: _Reading) -> Measurement:
        gpu = {i: end.gpu_j[i] - start.gpu_j[i] for i in end.gpu_j if i in start.gpu_j}
        host = {d: end.host_j[d] - start.host_j[d] for d in end.host_j if d in start.host_j}
        return Measurement(
            name=name,
            start_s=start.wall_s,
            elapsed_s=end.mono_s - start.mono_s,
            gpu_energy_j=gpu,
            host_energy_j=host,
            source=self._source.name,
        )

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the polling thread and release NVML or the agent connection."""
        self._source.close()

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
