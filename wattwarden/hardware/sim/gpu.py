"""One simulated GPU: power, DVFS, thermals, an exact energy counter, faults.

Time only moves when someone looks: every read first advances the model to ``clock()`` in steps of
at most ``MAX_STEP_S``, split exactly at load-schedule boundaries. Power is held constant within a
step, so the energy counter is the exact integral of the true power (the ground truth tests use).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wattwarden.hardware.device import ClockEvent
from wattwarden.hardware.errors import GpuLost, InvalidArgument, NoPermission, NotSupported
from wattwarden.hardware.sim.clock import Clock
from wattwarden.hardware.sim.models import GpuModelSpec

MAX_STEP_S = 0.05
DRIVER_UPDATE_S = 0.001
POWER_AVERAGE_WINDOW_S = 1.0
SENSOR_NOISE_RATIO = 0.01
DEFAULT_AMBIENT_C = 30.0
DEFAULT_OVERHEAT_DELTA_C = 60.0
THERMAL_HYSTERESIS_C = 2.0
XID_GPU_FALLEN_OFF_BUS = 79

#: Names accepted by the ``not_supported`` fault, one per NVML query family.
FIELDS = (
    "power",
    "power_instant",
    "energy",
    "power_limit",
    "temperature",
    "temperature_memory",
    "utilization",
    "memory",
    "clocks",
    "clock_events",
    "processes",
)


@dataclass(frozen=True, slots=True)
class SimProcess:
    """A process placed on a simulated GPU (a job drives the GPU's load through these)."""

    pid: int
    utilization: float
    memory_bytes: int
    name: str = ""


def _noise(seed: int, t: float, channel: int) -> float:
    """Deterministic triangular noise in [-1, 1], a pure function of (seed, time in ms, channel).

    Reading the same GPU at the same instant through two paths gives the same value, which is what
    lets tests compare the NVML path with the simulator read directly.
    """
    x = (seed * 0x9E3779B1 + int(t * 1000.0) * 0x85EBCA77 + channel * 0xC2B2AE3D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    a = (x & 0xFFFF) / 0xFFFF
    b = (x >> 16) / 0xFFFF
    return a + b - 1.0


class SimGpu:
    """A simulated GPU with NVML-like read semantics. Thread-safe."""

    def __init__(
        self,
        index: int,
        spec: GpuModelSpec,
        *,
        uuid: str,
        pci_bus_id: str,
        clock: Clock,
        seed: int = 0,
        ambient_c: float = DEFAULT_AMBIENT_C,
        power_limit_w: float | None = None,
        energy_j: float = 0.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.index = index
        self.spec = spec
        self.uuid = uuid
        self.pci_bus_id = pci_bus_id
        self._clock = clock
        self._seed = seed
        self._ambient_c = ambient_c
        self._on_change = on_change
        self._lock = threading.RLock()
        limit = spec.power_default_w if power_limit_w is None else power_limit_w
        self._limit_w = min(max(limit, spec.power_min_w), spec.power_max_w)
        self._t = clock()
        self._energy_j = energy_j
        self._temp_c = ambient_c + spec.idle_w * spec.thermal_resistance_c_per_w
        self._synthetic_util = 0.0
        self._synthetic_mem_bytes = 0
        self._schedule_t: list[float] = []
        self._schedule_u: list[float] = []
        self._processes: dict[int, SimProcess] = {}
        self._process_energy_j: dict[int, float] = {}
        self._thermal_engaged = False
        # operating point over the current step (recomputed at each step start)
        self._power_w = spec.idle_w
        self._clock_rel = spec.sm_clock_idle_mhz / spec.sm_clock_max_mhz
        self._reasons = int(ClockEvent.IDLE)
        self._util = 0.0
        self._history: deque[tuple[float, float]] = deque([(self._t, self._energy_j)])
        # faults
        self._lost = False
        self._unsupported: set[str] = set()
        self._no_permission = False
        self._overheat_delta_c = 0.0
        self._power_brake = False
        self._stuck: dict[str, float] | None = None
        self._xids: deque[int] = deque(maxlen=1024)
        self._operating_point()

    # ------------------------------------------------------------------ physics
    def _util_at(self, t: float) -> float:
        u = self._synthetic_util
        i = bisect.bisect_right(self._schedule_t, t) - 1
        if i >= 0:
            u = self._schedule_u[i]
        u += sum(p.utilization for p in self._processes.values())
        return min(max(u, 0.0), 1.0)

    def _operating_point(self) -> None:
        """Set power, clock and reasons for the step starting at ``self._t``."""
        spec = self.spec
        u = self._util_at(self._t)
        self._util = u
        r_eff = spec.thermal_resistance_c_per_w
        ambient = self._ambient_c + self._overheat_delta_c
        if self._temp_c >= spec.sw_thermal_c:
            self._thermal_engaged = True
        elif self._temp_c < spec.sw_thermal_c - THERMAL_HYSTERESIS_C:
            self._thermal_engaged = False
        reasons = 0
        if u <= 0.0:
            f_rel = spec.sm_clock_idle_mhz / spec.sm_clock_max_mhz
            power = spec.idle_w
            reasons |= ClockEvent.IDLE
        else:
            cap = self._limit_w
            if self._thermal_engaged:
                thermal_cap = (spec.sw_thermal_c - THERMAL_HYSTERESIS_C - ambient) / r_eff
                if thermal_cap < cap:
                    cap = thermal_cap
                    reasons |= ClockEvent.SW_THERMAL
            demand = spec.dynamic_w * u
            f_rel = 1.0
            if spec.idle_w + demand > cap:
                f_rel = (max(cap - spec.idle_w, 0.0) / demand) ** (1.0 / spec.alpha)
                if not reasons & ClockEvent.SW_THERMAL:
                    reasons |= ClockEvent.SW_POWER_CAP
            if self._temp_c >= spec.hw_slowdown_c:
                f_rel *= 0.5
                reasons |= ClockEvent.HW_SLOWDOWN | ClockEvent.HW_THERMAL
            if self._power_brake:
                f_rel = min(f_rel, 0.3)
                reasons |= ClockEvent.HW_SLOWDOWN | ClockEvent.HW_POWER_BRAKE
            f_rel = max(f_rel, spec.sm_clock_min_mhz / spec.sm_clock_max_mhz)
            power = spec.idle_w + demand * f_rel**spec.alpha
        self._power_w = power
        self._clock_rel = f_rel
        self._reasons = int(reasons)

    def _attribute(self, dt: float) -> None:
        """Ground truth per process: active power split by each process's share of the load."""
        procs = self._processes.values()
        demand = sum(p.utilization for p in procs) + self._synthetic_util
        if demand <= 0:
            return
        active_j = (self._power_w - self.spec.idle_w) * dt
        for p in procs:
            self._process_energy_j[p.pid] = (
                self._process_energy_j.get(p.pid, 0.0) + active_j * p.utilization / demand
            )

    def _next_boundary(self, t: float) -> float:
        i = bisect.bisect_right(self._schedule_t, t)
        return self._schedule_t[i] if i < len(self._schedule_t) else math.inf

    def _advance(self, *, exact: bool = False) -> None:
        """Bring the model up to now.

        Driver-level reads skip advances shorter than ``DRIVER_UPDATE_S`` (a real driver's
        readings also change in steps); ground-truth reads (``exact``) always advance.
        """
        now = self._clock()
        if not exact and now - self._t < DRIVER_UPDATE_S:
            return
        spec = self.spec
        while self._t < now:
            end = min(now, self._t + MAX_STEP_S, self._next_boundary(self._t))
            dt = end - self._t
            ambient = self._ambient_c + self._overheat_delta_c
            t_ss = ambient + self._power_w * spec.thermal_resistance_c_per_w
            self._temp_c = t_ss + (self._temp_c - t_ss) * math.exp(-dt / spec.thermal_tau_s)
            self._energy_j += self._power_w * dt
            if self._processes:
                self._attribute(dt)
            self._t = end
            self._history.append((end, self._energy_j))
            self._operating_point()
        horizon = self._t - 2 * POWER_AVERAGE_WINDOW_S
        while len(self._history) > 2 and self._history[1][0] <= horizon:
            self._history.popleft()

    def _energy_at(self, t: float) -> float:
        """Energy counter at a past time, exact because power is constant between history points."""
        hist = self._history
        i = bisect.bisect_right(hist, t, key=lambda p: p[0])
        if i == 0:
            return hist[0][1]
        if i == len(hist):
            return hist[-1][1]
        (t0, e0), (t1, e1) = hist[i - 1], hist[i]
        return e0 + (e1 - e0) * (t - t0) / (t1 - t0)

    # ------------------------------------------------------------- fault checks
    def _check(self, field: str) -> None:
        if self._lost:
            raise GpuLost(f"GPU {self.index} has fallen off the bus")
        if field in self._unsupported:
            raise NotSupported(f"GPU {self.index}: {field} is not supported")

    def _stuck_or(self, key: str, value: float) -> float:
        if self._stuck is None:
            return value
        return self._stuck.setdefault(key, value)

    def _noisy(self, value: float, channel: int) -> float:
        return value * (1.0 + SENSOR_NOISE_RATIO * _noise(self._seed, self._t, channel))

    # -------------------------------------------------------- driver-level reads
    def power_average_mw(self) -> int:
        """Power reading as NVML gives it on Ampere+: the average over the last second."""
        with self._lock:
            self._check("power")
            self._advance()
            t0 = max(self._t - POWER_AVERAGE_WINDOW_S, self._history[0][0])
            span = self._t - t0
            avg = (self._energy_j - self._energy_at(t0)) / span if span > 0 else self._power_w
            return round(self._stuck_or("power", self._noisy(avg, 1)) * 1000.0)

    def power_instant_mw(self) -> int:
        """The instantaneous power field (NVML_FI_DEV_POWER_INSTANT)."""
        with self._lock:
            self._check("power_instant")
            self._advance()
            return round(self._stuck_or("power_instant", self._noisy(self._power_w, 2)) * 1000.0)

    def total_energy_mj(self) -> int:
        """Energy counter in mJ since the (simulated) driver was loaded."""
        with self._lock:
            self._check("energy")
            self._advance()
            return int(self._energy_j * 1000.0)

    def power_limit_mw(self) -> int:
        """The requested (management) power limit."""
        with self._lock:
            self._check("power_limit")
            return round(self._limit_w * 1000.0)

    def enforced_power_limit_mw(self) -> int:
        """The enforced power limit."""
        return self.power_limit_mw()

    def power_limit_constraints_mw(self) -> tuple[int, int]:
        """Minimum and maximum settable power limit."""
        with self._lock:
            self._check("power_limit")
            return round(self.spec.power_min_w * 1000), round(self.spec.power_max_w * 1000)

    def default_power_limit_mw(self) -> int:
        """The power limit the board boots with."""
        with self._lock:
            self._check("power_limit")
            return round(self.spec.power_default_w * 1000)

    def set_power_limit_mw(self, milliwatts: int) -> None:
        """Set the power limit, with NVML's checks: permission first, then range."""
        with self._lock:
            if self._lost:
                raise GpuLost(f"GPU {self.index} has fallen off the bus")
            if self._no_permission:
                raise NoPermission(f"GPU {self.index}: setting the power limit needs root")
            lo, hi = self.spec.power_min_w * 1000, self.spec.power_max_w * 1000
            if not lo <= milliwatts <= hi:
                raise InvalidArgument(
                    f"GPU {self.index}: power limit {milliwatts} mW outside [{lo:.0f}, {hi:.0f}]"
                )
            self._advance(exact=True)
            self._limit_w = milliwatts / 1000.0
            self._operating_point()
        if self._on_change is not None:
            self._on_change()

    def temperature_c(self, sensor: str = "gpu") -> int:
        """Temperature in whole degrees, as NVML reports it."""
        with self._lock:
            self._check("temperature_memory" if sensor == "memory" else "temperature")
            self._advance()
            temp = self._temp_c
            if sensor == "memory":
                temp += 3.0 + 4.0 * self._util
            return int(self._stuck_or(f"temp_{sensor}", temp))

    def temperature_thresholds_c(self) -> tuple[int, int]:
        """Slowdown (max operating) and hardware slowdown temperatures."""
        return int(self.spec.sw_thermal_c), int(self.spec.hw_slowdown_c)

    def utilization_pct(self) -> tuple[int, int]:
        """GPU and memory utilization in percent over the last sample period."""
        with self._lock:
            self._check("utilization")
            self._advance()
            return round(self._util * 100), round(self._util * 55 * max(self._clock_rel, 0.3))

    def memory_bytes(self) -> tuple[int, int]:
        """Total and used device memory."""
        with self._lock:
            self._check("memory")
            used = self._synthetic_mem_bytes + sum(p.memory_bytes for p in self._processes.values())
            total = self.spec.memory_total_bytes
            return total, min(used, total)

    def clock_mhz(self, which: str) -> int:
        """Current clock: ``sm`` (== graphics) or ``mem``."""
        with self._lock:
            self._check("clocks")
            self._advance()
            if which == "mem":
                return round(self.spec.mem_clock_mhz)
            return round(self.spec.sm_clock_max_mhz * self._clock_rel)

    def max_clock_mhz(self, which: str) -> int:
        """Maximum clock for ``sm`` or ``mem``."""
        if which == "mem":
            return round(self.spec.mem_clock_mhz)
        return round(self.spec.sm_clock_max_mhz)

    def clock_event_reasons(self) -> int:
        """Active clock-event reasons as an NVML bit mask."""
        with self._lock:
            self._check("clock_events")
            self._advance()
            return self._reasons

    def processes(self) -> list[SimProcess]:
        """Processes running on this GPU."""
        with self._lock:
            self._check("processes")
            return list(self._processes.values())

    def pop_xids(self) -> list[int]:
        """XID events since the last call; a lost GPU still reports them."""
        with self._lock:
            out = list(self._xids)
            self._xids.clear()
            return out

    @property
    def lost(self) -> bool:
        """Whether the GPU has fallen off the bus."""
        return self._lost

    # ------------------------------------------------------------ ground truth
    def true_power_w(self) -> float:
        """Exact power now (no averaging, no noise)."""
        with self._lock:
            self._advance(exact=True)
            return self._power_w

    def true_energy_j(self) -> float:
        """Exact energy since the driver was loaded."""
        with self._lock:
            self._advance(exact=True)
            return self._energy_j

    def true_process_energy_j(self, pid: int) -> float:
        """Exact active energy attributable to a process while it ran on this GPU."""
        with self._lock:
            self._advance(exact=True)
            return self._process_energy_j.get(pid, 0.0)

    def true_temperature_c(self) -> float:
        """Exact die temperature."""
        with self._lock:
            self._advance(exact=True)
            return self._temp_c

    def true_utilization(self) -> float:
        """Exact utilization now."""
        with self._lock:
            self._advance(exact=True)
            return self._util

    def relative_throughput(self) -> float:
        """Work done per unit time relative to an uncapped GPU at the same utilization."""
        with self._lock:
            self._advance(exact=True)
            if self._util <= 0:
                return 0.0
            m = self.spec.memory_bound_fraction
            return 1.0 / ((1.0 - m) / self._clock_rel + m)

    # ------------------------------------------------------------------- load
    def set_load(self, utilization: float, memory_bytes: int | None = None) -> None:
        """Set a synthetic load (0..1) on top of any processes; clears a load schedule."""
        if not 0.0 <= utilization <= 1.0:
            raise InvalidArgument(f"utilization must be within [0, 1], got {utilization}")
        total = self.spec.memory_total_bytes
        if memory_bytes is not None and (
            isinstance(memory_bytes, bool)
            or not isinstance(memory_bytes, int)
            or not 0 <= memory_bytes <= total
        ):
            raise InvalidArgument(
                f"memory_bytes must be an integer within [0, {total}] (the GPU's memory), "
                f"got {memory_bytes!r}"
            )
        with self._lock:
            self._advance(exact=True)
            self._schedule_t, self._schedule_u = [], []
            self._synthetic_util = utilization
            if memory_bytes is None:
                memory_bytes = int(self.spec.memory_total_bytes * 0.5 * utilization)
            self._synthetic_mem_bytes = memory_bytes
            self._operating_point()

    def set_load_schedule(self, segments: Iterable[tuple[float, float]]) -> None:
        """Piecewise-constant load: ``(start_time, utilization)`` pairs on this GPU's clock."""
        pairs = sorted(segments)
        with self._lock:
            self._advance(exact=True)
            self._schedule_t = [t for t, _ in pairs]
            self._schedule_u = [u for _, u in pairs]
            self._operating_point()

    def add_process(self, process: SimProcess) -> None:
        """Place a process (its utilization adds to the load)."""
        with self._lock:
            self._advance(exact=True)
            self._processes[process.pid] = process
            self._operating_point()

    def remove_process(self, pid: int) -> None:
        """Remove a process, if present."""
        with self._lock:
            self._advance(exact=True)
            self._processes.pop(pid, None)
            self._operating_point()

    # ------------------------------------------------------------------ faults
    def inject(self, fault: str, **params: object) -> None:
        """Inject a fault, or ``clear`` them all.

        Faults: lost, overheat (``delta_c``), xid (``xid``), not_supported (``field``),
        no_permission, stuck_sensor, power_brake.
        """
        with self._lock:
            self._advance(exact=True)
            if fault == "lost":
                if not self._lost:
                    self._xids.append(XID_GPU_FALLEN_OFF_BUS)
                self._lost = True
            elif fault == "overheat":
                delta = params.get("delta_c", DEFAULT_OVERHEAT_DELTA_C)
                if not isinstance(delta, int | float) or not 0 < delta <= 200:
                    raise InvalidArgument(f"delta_c must be a number in (0, 200], got {delta!r}")
                self._overheat_delta_c = float(delta)
            elif fault == "xid":
                xid = params.get("xid", 79)
                if not isinstance(xid, int) or isinstance(xid, bool) or not 0 < xid < 1000:
                    raise InvalidArgument(f"xid must be an integer in 1..999, got {xid!r}")
                self._xids.append(xid)
            elif fault == "not_supported":
                field = params.get("field", "energy")
                if field not in FIELDS:
                    raise InvalidArgument(
                        f"field must be one of {', '.join(FIELDS)}; got {field!r}"
                    )
                self._unsupported.add(str(field))
            elif fault == "no_permission":
                self._no_permission = True
            elif fault == "stuck_sensor":
                self._stuck = {}
            elif fault == "power_brake":
                self._power_brake = True
            elif fault == "clear":
                self._lost = False
                self._unsupported.clear()
                self._no_permission = False
                self._overheat_delta_c = 0.0
                self._power_brake = False
                self._stuck = None
            else:
                raise InvalidArgument(f"unknown fault {fault!r}")
            self._operating_point()

    def state(self) -> dict[str, float | str]:
        """What a driver keeps across processes: the limit and the energy counter."""
        with self._lock:
            self._advance(exact=True)
            return {
                "uuid": self.uuid,
                "model": self.spec.key,
                "power_limit_w": self._limit_w,
                "energy_j": self._energy_j,
            }
