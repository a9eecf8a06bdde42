"""The energy tuner: per job, the power limit that minimises Zeus's time-energy cost.

The cost of a training step at power limit ``L`` is Zeus's (You, Chung, Chowdhury, "Zeus:
Understanding and Optimizing GPU Energy Consumption of DNN Training", NSDI 2023)::

    cost(L) = eta * E_step(L) + (1 - eta) * P_max * T_step(L)

with ``E_step`` the GPU energy per step, ``T_step`` the step time and ``P_max`` the GPU's maximum
limit: ``eta = 1`` minimises energy alone, ``eta = 0`` time alone, and in between one second of
step time is worth ``P_max`` joules weighted by ``1 - eta``.

What Zeus does, and what is done differently here. Zeus's ``GlobalPowerLimitOptimizer`` (zeus
0.16, ``zeus/optimizer/power_limit.py``) profiles *every* limit from the maximum down to the
minimum in ``pl_step`` strides (25 W by default), each for ``warmup_steps`` (10) then
``profile_steps`` (40) steps inside a ``ZeusMonitor`` window, and then keeps the limit whose
measured cost is the lowest (its ``ZeusCost`` selector, with ``P_max`` the largest profiled limit
times the GPUs of the job). That is 21 limits of 50 steps each on an H100 (700 W down to 200 W).
:class:`LimitSearch` profiles fewer:

- the cost is unimodal in the limit: a lower limit lowers the clock ``f``, so power falls and
  step time rises, and for ``P = idle + D f**alpha`` and ``T = m + (1 - m) / f`` (``m`` the
  memory-bound share) the derivative of the cost in ``f`` changes sign at most once. So a
  Fibonacci search (the discrete golden-section search: Kiefer, "Sequential minimax search for a
  maximum", 1953) over the same grid finds the grid's best limit in about ``log_phi(n) + 1``
  profiles instead of ``n``: 7 instead of 21;
- the maximum limit is profiled first: it is the reference for slowdown and savings, and it
  tells what the job draws. A limit above that draw does not bind, and every such limit costs
  the same: the search keeps to the limits up to ``DRAW_HEADROOM`` above the draw (fewer
  probes), and a probe where the job draws what it draws at the maximum sends the search
  down, whatever the noise in its cost says (on a flat stretch, noise alone would steer the
  comparisons, and away from the low end where the least cost is);
- each limit is profiled over a window of at least ``window_steps`` steps *and* ``window_s``
  seconds, after discarding the first span at a new limit (its warm-up: clocks settle, and a
  span that straddles the change measures neither limit). The step rate is the slope of a
  least-squares line through the cumulative step counts at each span's end: a job reports
  whole steps about once a second, and the line averages that rounding over the window where
  a ratio of the end counts would carry up to a whole step of it;
- ``max_slowdown`` bounds the step time: limits whose step time exceeds ``(1 + max_slowdown)``
  times that at the maximum limit are infeasible, and among feasible limits the cost decides.
  (Zeus's ``MaxSlowdownConstraint`` instead takes the lowest feasible limit whatever its cost:
  the same limit for ``eta = 1``.) The search compares ``(slowdown excess, cost)`` pairs, which
  keeps the function unimodal: the infeasible limits all lie below the feasible ones and rank by
  how far they are from feasible;
- after settling, the job is watched: when its step time or its power at the settled limit moves
  by more than ``shift_ratio`` (15 %) for ``shift_windows`` windows in a row, it has entered a
  new phase (another stage, sequence length, batch size) and the search starts over. Zeus
  profiles once per run (or loads a saved profile).

:class:`EnergyTuner` is the policy around the search: it turns each period's job reports and GPU
readings into measurement spans, and the search's current limit into an :class:`Intent`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Literal

from wattwarden.collectors.jobs import JobView
from wattwarden.collectors.store import GpuView
from wattwarden.policies.base import Intent, PolicyInputs

NAME = "tuner"
DEFAULT_ETA = 0.5
DEFAULT_RESOLUTION_W = 25.0
"""The grid's stride: Zeus's default ``pl_step``, so both profile limits of the same grid."""
DEFAULT_WINDOW_STEPS = 50.0
"""Steps a window counts at least. A job reports whole steps about once a second, so a window's
count is off by up to a step: 50 keep that under 2 % (and the least-squares rate, in practice,
under 0.5 %: on the simulator, a limit within 0.2 % of the least cost)."""
DEFAULT_WINDOW_S = 10.0
"""Seconds a window lasts at least: ten of the job's reports (and of the policy's periods)."""
DEFAULT_SHIFT_RATIO = 0.15
DEFAULT_SHIFT_WINDOWS = 3
DRAW_HEADROOM = 0.10
"""Limits more than this fraction above the job's draw at the maximum limit are not searched."""
DRAW_MARGIN = 0.02
"""A limit at which the job draws within this fraction of its draw at the maximum does not bind."""
LIMIT_MATCH_W = 1.0
"""An enforced limit within this of the candidate is the candidate (the actuator's slack)."""

Phase = Literal["profiling", "settled"]
Key = tuple[float, float]


def zeus_cost(energy_j: float, time_s: float, *, eta: float, max_power_w: float) -> float:
    """Zeus's time-energy cost: ``eta * energy + (1 - eta) * max_power * time``."""
    return eta * energy_j + (1.0 - eta) * max_power_w * time_s


def limit_grid(min_w: float, max_w: float, resolution_w: float) -> tuple[float, ...]:
    """The limits a search may profile, ascending: from ``max_w`` down in strides, and ``min_w``.

    Like Zeus's ``range(max, min - 1, -pl_step)``, plus the minimum itself when the strides do
    not land on it (the lowest limit is often the most efficient one).
    """
    if not 0 < min_w <= max_w or resolution_w <= 0:
        raise ValueError(
            f"need 0 < min_w <= max_w and resolution_w > 0, got {min_w}, {max_w}, {resolution_w}"
        )
    count = math.floor((max_w - min_w) / resolution_w + 1e-9)
    grid = [max_w - k * resolution_w for k in range(count + 1)]
    if grid[-1] - min_w > 1e-9:
        grid.append(min_w)
    return tuple(reversed(grid))


@dataclass(frozen=True, slots=True)
class Profile:
    """What one limit measured over one window: per-step energy and time."""

    limit_w: float
    energy_j: float
    """GPU energy per step."""
    time_s: float
    """Seconds per step."""
    steps: float
    """Steps the window counted."""

    @property
    def power_w(self) -> float:
        """Mean power over the window."""
        return self.energy_j / self.time_s


def step_rate(points: list[tuple[float, float]]) -> float:
    """Steps per second: the least-squares slope through (seconds, cumulative steps) points.

    Falls back to the last point's ratio with fewer than three points or a slope that is not
    positive (a job whose counts stood still for most of the window).
    """
    t_end, s_end = points[-1]
    if len(points) >= 3:
        n = len(points)
        t_mean = sum(t for t, _ in points) / n
        s_mean = sum(s for _, s in points) / n
        var = sum((t - t_mean) ** 2 for t, _ in points)
        cov = sum((t - t_mean) * (s - s_mean) for t, s in points)
        if var > 0 and cov > 0:
            return cov / var
    return s_end / t_end


def _fib(k: int) -> int:
    a, b = 0, 1
    for _ in range(k):
        a, b = b, a + b
    return a


class _Fibonacci:
    """The bracket of a Fibonacci search over grid indices ``0 .. last``.

    The bracket is ``[lo, lo + F(k)]``, probed at ``lo + F(k-2)`` and ``lo + F(k-1)``; each
    comparison drops one end, and one probe is reused as a probe of the shorter bracket, so each
    step costs one new profile. Indices past ``last`` are worse than any real one.
    """

    def __init__(self, last: int) -> None:
        self.last = last
        self.lo = 0
        self.k = 0
        while _fib(self.k) < last:
            self.k += 1

    def next_probe(
        self, measured: Container[int], keep_left: Callable[[int, int], bool]
    ) -> int | None:
        """The next index to measure, or None when every candidate left is measured.

        ``keep_left(x1, x2)``: whether the least cost lies left of ``x2`` (else right of
        ``x1``), once both are measured.
        """
        while _fib(self.k) > 2:
            x1, x2 = self.lo + _fib(self.k - 2), self.lo + _fib(self.k - 1)
            for x in (x2, x1):
                if x <= self.last and x not in measured:
                    return x
            if keep_left(x1, x2):
                self.k -= 1
            else:
                self.lo, self.k = x1, self.k - 1
        for x in range(self.lo, min(self.lo + _fib(self.k), self.last) + 1):
            if x not in measured:
                return x
        return None


def _probes(last: int, measured: set[int]) -> int:
    """How many limits a Fibonacci search over ``0 .. last`` adds when the least is mid-way."""
    fib, seen, mid = _Fibonacci(last), set(measured), last / 2.0
    while (nxt := fib.next_probe(seen, lambda a, b: abs(a - mid) <= abs(b - mid))) is not None:
        seen.add(nxt)
    return len(seen - measured)


class LimitSearch:
    """A Fibonacci search for the limit of least Zeus cost, fed with measurement spans. Pure.

    Feed it what the job did since the last call (:meth:`observe`: steps, energy, seconds, and
    the limit the GPU enforced all along) and run the GPU at :attr:`target_w`. It profiles the
    maximum limit first, then the search's probes, one window each; then it settles on the best
    limit profiled and watches for a new phase.
    """

    def __init__(
        self,
        min_w: float,
        max_w: float,
        *,
        eta: float = DEFAULT_ETA,
        max_slowdown: float | None = None,
        resolution_w: float = DEFAULT_RESOLUTION_W,
        window_steps: float = DEFAULT_WINDOW_STEPS,
        window_s: float = DEFAULT_WINDOW_S,
        shift_ratio: float = DEFAULT_SHIFT_RATIO,
        shift_windows: int = DEFAULT_SHIFT_WINDOWS,
    ) -> None:
        check_settings(
            eta=eta,
            max_slowdown=max_slowdown,
            resolution_w=resolution_w,
            window_steps=window_steps,
            window_s=window_s,
            shift_ratio=shift_ratio,
            shift_windows=shift_windows,
        )
        self.grid = limit_grid(min_w, max_w, resolution_w)
        self.eta = eta
        self.max_slowdown = max_slowdown
        self.window_steps = window_steps
        self.window_s = window_s
        self.shift_ratio = shift_ratio
        self.shift_windows = shift_windows
        self.phases = 0
        """Searches started (1 for the first; each new phase of the job adds one)."""
        self.profiling_steps = 0.0
        """Steps observed while profiling, in every phase: warm-ups and blocked spans included."""
        self.blocked_by_w: float | None = None
        """The enforced limit while it is not the target (another policy's lower limit), else
        None; no span counts meanwhile."""
        self.phase: Phase = "profiling"
        self.best: Profile | None = None
        """The settled limit's profile (None while profiling)."""
        self.planned = 0
        """About how many limits this phase profiles (the Fibonacci search's count)."""
        self._profiles: dict[int, Profile] = {}
        self._fibonacci: _Fibonacci | None = None
        """The search over the limits up to the job's draw; made once the maximum is profiled."""
        self._target = len(self.grid) - 1
        self._shifted = 0
        """Windows in a row whose step time or power moved past ``shift_ratio``."""
        self._warm = False
        """Whether the warm-up span at the target is behind (the next span counts)."""
        self._energy_j = 0.0
        self._points: list[tuple[float, float]] = []
        """The window being filled: (seconds, cumulative steps) at each span's end."""
        self._start_phase()

    # ------------------------------------------------------------------ state
    @property
    def target_w(self) -> float:
        """The limit to run at now: the candidate being profiled, or the settled one."""
        return self.grid[self._target]

    @property
    def max_w(self) -> float:
        """The highest limit: ``P_max`` in the cost."""
        return self.grid[-1]

    @property
    def profiles(self) -> dict[float, Profile]:
        """The profiles of the current phase, by limit."""
        return {self.grid[i]: p for i, p in sorted(self._profiles.items())}

    @property
    def reference(self) -> Profile | None:
        """The maximum limit's profile (measured first in each phase)."""
        return self._profiles.get(len(self.grid) - 1)

    def cost(self, profile: Profile) -> float:
        """A profile's Zeus cost per step."""
        return zeus_cost(profile.energy_j, profile.time_s, eta=self.eta, max_power_w=self.max_w)

    # ---------------------------------------------------------------- feeding
    def observe(self, steps: float, energy_j: float, seconds: float, limit_w: float | None) -> None:
        """One span of the job: steps done, GPU energy, duration, and the limit enforced.

        ``limit_w`` is the limit the GPU enforced over the whole span (None when it changed
        during the span or is unknown). A span at another limit than :attr:`target_w` does not
        count and restarts the warm-up; the first span at the target is the warm-up and is
        discarded; a window closes once it has ``window_steps`` steps and ``window_s`` seconds.
        """
        if self.phase == "profiling":
            self.profiling_steps += max(steps, 0.0)
        if not (steps >= 0 and energy_j >= 0 and seconds > 0):
            self._restart_window()  # a counter went back or time stood still: start over
            return
        if limit_w is None or abs(limit_w - self.target_w) > LIMIT_MATCH_W:
            self.blocked_by_w = limit_w
            self._restart_window()
            return
        self.blocked_by_w = None
        if not self._warm:
            self._warm = True
            return
        t, s = self._points[-1] if self._points else (0.0, 0.0)
        self._points.append((t + seconds, s + steps))
        self._energy_j += energy_j
        total_s, total_steps = self._points[-1]
        if total_steps >= self.window_steps and total_s >= self.window_s:
            time_s = 1.0 / step_rate(self._points)
            power_w = self._energy_j / total_s
            profile = Profile(self.target_w, power_w * time_s, time_s, total_steps)
            self._points, self._energy_j = [], 0.0
            self._window_done(profile)

    # --------------------------------------------------------------- search
    def _start_phase(self) -> None:
        self.phases += 1
        self.phase = "profiling"
        self.best = None
        self._profiles = {}
        self._fibonacci = None
        self._target = len(self.grid) - 1
        self.planned = 1 + _probes(len(self.grid) - 1, {len(self.grid) - 1})
        self._shifted = 0
        self._restart_window()

    def _restart_window(self) -> None:
        self._warm = False
        self._points, self._energy_j = [], 0.0

    def _window_done(self, profile: Profile) -> None:
        if self.phase == "profiling":
            self._profiles[self._target] = profile
            if self._fibonacci is None:  # the maximum: search up to a little above the draw
                top = len(self.grid) - 1
                while top > 0 and self.grid[top - 1] >= profile.power_w * (1 + DRAW_HEADROOM):
                    top -= 1
                self._fibonacci = _Fibonacci(top)
                self.planned = 1 + _probes(top, set(self._profiles))
            nxt = self._fibonacci.next_probe(self._profiles, self._keep_left)
            if nxt is None:
                self._settle()
            else:
                self._target = nxt
                self._restart_window()
            return
        best = self.best
        assert best is not None  # settled
        moved = (
            abs(profile.time_s / best.time_s - 1.0) > self.shift_ratio
            or abs(profile.power_w / best.power_w - 1.0) > self.shift_ratio
        )
        self._shifted = self._shifted + 1 if moved else 0
        if self._shifted >= self.shift_windows:
            self._start_phase()

    def _key(self, index: int) -> Key:
        """(how far past ``max_slowdown``, cost); past the grid's end, worse than anything."""
        profile = self._profiles.get(index)
        ref = self.reference
        if profile is None or ref is None:
            return (math.inf, math.inf)
        excess = 0.0
        if self.max_slowdown is not None:
            excess = max(0.0, profile.time_s / ref.time_s - (1.0 + self.max_slowdown))
        return (excess, self.cost(profile))

    def _keep_left(self, x1: int, x2: int) -> bool:
        """Whether the least cost lies left of ``x2``: ``x1`` is better, or as good.

        Where ``x1`` does not bind (the job draws there what it draws at the maximum, within
        ``DRAW_MARGIN``), every limit above it costs the same, up to noise: the least cost
        lies at ``x1`` or below, whatever the noisy costs say. Likewise an exact tie keeps the
        lower limits.
        """
        p1, ref = self._profiles.get(x1), self.reference
        if p1 is not None and ref is not None and p1.power_w >= ref.power_w * (1 - DRAW_MARGIN):
            return True
        return self._key(x1) <= self._key(x2)

    def _settle(self) -> None:
        index = min(self._profiles, key=lambda i: (self._key(i), -i))
        self.best = self._profiles[index]
        self._target = index
        self.phase = "settled"
        self._shifted = 0
        self._restart_window()


def check_settings(
    *,
    eta: float,
    max_slowdown: float | None,
    resolution_w: float,
    window_steps: float,
    window_s: float,
    shift_ratio: float,
    shift_windows: int,
) -> None:
    """Refuse settings the search cannot work with, naming the one at fault."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be within [0, 1], got {eta}")
    if max_slowdown is not None and max_slowdown < 0.0:
        raise ValueError(f"max_slowdown must be at least 0 (0.05: 5 % slower), got {max_slowdown}")
    if not resolution_w > 0:
        raise ValueError(f"resolution_w must be positive, got {resolution_w}")
    if not (window_steps > 0 and window_s >= 0):
        raise ValueError(
            f"window_steps must be positive and window_s not negative, got {window_steps}, "
            f"{window_s}"
        )
    if not shift_ratio > 0:
        raise ValueError(f"shift_ratio must be positive, got {shift_ratio}")
    if shift_windows < 1:
        raise ValueError(f"shift_windows must be at least 1, got {shift_windows}")


# ---------------------------------------------------------------------- policy
@dataclass(frozen=True, slots=True)
class JobTuning:
    """Where the tuner stands with one job (for status pages and logs)."""

    job: str
    gpu: int
    phase: Phase
    target_w: float
    profiled: int
    """Limits profiled in this phase."""
    planned: int
    """About how many limits this phase profiles."""
    best: Profile | None
    reference: Profile | None
    """The maximum limit's profile."""
    phases: int
    blocked_by_w: float | None


@dataclass(slots=True)
class _Mark:
    """Where a job's counters stood at the end of the last period."""

    step: int
    energy_j: float
    read_mono_s: float
    limit_w: float | None


@dataclass(slots=True)
class _Track:
    gpu: int
    search: LimitSearch
    mark: _Mark | None = None


class EnergyTuner:
    """Policy ``tuner``: each opted-in job's GPU at the limit of least Zeus cost (see the module).

    Each period, for every running job with ``tune`` set (every running job with
    ``tune_all``), it measures what the job did since the previous period: the steps it
    reported (:attr:`JobView.step`), and the energy its GPU used over the same time, read from
    the GPU's counter in the store. The job runs alone on that GPU (see below), so the GPU's
    energy is the job's, including the static power a slower step also burns, which Zeus's cost
    counts too (the per-job attribution leaves idle power out, which would make slow limits look
    cheaper than they are). It proposes the search's limit for the job's GPU.

    The engine takes the lowest limit any policy wants, so another policy (the budget capper,
    the thermal guard) may hold the GPU below the tuner's candidate: a span counts only when the
    GPU enforced the candidate at both its ends (``reading.power_limit_w``, within 1 W), and
    the reason says the profile waits while it does not. In dry-run nothing is enforced: the
    search profiles the maximum if the GPU already has it, then waits at its next candidate.

    Not tuned: a job whose GPU runs other jobs too (its step time depends on theirs, and a limit
    that is cheapest for it may cost them, whose steps it does not see), and a GPU whose limit
    bounds are unknown. A job that moves to another GPU or ends loses its state: a new GPU is
    a new search.
    """

    def __init__(
        self,
        *,
        eta: float = DEFAULT_ETA,
        max_slowdown: float | None = None,
        tune_all: bool = False,
        resolution_w: float = DEFAULT_RESOLUTION_W,
        window_steps: float = DEFAULT_WINDOW_STEPS,
        window_s: float = DEFAULT_WINDOW_S,
        shift_ratio: float = DEFAULT_SHIFT_RATIO,
        shift_windows: int = DEFAULT_SHIFT_WINDOWS,
    ) -> None:
        check_settings(
            eta=eta,
            max_slowdown=max_slowdown,
            resolution_w=resolution_w,
            window_steps=window_steps,
            window_s=window_s,
            shift_ratio=shift_ratio,
            shift_windows=shift_windows,
        )
        self.eta = eta
        self.max_slowdown = max_slowdown
        self.tune_all = tune_all
        self.resolution_w = resolution_w
        self.window_steps = window_steps
        self.window_s = window_s
        self.shift_ratio = shift_ratio
        self.shift_windows = shift_windows
        self._lock = threading.Lock()  # intents() runs on the engine's thread, jobs() anywhere
        self._tracks: dict[str, _Track] = {}

    @property
    def name(self) -> str:
        """``tuner``."""
        return NAME

    def jobs(self) -> dict[str, JobTuning]:
        """Where tuning stands for each job tuned now, by job name."""
        with self._lock:
            return {
                name: JobTuning(
                    name,
                    t.gpu,
                    t.search.phase,
                    t.search.target_w,
                    len(t.search.profiles),
                    t.search.planned,
                    t.search.best,
                    t.search.reference,
                    t.search.phases,
                    t.search.blocked_by_w,
                )
                for name, t in sorted(self._tracks.items())
            }

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        """The search's limit for each tuned job's GPU, with where the search stands."""
        running = [j for j in inputs.jobs if j.state == "running"]
        per_gpu: dict[int, int] = {}
        for job in running:
            per_gpu[job.gpu] = per_gpu.get(job.gpu, 0) + 1
        views = {v.sample.info.index: v for v in inputs.snapshot.gpus}
        out: list[Intent] = []
        with self._lock:
            keep: set[str] = set()
            for job in running:
                if not (job.tune or self.tune_all) or per_gpu[job.gpu] > 1:
                    continue
                view = views.get(job.gpu)
                if view is None:
                    continue
                intent = self._job_intent(job, view)
                if intent is not None:
                    keep.add(job.name)
                    out.append(intent)
            for name in set(self._tracks) - keep:
                del self._tracks[name]
        return out

    def _job_intent(self, job: JobView, view: GpuView) -> Intent | None:
        info = view.sample.info
        lo, hi = info.power_limit_min_w, info.power_limit_max_w
        if lo is None or hi is None or not 0 < lo <= hi:
            return None
        track = self._tracks.get(job.name)
        if track is None or track.gpu != job.gpu or track.search.grid[-1] != hi:
            track = self._tracks[job.name] = _Track(job.gpu, self._search(lo, hi))
        self._measure(track, job, view)
        return Intent(job.gpu, track.search.target_w, self._reason(job, track.search))

    def _search(self, min_w: float, max_w: float) -> LimitSearch:
        return LimitSearch(
            min_w,
            max_w,
            eta=self.eta,
            max_slowdown=self.max_slowdown,
            resolution_w=self.resolution_w,
            window_steps=self.window_steps,
            window_s=self.window_s,
            shift_ratio=self.shift_ratio,
            shift_windows=self.shift_windows,
        )

    @staticmethod
    def _measure(track: _Track, job: JobView, view: GpuView) -> None:
        sample = view.sample
        reading = sample.reading
        if not sample.up or reading is None or sample.read_mono_s is None:
            track.mark = None  # a gap: nothing proves what the limit was across it
            return
        mark = _Mark(job.step, sample.energy_j, sample.read_mono_s, reading.power_limit_w)
        prev, track.mark = track.mark, mark
        if prev is None or mark.read_mono_s == prev.read_mono_s:
            if prev is not None:
                track.mark = prev  # no new read since: keep measuring from the older mark
            return
        steady = (
            prev.limit_w is not None
            and mark.limit_w is not None
            and abs(prev.limit_w - mark.limit_w) <= LIMIT_MATCH_W
        )
        track.search.observe(
            mark.step - prev.step,
            mark.energy_j - prev.energy_j,
            mark.read_mono_s - prev.read_mono_s,
            mark.limit_w if steady else None,
        )

    def _reason(self, job: JobView, search: LimitSearch) -> str:
        target = f"{search.target_w:.0f} W"
        if search.phase == "settled":
            best, ref = search.best, search.reference
            assert best is not None and ref is not None  # settled after profiling both
            saved = (1.0 - best.energy_j / ref.energy_j) * 100.0
            slower = (best.time_s / ref.time_s - 1.0) * 100.0
            bound = (
                ""
                if self.max_slowdown is None
                else f" within {self.max_slowdown * 100:g} % slowdown"
            )
            text = (
                f"job {job.name} tuned: {target} minimises "
                f"{self.eta:g}*E+{1 - self.eta:g}*Pmax*T{bound} "
                f"(saves {saved:.0f} % energy, {slower:.0f} % slower)"
            )
        else:
            done = len(search.profiles) + 1
            text = (
                f"tuning job {job.name}: profiling {target} "
                f"({done} of ~{max(search.planned, done)})"
            )
        if search.blocked_by_w is not None:
            text += (
                f"; GPU {job.gpu} enforces {search.blocked_by_w:.0f} W (another policy's lower "
                "limit), so the measurement waits"
            )
        return text
