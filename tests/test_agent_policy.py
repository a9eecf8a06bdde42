"""The policy engine in the agent, steered and watched over the API; its settings.

The API, health, metrics and status are checked on the real agent in this process, on a
simulated fleet, with idle capping after 1 s as the policy that acts (fast and certain: an idle
simulated GPU is capped to its 200 W minimum); budget capping on a loaded fleet too. A crash is
a real agent process killed with SIGKILL. The control loop's own promises are tested on the
simulator's clock in test_policy_control.py.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import http_get, http_json, parse_metrics, run_agent, sim_limits, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

import wattwarden.agent as agent_module
from wattwarden.agent import Agent
from wattwarden.api.contract import (
    UNCHANGED,
    ApiError,
    DecisionRecord,
    PolicyStatus,
    PolicyUpdate,
)
from wattwarden.config import SETTINGS, AgentConfig, ConfigError, build_config
from wattwarden.hardware.sim.fake_nvml import uninstall_fake_nvml
from wattwarden.policies.base import Decision, Intent, PolicyInputs
from wattwarden.policies.control import POLICY_NAMES, PolicyLoop, PolicySettings, build_policy

H100_MIN_W, H100_MAX_W = 200.0, 700.0


# ------------------------------------------------------------------ config and API agree
@settings(max_examples=60, deadline=None)
@given(
    budget=st.one_of(
        st.floats(allow_nan=True), st.integers(-10, 2 * 10**6), st.booleans(), st.text(max_size=5)
    )
)
def test_the_api_and_the_config_accept_and_refuse_the_same_budgets(budget: Any) -> None:
    try:
        build_config(None, {"power_budget_watts": budget})
        config_ok = True
    except ConfigError:
        config_ok = False
    try:
        got = PolicyUpdate.from_json({"power_budget_watts": budget})
        api_ok = True
    except ApiError as e:
        assert e.status == 422 and str(e).startswith("field 'power_budget_watts' ")
        api_ok = False
    assert api_ok == config_ok
    if api_ok:
        assert got.power_budget_watts == float(budget)


_POLICY_VALUES = st.one_of(
    st.lists(st.sampled_from([*POLICY_NAMES, "cooling", "", 3, None]), max_size=5),
    st.lists(st.sampled_from([*POLICY_NAMES, "none", "x", " idle", ""]), max_size=4).map(",".join),
    st.integers(),
)


@settings(max_examples=60, deadline=None)
@given(value=_POLICY_VALUES)
def test_the_api_and_the_config_accept_and_refuse_the_same_policy_lists(value: Any) -> None:
    try:
        from_config = build_config(None, {"policy": value}).policy
    except ConfigError:
        from_config = None
    try:
        from_api = PolicyUpdate.from_json({"policies": value}).policies
    except ApiError as e:
        assert e.status == 422 and str(e).startswith("field 'policies' ")
        from_api = None
    assert from_api == from_config


def test_each_policy_setting_is_a_flag_and_a_key_with_its_default() -> None:
    defaults = {name: SETTINGS[name].default for name in (
        "policy", "policy_period_s", "thermal_margin_c", "idle_after_s", "tune_eta",
        "max_slowdown", "journal_retention_s", "power_budget_watts")}  # fmt: skip
    assert defaults == {
        "policy": None, "policy_period_s": 1.0, "thermal_margin_c": 5.0, "idle_after_s": 300.0,
        "tune_eta": 0.5, "max_slowdown": None, "journal_retention_s": 30 * 86400.0,
        "power_budget_watts": None,
    }  # fmt: skip
    assert SETTINGS["policy_period_s"].kind.check(0.1) == 0.1
    for name, bad in (("policy_period_s", 0.09), ("policy_period_s", 3601), ("tune_eta", 1.01),
                      ("max_slowdown", -0.01), ("max_slowdown", 1.5)):  # fmt: skip
        with pytest.raises(ValueError):
            SETTINGS[name].kind.check(bad)


@pytest.mark.parametrize(
    ("toml", "policy"),
    [
        ('policy = ["idle", "tuner"]\n', ("idle", "tuner")),
        ('policy = "thermal, budget"\n', ("thermal", "budget")),
        ("policy = []\n", ()),
        ('policy = "none"\n', ()),
    ],
)
def test_policy_takes_a_toml_list_or_a_comma_separated_string(
    tmp_path: Path, toml: str, policy: tuple[str, ...]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml)
    assert build_config(cfg, {}).policy == policy


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        ('policy = ["thermal", "thermal"]\n', "it names 'thermal' twice"),
        ('policy = "cooling"\n', "it names 'cooling', which is not a policy"),
        ("policy = [1]\n", "it names 1, which is not a policy"),
        ("policy = 3\n", "(or none), got 3"),
    ],
)
def test_a_bad_policy_list_is_refused_naming_the_key(tmp_path: Path, toml: str, error: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        build_config(cfg, {})
    assert "key 'policy' must be a list of thermal, budget, idle, tuner" in str(e.value)
    assert error in str(e.value)


# ------------------------------------------------------------------ the agent, in this process
@contextmanager
def agent_on(tmp_path: Path, **settings: Any) -> Iterator[Agent]:
    """The agent on 4 simulated GPUs, its policy period 0.2 s, serving on a free port."""
    cfg = AgentConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state", sim=4,
                      policy_period_s=0.2)  # fmt: skip
    agent = Agent(replace(cfg, **settings))
    try:
        agent.start()
        yield agent
    finally:
        agent.close()
        uninstall_fake_nvml()


IDLE_CAPS = {"policy": ("idle",), "idle_after_s": 1.0}
"""Idle capping after 1 s: every idle simulated GPU goes to its 200 W minimum."""


def limits(agent: Agent) -> list[float]:
    assert agent.opened.fleet is not None
    return [float(g.state()["power_limit_w"]) for g in agent.opened.fleet.gpus]


def token(agent: Agent) -> str:
    return agent.context.token


def policy_status(agent: Agent) -> PolicyStatus:
    status, body = http_json(agent.url + "/api/v1/policy")
    assert status == 200
    return PolicyStatus.from_json(body)


def test_get_policy_says_mode_budget_policies_and_period(tmp_path: Path) -> None:
    with agent_on(tmp_path, power_budget_watts=2000.0, apply=True) as agent:
        status = policy_status(agent)
        assert status == PolicyStatus(
            mode="apply", power_budget_watts=2000.0,
            policies={"thermal": True, "budget": True, "idle": False, "tuner": False},
            fallback=None, holding=None, budget_unreachable=status.budget_unreachable,
            period_seconds=0.2, periods=status.periods, errors_total=0, last_error=None,
            local_power_budget_watts=2000.0, lease=None, lease_expirations=0,
        )  # fmt: skip


@pytest.mark.parametrize(
    "headers",
    [None, "wrong-token", ""],
    ids=["no token", "wrong token", "empty token"],
)
def test_policy_writes_without_the_token_get_401_and_change_nothing(
    tmp_path: Path, headers: str | None
) -> None:
    with agent_on(tmp_path) as agent:
        before = policy_status(agent)
        status, body = http_json(
            agent.url + "/api/v1/policy",
            {"mode": "apply", "power_budget_watts": 500, "policies": ["idle"]},
            token=headers,
        )
        assert (status, body) == (401, {"error": "missing or wrong bearer token"})
        after = policy_status(agent)
        assert replace(after, periods=0) == replace(before, periods=0)


POLICIES_ = "field 'policies' must be a list of thermal, budget, idle, tuner (or none)"
BUDGET_ = "field 'power_budget_watts' must be"
BAD_BODIES: list[tuple[Any, str]] = [
    ({"power_budget_watts": 0}, f"{BUDGET_} within 1..1e+06, got 0"),
    ({"power_budget_watts": 1e6 + 1}, f"{BUDGET_} within 1..1e+06, got 1000001.0"),
    ({"power_budget_watts": -5}, f"{BUDGET_} within 1..1e+06, got -5"),
    ({"power_budget_watts": "2400"}, f"{BUDGET_} a number of watts or null, got '2400'"),
    ({"power_budget_watts": True}, f"{BUDGET_} a number of watts or null, got True"),
    ({"mode": "fast"}, "field 'mode' must be one of dry_run, apply; got 'fast'"),
    ({"mode": None}, "field 'mode' must be one of dry_run, apply; got None"),
    ({"mode": "APPLY"}, "field 'mode' must be one of dry_run, apply; got 'APPLY'"),
    ({"policies": ["cooling"]}, f"{POLICIES_}: it names 'cooling', which is not a policy"),
    ({"policies": ["idle", "idle"]}, f"{POLICIES_}: it names 'idle' twice"),
    ({"policies": {"idle": True}}, f"{POLICIES_}, got {{'idle': True}}"),
    ({"policies": [1]}, f"{POLICIES_}: it names 1, which is not a policy"),
    ({"budget": 2400}, "field 'budget' is not a policy setting (known: mode, policies, "
                       "power_budget_watts)"),
    ({"mode": "apply", "power_budget_watts": 2400, "extra": 1},
     "field 'extra' is not a policy setting"),
]  # fmt: skip


def test_bad_policy_bodies_get_422_naming_the_field_and_change_nothing(tmp_path: Path) -> None:
    with agent_on(tmp_path, power_budget_watts=2000.0) as agent:
        before = policy_status(agent)
        for body, error in BAD_BODIES:
            status, got = http_json(agent.url + "/api/v1/policy", body, token=token(agent))
            assert status == 422, (body, got)
            assert got["error"].startswith(error), (body, got)
            assert replace(policy_status(agent), periods=0) == replace(before, periods=0), body
        status, got = http_json(agent.url + "/api/v1/policy", [1], token=token(agent))
        assert (status, got) == (400, {"error": "body must be a JSON object"})


def test_a_policy_update_answers_the_new_state_and_the_metrics_follow(tmp_path: Path) -> None:
    with agent_on(tmp_path) as agent:
        status, body = http_json(
            agent.url + "/api/v1/policy",
            {"power_budget_watts": 1500, "policies": ["thermal", "idle"]},
            token=token(agent),
        )
        assert status == 200
        got = PolicyStatus.from_json(body)
        assert (got.power_budget_watts, got.mode) == (1500.0, "dry_run")
        assert got.policies == {"thermal": True, "budget": False, "idle": True, "tuner": False}
        m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
        assert {lab["policy"]: v for lab, v in m["wattwarden_policy_active"]} == {
            "thermal": 1.0, "budget": 0.0, "idle": 1.0, "tuner": 0.0,
        }  # fmt: skip
        assert m["wattwarden_power_budget_watts"] == [({"scope": "node"}, 1500.0)]
        status, body = http_json(agent.url + "/api/v1/policy", {"power_budget_watts": None},
                                 token=token(agent))  # fmt: skip
        assert status == 200 and body["power_budget_watts"] is None
        m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
        assert "wattwarden_power_budget_watts" not in m


def test_dry_run_on_the_agent_changes_no_limit_and_shows_its_targets(tmp_path: Path) -> None:
    with agent_on(tmp_path, **IDLE_CAPS) as agent:

        def targets() -> list[float] | None:
            m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
            got = [v for _, v in sorted(m.get("gpu_power_limit_target_watts", []),
                                        key=lambda s: s[0]["gpu"])]  # fmt: skip
            return got if got == [H100_MIN_W] * 4 else None

        wait_for(targets, timeout_s=30, what="dry-run targets at the minimum")
        assert limits(agent) == [H100_MAX_W] * 4
        state = http_json(agent.url + "/api/v1/state")[1]
        assert [g["power_limit_target_watts"] for g in state["gpus"]] == [H100_MIN_W] * 4
        assert [g["power_limit_watts"] for g in state["gpus"]] == [H100_MAX_W] * 4
        assert state["policy_mode"] == "dry_run"


def test_switching_apply_to_dry_run_over_the_api_restores_every_limit(tmp_path: Path) -> None:
    with agent_on(tmp_path, apply=True, **IDLE_CAPS) as agent:
        wait_for(lambda: limits(agent) == [H100_MIN_W] * 4, timeout_s=30, what="idle caps")
        status, body = http_json(agent.url + "/api/v1/policy", {"mode": "dry_run"},
                                 token=token(agent))  # fmt: skip
        assert (status, body["mode"], body["restore_failures"]) == (200, "dry_run", [])
        assert limits(agent) == [H100_MAX_W] * 4  # restored before the answer
        m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
        assert {lab["mode"]: v for lab, v in m["wattwarden_policy_mode"]} == {
            "dry_run": 1.0, "apply": 0.0,
        }  # fmt: skip
        status, body = http_json(agent.url + "/api/v1/power-limits", {"gpu": 0, "watts": 300},
                                 token=token(agent))  # fmt: skip
        assert status == 409  # the manual path follows the mode in force


def test_decisions_show_what_was_decided_by_which_policy_and_why(tmp_path: Path) -> None:
    with agent_on(tmp_path, apply=True, **IDLE_CAPS) as agent:
        wait_for(lambda: limits(agent) == [H100_MIN_W] * 4, timeout_s=30, what="idle caps")
        status, body = http_json(agent.url + "/api/v1/decisions")
        assert status == 200
        records = [DecisionRecord.from_json(d) for d in body["decisions"]]
        sets = [d for d in records if d.action == "set"]
        assert sorted(d.gpu for d in sets) == [0, 1, 2, 3]
        for d in sets:
            assert (d.policy, d.mode, d.from_watts, d.to_watts, d.enforced_watts, d.error) == (
                "idle", "apply", H100_MAX_W, H100_MIN_W, H100_MIN_W, None,
            )  # fmt: skip
            assert d.reason == f"GPU {d.gpu} idle for 1 s: capped to its 200 W minimum"
            assert d.intents == {"idle": {"watts": H100_MIN_W, "reason": d.reason}}
        times = [d.time for d in records]
        assert times == sorted(times)  # newest last
        status, body = http_json(agent.url + "/api/v1/decisions?limit=2")
        assert [DecisionRecord.from_json(d) for d in body["decisions"]] == records[-2:]
        for bad in ("0", "x", "2001"):
            status, body = http_json(agent.url + f"/api/v1/decisions?limit={bad}")
            assert status == 400 and body["error"].startswith("limit must be"), bad


def test_healthz_says_why_while_the_engine_holds(tmp_path: Path) -> None:
    with agent_on(tmp_path, apply=True, **IDLE_CAPS) as agent:
        wait_for(lambda: limits(agent) == [H100_MIN_W] * 4, timeout_s=30, what="idle caps")
        assert http_get(agent.url + "/healthz") == (200, b"ok\n")
        assert agent.opened.fleet is not None
        agent.opened.fleet[2].inject("lost")
        expected = (200, b"degraded\npolicy engine holding: GPU 2 is lost\n")
        wait_for(lambda: http_get(agent.url + "/healthz") == expected, timeout_s=30,
                 what="/healthz to say the engine holds")  # fmt: skip
        m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
        assert m["wattwarden_policy_holding"] == [({}, 1.0)]
        state = http_json(agent.url + "/api/v1/state")[1]
        assert state["policy_holding"] == "GPU 2 is lost"
        agent.opened.fleet[2].inject("clear")
        wait_for(lambda: http_get(agent.url + "/healthz") == (200, b"ok\n"), timeout_s=30,
                 what="/healthz ok again")  # fmt: skip


def test_a_stalled_sampler_makes_the_engine_hold_its_limits_and_healthz_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with agent_on(tmp_path, apply=True, **IDLE_CAPS) as agent:
        wait_for(lambda: limits(agent) == [H100_MIN_W] * 4, timeout_s=30, what="idle caps")
        stuck = threading.Event()  # a driver call that never returns, until the test ends
        sample = agent.sampler.run_once
        monkeypatch.setattr(agent.sampler, "run_once", lambda: (stuck.wait(60), sample()))
        try:

            def says_why() -> list[str] | None:
                status, body = http_get(agent.url + "/healthz")
                lines = body.decode().splitlines()
                return lines if status == 503 and len(lines) == 2 else None

            lines = wait_for(says_why, timeout_s=30, what="/healthz to say why")
            assert lines[0] == "sampler stalled"
            assert lines[1].startswith("policy engine holding: ")
            held = lines[1].removeprefix("policy engine holding: ").split("; ")
            assert [h.split()[1] for h in held] == ["0", "1", "2", "3"]
            for h in held:
                assert re.fullmatch(r"GPU \d readings are [\d.]+ s old \(stale after 5 s\)", h), h
            # /healthz reads the engine as it is; the gauge is published as its period ends
            wait_for(
                lambda: (
                    parse_metrics(http_get(agent.url + "/metrics")[1].decode())[
                        "wattwarden_policy_holding"
                    ]
                    == [({}, 1.0)]
                ),
                timeout_s=10,
                what="wattwarden_policy_holding 1",
            )
            assert limits(agent) == [H100_MIN_W] * 4  # held where they were, not changed
        finally:
            stuck.set()


def test_healthz_and_a_gauge_say_when_apply_fell_back_for_lack_of_permission(
    tmp_path: Path,
) -> None:
    with agent_on(tmp_path, **IDLE_CAPS) as agent:
        assert agent.opened.fleet is not None
        for gpu in agent.opened.fleet.gpus:
            gpu.inject("no_permission")
        status, body = http_json(agent.url + "/api/v1/policy", {"mode": "apply"},
                                 token=token(agent))  # fmt: skip
        assert (status, body["mode"]) == (200, "apply")

        def fell_back() -> PolicyStatus | None:
            got = policy_status(agent)
            return got if got.fallback is not None else None

        got = wait_for(fell_back, timeout_s=30, what="the fallback")
        assert got.mode == "dry_run"
        health = http_get(agent.url + "/healthz")
        assert health == (200, f"degraded\napply fell back to dry-run: {got.fallback}\n".encode())
        m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
        assert m["wattwarden_policy_apply_fallback"] == [({}, 1.0)]
        assert limits(agent) == [H100_MAX_W] * 4
        assert http_json(agent.url + "/api/v1/state")[1]["policy_fallback"] == got.fallback


POLICY_FAMILIES = {
    "gpu_power_limit_target_watts", "wattwarden_power_budget_watts",
    "wattwarden_policy_decisions_total", "wattwarden_policy_active", "wattwarden_policy_mode",
    "wattwarden_policy_holding", "wattwarden_power_budget_unreachable",
    "wattwarden_policy_apply_fallback", "wattwarden_job_migrations_total",
    "wattwarden_power_demand_watts", "wattwarden_power_demand_above_min_watts",
    "wattwarden_power_budget_starving",
    "wattwarden_power_lease_active", "wattwarden_power_lease_expirations_total",
}  # fmt: skip


def test_the_policy_metrics_are_on_metrics(tmp_path: Path) -> None:
    with agent_on(tmp_path, power_budget_watts=2000.0, **IDLE_CAPS) as agent:

        def families() -> dict[str, Any] | None:
            m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
            return m if set(m) >= POLICY_FAMILIES else None

        m = wait_for(families, timeout_s=30, what="every policy family")
        decided = {(lab["policy"], lab["action"], lab["mode"]) for lab, _ in
                   m["wattwarden_policy_decisions_total"]}  # fmt: skip
        assert ("idle", "set", "dry_run") in decided
        assert {lab["reason"] for lab, _ in m["wattwarden_job_migrations_total"]} == {
            "budget", "thermal", "xid", "lost",
        }  # fmt: skip


def wattwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattwarden", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def cells(row: str) -> list[str]:
    """A status table row's cells (columns are two spaces apart at least)."""
    return re.split(r"\s{2,}", row.strip())


def test_status_shows_the_budget_the_mode_and_each_gpus_target(tmp_path: Path) -> None:
    with agent_on(tmp_path, apply=True, power_budget_watts=2400.0, **IDLE_CAPS) as agent:

        def capped_table() -> list[str] | None:
            result = wattwarden("status", "--agent", agent.url)
            assert result.returncode == 0, result.stderr
            lines = result.stdout.splitlines()
            limits = [cells(row)[3:5] for row in lines[1:5]]
            return lines if limits == [["200 W", "200 W"]] * 4 else None

        lines = wait_for(capped_table, timeout_s=30, what="status to show the caps")
        assert cells(lines[0])[:5] == ["GPU", "NAME", "POWER", "LIMIT", "TARGET"]
        assert ", budget 2400 W, mode apply, node " in lines[5]
        assert len(lines) == 6
        agent.opened.fleet[1].inject("lost")  # type: ignore[index]
        wait_for(lambda: "policy engine holding: GPU 1 is lost" in
                 wattwarden("status", "--agent", agent.url).stdout, timeout_s=30,
                 what="status to say the engine holds")  # fmt: skip
        as_json = json.loads(wattwarden("status", "--agent", agent.url, "--json").stdout)
        assert (as_json["policy_mode"], as_json["power_budget_watts"]) == ("apply", 2400.0)
        assert as_json["gpus"][0]["power_limit_target_watts"] == H100_MIN_W
        assert as_json["policy_holding"] == "GPU 1 is lost"


def test_status_of_a_local_read_has_no_target_budget_or_mode() -> None:
    result = wattwarden("status", "--sim", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert cells(lines[0])[4] == "TARGET"
    assert [cells(row)[3:5] for row in lines[1:3]] == [["700 W", "-"]] * 2
    assert lines[3].startswith("2 GPU(s), ") and "budget" not in lines[3] and "mode" not in lines[3]


# ------------------------------------------------------------------ a real crash
def test_kill_9_while_capped_then_a_restart_restores_every_original_limit(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with run_agent(state, "--sim", "3", "--apply", "--policy", "idle", "--idle-after-s", "1",
                   "--policy-period-s", "0.2") as agent:  # fmt: skip
        wait_for(lambda: sim_limits(state) == [H100_MIN_W] * 3, timeout_s=30, what="idle caps")
        agent.stop(signal.SIGKILL)
    assert sim_limits(state) == [H100_MIN_W] * 3  # the crash left them capped
    with run_agent(state, "--sim", "3") as agent:
        assert sim_limits(state) == [H100_MAX_W] * 3
        assert "previous run that did not exit cleanly" in agent.log_path.read_text()


def test_budget_capping_on_a_loaded_fleet_holds_the_budget_through_the_agent(
    tmp_path: Path,
) -> None:
    budget = 0.6 * 4 * H100_MAX_W
    with agent_on(tmp_path, apply=True, power_budget_watts=budget, window_s=1.0) as agent:
        for gpu in range(4):
            status, _ = http_json(agent.url + "/api/v1/sim/load",
                                  {"gpu": gpu, "utilization": 1.0}, token=token(agent))  # fmt: skip
            assert status == 200
        assert agent.opened.fleet is not None
        fleet = agent.opened.fleet

        def under() -> bool:
            return sum(g.true_power_w() for g in fleet.gpus) <= budget

        wait_for(under, timeout_s=30, what="the node under its budget")
        assert all(H100_MIN_W <= w <= H100_MAX_W for w in limits(agent))
        assert sum(limits(agent)) <= budget + 1.0

        def logged() -> list[DecisionRecord] | None:
            # a period logs its decisions after it set the limits: await them, do not race them
            got = [DecisionRecord.from_json(d)
                   for d in http_json(agent.url + "/api/v1/decisions")[1]["decisions"]]  # fmt: skip
            return got if any(d.action == "set" for d in got) else None

        records = wait_for(logged, timeout_s=10, what="the period's decisions logged")
        assert {d.policy for d in records if d.action == "set"} == {"budget"}
        # the actuator's rate limit sits under the 0.2 s period: no change of the loop's own
        # is refused as too soon
        assert [d.error for d in records if d.error is not None] == []
        m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
        failed = [lab for lab, _ in m["wattwarden_policy_actions_total"]
                  if lab["action"] == "set_power_limit_failed"]  # fmt: skip
        assert failed == []


# ------------------------------------------------------------------ contract round trips
def test_a_policy_update_the_client_builds_is_the_one_the_server_reads() -> None:
    for update in (
        PolicyUpdate(),
        PolicyUpdate(power_budget_watts=2400.0, mode="apply", policies=("thermal", "budget")),
        PolicyUpdate(power_budget_watts=None),
        PolicyUpdate(policies=()),
    ):
        assert PolicyUpdate.from_json(update.to_json()) == update
    assert PolicyUpdate().to_json() == {}
    assert PolicyUpdate().power_budget_watts is UNCHANGED
    assert PolicyUpdate(power_budget_watts=None).to_json() == {"power_budget_watts": None}


def test_a_decision_record_reads_back_as_written() -> None:
    d = Decision(1, "set", "budget", "over", 420.0, "apply", 1.5, {}, enforced_w=419.0,
                 from_w=700.0, jobs=("a", "b"))  # fmt: skip
    record = DecisionRecord.from_decision(d)
    assert DecisionRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.to_json()["jobs"] == ["a", "b"]


class Alternate:
    """A policy that wants GPU 0 at 300 W and 400 W in turn, a change every period."""

    name = "idle"

    def __init__(self) -> None:
        self.periods = 0

    def intents(self, inputs: PolicyInputs) -> list[Intent]:
        self.periods += 1
        return [Intent(0, 300.0 if self.periods % 2 else 400.0, "alternate")]


def test_the_actuators_rate_limit_never_refuses_a_change_of_the_loops_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = Alternate()

    def factory(name: str, cfg: PolicySettings, budget: Any) -> Any:
        return policy if name == "idle" else build_policy(name, cfg, budget)

    monkeypatch.setattr(agent_module, "PolicyLoop", functools.partial(PolicyLoop, factory=factory))
    with agent_on(tmp_path, apply=True, policy=("idle",)) as agent:
        wait_for(lambda: policy.periods >= 12, timeout_s=30, what="12 periods")
        decisions = agent.policy.decisions()
    sets = [d for d in decisions if isinstance(d, Decision) and d.action == "set"]
    assert len(sets) >= 10
    assert [d.error for d in sets if d.error is not None] == []


# ------------------------------------------------------------------ GET /api/v1/decisions?limit
def test_decisions_limit_keeps_the_newest_and_takes_the_last_limit_given(tmp_path: Path) -> None:
    with agent_on(tmp_path, apply=True, **IDLE_CAPS) as agent:
        url = agent.url + "/api/v1/decisions"

        def capped() -> list[dict[str, Any]] | None:
            got: list[dict[str, Any]] = http_json(url + "?limit=2000")[1]["decisions"]
            return got if len([d for d in got if d["action"] == "set"]) == 4 else None

        every = wait_for(capped, timeout_s=30, what="a set for each GPU")  # limit at its maximum
        assert http_json(url)[1]["decisions"] == every  # fewer than the default 100
        assert http_json(url + "?limit=1") == (200, {"decisions": every[-1:]})  # the lower bound
        assert http_json(url + "?limit=3&limit=1") == (200, {"decisions": every[-1:]})
        assert http_json(url + "?limit=1&limit=3") == (200, {"decisions": every[-3:]})


@pytest.mark.parametrize(("query", "error"), [
    ("limit=0", "limit must be within 1..2000, got '0'"),
    ("limit=2001", "limit must be within 1..2000, got '2001'"),
    ("limit=-1", "limit must be within 1..2000, got '-1'"),
    ("limit=ten", "limit must be an integer, got 'ten'"),
    ("limit=1.5", "limit must be an integer, got '1.5'"),
    ("limit=", "limit must be an integer, got ''"),
    ("limit=5&limit=0", "limit must be within 1..2000, got '0'"),
])  # fmt: skip
def test_a_decisions_limit_out_of_bounds_or_not_an_integer_gets_400_saying_so(
    tmp_path: Path, query: str, error: str
) -> None:
    with agent_on(tmp_path) as agent:
        assert http_json(f"{agent.url}/api/v1/decisions?{query}") == (400, {"error": error})
