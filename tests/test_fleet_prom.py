"""The controller's Prometheus reads: a loopback stub serving recorded answers (errors, slowness,
stale timestamps, TLS, auth), and one slow test against a real Prometheus scraping an agent."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from helpers import refused_port, require_binary, run_agent, serve_loopback, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattwarden.fleet import prom as prom_api
from wattwarden.fleet.allocate import PRIORITIES
from wattwarden.fleet.model import NodeObservation, build_view, stale_bound
from wattwarden.fleet.prom import (
    RECORDED,
    Answer,
    Auth,
    FleetReader,
    PrometheusClient,
    PrometheusError,
    Readings,
    Sample,
    Target,
    queries,
)

Handler = Callable[[dict[str, str], dict[str, str]], tuple[int, bytes]]


def vector(samples: list[tuple[dict[str, str], float]], at: float) -> bytes:
    result = [{"metric": m, "value": [at, repr(v) if v == v else "NaN"]} for m, v in samples]
    return json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": result}}
    ).encode()


@dataclass
class PromStub:
    """A loopback server answering the Prometheus HTTP API as told."""

    series: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    """Query text -> samples (labels, value); a query not listed answers an empty vector."""
    handlers: dict[str, Handler] = field(default_factory=dict)
    """Path -> handler, replacing the default answers."""
    targets: list[dict[str, Any]] | None = None
    delay_s: float = 0.0
    requests: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def answer(
        self, path: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        self.requests.append((path, params, headers))
        if path in self.handlers:
            return self.handlers[path](params, headers)
        if path == "/api/v1/query":
            return 200, vector(self.series.get(params["query"], []), float(params["time"]))
        if path == "/api/v1/targets" and self.targets is not None:
            body = {"status": "success", "data": {"activeTargets": self.targets}}
            return 200, json.dumps(body).encode()
        return 404, b"404 page not found\n"

    @contextmanager
    def running(self, tls: Path | None = None) -> Iterator[PromStub]:
        stub = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(parts.query))
                if stub.delay_s:
                    time.sleep(stub.delay_s)  # the server being slow, not synchronisation
                status, body = stub.answer(parts.path, params, dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        with serve_loopback(H, tls=tls) as (_, url):
            self.url = url
            yield self


@pytest.fixture
def stub() -> Iterator[PromStub]:
    with PromStub().running() as s:
        yield s


NOW = 1_800_000_000.0


# ------------------------------------------------------------------ queries
def test_a_query_is_asked_at_the_time_given_and_answers_samples_with_their_timestamps(
    stub: PromStub,
) -> None:
    stub.series['up{job="wattwarden"}'] = [({"instance": "n1", "job": "wattwarden"}, 1.0)]
    client = PrometheusClient(stub.url, timeout_s=2.0)
    (s,) = client.query('up{job="wattwarden"}', NOW)
    assert (dict(s.labels), s.value, s.timestamp_s) == (
        {"instance": "n1", "job": "wattwarden"},
        1.0,
        NOW,
    )
    _, params, _ = stub.requests[-1]
    assert params["time"] == f"{NOW:.3f}" and params["timeout"] == "2s"


def test_an_error_answer_is_one_typed_error_naming_the_server_and_the_error(stub: PromStub) -> None:
    body = {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}
    stub.handlers["/api/v1/query"] = lambda p, h: (400, json.dumps(body).encode())
    with pytest.raises(PrometheusError) as e:
        PrometheusClient(stub.url).query("up{", NOW)
    msg = str(e.value)
    assert (
        msg == f"Prometheus {stub.url}: /api/v1/query answered 400: bad_data: parse error at char 3"
    )


def test_a_server_error_without_json_is_a_prometheus_error(stub: PromStub) -> None:
    stub.handlers["/api/v1/query"] = lambda p, h: (503, b"Service Unavailable\n")
    with pytest.raises(PrometheusError, match="answered 503 with no JSON body"):
        PrometheusClient(stub.url).query("up", NOW)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"resultType": "matrix", "result": []}, "expected a vector, got resultType 'matrix'"),
        ({"resultType": "vector", "result": {}}, "'result' is not a list"),
        ({"resultType": "vector", "result": [{"metric": {"a": 1}, "value": [1, "2"]}]},
         "'metric' is not a label map"),
        ({"resultType": "vector", "result": [{"metric": {}, "value": [1, 2]}]},
         "'value' is not [time, \"number\"]"),
        ({"resultType": "vector", "result": [{"metric": {}, "value": [1, "two"]}]},
         "value 'two' is not a number"),
        ([], "'data' is not an object"),
    ],
)  # fmt: skip
def test_an_answer_out_of_shape_is_refused_naming_what_is_wrong(
    stub: PromStub, data: Any, why: str
) -> None:
    body = json.dumps({"status": "success", "data": data}).encode()
    stub.handlers["/api/v1/query"] = lambda p, h: (200, body)
    with pytest.raises(PrometheusError) as e:
        PrometheusClient(stub.url).query("up", NOW)
    assert why in str(e.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(answer=json_values, status=st.sampled_from([200, 400, 422, 500, 503]))
def test_whatever_the_server_answers_the_only_error_is_prometheus_error(
    stub: PromStub, answer: Any, status: int
) -> None:
    # the stub is shared by the examples on purpose: each sets its own handlers first
    body = json.dumps(answer).encode()
    stub.handlers["/api/v1/query"] = lambda p, h: (status, body)
    stub.handlers["/api/v1/targets"] = lambda p, h: (status, body)
    client = PrometheusClient(stub.url)
    for call in (lambda: client.query("up", NOW), client.targets):
        try:
            call()
        except PrometheusError as e:
            assert "\n" not in str(e)


# the items of a vector's result: well-formed samples, each perhaps broken in one place
def good_item(labels: dict[str, str], at: float, text: str) -> dict[str, Any]:
    return {"metric": labels, "value": [at, text]}


good_items = st.builds(
    good_item,
    st.dictionaries(st.sampled_from(["instance", "job", "priority"]), st.text(max_size=6)),
    st.integers(0, 2 * 10**9) | st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["1", "2.5", "-0", "NaN", "+Inf", "-Inf", "1e3", " 7 ", "1_0"]),
)


def broken(item: dict[str, Any], where: str, garbage: Any) -> Any:
    item = json.loads(json.dumps(item))
    if where == "item":
        return garbage
    if where in ("metric", "value"):
        item[where] = garbage
    elif where == "drop":
        item.pop("metric" if garbage else "value")
    elif where == "label":
        item["metric"]["instance"] = garbage
    elif where == "time":
        item["value"][0] = garbage
    elif where == "number":
        item["value"][1] = garbage
    elif where == "length":
        item["value"].append(garbage)
    return item


sample_items = st.one_of(
    good_items,
    st.builds(
        broken,
        good_items,
        st.sampled_from(["item", "metric", "value", "drop", "label", "time", "number", "length"]),
        json_values | st.sampled_from(["x", "1", "", True, 10**400, -(10**400), 1.5]),
    ),
)


def strict(client: PrometheusClient, result: list[Any]) -> list[Sample] | str:
    """The reference: each item through the per-item parser; its error's message, if any."""
    try:
        return [client._sample("up", item) for item in result]
    except PrometheusError as e:
        return str(e)


@settings(max_examples=400, deadline=None)
@given(result=st.lists(sample_items, max_size=6))
def test_the_lean_parse_takes_and_refuses_exactly_what_the_per_item_parse_does(
    result: list[Any],
) -> None:
    # a round trip through JSON: the parser only ever sees what json.loads makes
    result = json.loads(json.dumps(result))
    client = PrometheusClient("http://127.0.0.1:9")  # never connects: parsing only
    want = strict(client, result)
    try:
        got: list[Sample] | str = list(client._samples("up", result))
    except PrometheusError as e:
        got = str(e)
    if isinstance(want, str):
        assert got == want  # the same one-line error, naming the same item and fault
    else:
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert dict(g.labels) == dict(w.labels) and g.timestamp_s == w.timestamp_s
            assert g.value == w.value or (g.value != g.value and w.value != w.value)  # NaN


def test_a_lean_parse_of_a_large_answer_keeps_every_sample_in_order() -> None:
    result = [
        {"metric": {"instance": f"n{i}", "priority": "low"}, "value": [NOW, f"{i}.5"]}
        for i in range(5000)
    ]
    samples = PrometheusClient("http://127.0.0.1:9")._samples("up", result)
    assert [(s.labels["instance"], s.value, s.timestamp_s) for s in samples] == [
        (f"n{i}", i + 0.5, NOW) for i in range(5000)
    ]
    assert len(samples) == 5000 and samples[-1] == Sample(result[-1]["metric"], 4999.5, NOW)
    assert samples[10:12] == [Sample({"instance": f"n{i}", "priority": "low"}, i + 0.5, NOW)
                              for i in (10, 11)]  # fmt: skip
    assert samples.column("instance") == [f"n{i}" for i in range(5000)]
    assert samples.column("job") == [None] * 5000
    result[4321]["value"] = [NOW, 7]  # one number not a string, deep in the answer
    with pytest.raises(PrometheusError, match=r"a result's 'value' is not \[time, \"number\"\]"):
        PrometheusClient("http://127.0.0.1:9")._samples("up", result)


# ------------------------------------------------------------------ Prometheus's own layout
def prometheus_layout(result: list[Any], ensure_ascii: bool = False) -> bytes:
    """A body written as Prometheus writes one: compact, keys in its order, no escapes needed."""
    data = {"resultType": "vector", "result": result}
    body = {"status": "success", "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=ensure_ascii).encode()


def outcome(client: PrometheusClient, body: bytes, status: int = 200) -> Any:
    """What parse_query makes of a body: its samples as plain tuples, or its error's message."""
    try:
        vector = client.parse_query("up", Answer("/api/v1/query", status, body))
    except PrometheusError as e:
        return str(e)
    # NaN never equals itself: compare its text
    return [(dict(s.labels), repr(s.value), repr(s.timestamp_s)) for s in vector]


def general_outcome(client: PrometheusClient, body: bytes, status: int = 200) -> Any:
    """The same through the general path alone (the JSON decoded, each sample checked)."""
    real = prom_api._read_layout
    prom_api._read_layout = lambda body: None  # type: ignore[assignment]
    try:
        return outcome(client, body, status)
    finally:
        prom_api._read_layout = real


def test_prometheus_layout_is_read_without_decoding_the_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = [
        {"metric": {"instance": f"gpu-{i:05d}", "priority": "high"}, "value": [NOW, f"{i}.25"]}
        for i in range(3000)
    ]
    body = prometheus_layout(result)
    client = PrometheusClient("http://127.0.0.1:9")
    want = general_outcome(client, body)

    def no_json(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the JSON was decoded")

    monkeypatch.setattr(prom_api.json, "loads", no_json)
    vector = client.parse_query("up", Answer("/api/v1/query", 200, body))
    assert vector.column("instance") == [f"gpu-{i:05d}" for i in range(3000)]
    assert vector.column("job") == [None] * 3000
    assert vector[7] == Sample({"instance": "gpu-00007", "priority": "high"}, 7.25, NOW)
    assert outcome(client, body) == want
    # an escaped label value is not the layout: decoded (here: refused by the stub json.loads)
    escaped = prometheus_layout([{"metric": {"instance": 'a"b'}, "value": [NOW, "1"]}])
    with pytest.raises(AssertionError, match="the JSON was decoded"):
        client.parse_query("up", Answer("/api/v1/query", 200, escaped))


H = '{"status":"success","data":{"resultType":"vector","result":['
T = "]}}"


@pytest.mark.parametrize(
    "body",
    [
        H + T,  # empty
        H + '{"metric":{},"value":[1,"2"]}' + T,  # no labels
        H + '{"metric":{"instance":"a","instance":"b"},"value":[1,"2"]}' + T,  # a name twice
        H + '{"metric":{"a":"1"},"value":[1,"2"]},{"metric":{"b":"1"},"value":[1,"3"]}' + T,
        H + '{"metric":{"a":"1"},"value":[1,"2"]},{"metric":{"a":"2"},"value":[2.5,"3"]}' + T,
        H + '{"metric":{"a":"1"},"value":[1,"2"]},' + T,  # a trailing comma
        H + ',{"metric":{"a":"1"},"value":[1,"2"]}' + T,  # a leading comma
        H + '{"metric":{"a":"1"},"value":[1,"2"]}{"metric":{"a":"1"},"value":[1,"2"]}' + T,
        H + '{"metric":{"a":"1"},"value":[1,"2"]} ,{"metric":{"a":"1"},"value":[1,"2"]}' + T,
        H + '{"metric":{"a":"1",},"value":[1,"2"]}' + T,
        H + '{"metric":{"a":"1"},"value":[1,"two"]}' + T,
        H + '{"metric":{"a":"1"},"value":[1' + "0" * 400 + ',"2"]}' + T,  # beyond a float
        H + '{"metric":{"a":"1"},"value":[1e400,"2"]}' + T,
        H + '{"metric":{"a":"\\u00e9"},"value":[1,"2"]}' + T,  # an escape
        H + '{"metric":{"a":"1"},"value":[1,"2"]}]},"warnings":["w"]}',
        '{"status":"success","data":{"resultType":"matrix","result":[]}}',
        '{"status":"error","errorType":"bad_data","error":"x"}',
        H + '{"metric":{"a":"1"},"value":[1,"2"]}' + T + " ",
    ],
)
def test_edge_answers_read_as_the_general_path_reads_them(body: str) -> None:
    client = PrometheusClient("http://127.0.0.1:9")
    assert outcome(client, body.encode()) == general_outcome(client, body.encode())


layout_labels = st.dictionaries(
    st.sampled_from(["instance", "job", "priority", "le", "a_b", "x-y", ""]),
    st.text(max_size=6),  # quotes, backslashes, control and non-ASCII characters too
    max_size=3,
)
layout_items = st.builds(
    good_item,
    layout_labels,
    st.integers(0, 2 * 10**9) | st.floats(allow_nan=False) | st.just(10**400),
    st.sampled_from(["1", "2.5", "-0", "NaN", "+Inf", "-Inf", "1e3", " 7 ", "1_0", "x", ""]),
)


@settings(max_examples=500, deadline=None)
@given(
    result=st.lists(st.one_of(layout_items, sample_items), max_size=5),
    ensure_ascii=st.booleans(),
    status=st.sampled_from([200, 200, 200, 422]),
)
def test_an_answer_in_prometheus_layout_reads_as_the_general_path_reads_it(
    result: list[Any], ensure_ascii: bool, status: int
) -> None:
    body = prometheus_layout(result, ensure_ascii)
    client = PrometheusClient("http://127.0.0.1:9")
    assert outcome(client, body, status) == general_outcome(client, body, status)


@settings(max_examples=1000, deadline=None)
@given(
    result=st.lists(layout_items, min_size=1, max_size=4),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["insert", "delete", "replace"]),
            st.integers(0, 10**6),
            st.sampled_from(list(',:{}[]"\\ 0123456789.eE+-abcnNI\x00\x1f\xe9')),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_a_damaged_answer_in_prometheus_layout_reads_as_the_general_path_reads_it(
    result: list[Any], edits: list[tuple[str, int, str]]
) -> None:
    # one to three bytes inserted, deleted or changed anywhere: whatever the body now says,
    # the layout reader takes it only where the general path takes it, with the same samples
    text = prometheus_layout(result).decode()
    for kind, where, char in edits:
        at = where % (len(text) + 1)
        if kind == "insert":
            text = text[:at] + char + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + char + text[at + 1 :]
    body = text.encode()
    client = PrometheusClient("http://127.0.0.1:9")
    assert outcome(client, body) == general_outcome(client, body)


def good_target(instance: str, job: str, address: str, health: str, interval: Any) -> Any:
    item = {"labels": {"instance": instance, "job": job}, "health": health,
            "discoveredLabels": {"__address__": address}}  # fmt: skip
    if interval is not None:
        item["scrapeInterval"] = interval
    return item


good_targets = st.builds(
    good_target,
    st.sampled_from(["n1", "n2", "10.0.0.1"]),
    st.sampled_from(["wattwarden", "node"]),
    st.sampled_from(["n1:9767", "[::1]:9767"]),
    st.sampled_from(["up", "down", "unknown"]),
    st.sampled_from([None, "15s", "1m30s", "500ms", "2h", "", "15", "1x", "s"]),
)


def broken_target(item: dict[str, Any], where: str, garbage: Any) -> Any:
    item = json.loads(json.dumps(item))
    if where == "item":
        return garbage
    if where in ("labels", "discoveredLabels", "health", "scrapeInterval"):
        item[where] = garbage
    elif where in ("instance", "job"):
        item["labels"][where] = garbage
    elif where == "address":
        item["discoveredLabels"]["__address__"] = garbage
    elif where == "drop":
        item.pop(garbage if garbage in ("labels", "health") else "discoveredLabels")
    return item


target_items = st.one_of(
    good_targets,
    st.builds(
        broken_target,
        good_targets,
        st.sampled_from(
            [
                "item",
                "labels",
                "discoveredLabels",
                "health",
                "scrapeInterval",
                "instance",
                "job",
                "address",
                "drop",
            ]
        ),
        json_values | st.sampled_from(["labels", "health", "10s", 5, None]),
    ),
)


@settings(max_examples=600, deadline=None)
@given(active=st.lists(target_items, max_size=5))
def test_the_lean_targets_parse_takes_and_refuses_exactly_what_the_per_target_parse_does(
    active: list[Any],
) -> None:
    client = PrometheusClient("http://127.0.0.1:9")  # never connects: parsing only
    try:
        want: list[Any] | str = [client._target(t) for t in active]
    except PrometheusError as e:
        want = str(e)
    try:
        got: list[Any] | str = client._targets(active)
    except PrometheusError as e:
        got = str(e)
    assert got == want


def targets_answer(health: str = "up", address: str = "n1:9767", *, scrape: str, took: float,
                   error: str = "", tail: str = "") -> Answer:  # fmt: skip
    item = {
        "labels": {"instance": "n1", "job": "wattwarden"},
        "discoveredLabels": {"__address__": address},
        "lastScrape": scrape,
        "lastScrapeDuration": took,
        "lastError": error,
        "health": health,
        "scrapeInterval": "15s",
    }
    data = {"activeTargets": [item], "droppedTargets": []}
    body = json.dumps({"status": "success", "data": data}, separators=(",", ":")) + tail
    return Answer("/api/v1/targets", 200, body.encode())


def test_targets_that_changed_only_in_their_last_scrape_are_not_parsed_again() -> None:
    reader = FleetReader(PrometheusClient("http://127.0.0.1:9"), "wattwarden")
    parsed: list[Answer] = []
    parse = reader.client.parse_targets

    def counting(answer: Answer) -> list[Target]:
        parsed.append(answer)
        return parse(answer)

    reader.client.parse_targets = counting  # type: ignore[method-assign]
    try:
        first = reader._targets(targets_answer(scrape="2026-01-01T00:00:00Z", took=0.012))
        again = reader._targets(
            targets_answer(scrape="2026-01-01T00:00:05.5Z", took=1.5e-3, error="timeout")
        )
        assert first == again and len(parsed) == 1
        assert first == [Target("n1", "wattwarden", "n1:9767", "up", 15.0)]
        # what the controller reads changed: parsed again, and seen
        down = reader._targets(targets_answer("down", scrape="x", took=0))
        assert down is not None and down[0].health == "down" and len(parsed) == 2
        moved = reader._targets(targets_answer("down", "n1:9999", scrape="y", took=0))
        assert moved is not None and moved[0].address == "n1:9999" and len(parsed) == 3
        # bytes JSON does not allow where a scrape time was: refused, not taken as the same
        good = targets_answer("down", "n1:9999", scrape="y", took=0)
        for bad in (b"y\x01", b"y\xe9", b'y"', b"y\\"):
            body = good.body.replace(b'"lastScrape":"y"', b'"lastScrape":"' + bad + b'"')
            with pytest.raises(PrometheusError):
                reader._targets(Answer(good.path, 200, body))
        with pytest.raises(PrometheusError):  # the same targets, then garbage after them
            reader._targets(targets_answer("down", "n1:9999", scrape="z", took=0, tail="]"))
        assert reader._targets(targets_answer("down", "n1:9999", scrape="z", took=0)) == moved
    finally:
        reader.close()


def test_a_slow_server_times_out_as_a_prometheus_error(stub: PromStub) -> None:
    stub.delay_s = 3.0
    with pytest.raises(PrometheusError, match=r"no answer within 0\.3 s"):
        PrometheusClient(stub.url, timeout_s=0.3).query("up", NOW)


def test_a_refused_connection_is_a_prometheus_error() -> None:
    with refused_port() as port, pytest.raises(PrometheusError, match="unreachable"):
        PrometheusClient(f"http://127.0.0.1:{port}").query("up", NOW)


def test_basic_auth_and_bearer_tokens_are_sent(stub: PromStub) -> None:
    PrometheusClient(stub.url, auth=Auth(basic_auth=("ctl", "pw"))).query("up", NOW)
    assert stub.requests[-1][2]["Authorization"] == "Basic Y3RsOnB3"
    PrometheusClient(stub.url, auth=Auth(bearer_token="t0ken")).query("up", NOW)
    assert stub.requests[-1][2]["Authorization"] == "Bearer t0ken"
    assert "pw" not in repr(Auth(basic_auth=("ctl", "pw"), bearer_token="t0ken"))


def test_tls_with_the_ca_file_verifies_the_server_and_without_it_fails(pki: Path) -> None:
    with PromStub(series={"up": [({"instance": "n1"}, 1.0)]}).running(tls=pki) as s:
        got = PrometheusClient(s.url, auth=Auth(ca_file=str(pki / "ca.crt"))).query("up", NOW)
        assert [x.value for x in got] == [1.0]
        with pytest.raises(PrometheusError, match="CERTIFICATE_VERIFY_FAILED"):
            PrometheusClient(s.url).query("up", NOW)


# ------------------------------------------------------------------ targets
def target(instance: str, address: str, job: str = "wattwarden", interval: str = "15s") -> dict:
    return {
        "discoveredLabels": {"__address__": address, "job": job},
        "labels": {"instance": instance, "job": job},
        "scrapePool": job,
        "scrapeUrl": f"http://{address}/metrics",
        "health": "up",
        "scrapeInterval": interval,
    }


def test_targets_give_each_agents_address_and_scrape_interval(stub: PromStub) -> None:
    stub.targets = [target("n1", "10.0.0.1:9767", interval="1m30s"), target("p", "p:9090", "prom")]
    got = PrometheusClient(stub.url).targets()
    assert got is not None
    assert [(t.instance, t.job, t.address, t.scrape_interval_s) for t in got] == [
        ("n1", "wattwarden", "10.0.0.1:9767", 90.0),
        ("p", "prom", "p:9090", 15.0),
    ]


def test_a_server_without_a_targets_api_answers_none(stub: PromStub) -> None:
    assert PrometheusClient(stub.url).targets() is None  # 404, as Mimir answers


# ------------------------------------------------------------------ one period's reads
def fleet_series(at: float, *, age_s: float = 1.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    q = queries("wattwarden")
    n1 = {"instance": "n1", "job": "wattwarden"}
    return {
        q["up"]: [(n1, 1.0)],
        q["power"]: [(n1, 900.0)],
        q["gpus_up"]: [(n1, 4.0)],
        q["gpus"]: [(n1, 4.0)],
        q["floor"]: [(n1, 800.0)],
        q["ceiling"]: [(n1, 2800.0)],
        q["demand"]: [({**n1, "priority": "high"}, 700.0), ({**n1, "priority": "low"}, 200.0)],
        q["starving"]: [({"instance": "n1"}, 1.0)],
        q["lease"]: [({"instance": "n1"}, 1500.0)],
        q["seen_at"]: [({"instance": "n1"}, at - age_s)],
    }


def test_one_period_reads_every_figure_at_the_same_time(stub: PromStub) -> None:
    stub.series = fleet_series(NOW)
    stub.targets = [target("n1", "10.0.0.1:9767")]
    reader = FleetReader(PrometheusClient(stub.url), "wattwarden")
    try:
        readings = reader.read(NOW)
    finally:
        reader.close()
    assert {p["time"] for path, p, _ in stub.requests if path == "/api/v1/query"} == {f"{NOW:.3f}"}
    view = build_view(readings, period_s=5.0, agent_port=9767)
    n = view.nodes["n1"]
    assert n.fresh and n.scraped and n.address == "10.0.0.1:9767"
    assert (n.floor_w, n.ceiling_w, n.power_w, n.gpus_up, n.gpus) == (800, 2800, 900, 4, 4)
    assert n.demand_w == {"high": 700.0, "low": 200.0}
    assert n.starving and n.lease_w == 1500.0


def test_one_failing_query_fails_the_whole_read(stub: PromStub) -> None:
    stub.series = fleet_series(NOW)
    broken = queries("wattwarden")["demand"]

    def query(params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        if params["query"] == broken:
            body = {"status": "error", "errorType": "timeout", "error": "query timed out"}
            return 503, json.dumps(body).encode()
        return 200, vector(stub.series.get(params["query"], []), float(params["time"]))

    stub.handlers["/api/v1/query"] = query
    reader = FleetReader(PrometheusClient(stub.url), "wattwarden")
    try:
        with pytest.raises(PrometheusError, match="timeout: query timed out"):
            reader.read(NOW)
    finally:
        reader.close()


def test_old_timestamps_make_a_node_stale(stub: PromStub) -> None:
    stub.series = fleet_series(NOW, age_s=31.0)  # two 15 s scrapes missed
    reader = FleetReader(PrometheusClient(stub.url), "wattwarden")
    try:
        view = build_view(reader.read(NOW), period_s=5.0, agent_port=9767)
    finally:
        reader.close()
    n = view.nodes["n1"]
    assert not n.fresh and n.problem == "series 31 s old (stale after 30 s)"
    assert n.address == "n1:9767"  # no targets API: the instance label and the default port
    assert view.cluster_power_w == 0.0


def test_the_staleness_bound_is_three_periods_or_two_scrapes() -> None:
    assert stale_bound(5.0, 15.0) == 30.0
    assert stale_bound(20.0, 15.0) == 60.0
    assert stale_bound(1.0, 1.0) == 3.0
    assert stale_bound(5.0, None) == 30.0  # unknown interval: Prometheus's default 15 s


fleet_labels = st.sampled_from(["n1", "n2", "n3"]).map(lambda i: {"instance": i}) | st.just({})
fleet_values = st.sampled_from([0.0, 1.0, 4.0, 800.0, 2800.0, -5.0, math.nan, math.inf])


@settings(max_examples=200, deadline=None)
@given(
    answers=st.fixed_dictionaries(
        {
            name: st.lists(st.tuples(fleet_labels, fleet_values), max_size=4)
            for name in queries("wattwarden")
        }
    ),
    priorities=st.lists(st.sampled_from(["high", "normal", "low", "urgent", None]), max_size=4),
    age=st.floats(0.0, 60.0),
)
def test_the_view_is_the_same_from_a_readers_vectors_as_from_samples_built_by_hand(
    answers: dict[str, list[tuple[dict[str, str], float]]], priorities: list[str | None], age: float
) -> None:
    # the reader hands the model Vectors (columns); tests and the trace hand it lists of Samples
    answers = {k: [({**m}, v) for m, v in rows] for k, rows in answers.items()}
    for (labels, _), priority in zip(answers["demand"], priorities, strict=False):
        if priority is not None:
            labels["priority"] = priority
    answers["seen_at"] = [(m, NOW - age) for m, _ in answers["seen_at"]]
    by_hand = {k: [Sample(m, v, NOW) for m, v in rows] for k, rows in answers.items()}
    client = PrometheusClient("http://127.0.0.1:9")
    parsed = {
        k: client._samples(k, json.loads(vector(rows, NOW))["data"]["result"])
        for k, rows in answers.items()
    }
    a = build_view(Readings(NOW, by_hand), period_s=5.0, agent_port=9767)
    b = build_view(Readings(NOW, parsed), period_s=5.0, agent_port=9767)
    assert repr(a) == repr(b)  # repr: NaN compares unequal to itself, its text does not
    # and what both say: the last finite value of each instance; demand summed by known
    # priority, a negative one as 0; NaN and infinite values as good as missing
    for instance, node in a.nodes.items():
        finite = [
            v for m, v in answers["power"] if m.get("instance") == instance and math.isfinite(v)
        ]
        assert node.power_w == (finite[-1] if finite else None)
        want: dict[str, float] = {}
        for m, v in answers["demand"]:
            p = m.get("priority")
            if m.get("instance") == instance and p in PRIORITIES and math.isfinite(v):
                want[p] = want.get(p, 0.0) + max(0.0, v)
        assert node.demand_w == want


def test_a_node_missing_its_recording_rules_is_not_fresh() -> None:
    n1 = {"instance": "n1", "job": "wattwarden"}
    readings = Readings(
        NOW,
        {
            "up": [Sample(n1, 1.0, NOW)],
            "seen_at": [Sample({"instance": "n1"}, NOW - 1, NOW)],
        },
    )
    n = build_view(readings, period_s=5.0, agent_port=9767).nodes["n1"]
    assert not n.fresh and "no GPU power limit series" in n.problem


# ------------------------------------------------------------------ a real Prometheus
@pytest.mark.slow
def test_reads_an_agent_through_a_real_prometheus_and_the_shipped_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from promstack import prometheus_test_config, run_prometheus

    prometheus = require_binary("prometheus")
    # every answer of the real server is in the layout read without decoding the JSON
    layouts: list[bool] = []
    read_layout = prom_api._read_layout

    def spy(body: bytes) -> Any:
        found = read_layout(body)
        layouts.append(found is not None)
        return found

    monkeypatch.setattr(prom_api, "_read_layout", spy)
    with (
        run_agent(tmp_path / "agent", "--sim", "2", "--power-budget-watts", "900") as agent,
        run_prometheus(
            prometheus,
            prometheus_test_config(
                agent_target=f"127.0.0.1:{agent.port}", alertmanager_target=None
            ),
            tmp_path / "prometheus",
        ) as prom,
    ):
        reader = FleetReader(PrometheusClient(prom.url, timeout_s=5.0), "wattwarden")
        try:

            def fresh() -> Any:
                view = build_view(reader.read(time.time()), period_s=1.0, agent_port=9767)
                node = view.nodes.get("127.0.0.1")
                ok = node is not None and node.fresh and node.demand_w and node.gpus
                return node if ok else None

            node = wait_for(fresh, timeout_s=90, what="a fresh node with demand and GPUs")
            # seen_at is the older of the newest GPU scrape and the oldest rule evaluation,
            # asked one at a time here: the server's answer to the folded query is theirs
            at = time.time()
            scraped = reader.client.query(
                'max by (instance) (timestamp(gpu_up{job="wattwarden"}))', at
            )
            names = "|".join(RECORDED)
            rules = reader.client.query(
                f'min by (instance) (timestamp(label_replace({{__name__=~"{names}",'
                'job="wattwarden"}, "series", "$1", "__name__", "(.+)")))',
                at,
            )
            (seen,) = reader.client.query(queries("wattwarden")["seen_at"], at)
            assert dict(seen.labels) == {"instance": "127.0.0.1"}
            assert seen.value == min(scraped[0].value, rules[0].value)
        finally:
            reader.close()
        assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} decoded"
        assert node.address == f"127.0.0.1:{agent.port}"  # from the targets API
        assert (node.gpus_up, node.gpus) == (2, 2)
        assert (node.floor_w, node.ceiling_w) == (400.0, 1400.0)  # 2 H100 SXM: 200..700 W
        assert node.power_w is not None and node.power_w > 0
        assert node.age_s is not None and node.age_s <= node.stale_after_s
        assert set(node.demand_w) <= {"high", "normal", "low"}


@pytest.mark.slow
def test_the_demand_query_reads_demand_above_min_and_an_older_agents_whole_demand(
    tmp_path: Path,
) -> None:
    # promtool evaluates the controller's own query: node-a exports demand above its GPUs'
    # minimum limits (read), node-b is an agent of a release before that series (whole demand)
    promtool = require_binary("promtool")
    series = [
        ("instance:wattwarden_power_demand_watts:sum", "node-a", "high", 650),
        ("instance:wattwarden_power_demand_watts:sum", "node-a", "low", 120),
        ("instance:wattwarden_power_demand_above_min_watts:sum", "node-a", "high", 450),
        ("instance:wattwarden_power_demand_above_min_watts:sum", "node-a", "low", 0),
        ("instance:wattwarden_power_demand_watts:sum", "node-b", "high", 900),
        ("instance:wattwarden_power_demand_above_min_watts:sum", "node-c", "high", 5),
    ]
    inputs = [
        {"series": f'{name}{{job="wattwarden",instance="{node}",priority="{p}"}}',
         "values": f"{value}x5"}
        for name, node, p, value in series
    ]  # fmt: skip
    want = [
        ("node-a", "high", 450),
        ("node-a", "low", 0),
        ("node-b", "high", 900),
        ("node-c", "high", 5),
    ]
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "promql_expr_test": [
                    {
                        "expr": queries("wattwarden")["demand"],
                        "eval_time": "2m",
                        "exp_samples": [
                            {"labels": f'{{instance="{node}",priority="{p}"}}', "value": value}
                            for node, p, value in want
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "demand_test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    result = subprocess.run(
        [promtool, "test", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


_MAYBE_W = st.none() | st.floats(min_value=-10.0, max_value=2000.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    age=st.none() | st.floats(min_value=-5.0, max_value=100.0, allow_nan=False),
    bound=st.floats(min_value=1.0, max_value=60.0),
    floor=_MAYBE_W,
    ceiling=_MAYBE_W,
)
def test_a_node_is_fresh_exactly_when_it_has_no_problem(
    age: float | None, bound: float, floor: float | None, ceiling: float | None
) -> None:
    n = NodeObservation("n:1", "n:1", True, age, bound, 100.0, 8, 8, floor, ceiling)
    assert n.fresh == (n.problem == "")
