"""The dashboard's sources: typed answers or a Down naming the source, timeouts, the cache, counts,
history by column names and topped up, Prometheus and Alertmanager answers, refusals in words."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import refused_port, serve_loopback

from wattwarden.api.testing import SimAgent
from wattwarden.dashboard.settings import DashboardSettings
from wattwarden.dashboard.sources import (
    AgentState,
    Alert,
    Down,
    FleetFromPrometheus,
    History,
    Sources,
    parse_state,
    refusal_in_words,
)
from wattwarden.hardware.sim.fleet import SimFleet

Handler = Callable[[str, dict[str, list[str]]], tuple[int, Any]]


@contextmanager
def stub(handle: Handler) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering JSON from ``handle(path, query)``; records each path."""
    seen: list[str] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            parts = urlsplit(self.path)
            status, body = handle(parts.path, parse_qs(parts.query))
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve_loopback(H) as (_, url):
        yield url, seen


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sources(*agents: str, clock: Callable[[], float] | None = None, **kw: Any) -> Sources:
    settings = DashboardSettings(agents=agents or ("http://127.0.0.1:1",), **kw)
    return Sources(settings, clock=clock) if clock else Sources(settings)


# ------------------------------------------------------------------------- down, never raised
def test_a_refused_agent_is_down_naming_it() -> None:
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"
        got = sources(url).state(url)
    assert got == Down(f"agent {url}", "connection refused")


def test_a_server_that_never_answers_is_down_after_the_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts connections (the kernel does), never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        got = sources(url, timeout_s=0.2).state(url)
    assert got == Down(f"agent {url}", "no answer within 0.2 s")


def test_an_answer_out_of_shape_is_down_saying_which_field() -> None:
    with stub(lambda path, q: (200, {"gpus": [{"index": "zero", "up": True}]})) as (url, _):
        got = sources(url).state(url)
    assert isinstance(got, Down)
    assert got.reason.startswith("unexpected answer to GET /api/v1/state: field 'index'")


def test_an_error_status_is_down_with_the_agents_message() -> None:
    with stub(lambda path, q: (503, {"error": "sampler stalled"})) as (url, _):
        got = sources(url).jobs(url)
    assert got == Down(f"agent {url}", "sampler stalled (503)", 503)


# ------------------------------------------------------------------------ cache and counts
def test_one_render_asks_the_agent_once_and_a_refresh_asks_again() -> None:
    clock = FakeClock()
    with SimAgent(SimFleet(2)) as sim:
        s = sources(sim.url, clock=clock)
        first = s.state(sim.url)
        assert isinstance(first, AgentState) and len(first.gpus) == 2
        assert s.state(sim.url) is first  # same render: from the cache
        assert len(sim.matching("GET", "/api/v1/state")) == 1
        assert s.request_counts() == {f"agent {sim.url}": 1}
        clock.now += s.ttl_s  # the next live refresh
        s.state(sim.url)
        assert len(sim.matching("GET", "/api/v1/state")) == 2
        assert s.request_counts() == {f"agent {sim.url}": 2}
        assert (s.cache.hits, s.cache.misses) == (1, 2)


def test_concurrent_readers_of_one_key_share_one_request() -> None:
    with SimAgent(SimFleet(1)) as sim:
        release = threading.Event()
        sim.on_request = lambda method, path: release.wait(10)
        s = sources(sim.url)
        results: list[object] = []
        threads = [threading.Thread(target=lambda: results.append(s.state(sim.url)))
                   for _ in range(4)]  # fmt: skip
        for t in threads:
            t.start()
        release.set()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and all(r is results[0] for r in results)
        assert s.request_counts() == {f"agent {sim.url}": 1}


def test_a_write_forgets_the_agents_cached_answers() -> None:
    with SimAgent(SimFleet(1)) as sim:
        s = sources(sim.url)
        s.state(sim.url)
        s.set_budget(sim.url, 500)
        s.state(sim.url)
        assert len(sim.matching("GET", "/api/v1/state")) == 2


# ---------------------------------------------------------------------------------- history
def history_answer(columns: list[str], rows: dict[str, list[list[Any]]]) -> dict[str, Any]:
    return {"columns": columns, "gpus": rows}


def test_history_is_read_by_column_names_whatever_their_order() -> None:
    columns = ["power_watts", "clock_events", "timestamp", "future_column", "clock_sm_hertz"]
    rows = {"0": [[300.0, ["sw_power_cap"], 100.0, 1, 1.5e9], [310.0, [], 101.0, 2, 1.6e9]]}
    with stub(lambda path, q: (200, history_answer(columns, rows))) as (url, _):
        got = sources(url).history(url, 60)
    assert isinstance(got, History)
    g = got.gpus[0]
    assert g.timestamp_s == (100.0, 101.0)
    assert g.power_w == (300.0, 310.0)
    assert g.clock_sm_hz == (1.5e9, 1.6e9)
    assert g.clock_events == (("sw_power_cap",), ())
    assert g.temperature_c == (None, None)  # a column the agent does not send
    assert g.energy_j() == 610.0
    assert got.covered_s == 2.0


def test_a_live_refresh_fetches_only_the_seconds_since_the_last() -> None:
    clock = FakeClock()
    newest = [200.0]

    def answer(path: str, q: dict[str, list[str]]) -> tuple[int, Any]:
        seconds = float(q["seconds"][0])
        stamps = [t for t in range(0, int(newest[0]) + 1) if t > newest[0] - seconds]
        return 200, history_answer(["timestamp", "power_watts"],
                                   {"0": [[float(t), 100.0] for t in stamps]})  # fmt: skip

    with stub(answer) as (url, seen):
        s = sources(url, clock=clock)
        first = s.history(url, 60)
        assert isinstance(first, History) and len(first.gpus[0]) == 60
        clock.now += 3.0
        newest[0] += 3.0
        second = s.history(url, 60)
        assert isinstance(second, History)
        assert seen == ["/api/v1/history?seconds=60", "/api/v1/history?seconds=5"]
        assert second.gpus[0].timestamp_s[0] == 144.0 and second.gpus[0].timestamp_s[-1] == 203.0
        assert len(second.gpus[0]) == 60  # the window, not the rows kept
        s.history(url, 600)  # a longer window than kept: fetched whole (in steps of 2 s)
        assert seen[-1] == "/api/v1/history?seconds=600&step=2"


class BucketingAgent:
    """A stub agent's history as the agent answers it: GPU 0 draws ``t`` watts at second ``t``
    (none while lost), averaged over buckets of ``step`` s aligned to multiples of it, every
    bucket holding a second of the window whole, with a ``seconds`` column."""

    def __init__(self, newest: int, lost: range = range(0)) -> None:
        self.newest = newest
        self.lost = lost

    def seconds_of(self, first: int) -> list[int]:
        return [t for t in range(first, self.newest + 1) if t not in self.lost]

    def __call__(self, path: str, q: dict[str, list[str]]) -> tuple[int, Any]:
        seconds, step = float(q["seconds"][0]), int(q.get("step", ["1"])[0])
        first = (int(self.newest - seconds) + 1) // step * step
        buckets: dict[int, list[int]] = {}
        for t in self.seconds_of(first):
            buckets.setdefault(t // step * step, []).append(t)
        rows = [[float(b), sum(ts) / len(ts), ["idle"] if b % 2 else [], len(ts)]
                for b, ts in sorted(buckets.items())]  # fmt: skip
        columns = ["timestamp", "power_watts", "clock_events", "seconds"]
        return 200, history_answer(columns, {"0": rows})


def test_a_long_window_is_asked_in_steps_of_at_most_300_rows() -> None:
    agent = BucketingAgent(newest=5000)
    with stub(agent) as (url, seen):
        s = sources(url)
        got = {window: s.history(url, window) for window in (300, 900, 3600)}
    assert seen == [
        "/api/v1/history?seconds=300",
        "/api/v1/history?seconds=900&step=3",
        "/api/v1/history?seconds=3600&step=12",
    ]
    for window, h in got.items():
        assert isinstance(h, History)
        g = h.gpus[0]
        step = window // 300
        assert len(g) == 300 and g.step_s == step
        assert all(t % step == 0 for t in g.timestamp_s)
        last = range(5000 // step * step, 5001)  # the bucket still filling
        assert (g.power_w[-1], g.seconds[-1]) == (sum(last) / len(last), len(last))


def test_a_refresh_in_steps_tops_up_at_the_same_step_and_replaces_the_bucket_still_filling() -> (
    None
):
    clock = FakeClock()
    agent = BucketingAgent(newest=1000, lost=range(1003, 1008))  # lost for 5 s, later
    with stub(agent) as (url, seen):
        s = sources(url, clock=clock)
        first = s.history(url, 900)
        assert isinstance(first, History)
        assert first.gpus[0].timestamp_s[-1] == 999.0 and first.gpus[0].seconds[-1] == 2
        for _ in range(6):  # live refreshes, 2 s apart; the bucket at 999 fills, then the gap
            clock.now += 2.0
            agent.newest += 2
            topped = s.history(url, 900)
        assert seen[1:] == ["/api/v1/history?seconds=6&step=3"] * 6
        whole = sources(url).history(url, 900)  # a fresh fetch of the same window
    assert isinstance(topped, History) and isinstance(whole, History)
    assert topped.gpus[0] == whole.gpus[0]
    g = topped.gpus[0]
    # 1005 .. 1007: the GPU was lost, a gap (never 0 W); 1002 alone (lost from 1003)
    assert g.timestamp_s[-4:] == (999.0, 1002.0, 1008.0, 1011.0)
    assert g.seconds[-4:] == (3, 1, 3, 2)
    assert g.power_w[-4:] == (1000.0, 1002.0, 1009.0, 1011.5)


def test_the_energy_of_a_window_in_steps_is_the_energy_of_its_seconds() -> None:
    agent = BucketingAgent(newest=5000, lost=range(4500, 4510))
    with stub(agent) as (url, _):
        h = sources(url).history(url, 900)
    assert isinstance(h, History)
    g = h.gpus[0]
    assert g.step_s == 3
    assert h.energy_j() == sum(agent.seconds_of(int(g.timestamp_s[0])))  # 1 W·s per watt
    assert h.covered_s == 5001 - g.timestamp_s[0]


def test_history_rows_out_of_shape_are_down_naming_the_gpu() -> None:
    answer = history_answer(["timestamp", "power_watts"], {"3": [[100.0, 1.0], [101.0]]})
    with stub(lambda path, q: (200, answer)) as (url, _):
        got = sources(url).history(url, 60)
    assert isinstance(got, Down)
    assert got.reason.endswith("a history row of GPU 3 does not match the columns")


def test_a_history_row_without_a_timestamp_is_left_out_and_numbers_may_be_integers() -> None:
    columns = ["timestamp", "power_watts", "temperature_celsius"]
    rows = {"0": [[100, 300, 60], [None, 1.0, 1.0], [102.0, None, True]]}
    with stub(lambda path, q: (200, history_answer(columns, rows))) as (url, _):
        got = sources(url).history(url, 60)
    assert isinstance(got, History)
    g = got.gpus[0]
    assert g.timestamp_s == (100.0, 102.0) and g.power_w == (300.0, None)
    assert g.temperature_c == (60.0, None)  # true is not a number
    assert g.seconds == (1.0, 1.0) and g.energy_j() == 300.0


# ------------------------------------------------------------------------ Prometheus
def prom_vector(series: list[tuple[dict[str, str], str]]) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector",
            "result": [{"metric": m, "value": [1.0, v]} for m, v in series]}}  # fmt: skip


def test_prometheus_nodes_power_budget_and_energy() -> None:
    answers = {
        "sum by (instance) (gpu_power_watts)": [({"instance": "a"}, "400"),
                                                ({"instance": "b"}, "NaN")],
        "sum by (instance) (gpu_up)": [({"instance": "a"}, "3"), ({"instance": "b"}, "4")],
        "count by (instance) (gpu_up)": [({"instance": "a"}, "4"), ({"instance": "b"}, "4")],
        "1h": [({"instance": "a"}, "3.6e6")],
        "1d": [({"instance": "a"}, "7.2e7")],
    }  # fmt: skip

    def answer(path: str, q: dict[str, list[str]]) -> tuple[int, Any]:
        expr = q["query"][0]
        key = "1h" if "[1h]" in expr else "1d" if "[1d]" in expr else expr
        return 200, prom_vector(answers.get(key, []))

    with stub(answer) as (url, seen):
        got = sources(prometheus=url).fleet()
    assert isinstance(got, FleetFromPrometheus)
    a, b = got.nodes
    assert (a.instance, a.power_w, a.gpus_up, a.gpus_total) == ("a", 400.0, 3, 4)
    assert (a.budget_w, a.energy_1h_j, a.energy_1d_j) == (None, 3.6e6, 7.2e7)
    assert b.power_w is None  # NaN left out, never shown as a number
    assert got.power_w == 400.0 and got.energy_1h_j == 3.6e6 and got.budget_w is None
    assert all(p.startswith("/api/v1/query?query=") for p in seen)


def test_a_failing_query_is_prometheus_down_with_its_error() -> None:
    body = {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}
    with stub(lambda path, q: (400, body)) as (url, _):
        got = sources(prometheus=url).fleet()
    assert isinstance(got, Down) and got.source == f"Prometheus {url}"
    assert "parse error at char 3" in got.reason


def test_no_prometheus_or_alertmanager_given_is_none_not_down() -> None:
    s = sources()
    assert s.fleet() is None and s.alerts() is None and s.prometheus_query("up") is None


# ---------------------------------------------------------------------- Alertmanager
def test_alertmanager_firing_alerts_most_severe_first_with_runbooks() -> None:
    alerts = [
        {"labels": {"alertname": "GpuHot", "severity": "warning", "gpu": "1"},
         "annotations": {"summary": "GPU 1 is hot", "runbook_url": "https://r/#gpuhot"},
         "startsAt": "2024-01-01T00:00:00Z", "status": {"state": "active"}},
        {"labels": {"alertname": "GpuLost", "severity": "critical"},
         "annotations": {"description": "GPU 3 fell off the bus"},
         "startsAt": "2024-01-01T00:00:01Z", "status": {"state": "active"}},
        {"labels": {"alertname": "Quiet", "severity": "critical"}, "annotations": {},
         "startsAt": "", "status": {"state": "suppressed"}},
    ]  # fmt: skip
    with stub(lambda path, q: (200, alerts)) as (url, seen):
        got = sources(alertmanager=url).alerts()
    assert got == [
        Alert("GpuLost", "critical", "GPU 3 fell off the bus", None, "2024-01-01T00:00:01Z",
              {"alertname": "GpuLost", "severity": "critical"}),
        Alert("GpuHot", "warning", "GPU 1 is hot", "https://r/#gpuhot", "2024-01-01T00:00:00Z",
              {"alertname": "GpuHot", "severity": "warning", "gpu": "1"}),
    ]  # fmt: skip
    assert seen == ["/api/v2/alerts?active=true&silenced=false&inhibited=false"]


def test_alertmanager_down_names_it() -> None:
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"
        got = sources(alertmanager=url).alerts()
    assert got == Down(f"Alertmanager {url}", "connection refused")


# ------------------------------------------------------------------------------ writes
def test_refusals_in_words() -> None:
    assert refusal_in_words(401, "x").startswith(
        "refused: no valid token (401) — pass --token-file"
    )
    assert refusal_in_words(409, "dry-run") == "refused: conflict (409): dry-run"
    assert refusal_in_words(422, "field 'watts': 50 is under 200") == (
        "refused: value refused (422): field 'watts': 50 is under 200"
    )
    assert refusal_in_words(429, "wait") == "refused: too soon after the last change (429): wait"
    assert refusal_in_words(502, "no") == "refused: the driver refused (502): no"
    assert refusal_in_words(404, "unknown job") == "refused: not found (404): unknown job"


def test_writes_send_the_token_and_say_the_agents_answer(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATTWARDEN_TOKEN", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "none"))
    token = tmp_path / "token"
    token.write_text("test-token\n")
    with SimAgent(SimFleet(2)) as sim:
        no_token = sources(sim.url)
        refused = no_token.set_power_limit(sim.url, 0, 300)
        assert (refused.ok, refused.status) == (False, 401)
        s = sources(sim.url, token_file=str(token))
        dry = s.set_power_limit(sim.url, 0, 300)  # past the token: the agent runs in dry-run
        assert (dry.ok, dry.status) == (False, 409)
        assert dry.message.startswith("refused: conflict (409): the agent runs in dry-run mode")
        assert s.set_budget(sim.url, 900).message.startswith(
            "refused: not found (404): this agent runs no policy engine"
        )
        moved = s.migrate_job(sim.url, "nope", 1)
        assert moved.status == 404 and moved.message.startswith("refused: not found (404)")
        assert [r.status for r in sim.requests if r.method == "POST"] == [401, 409, 404, 404]


def test_an_unreadable_token_file_is_said_not_sent(tmp_path: Any) -> None:
    with SimAgent(SimFleet(1)) as sim:
        s = sources(sim.url, token_file=str(tmp_path / "missing"))
        got = s.set_mode(sim.url, "apply")
        assert not got.ok and got.message.startswith("--token-file: cannot read ")
        assert sim.matching("POST", "/api/v1/policy") == []


@pytest.mark.parametrize(
    ("node_w", "lease_w", "in_force_w"),
    [(None, None, None), (1000.0, None, 1000.0), (1000.0, 1500.0, 1500.0),
     (1000.0, 600.0, 600.0), (None, 800.0, 800.0)],
)  # fmt: skip
def test_a_live_lease_overrides_the_node_budget_higher_or_lower(
    node_w: float | None, lease_w: float | None, in_force_w: float | None
) -> None:
    state = parse_state(
        "http://a", {"node": "a", "gpus": [], "power_budget_watts": node_w,
                     "power_budget_lease_watts": lease_w},
    )  # fmt: skip
    assert state.budget_in_force_w == in_force_w
