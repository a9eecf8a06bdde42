"""The control loop (policies/control.py) on a whole simulated node, on the simulator's clock.

Each policy period of a :class:`~wattwarden.nodesim.SimNode` runs the :class:`PolicyLoop`, so
what the loop promises (which policies run, steering between periods, a failing policy holding
it, moves asked of the job supervisors, the journal, the period grid, the budget met within two
periods) is checked on the simulator's physics, pass by pass, without threads or wall time. The
agent around it (API, health, metrics, status) is tested in test_agent_policy.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

from wattwarden.nodesim import WALL_OFFSET_S, SimJob, SimNode
from wattwarden.policies.base import Decision, Intent, Policy, PolicyInputs
from wattwarden.policies.control import (
    BUDGET_RANGE_W,
    KEEP_MOVES,
    PERIOD_RANGE_S,
    POLICY_NAMES,
    MoveRecord,
    PolicyFailed,
    PolicyLoop,
    PolicySettings,
    build_policy,
    check_budget,
)
from wattwarden.policies.migration import Move

H100_MIN_W, H100_MAX_W = 200.0, 700.0


class CapTo:
    """A policy that wants one limit on some GPUs; it raises while ``fail`` says so."""

    def __init__(self, name: str, watts: float, gpus: Iterable[int] = (0,)) -> None:
        self._name = name
        self.watts = watts
        self.gpus = tuple(gpus)
        self.fail: Exception | None = None
        self.calls = 0

    @property
    def name(self) -> str:
        return self._name

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return [Intent(g, self.watts, f"{self._name} wants {self.watts:g} W") for g in self.gpus]


@dataclass
class Rig:
    node: SimNode
    loop: PolicyLoop
    built: dict[str, list[Policy]]
    """Every policy object the loop's factory built, by name (a switch on builds a new one)."""

    def policy(self, name: str) -> Any:
        return self.built[name][-1]


def rig(
    tmp_path: Path,
    gpus: int = 4,
    *,
    stubs: dict[str, Callable[[], Policy]] | None = None,
    **loop: Any,
) -> Rig:
    """A simulated node whose every policy period runs the loop (the real policies by default,
    or ``stubs`` in their place)."""
    built: dict[str, list[Policy]] = {}

    def factory(name: str, cfg: PolicySettings, budget: Callable[[], float | None]) -> Policy:
        made = (stubs or {}).get(name)
        policy = made() if made is not None else build_policy(name, cfg, budget)
        built.setdefault(name, []).append(policy)
        return policy

    holder: list[PolicyLoop] = []
    node = SimNode(gpus, state_dir=tmp_path, after_period=[lambda n, d: holder[0].period()])
    holder.append(
        PolicyLoop(
            store=node.store,
            jobs=node.jobs,
            actuator=node.actuator,
            factory=factory,
            monotonic=node.clock,
            wall=node.wall,
            **loop,
        )
    )
    return Rig(node, holder[0], built)


def test_by_default_the_thermal_guard_runs_and_budget_capping_while_a_budget_is_set(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path)
    assert r.loop.active() == {"thermal": True, "budget": False, "idle": False, "tuner": False}
    r.loop.update(budget_w=1680.0)
    assert r.loop.active() == {"thermal": True, "budget": True, "idle": False, "tuner": False}
    assert r.node.store.snapshot().power_budgets_w == {"node": 1680.0}
    r.loop.update(budget_w=None)
    assert r.loop.active()["budget"] is False
    assert r.node.store.snapshot().power_budgets_w == {}
    with_budget = rig(tmp_path / "b", budget_w=2000.0)
    assert [n for n, on in with_budget.loop.active().items() if on] == ["thermal", "budget"]


def test_an_explicit_list_of_policies_is_what_runs_whatever_the_budget(tmp_path: Path) -> None:
    r = rig(tmp_path, policies=["idle", "tuner"], budget_w=2000.0)
    assert [n for n, on in r.loop.active().items() if on] == ["idle", "tuner"]
    r.loop.update(policies="none")
    assert not any(r.loop.active().values())
    r.loop.update(budget_w=1500.0)  # a budget does not bring capping back into an explicit list
    assert not any(r.loop.active().values())
    status = r.loop.update(policies=["budget"])
    assert status.policies == {"thermal": False, "budget": True, "idle": False, "tuner": False}
    assert [p.name for p in r.loop.engine.policies] == list(POLICY_NAMES)  # always composed


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"budget_w": 0.5, "mode": "apply", "policies": ["idle"]}, "power_budget_watts"),
        ({"budget_w": 900.0, "mode": "fast", "policies": ["idle"]}, "mode"),
        ({"budget_w": 900.0, "mode": "apply", "policies": ["idle", "cooling"]}, "policies"),
    ],
)
def test_an_update_checks_every_field_before_changing_anything(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    r = rig(tmp_path, budget_w=2000.0)
    before = r.loop.status()
    with pytest.raises(ValueError, match=f"^{field} "):
        r.loop.update(**change)
    assert r.loop.status() == before
    assert r.node.store.snapshot().power_budgets_w == {"node": 2000.0}


def test_a_policy_switched_off_gives_its_gpus_back_and_one_switched_on_starts_afresh(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0, (0, 2))}, policies=["idle"],
            mode="apply")  # fmt: skip
    r.node.run(2)
    assert r.node.limits_w() == [300.0, 700.0, 300.0, 700.0]
    first = r.policy("idle")
    r.loop.update(policies=[])
    r.node.run(2)
    assert r.node.limits_w() == [700.0] * 4
    assert first.calls == 2  # not asked since it was switched off
    r.loop.update(policies=["idle"])
    assert r.policy("idle") is not first and len(r.built["idle"]) == 2


def test_leaving_apply_mode_restores_every_limit_before_the_answer(tmp_path: Path) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 250.0, (0, 1, 3))},
            policies=["idle"], mode="apply")  # fmt: skip
    r.node.run(2)
    assert r.node.limits_w() == [250.0, 250.0, 700.0, 250.0]
    status = r.loop.update(mode="dry_run")
    assert r.node.limits_w() == [700.0] * 4  # no period ran: the switch itself restored them
    assert (status.mode, status.restore_failures) == ("dry_run", ())
    r.node.run(5)
    assert r.node.limits_w() == [700.0] * 4


def test_dry_run_changes_no_limit_yet_decides_targets_and_journals_what_it_would_do(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path, policies=["idle"], settings=PolicySettings(idle_after_s=5.0))
    seen: set[float] = set()
    r.node.run(20, on_pass=lambda n: seen.update(n.limits_w()))
    assert seen == {H100_MAX_W}
    snap = r.node.store.snapshot()
    assert snap.power_limit_targets_w == dict.fromkeys(range(4), H100_MIN_W)
    sets = [d for d in r.loop.decisions() if isinstance(d, Decision)]
    assert [(d.gpu, d.action, d.policy, d.mode, d.from_w, d.watts) for d in sets] == [
        (g, "set", "idle", "dry_run", H100_MAX_W, H100_MIN_W) for g in range(4)
    ]  # one set each, then keeps
    journalled = r.node.actuator.journalled_decisions()
    assert [(j.gpu, j.action, j.mode, j.to_watts) for j in journalled] == [
        (g, "set", "dry_run", H100_MIN_W) for g in range(4)
    ]
    assert r.node.actuator.originals() == {}  # nothing to restore: nothing was changed
    assert snap.policy_state is not None and snap.policy_state.mode == "dry_run"


def test_a_failing_policy_holds_the_loop_is_logged_once_counted_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0)}, policies=["idle"],
            mode="apply")  # fmt: skip
    r.node.run(2)
    assert r.node.limits_w()[0] == 300.0
    policy = r.policy("idle")
    policy.watts = 400.0
    policy.fail = ZeroDivisionError("division by zero")
    with caplog.at_level(logging.ERROR, logger="wattwarden.policies.control"):
        r.node.run(5)
    assert r.node.limits_w()[0] == 300.0  # held where it was, not back to 700 W
    status = r.loop.status()
    assert status.holding == "policy idle failed: ZeroDivisionError: division by zero"
    assert (status.errors_total, status.last_error) == (5, status.holding)
    assert [rec.getMessage() for rec in caplog.records] == [
        f"policy engine holds: {status.holding}"
    ]
    snap = r.node.store.snapshot()
    assert snap.policy_state is not None and snap.policy_state.holding
    policy.fail = None
    r.node.run(2)
    assert r.node.limits_w()[0] == 400.0
    assert r.loop.holding is None and r.loop.status().errors_total == 5
    assert not r.node.store.snapshot().policy_state.holding  # type: ignore[union-attr]


class Planner:
    """A migration planner that wants the moves it is given, once each."""

    def __init__(self, *moves: Move) -> None:
        self.moves = list(moves)
        self.capper: Any = None

    def plan(self, inputs: PolicyInputs, decisions: Any) -> list[Move]:
        moves, self.moves = self.moves, []
        return moves


@pytest.mark.parametrize("mode", ["apply", "dry_run"])
def test_a_move_is_asked_of_the_jobs_supervisor_in_apply_and_only_recorded_in_dry_run(
    tmp_path: Path, mode: str
) -> None:
    planner = Planner(Move("train", 1, 3, "thermal", "GPU 1 runs hot at its minimum"))
    r = rig(tmp_path, migrator=planner, mode=mode)  # type: ignore[arg-type]
    r.node.add_job(SimJob("train", 1, restart_s=2.0))
    r.node.run(5)
    moved = mode == "apply"
    assert r.node.jobs.get("train").gpu == (3 if moved else 1)
    assert r.node.store.snapshot().migrations == {
        "budget": 0, "thermal": 1 if moved else 0, "xid": 0, "lost": 0,
    }  # fmt: skip
    (record,) = [d for d in r.loop.decisions() if isinstance(d, MoveRecord)]
    assert (record.job, record.from_gpu, record.to_gpu, record.reason, record.mode) == (
        "train", 1, 3, "thermal", mode,
    )  # fmt: skip
    assert record.explanation == (
        "move job train from GPU 1 to GPU 3 (thermal): GPU 1 runs hot at its minimum"
    )
    counted = r.node.store.snapshot().policy_decisions
    assert counted[("migration", "migrate", mode)] == 1
    journalled = r.node.actuator.journalled_decisions()
    assert [(j.action, j.gpu, j.jobs, j.mode) for j in journalled] == [
        ("migrate", 1, "train", mode)
    ]


def test_a_move_of_a_job_that_is_gone_is_recorded_with_the_refusal(tmp_path: Path) -> None:
    r = rig(tmp_path, migrator=Planner(Move("ghost", 0, 2, "lost")), mode="apply")  # type: ignore[arg-type]
    r.node.run(1)
    (move,) = [d for d in r.loop.decisions() if not isinstance(d, Decision)]
    assert move.error == "no job named 'ghost'"
    assert r.node.store.snapshot().migrations["lost"] == 0


def test_a_failing_planner_holds_moves_but_not_the_limits_decided(tmp_path: Path) -> None:
    planner = Planner()
    planner.plan = lambda inputs, decisions: 1 / 0  # type: ignore[assignment,method-assign]
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0)}, policies=["idle"],
            migrator=planner, mode="apply")  # fmt: skip
    r.node.run(2)
    assert r.node.limits_w()[0] == 300.0
    assert r.loop.holding == "policy migration failed: ZeroDivisionError: division by zero"


def test_the_journal_gets_sets_and_holds_as_they_start_but_no_keeps(tmp_path: Path) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0, (0, 1))}, policies=["idle"],
            mode="apply")  # fmt: skip
    r.node.run(3)
    r.node.fleet[1].inject("lost")
    r.node.run(3)
    rows = [(j.gpu, j.action, j.policy) for j in r.node.actuator.journalled_decisions()]
    assert rows == [(0, "set", "idle"), (1, "set", "idle"), (1, "hold", "engine")]
    assert r.loop.holding == "GPU 1 is lost"


class SteppingStop:
    """The loop's stop event, on a manual clock: each wait lets the time pass; stops after n."""

    def __init__(self, node: SimNode, waits: int) -> None:
        self.node = node
        self.waits: list[float] = []
        self.left = waits

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        self.node.clock.advance(timeout)
        self.left -= 1
        return self.left <= 0

    def set(self) -> None:
        self.left = 0


class Slow:
    """A policy whose period takes ``costs_s`` of the clock, one after the other."""

    def __init__(self, costs_s: list[float]) -> None:
        self.node: SimNode | None = None
        self.costs_s = costs_s
        self.started: list[float] = []
        self.name = "idle"

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        assert self.node is not None
        self.started.append(self.node.clock())
        self.node.clock.advance(self.costs_s.pop(0) if self.costs_s else 0.25)
        return ()


def test_periods_keep_to_a_grid_and_a_late_one_skips_ticks_instead_of_bunching(
    tmp_path: Path,
) -> None:
    slow = Slow([0.25, 0.25, 2.5, 0.25, 0.25])
    r = rig(tmp_path, stubs={"idle": lambda: slow}, policies=["idle"], period_s=1.0)
    slow.node = r.node
    stop = SteppingStop(r.node, waits=5)
    r.loop._stop = stop  # type: ignore[assignment]
    start = r.node.clock()
    r.loop._run()
    starts = [t - start for t in slow.started]
    # on the grid (no drift from the 0.25 s each period takes), then a 2.5 s period: the next
    # one starts at once, and the grid goes on from there
    assert starts == [0.0, 1.0, 2.0, 4.5, 5.5]
    assert stop.waits == [0.75, 0.75, 0.0, 0.75, 0.75]


def test_the_journal_is_pruned_at_start_and_then_hourly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rig(tmp_path, period_s=600.0, journal_retention_s=86400.0)
    pruned: list[tuple[float, float]] = []
    monkeypatch.setattr(r.node.actuator, "prune", lambda s: pruned.append((r.node.clock(), s)) or 0)
    r.loop._stop = SteppingStop(r.node, waits=13)  # type: ignore[assignment]
    start = r.node.clock()
    r.loop._run()  # 13 periods of 600 s: 2 hours
    assert [(t - start, s) for t, s in pruned] == [(0.0, 86400.0), (3600.0, 86400.0),
                                                   (7200.0, 86400.0)]  # fmt: skip


def test_the_thread_runs_periods_until_closed(tmp_path: Path) -> None:
    node = SimNode(2, state_dir=tmp_path)
    loop = PolicyLoop(store=node.store, jobs=node.jobs, actuator=node.actuator, period_s=0.1)
    loop.start()
    wait_for(lambda: loop.periods >= 3, timeout_s=30, what="three periods")
    loop.close()
    assert loop._thread is not None and not loop._thread.is_alive()
    done = loop.periods
    assert not loop._stop.wait(0.3) or loop.periods == done


def test_every_gpu_loaded_and_a_budget_of_60_percent_is_met_within_two_periods(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path, gpus=8, mode="apply", budget_w=0.6 * 8 * H100_MAX_W)
    budget = 0.6 * 8 * H100_MAX_W
    r.node.run(5)
    for gpu in r.node.fleet.gpus:
        gpu.set_load(1.0)
    over: list[float] = []
    r.node.run(2.0 + r.node.interval_s, on_pass=lambda n: over.append(n.power_w()))
    assert over[-1] <= budget
    r.node.run(30, on_pass=lambda n: over.append(n.power_w()))
    assert max(over[len(over) - 300 :]) <= budget
    assert all(H100_MIN_W <= w <= H100_MAX_W for w in r.node.limits_w())


def test_a_period_that_fails_outside_the_policies_is_logged_once_and_the_thread_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Flip(CapTo):
        def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
            self.watts = 700.0 - self.watts  # 300, 400, 300 ...: a set to journal each period
            return super().intents(inputs)

    r = rig(tmp_path, stubs={"idle": lambda: Flip("idle", 400.0)}, policies=["idle"],
            period_s=1.0)  # fmt: skip
    tried: list[object] = []

    def disk_full(rows: object) -> None:
        tried.append(rows)
        raise OSError("No space left on device")

    monkeypatch.setattr(r.node.actuator, "journal_decisions", disk_full)
    r.loop._stop = SteppingStop(r.node, waits=4)  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="wattwarden.policies.control"):
        r.loop._run()
    assert r.loop.periods == len(tried) == 4
    assert [rec.getMessage() for rec in caplog.records] == ["policy period failed"]


@pytest.mark.parametrize("tune_all", [False, True])
def test_each_policy_is_built_with_the_agent_settings_of_its_name(tune_all: bool) -> None:
    settings = PolicySettings(
        thermal_margin_c=7.0, idle_after_s=42.0, tune_eta=0.8, max_slowdown=0.1,
        tune_all_jobs=tune_all,
    )  # fmt: skip
    tuner: Any = build_policy("tuner", settings, lambda: None)
    assert (tuner.eta, tuner.max_slowdown, tuner.tune_all) == (0.8, 0.1, tune_all)
    thermal: Any = build_policy("thermal", settings, lambda: None)
    idle: Any = build_policy("idle", settings, lambda: None)
    assert (thermal.margin_c, idle.idle_after_s) == (7.0, 42.0)


# ------------------------------------------------------------ bounds, messages, what the loop keeps
def test_a_budget_and_a_period_exactly_at_their_upper_bounds_are_accepted(tmp_path: Path) -> None:
    assert check_budget(BUDGET_RANGE_W[1]) == BUDGET_RANGE_W[1]
    r = rig(tmp_path, period_s=PERIOD_RANGE_S[1])
    assert r.loop.period_s == PERIOD_RANGE_S[1]
    with pytest.raises(ValueError, match=r"^period_s must be within 0.1..3600, got 3601$"):
        rig(tmp_path, period_s=3601)


def test_an_unknown_policy_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError) as e:
        build_policy("greedy", PolicySettings(), lambda: None)
    assert str(e.value) == "unknown policy 'greedy'; known: thermal, budget, idle, tuner"


def test_a_policy_failure_names_the_policy() -> None:
    failed = PolicyFailed("idle", ZeroDivisionError("division by zero"))
    assert failed.policy == "idle"
    assert str(failed) == "policy idle failed: ZeroDivisionError: division by zero"


def test_decisions_are_stamped_with_the_loops_wall_clock(tmp_path: Path) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0)}, policies=["idle"])
    r.node.run(1)
    (first, *_) = r.loop.decisions()
    assert WALL_OFFSET_S <= first.timestamp_s <= r.node.wall()


def test_a_new_loop_has_no_failure_and_no_hold(tmp_path: Path) -> None:
    status = rig(tmp_path).loop.status()
    assert (status.last_error, status.holding, status.errors_total) == (None, None, 0)


def test_a_gpu_lost_before_the_first_period_is_journalled_as_held(tmp_path: Path) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0, (0, 1))}, policies=["idle"],
            mode="apply")  # fmt: skip
    r.node.fleet[1].inject("lost")
    r.node.run(2)
    rows = [(j.gpu, j.action, j.policy) for j in r.node.actuator.journalled_decisions()]
    assert rows == [(0, "set", "idle"), (1, "hold", "engine")]


def test_leaving_apply_reports_the_limits_it_could_not_restore(tmp_path: Path) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0)}, policies=["idle"],
            mode="apply")  # fmt: skip
    r.node.run(2)
    r.node.fleet[0].inject("lost")
    status = r.loop.update(mode="dry_run")
    assert status.mode == "dry_run"
    assert len(status.restore_failures) == 1 and "GPU 0" in status.restore_failures[0]


@pytest.mark.parametrize(("limit", "count"), [(None, 3), (3, 3), (2, 2), (1, 1), (0, 0), (-1, 0)])
def test_decisions_with_a_limit_are_the_latest_that_many(
    tmp_path: Path, limit: int | None, count: int
) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0, (0, 1, 2))}, policies=["idle"])
    r.node.run(1)
    everything = r.loop.decisions()
    assert len(everything) == 3
    got = r.loop.decisions(limit)
    assert got == (everything[len(everything) - count :] if count else [])


def test_steering_logs_only_what_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = rig(tmp_path, budget_w=2000.0)
    with caplog.at_level(logging.INFO, logger="wattwarden.policies.control"):
        r.loop.update(budget_w=2000.0)
        assert caplog.messages == []
        r.loop.update(budget_w=1500.0)
        assert caplog.messages == ["power budget: 1500 W"]
        caplog.clear()
        r.loop.update(policies=["thermal", "idle"])
    assert caplog.messages == ["policy budget off", "policy idle on"]


def test_a_period_failing_outside_a_policy_holds_with_the_errors_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rig(tmp_path)

    def broken(jobs: object) -> list[Decision]:
        raise RuntimeError("store gone")

    monkeypatch.setattr(r.loop.engine, "step", broken)
    r.loop.period()
    assert r.loop.status().last_error == "RuntimeError: store gone"


def test_with_no_retention_nothing_is_pruned(tmp_path: Path) -> None:
    r = rig(tmp_path, journal_retention_s=None)
    assert r.loop.prune_journal() == 0


def test_the_loop_runs_on_a_named_daemon_thread_that_close_stops(tmp_path: Path) -> None:
    node = SimNode(2, state_dir=tmp_path)
    loop = PolicyLoop(store=node.store, jobs=node.jobs, actuator=node.actuator, period_s=0.1)
    loop.start()
    try:
        assert loop._thread is not None
        assert (loop._thread.name, loop._thread.daemon) == ("wattwarden-policy", True)
        assert loop._thread in threading.enumerate()
    finally:
        loop.close()
    assert not loop._thread.is_alive()


def test_a_failing_prune_is_logged_by_name_once_per_distinct_error_and_again_after_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig(tmp_path, period_s=3600.0)
    errors: list[Exception | None] = [
        OSError("disk"), OSError("disk"), ValueError("disk"), None, ValueError("disk"),
    ]  # fmt: skip

    def prune(older_than_s: float) -> int:
        e = errors.pop(0)
        if e is not None:
            raise e
        return 0

    monkeypatch.setattr(r.node.actuator, "prune", prune)
    r.loop._stop = SteppingStop(r.node, waits=5)  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="wattwarden.policies.control"):
        r.loop._run()  # one prune per period of an hour
    assert errors == []
    assert caplog.messages == ["journal pruning failed"] * 3


def test_journal_rows_hold_what_was_decided(tmp_path: Path) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0, (0, 1))}, policies=["idle"],
            mode="apply")  # fmt: skip
    r.node.add_job(SimJob("train", 0))
    r.node.add_job(SimJob("eval", 0))
    r.node.fleet[1].inject("no_permission")
    r.node.run(1)
    rows = {j.gpu: j for j in r.node.actuator.journalled_decisions() if j.action == "set"}
    assert (rows[0].from_watts, rows[0].to_watts, rows[0].jobs, rows[0].error) == (
        700.0, 300.0, "eval,train", None,
    )  # fmt: skip
    assert rows[1].error == "GPU 1: setting the power limit needs root"


def test_a_refused_move_is_journalled_with_its_refusal(tmp_path: Path) -> None:
    r = rig(tmp_path, migrator=Planner(Move("ghost", 0, 2, "lost")), mode="apply")  # type: ignore[arg-type]
    r.node.run(1)
    (row,) = [j for j in r.node.actuator.journalled_decisions() if j.action == "migrate"]
    assert (row.policy, row.jobs, row.error) == ("migration", "ghost", "no job named 'ghost'")


def test_an_unreachable_budget_is_published_to_the_store(tmp_path: Path) -> None:
    r = rig(tmp_path, budget_w=100.0, mode="apply")  # below four GPUs at their minimum
    r.node.run(2)
    state = r.node.store.snapshot().policy_state
    assert r.loop.budget_unreachable() is True
    assert state is not None and state.budget_unreachable is True


def test_the_planner_is_given_the_budget_capper_in_force(tmp_path: Path) -> None:
    planner = Planner()
    r = rig(tmp_path, budget_w=2000.0, migrator=planner)  # type: ignore[arg-type]
    r.node.run(1)
    assert planner.capper is r.policy("budget")


def test_a_budget_policy_that_is_not_the_capper_is_not_read_as_one(tmp_path: Path) -> None:
    planner = Planner()
    r = rig(tmp_path, stubs={"budget": lambda: CapTo("budget", 300.0)}, policies=["budget"],
            migrator=planner)  # type: ignore[arg-type]  # fmt: skip
    r.node.run(1)
    assert r.loop.budget_unreachable() is False
    assert planner.capper is None


def test_after_recovering_the_loop_reports_no_last_error(tmp_path: Path) -> None:
    r = rig(tmp_path, stubs={"idle": lambda: CapTo("idle", 300.0)}, policies=["idle"])
    r.node.run(1)
    r.policy("idle").fail = ZeroDivisionError("division by zero")
    r.node.run(1)
    assert r.loop.status().last_error is not None
    r.policy("idle").fail = None
    r.node.run(1)
    assert r.loop.status().last_error is None


def test_the_move_history_keeps_the_latest_1000(tmp_path: Path) -> None:
    moves = [Move(f"job{i}", 0, 1, "budget") for i in range(KEEP_MOVES + 1)]
    r = rig(tmp_path, migrator=Planner(*moves))  # type: ignore[arg-type]
    r.node.run(1)
    kept = [d for d in r.loop.decisions() if isinstance(d, MoveRecord)]
    assert len(kept) == KEEP_MOVES == 1000
    assert (kept[0].job, kept[-1].job) == ("job1", f"job{KEEP_MOVES}")
