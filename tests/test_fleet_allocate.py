"""The fleet split and its two-phase, banded lease plan: properties over many clusters."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.fleet.allocate import (
    PRIORITIES,
    Bands,
    NodeDemand,
    grant,
    plan,
    split,
)

EPS = 1e-6


@st.composite
def nodes_strategy(draw: st.DrawFn, min_size: int = 1, max_size: int = 8) -> list[NodeDemand]:
    count = draw(st.integers(min_size, max_size))
    out = []
    for i in range(count):
        gpus = draw(st.integers(1, 8))
        gpu_min = draw(st.sampled_from([100.0, 200.0, 250.0]))
        gpu_max = gpu_min + draw(st.sampled_from([150.0, 300.0, 500.0]))
        demand = {
            p: draw(st.floats(0.0, gpus * gpu_max, allow_nan=False)) if draw(st.booleans()) else 0.0
            for p in PRIORITIES
        }
        out.append(NodeDemand(f"node{i:02d}", gpus * gpu_min, gpus * gpu_max, demand))
    return out


def floors(nodes: list[NodeDemand]) -> float:
    return math.fsum(n.floor_w for n in nodes)


def ceilings(nodes: list[NodeDemand]) -> float:
    return math.fsum(n.ceiling_w for n in nodes)


budget_fraction = st.floats(0.0, 1.3, allow_nan=False)


def budget_of(nodes: list[NodeDemand], f: float) -> float:
    """A budget from below the floors (f small) to above the ceilings (f > 1)."""
    return f * ceilings(nodes)


# ------------------------------------------------------------------ split
@given(nodes_strategy(), budget_fraction)
def test_split_keeps_every_node_within_floor_and_ceiling(nodes, f) -> None:
    s = split(budget_of(nodes, f), nodes)
    for n in nodes:
        assert n.floor_w - EPS <= s.shares_w[n.instance] <= n.ceiling_w + EPS


@given(nodes_strategy(), budget_fraction)
def test_split_stays_under_a_reachable_budget_and_spends_it(nodes, f) -> None:
    budget = budget_of(nodes, f)
    s = split(budget, nodes)
    total = math.fsum(s.shares_w.values())
    if floors(nodes) <= budget:
        assert s.reachable and s.shortfall_w == 0.0
        assert total <= budget + EPS
        assert total >= min(budget, ceilings(nodes)) - 1e-3  # nothing left unused
    else:
        assert not s.reachable
        assert s.shares_w == {n.instance: n.floor_w for n in nodes}
        assert s.shortfall_w == pytest.approx(floors(nodes) - budget)


@given(nodes_strategy(min_size=2), budget_fraction)
def test_split_meets_high_demand_everywhere_before_lower_demand_anywhere(nodes, f) -> None:
    s = split(budget_of(nodes, f), nodes)
    if not s.reachable:
        return
    for p in PRIORITIES[:-1]:
        beyond = [n for n in nodes if s.shares_w[n.instance] > n.need_w(p) + 1e-3]
        if beyond:  # someone got power for a lower class: every class-p need is met
            for n in nodes:
                assert s.shares_w[n.instance] >= n.need_w(p) - 1e-3, (p, n, beyond[0])


def test_split_water_fills_one_class_across_nodes() -> None:
    # two nodes want 1000 W more of high each; 600 W to give: 300 W each, none for low
    a = NodeDemand("a", 400, 2000, {"high": 1000, "low": 500})
    b = NodeDemand("b", 400, 2000, {"high": 1000})
    s = split(1400, [a, b])
    assert s.shares_w == {"a": pytest.approx(700), "b": pytest.approx(700)}
    assert "high demand not met" in s.reasons["a"]


def test_split_gives_leftover_in_proportion_to_headroom() -> None:
    a = NodeDemand("a", 100, 1100)  # headroom 1000
    b = NodeDemand("b", 100, 400)  # headroom 300
    s = split(200 + 650, [a, b])
    assert s.shares_w == {"a": pytest.approx(600), "b": pytest.approx(250)}


def test_split_names_the_node_and_field_of_bad_input() -> None:
    with pytest.raises(ValueError, match="node x: floor_w 5 is above ceiling_w 4"):
        split(10, [NodeDemand("x", 5, 4)])
    with pytest.raises(ValueError, match="node x: unknown priority 'urgent'"):
        split(10, [NodeDemand("x", 1, 4, {"urgent": 1})])
    with pytest.raises(ValueError, match=r"node x: demand_w\[high\] must be a finite"):
        split(10, [NodeDemand("x", 1, 4, {"high": math.nan})])
    with pytest.raises(ValueError, match="node x is listed twice"):
        split(10, [NodeDemand("x", 1, 4), NodeDemand("x", 1, 4)])


figure = st.sampled_from([0.0, 1.0, 250.0, 4000.0, -1.0, math.nan, math.inf, -math.inf])


@settings(max_examples=300)
@given(
    floor=figure,
    ceiling=figure,
    demand=st.dictionaries(st.sampled_from([*PRIORITIES, "urgent", ""]), figure, max_size=4),
)
def test_split_refuses_a_node_exactly_as_the_field_by_field_check_does(
    floor: float, ceiling: float, demand: dict[str, float]
) -> None:
    node = NodeDemand("x", floor, ceiling, demand)
    # the reference: every figure finite and >= 0 (floor, ceiling, then demand in order),
    # then the floor not above the ceiling, then every priority known; the first fault named
    want = None
    for name, value in [("floor_w", floor), ("ceiling_w", ceiling)] + [
        (f"demand_w[{p}]", v) for p, v in demand.items()
    ]:
        if want is None and not (math.isfinite(value) and value >= 0):
            want = f"node x: {name} must be a finite number >= 0, got {value!r}"
    if want is None and floor > ceiling:
        want = f"node x: floor_w {floor:g} is above ceiling_w {ceiling:g}"
    unknown = [p for p in demand if p not in PRIORITIES]
    if want is None and unknown:
        want = f"node x: unknown priority {unknown[0]!r} (known: high, normal, low)"
    try:
        split(10_000.0, [NodeDemand("ok", 1.0, 2.0), node])
        got = None
    except ValueError as e:
        got = str(e)
    assert got == want


@given(nodes_strategy(), budget_fraction)
def test_each_need_and_reason_is_what_the_demand_through_that_class_says(nodes, f) -> None:
    s = split(budget_of(nodes, f), nodes)
    assert set(s.reasons) == {n.instance for n in nodes} and len(s.reasons) == len(nodes)
    for n in nodes:
        for k, p in enumerate(PRIORITIES):
            through = [n.demand_w.get(q, 0.0) for q in PRIORITIES[: k + 1]]
            want = min(n.ceiling_w, n.floor_w + math.fsum(through))
            assert n.need_w(p) == want and n.needs_w()[k] == want
        share = s.shares_w[n.instance]
        reason = s.reasons[n.instance]
        if not s.reachable:
            assert reason.startswith("budget unreachable: held at its floor")
            continue
        assert reason.startswith(f"{share:.0f} W of {s.budget_w:.0f} W (floor {n.floor_w:.0f} W")
        unmet = [p for p in PRIORITIES if share < n.need_w(p) - EPS]
        if unmet:
            assert reason.endswith(
                f": {unmet[0]} demand not met ({n.need_w(unmet[0]):.0f} W wanted)"
            )
        else:
            assert reason.endswith(": all demand met")


# ------------------------------------------------------------------ plan and grant, simulated
def period(
    budget: float,
    nodes: list[NodeDemand],
    committed: dict[str, float],
    held: dict[str, float] | None = None,
    acked: set[str] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """One controller period in pure terms: plan, push the first phase, grant, push raises.

    A push whose node is not in ``acked`` (None: every node) gets no answer: the node may hold
    the old lease or the new one, so the higher of the two stays committed. Returns the leases
    pushed and the committed leases after the period (held nodes included).
    """
    held = held or {}
    p = plan(budget, nodes, {i: committed[i] for i in committed if i not in held}, held)
    after = dict(committed)

    def answer(i: str, value: float) -> None:
        if acked is None or i in acked:
            after[i] = value
        else:
            after[i] = max(after.get(i, 0.0), value)

    pushed = dict(p.first)
    for i, v in p.first.items():
        answer(i, v)
    raised = grant(budget, p, after, {n.instance: n.floor_w for n in nodes})
    for i, v in raised.items():
        assert v > after.get(i, 0.0)  # grants only ever raise
        answer(i, v)
    pushed.update(raised)
    return pushed, after


@given(nodes_strategy(), st.floats(0.0, 1.0), st.data())
@settings(max_examples=200)
def test_leases_in_force_never_exceed_the_budget_whatever_the_answers(nodes, f, data) -> None:
    budget = floors(nodes) + f * (ceilings(nodes) - floors(nodes))
    committed: dict[str, float] = {}
    names = [n.instance for n in nodes]
    for _ in range(6):
        acked = set(data.draw(st.lists(st.sampled_from(names), unique=True)))
        demand = [
            replace(n, demand_w={p: data.draw(st.floats(0, n.ceiling_w)) for p in PRIORITIES})
            for n in nodes
        ]
        pushed, committed = period(budget, demand, committed, acked=acked)
        assert math.fsum(committed.values()) <= budget + EPS
        for n in nodes:
            if n.instance in pushed:
                assert pushed[n.instance] >= n.floor_w - EPS
                assert pushed[n.instance] <= n.ceiling_w + EPS


@given(nodes_strategy(), st.floats(0.0, 1.0), st.floats(0.3, 3.0))
def test_a_budget_exceeded_at_start_is_met_after_one_answered_period(nodes, f, scale) -> None:
    # a restart that finds leases (or a lowered budget) over the budget: decreases always happen
    budget = floors(nodes) + f * (ceilings(nodes) - floors(nodes))
    committed = {n.instance: min(n.ceiling_w, max(n.floor_w, scale * n.ceiling_w)) for n in nodes}
    _, after = period(budget, nodes, committed)
    assert math.fsum(after.values()) <= budget + EPS


@given(nodes_strategy(), budget_fraction)
def test_same_input_twice_changes_nothing(nodes, f) -> None:
    budget = budget_of(nodes, f)
    committed: dict[str, float] = {}
    for _ in range(3):
        _, committed = period(budget, nodes, committed)
    pushed, after = period(budget, nodes, committed)
    assert after == committed
    assert pushed == {i: committed[i] for i in pushed}  # renewals at the same value only


@given(nodes_strategy(), st.floats(0.0, 1.0), st.data())
@settings(max_examples=100)
def test_jitter_within_the_band_moves_each_lease_at_most_twice(nodes, f, data) -> None:
    budget = floors(nodes) + f * (ceilings(nodes) - floors(nodes))
    committed: dict[str, float] = {}
    for _ in range(3):
        _, committed = period(budget, nodes, committed)
    changes = dict.fromkeys(committed, 0)
    for _ in range(20):
        jittered = [
            replace(
                n,
                demand_w={
                    p: max(0.0, v + data.draw(st.floats(-1.0, 1.0))) for p, v in n.demand_w.items()
                },
            )
            for n in nodes
        ]
        _, after = period(budget, jittered, committed)
        for i in after:
            if abs(after[i] - committed.get(i, 0.0)) > EPS:
                changes[i] = changes.get(i, 0) + 1
        committed = after
    assert max(changes.values(), default=0) <= 2, changes


def test_a_share_within_the_deadband_is_renewed_as_it_is() -> None:
    a = NodeDemand("a", 400, 4000, {"high": 1000})
    p = plan(10_000, [a], {"a": 3960})  # share is the ceiling, 40 W < 80 W band away
    assert p.first == {"a": 3960} and p.raises == {}
    p = plan(10_000, [a], {"a": 3900})  # 100 W away: raised
    assert p.first == {} and p.raises == {"a": 4000}
    assert Bands().deadband_w(4000) == 80.0 and Bands().deadband_w(1000) == 50.0


def test_a_decrease_inside_the_band_happens_when_the_budget_needs_it() -> None:
    # 40 nodes each 10 W over their share (inside the 50 W band), and a newcomer needing room
    old = [NodeDemand(f"n{i:02d}", 100, 1000) for i in range(40)]
    committed = {n.instance: 250.0 for n in old}
    new = NodeDemand("new", 100, 1000)
    p = plan(10_000, [*old, new], committed)
    assert p.raises["new"] == pytest.approx(10_000 / 41)
    total = math.fsum(p.first.values()) + p.raises["new"]
    assert total <= 10_000 + EPS
    assert p.forced  # some renewals became decreases although inside the band


def test_increases_wait_for_an_unanswered_decrease() -> None:
    a = NodeDemand("a", 100, 1000, {"high": 900})
    b = NodeDemand("b", 100, 1000)
    committed = {"a": 200.0, "b": 800.0}  # b must give a its power back
    p = plan(1000, [a, b], committed)
    assert p.first["b"] < 800 and "a" in p.raises
    # b did not answer: it may still hold 800 W, so a gets only what was free
    assert grant(1000, p, committed, {"a": 100, "b": 100}) == {}
    # b answered: a gets what b released
    released = {"a": 200.0, "b": p.first["b"]}
    assert grant(1000, p, released, {"a": 100, "b": 100}) == {"a": pytest.approx(p.raises["a"])}


def test_held_nodes_keep_their_share_out_of_the_split() -> None:
    a = NodeDemand("a", 100, 1000, {"high": 1000})
    p = plan(1000, [a], {}, held={"gone": 600.0})
    assert p.split.budget_w == 400 and p.raises == {"a": 400}


def test_a_new_node_gets_no_lease_below_its_floor() -> None:
    a = NodeDemand("a", 300, 1000)
    p = plan(1000, [a], {})
    assert grant(1000, p, {"other": 800.0}, {"a": 300}) == {}  # only 200 W free: wait
    assert grant(1000, p, {"other": 600.0}, {"a": 300}) == {"a": 400.0}


@given(st.data())
@settings(max_examples=100)
def test_nodes_joining_and_leaving_keep_the_invariants(data) -> None:
    pool = data.draw(nodes_strategy(min_size=2, max_size=8))
    budget = floors(pool) + data.draw(st.floats(0.0, 1.0)) * (ceilings(pool) - floors(pool))
    present = {n.instance for n in pool[: len(pool) // 2 + 1]}
    committed: dict[str, float] = {}
    held_for: dict[str, int] = {}  # a node that left: periods until its lease could expire
    for _ in range(10):
        event = data.draw(st.sampled_from(["join", "leave", "steady"]))
        names = sorted(n.instance for n in pool)
        who = data.draw(st.sampled_from(names))
        if event == "join" and who not in present and who not in held_for:
            present.add(who)
        elif event == "leave" and who in present and len(present) > 1:
            present.discard(who)
            if who in committed:
                held_for[who] = data.draw(st.integers(1, 3))
        held = {i: committed[i] for i in held_for}
        nodes = [n for n in pool if n.instance in present]
        pushed, committed = period(budget, nodes, committed, held=held)
        assert not set(pushed) & set(held)
        assert math.fsum(committed.values()) <= budget + EPS
        for n in nodes:
            if n.instance in pushed:
                assert pushed[n.instance] >= n.floor_w - EPS
        for i in list(held_for):  # released once its lease could have expired
            held_for[i] -= 1
            if held_for[i] == 0:
                del held_for[i]
                committed.pop(i, None)
