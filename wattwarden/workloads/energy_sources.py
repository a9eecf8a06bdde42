"""Where EnergyMeter reads energy: GPU counters (NVML or the agent) and the host's RAPL counters.

Each source reads cumulative energy per GPU; the meter subtracts two reads. ``nvml`` reads the
hardware energy counters in this process and integrates power on a background thread for a GPU
that has none; ``agent`` asks the node agent (``GET /api/v1/energy``), which also serves the
host's counters; ``none`` reads nothing. :func:`open_source` picks one as ``auto`` says.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from wattwarden.collectors.errors import CollectorUnavailable
from wattwarden.collectors.rapl import RaplCollector
from wattwarden.hardware.device import GpuBackend, GpuDevice
from wattwarden.hardware.errors import HardwareError, HardwareUnavailable, NotSupported
from wattwarden.workloads.agent_client import (
    DEFAULT_AGENT_URL,
    ENV_AGENT_URL,
    AgentClient,
    AgentError,
)

log = logging.getLogger("wattwarden.workloads.meter")
"""The meter's logger: what a source logs is about the meter a user opened."""

SOURCES = ("auto", "nvml", "agent", "none")


class EnergySourceError(Exception):
    """The requested energy source cannot be used here; the message says why and what to do."""


class EnergySource(Protocol):
    """Cumulative GPU (and, for the agent, host) energy, read at the ends of a window."""

    name: str

    @property
    def gpus(self) -> tuple[int, ...]:
        """The GPU indices read."""
        ...

    @property
    def polled(self) -> tuple[int, ...]:
        """GPUs measured by integrating power (no energy counter)."""
        ...

    def read_gpus(self, now_s: float) -> dict[int, float]:
        """Energy per GPU index in J; a GPU whose read failed is left out."""
        ...

    def read_host(self) -> dict[str, float] | None:
        """Energy per RAPL domain in J, if this source serves it."""
        ...

    def close(self) -> None:
        """Release what the source holds (threads, NVML, the connection)."""
        ...


class _OnceLogger:
    """Log each distinct problem once, so a failing read in a hot loop does not flood the log."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def warn(self, key: str, message: str, *args: object) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning(message, *args)


def open_source(
    source: str,
    gpus: Sequence[int] | None,
    *,
    agent_url: str | None,
    poll_interval_s: float,
    clock: Callable[[], float],
    backend_factory: Callable[[], GpuBackend] | None,
    timeout_s: float,
) -> EnergySource:
    """The source ``source`` names; ``auto`` tries NVML, then the agent, then none."""
    if source == "none":
        return NoSource()
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
                return NvmlSource(
                    backend, gpus, poll_interval_s=poll_interval_s, clock=clock, owns_backend=True
                )
            except BaseException:
                backend.close()
                raise
    url = agent_url or os.environ.get(ENV_AGENT_URL) or DEFAULT_AGENT_URL
    try:
        return AgentSource(AgentClient(url, timeout_s=timeout_s, keep_alive=True), gpus)
    except EnergySourceError as e:
        if source == "agent":
            raise
        log.warning("GPU energy not measured: no NVML here (%s) and no agent (%s)", nvml_error, e)
        return NoSource()


def _nvml_backend() -> GpuBackend:
    from wattwarden.hardware.nvml import NvmlBackend  # noqa: PLC0415 - loads libnvidia-ml

    return NvmlBackend()


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


class NvmlSource:
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
        """The GPU indices read."""
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
        """Counter values, and integrated energy up to now for the polled GPUs."""
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
        """None: the host's counters are read locally (:class:`RaplCounters`)."""
        return None

    def close(self) -> None:
        """Stop the polling thread; close the backend if this source opened it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._owns_backend:
            self._backend.close()


# -------------------------------------------------------------------------- agent
class AgentSource:
    """Counters read by the agent at request time (``GET /api/v1/energy``)."""

    name = "agent"
    polled: tuple[int, ...] = ()

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
        """The GPU indices read."""
        return self._gpus

    def read_gpus(self, now_s: float) -> dict[int, float]:
        """The agent's counters for the wanted GPUs (none when the agent does not answer)."""
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
        """Close the connection to the agent."""
        self._client.close()


class NoSource:
    """No GPU energy: windows measure time only."""

    name = "none"
    gpus: tuple[int, ...] = ()
    polled: tuple[int, ...] = ()

    def read_gpus(self, now_s: float) -> dict[int, float]:
        """Nothing."""
        return {}

    def read_host(self) -> dict[str, float] | None:
        """Nothing."""
        return None

    def close(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------- RAPL
class RaplCounters:
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
        """Energy per RAPL domain in J; empty once unreadable."""
        if self._collector is None:
            return {}
        try:
            return {s.domain: s.energy_j for s in self._collector.collect()}
        except (CollectorUnavailable, OSError, ValueError) as e:
            log.info("host energy not measured: %s", e)
            self._collector = None
            return {}
