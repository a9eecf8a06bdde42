"""The agent's side of a fleet controller's lease, through the real HTTP API.

A simulated node (:class:`~wattwarden.nodesim.SimNode`) and the agent's policy loop share one
manual clock; the agent's own app (``build_app``: routes, auth, contract) serves them on
127.0.0.1. Time moves only when a test moves it, so an expiry is a clock step, not a wait.
"""

from __future__ import annotations

import logging
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import http_get, http_json, parse_metrics
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from wattwarden.api.contract import LeaseRecord, LeaseRequest, PolicyStatus
from wattwarden.api.http import HttpServer
from wattwarden.api.server import AgentContext, build_app
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.prometheus import StoreCollector, make_registry
from wattwarden.hardware.sim.clock import ManualClock
from wattwarden.nodesim import SimJob, SimNode
from wattwarden.policies.actuator import LimitActuator
from wattwarden.policies.control import LeaseConflict, PolicyLoop

TOKEN = "lease-test-token"
LOCAL_W = 2000.0
"""The node's own budget (4 H100s of 700 W by default)."""
LEASE = "/api/v1/policy/lease"


@dataclass
class Node:
    sim: SimNode
    loop: PolicyLoop
    url: str

    def lease(self, body: dict[str, Any], token: str | None = TOKEN) -> tuple[int, Any]:
        return http_json(self.url + LEASE, body, token=token)

    def release(self, controller: str, token: str | None = TOKEN) -> tuple[int, Any]:
        return http_json(self.url + LEASE, {"holder": controller}, token=token,
                         method="DELETE")  # fmt: skip

    def get(self, path: str = LEASE) -> Any:
        status, body = http_json(self.url + path)
        assert status == 200, body
        return body

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        return parse_metrics(http_get(self.url + "/metrics")[1].decode())


def body(
    watts: float = 2400.0, ttl: float = 30, controller: str = "ctl-a", generation: int = 7
) -> dict[str, Any]:
    return LeaseRequest(watts, ttl, controller, generation).to_json()


def serve(ctx: AgentContext) -> HttpServer:
    server = HttpServer("127.0.0.1", 0)
    server.start(build_app(ctx))
    return server


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    holder: list[PolicyLoop] = []
    sim = SimNode(4, state_dir=tmp_path, after_period=[lambda n, d: holder[0].period()])
    loop = PolicyLoop(
        store=sim.store,
        jobs=sim.jobs,
        actuator=sim.actuator,
        budget_w=LOCAL_W,
        monotonic=sim.clock,
        wall=sim.wall,
    )
    holder.append(loop)
    ctx = AgentContext(
        store=sim.store,
        registry=make_registry(StoreCollector(sim.store, backend="sim")),
        token=TOKEN,
        backend="sim",
        node="lease-node",
        interval_s=sim.interval_s,
        actuator=sim.actuator,
        fleet=sim.fleet,
        jobs=sim.jobs,
        policy=loop,
    )
    server = serve(ctx)
    host, port = server.address
    try:
        yield Node(sim, loop, f"http://{host}:{port}")
    finally:
        server.close()
        loop.close()
        sim.actuator.close()


def scoped_budgets(m: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, float]:
    return {lab["scope"]: v for lab, v in m.get("wattwarden_power_budget_watts", [])}


# ------------------------------------------------------------------------------- set and read
def test_a_lease_answers_its_record_and_its_budget_is_the_one_in_force(node: Node) -> None:
    status, record = node.lease(body(2400.0, 30, "ctl-a", 7))
    assert status == 200, record
    got = LeaseRecord.from_json(record)
    assert (got.power_budget_watts, got.ttl_s, got.holder, got.generation) == (
        2400.0, 30.0, "ctl-a", 7,
    )  # fmt: skip
    assert got.remaining_s == 30.0
    assert got.expires_at == pytest.approx(node.sim.wall() + 30)
    read = node.get()
    assert read["local_power_budget_watts"] == LOCAL_W
    assert LeaseRecord.from_json(read["lease"]).holder == "ctl-a"
    policy = PolicyStatus.from_json(node.get("/api/v1/policy"))
    assert policy.power_budget_watts == 2400.0  # higher than the local budget: it overrides
    assert policy.local_power_budget_watts == LOCAL_W
    assert policy.lease is not None and policy.lease.generation == 7
    state = node.get("/api/v1/state")
    assert (state["power_budget_watts"], state["power_budget_lease_watts"]) == (LOCAL_W, 2400.0)


def test_without_a_lease_get_says_none_and_the_local_budget(node: Node) -> None:
    assert node.get() == {"lease": None, "local_power_budget_watts": LOCAL_W}
    assert node.get("/api/v1/state")["power_budget_lease_watts"] is None


def test_the_holder_renews_replacing_budget_and_expiry(node: Node) -> None:
    assert node.lease(body(2400.0, 30, generation=7))[0] == 200
    node.sim.run(20)
    status, record = node.lease(body(1500.0, 30, generation=7))  # same generation: a renewal
    assert status == 200, record
    node.sim.run(25)  # 45 s after the first push, 25 s after the renewal: still live
    read = node.get()["lease"]
    assert read is not None and read["power_budget_watts"] == 1500.0
    assert read["remaining_s"] == pytest.approx(5.0, abs=0.2)
    assert node.lease(body(1600.0, 30, generation=8))[0] == 200  # a newer generation: taken over
    assert node.get()["lease"]["generation"] == 8


def test_another_controller_gets_409_naming_the_holder_and_changes_nothing(node: Node) -> None:
    assert node.lease(body(2400.0, 30, "ctl-a", 7))[0] == 200
    node.sim.run(17.5)
    status, answer = node.lease(body(900.0, 30, "ctl-b", 10**12))
    assert status == 409
    assert answer == {"error": "lease held by controller 'ctl-a' (generation 7) for another 12.5 s"}
    assert node.get()["lease"]["holder"] == "ctl-a"
    assert node.get()["lease"]["power_budget_watts"] == 2400.0


def test_a_stale_generation_of_the_holder_gets_409(node: Node) -> None:
    assert node.lease(body(2400.0, 30, "ctl-a", 7))[0] == 200
    status, answer = node.lease(body(900.0, 30, "ctl-a", 6))
    assert status == 409
    assert answer["error"].startswith("stale generation")
    assert "generation 7" in answer["error"]
    assert node.get()["lease"]["power_budget_watts"] == 2400.0


def test_the_holder_releases_and_another_id_cannot(node: Node) -> None:
    assert node.lease(body(2400.0, 30, "ctl-a", 7))[0] == 200
    status, answer = node.release("ctl-b")
    assert status == 409 and "held by controller 'ctl-a'" in answer["error"]
    assert node.get()["lease"] is not None
    status, answer = node.release("ctl-a")
    assert (status, answer) == (200, {"lease": None, "local_power_budget_watts": LOCAL_W})
    assert PolicyStatus.from_json(node.get("/api/v1/policy")).power_budget_watts == LOCAL_W
    assert "lease" not in scoped_budgets(node.metrics())
    assert node.release("ctl-a")[0] == 200  # nothing held: nothing to do
    assert node.loop.lease_expirations == 0  # a release is not an expiry


# ----------------------------------------------------------------------------------- expiry
def test_an_expired_lease_gives_the_local_budget_back_logged_once_and_counted(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    assert node.lease(body(2400.0, 10, "ctl-a", 7))[0] == 200
    node.sim.run(9.5)
    assert node.get()["lease"] is not None
    with caplog.at_level(logging.WARNING, logger="wattwarden.policies.control"):
        node.sim.run(5)  # periods run past the expiry
        for _ in range(3):
            assert node.get()["lease"] is None
    expired = [r.getMessage() for r in caplog.records if "expired" in r.getMessage()]
    assert len(expired) == 1
    assert "ctl-a" in expired[0] and "2000 W" in expired[0]
    policy = PolicyStatus.from_json(node.get("/api/v1/policy"))
    assert (policy.power_budget_watts, policy.lease, policy.lease_expirations) == (
        LOCAL_W, None, 1,
    )  # fmt: skip
    assert node.lease(body(1800.0, 30, "ctl-b", 1))[0] == 200  # now another one may take it


def test_a_read_drops_a_lease_that_ran_out_before_any_period(node: Node) -> None:
    assert node.lease(body(2400.0, 5, "ctl-a", 7))[0] == 200
    node.sim.clock.advance(6.0)  # no sampler pass, no period: only the clock moved
    assert node.get("/api/v1/state")["power_budget_lease_watts"] is None
    m = node.metrics()
    assert "lease" not in scoped_budgets(m)
    assert m["wattwarden_power_lease_active"] == [({}, 0.0)]
    assert m["wattwarden_power_lease_expirations_total"] == [({}, 1.0)]


def test_lease_metrics_are_there_only_while_it_is_live(node: Node) -> None:
    m = node.metrics()
    assert "lease" not in scoped_budgets(m)
    assert m["wattwarden_power_lease_active"] == [({}, 0.0)]
    assert "wattwarden_power_lease_expiry_timestamp_seconds" not in m
    assert m["wattwarden_power_lease_expirations_total"] == [({}, 0.0)]
    _, record = node.lease(body(2400.0, 30, "ctl-a", 7))
    m = node.metrics()
    assert scoped_budgets(m) == {"node": LOCAL_W, "lease": 2400.0}
    assert m["wattwarden_power_lease_active"] == [({}, 1.0)]
    assert m["wattwarden_power_lease_expiry_timestamp_seconds"] == [({}, record["expires_at"])]
    node.sim.run(31)
    m = node.metrics()
    assert scoped_budgets(m) == {"node": LOCAL_W}
    assert m["wattwarden_power_lease_active"] == [({}, 0.0)]
    assert "wattwarden_power_lease_expiry_timestamp_seconds" not in m
    assert m["wattwarden_power_lease_expirations_total"] == [({}, 1.0)]


def load(node: Node, priorities: tuple[str, ...] = ("high", "normal", "low", "low")) -> None:
    for gpu, priority in enumerate(priorities):
        node.sim.add_job(SimJob(f"job{gpu}", gpu, priority, 1.0, 1.0))


def budget_reasons(node: Node) -> list[str]:
    decisions = node.get("/api/v1/decisions?limit=2000")["decisions"]
    return [i["reason"] for d in decisions for name, i in d["intents"].items() if name == "budget"]


def test_the_capper_reasons_name_the_budget_they_used(node: Node) -> None:
    load(node)
    node.sim.run(3)
    assert node.lease(body(1200.0, 10, "ctl-a", 7))[0] == 200  # lower than the local budget
    node.sim.run(5)
    leased = budget_reasons(node)
    assert any("1200 W budget (lease from controller ctl-a gen 7)" in r for r in leased)
    node.sim.run(10)  # past the expiry
    after = budget_reasons(node)[len(leased) :]
    assert after and all("2000 W budget (local budget)" in r for r in after[-4:])


def test_a_lease_on_a_node_without_a_local_budget_turns_capping_on_then_off(
    node: Node,
) -> None:
    node.loop.update(budget_w=None)
    assert node.loop.active()["budget"] is False
    assert node.lease(body(1500.0, 10))[0] == 200
    assert node.loop.active()["budget"] is True
    node.sim.run(11)
    assert node.loop.active()["budget"] is False
    assert PolicyStatus.from_json(node.get("/api/v1/policy")).power_budget_watts is None


def test_demand_and_starving_are_exported(node: Node) -> None:
    load(node)
    node.sim.run(3)
    m = node.metrics()
    demand = {lab["priority"]: v for lab, v in m["wattwarden_power_demand_watts"]}
    assert set(demand) == {"high", "normal", "low"}
    assert demand["high"] > 0 and demand["normal"] > 0 and demand["low"] > demand["high"]
    assert m["wattwarden_power_budget_starving"] == [({}, 0.0)]
    assert node.lease(body(1000.0, 60))[0] == 200  # far under what the jobs want
    node.sim.run(5)
    assert node.metrics()["wattwarden_power_budget_starving"] == [({}, 1.0)]
    held = node.metrics()["wattwarden_power_demand_watts"]
    # held at their limits, the GPUs count their default limit: demand does not fall with caps
    assert {lab["priority"]: v for lab, v in held}["high"] >= 0.99 * demand["high"]


def test_demand_above_min_counts_each_gpu_above_its_minimum_limit_and_an_idle_one_as_zero(
    node: Node,
) -> None:
    load(node, ("high", "low"))  # GPUs 2 and 3 idle: they count as low, drawing under 200 W
    node.sim.run(3)
    m = node.metrics()
    demand = {lab["priority"]: v for lab, v in m["wattwarden_power_demand_watts"]}
    above = {lab["priority"]: v for lab, v in m["wattwarden_power_demand_above_min_watts"]}
    (minimum,) = {v for _, v in m["gpu_power_limit_min_watts"]}
    assert demand["high"] > minimum and above["high"] == pytest.approx(demand["high"] - minimum)
    # low: the busy GPU above its minimum; the idle two (drawing under it) count 0, not less
    assert minimum < demand["low"] - above["low"] < 3 * minimum
    assert above["normal"] == 0.0 and demand["normal"] == 0.0


# ------------------------------------------------------------------------ refusals at the edge
@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
def test_lease_writes_without_the_token_get_401_and_change_nothing(
    node: Node, method: str, token: str | None
) -> None:
    assert node.lease(body(2400.0, 30, "ctl-a", 7))[0] == 200
    payload = body(900.0, 30, "ctl-a", 8) if method == "POST" else {"holder": "ctl-a"}
    status, _ = http_json(node.url + LEASE, payload, token=token, method=method)
    assert status == 401
    assert node.get()["lease"]["power_budget_watts"] == 2400.0


BAD = [
    ({**body(), "power_budget_watts": 0}, "power_budget_watts"),
    ({**body(), "power_budget_watts": -5}, "power_budget_watts"),
    ({**body(), "power_budget_watts": "2400"}, "power_budget_watts"),
    ({**body(), "power_budget_watts": True}, "power_budget_watts"),
    ({**body(), "power_budget_watts": None}, "power_budget_watts"),
    ({**body(), "ttl_s": 0.5}, "ttl_s"),
    ({**body(), "ttl_s": 3601}, "ttl_s"),
    ({**body(), "ttl_s": "30"}, "ttl_s"),
    ({**body(), "holder": ""}, "holder"),
    ({**body(), "holder": "x" * 129}, "holder"),
    ({**body(), "holder": "ctl a"}, "holder"),
    ({**body(), "holder": 7}, "holder"),
    ({**body(), "generation": -1}, "generation"),
    ({**body(), "generation": 2**63}, "generation"),
    ({**body(), "generation": 1.5}, "generation"),
    ({**body(), "generation": False}, "generation"),
    ({k: v for k, v in body().items() if k != "ttl_s"}, "ttl_s"),
    ({k: v for k, v in body().items() if k != "holder"}, "holder"),
    ({**body(), "controller": "ctl-a"}, "controller"),  # the id is "holder"
]


@pytest.mark.parametrize(("bad", "field"), BAD)
def test_bad_lease_bodies_get_422_naming_the_field_and_change_nothing(
    node: Node, bad: dict[str, Any], field: str
) -> None:
    status, answer = node.lease(bad)
    assert status == 422, answer
    assert answer["error"].startswith(f"field {field!r}")
    assert "\n" not in answer["error"]
    assert node.get()["lease"] is None


RELEASE_BAD = [
    ({}, "holder"),
    ({"holder": "a b"}, "holder"),
    ({"holder": "a", "generation": 1}, "generation"),
]


@pytest.mark.parametrize(("bad", "field"), RELEASE_BAD)
def test_bad_release_bodies_get_422_naming_the_field(
    node: Node, bad: dict[str, Any], field: str
) -> None:
    status, answer = http_json(node.url + LEASE, bad, token=TOKEN, method="DELETE")
    assert status == 422 and answer["error"].startswith(f"field {field!r}"), answer


def test_a_body_that_is_not_a_json_object_is_a_400(node: Node) -> None:
    for raw in (b"{not json", b"[1, 2]"):
        request = urllib.request.Request(node.url + LEASE, data=raw, method="POST")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=5)
        assert e.value.code == 400
        e.value.close()
    assert node.get()["lease"] is None


def test_an_agent_without_a_policy_engine_answers_404(tmp_path: Path) -> None:
    store = MetricStore()
    ctx = AgentContext(store=store, registry=CollectorRegistry(), token=TOKEN, backend="sim",
                       node="n", interval_s=0.1)  # fmt: skip
    server = serve(ctx)
    host, port = server.address
    url = f"http://{host}:{port}{LEASE}"
    try:
        assert http_json(url)[0] == 404
        assert http_json(url, body(), token=TOKEN)[0] == 404
        assert http_json(url, {"holder": "ctl-a"}, token=TOKEN, method="DELETE")[0] == 404
    finally:
        server.close()


# --------------------------------------------------------------------- the property, at length
def bare_loop(
    directory: Path, clock: ManualClock, local_w: float | None
) -> tuple[PolicyLoop, MetricStore, LimitActuator]:
    """A loop over no GPU (the lease does not need one), its store and its actuator."""
    store = MetricStore(monotonic=clock)
    actuator = LimitActuator([], directory / "journal.db", monotonic=clock)
    loop = PolicyLoop(
        store=store,
        jobs=JobRegistry(monotonic=clock),
        actuator=actuator,
        budget_w=local_w,
        monotonic=clock,
        wall=lambda: 1.7e9 + clock(),
    )
    return loop, store, actuator


CONTROLLERS = st.sampled_from(["ctl-a", "ctl-b", "ctl-c"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), CONTROLLERS, st.integers(0, 4), st.integers(1, 40),
                  st.floats(100, 5000)),
        st.tuples(st.just("wait"), st.floats(0, 50)),
        st.tuples(st.just("release"), CONTROLLERS),
        st.tuples(st.just("period")),
    ),
    max_size=40,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(ops=OPS, local_w=st.one_of(st.none(), st.floats(100, 5000)))
def test_at_most_one_holder_no_take_over_while_live_and_the_local_budget_after_expiry(
    ops: list[tuple[Any, ...]], local_w: float | None
) -> None:
    clock = ManualClock(1000.0)
    with tempfile.TemporaryDirectory() as tmp:
        loop, store, actuator = bare_loop(Path(tmp), clock, local_w)
        held: tuple[str, int, float, float] | None = None  # the model: id, gen, budget, expiry
        expirations = 0
        try:
            for op in ops:
                if held is not None and clock() >= held[3]:
                    held, expirations = None, expirations + 1
                if op[0] == "set":
                    _, who, gen, ttl, watts = op
                    refused = held is not None and (held[0] != who or gen < held[1])
                    try:
                        loop.set_lease(budget_w=watts, ttl_s=ttl, controller=who, generation=gen)
                    except LeaseConflict:
                        assert refused  # only a live lease of another id, or a stale generation
                    else:
                        assert not refused  # never taken from another id while live
                        held = (who, gen, watts, clock() + ttl)
                elif op[0] == "release":
                    try:
                        loop.release_lease(op[1])
                    except LeaseConflict:
                        assert held is not None and held[0] != op[1]
                    else:
                        assert held is None or held[0] == op[1]
                        held = None
                elif op[0] == "wait":
                    clock.advance(op[1])
                    if held is not None and clock() >= held[3]:
                        held, expirations = None, expirations + 1
                else:
                    loop.period()
                lease = loop.lease()
                if held is None:
                    assert lease is None
                    assert loop.budget_w() == local_w  # expired or released: the local budget
                    assert loop.budget_source() == "local budget"
                else:
                    assert lease is not None  # one holder, the one the model says
                    assert (lease.controller, lease.generation) == held[:2]
                    assert loop.budget_w() == held[2]
                status = loop.status()
                assert status.lease == lease
                assert status.lease_expirations == expirations
                snap = store.snapshot()
                assert snap.power_budgets_w.get("lease") == (None if held is None else held[2])
        finally:
            loop.close()
            actuator.close()
