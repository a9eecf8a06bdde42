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

The split is of ``setpoint`` times the budget (98 % by default): the capper aims a little under
the budget, so the power limiter's ripple and sensor error do not cross it. Bands of P against
the budget B, checked each period:

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
  setpoint under the budget plays the capping target and the hold band the dead band.
- Multiplicative decrease and additive increase (Chiu and Jain's AIMD, as in TCP's congestion
  control): cut in proportion near the constraint, give back in small fixed steps, so the loop
  errs on the safe side and converges instead of oscillating.

Threads: :meth:`BudgetCapper.intents` runs on the engine's thread; the public attributes are
replaced whole at the end of each period and may be read from any thread.
"""

from __future__ import annotations

import logging
import math
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
DEFAULT_SETPOINT = 0.98
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


class BudgetCapper:
    """Hold the node's GPU power under ``budget_w()``, split by priority and demand (see module).

    ``budget_w`` is called once per period: the budget in watts, or None for no budget (the
    capper then proposes nothing). Keyword-only settings: ``setpoint`` (the share of the budget
    the split aims at), ``ease_below`` and ``raise_below`` (the band edges as fractions of the
    budget), ``ease_step`` (the near band's cut, a fraction of the limit), ``raise_step`` (the
    low band's raise, a fraction of the GPU's range), ``deadband_w`` (smaller moves are not
    made), ``pinned_fraction`` (a GPU drawing this close to its limit is held back by it, where
    clock events are not read), and the allocator's ``margin_fraction`` and ``margin_w``.
    """

    def __init__(
        self,
        budget_w: Callable[[], float | None],
        *,
        setpoint: float = DEFAULT_SETPOINT,
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
        if not ease_below < setpoint <= 1:
            raise ValueError(f"setpoint must be in (ease_below, 1], got {setpoint!r}")
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
        self.setpoint = setpoint
        self.ease_below = ease_below
        self.raise_below = raise_below
        self.ease_step = ease_step
        self.raise_step = raise_step
        self.deadband_w = deadband_w
        self.pinned_fraction = pinned_fraction
        self.margin_fraction = margin_fraction
        self.margin_w = margin_w
        self._tracks: dict[int, _Track] = {}
        self._targets: dict[int, float] = {}
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

    @property
    def name(self) -> str:
        """``budget``."""
        return NAME

    def targets(self) -> dict[int, float]:
        """The limit the capper wants per GPU index, for the GPUs it holds under their ceiling."""
        return dict(self._targets)

    # ------------------------------------------------------------------------------- period
    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        """One intent per GPU the capper holds under its ceiling; none without a budget."""
        budget = self._budget_w()
        if budget is None or not math.isfinite(budget) or budget < 0:
            self._forget()
            return []
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
            room = self._fill(gpus, room)
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
        """The shares: ``setpoint`` of the budget (all of it if the minimums need more) split.

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

    def _fill(self, gpus: list[_Gpu], room: float) -> float:
        """GPUs below their share rise into the room, highest priority first. Returns the rest.

        A GPU that wants power takes whatever room there is; one that does not draw its limit
        rises only by the deadband or more (it gains headroom, not throughput).
        """
        for g in sorted(gpus, key=lambda g: (_RANK[g.priority], g.index)):
            gap = g.share_w - g.limit_w
            if room < SAME_W:
                break
            if gap < self.deadband_w:
                continue
            up = min(gap, room)
            if up >= self.deadband_w or self._wants(g):
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
        if split.unreachable:
            mins = split.budget_w + split.shortfall_w
            head = (
                f"budget unreachable: the minimum limits need {mins:.0f} W of a {budget:.0f} W "
                f"budget ({split.shortfall_w:.0f} W short)"
            )
        elif band == "over":
            head = f"node at {power:.0f} W over its {budget:.0f} W budget"
        else:
            head = (
                f"node at {power:.0f} W, {100 * power / budget:.0f} % of its {budget:.0f} W budget"
            )
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
