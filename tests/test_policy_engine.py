"""The policy engine composes policies: lowest limit wins, reasons kept, stale means hold."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import MetricStore
from wattwarden.hardware.device import GpuInfo, GpuReading
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.policies.actuator import LimitActuator
from wattwarden.policies.base import Decision, Intent, Mode, Policy, PolicyInputs
from wattwarden.policies.engine import DEFAULT_STALE_AFTER_S, KEEP_DECISIONS, PolicyEngine

GPUS = 3
H100_DEFAULT_W = 700.0


@dataclass
class Fixed:
    """A trivial policy: the same limits every period."""

    name: str
    limits: Mapping[int, float]
    reason: str = "fixed"

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        return [Intent(gpu, w, f"{self.reason} {w:g} W") for gpu, w in self.limits.items()]


@dataclass
class LowPriorityAt:
    """A trivial policy over the job view: a GPU running a low-priority job gets ``watts``."""

    watts: float
    name: str = "low_priority"

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        return [
            Intent(j.gpu, self.watts, f"job {j.name} is low priority")
            for j in inputs.jobs
            if j.priority == "low"
        ]


@dataclass
class Node:
    fleet: SimFleet
    clock: ManualClock
    store: MetricStore
    collector: GpuCollector
    actuator: LimitActuator

    def sample(self) -> None:
        """One sampler pass into the store."""
        self.store.put(self.collector.collect())

    def engine(self, *policies: Policy, mode: Mode = "dry_run") -> PolicyEngine:
        return PolicyEngine(
            policies,
            self.actuator,
            self.store,
            mode=mode,
            monotonic=self.clock,
            wall=self.wall,
        )

    def wall(self) -> float:
        """The engines' wall clock: the decisions' timestamp."""
        return 1000.0 + self.clock()

    def limit(self, gpu: int) -> float:
        return float(self.fleet[gpu].state()["power_limit_w"])


@contextmanager
def node_at(directory: Path, min_interval_s: float = 0) -> Iterator[Node]:
    clock = ManualClock()
    fleet = SimFleet(GPUS, clock=clock)
    backend = SimBackend(fleet)
    store = MetricStore(monotonic=clock)
    actuator = LimitActuator(
        backend.devices(),
        directory / "journal.sqlite3",
        min_interval_s=min_interval_s,
        monotonic=clock,
    )
    node = Node(fleet, clock, store, GpuCollector(backend, monotonic=clock), actuator)
    node.sample()
    try:
        yield node
    finally:
        actuator.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with node_at(tmp_path) as n:
        yield n


def test_the_lowest_intended_limit_wins_and_every_policy_reason_is_kept(node: Node) -> None:
    engine = node.engine(Fixed("a", {0: 400.0}), Fixed("b", {0: 300.0, 1: 500.0}))
    decisions = engine.step([])
    assert [(d.gpu, d.action, d.policy, d.watts) for d in decisions] == [
        (0, "set", "b", 300.0),
        (1, "set", "b", 500.0),
    ]
    assert decisions[0].reason == "fixed 300 W"
    assert decisions[0].intents == {
        "a": Intent(0, 400.0, "fixed 400 W"),
        "b": Intent(0, 300.0, "fixed 300 W"),
    }
    assert decisions[0].timestamp_s == 1000.0 + node.clock()
    assert engine.decisions() == decisions


def test_a_policy_asking_twice_for_one_gpu_is_heard_at_its_lowest(node: Node) -> None:
    @dataclass
    class Twice:
        name: str = "twice"

        def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
            return [
                Intent(0, 400.0, "first"),
                Intent(0, 300.0, "second"),
                Intent(0, 350.0, "third"),
            ]

    (decision,) = node.engine(Twice()).step([])
    assert (decision.watts, decision.reason) == (300.0, "second")
    assert decision.intents == {"twice": Intent(0, 300.0, "second")}


def test_a_policy_asking_twice_at_one_limit_is_heard_with_its_first_reason(node: Node) -> None:
    @dataclass
    class Twice:
        name: str = "twice"

        def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
            return [Intent(0, 300.0, "first"), Intent(0, 300.0, "second")]

    (decision,) = node.engine(Twice()).step([])
    assert decision.intents == {"twice": Intent(0, 300.0, "first")}
    assert decision.reason == "first"


def test_policies_tied_at_the_lowest_limit_are_decided_by_name(node: Node) -> None:
    zeta, alpha = Fixed("zeta", {0: 300.0}, "a"), Fixed("alpha", {0: 300.0}, "z")
    (decision,) = node.engine(zeta, alpha).step([])
    assert (decision.policy, decision.reason, decision.watts) == ("alpha", "z 300 W", 300.0)
    assert decision.intents == {
        "zeta": Intent(0, 300.0, "a 300 W"),
        "alpha": Intent(0, 300.0, "z 300 W"),
    }


def test_dry_run_is_the_default_and_only_records_and_counts(node: Node) -> None:
    engine = PolicyEngine(
        [Fixed("cap", {0: 300.0, 2: 250.0})],
        node.actuator,
        node.store,
        monotonic=node.clock,
        wall=node.wall,
    )
    assert engine.mode == "dry_run"
    decisions = engine.step([])
    assert [(d.action, d.mode, d.enforced_w) for d in decisions] == [("set", "dry_run", None)] * 2
    assert engine.decisions() == decisions
    assert [node.limit(g) for g in range(GPUS)] == [H100_DEFAULT_W] * GPUS
    assert node.actuator.originals() == {}
    assert node.store.snapshot().policy_actions == {("cap", "set_power_limit", "dry_run"): 2}


def test_apply_sets_the_winning_limit_through_the_journalled_actuator(node: Node) -> None:
    engine = node.engine(Fixed("a", {1: 450.0}), Fixed("b", {1: 350.0}), mode="apply")
    (decision,) = engine.step([])
    assert (decision.action, decision.policy, decision.enforced_w) == ("set", "b", 350.0)
    assert node.limit(1) == 350.0
    uuid = node.fleet[1].uuid
    assert node.actuator.originals() == {uuid: (1, H100_DEFAULT_W)}
    assert node.store.snapshot().policy_actions == {("b", "set_power_limit", "apply"): 1}
    node.clock.advance(1.0)  # the enforced limit comes with the next full read
    node.sample()
    (again,) = engine.step([])
    assert again == Decision(
        1,
        "keep",
        "b",
        "fixed 350 W",
        350.0,
        "apply",
        node.wall(),
        {"a": Intent(1, 450.0, "fixed 450 W"), "b": Intent(1, 350.0, "fixed 350 W")},
        from_w=350.0,
    )
    assert again.enforced_w is None and again.error is None
    assert node.store.snapshot().policy_actions == {("b", "set_power_limit", "apply"): 1}


def test_stale_readings_hold_every_gpu_and_nothing_is_set(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0, 1: 300.0}), mode="apply")
    node.clock.advance(DEFAULT_STALE_AFTER_S + 0.5)  # the sampler stalled: no pass since
    decisions = engine.step([])
    assert [(d.gpu, d.action, d.policy, d.watts) for d in decisions] == [
        (0, "hold", "engine", None),
        (1, "hold", "engine", None),
    ]
    assert decisions[0] == Decision(
        0,
        "hold",
        "engine",
        "GPU 0 readings are 5.5 s old (stale after 5 s)",
        None,
        "apply",
        node.wall(),
        {"cap": Intent(0, 300.0, "fixed 300 W")},
    )
    assert node.limit(0) == node.limit(1) == H100_DEFAULT_W
    assert node.store.snapshot().policy_actions == {}


def test_readings_just_within_the_stale_limit_still_decide(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0}), mode="apply")
    node.clock.advance(DEFAULT_STALE_AFTER_S)
    (decision,) = engine.step([])
    assert (decision.action, decision.enforced_w) == ("set", 300.0)


def test_a_lost_gpu_and_one_not_in_the_store_are_held(node: Node) -> None:
    node.fleet[2].inject("lost")
    node.clock.advance(0.1)
    node.sample()
    engine = node.engine(Fixed("cap", {2: 300.0, 7: 300.0}), mode="apply")
    assert [(d.gpu, d.action, d.reason) for d in engine.step([])] == [
        (2, "hold", "GPU 2 is lost"),
        (7, "hold", "GPU 7 is not in the store"),
    ]


def test_a_gpu_that_has_not_been_read_is_held(node: Node) -> None:
    read = node.store.snapshot().gpus[0].sample.reading
    now = node.clock()

    def sample(gpu: int, reading: GpuReading | None, read_mono_s: float | None) -> GpuSample:
        info = GpuInfo(gpu, f"GPU-{gpu}", "NVIDIA H100", f"0:{gpu}", "550", None, 200, 700, 700)
        return GpuSample(info, True, 0.0, reading, 0.0, "integrated", read_mono_s=read_mono_s)

    node.store.put([sample(4, None, None), sample(5, None, now), sample(6, read, None)])
    engine = node.engine(Fixed("cap", dict.fromkeys([4, 5, 6], 300.0)), mode="apply")
    assert [(d.gpu, d.action, d.policy, d.reason) for d in engine.step([])] == [
        (4, "hold", "engine", "GPU 4 has not been read yet"),
        (5, "hold", "engine", "GPU 5 has not been read yet"),
        (6, "hold", "engine", "GPU 6 has not been read yet"),
    ]
    assert node.store.snapshot().policy_actions == {}


@pytest.mark.parametrize(
    ("watts", "action"),
    [(699.5, "keep"), (699.0, "set"), (650.0, "set")],
)
def test_a_gpu_less_than_1_w_from_the_chosen_limit_keeps_it(
    node: Node, watts: float, action: str
) -> None:
    (decision,) = node.engine(Fixed("cap", {0: watts})).step([])  # GPU 0 enforces 700 W
    assert (decision.action, decision.watts) == (action, watts)
    counted = {} if action == "keep" else {("cap", "set_power_limit", "dry_run"): 1}
    assert node.store.snapshot().policy_actions == counted


def test_an_actuator_refusal_is_on_the_decision_and_counted_not_raised(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0, 1: 300.0}), mode="apply")
    node.fleet[0].inject("lost")  # after the last read: the store still says it is up
    lost, ok = engine.step([])
    assert lost.action == "set" and lost.enforced_w is None
    assert lost.error == "GPU 0 has fallen off the bus"
    assert ok.enforced_w == 300.0 and ok.error is None
    assert node.store.snapshot().policy_actions == {
        ("cap", "set_power_limit_failed", "apply"): 1,
        ("cap", "set_power_limit", "apply"): 1,
    }


@pytest.mark.parametrize(
    ("wanted", "chosen", "note"),
    [(50.0, 200.0, " (held at its 200 W minimum)"), (900.0, 700.0, " (held at its 700 W maximum)")],
)
def test_a_limit_outside_the_gpu_range_is_held_within_it_and_says_so(
    node: Node, wanted: float, chosen: float, note: str
) -> None:
    (decision,) = node.engine(Fixed("cap", {0: wanted}), mode="apply").step([])
    assert (decision.watts, decision.reason) == (chosen, f"fixed {wanted:g} W{note}")
    assert decision.intents["cap"].watts == wanted
    assert node.limit(0) == chosen
    assert node.store.snapshot().power_limit_targets_w[0] == chosen


def test_a_rate_limited_change_is_on_the_decision_and_counted_not_raised(tmp_path: Path) -> None:
    with node_at(tmp_path, min_interval_s=60) as node:
        cap = Fixed("cap", {0: 300.0})
        engine = node.engine(cap, mode="apply")
        (first,) = engine.step([])
        node.clock.advance(1.0)
        node.sample()
        cap.limits = {0: 250.0}
        (second,) = engine.step([])
        assert (first.enforced_w, first.error) == (300.0, None)
        assert (second.action, second.watts, second.enforced_w) == ("set", 250.0, None)
        assert second.error == "GPU 0: limit changed 1.00 s ago; at most one change per 60 s"
        assert node.limit(0) == 300.0
        assert node.store.snapshot().policy_actions == {
            ("cap", "set_power_limit", "apply"): 1,
            ("cap", "set_power_limit_failed", "apply"): 1,
        }


def test_the_decision_history_keeps_the_latest_1000_oldest_first(node: Node) -> None:
    cap = Fixed("cap", {})
    engine = node.engine(cap)
    made: list[Decision] = []
    for period in range(KEEP_DECISIONS // GPUS + 1):  # 334 periods of 3 sets: 1002
        cap.limits = dict.fromkeys(range(GPUS), 300.0 + period % 2 * 10)
        node.clock.advance(0.01)
        made += engine.step([])
    kept = engine.decisions()
    assert (KEEP_DECISIONS, len(made), len(kept)) == (1000, 1002, 1000)
    assert kept == made[2:]
    assert (kept[0].gpu, kept[0].timestamp_s) == (2, made[0].timestamp_s)
    kept.clear()  # a copy: the engine's history is untouched
    assert len(engine.decisions()) == 1000


def test_the_decision_history_is_read_whole_from_another_thread(node: Node) -> None:
    cap = Fixed("cap", {})
    engine = node.engine(cap)
    done = threading.Event()
    lengths: list[int] = []

    def read() -> None:
        while True:
            finished = done.is_set()
            lengths.append(len(engine.decisions()))
            if finished:
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for period in range(400):
            cap.limits = dict.fromkeys(range(GPUS), 300.0 + period % 2 * 10)
            engine.step([])
    finally:
        done.set()
        reader.join()
    assert lengths[-1] == KEEP_DECISIONS
    # every read sees whole periods (3 decisions each) until the history is full
    assert set(lengths) <= {*range(0, KEEP_DECISIONS, GPUS), KEEP_DECISIONS}


def test_policies_see_the_job_registry_view(node: Node) -> None:
    jobs = JobRegistry(monotonic=node.clock)
    jobs.register("train", 101, 0, "high")
    jobs.register("batch", 102, 2, "low")
    (decision,) = node.engine(LowPriorityAt(260.0)).step(jobs.jobs())
    assert (decision.gpu, decision.watts, decision.reason) == (
        2,
        260.0,
        "job batch is low priority",
    )


def test_every_policy_sees_the_same_inputs_in_a_period(node: Node) -> None:
    seen: list[PolicyInputs] = []

    @dataclass
    class Spy:
        name: str

        def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
            seen.append(inputs)
            return []

    assert node.engine(Spy("x"), Spy("y")).step([]) == []
    assert len(seen) == 2 and seen[0] is seen[1]
    assert [v.sample.info.index for v in seen[0].snapshot.gpus] == list(range(GPUS))
    assert seen[0].now_mono_s == node.clock()


@pytest.mark.parametrize("names", [("a", "a"), ("engine",)])
def test_policy_names_are_unique_and_not_the_engines(node: Node, names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="unique"):
        node.engine(*(Fixed(n, {}) for n in names))


limits = st.dictionaries(st.integers(0, GPUS - 1), st.integers(200, 700).map(float), max_size=3)


@settings(max_examples=40, deadline=None)
@given(st.lists(limits, min_size=1, max_size=4))
def test_per_gpu_the_chosen_limit_is_the_lowest_and_each_policy_is_heard(
    wanted: list[dict[int, float]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp, node_at(Path(tmp)) as n:
        policies = [Fixed(f"p{i}", w) for i, w in enumerate(wanted)]
        decisions = {d.gpu: d for d in n.engine(*policies).step([])}
        gpus = {g for w in wanted for g in w}
        assert set(decisions) == gpus
        for gpu in gpus:
            heard = {p.name: p.limits[gpu] for p in policies if gpu in p.limits}
            d = decisions[gpu]
            assert {name: i.watts for name, i in d.intents.items()} == heard
            assert d.watts == min(heard.values())
            assert heard[d.policy] == d.watts
            assert d.action == ("keep" if d.watts == H100_DEFAULT_W else "set")


# ------------------------------------------------------------ baseline, dry-run, holds, fallback
def test_a_gpu_no_policy_limits_any_more_goes_back_to_its_limit_before_the_engine(
    node: Node,
) -> None:
    cap = Fixed("cap", {0: 300.0})
    engine = node.engine(cap, mode="apply")
    engine.step([])
    assert node.limit(0) == 300.0
    cap.limits = {}
    node.clock.advance(1.0)
    node.sample()
    (back,) = engine.step([])
    assert (back.action, back.policy, back.watts, back.from_w) == ("set", "engine", 700.0, 300.0)
    assert back.reason == "no policy limits GPU 0 any more: back to its 700 W"
    assert node.limit(0) == 700.0
    node.clock.advance(1.0)
    node.sample()
    assert engine.step([]) == []  # back at its baseline: nothing left to decide


def test_a_gpu_the_engine_never_changed_is_not_decided_without_intents(node: Node) -> None:
    node.fleet[1].set_power_limit_mw(500_000)  # an operator's limit, set before
    node.clock.advance(1.0)
    node.sample()
    assert node.engine(Fixed("cap", {0: 300.0}), mode="apply").step([])[0].gpu == 0
    assert node.limit(1) == 500.0


def test_dry_run_remembers_its_would_be_limit_and_logs_one_set_then_keeps(node: Node) -> None:
    cap = Fixed("cap", {0: 300.0})
    engine = node.engine(cap)
    first = engine.step([])
    node.clock.advance(1.0)
    node.sample()
    second = engine.step([])
    assert [(d.action, d.from_w) for d in first + second] == [("set", 700.0), ("keep", 300.0)]
    assert engine.decisions() == first
    snap = node.store.snapshot()
    assert snap.policy_decisions == {("cap", "set", "dry_run"): 1, ("cap", "keep", "dry_run"): 1}
    assert snap.power_limit_targets_w == {0: 300.0, 1: 700.0, 2: 700.0}
    assert node.limit(0) == 700.0
    cap.limits = {}
    (back,) = engine.step([])
    assert (back.action, back.policy, back.watts) == ("set", "engine", 700.0)
    assert node.store.snapshot().power_limit_targets_w[0] == 700.0


def test_a_set_not_yet_read_back_is_not_made_again(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0}), mode="apply")
    engine.step([])
    node.clock.advance(0.5)  # before the next full read, the store still says 700 W
    node.sample()
    (again,) = engine.step([])
    assert again.action == "keep"
    assert node.store.snapshot().policy_actions == {("cap", "set_power_limit", "apply"): 1}


def test_a_hold_is_logged_when_it_starts_and_the_engine_says_why_it_holds(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0}), mode="apply")
    assert engine.holding is None
    node.clock.advance(DEFAULT_STALE_AFTER_S + 1)
    engine.step([])
    node.clock.advance(1)
    engine.step([])
    assert [d.action for d in engine.decisions()] == ["hold"]
    assert engine.holding == "GPU 0 readings are 7.0 s old (stale after 5 s)"
    assert node.store.snapshot().policy_decisions == {("engine", "hold", "apply"): 2}
    node.sample()
    engine.step([])
    assert engine.holding is None


def test_no_permission_falls_back_to_dry_run_once_and_restores_what_was_set(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0, 1: 300.0}), mode="apply")
    engine.step([])
    assert node.limit(0) == node.limit(1) == 300.0
    node.fleet[0].inject("no_permission")
    node.clock.advance(1.0)
    node.sample()
    engine._policies[0].limits = {0: 250.0, 1: 250.0}  # type: ignore[attr-defined]
    first, _ = engine.step([])
    assert first.error == "GPU 0: setting the power limit needs root"
    assert engine.mode == "dry_run" and engine.fallback == first.error
    assert node.limit(1) == 700.0  # restored; GPU 0 cannot be restored while refused
    assert node.actuator.originals().keys() == {node.fleet[0].uuid}


def test_leaving_apply_restores_every_limit_and_dry_run_then_changes_none(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0, 2: 400.0}), mode="apply")
    engine.step([])
    assert engine.set_mode("dry_run") == []
    assert [node.limit(g) for g in range(GPUS)] == [700.0] * GPUS
    node.clock.advance(1.0)
    node.sample()
    assert {d.action for d in engine.step([])} == {"set"}
    assert [node.limit(g) for g in range(GPUS)] == [700.0] * GPUS
    assert node.actuator.originals() == {}


# ------------------------------------------------------------ what each decision carries and clears
def test_last_inputs_is_none_before_the_first_period_then_that_periods_inputs(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0}))
    assert engine.last_inputs is None
    engine.step([])
    assert isinstance(engine.last_inputs, PolicyInputs)
    assert engine.last_inputs.now_mono_s == node.clock()


def test_set_keep_and_hold_decisions_name_the_running_jobs_on_their_gpu(node: Node) -> None:
    jobs = JobRegistry(monotonic=node.clock)
    jobs.register("train", 101, 0, "high")
    jobs.register("eval", 102, 0, "normal")
    engine = node.engine(Fixed("cap", {0: 300.0}), mode="apply")
    (first,) = engine.step(jobs.jobs())
    assert (first.action, first.jobs) == ("set", ("eval", "train"))
    node.clock.advance(1.0)
    node.sample()
    (kept,) = engine.step(jobs.jobs())
    assert (kept.action, kept.jobs) == ("keep", ("eval", "train"))
    node.clock.advance(DEFAULT_STALE_AFTER_S + 1)
    (held,) = engine.step(jobs.jobs())
    assert (held.action, held.jobs) == ("hold", ("eval", "train"))


def test_a_dry_run_would_be_limit_is_held_while_stale_even_with_no_intents(node: Node) -> None:
    cap = Fixed("cap", {0: 300.0})
    engine = node.engine(cap)
    engine.step([])  # would-be 300 W on GPU 0
    cap.limits = {}
    node.clock.advance(DEFAULT_STALE_AFTER_S + 1)
    (held,) = engine.step([])
    assert (held.gpu, held.action, held.policy, held.intents) == (0, "hold", "engine", {})


def test_dry_run_going_back_forgets_the_would_be_limit_so_nothing_is_left_to_decide(
    node: Node,
) -> None:
    cap = Fixed("cap", {0: 300.0})
    engine = node.engine(cap)
    engine.step([])
    cap.limits = {}
    (back,) = engine.step([])
    assert (back.action, back.policy, back.watts) == ("set", "engine", 700.0)
    assert engine.step([]) == []


def test_dry_run_release_at_the_would_be_limit_is_a_keep_and_then_nothing(node: Node) -> None:
    cap = Fixed("cap", {0: 300.0})
    engine = node.engine(cap)
    engine.step([])
    node.fleet[0].set_power_limit_mw(300_000)  # someone else set what the dry run wanted
    node.clock.advance(1.0)
    node.sample()
    cap.limits = {}
    (kept,) = engine.step([])
    assert (kept.action, kept.policy, kept.watts, kept.from_w) == ("keep", "engine", 300.0, 300.0)
    assert engine.step([]) == []


def test_apply_release_when_the_limit_is_already_back_is_a_keep_and_then_nothing(
    node: Node,
) -> None:
    cap = Fixed("cap", {0: 300.0})
    engine = node.engine(cap, mode="apply")
    engine.step([])
    node.clock.advance(1.0)
    node.fleet[0].set_power_limit_mw(700_000)  # an operator put it back already
    node.sample()
    cap.limits = {}
    (kept,) = engine.step([])
    assert (kept.action, kept.policy, kept.watts) == ("keep", "engine", 700.0)
    node.clock.advance(1.0)
    node.sample()
    assert engine.step([]) == []


def test_a_limit_changed_behind_the_engine_after_read_back_is_set_again(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0}), mode="apply")
    engine.step([])
    node.clock.advance(1.0)
    node.sample()  # the full read shows 300 W: the engine trusts the readings again
    node.fleet[0].set_power_limit_mw(500_000)
    node.clock.advance(1.0)
    node.sample()
    (again,) = engine.step([])
    assert (again.action, again.from_w, again.enforced_w) == ("set", 500.0, 300.0)
    assert node.limit(0) == 300.0


def test_going_back_restores_the_limit_before_the_first_change_not_an_intermediate_one(
    node: Node,
) -> None:
    cap = Fixed("cap", {0: 400.0})
    engine = node.engine(cap, mode="apply")
    engine.step([])
    for watts in (300.0, 250.0):
        node.clock.advance(1.0)
        node.sample()
        cap.limits = {0: watts}
        (d,) = engine.step([])
        assert (d.action, d.enforced_w) == ("set", watts)
    node.clock.advance(1.0)
    node.sample()
    cap.limits = {}
    (back,) = engine.step([])
    assert (back.policy, back.watts, back.from_w) == ("engine", 700.0, 250.0)
    assert node.limit(0) == 700.0


def test_no_permission_is_counted_as_a_failed_apply_action(node: Node) -> None:
    node.fleet[0].inject("no_permission")
    engine = node.engine(Fixed("cap", {0: 300.0}), mode="apply")
    (refused,) = engine.step([])
    assert refused.error == "GPU 0: setting the power limit needs root"
    assert node.store.snapshot().policy_actions == {("cap", "set_power_limit_failed", "apply"): 1}


def test_switching_back_to_apply_clears_the_fallback_and_leaving_it_does_not(node: Node) -> None:
    node.fleet[0].inject("no_permission")
    engine = node.engine(Fixed("cap", {0: 300.0}), mode="apply")
    engine.step([])
    assert engine.mode == "dry_run" and engine.fallback is not None
    why = engine.fallback
    assert engine.set_mode("dry_run") == []  # already dry-run: nothing changes
    assert engine.fallback == why
    engine.set_mode("apply")
    assert engine.mode == "apply" and engine.fallback is None


def test_a_limit_exactly_at_the_gpu_maximum_is_not_said_to_be_held_there(node: Node) -> None:
    (decision,) = node.engine(Fixed("cap", {0: 700.0})).step([])
    assert (decision.watts, decision.reason) == (700.0, "fixed 700 W")
