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
where it is readable.

GPU indices are NVML indices, as the agent numbers GPUs: ``CUDA_VISIBLE_DEVICES`` does not renumber
them (:func:`visible_gpu` maps it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

from wattwarden.collectors.errors import CollectorUnavailable
from wattwarden.collectors.rapl import DEFAULT_ROOT as RAPL_ROOT
from wattwarden.collectors.rapl import RaplCollector
from wattwarden.hardware.device import GpuBackend, GpuDevice
from wattwarden.hardware.errors import HardwareError, HardwareUnavailable, NotSupported
from wattwarden.workloads.agent_client import (
    DEFAULT_AGENT_URL,
    ENV_AGENT_URL,
    AgentClient,
    AgentError,
)

log = logging.getLogger(__name__)

SOURCES = ("auto", "nvml", "agent", "none")
DEFAULT_POLL_INTERVAL_S = 0.05


class EnergySourceError(Exception):
    """The requested energy source cannot be used here; the message says why and what to do."""


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


class _Source(Protocol):
    name: str

    @property
    def gpus(self) -> tuple[int, ...]: ...

    def read_gpus(self, now_s: float) -> dict[int, float]: ...

    def read_host(self) -> dict[str, float] | None: ...

    def close(self) -> None: ...


class _OnceLogger:
    """Log each distinct problem once, so a failing read in a hot loop does not flood the log."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def warn(self, key: str, message: str, *args: object) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning(message, *args)


def visible_gpu(default: int = 0) -> int:
    """The NVML index of the first GPU this process may use, from ``CUDA_VISIBLE_DEVICES``.

    Integer entries only; anything else (UUIDs, MIG names, unset) gives ``default``.
    """
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else default


# --------------------------------------------------------------------------- NVML
@dataclass(slots=True)
class _Integrated:
    """Power integrated over time for one GPU with no energy counter."""

    device: GpuDevice
    energy_j: float
    t_s: float
    power_w: float


def _power_w(device: GpuDevice) -> float:
    reading = device.read()
    power = reading.power_instant_w if reading.power_instant_w is not None else reading.power_w
    if power is None:
        raise NotSupported(f"GPU {device.index} reports neither an energy counter nor power")
    return power


class _NvmlSource:
    """GPU energy counters through the hardware layer, with a power-polling fallback."""

    name = "nvml"

    def __init__(
        self,
        backend: GpuBackend,
        gpus: Sequence[int] | None,
        *,
        poll_interval_s: float,
        clock: Callable[[], float],
        owns_backend: bool,
    ) -> None:
        self._backend = backend
        self._owns_backend = owns_backend
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._once = _OnceLogger()
        devices = {d.index: d for d in backend.devices()}
        wanted = list(devices) if gpus is None else list(gpus)
        missing = [i for i in wanted if i not in devices]
        if missing:
            raise EnergySourceError(
                f"no GPU {missing[0]} on this host (NVML sees {len(devices)}: "
                f"{', '.join(map(str, sorted(devices))) or 'none'})"
            )
        self._counters: dict[int, GpuDevice] = {}
        self._last_j: dict[int, float] = {}
        self._last_t = clock()
        self.samples_taken = 0
        self._integrated: dict[int, _Integrated] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for i in wanted:
            try:
                devices[i].read_energy_j()
                self._counters[i] = devices[i]
            except NotSupported:
                self._start_integrating(devices[i], 0.0)
            except HardwareError as e:
                self._once.warn(f"open{i}", "GPU %d: energy not measured: %s", i, e)
                self._counters[i] = devices[i]
        self._gpus = tuple(wanted)
        self._counter_items = tuple(self._counters.items())

    @property
    def gpus(self) -> tuple[int, ...]:
        return self._gpus

    @property
    def polled(self) -> tuple[int, ...]:
        """GPUs measured by integrating power (no energy counter)."""
        with self._lock:
            return tuple(sorted(self._integrated))

    def _start_integrating(
        self, device: GpuDevice, start_j: float, since_s: float | None = None
    ) -> None:
        try:
            power = _power_w(device)
        except HardwareError as e:
            self._once.warn(
                f"power{device.index}", "GPU %d: energy not measured: %s", device.index, e
            )
            return
        log.info(
            "GPU %d has no energy counter; integrating power every %.0f ms",
            device.index,
            self._poll_interval_s * 1000,
        )
        with self._lock:
            t = self._clock() if since_s is None else since_s
            self._integrated[device.index] = _Integrated(device, start_j, t, power)
            self._counters.pop(device.index, None)
            self._counter_items = tuple(self._counters.items())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._poll_loop, name="wattwarden-energy-poll", daemon=True
                )
                self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._poll_interval_s):
            self.poll_once()

    def poll_once(self) -> None:
        """Take one power sample of every polled GPU and integrate (trapezoid rule)."""
        with self._lock:
            states = list(self._integrated.values())
        for s in states:
            try:
                power = _power_w(s.device)
            except HardwareError as e:
                self._once.warn(
                    f"poll{s.device.index}", "GPU %d: power read failed: %s", s.device.index, e
                )
                continue
            now = self._clock()
            with self._lock:
                s.energy_j += (s.power_w + power) / 2.0 * max(now - s.t_s, 0.0)
                s.t_s, s.power_w = now, power
        self.samples_taken += 1

    def read_gpus(self, now_s: float) -> dict[int, float]:
        out: dict[int, float] = {}
        for i, device in self._counter_items:
            try:
                out[i] = device.read_energy_j()
            except NotSupported:
                # The counter went away mid-run: integrate on from the last value we read.
                self._start_integrating(device, self._last_j.get(i, 0.0), self._last_t)
            except HardwareError as e:
                self._once.warn(f"read{i}", "GPU %d: energy read failed: %s", i, e)
        if self._integrated:
            now = self._clock()
            with self._lock:
                for i, s in self._integrated.items():
                    out[i] = s.energy_j + s.power_w * max(now - s.t_s, 0.0)
        self._last_j, self._last_t = out, now_s
        return out

    def read_host(self) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._owns_backend:
            self._backend.close()


# -------------------------------------------------------------------------- agent
class _AgentSource:
    """Counters read by the agent at request time (``GET /api/v1/energy``)."""

    name = "agent"

    def __init__(self, client: AgentClient, gpus: Sequence[int] | None) -> None:
        self._client = client
        self._once = _OnceLogger()
        try:
            snap = client.energy()
        except AgentError as e:
            raise EnergySourceError(str(e)) from e
        known = [g.index for g in snap.gpus]
        wanted = known if gpus is None else list(gpus)
        missing = [i for i in wanted if i not in known]
        if missing:
            raise EnergySourceError(
                f"the agent at {client.url} has no GPU {missing[0]} "
                f"(it has {len(known)}: {', '.join(map(str, known)) or 'none'})"
            )
        self._gpus = tuple(wanted)
        self._wanted = set(wanted)
        self._host: dict[str, float] = dict(snap.host_j)

    @property
    def gpus(self) -> tuple[int, ...]:
        return self._gpus

    def read_gpus(self, now_s: float) -> dict[int, float]:
        try:
            snap = self._client.energy()
        except AgentError as e:
            self._once.warn("agent", "energy not measured: %s", e)
            self._host = {}
            return {}
        self._host = dict(snap.host_j)
        return {
            g.index: g.energy_j
            for g in snap.gpus
            if g.index in self._wanted and g.energy_j is not None
        }

    def read_host(self) -> dict[str, float] | None:
        """The host counters from the same response as the last GPU read."""
        return self._host

    def close(self) -> None:
        self._client.close()


class _NoSource:
    name = "none"
    gpus: tuple[int, ...] = ()

    def read_gpus(self, now_s: float) -> dict[int, float]:
        return {}

    def read_host(self) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        pass


class _Rapl:
    """Local RAPL counters; disabled (once, with a log line) when unreadable."""

    def __init__(self, root: Path) -> None:
        self._collector: RaplCollector | None = RaplCollector(root)
        if not self._collector.available():
            self._collector = None
        else:
            self.read()

    @property
    def readable(self) -> bool:
        """Whether the counters could be read (so far)."""
        return self._collector is not None

    def read(self) -> dict[str, float]:
        if self._collector is None:
            return {}
        try:
            return {s.domain: s.energy_j for s in self._collector.collect()}
        except (CollectorUnavailable, OSError, ValueError) as e:
            log.info("host energy not measured: %s", e)
            self._collector = None
            return {}


# -------------------------------------------------------------------------- meter
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
        self._source = self._open(
            source,
            gpus,
            agent_url=agent_url,
            poll_interval_s=poll_interval_s,
            backend_factory=backend_factory,
            timeout_s=timeout_s,
        )
        self._rapl = _Rapl(rapl_root) if host and self._source.name != "agent" else None
        self._host_enabled = host

    def _open(
        self,
        source: str,
        gpus: Sequence[int] | None,
        *,
        agent_url: str | None,
        poll_interval_s: float,
        backend_factory: Callable[[], GpuBackend] | None,
        timeout_s: float,
    ) -> _Source:
        if source == "none":
            return _NoSource()
        nvml_error: Exception | None = None
        if source in ("auto", "nvml"):
            try:
                backend = backend_factory() if backend_factory is not None else _nvml_backend()
            except HardwareUnavailable as e:
                if source == "nvml":
                    raise EnergySourceError(f"no NVML here: {e}") from e
                nvml_error = e
            else:
                try:
                    return _NvmlSource(
                        backend,
                        gpus,
                        poll_interval_s=poll_interval_s,
                        clock=self._clock,
                        owns_backend=True,
                    )
                except BaseException:
                    backend.close()
                    raise
        url = agent_url or os.environ.get(ENV_AGENT_URL) or DEFAULT_AGENT_URL
        try:
            return _AgentSource(AgentClient(url, timeout_s=timeout_s, keep_alive=True), gpus)
        except EnergySourceError as e:
            if source == "agent":
                raise
            log.warning(
                "GPU energy not measured: no NVML here (%s) and no agent (%s)", nvml_error, e
            )
            return _NoSource()

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
        return self._source.polled if isinstance(self._source, _NvmlSource) else ()

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


def _nvml_backend() -> GpuBackend:
    from wattwarden.hardware.nvml import NvmlBackend  # noqa: PLC0415 - loads libnvidia-ml

    return NvmlBackend()
