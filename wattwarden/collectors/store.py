"""The in-memory store: latest samples, export windows and a short history, bounded in memory.

The sampler writes; exporters and the HTTP API read snapshots. Nothing here touches hardware, so a
scrape never waits on NVML. GPU samples get export windows and history; every other collector's
samples are kept as they come, the latest per sample type and :attr:`~Sample.key`, and read back
with :meth:`StoreSnapshot.samples`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, TypeVar

from wattwarden.collectors.base import Sample
from wattwarden.collectors.samples import GpuSample
from wattwarden.hardware.device import GpuReading

DEFAULT_WINDOW_S = 15.0
DEFAULT_HISTORY_S = 3600

S = TypeVar("S", bound=Sample)


@dataclass(frozen=True, slots=True)
class GpuView:
    """One GPU as exporters see it."""

    sample: GpuSample
    power_mean_w: float | None
    """Mean of the sub-second samples over the export window; None while the latest pass could
    not tell the power (a lost GPU, or no power field and no energy counter): never a value
    frozen from before."""
    power_peak_w: float | None
    """Maximum over the same window."""
    power_limit_target_w: float | None = None
    """The limit the policy engine wants on this GPU (also in dry-run); None before its first
    period, or without an engine."""


@dataclass(frozen=True, slots=True)
class CollectorHealth:
    """Self-health of one collector."""

    up: bool
    errors_total: int
    duration_s: float
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyState:
    """The control loop's state as exported: what runs, in which mode, and whether it is stuck."""

    mode: str
    """``dry_run`` or ``apply`` (the mode in force, after any fallback)."""
    active: dict[str, bool]
    """Each policy by name: on or off."""
    holding: bool
    """The engine held GPUs in its last period (stale or lost readings, or a failing policy)."""
    fallback: bool
    """Apply mode fell back to dry-run (the driver refused permission)."""
    budget_unreachable: bool
    """The budget cannot be met even with every GPU at its minimum limit."""
    demand_w: dict[str, float] = field(default_factory=dict)
    """What the GPUs would draw if no limit held them back, summed by the top priority of the
    jobs on each (``high``, ``normal``, ``low``; a GPU without a job counts as ``low``)."""
    demand_above_min_w: dict[str, float] = field(default_factory=dict)
    """The same, each GPU counting only what it would draw above its minimum power limit."""
    starving: bool = False
    """The budget keeps a GPU that runs a high-priority job below what it wants."""


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A fleet controller's lease on the node's budget, as exported."""

    expires_at_s: float | None
    """Wall-clock time the live lease ends at; None while no lease is live."""
    expirations_total: int
    """Leases that ran out without being renewed or released."""


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One second of one GPU.

    The mean power of the second; the other readings as they stood at its last sample.
    """

    timestamp_s: float
    power_w: float | None
    temperature_c: float | None
    utilization_ratio: float | None
    power_limit_w: float | None
    power_limit_target_w: float | None = None
    """The limit the policy engine wanted then (None without one)."""
    clock_sm_hz: float | None = None
    clock_event_mask: int | None = None
    """Clock-event reasons active (bits of :class:`~wattwarden.hardware.device.ClockEvent`);
    kept as the mask, not labels, so that an hour of points stays small."""
    seconds: int = 1
    """How many per-second points this one stands for (more in a bucket of several seconds)."""


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """A consistent copy of everything exporters need."""

    gpus: tuple[GpuView, ...]
    collectors: dict[str, CollectorHealth]
    last_sample_s: float | None
    power_budgets_w: dict[str, float] = field(default_factory=dict)
    policy_actions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    policy_decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """Decisions of the policy engine by (policy, action set|keep|hold, mode)."""
    power_limit_targets_w: dict[int, float] = field(default_factory=dict)
    """The limit the policy engine wants per GPU index (also in dry-run)."""
    policy_state: PolicyState | None = None
    """The control loop's state; None without one (then its gauges are not exported)."""
    lease: LeaseState | None = None
    """The lease's state; None without a control loop (then its series are not exported)."""
    migrations: dict[str, int] = field(default_factory=dict)
    """Jobs the control loop asked to move, by reason."""
    latest: dict[type[Any], tuple[Any, ...]] = field(default_factory=dict)
    """Every other collector's latest samples by sample type, in key order."""

    def samples(self, kind: type[S]) -> tuple[S, ...]:
        """The latest samples of one type (one per key, in key order); empty if none yet."""
        return self.latest.get(kind, ())


@dataclass(slots=True)
class _Bucket:
    second: int
    reading: GpuReading
    """The second's latest reading (its slow fields go into the history point)."""
    target_w: float | None
    """The policy engine's wanted limit at that reading."""
    power_sum: float = 0.0
    power_n: int = 0


class _GpuSeries:
    """Window and history for one GPU."""

    def __init__(self, capacity: int, history_s: int) -> None:
        self.window: deque[tuple[float, float]] = deque(maxlen=capacity)
        self.history: deque[HistoryPoint] = deque(maxlen=history_s)
        self.bucket: _Bucket | None = None
        self.latest: GpuSample | None = None
        self.has_power = False
        """Whether the latest fresh sample gave a power (else the power gauges are dropped)."""


class MetricStore:
    """Thread-safe store with memory bounded by GPU count, window and history length."""

    def __init__(
        self,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        interval_s: float = 0.1,
        history_s: int = DEFAULT_HISTORY_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self._interval_s = interval_s
        self._capacity = math.ceil(window_s / interval_s) + 32
        self._history_s = history_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._gpus: dict[int, _GpuSeries] = {}
        self._latest: dict[type[Any], dict[str, Any]] = {}
        self._collectors: dict[str, CollectorHealth] = {}
        self._last_sample_s: float | None = None
        self._last_pass_mono_s: float | None = None
        self._budgets: dict[str, float] = {}
        self._actions: dict[tuple[str, str, str], int] = {}
        self._decisions: dict[tuple[str, str, str], int] = {}
        self._targets: dict[int, float] = {}
        self._policy_state: PolicyState | None = None
        self._lease: LeaseState | None = None
        self._migrations: dict[str, int] = {}

    # ----------------------------------------------------------------- writes
    def put(self, samples: Iterable[Sample]) -> None:
        """Add samples from one collection pass."""
        now = self._monotonic()
        with self._lock:
            for s in samples:
                if isinstance(s, GpuSample):
                    self._put_gpu(s, now)
                else:
                    self._latest.setdefault(type(s), {})[s.key] = s

    def _put_gpu(self, s: GpuSample, now: float) -> None:
        series = self._gpus.get(s.info.index)
        if series is None:
            series = self._gpus[s.info.index] = _GpuSeries(self._capacity, self._history_s)
        fresh = series.latest is None or s.timestamp_s != series.latest.timestamp_s
        series.latest = s
        r = s.reading
        if not s.up:
            series.has_power = False
            return
        if not fresh:
            return
        power = s.power_w if r is not None else None
        series.has_power = power is not None
        if r is None or power is None:
            return
        series.window.append((now, power))
        second = int(s.timestamp_s)
        bucket = series.bucket
        if bucket is not None and bucket.second != second:
            last = bucket.reading
            series.history.append(
                HistoryPoint(
                    float(bucket.second),
                    bucket.power_sum / bucket.power_n if bucket.power_n else None,
                    last.temperature_gpu_c,
                    last.utilization_gpu_ratio,
                    last.power_limit_w,
                    bucket.target_w,
                    last.clock_sm_hz,
                    last.clock_event_mask,
                )
            )
            bucket = None
        target_w = self._targets.get(s.info.index)
        if bucket is None:
            bucket = series.bucket = _Bucket(second, r, target_w)
        bucket.reading, bucket.target_w = r, target_w
        bucket.power_sum += power
        bucket.power_n += 1

    def record_collector(
        self, name: str, *, up: bool, duration_s: float, error: str | None = None, failed: bool
    ) -> None:
        """Record one collection attempt; ``failed`` adds one to the error counter."""
        with self._lock:
            prev = self._collectors.get(name)
            errors = (prev.errors_total if prev else 0) + (1 if failed else 0)
            self._collectors[name] = CollectorHealth(up, errors, duration_s, error)

    def mark_pass(self, wall_s: float) -> None:
        """Note the end of a sampler pass."""
        with self._lock:
            self._last_sample_s = wall_s
            self._last_pass_mono_s = self._monotonic()

    def seconds_since_pass(self) -> float | None:
        """Monotonic seconds since the last sampler pass (None before the first)."""
        with self._lock:
            last = self._last_pass_mono_s
        return None if last is None else self._monotonic() - last

    def set_power_budget(self, scope: str, watts: float | None) -> None:
        """Set or clear the exported power budget for a scope (e.g. ``node``)."""
        with self._lock:
            if watts is None:
                self._budgets.pop(scope, None)
            else:
                self._budgets[scope] = watts

    def count_policy_action(self, policy: str, action: str, mode: str) -> None:
        """Count one policy action (dry_run or apply)."""
        with self._lock:
            key = (policy, action, mode)
            self._actions[key] = self._actions.get(key, 0) + 1

    def count_policy_decision(self, policy: str, action: str, mode: str) -> None:
        """Count one decision of the policy engine (set, keep or hold)."""
        with self._lock:
            key = (policy, action, mode)
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def set_power_limit_targets(self, targets: dict[int, float]) -> None:
        """Replace the policy engine's wanted limits (GPU index to watts)."""
        with self._lock:
            self._targets = dict(targets)

    def set_policy_state(self, state: PolicyState | None) -> None:
        """Replace the control loop's exported state (None: no loop)."""
        with self._lock:
            self._policy_state = state

    def set_lease_state(self, state: LeaseState | None) -> None:
        """Replace the lease's exported state (None: no control loop)."""
        with self._lock:
            self._lease = state

    def count_migration(self, reason: str, count: int = 1) -> None:
        """Count jobs asked to move for ``reason``; a count of 0 makes the series exist."""
        with self._lock:
            self._migrations[reason] = self._migrations.get(reason, 0) + count

    # ------------------------------------------------------------------ reads
    def snapshot(self) -> StoreSnapshot:
        """A consistent copy; cheap (no hardware access)."""
        now = self._monotonic()
        # sampling slower than the window still shows its last sample, but no older one
        horizon = now - max(self.window_s, 2 * self._interval_s)
        with self._lock:
            gpus = []
            for index in sorted(self._gpus):
                series = self._gpus[index]
                if series.latest is None:
                    continue
                powers = [p for t, p in series.window if t >= horizon] if series.has_power else []
                gpus.append(
                    GpuView(
                        series.latest,
                        sum(powers) / len(powers) if powers else None,
                        max(powers) if powers else None,
                        self._targets.get(index),
                    )
                )
            return StoreSnapshot(
                gpus=tuple(gpus),
                collectors=dict(self._collectors),
                last_sample_s=self._last_sample_s,
                power_budgets_w=dict(self._budgets),
                policy_actions=dict(self._actions),
                policy_decisions=dict(self._decisions),
                power_limit_targets_w=dict(self._targets),
                policy_state=self._policy_state,
                lease=self._lease,
                migrations=dict(self._migrations),
                latest={
                    kind: tuple(by_key[k] for k in sorted(by_key))
                    for kind, by_key in self._latest.items()
                },
            )

    def history(self, seconds: float, step: int = 1) -> dict[int, list[HistoryPoint]]:
        """History of each GPU over the last ``seconds``: per second, or per ``step`` seconds.

        With ``step`` > 1 the seconds are averaged over buckets aligned to multiples of ``step``
        (each point stamped with its bucket's first second): every bucket that holds a second
        of the window, whole. A bucket's readings are the means of its seconds' (of those
        known), its clock events the union, and :attr:`HistoryPoint.seconds` says how many
        seconds it holds; a bucket without a second of the GPU has no point (a gap stays a
        gap). Raises ValueError for a ``step`` under 1.
        """
        if step < 1:
            raise ValueError(f"step must be at least 1, got {step}")
        with self._lock:  # only the copy: the filtering and averaging run outside the lock
            copies = {index: list(self._gpus[index].history) for index in sorted(self._gpus)}
        out: dict[int, list[HistoryPoint]] = {}
        for index, points in copies.items():
            if not points:
                out[index] = []
                continue
            since = points[-1].timestamp_s - seconds
            if step == 1:
                out[index] = [p for p in points if p.timestamp_s > since]
                continue
            first = (math.floor(since) + 1) // step * step  # the first second's bucket
            out[index] = _bucketed([p for p in points if p.timestamp_s >= first], step)
        return out


_MEANS = tuple(
    attrgetter(name)
    for name in (
        "power_w",
        "temperature_c",
        "utilization_ratio",
        "power_limit_w",
        "power_limit_target_w",
        "clock_sm_hz",
    )
)
"""The readings a bucket holds the mean of, in :class:`HistoryPoint` order."""


def _means(column: list[float | None], bounds: list[tuple[int, int]]) -> list[float | None]:
    """The mean of each slice of a column (of its known values; None when none is known)."""
    fsum = math.fsum
    if None not in column:
        return [fsum(column[lo:hi]) / (hi - lo) for lo, hi in bounds]  # type: ignore[arg-type]
    out: list[float | None] = []
    for lo, hi in bounds:
        known = [v for v in column[lo:hi] if v is not None]
        out.append(fsum(known) / len(known) if known else None)
    return out


def _unions(masks: list[int | None], bounds: list[tuple[int, int]]) -> list[int | None]:
    out: list[int | None] = []
    for lo, hi in bounds:
        union: int | None = None
        for mask in masks[lo:hi]:
            if mask is not None:
                union = mask if union is None else union | mask
        out.append(union)
    return out


def _bucketed(points: list[HistoryPoint], step: int) -> list[HistoryPoint]:
    """Per-second points (oldest first) as one point per ``step``-second bucket that has any.

    Column by column, each bucket a slice: the means are of its seconds' known readings.
    """
    keys = [int(p.timestamp_s) // step * step for p in points]
    starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
    bounds = list(zip(starts, [*starts[1:], len(keys)], strict=True))
    seconds = [p.seconds for p in points]
    return list(
        map(
            HistoryPoint,
            [float(keys[lo]) for lo, _ in bounds],
            *(_means(list(map(get, points)), bounds) for get in _MEANS),
            _unions([p.clock_event_mask for p in points], bounds),
            [sum(seconds[lo:hi]) for lo, hi in bounds],
        )
    )
