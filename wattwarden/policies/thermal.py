"""The thermal guard: keep each GPU below its throttle point before the hardware throttles it.

A GPU's *throttle point* (its ceiling) is the lower of the two temperature thresholds it reports
(:class:`~wattwarden.hardware.device.GpuInfo`): its max operating temperature, where the driver's
software thermal slowdown starts, and its slowdown temperature, where the hardware halves its
clocks. A GPU that reports neither gets no opinion from the guard: any figure guessed for an
unknown board could be above its real throttle point (and then protect nothing) or far below
it (and then cap a healthy GPU for nothing), so the driver's own slowdown stays its guard.

Three bands of temperature, one step per new temperature reading (the sampler reads it once a
second; a period that sees the same reading again repeats the last intent):

- **hot**, within ``margin_c`` of the ceiling (or over it): cut. The limit falls by
  ``cut_fraction`` at the margin's edge, rising linearly to ``max_cut_fraction`` at the ceiling
  and over it, from the lowest of the guard's own last limit, the enforced limit and the power
  the GPU draws now (a cut from above the draw would change nothing). After a cut the guard
  cuts again on the next reading only if the temperature still rose, and otherwise only once
  it has not fallen over a whole ``settle_s``: the die follows power with a lag of tens of
  seconds, so cutting on every reading while it catches up would cut far deeper than needed.
  Over the ceiling it cuts on every reading. Never below the GPU's minimum limit.
- **cool**, more than ``margin_c + hysteresis_c`` under the ceiling: the limit comes back up by
  ``raise_fraction`` of the GPU's [min, max] range, at most once every ``settle_s``, so the die
  catches up with each step before the next. At the maximum the guard stops proposing (no
  intent: no opinion).
- in between: hold the last limit. The gap between "cut" and "raise" is the hysteresis that
  keeps the guard from oscillating around one temperature.

Why these defaults hold on the simulated H100 (``hardware/sim/models.py``: throttle point 87 C,
0.065 C per W, a 20 s time constant, limits 200-700 W): a heat step that puts the full-load steady
state 15 C over the throttle point (102 C) makes the die climb at most (102 - 82) / 20 = 1 C/s
from where the guard starts. Cuts of 10 % growing to 30 % on each rising reading take 700 W to
444 W in three readings, whose steady state (85.4 C) is under the throttle point: the die peaks
at 84.5 C, and one more cut once it stops falling settles it near 80 C. The closed-loop tests
check, on every sampler pass, that the guard holds every heat that leaves it room (at its
minimum limit the GPU would settle at least two margins under its throttle point) on both
simulated models at any load from half to full, and that the same heat throttles the GPU
without the guard. Raising 25 W (5 % of 500 W) at most every 5 s moves the steady state 1.6 C a
step, slow next to the 20 s lag, so giving power back never carries the die from the cool band
up to its throttle point.

What is taken from where:

- Dynamo (Wu et al., "Dynamo: Facebook's Data Center-Wide Power Management System", ISCA 2016):
  its controllers use three bands with a dead band between them: cap above a capping threshold,
  uncap below a lower uncapping threshold, and do nothing in between, so that a reading near one
  threshold does not flip the decision each period. The guard's hot / hold / cool bands are that
  scheme on temperature instead of power.
- Multiplicative decrease and additive increase (Chiu and Jain's AIMD, as in TCP congestion
  control): cut fast in proportion to the limit when the constraint is near, give power back in
  small fixed steps, so the loop errs on the safe side and converges instead of oscillating.

State is kept per GPU by UUID (and index): a replaced or renumbered GPU starts afresh, and a GPU
that is no longer in the store is forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from wattwarden.collectors.store import GpuView
from wattwarden.policies.base import Intent, PolicyInputs

DEFAULT_MARGIN_C = 5.0
DEFAULT_HYSTERESIS_C = 3.0
DEFAULT_CUT_FRACTION = 0.10
DEFAULT_MAX_CUT_FRACTION = 0.30
DEFAULT_RAISE_FRACTION = 0.05
DEFAULT_SETTLE_S = 5.0


class Thresholds(Protocol):
    """What the guard reads of a GPU's identity (a ``GpuInfo``; policies hold no device types)."""

    @property
    def temperature_max_operating_c(self) -> float | None:
        """Max operating temperature (software thermal slowdown), if the GPU reports one."""
        ...

    @property
    def temperature_slowdown_c(self) -> float | None:
        """Hardware slowdown temperature, if the GPU reports one."""
        ...


def ceiling_c(info: Thresholds) -> float | None:
    """A GPU's throttle point: the lower of its max operating and slowdown temperatures."""
    known = [
        t
        for t in (info.temperature_max_operating_c, info.temperature_slowdown_c)
        if t is not None and t > 0
    ]
    return min(known) if known else None


@dataclass(slots=True)
class _Track:
    """What the guard remembers about one GPU (by UUID) between periods."""

    index: int
    target_w: float | None = None
    """The limit the guard wants; None: no opinion."""
    reason: str = ""
    read_mono_s: float | None = None
    """When the temperature reading last stepped on was taken (one step per reading)."""
    last_step: str = ""
    """``cut`` or ``raise``: what the guard last did to ``target_w``."""
    step_c: float = 0.0
    """The temperature at the last cut or raise."""
    step_mono_s: float = 0.0
    """When that step was made (on the period clock)."""


@dataclass(frozen=True, slots=True)
class _Now:
    """One GPU's new reading, as a step of the guard uses it."""

    index: int
    temp_c: float
    ceiling_c: float
    lo_w: float
    hi_w: float
    enforced_w: float | None
    draw_w: float | None
    now_s: float

    @property
    def where(self) -> str:
        """``GPU 3 at 84 C, 3 C under its 87 C throttle point`` (or ``... 1 C over ...``)."""
        gap = round(self.ceiling_c - self.temp_c)
        side = f"{gap} C under" if gap > 0 else f"{-gap} C over" if gap < 0 else "at"
        at = f"GPU {self.index} at {self.temp_c:.0f} C"
        return f"{at}, {side} its {self.ceiling_c:.0f} C throttle point"


class ThermalGuard:
    """Lower a GPU's limit before it reaches its throttle point; give it back once it is cool.

    Keyword-only settings: ``margin_c`` (start cutting this close to the ceiling), ``hysteresis_c``
    (raise only once this much further under it), ``cut_fraction`` and ``max_cut_fraction`` (the
    cut at the margin's edge and at the ceiling), ``raise_fraction`` (of the [min, max] range per
    raise), ``settle_s`` (how long a step is given to act before the next one, unless the
    temperature still rises).
    """

    def __init__(
        self,
        *,
        margin_c: float = DEFAULT_MARGIN_C,
        hysteresis_c: float = DEFAULT_HYSTERESIS_C,
        cut_fraction: float = DEFAULT_CUT_FRACTION,
        max_cut_fraction: float = DEFAULT_MAX_CUT_FRACTION,
        raise_fraction: float = DEFAULT_RAISE_FRACTION,
        settle_s: float = DEFAULT_SETTLE_S,
    ) -> None:
        if not margin_c > 0:
            raise ValueError(f"margin_c must be above 0, got {margin_c!r}")
        if not hysteresis_c >= 0:
            raise ValueError(f"hysteresis_c must be 0 or more, got {hysteresis_c!r}")
        if not 0 < cut_fraction <= max_cut_fraction < 1:
            raise ValueError(
                "cut fractions must satisfy 0 < cut_fraction <= max_cut_fraction < 1, got "
                f"{cut_fraction!r} and {max_cut_fraction!r}"
            )
        if not 0 < raise_fraction <= 1:
            raise ValueError(f"raise_fraction must be in (0, 1], got {raise_fraction!r}")
        if not settle_s >= 0:
            raise ValueError(f"settle_s must be 0 or more, got {settle_s!r}")
        self.margin_c = margin_c
        self.hysteresis_c = hysteresis_c
        self.cut_fraction = cut_fraction
        self.max_cut_fraction = max_cut_fraction
        self.raise_fraction = raise_fraction
        self.settle_s = settle_s
        self._tracks: dict[str, _Track] = {}

    @property
    def name(self) -> str:
        """``thermal``."""
        return "thermal"

    def targets(self) -> dict[int, float]:
        """The limit the guard wants now per GPU index (those it has an opinion on)."""
        return {t.index: t.target_w for t in self._tracks.values() if t.target_w is not None}

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        """One intent per GPU the guard is limiting; none for a GPU it leaves alone."""
        seen: set[str] = set()
        out: list[Intent] = []
        for view in inputs.snapshot.gpus:
            uuid = view.sample.info.uuid
            seen.add(uuid)
            intent = self._gpu(view, inputs.now_mono_s)
            if intent is not None:
                out.append(intent)
        for gone in set(self._tracks) - seen:
            del self._tracks[gone]
        return out

    # ----------------------------------------------------------------------------------- per GPU
    def _gpu(self, view: GpuView, now_s: float) -> Intent | None:
        sample = view.sample
        info = sample.info
        track = self._tracks.get(info.uuid)
        if track is None or track.index != info.index:
            track = self._tracks[info.uuid] = _Track(info.index)
        ceiling = ceiling_c(info)
        lo, hi = info.power_limit_min_w, info.power_limit_max_w
        if ceiling is None or lo is None or hi is None or hi < lo:
            track.target_w = None  # nothing to measure against, or no bounds to stay within
            return None
        if not sample.up:  # never raise blind: any cut stays while the engine holds it
            return self._repeat(track, f"GPU {info.index} is lost")
        reading = sample.reading
        temp = None if reading is None else reading.temperature_gpu_c
        if temp is None or reading is None:
            return self._repeat(track, f"GPU {info.index} temperature unreadable")
        if sample.slow_read_mono_s is not None and sample.slow_read_mono_s == track.read_mono_s:
            return self._repeat(track, None)  # the same reading as last period: one step each
        track.read_mono_s = sample.slow_read_mono_s
        now = _Now(
            index=info.index,
            temp_c=temp,
            ceiling_c=ceiling,
            lo_w=lo,
            hi_w=hi,
            enforced_w=reading.power_limit_w,
            draw_w=sample.power_w if sample.power_w is not None else reading.power_w,
            now_s=now_s,
        )
        headroom = ceiling - temp
        if headroom <= self.margin_c:
            return self._hot(track, now)
        if headroom > self.margin_c + self.hysteresis_c:
            return self._cool(track, now)
        if track.target_w is None:
            return None
        cool_below = ceiling - self.margin_c - self.hysteresis_c
        track.reason = (
            f"{now.where}: holding {track.target_w:.0f} W until it cools below {cool_below:.0f} C"
        )
        return Intent(info.index, track.target_w, track.reason)

    def _hot(self, track: _Track, now: _Now) -> Intent:
        """Within the margin (or over the ceiling): cut, or let the last cut act."""
        headroom = now.ceiling_c - now.temp_c
        settled = now.now_s - track.step_mono_s >= self.settle_s
        if track.last_step == "cut" and settled and now.temp_c < track.step_c:
            # still falling since the last look: the cut is working, look again in settle_s
            track.step_c, track.step_mono_s = now.temp_c, now.now_s
            settled = False
        cut_again = (
            track.target_w is None
            or track.last_step != "cut"
            or headroom <= 0
            or now.temp_c > track.step_c
            or settled
        )
        if not cut_again and track.target_w is not None:
            track.reason = (
                f"{now.where}: holding {track.target_w:.0f} W while the last cut takes effect"
            )
            return Intent(now.index, track.target_w, track.reason)
        # from its own last limit too, so a cut never proposes more than the one before it
        froms = [w for w in (track.target_w, now.enforced_w, now.draw_w) if w is not None and w > 0]
        base = min(froms) if froms else now.lo_w
        depth = min(max((self.margin_c - headroom) / self.margin_c, 0.0), 1.0)
        fraction = self.cut_fraction + (self.max_cut_fraction - self.cut_fraction) * depth
        watts = min(max(now.lo_w, base * (1.0 - fraction)), now.hi_w)
        track.target_w = watts
        track.last_step, track.step_c, track.step_mono_s = "cut", now.temp_c, now.now_s
        floor = " (its minimum)" if watts <= now.lo_w else ""
        track.reason = f"{now.where}: cut to {watts:.0f} W{floor}"
        return Intent(now.index, watts, track.reason)

    def _cool(self, track: _Track, now: _Now) -> Intent | None:
        """Under the hysteresis band: give a step back every ``settle_s``, none at the top."""
        if track.target_w is None:
            return None
        raise_now = track.last_step != "raise" or now.now_s - track.step_mono_s >= self.settle_s
        if not raise_now:
            return Intent(now.index, track.target_w, track.reason)
        watts = track.target_w + self.raise_fraction * (now.hi_w - now.lo_w)
        if watts >= now.hi_w:
            track.target_w = None  # all the way back: no opinion any more
            track.last_step = ""
            return None
        track.target_w = watts
        track.last_step, track.step_c, track.step_mono_s = "raise", now.temp_c, now.now_s
        track.reason = f"{now.where}: limit back up to {watts:.0f} W"
        return Intent(now.index, watts, track.reason)

    @staticmethod
    def _repeat(track: _Track, why: str | None) -> Intent | None:
        if track.target_w is None:
            return None
        if why is not None:
            track.reason = f"{why}: holding {track.target_w:.0f} W"
        return Intent(track.index, track.target_w, track.reason)
