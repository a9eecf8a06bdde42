"""The agent as operators run it: HTTP API, token auth, dry-run, limits restored."""

from __future__ import annotations

import base64
import hmac
import http.client
import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bcrypt
import pytest
from helpers import (
    crash_with_a_cap,
    gauge,
    http_get,
    http_json,
    run_agent,
    sim_limits,
    wait_for,
)
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Route

from wattwarden.agent import Agent
from wattwarden.api import auth as auth_module
from wattwarden.api.contract import (
    MAX_JSON_DEPTH,
    ApiError,
    ContractError,
    JobProgress,
    JobRecord,
    JobRegistration,
    _json_depth,
    parse_body,
)
from wattwarden.api.http import MAX_BODY_BYTES, HttpLimits
from wattwarden.api.server import AgentContext, ApiServer, _Edge, build_app, energy_json
from wattwarden.api.webconfig import WebConfig
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import JobError, JobRegistry
from wattwarden.collectors.rapl import RaplSample
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.config import AgentConfig
from wattwarden.hardware.errors import HardwareError, InvalidArgument
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.hardware.sim.clock import ManualClock
from wattwarden.hardware.sim.fake_nvml import uninstall_fake_nvml
from wattwarden.hardware.sim.fleet import SimFleet
from wattwarden.policies.actuator import LimitChange, RateLimited


def test_agent_serves_health_state_history_and_metrics(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "8") as agent:
        assert http_get(agent.url + "/healthz") == (200, b"ok\n")
        status, state = http_json(agent.url + "/api/v1/state")
        assert status == 200
        assert state["backend"] == "sim" and state["policy_mode"] == "dry_run"
        assert [g["index"] for g in state["gpus"]] == list(range(8))
        assert all(g["up"] and g["power_watts"] > 0 for g in state["gpus"])

        def history_point() -> dict[str, Any] | None:
            status, body = http_json(agent.url + "/api/v1/history?seconds=60")
            return body if status == 200 and body["gpus"]["0"] else None

        history = wait_for(history_point, timeout_s=10, what="one second of history")
        assert history["columns"] == HISTORY_COLUMNS
        assert all(len(row) == len(HISTORY_COLUMNS) for row in history["gpus"]["0"])
        assert state["power_budget_lease_watts"] is None  # no fleet controller leases it yet
        assert http_json(agent.url + "/api/v1/history?seconds=abc")[0] == 400
        assert http_get(agent.url + "/nope")[0] == 404


def test_token_is_created_0600_and_writes_without_it_are_refused(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        mode = stat.S_IMODE((agent.state_dir / "token").stat().st_mode)
        assert mode == 0o600
        body = {"gpu": 0, "utilization": 0.5}
        assert http_json(agent.url + "/api/v1/sim/load", body)[0] == 401
        assert http_json(agent.url + "/api/v1/sim/load", body, token="wrong")[0] == 401
        assert http_json(agent.url + "/api/v1/sim/load", body, token=agent.token)[0] == 200


def test_bad_bodies_get_clear_errors(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        url, tok = agent.url, agent.token
        status, _ = http_json(url + "/api/v1/sim/load", {"gpu": 9, "utilization": 0.5}, token=tok)
        assert status == 404
        status, err = http_json(url + "/api/v1/sim/load", {"gpu": 0}, token=tok)
        assert (status, err["error"]) == (400, "missing field 'utilization'")
        status, err = http_json(url + "/api/v1/sim/load", {"gpu": 0, "utilization": 2}, token=tok)
        assert status == 422 and "within [0, 1]" in err["error"]
        status, err = http_json(url + "/api/v1/sim/faults", {"gpu": 0, "fault": "melt"}, token=tok)
        assert status == 422 and "melt" in err["error"]


def test_synthetic_load_shows_up_as_power_in_metrics(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "4", "--window-s", "1") as agent:
        http_json(agent.url + "/api/v1/sim/load", {"gpu": 2, "utilization": 1.0}, token=agent.token)
        wait_for(
            lambda: (gauge(agent.url, "gpu_power_watts", "2") or 0) > 650,
            timeout_s=15,
            what="GPU 2 near 700 W",
        )
        assert (gauge(agent.url, "gpu_power_watts", "1") or 0) < 80


def test_power_limit_changes_are_refused_in_dry_run(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        status, err = http_json(
            agent.url + "/api/v1/power-limits", {"gpu": 0, "watts": 300}, token=agent.token
        )
        assert status == 409 and "dry-run" in err["error"]


def test_apply_sets_limits_in_range_and_restores_them_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with run_agent(state, "--sim", "2", "--apply") as agent:
        url, tok = agent.url + "/api/v1/power-limits", agent.token
        status, err = http_json(url, {"gpu": 0, "watts": 900}, token=tok)
        assert status == 422 and "outside its range [200, 700]" in err["error"]
        status, body = http_json(url, {"gpu": 0, "watts": 350}, token=tok)
        assert (status, body["enforced_watts"]) == (200, 350.0)
        assert http_json(url, {"gpu": 0, "watts": 360}, token=tok)[0] == 429  # rate-limited
        wait_for(lambda: gauge(agent.url, "gpu_power_limit_watts", "0") == 350.0, timeout_s=10)
        assert sim_limits(state)[0] == 350.0  # the (simulated) driver holds it
        assert agent.stop(signal.SIGTERM) == 0
    assert sim_limits(state) == [700.0, 700.0]


def test_limits_left_by_a_crashed_agent_are_restored_at_the_next_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    crash_with_a_cap(state)
    assert sim_limits(state)[1] == 250.0  # crashed with the GPU capped
    with run_agent(state, "--sim", "2") as agent:
        assert gauge(agent.url, "gpu_power_limit_watts", "1") == 700.0
        assert "previous run that did not exit cleanly" in agent.log_path.read_text()


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "wattwarden", "agent", "--sim", "1", "--listen",
             f"127.0.0.1:{port}", "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# The same API in-process: its own server over a copy of a running agent's context, so a test can
# swap what the handlers see (a web config, an actuator, a clock) without a subprocess.

BODY_LIMIT = 1000
"""The in-process server's body limit, small enough to reach byte by byte."""


class Live:
    """A running agent on 2 simulated GPUs, and a server of ours over a copy of its context."""

    def __init__(self, agent: Agent, server: ApiServer, ctx: AgentContext) -> None:
        self.agent = agent
        self.server = server
        self.ctx = ctx
        self.token = ctx.token
        self.port = server.address[1]

    def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None,
        headers: dict[str, str] | None = None, raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:  # fmt: skip
        """One request; the JSON body decoded (else the bytes), headers by lower-case name."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            sent = {"Content-Type": "application/json", **(headers or {})}
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            data = raw if raw is not None else None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            got = {k.lower(): v for k, v in resp.getheaders()}
            payload = resp.read()
            if got.get("content-type", "").startswith("application/json"):
                return resp.status, got, json.loads(payload)
            return resp.status, got, payload
        finally:
            conn.close()

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST with the right token; (status, decoded body)."""
        status, _, got = self.call("POST", path, body, token=self.token)
        return status, got


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    state = tmp_path_factory.mktemp("api") / "state"
    agent = Agent(AgentConfig(listen="127.0.0.1:0", state_dir=state, sim=2))
    ctx = replace(agent.context)
    server = ApiServer("127.0.0.1", 0, limits=HttpLimits(max_body_bytes=BODY_LIMIT))
    try:
        agent.start()
        server.start(ctx)
        yield Live(agent, server, ctx)
    finally:
        server.close()
        agent.close()
        uninstall_fake_nvml()


@pytest.fixture
def live(live_server: Live) -> Live:
    """The server, serving an app built for this test (each new connection takes the new one):
    the route table and its endpoints are made within the test that uses them."""
    running = live_server.server._server
    assert running is not None
    running.config.loaded_app = build_app(live_server.ctx, live_server.server.limits)
    return live_server


def without_engine(live: Live, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The context of an agent with no policy engine, in ``mode``: the mode is then its own."""
    monkeypatch.setattr(live.ctx, "policy", None)
    monkeypatch.setattr(live.ctx, "mode", mode)


def routes_of_the_app(ctx: AgentContext) -> list[tuple[str, str]]:
    """(method, path) of every route in the app's own table, HEAD left out."""
    edge = build_app(ctx)
    assert isinstance(edge, _Edge) and isinstance(edge.app, Starlette)
    table = []
    for route in edge.app.routes:
        assert isinstance(route, Route) and route.methods
        table += [(m, route.path) for m in sorted(route.methods - {"HEAD"})]
    return table


def concrete(path: str) -> str:
    return path.replace("{name}", "no-such-job")


ROUTES = {
    ("GET", "/"), ("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/api/v1/state"),
    ("GET", "/api/v1/history"), ("GET", "/api/v1/energy"), ("GET", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/{name}"), ("POST", "/api/v1/jobs"), ("DELETE", "/api/v1/jobs/{name}"),
    ("POST", "/api/v1/jobs/{name}/progress"), ("POST", "/api/v1/jobs/{name}/migrate"),
    ("POST", "/api/v1/power-limits"), ("POST", "/api/v1/sim/faults"), ("POST", "/api/v1/sim/load"),
    ("GET", "/api/v1/decisions"), ("GET", "/api/v1/policy"), ("POST", "/api/v1/policy"),
    ("GET", "/api/v1/policy/lease"), ("POST", "/api/v1/policy/lease"),
    ("DELETE", "/api/v1/policy/lease"),
}  # fmt: skip

# What a write with the right token gets: a body that passes the first field, so the answer shows
# the body was read and handed to the route's own handler. A new write route needs a line here.
WRITE_WITH_TOKEN: dict[tuple[str, str], tuple[Any, int, str]] = {
    ("POST", "/api/v1/jobs"): ({"name": "tbl"}, 400, "missing field 'pid'"),
    ("DELETE", "/api/v1/jobs/{name}"): (None, 404, "no job named 'no-such-job'"),
    ("POST", "/api/v1/jobs/{name}/progress"): (
        {"step": 1, "samples": 1, "tokens": 1}, 404, "no job named 'no-such-job'"),
    ("POST", "/api/v1/jobs/{name}/migrate"): ({"gpu": 0}, 404, "no job named 'no-such-job'"),
    ("POST", "/api/v1/power-limits"): ({"gpu": 0}, 400, "missing field 'watts'"),
    ("POST", "/api/v1/sim/faults"): ({"gpu": 0}, 400, "missing field 'fault'"),
    ("POST", "/api/v1/sim/load"): ({"gpu": 0}, 400, "missing field 'utilization'"),
    ("POST", "/api/v1/policy"): (
        {"mode": "fast"}, 422, "field 'mode' must be one of dry_run, apply; got 'fast'"),
    ("POST", "/api/v1/policy/lease"): (
        {"power_budget_watts": 100}, 422, "field 'ttl_s' is missing"),
    ("DELETE", "/api/v1/policy/lease"): ({}, 422, "field 'holder' is missing"),
}  # fmt: skip


def test_the_route_table_holds_each_endpoint_once(live: Live) -> None:
    table = routes_of_the_app(live.ctx)
    assert sorted(table) == sorted(ROUTES)


def test_every_write_route_needs_the_exact_bearer_token(live: Live) -> None:
    writes = [(m, p) for m, p in routes_of_the_app(live.ctx) if m != "GET"]
    assert sorted(writes) == sorted(WRITE_WITH_TOKEN)
    tok = live.token
    refused = {
        "no header": {},
        "wrong token": {"Authorization": "Bearer wrong-" + tok},
        "a prefix": {"Authorization": "Bearer " + tok[:-1]},
        "a suffix": {"Authorization": "Bearer " + tok[1:]},
        "the token and more": {"Authorization": "Bearer " + tok + "x"},
        "empty token": {"Authorization": "Bearer "},
        "scheme Basic": {"Authorization": "Basic " + tok},
        "scheme Token": {"Authorization": "Token " + tok},
        "no scheme": {"Authorization": tok},
    }
    for method, path in writes:
        for case, headers in refused.items():
            status, got, body = live.call(method, concrete(path), {}, headers=headers)
            assert status == 401, (method, path, case, body)
            assert body == {"error": "missing or wrong bearer token"}
            assert got["www-authenticate"] == 'Bearer realm="wattwarden"'
        sent, status, error = WRITE_WITH_TOKEN[method, path]
        got_status, _, body = live.call(method, concrete(path), sent, token=tok)
        assert (got_status, body) == (status, {"error": error}), (method, path)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(live: Live, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {live.token}"}
    status, _, body = live.call("POST", "/api/v1/jobs", {}, headers=headers)
    assert (status, body) == (400, {"error": "missing field 'name'"})


def test_the_token_is_compared_in_constant_time(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    assert live.call("DELETE", "/api/v1/jobs/x", token="guess")[0] == 401
    assert calls == [(b"guess", live.token.encode())]
    calls.clear()
    monkeypatch.setattr(auth_module.hmac, "compare_digest", lambda a, b: True)
    assert live.call("DELETE", "/api/v1/jobs/x", token="guess")[0] == 404  # it alone decides


def test_the_write_token_is_read_before_the_body(live: Live) -> None:
    status, _, body = live.call("POST", "/api/v1/jobs", raw=b"{not json")
    assert (status, body["error"]) == (401, "missing or wrong bearer token")
    status, _, body = live.call("POST", "/api/v1/jobs", raw=b"x" * (BODY_LIMIT + 1))
    assert status == 401


def test_a_delete_takes_no_body_and_names_the_missing_job(live: Live) -> None:
    status, _, body = live.call("DELETE", "/api/v1/jobs/ghost", token=live.token)
    assert (status, body) == (404, {"error": "no job named 'ghost'"})


PASSWORD = "pass:word with a colon"


@pytest.fixture(scope="module")
def basic_users() -> dict[str, bytes]:
    return {"prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4))}


def basic(user: str, password: str, scheme: str = "Basic") -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"{scheme} {encoded}"}


def test_every_read_but_healthz_needs_basic_auth_when_the_web_config_names_users(
    live: Live, monkeypatch: pytest.MonkeyPatch, basic_users: dict[str, bytes]
) -> None:
    monkeypatch.setattr(live.ctx, "web", WebConfig(users=basic_users))
    reads = [p for m, p in routes_of_the_app(live.ctx) if m == "GET"]
    assert "/healthz" in reads and len(reads) >= 7
    refused = {
        "no header": {},
        "wrong password": basic("prometheus", "guess"),
        "unknown user": basic("grafana", PASSWORD),
        "scheme Bearer": basic("prometheus", PASSWORD, scheme="Bearer"),
        "not base64": {"Authorization": "Basic !!!"},
        "not UTF-8": {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()},
    }
    for path in reads:
        status, got, body = live.call("GET", concrete(path), headers={})
        if path == "/healthz":
            assert status == 200, body
            continue
        for case, headers in refused.items():
            status, got, body = live.call("GET", concrete(path), headers=headers)
            assert status == 401, (path, case, body)
            assert body == {"error": "basic auth required"}
            assert got["www-authenticate"] == 'Basic realm="wattwarden"'
        for scheme in ("Basic", "basic", "BASIC"):
            status, _, body = live.call(
                "GET", concrete(path), headers=basic("prometheus", PASSWORD, scheme)
            )
            if path.endswith("{name}"):
                assert (status, body) == (404, {"error": "no job named 'no-such-job'"})
            else:
                assert status == 200, (path, scheme, body)


def test_basic_auth_refuses_credentials_with_characters_outside_base64(
    live: Live, monkeypatch: pytest.MonkeyPatch, basic_users: dict[str, bytes]
) -> None:
    monkeypatch.setattr(live.ctx, "web", WebConfig(users=basic_users))
    good = basic("prometheus", PASSWORD)["Authorization"]
    assert live.call("GET", "/api/v1/state", headers={"Authorization": good})[0] == 200
    for stray in ("!", "*", "\u00e9"):  # RFC 7617: the credentials are base64, nothing else
        status, _, body = live.call("GET", "/api/v1/state", headers={"Authorization": good + stray})
        assert (status, body) == (401, {"error": "basic auth required"}), stray


def test_basic_auth_refuses_what_is_not_user_colon_password_even_for_an_empty_login(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = {"": bcrypt.hashpw(b"", bcrypt.gensalt(rounds=4))}
    monkeypatch.setattr(live.ctx, "web", WebConfig(users=users))
    assert live.call("GET", "/api/v1/state", headers=basic("", ""))[0] == 200  # "Basic Og=="
    not_credentials = [
        "Basic",  # nothing after the scheme
        "Basic !!!",  # not base64
        "Basic " + base64.b64encode(b"\xff:\xfe").decode(),  # not UTF-8
        "Basic " + base64.b64encode(b"no colon").decode(),  # no user:password
    ]
    for header in not_credentials:
        status, got, body = live.call("GET", "/api/v1/state", headers={"Authorization": header})
        assert (status, body) == (401, {"error": "basic auth required"}), header
        assert got["www-authenticate"] == 'Basic realm="wattwarden"'


def test_a_server_started_with_its_own_limits_serves_the_api_under_them(
    live_server: Live,
) -> None:
    # the running agent's context: a second simulated agent in this process would replace the
    # one fake NVML library (pynvml's is process-wide) under the module's live agent
    agent = live_server.agent
    server = ApiServer("127.0.0.1", 0, limits=HttpLimits(max_body_bytes=200))
    try:
        server.start(replace(agent.context))
        conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=10)
        body = json.dumps({"name": "j", "pid": 1, "gpu": 0, "pad": "x" * 200})
        headers = {"Authorization": f"Bearer {agent.context.token}"}
        conn.request("POST", "/api/v1/jobs", body=body, headers=headers)
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (413, {"error": "body over 200 bytes"})
        conn.close()
    finally:
        server.close()


def test_reads_are_open_with_a_web_config_without_users(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live.ctx, "web", WebConfig())
    assert live.call("GET", "/api/v1/state")[0] == 200


def test_healthz_is_503_once_the_last_sample_is_older_than_max_5s_or_10_intervals(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    store = MetricStore(monotonic=lambda: now[0])
    monkeypatch.setattr(live.ctx, "store", store)
    assert live.call("GET", "/healthz")[:1] == (503,)  # never sampled
    store.mark_pass(1000.0)
    for interval_s, stale_after_s in ((0.1, 5.0), (0.5, 5.0), (0.75, 7.5), (2.0, 20.0)):
        monkeypatch.setattr(live.ctx, "interval_s", interval_s)
        for age_s, healthy in ((0.0, True), (stale_after_s - 0.01, True), (stale_after_s, True),
                               (stale_after_s + 0.01, False)):  # fmt: skip
            now[0] = 1000.0 + age_s
            status, got, body = live.call("GET", "/healthz")
            expected = (200, b"ok\n") if healthy else (503, b"sampler stalled\n")
            assert (status, body) == expected, (interval_s, age_s)
            assert got["content-type"] == "text/plain; charset=utf-8"


def test_healthz_goes_by_monotonic_time_so_a_wall_clock_step_does_not_flip_it(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [50.0]
    store = MetricStore(monotonic=lambda: now[0])
    monkeypatch.setattr(live.ctx, "store", store)
    store.mark_pass(time.time() - 3600.0)  # the wall clock stepped an hour ahead since the pass
    assert live.call("GET", "/healthz")[::2] == (200, b"ok\n")
    store.mark_pass(time.time() + 3600.0)  # and an hour back: a stalled sampler is still seen
    now[0] += 5.01
    assert live.call("GET", "/healthz")[::2] == (503, b"sampler stalled\n")


# ------------------------------------------------------------------ fields, bounds and limits


class StubGpu:
    """A simulated GPU's control surface, recording what it is asked and refusing ``refuse``."""

    def __init__(self, refuse: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse = refuse

    def inject(self, fault: str, **params: object) -> None:
        self.calls.append(("inject", fault, params))
        if self.refuse:
            raise InvalidArgument(self.refuse)

    def set_load(self, utilization: float, memory_bytes: int | None = None) -> None:
        self.calls.append(("set_load", utilization, memory_bytes))
        if self.refuse:
            raise InvalidArgument(self.refuse)


@pytest.fixture
def stub_fleet(live: Live, monkeypatch: pytest.MonkeyPatch) -> list[StubGpu]:
    fleet = [StubGpu(), StubGpu(), StubGpu()]
    monkeypatch.setattr(live.ctx, "fleet", fleet)
    return fleet


class StubActuator:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[int, float, str]] = []

    def set_limit(self, gpu: int, watts: float, *, reason: str) -> LimitChange:
        self.calls.append((gpu, watts, reason))
        if self.error is not None:
            raise self.error
        return LimitChange(gpu, watts, watts - 0.5)  # the driver rounds


GPU_ROUTES = ["/api/v1/jobs", "/api/v1/jobs/bounds/migrate", "/api/v1/power-limits",
              "/api/v1/sim/load", "/api/v1/sim/faults"]  # fmt: skip
VALID = {
    "/api/v1/jobs": {"name": "bounds", "pid": os.getpid()},
    "/api/v1/jobs/bounds/migrate": {},
    "/api/v1/power-limits": {"watts": 300},
    "/api/v1/sim/load": {"utilization": 0.5},
    "/api/v1/sim/faults": {"fault": "clear"},
}


@pytest.mark.parametrize("path", GPU_ROUTES)
def test_gpu_index_bounds_at_both_ends(
    live: Live, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # the store holds 2 GPUs (the agent's); the sim endpoints see a fleet of 3
    monkeypatch.setattr(live.ctx, "fleet", [StubGpu(), StubGpu(), StubGpu()])
    without_engine(live, monkeypatch, "apply")
    monkeypatch.setattr(live.ctx, "actuator", StubActuator())
    count = 3 if "/sim/" in path else 2
    assert live.post("/api/v1/jobs", {"name": "bounds", "pid": os.getpid(), "gpu": 0})[0] in (
        200,
        201,
    )
    try:
        for gpu in (-1, count, count + 1, 10**30):
            status, body = live.post(path, {**VALID[path], "gpu": gpu})
            assert status == 404, (gpu, body)
            assert body["error"] == f"field 'gpu': no GPU {gpu} (this node has {count})"
        for gpu in (0, count - 1):
            status, body = live.post(path, {**VALID[path], "gpu": gpu})
            assert status in (200, 201), (gpu, body)
            if path.endswith("/migrate"):  # the job is on GPU 0
                assert body["target_gpu"] == (None if gpu == 0 else gpu)
            else:
                assert body["gpu"] == gpu
        for bad in (True, False, 1.0, "1", None):
            status, body = live.post(path, {**VALID[path], "gpu": bad})
            assert status == 400, (bad, body)
            assert body["error"] == f"field 'gpu' must be an integer, got {bad!r}"
        status, body = live.post(path, VALID[path])
        assert (status, body) == (400, {"error": "missing field 'gpu'"})
    finally:
        live.call("DELETE", "/api/v1/jobs/bounds", token=live.token)


@pytest.mark.parametrize("counter", ["step", "samples", "tokens"])
def test_progress_counters_are_refused_below_0_above_2_63_and_as_bools(
    live: Live, counter: str
) -> None:
    assert live.post("/api/v1/jobs", {"name": "counts", "pid": os.getpid(), "gpu": 0})[0] == 201
    path = "/api/v1/jobs/counts/progress"
    others = {k: 1 for k in ("step", "samples", "tokens") if k != counter}
    try:
        for value in (0, 1, 2**63 - 1):
            status, body = live.post(path, {**others, counter: value})
            assert (status, body[counter]) == (200, value)
        for value in (-1, 2**63, 10**30):
            status, body = live.post(path, {**others, counter: value})
            assert status == 400
            assert body["error"] == (
                f"field {counter!r} must be within 0..{2**63 - 1}, got {value}"
            )
        for value in (True, 1.0, "1", None, [1]):
            status, body = live.post(path, {**others, counter: value})
            assert status == 400
            assert body["error"] == f"field {counter!r} must be an integer, got {value!r}"
        status, body = live.post(path, others)
        assert (status, body) == (400, {"error": f"missing field {counter!r}"})
    finally:
        live.call("DELETE", "/api/v1/jobs/counts", token=live.token)


def test_progress_of_a_job_that_is_not_there_is_404(live: Live) -> None:
    status, body = live.post("/api/v1/jobs/ghost/progress", {"step": 1, "samples": 1, "tokens": 1})
    assert (status, body) == (404, {"error": "no job named 'ghost'"})


def test_job_registration_checks_each_field_and_names_it(live: Live) -> None:
    base = {"name": "reg", "pid": os.getpid(), "gpu": 0}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": 5}, "field 'name' must be a string, got 5"),
        (
            {"name": "-dash"},
            "field 'name' must be 1-64 of A-Z a-z 0-9 _ . : - starting with a "
            "letter or digit, got '-dash'",
        ),
        ({"name": "n" * 65}, "got " + repr("n" * 65)[:37] + "..."),
        ({"pid": 0}, "field 'pid' must be within 1..2147483647, got 0"),
        ({"pid": 2**31}, "field 'pid' must be within 1..2147483647, got 2147483648"),
        ({"pid": True}, "field 'pid' must be an integer, got True"),
        ({"pid": 7.0}, "field 'pid' must be an integer, got 7.0"),
        ({"priority": "urgent"}, "field 'priority' must be one of high, normal, low"),
        ({"priority": None}, "field 'priority' must be one of high, normal, low"),
        ({"utilization": 0}, "field 'utilization' must be within (0, 1], got 0.0"),
        ({"utilization": 1.0001}, "field 'utilization' must be within (0, 1], got 1.0001"),
        ({"utilization": -0.5}, "field 'utilization' must be within (0, 1], got -0.5"),
        ({"utilization": True}, "field 'utilization' must be a number, got True"),
        ({"utilization": "0.5"}, "field 'utilization' must be a number, got '0.5'"),
    ]
    for change, error in cases:
        status, body = live.post("/api/v1/jobs", {**base, **change})
        assert status == 400, (change, body)
        assert error in body["error"], (change, body)
        assert len(body["error"]) < 200
    assert "reg" not in [j["name"] for j in live.call("GET", "/api/v1/jobs")[2]["jobs"]]


def test_job_registration_accepts_the_edges_of_each_range(live: Live) -> None:
    edges: list[dict[str, Any]] = [
        {"pid": 1}, {"pid": 2**31 - 1}, {"utilization": 1}, {"utilization": 1e-9},
        {"priority": "high"}, {"utilization": None}, {"name": "A" + "z" * 63},
    ]  # fmt: skip
    for change in edges:
        body = {"name": "edge", "pid": os.getpid(), "gpu": 1, **change}
        status, got = live.post("/api/v1/jobs", body)
        try:
            assert status == 201, (change, got)
            assert got["name"] == body["name"] and got["gpu"] == 1 and got["pid"] == body["pid"]
            assert got["priority"] == change.get("priority", "normal")
        finally:
            assert live.call("DELETE", f"/api/v1/jobs/{body['name']}", token=live.token)[0] == 200


def test_registering_a_job_again_is_200_and_another_process_taking_its_name_is_409(
    live: Live,
) -> None:
    job = {"name": "twice", "pid": os.getpid(), "gpu": 0}
    try:
        assert live.post("/api/v1/jobs", job)[0] == 201
        status, body = live.post("/api/v1/jobs", {**job, "gpu": 1})
        assert (status, body["gpu"]) == (200, 1)
        status, body = live.post("/api/v1/jobs", {**job, "pid": os.getppid()})
        assert status == 409 and "twice" in body["error"]
        status, _, body = live.call("GET", "/api/v1/jobs/twice")
        assert (status, body["pid"]) == (200, os.getpid())
        status, body = live.post("/api/v1/jobs/twice/migrate", {"gpu": 0})
        assert (status, body["target_gpu"]) == (200, 0)
    finally:
        live.call("DELETE", "/api/v1/jobs/twice", token=live.token)
    status, _, body = live.call("GET", "/api/v1/jobs/never-registered")
    assert (status, body) == (404, {"error": "no job named 'never-registered'"})


def test_a_job_error_other_than_a_missing_job_is_400(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Full(JobRegistry):
        def register(self, *args: Any, **kwargs: Any) -> Any:
            raise JobError("1024 jobs are running")

    monkeypatch.setattr(live.ctx, "jobs", Full())
    status, body = live.post("/api/v1/jobs", {"name": "x", "pid": 1, "gpu": 0})
    assert (status, body) == (400, {"error": "1024 jobs are running"})


def test_an_unexpected_exception_is_a_500_saying_where_to_look(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("bug")

    monkeypatch.setattr(live.ctx, "energy", broken)
    status, _, body = live.call("GET", "/api/v1/energy")
    assert (status, body) == (500, {"error": "internal error; see agent log"})


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (None, 200, None),
        (InvalidArgument("300 W is out of range"), 422, "field 'watts': 300 W is out of range"),
        (RateLimited("one change a second"), 429, "one change a second"),
        (HardwareError("NVML: no permission"), 502, "driver refused: NVML: no permission"),
    ],
)  # fmt: skip
def test_power_limit_outcomes_map_to_their_status(
    live: Live, monkeypatch: pytest.MonkeyPatch, error: Exception | None, status: int,
    message: str | None,
) -> None:  # fmt: skip
    actuator = StubActuator(error)
    monkeypatch.setattr(live.ctx, "actuator", actuator)
    without_engine(live, monkeypatch, "apply")
    store = live.ctx.store
    counted = []
    monkeypatch.setattr(store, "count_policy_action", lambda *a: counted.append(a))
    got, body = live.post("/api/v1/power-limits", {"gpu": 1, "watts": 300})
    assert actuator.calls == [(1, 300.0, "api")]
    assert got == status
    if message is None:
        assert body == {"gpu": 1, "requested_watts": 300.0, "enforced_watts": 299.5}
        assert counted == [("api", "set_power_limit", "apply")]
    else:
        assert body == {"error": message}
        failed = [("api", "set_power_limit_failed", "apply")]
        assert counted == (failed if status == 502 else [])


@pytest.mark.parametrize(("mode", "has_actuator"), [("dry_run", True), ("apply", False)])
def test_power_limit_changes_need_apply_mode_and_an_actuator(
    live: Live, monkeypatch: pytest.MonkeyPatch, mode: str, has_actuator: bool
) -> None:
    actuator = StubActuator()
    monkeypatch.setattr(live.ctx, "actuator", actuator if has_actuator else None)
    without_engine(live, monkeypatch, mode)
    status, body = live.post("/api/v1/power-limits", {"gpu": 0, "watts": 300})
    assert status == 409
    assert body["error"] == (
        "the agent runs in dry-run mode; start it with --apply to change power limits"
    )
    assert actuator.calls == []


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b'{"gpu": 0, "watts": NaN}', "field 'watts' must be a number, got NaN"),
        (b'{"gpu": 0, "watts": Infinity}', "field 'watts' must be a number, got Infinity"),
        (b'{"gpu": 0, "watts": -Infinity}', "field 'watts' must be a number, got -Infinity"),
        (b'{"gpu": 0, "watts": 1e400}', "field 'watts' must be a finite number, got inf"),
        (b'{"gpu": 0, "watts": -1e400}', "field 'watts' must be a finite number, got -inf"),
        (b'{"gpu": 0, "watts": 1' + b"0" * 400 + b"}", "field 'watts' must be a finite number"),
        (b'{"gpu": 0, "watts": true}', "field 'watts' must be a number, got True"),
        (b'{"gpu": 0, "watts": "300"}', "field 'watts' must be a number, got '300'"),
        (b'{"gpu": 0}', "missing field 'watts'"),
    ],
)
def test_watts_must_be_a_finite_number_and_not_a_bool(
    live: Live, monkeypatch: pytest.MonkeyPatch, raw: bytes, error: str
) -> None:
    actuator = StubActuator()
    monkeypatch.setattr(live.ctx, "actuator", actuator)
    without_engine(live, monkeypatch, "apply")
    status, _, body = live.call("POST", "/api/v1/power-limits", raw=raw, token=live.token)
    assert status == 400
    assert body["error"].startswith(error)
    assert actuator.calls == []


def test_watts_given_as_an_integer_is_taken_as_a_float(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    actuator = StubActuator()
    monkeypatch.setattr(live.ctx, "actuator", actuator)
    without_engine(live, monkeypatch, "apply")
    assert live.post("/api/v1/power-limits", {"gpu": 0, "watts": 250})[0] == 200
    assert actuator.calls == [(0, 250.0, "api")] and isinstance(actuator.calls[0][1], float)


def test_sim_endpoints_pass_checked_fields_to_the_gpu(
    live: Live, stub_fleet: list[StubGpu]
) -> None:
    assert live.post("/api/v1/sim/load", {"gpu": 2, "utilization": 0.25}) == (
        200, {"gpu": 2, "utilization": 0.25})  # fmt: skip
    assert live.post("/api/v1/sim/load", {"gpu": 1, "utilization": 1, "memory_bytes": 0})[0] == 200
    body = {"gpu": 1, "utilization": 0.5, "memory_bytes": 2**63 - 1}
    assert live.post("/api/v1/sim/load", body)[0] == 200
    assert (
        live.post("/api/v1/sim/load", {"gpu": 0, "utilization": 0, "memory_bytes": None})[0] == 200
    )
    assert stub_fleet[2].calls == [("set_load", 0.25, None)]
    assert stub_fleet[1].calls == [("set_load", 1.0, 0), ("set_load", 0.5, 2**63 - 1)]
    assert stub_fleet[0].calls == [("set_load", 0.0, None)]
    for memory, error in ((-1, "within 0.."), (2**63, "within 0.."), (True, "an integer"),
                          (1.5, "an integer")):  # fmt: skip
        status, got = live.post("/api/v1/sim/load", {"gpu": 0, "utilization": 0.5,
                                                     "memory_bytes": memory})  # fmt: skip
        assert status == 400 and f"field 'memory_bytes' must be {error}" in got["error"]
    status, got = live.post("/api/v1/sim/faults", {"gpu": 1, "fault": "overheat", "delta_c": 30})
    assert (status, got) == (200, {"gpu": 1, "fault": "overheat"})
    assert stub_fleet[1].calls[-1] == ("inject", "overheat", {"delta_c": 30})
    params = {"gpu": 0, "fault": "xid", "xid": 79, "field": "power", "delta_c": 1}
    assert live.post("/api/v1/sim/faults", params)[0] == 200
    assert stub_fleet[0].calls[-1] == ("inject", "xid", {"xid": 79, "field": "power", "delta_c": 1})
    status, got = live.post("/api/v1/sim/faults", {"gpu": 0, "fault": "xid", "zz": 1, "melt": 2})
    assert (status, got) == (400, {"error": "field 'melt' is not a fault parameter"})
    status, got = live.post("/api/v1/sim/faults", {"gpu": 0, "fault": 7})
    assert (status, got) == (400, {"error": "field 'fault' must be a string, got 7"})
    status, got = live.post("/api/v1/sim/faults", {"gpu": 0})
    assert (status, got) == (400, {"error": "missing field 'fault'"})


def test_what_the_simulated_gpu_refuses_is_422_with_its_reason(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live.ctx, "fleet", [StubGpu("unknown fault 'melt'")])
    status, got = live.post("/api/v1/sim/faults", {"gpu": 0, "fault": "melt"})
    assert (status, got) == (422, {"error": "unknown fault 'melt'"})
    status, got = live.post("/api/v1/sim/load", {"gpu": 0, "utilization": 0.5})
    assert (status, got) == (422, {"error": "unknown fault 'melt'"})


def test_sim_endpoints_are_404_on_real_gpus(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live.ctx, "fleet", None)
    for path, body in (("/api/v1/sim/load", {"gpu": 0, "utilization": 0.5}),
                       ("/api/v1/sim/faults", {"gpu": 0, "fault": "clear"})):  # fmt: skip
        status, got = live.post(path, body)
        assert (status, got) == (
            404,
            {"error": "this agent reads real GPUs; sim endpoints are off"},
        )


def nested(depth: int) -> bytes:
    """A body whose arrays and objects nest ``depth`` deep, the outer object counted."""
    return b'{"name": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_a_body_nested_exactly_max_json_depth_is_parsed_and_one_more_is_refused(
    live: Live,
) -> None:
    assert MAX_JSON_DEPTH == 16
    status, _, body = live.call("POST", "/api/v1/jobs", raw=nested(16), token=live.token)
    assert status == 400
    assert body["error"] == "field 'name' must be a string, got " + "[" * 15 + "]" * 15
    status, _, body = live.call("POST", "/api/v1/jobs", raw=nested(17), token=live.token)
    assert (status, body) == (400, {"error": "body is nested more than 16 levels deep"})


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"", 0),
        (b"{}", 1),
        (b"[[]]", 2),
        (b"[[], [], [], [], []]", 2),  # siblings do not add up
        (b'{"a": [1, {"b": []}], "c": {}}', 4),
        (b'{"a": "[[[[{{{{"}', 1),  # brackets inside strings are text
        (b'{"a": "\\"[[[[", "b": "]]\\\\"}', 1),  # as are escaped quotes and backslashes
        (b'["]"]', 1),
    ],
)
def test_json_depth_counts_nesting_not_brackets(raw: bytes, depth: int) -> None:
    assert _json_depth(raw) == depth


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", "body must be a JSON object"),
        (b"[]", "body must be a JSON object"),
        (b'"x"', "body must be a JSON object"),
        (b"{", "body is not JSON: "),
        (b"\xff", "body is not JSON: "),
    ],
)
def test_a_body_must_be_a_json_object(raw: bytes, error: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_body(raw)
    assert caught.value.status == 400 and str(caught.value).startswith(error)


def test_parse_body_keeps_non_finite_constants_to_name_them() -> None:
    body = parse_body(b'{"a": NaN, "b": -Infinity, "c": {"d": 1}}')
    assert repr(body["a"]) == "NaN" and repr(body["b"]) == "-Infinity" and body["c"] == {"d": 1}


def padded(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes."""
    return b"{}" + b" " * (size - 2)


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(live: Live) -> None:
    status, _, body = live.call("POST", "/api/v1/jobs", raw=padded(BODY_LIMIT), token=live.token)
    assert (status, body) == (400, {"error": "missing field 'name'"})
    status, got, body = live.call(
        "POST", "/api/v1/jobs", raw=padded(BODY_LIMIT + 1), token=live.token
    )
    assert (status, body) == (413, {"error": f"body over {BODY_LIMIT} bytes"})
    assert got["content-type"] == "application/json"


def test_a_chunked_body_is_counted_as_it_arrives(live: Live) -> None:
    def send(size: int) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
        try:
            data = padded(size)
            chunks = iter([data[:10], data[10:]])  # no Content-Length: chunked
            headers = {"Authorization": f"Bearer {live.token}"}
            conn.request("POST", "/api/v1/jobs", body=chunks, headers=headers)
            resp = conn.getresponse()
            assert resp.getheader("content-length") is not None
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    assert send(BODY_LIMIT) == (400, {"error": "missing field 'name'"})
    assert send(BODY_LIMIT + 1) == (413, {"error": f"body over {BODY_LIMIT} bytes"})


def test_the_default_body_limit_is_64_kib() -> None:
    assert HttpLimits().max_body_bytes == MAX_BODY_BYTES == 64 * 1024


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        ("", 200, None),
        ("?seconds=1", 200, None),
        ("?seconds=86400", 200, None),
        ("?seconds=abc&seconds=60", 200, None),  # the last one counts
        ("?seconds=0.99", 400, "seconds must be within 1..86400, got '0.99'"),
        ("?seconds=86400.5", 400, "seconds must be within 1..86400, got '86400.5'"),
        ("?seconds=nan", 400, "seconds must be within 1..86400, got 'nan'"),
        ("?seconds=60&seconds=abc", 400, "seconds must be a number, got 'abc'"),
        # a value is quoted whole up to 40 characters (quotes included), then cut to 37 and '...'
        ("?seconds=" + "x" * 38, 400, "seconds must be a number, got '" + "x" * 38 + "'"),
        ("?seconds=" + "x" * 39, 400, "seconds must be a number, got '" + "x" * 36 + "..."),
    ],
)
def test_history_seconds_is_checked(
    live: Live, monkeypatch: pytest.MonkeyPatch, query: str, status: int, error: str | None
) -> None:
    asked: list[float] = []
    real = live.ctx.store.history
    monkeypatch.setattr(
        live.ctx.store, "history", lambda s, step=1: asked.append(s) or real(s, step)
    )
    got, _, body = live.call("GET", "/api/v1/history" + query)
    assert got == status
    if error is None:
        assert body["columns"][0] == "timestamp"
        assert asked == [{"": 300.0, "?seconds=1": 1.0, "?seconds=86400": 86400.0}.get(query, 60.0)]
    else:
        assert body == {"error": error}


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        ("?seconds=60", 200, None),
        ("?seconds=60&step=1", 200, None),
        ("?seconds=60&step=3", 200, None),
        ("?seconds=60&step=3600", 200, None),
        ("?seconds=60&step=x&step=5", 200, None),  # the last one counts
        ("?seconds=60&step=0", 400, "step must be within 1..3600, got '0'"),
        ("?seconds=60&step=3601", 400, "step must be within 1..3600, got '3601'"),
        (
            "?seconds=60&step=" + "9" * 20,
            400,
            "step must be within 1..3600, got '" + "9" * 20 + "'",
        ),
        ("?seconds=60&step=2.5", 400, "step must be a whole number of seconds, got '2.5'"),
        ("?seconds=60&step=-3", 400, "step must be a whole number of seconds, got '-3'"),
        ("?seconds=60&step=", 400, "step must be a whole number of seconds, got ''"),
        ("?seconds=60&step=1_0", 400, "step must be a whole number of seconds, got '1_0'"),
    ],
)
def test_history_step_is_checked(
    live: Live, monkeypatch: pytest.MonkeyPatch, query: str, status: int, error: str | None
) -> None:
    asked: list[int] = []
    real = live.ctx.store.history
    monkeypatch.setattr(
        live.ctx.store, "history", lambda s, step=1: asked.append(step) or real(s, step)
    )
    got, _, body = live.call("GET", "/api/v1/history" + query)
    assert got == status
    if error is None:
        step = int(query.rsplit("=", 1)[1]) if "step" in query else 1
        assert asked == [step]
        assert body["columns"] == (HISTORY_COLUMNS if step == 1 else [*HISTORY_COLUMNS, "seconds"])
    else:
        assert body == {"error": error}
        assert asked == []


HISTORY_COLUMNS = [
    "timestamp", "power_watts", "temperature_celsius", "utilization_ratio", "power_limit_watts",
    "power_limit_target_watts", "clock_sm_hertz", "clock_events",
]  # fmt: skip


def test_history_rows_hold_the_target_the_sm_clock_and_the_clock_events_of_each_second(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the agent's pipeline on a manual clock: a simulated fleet, the GPU collector, the store
    clock = ManualClock()
    fleet = SimFleet(2, clock=clock)
    store = MetricStore(monotonic=clock)

    def wall() -> float:
        return 1_700_000_000.0 + clock() - 1000.0

    sampler = Sampler(
        store, [GpuCollector(SimBackend(fleet), monotonic=clock, wall=wall)],
        monotonic=clock, wall=wall,
    )  # fmt: skip
    fleet[0].set_load(1.0)
    fleet[0].set_power_limit_mw(200_000)  # a full load held at 200 W: capped by power
    store.set_power_limit_targets({0: 250.0})
    for tick in range(24):  # 6 s, 4 passes a second; GPU 1 lost for seconds 2 and 3
        if tick == 8:
            fleet[1].inject("lost")
        if tick == 16:
            fleet[1].inject("clear")
        sampler.run_once()
        clock.advance(0.25)
    monkeypatch.setattr(live.ctx, "store", store)
    status, _, body = live.call("GET", "/api/v1/history?seconds=60")
    assert status == 200 and body["columns"] == HISTORY_COLUMNS
    start = 1_700_000_000
    rows = {gpu: [dict(zip(body["columns"], row, strict=True)) for row in body["gpus"][gpu]]
            for gpu in ("0", "1")}  # fmt: skip
    assert [r["timestamp"] for r in rows["0"]] == [start + s for s in range(5)]
    assert [r["timestamp"] for r in rows["1"]] == [start, start + 1, start + 4]
    capped = rows["0"][-1]
    assert capped["power_limit_watts"] == 200.0 and capped["power_limit_target_watts"] == 250.0
    assert "sw_power_cap" in capped["clock_events"]
    assert capped["clock_sm_hertz"] < fleet[0].max_clock_mhz("sm") * 1e6
    idle = rows["1"][-1]
    assert idle["power_limit_target_watts"] is None and idle["clock_events"] == ["idle"]
    assert idle["clock_sm_hertz"] > 0


def test_history_in_steps_averages_each_bucket_and_keeps_a_lost_gpus_gap(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    fleet = SimFleet(2, clock=clock)
    store = MetricStore(monotonic=clock)
    start = 1_700_000_000  # a multiple of 2 and 4: the buckets start at whole seconds of it

    def wall() -> float:
        return start + clock() - 1000.0

    sampler = Sampler(
        store, [GpuCollector(SimBackend(fleet), monotonic=clock, wall=wall)],
        monotonic=clock, wall=wall,
    )  # fmt: skip
    fleet[0].set_load(1.0)
    for tick in range(36):  # 9 s, 4 passes a second; GPU 1 lost for seconds 2 .. 5
        if tick == 8:
            fleet[1].inject("lost")
        if tick == 24:
            fleet[1].inject("clear")
        if tick == 16:
            fleet[0].set_load(0.0)  # GPU 0 idles from second 4: its clock events change
        sampler.run_once()
        clock.advance(0.25)
    monkeypatch.setattr(live.ctx, "store", store)
    _, _, per_second = live.call("GET", "/api/v1/history?seconds=60")
    status, _, body = live.call("GET", "/api/v1/history?seconds=60&step=4")
    assert status == 200 and body["columns"] == [*HISTORY_COLUMNS, "seconds"]

    def rows(answer: dict[str, Any], gpu: str) -> list[dict[str, Any]]:
        return [dict(zip(answer["columns"], row, strict=True)) for row in answer["gpus"][gpu]]

    seconds = {gpu: rows(per_second, gpu) for gpu in ("0", "1")}
    buckets = {gpu: rows(body, gpu) for gpu in ("0", "1")}
    assert [(r["timestamp"], r["seconds"]) for r in buckets["0"]] == [
        (start, 4), (start + 4, 4)
    ]  # fmt: skip
    assert [(r["timestamp"], r["seconds"]) for r in buckets["1"]] == [
        (start, 2), (start + 4, 2)
    ]  # the seconds GPU 1 was lost are left out, never zeros  # fmt: skip
    for gpu in ("0", "1"):
        for bucket in buckets[gpu]:
            inside = [r for r in seconds[gpu] if 0 <= r["timestamp"] - bucket["timestamp"] < 4]
            assert bucket["seconds"] == len(inside)
            for column in ("power_watts", "temperature_celsius", "utilization_ratio",
                           "power_limit_watts", "clock_sm_hertz"):  # fmt: skip
                assert bucket[column] == pytest.approx(
                    sum(r[column] for r in inside) / len(inside)
                ), column
            union = {e for r in inside for e in r["clock_events"]}
            assert set(bucket["clock_events"]) == union
    assert set(buckets["0"][0]["clock_events"]) != set(buckets["0"][1]["clock_events"])


def test_the_state_shows_the_leased_budget_and_null_without_a_lease(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MetricStore()
    store.set_power_budget("node", 2400.0)
    monkeypatch.setattr(live.ctx, "store", store)
    state = live.call("GET", "/api/v1/state")[2]
    assert (state["power_budget_watts"], state["power_budget_lease_watts"]) == (2400.0, None)
    store.set_power_budget("lease", 1800.0)
    state = live.call("GET", "/api/v1/state")[2]
    assert (state["power_budget_watts"], state["power_budget_lease_watts"]) == (2400.0, 1800.0)


def test_jobs_lists_a_finished_job_with_its_total_energy_and_its_moves(live: Live) -> None:
    job = {"name": "moved-then-done", "pid": os.getpid(), "gpu": 0, "utilization": 1.0}

    def listed() -> dict[str, Any]:
        status, _, body = live.call("GET", "/api/v1/jobs")
        assert status == 200
        return next(j for j in body["jobs"] if j["name"] == job["name"])

    try:
        assert live.post("/api/v1/jobs", job)[0] == 201
        assert listed()["migrations"] == 0
        wait_for(lambda: listed()["energy_joules"] > 0, timeout_s=30, what="energy on GPU 0")
        assert live.post("/api/v1/jobs/moved-then-done/migrate", {"gpu": 1})[0] == 200
        assert listed()["migrations"] == 0  # asked, not done
        status, moved = live.post("/api/v1/jobs", {**job, "gpu": 1})  # its supervisor, moved
        assert (status, moved["gpu"], moved["migrations"]) == (200, 1, 1)
        assert live.post("/api/v1/jobs", {**job, "gpu": 1})[1]["migrations"] == 1  # no move
        wait_for(
            lambda: listed()["energy_joules_by_gpu"].get("1", 0) > 0,
            timeout_s=30, what="energy on GPU 1",
        )  # fmt: skip
    finally:
        status, _, end = live.call("DELETE", "/api/v1/jobs/moved-then-done", token=live.token)
    assert status == 200 and end["state"] == "finished"
    seen = live.call("GET", "/api/v1/state")[2]["last_sample_timestamp"]
    wait_for(
        lambda: live.call("GET", "/api/v1/state")[2]["last_sample_timestamp"] > seen,
        timeout_s=30, what="a sampler pass after the end",
    )  # fmt: skip
    done = listed()
    assert done["state"] == "finished" and done["migrations"] == 1
    assert done["energy_joules"] == end["energy_joules"] > 0  # its total, no longer growing
    assert sorted(done["energy_joules_by_gpu"]) == ["0", "1"]
    assert done["energy_joules"] == pytest.approx(sum(done["energy_joules_by_gpu"].values()))
    assert done["power_watts"] == 0.0


def test_energy_is_404_where_counters_cannot_be_read(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live.ctx, "energy", None)
    status, _, body = live.call("GET", "/api/v1/energy")
    assert (status, body) == (404, {"error": "energy readings are not available"})
    monkeypatch.setattr(live.ctx, "energy", lambda: {"gpus": [1]})
    assert live.call("GET", "/api/v1/energy")[::2] == (200, {"gpus": [1]})


def test_energy_reads_each_gpu_counter_and_says_which_could_not_be_read() -> None:
    now_s = [100.0]
    fleet = SimFleet(3, clock=lambda: now_s[0], wall_clock=lambda: 1.0e9)
    fleet[1].inject("not_supported", field="energy")
    fleet[2].inject("lost")
    now_s[0] += 60.0  # a minute at idle: the counter has moved, and stays put while it is read
    counter_j = fleet[0].total_energy_mj() / 1000.0
    assert counter_j > 0
    host = [RaplSample(1.0e9, "package-0", 12.5, None), RaplSample(1.0e9, "dram", 2.0, 0.5)]
    before = time.time()
    got = energy_json(SimBackend(fleet).devices(), host)
    assert before <= got.pop("timestamp") <= time.time()
    assert got == {
        "gpus": [
            {"index": 0, "uuid": fleet[0].uuid, "energy_joules": counter_j},
            {"index": 1, "uuid": fleet[1].uuid, "energy_joules": None},
            {"index": 2, "uuid": fleet[2].uuid, "energy_joules": None,
             "error": "GPU 2 has fallen off the bus"},
        ],
        "host": [
            {"domain": "package-0", "energy_joules": 12.5},
            {"domain": "dram", "energy_joules": 2.0},
        ],
    }  # fmt: skip


def test_reads_answer_what_the_context_holds(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    without_engine(live, monkeypatch, "apply")
    monkeypatch.setattr(live.ctx, "node", "node-7")
    status, got, state = live.call("GET", "/api/v1/state")
    assert status == 200 and got["content-type"] == "application/json"
    assert (state["backend"], state["node"], state["policy_mode"]) == ("sim", "node-7", "apply")
    status, got, text = live.call("GET", "/")
    assert status == 200 and text.startswith(b"wattwarden agent: /metrics")
    assert got["content-type"] == "text/plain; charset=utf-8"
    status, got, text = live.call("GET", "/metrics")
    assert (
        status == 200
        and b"gpu_power_watts" in text
        and got["content-type"].startswith("text/plain")
    )
    om = {"Accept": "application/openmetrics-text; version=1.0.0"}
    status, got, text = live.call("GET", "/metrics", headers=om)
    assert got["content-type"].startswith("application/openmetrics-text") and text.endswith(
        b"# EOF\n"
    )


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/nope", 404, "no such endpoint: /nope"),
        ("PUT", "/metrics", 405, "PUT is not allowed on /metrics"),
        ("PATCH", "/api/v1/jobs", 405, "PATCH is not allowed on /api/v1/jobs"),
    ],
)
def test_routing_errors_are_json_naming_the_path(
    live: Live, method: str, path: str, status: int, error: str
) -> None:
    got, headers, body = live.call(method, path)
    assert (got, body) == (status, {"error": error})
    if status == 405:
        assert "GET" in headers["allow"]


def test_a_trailing_slash_is_the_same_path_and_no_response_is_cached(live: Live) -> None:
    for path in ("/healthz/", "/healthz//", "/", "/api/v1/state/"):
        status, got, _ = live.call("GET", path)
        assert status == 200, path
        assert got["cache-control"] == "no-store"
    status, got, _ = live.call("GET", "/nope/")
    assert status == 404 and got["cache-control"] == "no-store"
    assert live.call("DELETE", "/api/v1/jobs/x/", token="wrong")[1]["cache-control"] == "no-store"


def test_a_client_going_away_mid_body_is_not_logged_as_an_error(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    head = (
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n"
        b"Authorization: Bearer " + live.token.encode() + b"\r\n\r\n{"
    )
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.sendall(head)
    sock.close()  # a reset, mid-body
    wait_for(
        lambda: any("went away mid-request" in r.getMessage() for r in caplog.records),
        timeout_s=10,
        what="the server to notice the client went away",
    )
    assert live.call("GET", "/healthz")[0] == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# ------------------------------------------------------------------------------ the contract
@given(
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True),
    pid=st.integers(1, 2**31 - 1),
    gpu=st.integers(0, 7),
    priority=st.sampled_from(["high", "normal", "low"]),
    utilization=st.none() | st.floats(0.0, 1.0, exclude_min=True),
)
def test_a_registration_the_client_builds_is_the_one_the_server_reads(
    name: str, pid: int, gpu: int, priority: str, utilization: float | None
) -> None:
    sent = JobRegistration(name, pid, gpu, priority, utilization)
    assert JobRegistration.from_json(json.loads(json.dumps(sent.to_json())), 8) == sent


@given(step=st.integers(0, 2**63 - 1), samples=st.integers(0, 2**63 - 1),
       tokens=st.integers(0, 2**63 - 1))  # fmt: skip
def test_progress_the_client_builds_is_the_progress_the_server_reads(
    step: int, samples: int, tokens: int
) -> None:
    sent = JobProgress(step, samples, tokens)
    assert JobProgress.from_json(json.loads(json.dumps(sent.to_json()))) == sent


def test_a_job_record_out_of_shape_is_refused_naming_the_field(live: Live) -> None:
    status, body = live.post("/api/v1/jobs", {"name": "shape", "pid": 1, "gpu": 0})
    assert status == 201 and JobRecord.from_json(body).name == "shape"
    assert set(body) == {f.name for f in fields(JobRecord)}
    for key, bad in (("pid", "1"), ("target_gpu", True), ("energy_joules", None)):
        with pytest.raises(ContractError, match=f"field '{key}'"):
            JobRecord.from_json({**body, key: bad})
    live.call("DELETE", "/api/v1/jobs/shape", token=live.token)


def test_the_policy_routes_are_404_on_an_agent_without_a_policy_engine(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_engine(live, monkeypatch, "apply")
    missing = {"error": "this agent runs no policy engine"}
    assert live.call("GET", "/api/v1/policy")[::2] == (404, missing)
    assert live.call("GET", "/api/v1/decisions")[::2] == (404, missing)
    assert live.post("/api/v1/policy", {"mode": "dry_run"}) == (404, missing)
    assert live.call("GET", "/api/v1/state")[2]["policy_mode"] == "apply"


@pytest.mark.parametrize(
    ("holding", "fallback", "why"),
    [
        ("GPU 1 is lost", None, b"policy engine holding: GPU 1 is lost\n"),
        (None, "no permission", b"apply fell back to dry-run: no permission\n"),
        ("GPU 1 is lost", "no permission",
         b"policy engine holding: GPU 1 is lost\napply fell back to dry-run: no permission\n"),
    ],
)  # fmt: skip
def test_healthz_adds_why_the_policy_engine_holds_or_fell_back_to_either_answer(
    live: Live, monkeypatch: pytest.MonkeyPatch, holding: str | None, fallback: str | None,
    why: bytes,
) -> None:  # fmt: skip
    now = [1000.0]
    store = MetricStore(monotonic=lambda: now[0])
    store.mark_pass(1000.0)
    monkeypatch.setattr(live.ctx, "store", store)
    engine = SimpleNamespace(holding=holding, engine=SimpleNamespace(fallback=fallback))
    monkeypatch.setattr(live.ctx, "policy", engine)
    assert live.call("GET", "/healthz")[::2] == (200, b"degraded\n" + why)
    now[0] += 5.01
    assert live.call("GET", "/healthz")[::2] == (503, b"sampler stalled\n" + why)
    engine.holding, engine.engine.fallback = None, None
    assert live.call("GET", "/healthz")[::2] == (503, b"sampler stalled\n")
    now[0] -= 5.01
    assert live.call("GET", "/healthz")[::2] == (200, b"ok\n")
