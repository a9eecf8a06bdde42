"""The policy engine composes policies: lowest limit wins, reasons kept, stale means hold."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.store import MetricStore
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.policies.actuator import LimitActuator
from wattwarden.policies.base import Intent, Mode, Policy, PolicyInputs
from wattwarden.policies.engine import DEFAULT_STALE_AFTER_S, PolicyEngine

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
            wall=lambda: 1000.0 + self.clock(),
        )

    def limit(self, gpu: int) -> float:
        return float(self.fleet[gpu].state()["power_limit_w"])


@contextmanager
def node_at(directory: Path) -> Iterator[Node]:
    clock = ManualClock()
    fleet = SimFleet(GPUS, clock=clock)
    backend = SimBackend(fleet)
    store = MetricStore(monotonic=clock)
    actuator = LimitActuator(
        backend.devices(), directory / "journal.sqlite3", min_interval_s=0, monotonic=clock
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


def test_dry_run_is_the_default_and_only_records_and_counts(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0, 2: 250.0}))
    assert engine.mode == "dry_run"
    decisions = engine.step([])
    assert [(d.action, d.mode, d.enforced_w) for d in decisions] == [("set", "dry_run", None)] * 2
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
    assert (again.action, again.watts, again.enforced_w) == ("keep", 350.0, None)
    assert node.store.snapshot().policy_actions == {("b", "set_power_limit", "apply"): 1}


def test_stale_readings_hold_every_gpu_and_nothing_is_set(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 300.0, 1: 300.0}), mode="apply")
    node.clock.advance(DEFAULT_STALE_AFTER_S + 0.5)  # the sampler stalled: no pass since
    decisions = engine.step([])
    assert [(d.gpu, d.action, d.policy, d.watts) for d in decisions] == [
        (0, "hold", "engine", None),
        (1, "hold", "engine", None),
    ]
    assert decisions[0].reason == "GPU 0 readings are 5.5 s old (stale after 5 s)"
    assert decisions[0].intents == {"cap": Intent(0, 300.0, "fixed 300 W")}
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


def test_an_actuator_refusal_is_on_the_decision_and_counted_not_raised(node: Node) -> None:
    engine = node.engine(Fixed("cap", {0: 50.0, 1: 300.0}), mode="apply")
    low, ok = engine.step([])
    assert low.action == "set" and low.enforced_w is None
    assert low.error == "power limit 50 W for GPU 0 is outside its range [200, 700] W"
    assert ok.enforced_w == 300.0 and ok.error is None
    assert node.store.snapshot().policy_actions == {
        ("cap", "set_power_limit_failed", "apply"): 1,
        ("cap", "set_power_limit", "apply"): 1,
    }


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
