"""The budget allocator: minimums first, then needs by priority (water-filled), then maximums."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.policies.budget import (
    DEFAULT_MARGIN_W,
    Allocation,
    GpuDemand,
    allocate,
    need_w,
)

EPS_W = 1e-6
RANK = {"high": 0, "normal": 1, "low": 2}
H100_MIN_W, H100_MAX_W = 200.0, 700.0
FAST = settings(max_examples=150, deadline=None)  # the file in under 5 s


def h100(gpu: int, demand_w: float, priority: str = "low") -> GpuDemand:
    return GpuDemand(gpu, H100_MIN_W, H100_MAX_W, demand_w, priority)


# one node: 600 W high, 650 W and 500 W normal, and an idle GPU without a job (needs its minimum)
NODE = [h100(0, 600.0, "high"), h100(1, 650.0, "normal"), h100(2, 500.0, "normal"), h100(3, 100.0)]


PRIORITIES = list(RANK)
PRIORITY = st.sampled_from(PRIORITIES)
# milliwatts, as NVML counts them: minimum, range above it, draw
DRAWN_GPU = st.tuples(st.integers(0, 400_000), st.integers(0, 600_000), st.integers(0, 10**6))


def gpu_demand(gpu: int, drawn: tuple[int, int, int], priority: str) -> GpuDemand:
    min_mw, range_mw, demand_mw = drawn
    return GpuDemand(gpu, min_mw / 1000, (min_mw + range_mw) / 1000, demand_mw / 1000, priority)


@st.composite
def fleets(draw: st.DrawFn) -> list[GpuDemand]:
    n = draw(st.integers(1, 64))  # drawn first: a list strategy alone rarely grows past 20
    drawn = draw(st.lists(st.tuples(DRAWN_GPU, PRIORITY), min_size=n, max_size=n))
    gpus = [gpu_demand(i, bounds, priority) for i, (bounds, priority) in enumerate(drawn)]
    return draw(st.permutations(gpus))  # the allocator must not depend on the input order


def budgets(gpus: list[GpuDemand]) -> st.SearchStrategy[float]:
    """Any budget up to past the maximums, with extra weight near where the split changes regime."""
    mins = math.fsum(g.min_w for g in gpus)
    needs = sum(need_w(g) for g in gpus)
    maxes = sum(g.max_w for g in gpus)
    near = [st.floats(max(0.0, x - 20.0), x + 20.0) for x in (mins, needs, maxes)]
    return st.one_of(st.floats(0.0, 1.2 * maxes + 1.0), *near)


def check_bounds(gpus: list[GpuDemand], result: Allocation) -> None:
    assert sorted(result.limits_w) == sorted(g.gpu for g in gpus)
    assert sorted(result.reasons) == sorted(g.gpu for g in gpus)
    for g in gpus:
        assert g.min_w <= result.limits_w[g.gpu] <= g.max_w


def test_a_node_with_room_to_spare_meets_every_need_then_spreads_the_rest_by_priority() -> None:
    result = allocate(2400.0, NODE)
    # minimums 800 W; needs (draw + 5 %): 630, 682.5, 525 and the idle GPU's minimum 200 W;
    # the 362.5 W left go to the maximums, high first: 70 W, then 17.5 + 175 W, then 100 W
    assert result.limits_w == {0: 700.0, 1: 700.0, 2: 700.0, 3: 300.0}
    assert (result.unreachable, result.shortfall_w) == (False, 0.0)
    assert result.reasons[0] == "high priority: 700 W of a 2400 W budget (demand 600 W)"
    assert result.reasons[3] == "low priority: 300 W of a 2400 W budget (demand 100 W)"


def test_a_tight_budget_meets_the_high_need_and_water_fills_the_normal_ones() -> None:
    result = allocate(2000.0, NODE)
    # 1200 W above the minimums: high takes 430 W (to 630), normal has 770 W for needs of 482.5 +
    # 325 W; the 525 W GPU stops at its need and the other rises alone to 645 W
    assert result.limits_w == {0: 630.0, 1: 645.0, 2: 525.0, 3: 200.0}
    assert sum(result.limits_w.values()) == 2000.0
    assert result.reasons[0] == "high priority: 630 W of a 2000 W budget (demand 600 W)"
    assert result.reasons[1] == (
        "normal priority: 645 W of a 2000 W budget (demand 650 W), below the 682 W it could use"
    )


def test_within_a_priority_the_biggest_draws_are_capped_first() -> None:
    gpus = [h100(i, d, "normal") for i, d in enumerate([300.0, 450.0, 690.0, 690.0])]
    # needs 315, 472.5, 700, 700; 400 W above the 800 W of minimums past the two small needs
    result = allocate(315.0 + 472.5 + 2 * 500.0, gpus)
    assert result.limits_w == {0: 315.0, 1: 472.5, 2: 500.0, 3: 500.0}


def test_low_priority_gets_what_high_and_normal_leave_and_never_below_its_minimum() -> None:
    gpus = [h100(0, 700.0, "high"), h100(1, 700.0, "normal"), h100(2, 700.0, "low")]
    result = allocate(1500.0, gpus)
    assert result.limits_w == {0: 700.0, 1: 600.0, 2: 200.0}


def test_an_unreachable_budget_holds_every_gpu_at_its_minimum_and_says_by_how_much() -> None:
    result = allocate(700.0, NODE)
    assert result.unreachable
    assert result.shortfall_w == 100.0
    assert result.limits_w == {0: 200.0, 1: 200.0, 2: 200.0, 3: 200.0}
    assert result.reasons[2] == (
        "budget unreachable: held at its minimum 200 W, the minimums need 800 W of a 700 W "
        "budget (100 W short)"
    )


def test_a_budget_equal_to_the_minimums_is_reachable_and_a_watt_less_is_not() -> None:
    result = allocate(800.0, NODE)
    assert (result.unreachable, result.shortfall_w) == (False, 0.0)
    assert result.limits_w == {0: 200.0, 1: 200.0, 2: 200.0, 3: 200.0}
    assert (allocate(799.0, NODE).unreachable, allocate(799.0, NODE).shortfall_w) == (True, 1.0)


def test_the_need_is_the_draw_plus_the_larger_margin_within_the_bounds() -> None:
    assert need_w(h100(0, 600.0)) == 630.0  # 5 %
    assert need_w(h100(0, 150.0)) == H100_MIN_W  # 150 + 10 W, raised to the minimum
    assert need_w(h100(0, 195.0)) == 195.0 + DEFAULT_MARGIN_W  # 10 W beats 5 % of 195
    assert need_w(h100(0, 690.0)) == H100_MAX_W
    assert need_w(h100(0, 600.0), margin_fraction=0.1, margin_w=0.0) == 660.0


def test_an_empty_node_gets_an_empty_allocation() -> None:
    assert allocate(100.0, []) == Allocation(100.0, {}, False, 0.0, {})


@pytest.mark.parametrize(
    ("budget_w", "gpus", "message"),
    [
        (-1.0, NODE, "budget_w must be a finite number >= 0, got -1.0"),
        (float("nan"), NODE, "budget_w must be a finite number >= 0, got nan"),
        (100.0, [h100(1, 1.0), h100(1, 2.0)], "GPU 1 is listed twice"),
        (100.0, [GpuDemand(2, 300.0, 200.0, 0.0)], "GPU 2: min_w 300 is above max_w 200"),
        (100.0, [h100(0, float("inf"))], "GPU 0: demand_w must be a finite number >= 0, got inf"),
        (100.0, [h100(3, 1.0, "urgent")], "GPU 3: priority must be one of high, normal, low"),
    ],
)
def test_bad_inputs_are_refused_naming_the_gpu_and_the_field(
    budget_w: float, gpus: list[GpuDemand], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        allocate(budget_w, gpus)


def test_a_negative_margin_is_refused() -> None:
    with pytest.raises(ValueError, match="margin_w must be a finite number >= 0"):
        allocate(100.0, NODE, margin_w=-1.0)


@FAST
@given(st.data())
def test_limits_stay_in_bounds_and_spend_a_reachable_budget_exactly_or_hold_at_the_minimums(
    data: st.DataObject,
) -> None:
    gpus = data.draw(fleets())
    budget_w = data.draw(budgets(gpus))
    result = allocate(budget_w, gpus)
    check_bounds(gpus, result)
    mins = math.fsum(g.min_w for g in gpus)
    assert result.unreachable == (mins > budget_w)
    if result.unreachable:
        assert result.shortfall_w == mins - budget_w
        assert result.limits_w == {g.gpu: g.min_w for g in gpus}
        return
    assert result.shortfall_w == 0.0
    total = sum(result.limits_w.values())
    assert total <= budget_w + EPS_W
    if any(result.limits_w[g.gpu] < g.max_w for g in gpus):  # no budget unused below a maximum
        assert total >= budget_w - EPS_W


@FAST
@given(st.data())
def test_raising_the_budget_never_lowers_a_limit(data: st.DataObject) -> None:
    gpus = data.draw(fleets())
    budget_w = data.draw(budgets(gpus))
    more_w = budget_w + data.draw(st.floats(0.0, 2000.0))
    before, after = allocate(budget_w, gpus), allocate(more_w, gpus)
    for g in gpus:
        assert after.limits_w[g.gpu] >= before.limits_w[g.gpu] - EPS_W


@FAST
@given(st.data())
def test_a_higher_priority_never_gets_less_than_a_lower_one_with_the_same_bounds_and_draw(
    data: st.DataObject,
) -> None:
    gpus = data.draw(fleets())
    drawn, one, other = data.draw(st.tuples(DRAWN_GPU, PRIORITY, PRIORITY))
    gpus += [gpu_demand(len(gpus), drawn, one), gpu_demand(len(gpus) + 1, drawn, other)]
    result = allocate(data.draw(budgets(gpus)), gpus)
    a, b = sorted(gpus[-2:], key=lambda g: RANK[g.priority])
    assert result.limits_w[a.gpu] >= result.limits_w[b.gpu] - EPS_W


@FAST
@given(st.data())
def test_a_budget_that_covers_every_need_meets_every_need(data: st.DataObject) -> None:
    gpus = data.draw(fleets())
    needs = {g.gpu: need_w(g) for g in gpus}
    budget_w = sum(needs.values()) + data.draw(st.floats(0.0, 1000.0))
    result = allocate(budget_w, gpus)
    for g in gpus:
        assert result.limits_w[g.gpu] >= needs[g.gpu] - EPS_W
