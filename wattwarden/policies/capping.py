"""Budget capping: keep the node's GPU power under its budget, by priority and by demand.

Each period the capper measures the node, splits the budget with the allocator
(:func:`wattwarden.policies.budget.allocate`: minimums, then needs by priority, water-filled,
then maximums) and moves its own per-GPU limit towards that *share* at a pace set by how close
the node is to its budget. It proposes a limit for every GPU it holds under the GPU's ceiling
(its default limit, or its maximum where the default is unknown) and nothing for the others, so
when it stops capping (the budget is lifted, or every share is back at the ceiling) the engine
puts back what each GPU had before.

What it measures:

- **P**, the node's power: the sum, over the GPUs that are up, of each GPU's power, taken as the
  larger of its latest sample (``power_w``: the instant field where the board has one, so a
  load step shows at the next sampler pass instead of after the driver's 1 s average catches up)
  and its mean over the last period from the energy counter (which misses no spike between two
  samples). The larger of the two errs on the safe side: a cut reacts to the step at once, and a
  spike that fell between samples still counts. A GPU that is up but whose power cannot be told
  counts at its enforced limit (what it could draw).
- **demand** per GPU, for the split: its draw, the mean over the last period (the latest sample
  where it is above the mean by more than the margin: a load step), except that a GPU drawing at
  the limit the capper gave it (the driver reports the SW power cap clock event, or, where clock
  events are not read, it draws within ``pinned_fraction`` of that limit) wants more than it
  gets, by an amount nobody can see: its demand is its ceiling, so GPUs held back by the budget
  share what is left evenly within a priority, instead of each keeping whatever it happened to
  have.
- **priority** per GPU: the highest priority of the running jobs on it; a GPU without a job is
  ``low``.

The split is of ``1 - margin`` times the budget: the capper aims a little under the budget, so
that GPUs held at their limits, whose power ripples around the limit and whose readings carry
sensor error, do not take the node over it. The margin is learned (see *The margin* below)
unless ``setpoint`` fixes it. Bands of P against the budget B, checked each period:

- **over**, P > B: every GPU above its share is cut to it at once. The shares sum to at most the
  budget, so the node is under it by the next sampler pass after the engine acts, and within two
  periods of any load step.
- **near**, ``ease_below`` (89 %) < P/B <= 100 %: headroom is taken back before the node
  crosses its budget. Headroom nobody uses (a GPU above its share that draws less than its limit)
  goes at once, down to what the GPU draws plus the margin (or its share, if higher); and the
  lowest priority with GPUs above their share eases them by a gentle multiplicative step
  (``ease_step``, 5 % of the limit per period, never below the share).
- **hold**, ``raise_below`` (80 %) < P/B <= 89 %: nothing moves while no GPU wants more. When
  one does (it draws its whole limit, or its need is above it, and its share is higher: a job
  woke up, or a higher priority arrived), power *moves* to it: unused headroom goes at once and
  the lowest priority above its share eases, as near the budget, and the GPU rises into what that
  freed. The sum of the limits never grows past the split budget in this band: it is a transfer,
  not a raise of the node, so the hysteresis holds (nothing oversubscribes between 80 and 89 %).
- **low**, P/B <= 80 %: the same transfers, and every GPU still below its share climbs a slow
  additive step (``raise_step``, 5 % of its [min, ceiling] range per period) towards it, even
  past the split budget: the node is well under its budget, and the near band takes the excess
  back if power comes up.

In every band, after the cuts, a GPU below its share rises at once, highest priority first, into
*room*: what the split budget leaves over the sum of the capper's limits. That raise cannot take
the node over the split budget whatever the load does (it cannot draw more than the sum of its
limits), so it needs no band's leave. Every move converges on the shares (cuts from above,
raises from below, neither past them), so under a steady load the limits settle instead of
oscillating. Moves smaller than ``deadband_w`` (20 W: about 1 % of a GPU's throughput near its
default limit) are not made, so small drifts of the shares move nothing, with two exceptions:
cuts over budget, and moves that give a GPU that wants power what it lacks (the watts it is owed
may sit in slivers above the shares of many GPUs). Demand uses the period's mean, not the latest
sample, whose sensor noise (about 1 %) would otherwise move every share a little each period.
Limits never leave [min, ceiling].

The margin. How far over its limit a GPU's power goes depends on the board (its limiter's
regulation and ripple, the sensor's noise); a fixed margin is too little on some and wastes
power on others, so the capper measures it. Each period in which some GPUs are held at their
enforced limit by the power limiter (the SW power cap clock event; where clock events are not
read, a reading within ``pinned_fraction`` of the limit), whoever set that limit, gives one
reading of the node's *overshoot*: the power of those GPUs over the sum of their limits, minus
one, from the same full reading as the limit and the clock events. A GPU counts only when its
reading is new and its enforced limit is the one the previous reading showed: a limit just moved
is still settling, which is a cut's transient, not how the board holds a limit. The node sum is
what the budget sees (ripple that every GPU of a job shares adds up; independent noise partly
cancels), and relative to the limits of the GPUs held it errs on the safe side: with few GPUs
held it is noisier than a node whose every GPU is held, and readings cannot tell which part of
it is shared. The margin is ``overshoot_safety`` (1.5) times the ``overshoot_quantile`` (99th
percentile) of the last ``overshoot_window`` (600) readings, within ``margin_floor`` (0.5 %) and
``margin_ceiling`` (5 %), rounded up to 0.1 %. Until ``overshoot_min_readings`` (60) readings
are in, it is never under ``margin_default`` (2 %, what a fresh agent uses), but it rises at
once when the first readings ask for more: little evidence may make the node safer, never less
safe. It moves only when the readings ask for two steps (0.2 %) more or less than the margin in
force, so that a quantile drifting in its window does not move every share each period; the
margin in force still covers the quantile itself (1.5 q - 0.2 % >= q from q = 0.4 %, and the
floor below that). When it falls, the watts it frees are handed out that period even in slivers
under the deadband. On an exact limiter with 1 % sensor noise (the simulator) it settles at
0.7 % with eight GPUs held and 0.9 % with three (1.5 % at most: 1.5 times the noise's bound); on
boards that read 3 % over their limits, at 4.5 %. The capper logs each change, and warns (once
per episode) when the margin is at its ceiling while the readings ask for more.
:attr:`BudgetCapper.margin` is the margin in force.

If the minimum limits alone exceed the budget, the budget is unreachable: every GPU goes to its
minimum at once, :attr:`BudgetCapper.unreachable` is set with :attr:`BudgetCapper.shortfall_w`,
and the capper logs it once per episode (and once when it is reachable again).
:attr:`BudgetCapper.starving` names the GPUs that run a high-priority job and whose limit from
the capper is below their need (draw plus margin): the migration planner reads it.

What is taken from where (what the papers describe, not their numbers):

- POLCA (Patel et al., "Characterizing Power Management Opportunities for LLMs in the Cloud",
  ASPLOS 2024; "POLCA: Power Oversubscription in LLM Cloud Providers" on arXiv): oversubscribed
  GPU power made safe by capping on thresholds of the measured power, priority-aware (low-priority
  work is capped at a first threshold, all work at a second) and lifted only once power has come
  back under the thresholds. The near band (cut the lowest priority first) and the over band (cut
  every GPU above its share) are that two-level scheme; POLCA caps GPU clock frequencies, here the
  control is the power limit. The band edges (80 / 89 / 100 % of the budget) are this project's.
- Dynamo (Wu et al., "Dynamo: Facebook's Data Center-Wide Power Management System", ISCA 2016):
  its controllers use three bands, a capping threshold, a lower capping target and a lower still
  uncapping threshold: above the threshold the power cut is sized at once to bring the node to
  the target, below the uncapping threshold caps are lifted, and in between nothing changes, so
  that readings near one threshold do not flip the decision. Cuts go to lower-priority services
  first and, within a priority, to the servers drawing the most (see :mod:`.budget`). Here the
  setpoint under the budget plays the capping target (learned here from how the boards hold
  their limits, where Dynamo's is configured) and the hold band the dead band.
- Multiplicative decrease and additive increase (Chiu and Jain's AIMD, as in TCP's congestion
  control): cut in proportion near the constraint, give back in small fixed steps, so the loop
  errs on the safe side and converges instead of oscillating.

Threads: :meth:`BudgetCapper.intents` runs on the engine's thread; the public attributes are
replaced whole at the end of each period and may be read from any thread.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wattwarden.collectors.jobs import PRIORITIES
from wattwarden.collectors.store import GpuView
from wattwarden.policies.base import Intent, PolicyInputs
from wattwarden.policies.budget import (
    DEFAULT_MARGIN_FRACTION,
    DEFAULT_MARGIN_W,
    NO_JOB,
    Allocation,
    GpuDemand,
    allocate,
    need_w,
)

log = logging.getLogger(__name__)

NAME = "budget"
DEFAULT_MARGIN = 0.02
"""The budget margin before the node's readings say otherwise (a fixed 98 % setpoint before)."""
DEFAULT_MARGIN_FLOOR = 0.005
DEFAULT_MARGIN_CEILING = 0.05
DEFAULT_OVERSHOOT_QUANTILE = 0.99
DEFAULT_OVERSHOOT_SAFETY = 1.5
"""For an overshoot with a Gaussian tail, 1.5 times its 99th percentile is 3.5 standard
deviations: exceeded by about one reading in 4000."""
DEFAULT_OVERSHOOT_WINDOW = 600
"""Node readings kept: ten minutes of periods with GPUs held at their limits."""
DEFAULT_OVERSHOOT_MIN_READINGS = 60
MARGIN_STEP = 0.001
"""The margin moves in steps of 0.1 % (rounded up), and only by two steps or more."""
DEFAULT_EASE_BELOW = 0.89
DEFAULT_RAISE_BELOW = 0.80
DEFAULT_EASE_STEP = 0.05
DEFAULT_RAISE_STEP = 0.05
DEFAULT_DEADBAND_W = 20.0
DEFAULT_PINNED_FRACTION = 0.02
SW_POWER_CAP = 0x4
"""NVML's clock-event bit for the software power cap (``ClockEvent.SW_POWER_CAP``; policies read
readings from the store and never import the device layer)."""
SAME_W = 1.0
"""Limits within this are the same (the engine's keep band)."""
_RANK = {p: i for i, p in enumerate(PRIORITIES)}  # high 0, normal 1, low 2


@dataclass(slots=True)
class _Gpu:
    """One GPU in one period, as the capper works on it."""

    index: int
    lo_w: float
    hi_w: float
    """The ceiling: the default limit (or the maximum where unknown), within [min, max]."""
    power_w: float
    """Its power as P counts it: the larger of the latest sample and the period's mean."""
    draw_w: float
    """Its draw as its demand counts it: the period's mean, unless the latest sample is above it
    by more than the margin (a load step, not sensor noise)."""
    pinned: bool
    priority: str
    limit_w: float
    """The capper's limit, from the last period (or the ceiling for a GPU it has not capped)."""
    need_w: float = 0.0
    """Its draw plus the allocator's margin, within its bounds."""
    share_w: float = 0.0
    moved: str = ""
    """What this period did: ``cut``, ``trimmed``, ``eased``, ``raised``, or empty."""


@dataclass(slots=True)
class _Track:
    """What the capper keeps about one GPU between periods."""

    uuid: str
    limit_w: float
    energy_j: float | None = None
    read_mono_s: float | None = None


@dataclass(slots=True)
class _Held:
    """The last full reading of one GPU the margin learning saw (kept with or without budget)."""

    uuid: str
    slow_mono_s: float | None
    enforced_w: float | None


class BudgetCapper:
    """Hold the node's GPU power under ``budget_w()``, split by priority and demand (see module).

    ``budget_w`` is called once per period: the budget in watts, or None for no budget (the
    capper then proposes nothing). Keyword-only settings: ``setpoint`` (the share of the budget
    the split aims at, fixed; None, the default, learns the margin under the budget from how the
    GPUs hold their limits: ``margin_default``, ``margin_floor``, ``margin_ceiling``,
    ``overshoot_quantile``, ``overshoot_safety``, ``overshoot_window`` and
    ``overshoot_min_readings``, see the module), ``ease_below`` and ``raise_below`` (the band
    edges as fractions of the budget), ``ease_step`` (the near band's cut, a fraction of the
    limit), ``raise_step`` (the low band's raise, a fraction of the GPU's range),
    ``deadband_w`` (smaller moves are not made), ``pinned_fraction`` (a GPU drawing this close
    to its limit is held back by it, where clock events are not read), and the allocator's
    ``margin_fraction`` and ``margin_w`` (a GPU's headroom over its draw, not the budget's
    margin).
    """

    def __init__(
        self,
        budget_w: Callable[[], float | None],
        *,
        setpoint: float | None = None,
        margin_default: float = DEFAULT_MARGIN,
        margin_floor: float = DEFAULT_MARGIN_FLOOR,
        margin_ceiling: float = DEFAULT_MARGIN_CEILING,
        overshoot_quantile: float = DEFAULT_OVERSHOOT_QUANTILE,
        overshoot_safety: float = DEFAULT_OVERSHOOT_SAFETY,
        overshoot_window: int = DEFAULT_OVERSHOOT_WINDOW,
        overshoot_min_readings: int = DEFAULT_OVERSHOOT_MIN_READINGS,
        ease_below: float = DEFAULT_EASE_BELOW,
        raise_below: float = DEFAULT_RAISE_BELOW,
        ease_step: float = DEFAULT_EASE_STEP,
        raise_step: float = DEFAULT_RAISE_STEP,
        deadband_w: float = DEFAULT_DEADBAND_W,
        pinned_fraction: float = DEFAULT_PINNED_FRACTION,
        margin_fraction: float = DEFAULT_MARGIN_FRACTION,
        margin_w: float = DEFAULT_MARGIN_W,
    ) -> None:
        if not 0 < raise_below < ease_below < 1:
            raise ValueError(
                "band edges must satisfy 0 < raise_below < ease_below < 1, got "
                f"{raise_below!r} and {ease_below!r}"
            )
        if setpoint is not None and not ease_below < setpoint <= 1:
            raise ValueError(f"setpoint must be in (ease_below, 1], got {setpoint!r}")
        if setpoint is None and not (
            0 <= margin_floor <= margin_default <= margin_ceiling < 1 - ease_below
        ):
            raise ValueError(
                "budget margins must satisfy 0 <= margin_floor <= margin_default <= "
                f"margin_ceiling < 1 - ease_below, got {margin_floor!r}, {margin_default!r}, "
                f"{margin_ceiling!r}"
            )
        if not 0 < overshoot_quantile <= 1:
            raise ValueError(f"overshoot_quantile must be in (0, 1], got {overshoot_quantile!r}")
        if not (math.isfinite(overshoot_safety) and overshoot_safety > 0):
            raise ValueError(f"overshoot_safety must be a number > 0, got {overshoot_safety!r}")
        if not 1 <= overshoot_min_readings <= overshoot_window:
            raise ValueError(
                "overshoot readings must satisfy 1 <= overshoot_min_readings <= overshoot_window, "
                f"got {overshoot_min_readings!r} and {overshoot_window!r}"
            )
        for name, value in (("ease_step", ease_step), ("raise_step", raise_step)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        for name, value in (
            ("deadband_w", deadband_w),
            ("margin_w", margin_w),
            ("margin_fraction", margin_fraction),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= pinned_fraction < 1:
            raise ValueError(f"pinned_fraction must be in [0, 1), got {pinned_fraction!r}")
        self._budget_w = budget_w
        self.fixed_setpoint = setpoint
        """The setpoint given to the constructor, or None: the margin is learned."""
        self.margin_default = margin_default
        self.margin_floor = margin_floor
        self.margin_ceiling = margin_ceiling
        self.overshoot_quantile = overshoot_quantile
        self.overshoot_safety = overshoot_safety
        self.overshoot_min_readings = overshoot_min_readings
        self.ease_below = ease_below
        self.raise_below = raise_below
        self.ease_step = ease_step
        self.raise_step = raise_step
        self.deadband_w = deadband_w
        self.pinned_fraction = pinned_fraction
        self.margin_fraction = margin_fraction
        self.margin_w = margin_w
        self._tracks: dict[int, _Track] = {}
        self._held: dict[int, _Held] = {}
        self._overshoots: deque[float] = deque(maxlen=overshoot_window)
        self._at_ceiling = False
        self._margin_fell = False
        """The margin fell this period (its room is handed out to the watt)."""
        self._targets: dict[int, float] = {}
        self._budget_name = "budget"
        """How this period's reasons name the budget (with its source, where known)."""
        self._source_note = ""
        self.margin: float = margin_default if setpoint is None else 1.0 - setpoint
        """The budget's margin in force: the split aims at ``1 - margin`` of the budget."""
        self.overshoot: float | None = None
        """The node's overshoot quantile over the window of readings; None before the first."""
        self.unreachable: bool = False
        """The minimum limits alone exceed the budget: every GPU is held at its minimum."""
        self.shortfall_w: float = 0.0
        """By how much the minimums exceed the budget (last period); 0 when reachable."""
        self.starving: frozenset[int] = frozenset()
        """GPUs running a high-priority job whose limit from the capper is below its need."""
        self.node_power_w: float | None = None
        """P, the node's GPU power as the last period measured it; None without a budget."""
        self.band: str | None = None
        """The last period's band: ``over``, ``near``, ``hold`` or ``low``; None without budget."""
        self.allocation: Allocation | None = None
        """The last period's split of the budget (the shares)."""
        self.source: Callable[[], str | None] | None = None
        """Says which budget ``budget_w`` gave (``local budget``, ``lease from controller X gen
        N``), for the reasons; called right after it, once per period. The control loop sets
        it; None leaves the reasons without it."""

    @property
    def name(self) -> str:
        """``budget``."""
        return NAME

    @property
    def setpoint(self) -> float:
        """The share of the budget the split aims at now: ``1 - margin``."""
        return 1.0 - self.margin

    @property
    def margin_source(self) -> str:
        """Where :attr:`margin` comes from: ``set``, ``default`` (few readings yet), ``learned``."""
        if self.fixed_setpoint is not None:
            return "set"
        if len(self._overshoots) < self.overshoot_min_readings and self.margin <= (
            self.margin_default
        ):
            return "default"
        return "learned"

    @property
    def overshoot_readings(self) -> int:
        """Node readings of the overshoot in the window (what the learned margin rests on)."""
        return len(self._overshoots)

    def targets(self) -> dict[int, float]:
        """The limit the capper wants per GPU index, for the GPUs it holds under their ceiling."""
        return dict(self._targets)

    # ------------------------------------------------------------------------------- period
    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        """One intent per GPU the capper holds under its ceiling; none without a budget."""
        self._learn(inputs)  # with or without a budget: how the boards hold limits is the same
        budget = self._budget_w()
        if budget is None or not math.isfinite(budget) or budget < 0:
            self._forget()
            return []
        source = None if self.source is None else self.source()
        self._budget_name = "budget" if source is None else f"budget ({source})"
        self._source_note = "" if source is None else f"; {source}"
        gpus, power, fixed = self._measure(inputs)
        if not gpus and power == 0:
            self._publish([], None, power, "low", budget)
            return []
        split = self._split(budget, gpus, fixed)
        for g in gpus:
            g.share_w = split.limits_w[g.index]
            g.need_w = need_w(
                GpuDemand(g.index, g.lo_w, g.hi_w, g.draw_w), self.margin_fraction, self.margin_w
            )
        ratio = power / budget if budget > 0 else math.inf
        band = _band(ratio, self.ease_below, self.raise_below)
        if split.unreachable:
            for g in gpus:
                g.moved = "cut" if g.limit_w > g.lo_w + SAME_W else ""
                g.limit_w = g.lo_w
        else:
            room = split.budget_w - sum(g.limit_w for g in gpus)
            if band == "over":
                room += self._cut(gpus)
            elif band == "near" or self._wanted(gpus) > 0:  # near: take back; else: transfer
                # a GPU that wants power gathers it even in slivers under the deadband
                fine = SAME_W if self._wanted(gpus) > room else self.deadband_w
                room += self._trim(gpus, fine)
                if band == "near" or self._wanted(gpus) > room:
                    room += self._ease(gpus, fine)
            # a margin that just fell hands its watts out even in slivers under the deadband:
            # it moved every share at once and will not move again soon
            room = self._fill(gpus, room, SAME_W if self._margin_fell else self.deadband_w)
            if band == "low":
                self._climb(gpus)
        for g in gpus:
            self._tracks[g.index].limit_w = g.limit_w
        intents = self._intents(gpus, split, power, budget, band)
        self._publish(gpus, split, power, band, budget)
        return intents

    # ---------------------------------------------------------------------------- measuring
    def _measure(self, inputs: PolicyInputs) -> tuple[list[_Gpu], float, float]:
        """The GPUs the capper can limit, the node's power P, and the power of those it cannot."""
        priority: dict[int, str] = {}
        for job in inputs.jobs:
            if job.state != "running" or job.priority not in _RANK:
                continue
            before = priority.get(job.gpu, NO_JOB)
            if _RANK[job.priority] < _RANK[before]:
                priority[job.gpu] = job.priority
        gpus: list[_Gpu] = []
        power = fixed = 0.0
        listed = {v.sample.info.index for v in inputs.snapshot.gpus}
        for index in [i for i in self._tracks if i not in listed]:
            del self._tracks[index]  # no longer in the store at all
        for view in inputs.snapshot.gpus:
            sample = view.sample
            info = sample.info
            if not sample.up:
                continue  # a lost GPU draws nothing the node's budget sees; its track is kept
            bounds = _bounds(view)
            if bounds is None:
                latest = view.sample.power_w
                if latest is not None and math.isfinite(latest):
                    power += latest
                    fixed += latest  # cannot be limited: reserved out of the budget
                continue
            lo, hi = bounds
            track = self._tracks.get(info.index)
            if track is None or track.uuid != info.uuid:  # new, or another board at this index
                track = self._tracks[info.index] = _Track(info.uuid, hi)
            latest, mean = self._power(view, track)
            track.energy_j, track.read_mono_s = sample.energy_j, sample.read_mono_s
            limit = min(hi, max(lo, track.limit_w))
            reading = sample.reading
            enforced = None if reading is None else reading.power_limit_w
            known = [p for p in (latest, mean) if p is not None]
            if known:
                drawn = max(known)
                draw = self._draw(latest, mean)
            else:  # up but its power cannot be told: count what it could draw
                drawn = draw = enforced if enforced is not None else hi
            power += drawn
            gpus.append(
                _Gpu(
                    info.index,
                    lo,
                    hi,
                    drawn,
                    draw,
                    self._pinned(view, drawn, limit, enforced),
                    priority.get(info.index, NO_JOB),
                    limit,
                )
            )
        return gpus, power, fixed

    @staticmethod
    def _power(view: GpuView, track: _Track) -> tuple[float | None, float | None]:
        """The latest power, and the mean over the last period (from the energy counter)."""
        sample = view.sample
        latest = sample.power_w
        if latest is not None and not math.isfinite(latest):
            latest = None
        mean = None
        if (
            track.energy_j is not None
            and track.read_mono_s is not None
            and sample.read_mono_s is not None
        ):
            dt = sample.read_mono_s - track.read_mono_s
            de = sample.energy_j - track.energy_j
            if dt > 0 and de >= 0:  # a counter reset or a new GPU gives no mean
                mean = de / dt
        return latest, mean

    def _draw(self, latest: float | None, mean: float | None) -> float:
        """What a GPU draws, for its demand: the period's mean, or the latest sample on a step.

        The mean comes from the energy counter (exact); the latest sample wins when it is above
        the mean by more than the margin.

        The latest sample carries sensor noise (about 1 %); fed into the split, it would move
        every share by a few watts each period, and the GPUs held at their share with them. A
        load step larger than the margin shows in the latest sample before the mean catches up.
        """
        if mean is None:
            assert latest is not None
            return latest
        if latest is not None and latest > mean + max(self.margin_fraction * mean, self.margin_w):
            return latest
        return mean

    def _pinned(self, view: GpuView, drawn: float, limit: float, enforced: float | None) -> bool:
        """Whether the capper's own limit holds this GPU back (it would draw more without it)."""
        if enforced is None or enforced < limit - SAME_W:
            return False  # another policy (or the operator) holds it lower: not the budget
        reading = view.sample.reading
        mask = None if reading is None else reading.clock_event_mask
        if mask is not None:
            return bool(mask & SW_POWER_CAP)
        return drawn >= enforced * (1 - self.pinned_fraction)

    def _split(self, budget: float, gpus: list[_Gpu], fixed: float) -> Allocation:
        """The shares: ``1 - margin`` of the budget (all of it if the minimums need more) split.

        What GPUs without limit bounds draw is taken out of the budget first.
        """
        left = max(0.0, budget - fixed)
        mins = math.fsum(g.lo_w for g in gpus)
        aim = left * self.setpoint
        demands = [
            GpuDemand(g.index, g.lo_w, g.hi_w, g.hi_w if g.pinned else g.draw_w, g.priority)
            for g in gpus
        ]
        return allocate(
            aim if mins <= aim else left,
            demands,
            margin_fraction=self.margin_fraction,
            margin_w=self.margin_w,
        )

    # ----------------------------------------------------------------------------- learning
    def _learn(self, inputs: PolicyInputs) -> None:
        """Take this period's reading of the node's overshoot; set the margin from the window."""
        self._margin_fell = False
        reading = self._overshoot_reading(inputs)
        if reading is not None:
            self._overshoots.append(reading)
        self._set_margin()

    def _overshoot_reading(self, inputs: PolicyInputs) -> float | None:
        """The power of the GPUs held at an unchanged limit over the sum of those limits, - 1.

        None when no GPU was held at its limit across two fresh full readings.
        """
        power = limits = 0.0
        listed = set()
        for view in inputs.snapshot.gpus:
            sample = view.sample
            info = sample.info
            listed.add(info.index)
            reading = sample.reading
            if not sample.up or reading is None:
                continue
            before = self._held.get(info.index)
            now = _Held(info.uuid, sample.slow_read_mono_s, reading.power_limit_w)
            self._held[info.index] = now
            if (
                before is None
                or before.uuid != info.uuid
                or now.slow_mono_s is None
                or before.slow_mono_s is None
                or now.slow_mono_s <= before.slow_mono_s  # not a new reading
                or now.enforced_w is None
                or before.enforced_w is None
                or abs(now.enforced_w - before.enforced_w) > SAME_W  # a limit still settling
                or now.enforced_w <= 0
            ):
                continue
            watts = reading.power_instant_w
            if watts is None or not math.isfinite(watts):
                watts = reading.power_w
            if watts is None or not math.isfinite(watts):
                continue
            mask = reading.clock_event_mask
            held = (
                bool(mask & SW_POWER_CAP)
                if mask is not None
                else watts >= now.enforced_w * (1 - self.pinned_fraction)
            )
            if held:
                power += watts
                limits += now.enforced_w
        for index in [i for i in self._held if i not in listed]:
            del self._held[index]
        return power / limits - 1.0 if limits > 0 else None

    def _set_margin(self) -> None:
        """The margin from the window: safety x quantile, bounded, rounded up, with hysteresis."""
        count = len(self._overshoots)
        if count == 0:
            return
        # the quantile by nearest rank: the k-th largest reading
        k = count - math.ceil(self.overshoot_quantile * count) + 1
        quantile = heapq.nlargest(k, self._overshoots)[-1]
        self.overshoot = quantile
        if self.fixed_setpoint is not None:
            return  # measured for the operator's eyes, but the margin is theirs
        wanted = max(0.0, quantile) * self.overshoot_safety
        steps = math.ceil(wanted / MARGIN_STEP - 1e-9)
        target = min(self.margin_ceiling, max(self.margin_floor, steps * MARGIN_STEP))
        if count < self.overshoot_min_readings:
            target = max(target, self.margin_default)  # few readings may only make it safer
        at_ceiling = wanted > self.margin_ceiling
        if at_ceiling and not self._at_ceiling:
            log.warning(
                "budget margin at its %.1f %% ceiling: GPUs held at their power limits read "
                "%.2f %% over them (p%g of %d readings), which asks for %.1f %%; the node may "
                "run over its budget",
                100 * self.margin_ceiling,
                100 * quantile,
                100 * self.overshoot_quantile,
                count,
                100 * wanted,
            )
        self._at_ceiling = at_ceiling
        # a dead band of two steps either way: the margin in force is still at least the
        # quantile itself (1.5 q - 0.2 % >= q from q = 0.4 %; the floor covers less)
        if abs(target - self.margin) >= 2 * MARGIN_STEP - 1e-12:
            log.info(
                "budget margin %.1f %% -> %.1f %%: GPUs held at their power limits read %.2f %% "
                "over them (p%g of %d readings)",
                100 * self.margin,
                100 * target,
                100 * quantile,
                100 * self.overshoot_quantile,
                count,
            )
            self._margin_fell = target < self.margin
            self.margin = target

    # ------------------------------------------------------------------------------- moving
    @staticmethod
    def _cut(gpus: list[_Gpu]) -> float:
        """Over budget: every GPU above its share goes to it at once. Returns the watts freed."""
        freed = 0.0
        for g in gpus:
            if g.limit_w > g.share_w + SAME_W:
                freed += g.limit_w - g.share_w
                g.limit_w, g.moved = g.share_w, "cut"
        return freed

    def _wants(self, g: _Gpu) -> bool:
        """Held under its share by at least the deadband, and short of its need."""
        return g.share_w - g.limit_w >= self.deadband_w and (
            g.pinned or g.need_w > g.limit_w + SAME_W
        )

    def _wanted(self, gpus: list[_Gpu]) -> float:
        """What the GPUs that want power lack, in watts."""
        return sum(g.share_w - g.limit_w for g in gpus if self._wants(g))

    def _trim(self, gpus: list[_Gpu], above_w: float) -> float:
        """Headroom nobody uses goes at once. Returns the watts freed.

        A GPU above its share that does not draw its limit comes down to its share or its need
        (draw plus margin), whichever is higher, if that frees more than ``above_w``.
        """
        freed = 0.0
        for g in gpus:
            if g.pinned:
                continue
            new = max(g.share_w, g.need_w)
            if g.limit_w - new > above_w:
                freed += g.limit_w - new
                g.limit_w, g.moved = new, "trimmed"
        return freed

    def _ease(self, gpus: list[_Gpu], above_w: float) -> float:
        """One gentle step down for the lowest priority above its share. Returns the watts freed.

        Only GPUs above their share by more than ``above_w`` count.
        """
        above = [g for g in gpus if g.limit_w > g.share_w + above_w]
        if not above:
            return 0.0
        lowest = max(_RANK[g.priority] for g in above)
        freed = 0.0
        for g in above:
            if _RANK[g.priority] == lowest:
                new = max(g.share_w, g.limit_w * (1 - self.ease_step))
                freed += g.limit_w - new
                g.limit_w, g.moved = new, "eased"
        return freed

    def _fill(self, gpus: list[_Gpu], room: float, deadband_w: float) -> float:
        """GPUs below their share rise into the room, highest priority first. Returns the rest.

        A GPU that wants power takes whatever room there is; one that does not draw its limit
        rises only by the deadband or more (it gains headroom, not throughput).
        """
        for g in sorted(gpus, key=lambda g: (_RANK[g.priority], g.index)):
            gap = g.share_w - g.limit_w
            if room < SAME_W:
                break
            if gap < deadband_w:
                continue
            up = min(gap, room)
            if up >= deadband_w or self._wants(g):
                room -= up
                g.limit_w += up
                g.moved = g.moved or "raised"
        return room

    def _climb(self, gpus: list[_Gpu]) -> None:
        """Well under budget: every GPU below its share climbs one additive step towards it."""
        for g in gpus:
            gap = g.share_w - g.limit_w
            if gap >= self.deadband_w:
                g.limit_w = min(g.share_w, g.limit_w + self.raise_step * (g.hi_w - g.lo_w))
                g.moved = "raised"

    # ------------------------------------------------------------------------------ telling
    def _intents(
        self, gpus: list[_Gpu], split: Allocation, power: float, budget: float, band: str
    ) -> list[Intent]:
        named = self._budget_name
        if split.unreachable:
            mins = split.budget_w + split.shortfall_w
            head = (
                f"budget unreachable: the minimum limits need {mins:.0f} W of a {budget:.0f} W "
                f"budget ({split.shortfall_w:.0f} W short{self._source_note})"
            )
        elif band == "over":
            head = f"node at {power:.0f} W over its {budget:.0f} W {named}"
        else:
            head = (
                f"node at {power:.0f} W, {100 * power / budget:.0f} % of its {budget:.0f} W {named}"
            )
        if not split.unreachable:
            source = {"set": "set", "default": "the default until learned"}.get(
                self.margin_source, "learned from how the GPUs hold their limits"
            )
            head += f", split {split.budget_w:.0f} W (margin {100 * self.margin:.1f} %, {source})"
        out = []
        for g in gpus:
            if g.limit_w >= g.hi_w - SAME_W and not split.unreachable:
                continue  # at its ceiling: no opinion, the engine puts back its own limit
            who = f"GPU {g.index} ({g.priority})"
            if split.unreachable:
                what = f"{who} held at its minimum {g.lo_w:.0f} W"
            elif g.moved == "cut":
                what = f"{who} cut to {g.limit_w:.0f} W"
            elif g.moved == "trimmed":
                what = f"{who} trimmed to {g.limit_w:.0f} W, what it draws plus a margin"
            elif g.moved == "eased":
                what = f"{who} eased to {g.limit_w:.0f} W, towards its {g.share_w:.0f} W share"
            elif g.moved == "raised" and g.limit_w < g.share_w - SAME_W:
                what = f"{who} raised to {g.limit_w:.0f} W, towards its {g.share_w:.0f} W share"
            elif g.moved == "raised":
                what = f"{who} raised to its {g.limit_w:.0f} W share"
            else:
                what = f"{who} held at {g.limit_w:.0f} W (its share {g.share_w:.0f} W)"
            out.append(Intent(g.index, g.limit_w, f"{head}: {what}"))
        return out

    def _publish(
        self,
        gpus: list[_Gpu],
        split: Allocation | None,
        power: float,
        band: str,
        budget: float,
    ) -> None:
        unreachable = split is not None and split.unreachable
        if unreachable and not self.unreachable:
            assert split is not None
            log.warning(
                "power budget unreachable: the minimum limits of %d GPUs need %.0f W of a %.0f W "
                "budget (%.0f W short); every GPU is held at its minimum",
                len(gpus),
                split.budget_w + split.shortfall_w,
                budget,
                split.shortfall_w,
            )
        elif self.unreachable and not unreachable:
            log.info("power budget reachable again: %.0f W for %d GPUs", budget, len(gpus))
        starving = frozenset(
            g.index
            for g in gpus
            if g.priority == "high"
            and g.limit_w < g.hi_w - SAME_W
            and g.limit_w < g.need_w - SAME_W
        )
        self._targets = {g.index: g.limit_w for g in gpus if g.limit_w < g.hi_w - SAME_W}
        self.unreachable = unreachable
        self.shortfall_w = split.shortfall_w if split is not None else 0.0
        self.starving = starving
        self.node_power_w = power
        self.band = band
        self.allocation = split

    def _forget(self) -> None:
        """No budget: nothing capped, nothing to say (the engine restores what it changed)."""
        if self.unreachable:
            log.info("power budget lifted: no longer unreachable")
        self._tracks.clear()
        self._targets = {}
        self.unreachable = False
        self.shortfall_w = 0.0
        self.starving = frozenset()
        self.node_power_w = None
        self.band = None
        self.allocation = None


def _band(ratio: float, ease_below: float, raise_below: float) -> str:
    if ratio > 1.0:
        return "over"
    if ratio > ease_below:
        return "near"
    if ratio > raise_below:
        return "hold"
    return "low"


def _bounds(view: GpuView) -> tuple[float, float] | None:
    """A GPU's [min, ceiling]: the ceiling is its default limit, else its maximum."""
    info = view.sample.info
    lo, hi = info.power_limit_min_w, info.power_limit_max_w
    if lo is None or hi is None or hi < lo:
        return None
    default = info.power_limit_default_w
    ceiling = hi if default is None else min(hi, max(lo, default))
    return lo, ceiling


def demand_by_priority(
    inputs: PolicyInputs,
    *,
    pinned_fraction: float = DEFAULT_PINNED_FRACTION,
    above_min: bool = False,
) -> dict[str, float]:
    """What the node's GPUs would draw if no limit held them back, summed by priority.

    Per GPU that is up: its power (the latest sample, else the window's mean), or, while its
    power limit holds it back (the SW power cap clock event; where clock events are not read, a
    draw within ``pinned_fraction`` of its enforced limit), its default limit (its maximum where
    the default is unknown): what it would draw unheld cannot be seen, and the default is what it
    draws without any cap. Each GPU counts under the top priority of the running jobs on it (no
    job: ``low``). Every priority is in the answer, 0 where no GPU has it.

    With ``above_min``, each GPU counts only what it would draw above its minimum power limit
    (0 for a GPU that draws less, an idle one): the limits a node needs to run its jobs unheld
    are its GPUs' minimums plus this. A fleet controller splits a fleet's budget with it: the
    node's floor (the minimums) and its demand would otherwise count an idle GPU's draw twice.
    """
    priority: dict[int, str] = {}
    for job in inputs.jobs:
        if job.state != "running" or job.priority not in _RANK:
            continue
        if _RANK[job.priority] < _RANK[priority.get(job.gpu, NO_JOB)]:
            priority[job.gpu] = job.priority
    out = dict.fromkeys(PRIORITIES, 0.0)
    for view in inputs.snapshot.gpus:
        sample = view.sample
        if not sample.up:
            continue
        power = sample.power_w if sample.power_w is not None else view.power_mean_w
        if power is None or not math.isfinite(power):
            continue
        reading = sample.reading
        enforced = None if reading is None else reading.power_limit_w
        mask = None if reading is None else reading.clock_event_mask
        if mask is not None:
            held = bool(mask & SW_POWER_CAP)
        else:
            held = enforced is not None and power >= enforced * (1 - pinned_fraction)
        info = sample.info
        if held:
            ceiling = info.power_limit_default_w or info.power_limit_max_w
            if ceiling is not None:
                power = max(power, ceiling)
        if above_min:
            power = max(0.0, power - (info.power_limit_min_w or 0.0))
        out[priority.get(info.index, NO_JOB)] += power
    return out
