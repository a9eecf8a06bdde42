"""Splitting a cluster's power budget into per-node leases: pure arithmetic, no I/O, no clock.

Two steps, each a pure function:

:func:`split` answers "how would the budget be shared now". Stages, each spending only what the
stages before it left over:

1. every node gets its *floor*: the sum of the minimum power limits of its GPUs that are up (a
   node cannot be held below it). If the floors alone exceed the budget, the budget is
   unreachable: every node gets its floor and the shortfall is reported.
2. the demand of ``high`` priority, then ``normal``, then ``low`` is met in that order: within a
   class, nodes are water-filled towards their *need* through that class (all rise to one
   common level; a node whose need is below it stops there and leaves the rest to the others),
   each capped at its *ceiling* (the sum of its GPUs' maximum limits). A node's need through a
   class is its floor plus its demand of that class and the classes above it, at most its
   ceiling. Demand is what the node's GPUs would draw above their minimum limits if their
   limits did not hold them back (the agents' ``wattwarden_power_demand_above_min_watts``;
   an idle GPU, drawing less than its minimum, counts 0): the floor already pays for every
   GPU's minimum, so this is exactly the limits the node needs to run that class unheld.
3. what is left is shared in proportion to each node's remaining headroom (ceiling less share),
   so no node sits at a lower budget than it could have while watts go unused.

:func:`plan` turns the shares into lease changes with bands and a two-phase commit, so that
budgets do not churn and the sum of the leases that may be in force never exceeds the budget:

- a node's lease moves only when its new share differs from the lease by more than a deadband
  (:class:`Bands`: the larger of 2 % of its ceiling and 50 W), except that decreases needed to
  keep the cluster under its budget always happen (largest excess first), a lease above the
  node's ceiling always comes down (a GPU was lost) and one below its floor always goes up;
- decreases (and renewals at the same value) go out first (:attr:`Plan.first`); increases
  (:attr:`Plan.raises`) are granted by :func:`grant` only from budget already released: the
  budget less every lease that may be in force, where a decrease that was not acknowledged has
  not released anything yet (the node may still hold the higher lease);
- nodes the controller cannot act on now (agent unreachable, or its series stale) keep their
  share: their lease is *held* out of the split, not redistributed, until the caller releases
  it (after the lease could have expired).

Facts taken from elsewhere (not their numbers): Dynamo (Wu et al., "Dynamo: Facebook's Data
Center-Wide Power Management System", ISCA 2016) caps lower-priority services before
higher-priority ones and uses bands with hysteresis around its capping and uncapping thresholds
so that power limits do not oscillate; the priority classes and the deadband here are the
cluster-level form of both. Its controllers also move power in two steps (a leaf caps before its
parent hands the freed power elsewhere); the two-phase grant here is that rule.

Hence (the tests check each over many inputs): every share and every lease is within
[floor, ceiling]; the shares sum to at most the budget when it is reachable; the leases that may
be in force plus the increases granted never exceed the budget while the floors fit in it; a
class's demand is met everywhere before any node gets power for a lower class; the same input
twice changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from wattwarden.waterfill import water_fill

PRIORITIES = ("high", "normal", "low")
"""Priority classes, the most important first (the agents' job priorities)."""
EPSILON_W = 1e-6
"""Watts below which two budgets are the same (float rounding of the water-filling)."""


@dataclass(frozen=True, slots=True)
class NodeDemand:
    """One node as the split sees it: its bounds and its demand by priority."""

    instance: str
    """The node (Prometheus's ``instance`` label)."""
    floor_w: float
    """The sum of the minimum power limits of its GPUs that are up."""
    ceiling_w: float
    """The sum of the maximum power limits of its GPUs that are up."""
    demand_w: Mapping[str, float] = field(default_factory=dict)
    """Power its GPUs would draw unrestrained above their minimum limits, by the top priority
    of their jobs (the floor pays for the minimums)."""

    def need_w(self, through: str) -> float:
        """What the node can use to meet the demand of ``through`` and every class above it."""
        return self.needs_w()[PRIORITIES.index(through)]

    def needs_w(self) -> tuple[float, float, float]:
        """:meth:`need_w` through each class of :data:`PRIORITIES`, in one pass."""
        get = self.demand_w.get
        high, normal, low = get("high", 0.0), get("normal", 0.0), get("low", 0.0)
        floor, ceiling, fsum = self.floor_w, self.ceiling_w, math.fsum
        return (
            min(ceiling, floor + fsum((high,))),
            min(ceiling, floor + fsum((high, normal))),
            min(ceiling, floor + fsum((high, normal, low))),
        )

    def top_unmet(self, budget_w: float) -> int:
        """The index of the highest class whose need ``budget_w`` does not meet (3: none)."""
        return _top_unmet(self.needs_w(), budget_w)


def _top_unmet(needs: Sequence[float], budget_w: float) -> int:
    for i, need in enumerate(needs):
        if budget_w < need - EPSILON_W:
            return i
    return len(needs)


@dataclass(frozen=True, slots=True)
class Split:
    """The shares of a budget, and why each node got its own."""

    budget_w: float
    shares_w: dict[str, float]
    """Each node's share, by instance."""
    reachable: bool
    """False when the floors alone exceed the budget: every node is at its floor."""
    shortfall_w: float
    """By how much the floors exceed the budget (0 when reachable)."""
    reasons: Mapping[str, str]
    """One line per node an operator reads; formatted when read (a log line), not per period."""


class _Reasons(Mapping[str, str]):
    """:attr:`Split.reasons` of a reachable budget: each line formatted when it is read."""

    __slots__ = ("_budget_w", "_needs", "_nodes", "_shares")

    def __init__(
        self,
        budget_w: float,
        nodes: Mapping[str, NodeDemand],
        needs: Mapping[str, tuple[float, float, float]],
        shares: Mapping[str, float],
    ) -> None:
        self._budget_w, self._nodes, self._needs, self._shares = budget_w, nodes, needs, shares

    def __getitem__(self, instance: str) -> str:
        node = self._nodes[instance]
        return _reason(node, self._needs[instance], self._shares[instance], self._budget_w)

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)


@dataclass(frozen=True, slots=True)
class Bands:
    """The deadband around a node's lease: shares closer to it than this move nothing."""

    fraction: float = 0.02
    """Of the node's ceiling."""
    min_w: float = 50.0

    def deadband_w(self, ceiling_w: float) -> float:
        """The deadband of a node with this ceiling: the larger of the fraction and the minimum."""
        return max(self.fraction * ceiling_w, self.min_w)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to lease this period, in two phases."""

    split: Split
    first: dict[str, float]
    """Leases to push now: renewals at the lease in force, and decreases (never an increase)."""
    raises: dict[str, float]
    """Increases wanted (node -> new lease): :func:`grant` gives them from released budget."""
    order: tuple[str, ...]
    """The order in which raises are granted: highest unmet priority first, then the largest."""
    forced: frozenset[str]
    """Nodes whose decrease inside the deadband was needed to stay under the budget."""


# ------------------------------------------------------------------ the split
def split(budget_w: float, nodes: Sequence[NodeDemand]) -> Split:
    """Share ``budget_w`` among ``nodes``: floors, then demand by priority, then headroom.

    Raises ValueError on a bad input (a negative or non-finite figure, a floor above the
    ceiling, an unknown priority, a node listed twice), naming the node and the field.
    """
    _check(budget_w, nodes)
    ordered = sorted(nodes, key=lambda n: n.instance)
    shares = {n.instance: n.floor_w for n in ordered}
    floors = math.fsum(shares.values())
    if floors > budget_w:
        short = floors - budget_w
        return Split(
            budget_w,
            shares,
            False,
            short,
            {
                n.instance: f"budget unreachable: held at its floor {n.floor_w:.0f} W; the floors "
                f"need {floors:.0f} W of {budget_w:.0f} W ({short:.0f} W short)"
                for n in ordered
            },
        )
    left = budget_w - floors
    needs = {n.instance: n.needs_w() for n in ordered}
    names = list(shares)
    for k in range(len(PRIORITIES)):
        if left <= 0:
            break
        left -= water_fill(shares, {i: v[k] for i, v in needs.items()}, names, left)
    if left > 0:
        _spread(shares, {n.instance: n.ceiling_w for n in ordered}, left)
    reasons = _Reasons(budget_w, {n.instance: n for n in ordered}, needs, shares)
    return Split(budget_w, shares, True, 0.0, reasons)


def _spread(shares: dict[str, float], ceiling: Mapping[str, float], amount_w: float) -> None:
    """Share ``amount_w`` in proportion to each node's headroom (ceiling less share)."""
    headroom = {g: ceiling[g] - s for g, s in shares.items() if ceiling[g] > s}
    total = math.fsum(headroom.values())
    if total <= 0:
        return
    scale = min(1.0, amount_w / total)
    for g, h in headroom.items():
        shares[g] = min(ceiling[g], shares[g] + h * scale)


def _reason(
    node: NodeDemand, needs: tuple[float, float, float], share_w: float, budget_w: float
) -> str:
    """One line an operator reads: the share, and the highest class it leaves unmet."""
    line = f"{share_w:.0f} W of {budget_w:.0f} W (floor {node.floor_w:.0f} W"
    line += f", ceiling {node.ceiling_w:.0f} W)"
    unmet = _top_unmet(needs, share_w)
    if unmet < len(PRIORITIES):
        line += f": {PRIORITIES[unmet]} demand not met ({needs[unmet]:.0f} W wanted)"
    else:
        line += ": all demand met"
    return line


def _check(budget_w: float, nodes: Sequence[NodeDemand]) -> None:
    """Refuse inputs the split has no answer for, naming the node and the field."""
    if not math.isfinite(budget_w) or budget_w < 0:
        raise ValueError(f"budget_w must be a finite number >= 0, got {budget_w!r}")
    seen: set[str] = set()
    isfinite = math.isfinite
    for n in nodes:
        if n.instance in seen:
            raise ValueError(f"node {n.instance} is listed twice")
        seen.add(n.instance)
        floor, ceiling, demand = n.floor_w, n.ceiling_w, n.demand_w
        if (  # the common case, in few steps; otherwise find and name what is wrong
            isfinite(floor)
            and isfinite(ceiling)
            and 0 <= floor <= ceiling
            and demand.keys() <= _KNOWN
            and all(isfinite(v) and v >= 0 for v in demand.values())
        ):
            continue
        _check_node(n)


_KNOWN = frozenset(PRIORITIES)


def _check_node(n: NodeDemand) -> None:
    """Raise ValueError naming the first figure of ``n`` out of bounds."""
    figures = [("floor_w", n.floor_w), ("ceiling_w", n.ceiling_w)]
    figures += [(f"demand_w[{p}]", v) for p, v in n.demand_w.items()]
    for name, value in figures:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"node {n.instance}: {name} must be a finite number >= 0, "
                             f"got {value!r}")  # fmt: skip
    if n.floor_w > n.ceiling_w:
        raise ValueError(
            f"node {n.instance}: floor_w {n.floor_w:g} is above ceiling_w {n.ceiling_w:g}"
        )
    for p in n.demand_w:
        if p not in PRIORITIES:
            raise ValueError(
                f"node {n.instance}: unknown priority {p!r} (known: {', '.join(PRIORITIES)})"
            )


# ------------------------------------------------------------------ bands and two phases
def plan(
    budget_w: float,
    nodes: Sequence[NodeDemand],
    committed: Mapping[str, float],
    held: Mapping[str, float] | None = None,
    bands: Bands | None = None,
) -> Plan:
    """The leases of this period for ``nodes``, the nodes the controller can act on.

    ``committed`` is, per node, the lease that may be in force now (the higher of the last one
    acknowledged and any pushed since without an answer); a node without one holds none of
    ours. ``held`` is the lease of each node that keeps its share without taking part (agent
    unreachable, series stale): it is taken out of the budget before the split.
    """
    bands = bands or Bands()
    held = held or {}
    reserved = math.fsum(held.values())
    result = split(max(0.0, budget_w - reserved), nodes)
    by_name = {n.instance: n for n in nodes}
    first: dict[str, float] = {}
    raises: dict[str, float] = {}
    for n in sorted(nodes, key=lambda n: n.instance):
        target = result.shares_w[n.instance]
        current = committed.get(n.instance)
        if current is None or current < n.floor_w - EPSILON_W:
            raises[n.instance] = target  # a new lease, or one the node cannot live under
        elif current > n.ceiling_w + EPSILON_W or target < current - bands.deadband_w(n.ceiling_w):
            first[n.instance] = target
        elif target > current + bands.deadband_w(n.ceiling_w):
            raises[n.instance] = target
        else:
            first[n.instance] = current  # within the band: renew as it is
    # decreases needed to stay under the budget happen whatever the band: largest excess first
    forced: set[str] = set()
    total = reserved + math.fsum(first.values()) + math.fsum(raises.values())
    excess = sorted(
        (
            (first[i] - result.shares_w[i], i)
            for i in first
            if first[i] > result.shares_w[i] + EPSILON_W
        ),
        key=lambda e: (-e[0], e[1]),
    )
    for over, i in excess:
        if total <= budget_w + EPSILON_W:
            break
        first[i] = result.shares_w[i]
        total -= over
        forced.add(i)
    order = tuple(
        sorted(
            raises,
            key=lambda i: (
                by_name[i].top_unmet(committed.get(i, 0.0)),
                -(raises[i] - committed.get(i, 0.0)),
                i,
            ),
        )
    )
    return Plan(result, first, raises, order, frozenset(forced))


def grant(
    budget_w: float,
    plan: Plan,
    committed: Mapping[str, float],
    floors: Mapping[str, float],
) -> dict[str, float]:
    """The increases of ``plan`` that fit in the budget released so far (node -> new lease).

    ``committed`` is every lease that may be in force now, after the first phase's answers
    (a decrease not acknowledged still counts at its old value), held nodes included. Raises are
    granted in :attr:`Plan.order`, each as far as the room allows; a node that has no lease
    yet gets one only when the room covers its floor (``floors``), never a lease it cannot run
    under.
    """
    room = budget_w - math.fsum(committed.values())
    out: dict[str, float] = {}
    for i in plan.order:
        if room <= EPSILON_W:
            break
        current = committed.get(i, 0.0)
        give = min(plan.raises[i] - current, room)
        if give <= EPSILON_W or current + give < floors.get(i, 0.0) - EPSILON_W:
            continue
        out[i] = current + give
        room -= give
    return out
