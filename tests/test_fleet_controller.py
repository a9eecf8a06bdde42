"""The fleet controller's loop on a manual clock, with a fake Prometheus reader and fake agents."""

from __future__ import annotations

import gc
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from wattwarden.fleet.allocate import Bands
from wattwarden.fleet.controller import ControllerSettings, FleetController
from wattwarden.fleet.leases import AgentUnreachable, Lease, PushResult
from wattwarden.fleet.prom import PrometheusError, Readings, Sample, Target
from wattwarden.fleet.schedulers import JobRef, MoveResult

START_WALL = 1_800_000_000.0


class Clock:
    """A monotonic and a wall clock that move together, only when told to."""

    def __init__(self) -> None:
        self.mono_s = 100.0
        self.wall_s = START_WALL

    def mono(self) -> float:
        return self.mono_s

    def wall(self) -> float:
        return self.wall_s

    def advance(self, seconds: float) -> None:
        self.mono_s += seconds
        self.wall_s += seconds


@dataclass
class FakeNode:
    """One node's series, as Prometheus would answer them."""

    floor: float = 800.0  # 4 GPUs of 200..700 W
    ceiling: float = 2800.0
    power: float = 1000.0
    demand: dict[str, float] = field(default_factory=dict)
    starving: bool = False
    lease: float | None = None
    age_s: float = 1.0  # of its series
    up: bool = True


class FakeReader:
    """Answers readings built from ``nodes``; raises while ``down`` is set."""

    def __init__(self, clock: Clock, nodes: dict[str, FakeNode]) -> None:
        self.clock, self.nodes = clock, nodes
        self.down: str | None = None
        self.reads = 0

    def read(self, at_s: float) -> Readings:
        self.reads += 1
        if self.down is not None:
            raise PrometheusError(self.down)
        res: dict[str, list[Sample]] = {k: [] for k in ("up", "seen_at")}

        def add(name: str, instance: str, value: float, **labels: str) -> None:
            res.setdefault(name, []).append(Sample({"instance": instance, **labels}, value, at_s))

        for name, n in self.nodes.items():
            add("up", name, 1.0 if n.up else 0.0)
            add("seen_at", name, at_s - n.age_s)
            add("power", name, n.power)
            add("floor", name, n.floor)
            add("ceiling", name, n.ceiling)
            add("gpus_up", name, 4)
            add("gpus", name, 4)
            add("starving", name, 1.0 if n.starving else 0.0)
            for p, w in n.demand.items():
                add("demand", name, w, priority=p)
            if n.lease is not None:
                add("lease", name, n.lease)
        targets = [Target(i, "wattwarden", f"{i}:9767", "up", 1.0) for i in self.nodes]
        return Readings(at_s, res, targets)


class FakeLink:
    """Agents that answer pushes as told: ok unless listed unreachable, conflicting or refusing."""

    def __init__(self) -> None:
        self.pushes: list[Lease] = []
        self.leases: dict[str, dict[str, Any]] = {}  # address -> lease record
        self.unreachable: set[str] = set()
        self.conflict: set[str] = set()
        self.jobs_of: dict[str, list[dict[str, Any]]] = {}
        self.released: list[str] = []
        self._lock = threading.Lock()

    def push(self, lease: Lease) -> PushResult:
        with self._lock:
            self.pushes.append(lease)
        if lease.instance in self.unreachable:
            return PushResult(lease.instance, "unreachable", None, "connection refused", None)
        if lease.instance in self.conflict:
            msg = "lease held by controller 'other' (generation 1) for another 12.3 s"
            return PushResult(lease.instance, "conflict", 409, msg, None)
        self.leases[lease.instance] = {
            "power_budget_watts": lease.budget_w,
            "ttl_s": lease.ttl_s,
            "holder": lease.controller,
            "generation": lease.generation,
            "expires_at": START_WALL + 1e6,
            "remaining_s": lease.ttl_s,
        }
        return PushResult(lease.instance, "ok", 200, "", START_WALL + 1e6)

    def read_lease(self, instance: str) -> dict[str, Any] | None:
        if instance in self.unreachable:
            raise AgentUnreachable(instance, "connection refused")
        return self.leases.get(instance)

    def release(self, instance: str, controller: str) -> PushResult:
        self.released.append(instance)
        return PushResult(instance, "ok", 200, "", None)

    def jobs(self, instance: str) -> list[dict[str, Any]]:
        return self.jobs_of.get(instance, [])

    def pushed_to(self, instance: str) -> list[float]:
        return [p.budget_w for p in self.pushes if p.instance == instance]


class FakeScheduler:
    name = "slurm"

    def __init__(self) -> None:
        self.moves: list[JobRef] = []

    def move(self, job: JobRef) -> MoveResult:
        self.moves.append(job)
        return MoveResult("requested", "")


def make(
    nodes: dict[str, FakeNode],
    *,
    budget: float = 6000.0,
    apply: bool = True,
    clock: Clock | None = None,
    link: FakeLink | None = None,
    **kw: Any,
) -> tuple[FleetController, FakeReader, FakeLink, Clock]:
    clock = clock or Clock()
    reader = FakeReader(clock, nodes)
    link = link or FakeLink()
    settings = ControllerSettings(
        budget_w=budget,
        controller_id="ctl-a",
        period_s=5.0,
        lease_s=30.0,
        apply=apply,
        **kw,
    )
    ctl = FleetController(settings, reader, link, monotonic=clock.mono, wall=clock.wall)
    return ctl, reader, link, clock


def three_nodes() -> dict[str, FakeNode]:
    return {
        "a": FakeNode(demand={"high": 2000.0}),
        "b": FakeNode(demand={"normal": 1500.0}),
        "c": FakeNode(demand={"low": 300.0}),
    }


def leased(link: FakeLink) -> dict[str, float]:
    return {i: r["power_budget_watts"] for i, r in link.leases.items()}


# ------------------------------------------------------------------ modes
def test_dry_run_computes_and_exports_but_pushes_nothing() -> None:
    ctl, _, link, _ = make(three_nodes(), apply=False)
    report = ctl.period()
    assert link.pushes == []
    assert set(report.would_lease) == {"a", "b", "c"}
    assert math.fsum(report.would_lease.values()) <= 6000.0 + 1e-6
    state = ctl.metrics.state
    assert state.mode == "dry_run" and not state.holding
    assert state.node_budget_w == report.would_lease


def test_the_published_cluster_power_sums_the_fresh_nodes_reachable_or_not() -> None:
    nodes = {
        "a": FakeNode(power=1000.0, demand={"high": 900.0}),
        "b": FakeNode(power=1200.0, demand={"normal": 900.0}),
        "c": FakeNode(power=700.0, age_s=100.0),  # stale: its figure is not counted
        "d": FakeNode(power=900.0, up=False),  # fresh series, agent not scraped: counted
    }
    ctl, _, _, _ = make(nodes, budget=10_000.0)
    report = ctl.period()
    assert report.states == {"a": "ok", "b": "ok", "c": "stale", "d": "unreachable"}
    assert ctl.metrics.state.cluster_power_w == pytest.approx(3100.0)


def test_apply_pushes_every_node_a_lease_with_id_generation_and_ttl() -> None:
    ctl, _, link, _clock = make(three_nodes())
    ctl.period()
    assert {p.instance for p in link.pushes} == {"a:9767", "b:9767", "c:9767"}
    for p in link.pushes:
        assert (p.controller, p.generation, p.ttl_s) == ("ctl-a", int(START_WALL * 1000), 30.0)
    got = leased(link)
    assert math.fsum(got.values()) <= 6000.0 + 1e-6
    # high demand first: a gets its floor plus its 2000 W of high demand before b's normal
    assert got["a:9767"] >= 2800.0 - 1e-6
    assert ctl.metrics.pushes()["ok"] == 3


def test_a_steady_fleet_renews_the_same_leases_each_period() -> None:
    ctl, _, link, clock = make(three_nodes())
    ctl.period()
    first = leased(link)
    for _ in range(5):
        clock.advance(5.0)
        link.pushes.clear()
        ctl.period()
        assert {p.instance: p.budget_w for p in link.pushes} == first  # renewals, no change


# ------------------------------------------------------------------ Prometheus down
def test_prometheus_down_pushes_nothing_and_holds() -> None:
    ctl, reader, link, clock = make(three_nodes())
    ctl.period()
    link.pushes.clear()
    reader.down = "Prometheus http://127.0.0.1:9: no answer within 2 s"
    for _ in range(3):
        clock.advance(5.0)
        report = ctl.period()
        assert report.holding is not None
    assert link.pushes == []
    state = ctl.metrics.state
    assert state.holding and not state.prometheus_up
    assert "no answer" in state.holding_reason
    reader.down = None
    clock.advance(5.0)
    ctl.period()
    assert len(link.pushes) == 3 and not ctl.metrics.state.holding


def test_leases_forgotten_after_they_expire_while_prometheus_is_down() -> None:
    ctl, reader, _link, clock = make(three_nodes())
    ctl.period()
    reader.down = "down"
    clock.advance(31.0)  # past every lease's ttl: the agents are back on their local budgets
    ctl.period()
    assert ctl.metrics.state.node_budget_w == {}
    assert ctl.metrics.state.lease_expiry_min_s is None


# ------------------------------------------------------------------ unreachable agents
def test_an_unreachable_agent_keeps_its_share_until_its_series_go_stale() -> None:
    nodes = {
        "a": FakeNode(demand={"high": 2000.0}),
        "b": FakeNode(demand={"high": 2000.0}),
    }
    ctl, _reader, link, clock = make(nodes, budget=4000.0)
    ctl.period()
    b_share = leased(link)["b:9767"]
    assert b_share == pytest.approx(2000.0)
    link.unreachable.add("b:9767")
    nodes["a"].demand = {"high": 2800.0}  # a wants more: b's share must not go to it
    clock.advance(5.0)
    ctl.period()  # b's renewal finds it unreachable
    for _ in range(3):
        clock.advance(5.0)
        report = ctl.period()
        assert report.states["b"] == "unreachable"
        assert report.plan is not None
        assert report.plan.split.budget_w == pytest.approx(4000.0 - b_share)  # not split
        assert leased(link)["a:9767"] <= 4000.0 - b_share + 1e-6
        assert link.pushed_to("b:9767")[-1] == pytest.approx(b_share)  # renewal at its share
    # b's series go stale; its share is released once its lease could have expired
    nodes["b"].age_s = 1000.0
    clock.advance(5.0)
    report = ctl.period()
    assert report.states["b"] == "stale"
    assert leased(link)["a:9767"] <= 4000.0 - b_share + 1e-6
    clock.advance(31.0)
    ctl.period()
    assert leased(link)["a:9767"] == pytest.approx(2800.0)  # its ceiling, from b's release


def test_an_unreachable_agent_is_counted_and_logged_once(caplog) -> None:
    ctl, _, link, clock = make(three_nodes())
    link.unreachable.add("c:9767")
    with caplog.at_level(logging.INFO, "wattwarden.fleet.controller"):
        for _ in range(5):  # its lease read, then its pushes, fail each period
            ctl.period()
            clock.advance(5.0)
    said = [r.getMessage() for r in caplog.records if "node c" in r.getMessage()]
    assert said == ["node c: cannot read its lease: agent c:9767: connection refused"]
    assert len(link.pushed_to("c:9767")) == 5  # its floor, once a period
    assert ctl.metrics.pushes()["unreachable"] == 5


# ------------------------------------------------------------------ conflicts
def test_409_is_counted_held_and_retried_only_once_a_period(caplog) -> None:
    ctl, _, link, clock = make(three_nodes())
    link.conflict.add("b:9767")
    with caplog.at_level(logging.WARNING, "wattwarden.fleet.controller"):
        for _ in range(4):
            ctl.period()
            clock.advance(5.0)
    assert len(link.pushed_to("b:9767")) == 4  # one attempt per period, never more
    assert ctl.metrics.pushes()["conflict"] == 4
    said = [r for r in caplog.records if "409" in r.getMessage()]
    assert len(said) == 1


def test_another_controllers_live_lease_is_held_and_taken_over_when_it_expires() -> None:
    nodes = three_nodes()
    nodes["b"].lease = 1800.0
    link = FakeLink()
    link.leases["b:9767"] = {
        "power_budget_watts": 1800.0,
        "ttl_s": 30,
        "holder": "other",
        "generation": 5,
        "expires_at": START_WALL + 12,
        "remaining_s": 12.0,
    }
    link.conflict.add("b:9767")
    ctl, _, link, clock = make(nodes, link=link)
    report = ctl.period()
    assert report.states["b"] == "unreachable"
    others = math.fsum(v for k, v in leased(link).items() if k != "b:9767")
    assert others <= 6000.0 - 1800.0 + 1e-6  # its lease counts against the budget
    link.conflict.clear()  # the other controller's lease ran out
    nodes["b"].lease = None
    clock.advance(15.0)
    ctl.period()
    assert leased(link)["b:9767"] > 0 and link.leases["b:9767"]["holder"] == "ctl-a"


# ------------------------------------------------------------------ restarts
def test_a_restart_resumes_from_the_leases_in_force_without_a_spike() -> None:
    nodes = three_nodes()
    ctl, _, link, clock = make(nodes)
    ctl.period()
    before = leased(link)
    clock.advance(2.0)
    # a new process of the same controller: later generation, no memory, the agents' leases
    nodes["c"].demand = {"low": 320.0}  # a little drift: within the deadband
    restarted, _, link, _ = make(nodes, link=link, clock=clock)
    assert restarted.generation > ctl.generation
    link.pushes.clear()
    restarted.period()
    assert {p.instance: p.budget_w for p in link.pushes} == before
    assert all(p.generation == restarted.generation for p in link.pushes)


def test_a_node_joining_gets_a_lease_in_the_same_period_others_release() -> None:
    nodes = {"a": FakeNode(demand={"high": 2000.0}), "b": FakeNode(demand={"low": 2000.0})}
    ctl, _, link, clock = make(nodes, budget=5000.0)
    ctl.period()
    assert math.fsum(leased(link).values()) == pytest.approx(5000.0)
    nodes["c"] = FakeNode(demand={"high": 1000.0})
    clock.advance(5.0)
    ctl.period()
    got = leased(link)
    assert got["c:9767"] >= 1800.0 - 1e-6  # its floor and high demand, from b's low share
    assert math.fsum(got.values()) <= 5000.0 + 1e-6


def test_a_budget_below_the_floors_holds_every_node_at_its_floor() -> None:
    ctl, _, link, _ = make(three_nodes(), budget=2000.0)
    report = ctl.period()
    assert report.plan is not None and not report.plan.split.reachable
    assert set(leased(link).values()) <= {800.0}
    assert ctl.metrics.state.shortfall_w == pytest.approx(400.0)


# ------------------------------------------------------------------ migration
def starving_fleet() -> tuple[dict[str, FakeNode], FakeLink]:
    nodes = {
        "a": FakeNode(demand={"high": 2000.0, "low": 500.0}, starving=True),
        "b": FakeNode(demand={"high": 2000.0}),
    }
    link = FakeLink()
    link.jobs_of["a:9767"] = [
        {"name": "train", "state": "running", "priority": "high",
         "scheduler": {"kind": "slurm", "id": "11"}},
        {"name": "eval", "state": "running", "priority": "normal",
         "scheduler": {"kind": "slurm", "id": "12"}},
        {"name": "batch", "state": "running", "priority": "low",
         "scheduler": {"kind": "slurm", "id": "13"}},
        {"name": "local", "state": "running", "priority": "low"},
        {"name": "done", "state": "finished", "priority": "low",
         "scheduler": {"kind": "slurm", "id": "14"}},
    ]  # fmt: skip
    return nodes, link


def test_a_starving_node_gets_its_lowest_priority_job_moved_once_per_cooldown() -> None:
    nodes, link = starving_fleet()
    ctl, _, link, clock = make(nodes, budget=4400.0, link=link)
    sched = FakeScheduler()
    ctl.scheduler = sched
    ctl.period()
    assert [j.id for j in sched.moves] == ["13"]  # the low one, with a scheduler ref
    for _ in range(10):
        clock.advance(5.0)
        ctl.period()
    assert [j.id for j in sched.moves] == ["13", "12"]  # next period: the next one, once
    clock.advance(600.0)
    ctl.period()
    assert [j.id for j in sched.moves][-1] == "13"
    assert ctl.metrics.migrations()[("slurm", "requested")] == 3


def test_migration_is_only_logged_in_dry_run() -> None:
    nodes, link = starving_fleet()
    ctl, _, link, _ = make(nodes, budget=4400.0, link=link, apply=False)
    sched = FakeScheduler()
    ctl.scheduler = sched
    report = ctl.period()
    assert sched.moves == []
    assert [m.job.id for m in report.migrations] == ["13"]
    assert ctl.metrics.migrations() == {}


def test_no_migration_while_the_split_can_still_give_the_node_more() -> None:
    nodes, link = starving_fleet()
    ctl, _, link, _ = make(nodes, budget=10_000.0, link=link)
    sched = FakeScheduler()
    ctl.scheduler = sched
    ctl.period()
    assert sched.moves == []


# ------------------------------------------------------------------ the loop and exit
def test_run_stops_on_the_event_and_releases_only_when_asked() -> None:
    reader_nodes = three_nodes()
    for release in (False, True):
        ctl, reader, link, _ = make(reader_nodes, release_on_exit=release)
        ctl._mono = __import__("time").monotonic  # real time for the loop's waits
        stop = threading.Event()
        thread = threading.Thread(target=ctl.run, args=(stop,))
        thread.start()
        deadline = __import__("time").monotonic() + 30
        while reader.reads < 1 and __import__("time").monotonic() < deadline:
            stop.wait(0.01)  # polling for the first period, with a deadline
        stop.set()
        thread.join(30)
        assert not thread.is_alive()
        assert sorted(link.released) == (["a:9767", "b:9767", "c:9767"] if release else [])


def test_bands_come_from_the_settings() -> None:
    nodes = three_nodes()
    ctl, _, link, clock = make(nodes, bands=Bands(fraction=0.0, min_w=1.0))
    ctl.period()
    nodes["c"].demand = {"low": 320.0}
    nodes["b"].demand = {"normal": 1480.0}
    link.pushes.clear()
    clock.advance(5.0)
    ctl.period()
    assert leased(link)["c:9767"] != pytest.approx(800.0 + 300.0)  # a 1 W band moves it


def test_a_dry_run_beside_a_live_controller_plans_every_node_from_the_leases_in_force() -> None:
    link = FakeLink()
    for name in ("a", "b", "c"):
        link.leases[f"{name}:9767"] = {
            "power_budget_watts": 1500.0, "ttl_s": 30, "holder": "live",
            "generation": 1, "expires_at": START_WALL + 30, "remaining_s": 30.0,
        }  # fmt: skip
    ctl, _, link, _ = make(three_nodes(), apply=False, link=link)
    report = ctl.period()
    assert report.states == {"a": "ok", "b": "ok", "c": "ok"}
    assert link.pushes == [] and set(report.would_lease) == {"a", "b", "c"}


# ------------------------------------------------------------------ the garbage collector
class GcWatchingReader(FakeReader):
    """Notes whether automatic garbage collection is on while the period reads."""

    def __init__(self, clock: Clock, nodes: dict[str, FakeNode]) -> None:
        super().__init__(clock, nodes)
        self.gc_enabled: list[bool] = []
        self.inside = threading.Event()
        self.go_on = threading.Event()
        self.go_on.set()
        self.fail: Exception | None = None

    def read(self, at_s: float) -> Readings:
        self.gc_enabled.append(gc.isenabled())
        self.inside.set()
        assert self.go_on.wait(30)
        if self.fail is not None:
            raise self.fail
        return super().read(at_s)


def gc_watched(clock: Clock | None = None) -> tuple[FleetController, GcWatchingReader]:
    clock = clock or Clock()
    reader = GcWatchingReader(clock, three_nodes())
    settings = ControllerSettings(budget_w=6000.0, controller_id="ctl-a", apply=True)
    ctl = FleetController(settings, reader, FakeLink(), monotonic=clock.mono, wall=clock.wall)
    return ctl, reader


def test_a_period_runs_without_automatic_collection_and_restores_it_even_on_a_bug() -> None:
    assert gc.isenabled()
    ctl, reader = gc_watched()
    ctl.period()
    assert reader.gc_enabled == [False] and gc.isenabled()
    reader.fail = RuntimeError("a bug of ours")
    with pytest.raises(RuntimeError):
        ctl.period()
    assert reader.gc_enabled == [False, False] and gc.isenabled()
    gc.disable()  # whoever runs the controller turned it off: it stays off
    try:
        reader.fail = None
        ctl.period()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_periods_of_two_controllers_turn_collection_back_on_once_both_end() -> None:
    a, reader_a = gc_watched()
    b, _ = gc_watched()
    reader_a.go_on.clear()
    thread = threading.Thread(target=a.period)
    thread.start()
    try:
        assert reader_a.inside.wait(30)
        b.period()  # starts and ends while a's period runs
        assert not gc.isenabled()
    finally:
        reader_a.go_on.set()
        thread.join(30)
    assert gc.isenabled()


def test_a_node_problem_said_once_is_said_again_when_it_comes_back(caplog) -> None:
    ctl, _, link, clock = make(three_nodes())
    with caplog.at_level(logging.INFO, "wattwarden.fleet.controller"):
        for unreachable in (True, True, False, False, True, True):
            if unreachable:
                link.unreachable.add("c:9767")
            else:
                link.unreachable.discard("c:9767")
            ctl.period()
            clock.advance(5.0)
    said = [r.getMessage() for r in caplog.records if "node c: cannot read" in r.getMessage()
            or "node c: agent unreachable" in r.getMessage()]  # fmt: skip
    assert len(said) == 2, said
