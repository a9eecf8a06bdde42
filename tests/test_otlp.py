"""OTLP export: hw.* metrics decoded by a real OTLP/HTTP receiver, failure accounting, config."""

from __future__ import annotations

import gc
import logging
import os
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import Any

import pytest
from helpers import refused_port
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from prometheus_client.parser import text_string_to_metric_families

from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.otlp import (
    OtlpExporter,
    gpu_state,
    otlp_metric_families,
    parse_headers,
    resolve_config,
)
from wattwarden.exporters.prometheus import StoreCollector, make_registry, render
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim.clock import ManualClock
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml, uninstall_fake_nvml
from wattwarden.hardware.sim.fleet import SimFleet

GPUS = 8
HW_METRICS = {
    "hw.power": "W",
    "hw.energy": "J",
    "hw.temperature": "Cel",
    "hw.gpu.utilization": "1",
    "hw.gpu.memory.usage": "By",
    "hw.gpu.memory.limit": "By",
    "hw.errors": "{error}",
    "hw.status": "1",
}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* setting or proxy of the host leaks into a test."""
    for key in list(os.environ):
        if key.startswith("OTEL_") or key.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@dataclass
class Rig:
    clock: ManualClock
    fleet: SimFleet
    sampler: Sampler
    store: MetricStore

    def step(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.sampler.run_once()


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A store filled by the real sampler over 8 simulated GPUs read through fake NVML."""
    clock = ManualClock()
    fleet = SimFleet(GPUS, clock=clock)
    install_fake_nvml(fleet)
    try:
        store = MetricStore()
        sampler = Sampler(store, [GpuCollector(NvmlBackend(), monotonic=clock)], monotonic=clock)
        for i in range(GPUS):
            fleet[i].set_load(0.1 * i)
        sampler.run_once()
        clock.advance(1.0)
        sampler.run_once()
        yield Rig(clock, fleet, sampler, store)
        sampler.close()
    finally:
        uninstall_fake_nvml()


class Receiver:
    """An OTLP/HTTP metrics receiver on loopback that decodes each request's protobuf."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportMetricsServiceRequest.FromString(body)
                with receiver._cond:
                    receiver.requests.append(request)
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    receiver.paths.append(self.path)
                    receiver._cond.notify_all()
                reply = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(
        self, predicate: Callable[[list[ExportMetricsServiceRequest]], bool], timeout_s: float = 20
    ) -> list[ExportMetricsServiceRequest]:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.requests), timeout=timeout_s)
            assert ok, (
                f"receiver: condition not met after {timeout_s} s ({len(self.requests)} requests)"
            )
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on: connections are refused at once."""
    with refused_port() as port:
        yield port


class DroppingEndpoint:
    """A dead collector on loopback: it reads each request, counts it and hangs up unanswered."""

    def __init__(self) -> None:
        self.requests = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                endpoint.requests += 1  # one handler at a time: the server is not threading
                self.close_connection = True  # no reply: the client retries a connection error

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def dropping_endpoint() -> Iterator[DroppingEndpoint]:
    endpoint = DroppingEndpoint()
    yield endpoint
    endpoint.close()


@pytest.fixture
def quiet_sdk(caplog: pytest.LogCaptureFixture) -> None:
    """The SDK logs every failed export and retry; keep those records out of memory and output."""
    caplog.set_level(logging.CRITICAL + 1, logger="opentelemetry")


# ----------------------------------------------------------------------------- decode helpers
def _value(v: AnyValue) -> Any:
    return getattr(v, v.WhichOneof("value"))


def _attrs(kvs: Iterator[KeyValue] | Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def _metrics(request: ExportMetricsServiceRequest) -> dict[str, Metric]:
    return {
        m.name: m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }


def _points(metric: Metric) -> list[tuple[dict[str, Any], float]]:
    data = getattr(metric, metric.WhichOneof("data"))
    return [
        (_attrs(p.attributes), p.as_double if p.WhichOneof("value") == "as_double" else p.as_int)
        for p in data.data_points
    ]


def _by_gpu(metric: Metric, **match: Any) -> dict[int, float]:
    out = {}
    for attrs, value in _points(metric):
        if all(attrs.get(k) == v for k, v in match.items()):
            assert attrs["gpu.index"] not in out, f"{metric.name}: two points for one GPU"
            out[attrs["gpu.index"]] = value
    return out


def _has_metric(name: str) -> Callable[[list[ExportMetricsServiceRequest]], bool]:
    return lambda reqs: any(name in _metrics(r) for r in reqs)


# ---------------------------------------------------------------------------------- the export
def test_export_carries_hw_metrics_with_units_kinds_and_attributes(
    rig: Rig, receiver: Receiver
) -> None:
    exporter = OtlpExporter(
        rig.store,
        endpoint=receiver.base_url,
        headers="Authorization=Bearer s3cret,X-Scope-OrgID=gpu-team",
        interval_s=0.05,
        timeout_s=5,
        host_name="node-7",
    )
    exporter.start()
    try:
        request = receiver.wait_for(_has_metric("hw.energy"))[0]
    finally:
        exporter.close()

    assert receiver.paths[0] == "/v1/metrics"
    assert receiver.headers[0]["authorization"] == "Bearer s3cret"
    assert receiver.headers[0]["x-scope-orgid"] == "gpu-team"
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"

    (resource_metrics,) = request.resource_metrics
    resource = _attrs(resource_metrics.resource.attributes)
    assert resource["service.name"] == "wattwarden"
    assert resource["host.name"] == "node-7"
    assert resource["service.version"]
    assert len(resource["service.instance.id"]) == 36

    metrics = _metrics(request)
    present = {name for name in HW_METRICS if name in metrics}
    assert present == set(HW_METRICS) - {"hw.errors"}  # no XID yet: no hw.errors point
    for name in present:
        assert metrics[name].unit == HW_METRICS[name], name
    for name in ("hw.power", "hw.temperature", "hw.gpu.utilization"):
        assert metrics[name].WhichOneof("data") == "gauge", name
    for name in ("hw.gpu.memory.usage", "hw.gpu.memory.limit", "hw.status"):
        assert metrics[name].WhichOneof("data") == "sum", name
        assert not metrics[name].sum.is_monotonic, name
    energy = metrics["hw.energy"]
    assert energy.WhichOneof("data") == "sum"
    assert energy.sum.is_monotonic
    assert (
        energy.sum.aggregation_temporality
        == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    )

    uuids = {v.sample.info.index: v.sample.info.uuid for v in rig.store.snapshot().gpus}
    for name in present:
        for attrs, _ in _points(metrics[name]):
            assert attrs["hw.type"] == "gpu", name
            assert attrs["hw.id"] == uuids[attrs["gpu.index"]], name
            assert attrs["hw.name"] == rig.fleet[0].spec.name, name
    assert len(_by_gpu(energy)) == GPUS


def test_exported_values_match_the_store(rig: Rig, receiver: Receiver) -> None:
    snap = rig.store.snapshot()
    exporter = OtlpExporter(rig.store, endpoint=receiver.base_url, interval_s=0.05, timeout_s=5)
    exporter.start()
    try:
        metrics = _metrics(receiver.wait_for(_has_metric("hw.power"))[0])
    finally:
        exporter.close()

    views = {v.sample.info.index: v for v in snap.gpus}
    readings = {i: v.sample.reading for i, v in views.items()}
    assert _by_gpu(metrics["hw.power"]) == pytest.approx(
        {i: v.power_mean_w for i, v in views.items()}
    )
    assert _by_gpu(metrics["hw.energy"]) == pytest.approx(
        {i: v.sample.energy_j for i, v in views.items()}
    )
    assert _by_gpu(metrics["hw.temperature"], **{"hw.sensor_location": "gpu"}) == pytest.approx(
        {i: r.temperature_gpu_c for i, r in readings.items() if r}
    )
    assert _by_gpu(metrics["hw.gpu.utilization"]) == pytest.approx(
        {i: r.utilization_gpu_ratio for i, r in readings.items() if r}
    )
    assert _by_gpu(metrics["hw.gpu.memory.usage"]) == {
        i: r.memory_used_bytes for i, r in readings.items() if r
    }
    assert _by_gpu(metrics["hw.gpu.memory.limit"]) == {
        i: r.memory_total_bytes for i, r in readings.items() if r
    }
    assert _by_gpu(metrics["hw.status"], **{"hw.state": "ok"}) == dict.fromkeys(range(GPUS), 1)
    assert _by_gpu(metrics["hw.status"], **{"hw.state": "failed"}) == dict.fromkeys(range(GPUS), 0)
    # the load set per GPU shows: more utilization, more power
    power = _by_gpu(metrics["hw.power"])
    assert power[7] > power[0]


def test_energy_is_cumulative_and_increases_across_exports(rig: Rig, receiver: Receiver) -> None:
    exporter = OtlpExporter(rig.store, endpoint=receiver.base_url, interval_s=0.05, timeout_s=5)
    exporter.start()
    try:
        first = _by_gpu(_metrics(receiver.wait_for(_has_metric("hw.energy"))[0])["hw.energy"])
        rig.fleet[0].set_load(1.0)
        rig.step(30.0)
        after = rig.store.snapshot().gpus[0].sample.energy_j

        def energy_moved(reqs: list[ExportMetricsServiceRequest]) -> bool:
            last = _metrics(reqs[-1]).get("hw.energy")
            return last is not None and _by_gpu(last)[0] == pytest.approx(after)

        requests = receiver.wait_for(energy_moved)
    finally:
        exporter.close()

    last = _metrics(requests[-1])["hw.energy"]
    latest = _by_gpu(last)
    # 30 s at full load on an H100: several kJ more, on the same cumulative series
    assert latest[0] - first[0] > 30 * 200
    assert all(latest[i] >= first[i] for i in range(GPUS))
    starts = {p.start_time_unix_nano for p in last.sum.data_points}
    first_starts = {
        p.start_time_unix_nano for p in _metrics(requests[0])["hw.energy"].sum.data_points
    }
    assert starts == first_starts  # one start time: a cumulative series, not deltas


def test_xid_errors_and_lost_gpu_show_in_errors_and_status(rig: Rig, receiver: Receiver) -> None:
    rig.fleet[2].inject("xid", xid=48)
    rig.fleet[2].inject("xid", xid=48)
    rig.fleet[5].inject("lost")
    rig.step(1.0)
    exporter = OtlpExporter(rig.store, endpoint=receiver.base_url, interval_s=0.05, timeout_s=5)
    exporter.start()
    try:
        metrics = _metrics(receiver.wait_for(_has_metric("hw.errors"))[0])
    finally:
        exporter.close()

    errors = {(a["gpu.index"], a["error.type"]): v for a, v in _points(metrics["hw.errors"])}
    assert errors[(2, "48")] == 2
    assert errors[(5, "79")] == 1  # fell off the bus
    assert metrics["hw.errors"].sum.is_monotonic
    failed = _by_gpu(metrics["hw.status"], **{"hw.state": "failed"})
    assert failed[5] == 1
    assert sum(failed.values()) == 1
    assert _by_gpu(metrics["hw.status"], **{"hw.state": "ok"})[5] == 0
    # a lost GPU's readings are stale: not exported; its energy counter still is
    assert 5 not in _by_gpu(metrics["hw.power"])
    assert 5 in _by_gpu(metrics["hw.energy"])
    # and so is its memory size, which does not change
    lost = rig.store.snapshot().gpus[5].sample
    assert lost.reading is not None and lost.reading.memory_total_bytes
    assert _by_gpu(metrics["hw.gpu.memory.limit"])[5] == lost.reading.memory_total_bytes


def test_gpu_state_is_degraded_under_thermal_slowdown(rig: Rig) -> None:
    rig.fleet[1].inject("power_brake")
    rig.step(1.0)
    states = {v.sample.info.index: gpu_state(v.sample) for v in rig.store.snapshot().gpus}
    assert states[1] == "degraded"
    assert states[0] == "ok"


def test_close_sends_a_final_export(rig: Rig, receiver: Receiver) -> None:
    exporter = OtlpExporter(rig.store, endpoint=receiver.base_url, interval_s=3600, timeout_s=5)
    exporter.start()
    exporter.close()
    assert len(receiver.requests) == 1
    assert "hw.energy" in _metrics(receiver.requests[0])
    assert exporter.exports == 1
    assert exporter.failures == 0


# ------------------------------------------------------------------------------------ failures
@pytest.mark.usefixtures("quiet_sdk")
def test_dead_endpoint_counts_every_failure_and_memory_stays_bounded(
    rig: Rig, closed_port: int
) -> None:
    exporter = OtlpExporter(
        rig.store, endpoint=f"http://127.0.0.1:{closed_port}", interval_s=0.002, timeout_s=0.2
    )
    exporter.start()
    try:
        assert exporter.wait_exports(20, timeout_s=60)  # warm-up: pools, caches, lazy imports
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            assert exporter.wait_exports(exporter.exports + 100, timeout_s=120)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    finally:
        exports_before_close = exporter.exports
        exporter.close(timeout_s=1)
    # close makes one last export: it fails too, and is counted before the totals are read
    assert exporter.wait_exports(exports_before_close + 1, timeout_s=5)
    assert exporter.failures == exporter.exports >= 120
    per_export, rest = divmod(exporter.dropped_points, exporter.failures)
    assert rest == 0
    assert per_export >= 6 * GPUS
    # a failed batch kept for retry would hold ~90 points with their attributes: tens of kB each
    assert grown < 256 * 1024, f"memory grew {grown} bytes over 100 failed exports"


@pytest.mark.usefixtures("quiet_sdk")
def test_close_does_not_hang_on_a_dead_endpoint(
    rig: Rig, dropping_endpoint: DroppingEndpoint
) -> None:
    # 30 s timeout: the SDK would retry the final export after about 1 s, 2 s, 4 s and 8 s;
    # close(timeout_s=0.2) shuts the client down during the first backoff (0.8 s at least)
    exporter = OtlpExporter(
        rig.store, endpoint=dropping_endpoint.base_url, interval_s=3600, timeout_s=30
    )
    exporter.start()
    exporter.close(timeout_s=0.2)
    assert exporter.wait_exports(1, timeout_s=5)  # the cut-short export finishes as a failure
    # one attempt, which the SDK repeats once at once on a connection error; uncut, the 30 s
    # budget would allow five attempts (ten requests)
    assert dropping_endpoint.requests <= 2
    assert exporter.failures == exporter.exports == 1


@pytest.mark.usefixtures("quiet_sdk")
def test_close_cuts_short_the_backoff_of_an_overloaded_collector(rig: Rig) -> None:
    unavailable = Receiver(status=503)  # retryable: the SDK backs off and tries again
    try:
        exporter = OtlpExporter(
            rig.store, endpoint=unavailable.base_url, interval_s=0.01, timeout_s=30
        )
        exporter.start()
        unavailable.wait_for(lambda reqs: len(reqs) >= 1)  # first attempt made; backoff begins
        exporter.close(timeout_s=0.2)
        # the periodic export in backoff ends as a failure; the final one is not sent, the client
        # being shut down, and is counted as a failure too; nothing can send after that
        assert exporter.wait_exports(2, timeout_s=5)
    finally:
        unavailable.close()
    assert len(unavailable.requests) == 1  # no retry: the SDK's 30 s budget would allow 5 attempts
    assert exporter.failures == exporter.exports == 2


@pytest.mark.usefixtures("quiet_sdk")
def test_failures_are_exported_to_prometheus(rig: Rig, closed_port: int) -> None:
    exporter = OtlpExporter(
        rig.store, endpoint=f"http://127.0.0.1:{closed_port}", interval_s=0.01, timeout_s=0.2
    )
    exporter.start()
    try:
        assert exporter.wait_exports(3, timeout_s=30)
    finally:
        exports_before_close = exporter.exports
        exporter.close(timeout_s=1)
    # close makes one last export; the totals are read once it is counted
    assert exporter.wait_exports(exports_before_close + 1, timeout_s=5)
    registry = make_registry(
        StoreCollector(rig.store, backend="sim", extra=otlp_metric_families(exporter))
    )
    body, _ = render(registry)
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples["wattwarden_otlp_export_failures_total"] == exporter.failures >= 3
    assert samples["wattwarden_otlp_exports_total"] == exporter.exports
    assert samples["wattwarden_otlp_dropped_points_total"] == exporter.dropped_points > 0


def test_start_after_close_is_refused(rig: Rig, receiver: Receiver) -> None:
    exporter = OtlpExporter(rig.store, endpoint=receiver.base_url, interval_s=3600)
    exporter.close()  # never started: nothing to flush
    with pytest.raises(RuntimeError, match="closed"):
        exporter.start()
    assert receiver.requests == []


# ------------------------------------------------------------------------------ configuration
def test_parse_headers_reads_pairs_and_percent_decodes() -> None:
    assert parse_headers("Authorization=Bearer x, X-Scope-OrgID = t1 ,") == {
        "Authorization": "Bearer x",
        "X-Scope-OrgID": "t1",
    }
    assert parse_headers("api-key=a%2Cb%3Dc,Authorization=Bearer%20y") == {
        "api-key": "a,b=c",
        "Authorization": "Bearer y",
    }
    assert parse_headers("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Authorization", "entry 1 has no '='"),
        ("a=1,=secret", "entry 2 has an empty header name"),
        ("bad name=secret", "'bad name' is not a valid HTTP header name"),
        ("Authorization=", "header 'Authorization' has an empty value"),
        ("k=sec%0Aret", "header 'k' has a control character"),
        ("Authorization=a,authorization=b", "header 'authorization' is given more than once"),
    ],
)
def test_parse_headers_rejects_bad_input_in_one_line_without_the_value(
    text: str, message: str
) -> None:
    with pytest.raises(ValueError, match="OTLP headers: ") as info:
        parse_headers(text)
    text_of_error = str(info.value)
    assert message in text_of_error
    assert "\n" not in text_of_error
    assert "secret" not in text_of_error and "sec" not in text_of_error.split(": ", 1)[1]


def test_config_defaults_follow_the_otel_specification() -> None:
    cfg = resolve_config(environ={})
    assert cfg.endpoint == "http://localhost:4318/v1/metrics"
    assert cfg.headers == {}
    assert cfg.interval_s == 60.0
    assert cfg.timeout_s == 10.0


def test_config_reads_the_standard_variables() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4318/otlp/",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20env",
        "OTEL_METRIC_EXPORT_INTERVAL": "15000",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
    }
    cfg = resolve_config(environ=env)
    assert cfg.endpoint == "https://collector.example:4318/otlp/v1/metrics"
    assert cfg.headers == {"Authorization": "Bearer env"}
    assert cfg.interval_s == 15.0
    assert cfg.timeout_s == 2.5
    # the signal-specific variables win, and the metrics endpoint is used as given
    env |= {
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m.example:9000/ingest",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "X-Tenant=a",
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "750",
    }
    cfg = resolve_config(environ=env)
    assert cfg.endpoint == "http://m.example:9000/ingest"
    assert cfg.headers == {"X-Tenant": "a"}
    assert cfg.timeout_s == 0.75
    assert resolve_config(environ={"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}).endpoint


def test_explicit_arguments_override_the_environment() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer env,X-Tenant=t",
        "OTEL_METRIC_EXPORT_INTERVAL": "15000",
    }
    cfg = resolve_config(
        endpoint="http://arg:4318",
        headers={"Authorization": "Bearer arg"},
        interval_s=5,
        timeout_s=1,
        environ=env,
    )
    assert cfg.endpoint == "http://arg:4318/v1/metrics"  # a bare base URL gets the signal path
    assert cfg.headers == {"X-Tenant": "t", "Authorization": "Bearer arg"}
    assert (cfg.interval_s, cfg.timeout_s) == (5.0, 1.0)
    assert resolve_config(endpoint="http://arg:4318/custom", environ={}).endpoint == (
        "http://arg:4318/custom"
    )


@pytest.mark.parametrize(
    ("kwargs", "env", "message"),
    [
        ({"endpoint": "localhost:4318"}, {}, "OTLP endpoint 'localhost:4318' is not an http://"),
        ({"endpoint": "http://h:99999"}, {}, "has an invalid port"),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://c:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({}, {"OTEL_METRIC_EXPORT_INTERVAL": "15s"}, "OTEL_METRIC_EXPORT_INTERVAL='15s': expected"),
        ({}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "-1"}, "OTEL_EXPORTER_OTLP_TIMEOUT='-1': expected"),
        ({}, {"OTEL_EXPORTER_OTLP_HEADERS": "Bearer x"}, "OTEL_EXPORTER_OTLP_HEADERS: entry 1"),
        ({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL='grpc': "),
        ({"interval_s": 0}, {}, "interval_s must be a positive number of seconds"),
        ({"timeout_s": float("inf")}, {}, "timeout_s must be a positive number of seconds"),
    ],
)
def test_bad_config_raises_one_line_naming_the_key(
    kwargs: dict[str, Any], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        resolve_config(**kwargs, environ=env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_exporter_reads_the_environment_when_arguments_are_left_out(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "1234")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=lab")
    exporter = OtlpExporter(rig.store)
    assert exporter.endpoint == "http://127.0.0.1:4318/v1/metrics"
    assert exporter.config.interval_s == 1.234
    assert exporter.resource_attributes["deployment.environment.name"] == "lab"
    assert exporter.resource_attributes["service.name"] == "wattwarden"


def test_config_repr_hides_header_values() -> None:
    cfg = resolve_config(headers="Authorization=Bearer topsecret", environ={})
    assert "topsecret" not in repr(cfg)
