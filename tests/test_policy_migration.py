"""The migration planner on a simulated node: which job moves, where, why, and when it must not.

Each node runs the planner after every policy period as the agent's control loop does: the
engine steps, ``plan(engine.last_inputs, decisions)`` runs, and each move goes to the registry
(``request_migration``); the simulated jobs follow their ``target_gpu`` like ``wattwarden job
run`` (stop, lose the steps since the last checkpoint, resume on the new GPU).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from wattwarden.collectors.store import GpuView
from wattwarden.hardware.device import ClockEvent
from wattwarden.nodesim import SimJob, SimNode
from wattwarden.policies.base import Decision, Intent, PolicyInputs
from wattwarden.policies.capping import BudgetCapper
from wattwarden.policies.migration import CRITICAL_XIDS, THERMAL_EVENTS, Migrator, Move
from wattwarden.policies.thermal import ceiling_c

ALERTS = Path(__file__).resolve().parent.parent / "deploy/prometheus/rules/alerts.yml"
H100_MIN_W = 200.0
H100_CEILING_C = 87.0  # the simulated H100's max operating temperature (below its 90 C slowdown)


@dataclass
class Capper:
    """What the planner reads of the budget capper, set by hand."""

    starving: frozenset[int] = frozenset()
    unreachable: bool = False


@dataclass
class Fixed:
    """A policy holding fixed limits (stands in for the capper's or the guard's)."""

    limits: Mapping[int, float]
    name: str = "fixed"

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        return [Intent(gpu, w, f"fixed {w:g} W") for gpu, w in self.limits.items()]


@dataclass
class Planned:
    """One move and what the planner saw when it made it."""

    at_s: float
    move: Move
    views: dict[int, GpuView]


@dataclass
class Loop:
    """The control loop's migration step: plan, then ask the registry for each move."""

    migrator: Migrator
    planned: list[Planned] = field(default_factory=list)

    def __call__(self, node: SimNode, decisions: list[Decision]) -> None:
        inputs = node.engine.last_inputs
        assert inputs is not None
        views = {v.sample.info.index: v for v in inputs.snapshot.gpus}
        for move in self.migrator.plan(inputs, decisions):
            self.planned.append(Planned(node.clock(), move, views))
            node.jobs.request_migration(move.job, move.to_gpu)

    @property
    def moves(self) -> list[Move]:
        return [p.move for p in self.planned]


def make_node(
    state_dir: Path, gpus: int = 4, migrator: Migrator | None = None, **kwargs: object
) -> tuple[SimNode, Loop]:
    loop = Loop(migrator or Migrator())
    node = SimNode(gpus, state_dir=state_dir, after_period=[loop], **kwargs)  # type: ignore[arg-type]
    return node, loop


# ------------------------------------------------------------------------------------- lost
def test_a_lost_gpus_job_restarts_elsewhere_and_resumes_from_its_checkpoint(tmp_path: Path):
    node, loop = make_node(tmp_path)
    job = node.add_job(SimJob("lm", 2, checkpoint_every=10, restart_s=5.0))
    node.add_job(SimJob("other", 0))
    node.run(25)
    done = job.steps
    assert done > job.checkpoint == 20
    node.fleet[2].inject("lost")
    node.run(1.5)
    ((move,),) = [loop.moves]
    assert (move.job, move.from_gpu, move.reason) == ("lm", 2, "lost")
    assert move.to_gpu in (1, 3)  # an idle GPU, not the busy GPU 0
    assert job.steps == 20.0  # it lost the steps since its checkpoint, nothing before it
    node.run(10)
    assert node.jobs.get("lm").gpu == move.to_gpu
    assert node.fleet[move.to_gpu].true_utilization() > 0.8
    assert job.moves == [(2, move.to_gpu, job.moves[0][2])]
    assert job.steps > 20.0  # progress again, from the checkpoint
    assert "GPU 2 is lost: job lm (normal) restarts on GPU" in move.detail


def test_every_job_of_a_lost_gpu_leaves_one_per_period_the_high_priority_one_first(
    tmp_path: Path,
):
    node, loop = make_node(tmp_path)
    node.add_job(SimJob("low", 1, priority="low", utilization=0.4))
    node.add_job(SimJob("high", 1, priority="high", utilization=0.4))
    node.run(5)
    node.fleet[1].inject("lost")
    node.run(1)
    assert [m.job for m in loop.moves] == ["high"]
    node.run(1)
    assert [m.job for m in loop.moves] == ["high", "low"]
    assert loop.moves[0].to_gpu != loop.moves[1].to_gpu  # fewest jobs first: spread out
    assert all(m.reason == "lost" for m in loop.moves)


# -------------------------------------------------------------------------------------- xid
@pytest.mark.parametrize("xid", sorted(CRITICAL_XIDS - {79}))
def test_a_critical_xid_moves_the_gpus_job(tmp_path: Path, xid: int):
    node, loop = make_node(tmp_path)
    job = node.add_job(SimJob("lm", 1))
    node.run(5)
    node.fleet[1].inject("xid", xid=xid)
    node.run(2)
    ((move,),) = [loop.moves]
    assert (move.job, move.from_gpu, move.reason) == ("lm", 1, "xid")
    assert f"GPU 1 reported XID {xid}" in move.detail
    node.run(25)
    assert job.gpu == move.to_gpu == node.jobs.get("lm").gpu != 1


@pytest.mark.parametrize("xid", [13, 31, 43, 94])
def test_a_non_critical_xid_moves_nothing(tmp_path: Path, xid: int):
    node, loop = make_node(tmp_path)
    node.add_job(SimJob("lm", 1))
    node.run(5)
    node.fleet[1].inject("xid", xid=xid)
    node.run(30)
    assert node.store.snapshot().gpus[1].sample.xid_counts == {xid: 1}  # it was counted
    assert loop.moves == []


def test_a_gpu_with_a_critical_xid_is_never_a_target(tmp_path: Path):
    node, loop = make_node(tmp_path, gpus=3)
    node.add_job(SimJob("lm", 0))
    node.add_job(SimJob("busy", 1))
    node.run(2)
    node.fleet[2].inject("xid", xid=48)  # GPU 2: idle but faulty; GPU 1: busy but healthy
    node.run(2)
    node.fleet[0].inject("lost")
    node.run(2)
    assert [(m.job, m.to_gpu) for m in loop.moves] == [("lm", 1)]


def test_a_critical_xid_counted_before_a_job_arrived_does_not_move_it(tmp_path: Path):
    node, loop = make_node(tmp_path)
    node.run(2)
    node.fleet[1].inject("xid", xid=48)
    node.run(2)
    node.add_job(SimJob("lm", 1))  # an operator put it there after the XID, knowingly
    node.run(30)
    assert loop.moves == []


def test_the_critical_xids_are_the_alert_rules(tmp_path: Path):
    rules = yaml.safe_load(ALERTS.read_text())
    (rule,) = [
        r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "GpuXidErrorCritical"
    ]
    sets = {
        frozenset(int(x) for x in m.split("|")) for m in re.findall(r'xid=~"([^"]+)"', rule["expr"])
    }
    assert sets == {CRITICAL_XIDS}


def test_the_thermal_clock_event_bits_are_the_drivers():
    assert ClockEvent(THERMAL_EVENTS) == ClockEvent.SW_THERMAL | ClockEvent.HW_THERMAL


# ---------------------------------------------------------------------------------- thermal
def test_an_overheating_gpus_job_moves_to_a_cool_gpu(tmp_path: Path):
    node, loop = make_node(tmp_path)
    node.add_job(SimJob("hot", 0))
    node.add_job(SimJob("busy", 1))
    node.fleet[3].inject("overheat", delta_c=50)  # idle, yet warm: 84 C, within 10 C of 87 C
    node.run(120)
    assert loop.moves == []
    node.fleet[0].inject("overheat", delta_c=30)
    node.run(120)
    ((planned,),) = [loop.planned]
    move = planned.move
    assert (move.job, move.from_gpu, move.to_gpu, move.reason) == ("hot", 0, 2, "thermal")
    hot = planned.views[0].sample.reading
    assert (
        hot is not None and hot.temperature_gpu_c is not None and hot.clock_event_mask is not None
    )
    # at its throttle point, or held just under it by the driver's thermal slowdown
    assert hot.temperature_gpu_c >= H100_CEILING_C or hot.clock_event_mask & ClockEvent.SW_THERMAL
    assert "GPU 0 at " in move.detail and (
        "throttle point" in move.detail or "slowed for heat" in move.detail
    )
    target_then = planned.views[2].sample.reading.temperature_gpu_c  # type: ignore[union-attr]
    assert target_then is not None and target_then <= H100_CEILING_C - 10
    assert node.sim_jobs["hot"].gpu == 2 and node.fleet[2].true_utilization() > 0.8


def test_stale_readings_move_nothing_and_fresh_ones_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    node, loop = make_node(tmp_path)
    node.after_period.clear()  # the planner joins once the GPU is hot
    node.add_job(SimJob("hot", 0))
    node.fleet[0].inject("overheat", delta_c=40)
    node.run(90)
    node.after_period.append(loop)
    node.clock.advance(10.0)  # the sampler stalls: every reading is 10 s old
    with caplog.at_level(logging.WARNING, logger="wattwarden.policies.migration"):
        node.period()
    assert loop.moves == []
    assert caplog.records == []  # not even tried: no "no GPU is fit" either
    node.run(2)
    assert [(m.job, m.reason) for m in loop.moves] == [("hot", "thermal")]


def test_an_overheating_gpu_sheds_its_lowest_priority_job_first(tmp_path: Path):
    node, loop = make_node(tmp_path)
    node.add_job(SimJob("high", 0, priority="high", utilization=0.3))
    node.add_job(SimJob("low", 0, priority="low", utilization=0.3))
    node.add_job(SimJob("normal", 0, priority="normal", utilization=0.3))
    node.fleet[0].inject("overheat", delta_c=40)
    node.run(60)
    assert loop.moves[0].job == "low" and loop.moves[0].reason == "thermal"
    assert "high" not in [m.job for m in loop.moves[:2]]  # it is the last to go, if at all


def test_a_gpu_still_hot_at_its_minimum_limit_sheds_its_job_after_hot_for_s(tmp_path: Path):
    # held at its 200 W minimum, a 41 C heat step settles the die at 30 + 41 + 13 = 84 C:
    # within 5 C of its 87 C throttle point, never over it; capping cannot do more
    migrator = Migrator(hot_for_s=30.0)
    node, loop = make_node(
        tmp_path, migrator=migrator, policies=[Fixed({0: H100_MIN_W})], mode="apply"
    )
    node.add_job(SimJob("warm", 0))
    node.fleet[0].inject("overheat", delta_c=41)
    hot_since: list[float] = []

    def watch(n: SimNode) -> None:
        view = n.store.snapshot().gpus[0]
        temp = view.sample.reading.temperature_gpu_c  # type: ignore[union-attr]
        assert temp is not None and temp < H100_CEILING_C
        if not hot_since and temp >= H100_CEILING_C - 5 and not loop.moves:
            hot_since.append(n.clock())

    node.run(200, on_pass=watch)
    ((planned,),) = [loop.planned]
    assert planned.move.reason == "thermal" and planned.move.from_gpu == 0
    assert planned.at_s - hot_since[0] >= 30.0 - 1.0  # one period of slack for the pass grid
    assert "at its minimum limit" in planned.move.detail
    node.close()


def test_a_hot_gpu_that_capping_still_cools_keeps_its_job(tmp_path: Path):
    # the same heat step at a 300 W limit that is not the minimum: 30 + 30 + 19.5 = 79.5 C
    node, loop = make_node(tmp_path, policies=[Fixed({0: 300.0})], mode="apply")
    node.add_job(SimJob("warm", 0))
    node.fleet[0].inject("overheat", delta_c=30)
    node.run(200)
    assert loop.moves == []
    node.close()


# ---------------------------------------------------------------------------------- cooldown
def test_cooldown_keeps_a_moved_job_in_place_until_it_has_passed(tmp_path: Path):
    node, loop = make_node(tmp_path, gpus=3, migrator=Migrator(cooldown_s=300.0))
    job = node.add_job(SimJob("lm", 0, restart_s=5.0))
    node.fleet[0].inject("overheat", delta_c=40)
    node.run(90)
    ((first,),) = [loop.moves]
    assert first.from_gpu == 0 and first.reason == "thermal"
    node.fleet[0].inject("clear")
    node.fleet[first.to_gpu].inject("overheat", delta_c=40)
    node.run(150)  # its new GPU is over its throttle point now, but it moved under 300 s ago
    assert len(loop.moves) == 1 and job.gpu == first.to_gpu
    node.run(150)  # past the cooldown: it moves on
    assert [(m.from_gpu, m.reason) for m in loop.moves[1:]] == [(first.to_gpu, "thermal")]
    assert loop.planned[1].at_s - loop.planned[0].at_s >= 300.0


def test_a_lost_gpu_overrides_the_cooldown_but_never_sends_a_job_straight_back(tmp_path: Path):
    node, loop = make_node(tmp_path, gpus=3)
    job = node.add_job(SimJob("lm", 0, restart_s=2.0))
    node.run(2)
    node.fleet[0].inject("lost")
    node.run(5)
    node.fleet[0].inject("clear")  # it came back, cool and idle
    first = loop.moves[0].to_gpu
    node.fleet[first].inject("lost")
    node.run(5)
    assert [(m.from_gpu, m.reason) for m in loop.moves] == [(0, "lost"), (first, "lost")]
    assert loop.moves[1].to_gpu == 3 - first  # not GPU 0, which it left a moment ago
    assert job.gpu == 3 - first


FAULTS = st.one_of(
    st.tuples(st.just("overheat"), st.sampled_from([20, 30, 45, 60])),
    st.tuples(st.just("xid"), st.sampled_from([13, 48, 79, 94, 119])),
    st.tuples(st.sampled_from(["lost", "clear"]), st.just(0)),
)


@settings(max_examples=30, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.integers(0, 3), FAULTS, st.integers(5, 60)), min_size=1, max_size=6
    ),
    priorities=st.lists(st.sampled_from(["high", "normal", "low"]), min_size=3, max_size=3),
)
def test_no_job_moves_twice_within_the_cooldown_and_every_target_was_fit(
    events: list[tuple[int, tuple[str, int], int]], priorities: list[str]
):
    cooldown_s = 120.0
    margin_c = 5.0
    with tempfile.TemporaryDirectory() as d:
        node, loop = make_node(
            Path(d), migrator=Migrator(cooldown_s=cooldown_s, hot_margin_c=margin_c), interval_s=0.5
        )
        for i, priority in enumerate(priorities):
            node.add_job(SimJob(f"j{i}", i, priority=priority, restart_s=10.0))
        node.add_job(SimJob("pinned", 3, migratable=False))
        node.run(5)
        for gpu, (fault, value), wait_s in events:
            if fault == "overheat":
                node.fleet[gpu].inject(fault, delta_c=value)
            elif fault == "xid":
                node.fleet[gpu].inject(fault, xid=value)
            else:
                node.fleet[gpu].inject(fault)
            node.run(wait_s)
        node.run(60)
    event(f"{min(len(loop.planned), 3)}+ moves")
    last: dict[str, Planned] = {}
    per_period: dict[float, list[int]] = {}
    for p in loop.planned:
        move = p.move
        assert move.job != "pinned"
        before = last.get(move.job)
        if before is not None and p.at_s - before.at_s < cooldown_s:
            # only a job that cannot run where it is moves again, and never straight back
            assert move.reason == "lost" and not p.views[move.from_gpu].sample.up
            assert move.to_gpu != before.move.from_gpu
        last[move.job] = p
        target = p.views[move.to_gpu].sample
        assert target.up and target.reading is not None
        temp = target.reading.temperature_gpu_c
        ceiling = ceiling_c(target.info)
        assert temp is not None and ceiling is not None and temp < ceiling - margin_c
        assert not set(target.xid_counts) & CRITICAL_XIDS
        per_period.setdefault(p.at_s, []).extend([move.from_gpu, move.to_gpu])
    for gpus in per_period.values():
        assert len(gpus) == len(set(gpus))  # one move per GPU per period


# ------------------------------------------------------------------------ who never moves
def test_a_non_migratable_job_never_moves(tmp_path: Path):
    node, loop = make_node(tmp_path)
    pinned = node.add_job(SimJob("pinned", 1, migratable=False, utilization=0.4))
    node.add_job(SimJob("free", 1, utilization=0.4))
    node.run(2)
    node.fleet[1].inject("lost")
    node.run(30)
    assert [m.job for m in loop.moves] == ["free"]
    assert pinned.gpu == 1 and node.jobs.get("pinned").target_gpu is None


def test_no_suitable_target_means_no_move_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    node, loop = make_node(tmp_path, gpus=3)
    node.add_job(SimJob("lm", 0))
    node.fleet[1].inject("overheat", delta_c=50)  # idle at 84 C: too warm to take a job
    node.fleet[2].inject("xid", xid=95)
    node.run(60)
    with caplog.at_level(logging.WARNING, logger="wattwarden.policies.migration"):
        node.fleet[0].inject("lost")
        node.run(30)
    assert loop.moves == []
    said = [r.getMessage() for r in caplog.records if "no GPU is fit" in r.getMessage()]
    assert said == [
        "migration: GPU 0 is lost, but no GPU is fit to take job lm (normal): none is up, "
        "cool, free of critical XIDs and unclaimed; it stays"
    ]


# ---------------------------------------------------------------------------------- budget
def test_a_starving_gpu_sheds_its_low_priority_sharer_onto_a_gpu_already_at_its_limit(
    tmp_path: Path,
):
    # GPU 0: a high-priority job shares its 450 W with a low one; GPU 1: a low job held at its
    # 200 W minimum (it draws it all); GPU 2: idle. Moving the low job to the idle GPU would
    # add its power to the node; moving it to GPU 1 adds nothing (GPU 1 cannot draw more).
    capper = Capper()
    node, loop = make_node(
        tmp_path,
        gpus=3,
        migrator=Migrator(capper=capper),
        policies=[Fixed({0: 450.0, 1: H100_MIN_W, 2: H100_MIN_W})],
        mode="apply",
    )
    high = node.add_job(SimJob("high", 0, priority="high", utilization=0.6, restart_s=5.0))
    node.add_job(SimJob("low", 0, priority="low", utilization=0.4, restart_s=5.0))
    node.add_job(SimJob("other", 1, priority="low", utilization=0.9))
    node.run(20)
    assert loop.moves == []  # the capper feeds every high-priority job: nothing to do
    power_before = node.power_w()
    rate_before = node.fleet[0].relative_throughput()
    capper.starving = frozenset({0})
    node.run(1)
    capper.starving = frozenset()  # fed once the low job has left
    steps = high.steps
    node.run(20)
    ((move,),) = [loop.moves]
    assert (move.job, move.from_gpu, move.to_gpu, move.reason) == ("low", 0, 1, "budget")
    assert "already at its 200 W limit" in move.detail
    assert node.power_w() <= power_before + 1.0
    assert node.fleet[0].relative_throughput() > rate_before
    assert high.steps > steps and node.sim_jobs["low"].gpu == 1
    node.close()


@pytest.mark.parametrize("budget_w", [800.0, 900.0])
def test_with_the_budget_capper_the_high_priority_job_gains_and_node_power_does_not(
    tmp_path: Path, budget_w: float
):
    # the real capper on the same three GPUs, with and without the planner: sharing GPU 0, the
    # high-priority job is starved by the budget; moved, its low-priority sharer joins the GPU
    # the capper already holds at its minimum
    runs = {}
    for migrate in (False, True):
        capper = BudgetCapper(lambda: budget_w)
        node, loop = make_node(
            tmp_path / str(migrate),
            gpus=3,
            migrator=Migrator(capper=capper),
            policies=[capper],
            mode="apply",
        )
        if not migrate:
            node.after_period.clear()
        node.store.set_power_budget("node", budget_w)
        high = node.add_job(SimJob("high", 0, priority="high", utilization=0.6, restart_s=5.0))
        node.add_job(SimJob("low", 0, priority="low", utilization=0.4, restart_s=5.0))
        node.add_job(SimJob("other", 1, priority="low", utilization=0.9))
        powers: list[float] = []
        node.run(30)
        node.run(90, on_pass=lambda n, p=powers: p.append(n.power_w()))
        runs[migrate] = (high.steps, sum(powers) / len(powers), max(powers), loop.moves)
        node.close()
    (steps_kept, mean_kept, _, _), (steps_moved, mean_moved, peak_moved, moves) = (
        runs[False],
        runs[True],
    )
    assert [(m.job, m.from_gpu, m.to_gpu, m.reason) for m in moves] == [("low", 0, 1, "budget")]
    assert steps_moved > steps_kept * 1.1
    assert mean_moved <= mean_kept + 1.0 and peak_moved <= budget_w


def test_a_starving_gpu_with_only_idle_gpus_to_go_to_moves_nothing_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    capper = Capper(starving=frozenset({0}))
    node, loop = make_node(
        tmp_path, gpus=3, migrator=Migrator(capper=capper), policies=[Fixed({0: 450.0})]
    )
    node.add_job(SimJob("high", 0, priority="high", utilization=0.6))
    node.add_job(SimJob("low", 0, priority="low", utilization=0.4))
    with caplog.at_level(logging.WARNING, logger="wattwarden.policies.migration"):
        node.run(30)
    assert loop.moves == []
    said = [r.getMessage() for r in caplog.records if "no move helps" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("migration: GPU(s) 0 starve a high-priority job")


def test_a_high_priority_job_is_never_moved_for_the_budget(tmp_path: Path):
    capper = Capper(starving=frozenset({0}), unreachable=True)
    node, loop = make_node(
        tmp_path,
        gpus=2,
        migrator=Migrator(capper=capper),
        policies=[Fixed({0: H100_MIN_W, 1: H100_MIN_W})],
        mode="apply",
    )
    node.store.set_power_budget("node", 300.0)
    node.add_job(SimJob("a", 0, priority="high", utilization=0.5))
    node.add_job(SimJob("b", 0, priority="high", utilization=0.5))
    node.add_job(SimJob("c", 1, priority="high"))
    node.run(30)
    assert loop.moves == []
    node.close()


def test_an_unreachable_budget_consolidates_two_low_jobs_and_node_power_falls(tmp_path: Path):
    # three GPUs at their 200 W minimum against a 500 W budget: two low jobs share one GPU,
    # the third GPU idles at about 70 W; never onto the normal job's GPU
    capper = Capper()
    node, loop = make_node(
        tmp_path,
        gpus=3,
        migrator=Migrator(capper=capper),
        policies=[Fixed({0: H100_MIN_W, 1: H100_MIN_W, 2: H100_MIN_W})],
        mode="apply",
    )
    node.store.set_power_budget("node", 500.0)
    node.add_job(SimJob("n", 0, priority="normal"))
    node.add_job(SimJob("l1", 1, priority="low", restart_s=5.0))
    node.add_job(SimJob("l2", 2, priority="low", restart_s=5.0))
    node.run(10)
    power_before = node.power_w()
    assert power_before > 500.0 and loop.moves == []
    capper.unreachable = True
    node.run(30)
    ((move,),) = [loop.moves]
    assert move.reason == "budget" and {move.from_gpu, move.to_gpu} == {1, 2}
    assert "the budget is unreachable" in move.detail
    assert node.power_w() < power_before - 100.0  # the freed GPU idles
    node.close()


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"cooldown_s": -1.0}, "cooldown_s"),
        ({"hot_for_s": float("nan")}, "hot_for_s"),
        ({"hot_margin_c": 12.0}, "target_margin_c"),
        ({"bind_fraction": 1.0}, "bind_fraction"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs: dict[str, float], named: str):
    with pytest.raises(ValueError, match=named):
        Migrator(**kwargs)  # type: ignore[arg-type]
