"""Splitting a node's power budget into per-GPU limits: by priority first, then by demand.

Pure arithmetic, no state and no I/O: :func:`allocate` takes the budget and, per GPU, its limit
bounds, its power draw and its job's priority, and returns the limits that share the budget
(:class:`Allocation`). The budget-capping policy (its bands, decrease and increase steps) is
built on it; this module only answers "how would the budget be split now".

The split, in stages that each spend only what the stages before left over:

1. every GPU gets its minimum limit. If the minimums alone exceed the budget, the budget is
   unreachable: every GPU is held at its minimum and the shortfall is reported.
2. high-priority GPUs, then normal, then low, are raised towards their *need*: their draw plus a
   margin (the larger of ``margin_fraction`` of it and ``margin_w``), never past their maximum.
   Within one priority the budget is water-filled: all GPUs rise to a common level, and a GPU
   whose need is below that level stops at its need and leaves the rest to the others, so a GPU
   that does not use its share donates the headroom.
3. what is left after every need is met is spread the same way (high first) up to the GPUs'
   maximums, so no limit is lower than it needs to be while budget goes unused.

Hence: every limit is within [min, max]; the limits sum to at most the budget when it is
reachable, and to exactly the budget unless every GPU is at its maximum (both to float rounding,
far below a milliwatt); raising the budget never lowers a limit (each stage starts only when the
one before it is full); and GPUs with the same priority, bounds and draw get the same limit. Ties
need no order: the levels are symmetric, and the GPUs are visited by index. Each stage sorts its
GPUs once: O(n log n).

What is taken from where (facts of the papers, not their numbers):

- Dynamo (Wu et al., "Dynamo: Facebook's Data Center-Wide Power Management System", ISCA 2016):
  power is cut from lower-priority services before higher-priority ones, and within a priority
  group its "high-bucket-first" rule cuts the servers drawing the most power first, leaving those
  that draw little alone. Water-filling within a priority is the continuous form of that rule: a
  GPU below the common level keeps all it needs, and only the ones above it are held to the level.
- POLCA (Patel et al., "Characterizing Power Management Opportunities for LLMs in the Cloud",
  ASPLOS 2024): power oversubscription of GPU clusters is made safe by capping, and the capping is
  priority-aware: lower-priority work is capped first so that high-priority work keeps its power.
  Here a GPU without a job counts as low priority, so idle and unclaimed GPUs give way first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from wattwarden.collectors.jobs import PRIORITIES
from wattwarden.waterfill import water_fill

DEFAULT_MARGIN_FRACTION = 0.05
"""A GPU's need is its draw plus this fraction of it (or :data:`DEFAULT_MARGIN_W`, the larger)."""
DEFAULT_MARGIN_W = 10.0
"""The least margin above a GPU's draw, in watts: a GPU drawing little still has room to rise."""
NO_JOB = "low"
"""The priority of a GPU that runs no registered job."""


@dataclass(frozen=True, slots=True)
class GpuDemand:
    """One GPU as the allocator sees it: bounds, draw and priority."""

    gpu: int
    """The GPU's index on the node."""
    min_w: float
    """The lowest power limit it accepts."""
    max_w: float
    """The highest power limit it accepts."""
    demand_w: float
    """Its power draw now (for example the mean over the last period)."""
    priority: str = NO_JOB
    """``high``, ``normal`` or ``low`` (its job's priority; ``low`` without a job)."""


@dataclass(frozen=True, slots=True)
class Allocation:
    """The limits that split a budget, and why each GPU got its own."""

    budget_w: float
    limits_w: dict[int, float]
    """The power limit of each GPU, by GPU index."""
    unreachable: bool
    """The minimum limits alone exceed the budget: every GPU is held at its minimum."""
    shortfall_w: float
    """By how much the minimums exceed the budget; 0 when the budget is reachable."""
    reasons: dict[int, str]
    """One line per GPU, by index, e.g. ``high priority: 620 W of a 2400 W budget (...)``."""


def need_w(
    gpu: GpuDemand,
    margin_fraction: float = DEFAULT_MARGIN_FRACTION,
    margin_w: float = DEFAULT_MARGIN_W,
) -> float:
    """The limit a GPU can use: its draw plus the margin, within its bounds."""
    wanted = gpu.demand_w + max(margin_fraction * gpu.demand_w, margin_w)
    return min(gpu.max_w, max(gpu.min_w, wanted))


def allocate(
    budget_w: float,
    gpus: Sequence[GpuDemand],
    *,
    margin_fraction: float = DEFAULT_MARGIN_FRACTION,
    margin_w: float = DEFAULT_MARGIN_W,
) -> Allocation:
    """Split ``budget_w`` into per-GPU limits: minimums, then needs by priority, then maximums.

    Raises ValueError on a bad input (a negative or non-finite figure, ``min_w > max_w``, an
    unknown priority, a GPU listed twice), naming the GPU and the field.
    """
    _check(budget_w, gpus, margin_fraction, margin_w)
    ordered = sorted(gpus, key=lambda g: g.gpu)
    limits = {g.gpu: g.min_w for g in ordered}
    mins = math.fsum(limits.values())  # exact: the same whatever the order of the GPUs
    if mins > budget_w:
        shortfall = mins - budget_w
        return Allocation(
            budget_w,
            limits,
            True,
            shortfall,
            {
                g.gpu: f"budget unreachable: held at its minimum {g.min_w:.0f} W, the minimums "
                f"need {mins:.0f} W of a {budget_w:.0f} W budget ({shortfall:.0f} W short)"
                for g in ordered
            },
        )
    needs = {g.gpu: need_w(g, margin_fraction, margin_w) for g in ordered}
    maxes = {g.gpu: g.max_w for g in ordered}
    left = budget_w - mins
    for ceiling in (needs, maxes):
        for priority in PRIORITIES:
            if left > 0:
                group = [g.gpu for g in ordered if g.priority == priority]
                left -= water_fill(limits, ceiling, group, left)
    reasons = {g.gpu: _reason(g, limits[g.gpu], needs[g.gpu], budget_w) for g in ordered}
    return Allocation(budget_w, limits, False, 0.0, reasons)


def _reason(gpu: GpuDemand, limit_w: float, need: float, budget_w: float) -> str:
    """One line an operator reads: the GPU's priority, its limit, the budget and its draw."""
    line = (
        f"{gpu.priority} priority: {limit_w:.0f} W of a {budget_w:.0f} W budget "
        f"(demand {gpu.demand_w:.0f} W)"
    )
    if limit_w < need - 0.5:
        line += f", below the {need:.0f} W it could use"
    return line


def _check(
    budget_w: float, gpus: Sequence[GpuDemand], margin_fraction: float, margin_w: float
) -> None:
    """Refuse inputs the split has no answer for, naming the GPU and the field."""
    for name, value in (
        ("budget_w", budget_w),
        ("margin_fraction", margin_fraction),
        ("margin_w", margin_w),
    ):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    seen: set[int] = set()
    for g in gpus:
        if g.gpu in seen:
            raise ValueError(f"GPU {g.gpu} is listed twice")
        seen.add(g.gpu)
        for name, value in (("min_w", g.min_w), ("max_w", g.max_w), ("demand_w", g.demand_w)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"GPU {g.gpu}: {name} must be a finite number >= 0, got {value!r}")
        if g.min_w > g.max_w:
            raise ValueError(f"GPU {g.gpu}: min_w {g.min_w:g} is above max_w {g.max_w:g}")
        if g.priority not in PRIORITIES:
            raise ValueError(
                f"GPU {g.gpu}: priority must be one of {', '.join(PRIORITIES)}, got {g.priority!r}"
            )
