"""OpenTelemetry export: the store's GPU state as hw.* metrics, pushed over OTLP/HTTP (protobuf).

Observable instruments read a :class:`~wattwarden.collectors.store.StoreSnapshot` when the SDK's
``PeriodicExportingMetricReader`` collects; an export never touches NVML. Names, instrument kinds,
units and attributes follow the OpenTelemetry hardware semantic conventions (status: Development),
https://opentelemetry.io/docs/specs/semconv/hardware/common/ and
https://opentelemetry.io/docs/specs/semconv/hardware/gpu/ (temperature sensors:
https://opentelemetry.io/docs/specs/semconv/hardware/temperature/), as shipped in
opentelemetry-semantic-conventions 0.66b2:

=====================  ====================  =======  ==========================================
name                   instrument            unit     value
=====================  ====================  =======  ==========================================
hw.power               gauge                 W        mean over the store's export window
hw.energy              counter (monotonic)   J        the GPU's energy counter
hw.temperature         gauge                 Cel      per sensor, ``hw.sensor_location``
hw.gpu.utilization     gauge                 1        ``hw.gpu.task="general"``
hw.gpu.memory.usage    updowncounter         By       device memory in use
hw.gpu.memory.limit    updowncounter         By       device memory in total
hw.errors              counter (monotonic)   {error}  XID errors, ``error.type`` = the XID number
hw.status              updowncounter         1        1 for the current ``hw.state``, 0 otherwise
=====================  ====================  =======  ==========================================

Every point carries ``hw.id`` (the GPU UUID), ``hw.type="gpu"``, ``hw.name`` (the model name) and
``gpu.index``. Deviation, on purpose: the conventions model a temperature sensor as a component of
its own (its own ``hw.id``, the GPU as ``hw.parent``); here ``hw.temperature`` keeps the GPU's
``hw.id`` and ``hw.type`` so every series of a GPU joins on one identity, and the sensor is told by
``hw.sensor_location`` (``gpu`` or ``memory``). ``hw.status`` states: ``failed`` while the GPU is
lost, ``degraded`` while a hardware, thermal or power-brake slowdown holds its clocks down, else
``ok``; ``predicted_failure`` is always 0. Readings of a lost GPU are not exported (they are stale);
its energy and error counters and its status still are.

Resource: ``service.name="wattwarden"``, ``service.version``, ``service.instance.id`` (a UUID v5 of
the host name in the namespace the service conventions name, so it is stable across restarts) and
``host.name``; ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` override those defaults and the
``resource_attributes`` argument overrides both.

Failure behaviour: the reader exports the *current* cumulative state every interval and keeps no
queue, so a dead endpoint costs one bounded export per interval and never memory. The OTLP/HTTP
exporter retries transient failures (connection errors, 429/502/503/504) with exponential backoff
(1 s, 2 s, 4 s ... with jitter) only while the next wait fits in its timeout, so ``timeout_s``
bounds each export; exports never overlap (the reader's ticker waits for the previous one).
``close()`` gives the last export at most its ``timeout_s`` and then shuts the HTTP client down,
which cuts any backoff short. Each failed export is counted (:attr:`OtlpExporter.failures`, its
data points in :attr:`OtlpExporter.dropped_points`); :func:`otlp_metric_families` exposes them to
Prometheus.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter,
)
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import (
    OTELResourceDetector,
    Resource,
)
from prometheus_client.core import CounterMetricFamily, Metric

from wattwarden import __version__
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import MetricStore, StoreSnapshot
from wattwarden.hardware.device import ClockEvent

log = logging.getLogger(__name__)

ENV_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_METRICS_HEADERS = "OTEL_EXPORTER_OTLP_METRICS_HEADERS"
ENV_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
ENV_METRICS_TIMEOUT = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"
ENV_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
ENV_INTERVAL = "OTEL_METRIC_EXPORT_INTERVAL"
ENV_METRICS_PROTOCOL = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
ENV_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
PROTOCOL = "http/protobuf"

DEFAULT_ENDPOINT = "http://localhost:4318"
METRICS_PATH = "/v1/metrics"
DEFAULT_INTERVAL_S = 60.0
"""The OpenTelemetry default for ``OTEL_METRIC_EXPORT_INTERVAL``."""
DEFAULT_TIMEOUT_S = 10.0
"""The OpenTelemetry default for ``OTEL_EXPORTER_OTLP_TIMEOUT``."""
DEFAULT_CLOSE_TIMEOUT_S = 5.0

SERVICE_NAME = "wattwarden"
SCOPE_NAME = "wattwarden"
# The namespace the service semantic conventions name for UUID v5 service.instance.id values.
_INSTANCE_ID_NAMESPACE = uuid.UUID("4d63009a-8d0f-11ee-aad7-4c796ed8e320")

HW_STATES = ("ok", "degraded", "failed", "predicted_failure")
_DEGRADED_EVENTS = (
    ClockEvent.HW_SLOWDOWN
    | ClockEvent.SW_THERMAL
    | ClockEvent.HW_THERMAL
    | ClockEvent.HW_POWER_BRAKE
)
# RFC 9110 token characters: what an HTTP header name may contain.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

AttributeValue = str | bool | int | float


# --------------------------------------------------------------------------------- configuration
@dataclass(frozen=True, slots=True)
class OtlpConfig:
    """Where and how often to export; built by :func:`resolve_config`."""

    endpoint: str
    """Full URL of the OTLP/HTTP metrics endpoint (ends in ``/v1/metrics`` unless given in full)."""
    headers: dict[str, str] = field(repr=False)
    """Extra request headers (often credentials, hence kept out of ``repr``)."""
    interval_s: float
    timeout_s: float
    """Bound on one export, retries included."""


def parse_headers(text: str, *, source: str = "OTLP headers") -> dict[str, str]:
    """Parse ``key=value,key2=value2`` (the ``OTEL_EXPORTER_OTLP_HEADERS`` format).

    Values may be percent-encoded (``Bearer%20token``) and are decoded; blank entries are skipped.
    Raises ValueError with a one-line message that names the entry or header, never its value.
    """
    headers: dict[str, str] = {}
    for number, entry in enumerate(text.split(","), start=1):
        if not entry.strip():
            continue
        name, sep, raw_value = entry.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(
                f"{source}: entry {number} has no '=' (expected name=value,name=value)"
            )
        if not name:
            raise ValueError(f"{source}: entry {number} has an empty header name")
        _add_header(headers, name, urllib.parse.unquote(raw_value.strip()), source)
    return headers


def _add_header(headers: dict[str, str], name: str, value: str, source: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"{source}: {name!r} is not a valid HTTP header name")
    if not value.strip():
        raise ValueError(f"{source}: header {name!r} has an empty value")
    if _CONTROL.search(value):
        raise ValueError(f"{source}: header {name!r} has a control character in its value")
    if any(k.lower() == name.lower() for k in headers):
        raise ValueError(f"{source}: header {name!r} is given more than once")
    headers[name] = value


def _checked_headers(headers: Mapping[str, str], source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        _add_header(out, name.strip(), value.strip(), source)
    return out


def _endpoint_url(url: str, source: str, *, append: str) -> str:
    """Validate an http(s) URL; ``append``: ``always`` (a base URL), ``if_bare`` or ``never``."""
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{source} {url!r} is not an http:// or https:// URL (e.g. http://localhost:4318)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{source} {url!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{source} {url!r} must not have a query or fragment")
    if append == "always" or (append == "if_bare" and parts.path in ("", "/")):
        parts = parts._replace(path=parts.path.rstrip("/") + METRICS_PATH)
    return urllib.parse.urlunsplit(parts)


def _seconds(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _env_ms(environ: Mapping[str, str], *keys: str) -> float | None:
    """The first of ``keys`` that is set, read as milliseconds, in seconds."""
    for key in keys:
        raw = environ.get(key, "").strip()
        if not raw:
            continue
        try:
            ms = float(raw)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"{key}={raw!r}: expected a positive number of milliseconds")
        return ms / 1000.0
    return None


def resolve_config(
    *,
    endpoint: str | None = None,
    headers: Mapping[str, str] | str | None = None,
    interval_s: float | None = None,
    timeout_s: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> OtlpConfig:
    """Explicit arguments first, then the standard ``OTEL_*`` variables, then the OTel defaults.

    - endpoint: an explicit URL with no path (``http://collector:4318``) gets ``/v1/metrics``
      appended, one with a path is used as is; else ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` as is;
      else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/metrics``; else ``http://localhost:4318/v1/metrics``.
    - headers: ``OTEL_EXPORTER_OTLP_METRICS_HEADERS`` (or ``OTEL_EXPORTER_OTLP_HEADERS``), with the
      explicit ones (a mapping or a ``k=v,k2=v2`` string) added over them. The OTLP exporter reads
      the variable too and sends its headers whatever is passed, so they merge rather than replace.
    - interval_s: ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds), default 60 s.
    - timeout_s: ``OTEL_EXPORTER_OTLP_METRICS_TIMEOUT`` / ``OTEL_EXPORTER_OTLP_TIMEOUT``, read as
      milliseconds as the specification says (the Python exporter alone reads them as seconds),
      default 10 s.

    ``OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL``, if set, must be ``http/protobuf``.

    Raises ValueError with a one-line message naming the argument or variable at fault.
    """
    env = os.environ if environ is None else environ
    for key in (ENV_METRICS_PROTOCOL, ENV_PROTOCOL):
        protocol = env.get(key, "").strip()
        if protocol:
            if protocol != PROTOCOL:
                raise ValueError(
                    f"{key}={protocol!r}: wattwarden exports OTLP over {PROTOCOL} only; "
                    f"set it to {PROTOCOL} or unset it"
                )
            break
    if endpoint is not None:
        url = _endpoint_url(endpoint, "OTLP endpoint", append="if_bare")
    elif env.get(ENV_METRICS_ENDPOINT, "").strip():
        url = _endpoint_url(env[ENV_METRICS_ENDPOINT], ENV_METRICS_ENDPOINT, append="never")
    elif env.get(ENV_ENDPOINT, "").strip():
        url = _endpoint_url(env[ENV_ENDPOINT], ENV_ENDPOINT, append="always")
    else:
        url = DEFAULT_ENDPOINT + METRICS_PATH

    merged: dict[str, str] = {}
    for key in (ENV_METRICS_HEADERS, ENV_HEADERS):
        if env.get(key, "").strip():
            merged = parse_headers(env[key], source=key)
            break
    if headers is not None:
        explicit = (
            parse_headers(headers)
            if isinstance(headers, str)
            else _checked_headers(headers, "OTLP headers")
        )
        for name, value in explicit.items():
            for old in [k for k in merged if k.lower() == name.lower()]:
                del merged[old]
            merged[name] = value

    if interval_s is None:
        interval = _env_ms(env, ENV_INTERVAL) or DEFAULT_INTERVAL_S
    else:
        interval = _seconds(interval_s, "interval_s")
    if timeout_s is None:
        timeout = _env_ms(env, ENV_METRICS_TIMEOUT, ENV_TIMEOUT) or DEFAULT_TIMEOUT_S
    else:
        timeout = _seconds(timeout_s, "timeout_s")
    return OtlpConfig(endpoint=url, headers=merged, interval_s=interval, timeout_s=timeout)


def build_resource(
    *,
    host_name: str | None = None,
    resource_attributes: Mapping[str, AttributeValue] | None = None,
) -> Resource:
    """The SDK ``Resource`` for the agent (see the module docstring for precedence)."""
    host = host_name or socket.gethostname()
    defaults: dict[str, AttributeValue] = {
        "service.name": SERVICE_NAME,
        "service.version": __version__,
        "service.instance.id": str(uuid.uuid5(_INSTANCE_ID_NAMESPACE, host)),
        "host.name": host,
    }
    from_env = dict(OTELResourceDetector().detect().attributes)
    return Resource.create({**defaults, **from_env, **dict(resource_attributes or {})})


# ------------------------------------------------------------------------------- export counting
class _ExportStats:
    """Thread-safe export counters, with a wait for tests and benchmarks."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._cond = threading.Condition()
        self.exports = 0
        self.failures = 0
        self.dropped_points = 0
        self._failing = False

    def record(self, ok: bool, points: int) -> None:
        with self._cond:
            self.exports += 1
            if not ok:
                self.failures += 1
                self.dropped_points += points
            was_failing, self._failing = self._failing, not ok
            self._cond.notify_all()
        if not ok and not was_failing:
            log.warning(
                "OTLP export to %s failed; the next interval exports current values again "
                "(failures are counted in wattwarden_otlp_export_failures_total)",
                self._endpoint,
            )
        elif ok and was_failing:
            log.info("OTLP export to %s works again", self._endpoint)

    def wait(self, exports: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.exports >= exports, timeout=timeout_s)


def _count_points(data: MetricsData) -> int:
    return sum(
        len(metric.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )


class _CountingExporter(MetricExporter):
    """Counts the outcome of each export of the wrapped OTLP exporter."""

    def __init__(self, inner: OTLPMetricExporter, stats: _ExportStats) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._stats = stats
        self._shut = False

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Export once (the inner exporter retries within its timeout); count the result."""
        ok = False
        if not self._shut:
            try:
                result = self._inner.export(metrics_data, timeout_millis=timeout_millis)
                ok = result is MetricExportResult.SUCCESS
            except Exception:  # an SDK bug must not kill the reader thread
                log.exception("OTLP exporter raised")
        self._stats.record(ok, _count_points(metrics_data))
        return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Nothing is buffered."""
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Stop the HTTP client; cuts short a retry backoff in progress on the reader thread."""
        if not self._shut:
            self._shut = True
            self._inner.shutdown()


# ----------------------------------------------------------------------------------- instruments
def _ok(value: float | None) -> TypeGuard[float]:
    return value is not None and not math.isnan(value)


def _gpu_attributes(s: GpuSample) -> dict[str, AttributeValue]:
    return {
        "hw.id": s.info.uuid,
        "hw.type": "gpu",
        "hw.name": s.info.name,
        "gpu.index": s.info.index,
    }


def gpu_state(s: GpuSample) -> str:
    """The ``hw.state`` of a GPU: failed (lost), degraded (slowed by hardware/heat), else ok."""
    if not s.up:
        return "failed"
    mask = s.reading.clock_event_mask if s.reading is not None else None
    if mask and mask & _DEGRADED_EVENTS:
        return "degraded"
    return "ok"


Callback = Callable[[CallbackOptions], Iterable[Observation]]


class _Instruments:
    """Observable instruments whose callbacks read one store snapshot each."""

    def __init__(self, store: MetricStore) -> None:
        self._store = store

    def register(self, meter: Meter) -> None:
        meter.create_observable_gauge(
            "hw.power",
            [self._cb(self._power)],
            unit="W",
            description="Power drawn by the GPU (mean over the agent's export window).",
        )
        meter.create_observable_counter(
            "hw.energy",
            [self._cb(self._energy)],
            unit="J",
            description="Energy consumed by the GPU.",
        )
        meter.create_observable_gauge(
            "hw.temperature",
            [self._cb(self._temperature)],
            unit="Cel",
            description="Temperature of a GPU sensor.",
        )
        meter.create_observable_gauge(
            "hw.gpu.utilization",
            [self._cb(self._utilization)],
            unit="1",
            description="Fraction of time the GPU ran a kernel.",
        )
        meter.create_observable_up_down_counter(
            "hw.gpu.memory.usage",
            [self._cb(self._memory_usage)],
            unit="By",
            description="GPU memory used.",
        )
        meter.create_observable_up_down_counter(
            "hw.gpu.memory.limit",
            [self._cb(self._memory_limit)],
            unit="By",
            description="Size of the GPU memory.",
        )
        meter.create_observable_counter(
            "hw.errors",
            [self._cb(self._errors)],
            unit="{error}",
            description="XID errors the driver reported for the GPU (error.type is the XID).",
        )
        meter.create_observable_up_down_counter(
            "hw.status",
            [self._cb(self._status)],
            unit="1",
            description="Operational status: 1 for the GPU's current hw.state, 0 for the others.",
        )

    def _cb(self, fn: Callable[[StoreSnapshot], Iterator[Observation]]) -> Callback:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return list(fn(self._store.snapshot()))

        return callback

    @staticmethod
    def _power(snap: StoreSnapshot) -> Iterator[Observation]:
        for view in snap.gpus:
            if view.sample.up and _ok(view.power_mean_w):
                yield Observation(view.power_mean_w, _gpu_attributes(view.sample))

    @staticmethod
    def _energy(snap: StoreSnapshot) -> Iterator[Observation]:
        for view in snap.gpus:
            yield Observation(view.sample.energy_j, _gpu_attributes(view.sample))

    @staticmethod
    def _temperature(snap: StoreSnapshot) -> Iterator[Observation]:
        for view in snap.gpus:
            r = view.sample.reading
            if not view.sample.up or r is None:
                continue
            for location, value in (
                ("gpu", r.temperature_gpu_c),
                ("memory", r.temperature_memory_c),
            ):
                if _ok(value):
                    attrs = {**_gpu_attributes(view.sample), "hw.sensor_location": location}
                    yield Observation(value, attrs)

    @staticmethod
    def _utilization(snap: StoreSnapshot) -> Iterator[Observation]:
        for view in snap.gpus:
            r = view.sample.reading
            if view.sample.up and r is not None and _ok(r.utilization_gpu_ratio):
                attrs = {**_gpu_attributes(view.sample), "hw.gpu.task": "general"}
                yield Observation(r.utilization_gpu_ratio, attrs)

    @staticmethod
    def _memory_usage(snap: StoreSnapshot) -> Iterator[Observation]:
        for view in snap.gpus:
            r = view.sample.reading
            if view.sample.up and r is not None and r.memory_used_bytes is not None:
                yield Observation(r.memory_used_bytes, _gpu_attributes(view.sample))

    @staticmethod
    def _memory_limit(snap: StoreSnapshot) -> Iterator[Observation]:
        for view in snap.gpus:
            r = view.sample.reading
            total = r.memory_total_bytes if r is not None else None
            if total is None:
                total = view.sample.info.memory_total_bytes
            if total is not None:
                yield Observation(total, _gpu_attributes(view.sample))

    @staticmethod
    def _errors(snap: StoreSnapshot) -> Iterator[Observation]:
        for view in snap.gpus:
            for xid, count in sorted(view.sample.xid_counts.items()):
                attrs = {**_gpu_attributes(view.sample), "error.type": str(xid)}
                yield Observation(count, attrs)

    @staticmethod
    def _status(snap: StoreSnapshot) -> Iterator[Observation]:
        for view in snap.gpus:
            state = gpu_state(view.sample)
            base = _gpu_attributes(view.sample)
            for candidate in HW_STATES:
                yield Observation(1 if candidate == state else 0, {**base, "hw.state": candidate})


# -------------------------------------------------------------------------------------- exporter
class OtlpExporter:
    """Pushes the store's GPU metrics to an OTLP/HTTP endpoint. ``start()``, then ``close()``.

    Arguments left out fall back to the standard ``OTEL_*`` variables (see :func:`resolve_config`);
    invalid values raise ValueError at construction, before anything starts.
    """

    def __init__(
        self,
        store: MetricStore,
        *,
        endpoint: str | None = None,
        headers: Mapping[str, str] | str | None = None,
        interval_s: float | None = None,
        timeout_s: float | None = None,
        resource_attributes: Mapping[str, AttributeValue] | None = None,
        host_name: str | None = None,
    ) -> None:
        self.config = resolve_config(
            endpoint=endpoint, headers=headers, interval_s=interval_s, timeout_s=timeout_s
        )
        self._store = store
        self._resource = build_resource(
            host_name=host_name, resource_attributes=resource_attributes
        )
        self._stats = _ExportStats(self.config.endpoint)
        self._provider: MeterProvider | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def endpoint(self) -> str:
        """The metrics URL exports go to."""
        return self.config.endpoint

    @property
    def resource_attributes(self) -> dict[str, object]:
        """The resource attributes every export carries."""
        return dict(self._resource.attributes)

    @property
    def exports(self) -> int:
        """Exports attempted (each one retried within ``timeout_s`` at most)."""
        return self._stats.exports

    @property
    def failures(self) -> int:
        """Exports that failed (endpoint down, timeout, rejected, or cut short by ``close()``)."""
        return self._stats.failures

    @property
    def dropped_points(self) -> int:
        """Data points in failed exports; the next export carries their current values."""
        return self._stats.dropped_points

    def wait_exports(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` exports have finished, successful or not; False on timeout."""
        return self._stats.wait(count, timeout_s)

    def start(self) -> None:
        """Register the instruments and start exporting; the first export is one interval on."""
        with self._lock:
            if self._closed:
                raise RuntimeError("OtlpExporter is closed")
            if self._provider is not None:
                return
            inner = OTLPMetricExporter(
                endpoint=self.config.endpoint,
                headers=self.config.headers,
                timeout=self.config.timeout_s,
            )
            reader = PeriodicExportingMetricReader(
                _CountingExporter(inner, self._stats),
                export_interval_millis=self.config.interval_s * 1000.0,
                export_timeout_millis=self.config.timeout_s * 1000.0,
            )
            provider = MeterProvider(
                metric_readers=[reader], resource=self._resource, shutdown_on_exit=False
            )
            meter = provider.get_meter(SCOPE_NAME, __version__)
            _Instruments(self._store).register(meter)
            self._provider = provider
        log.info(
            "OTLP: exporting hw.* metrics to %s every %g s",
            self.config.endpoint,
            self.config.interval_s,
        )

    def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Export once more, waiting at most ``timeout_s``, then stop; idempotent."""
        bound = min(_seconds(timeout_s, "timeout_s"), self.config.timeout_s)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            provider, self._provider = self._provider, None
        if provider is None:
            return
        try:
            provider.shutdown(timeout_millis=bound * 1000.0)
        except Exception as e:  # the SDK raises a bare Exception when a reader fails to stop
            log.warning("OTLP: shutting down the exporter: %s", e)


def otlp_metric_families(exporter: OtlpExporter) -> Callable[[StoreSnapshot], Iterator[Metric]]:
    """Self-metrics of ``exporter`` for ``StoreCollector(..., extra=...)``."""

    def families(_snapshot: StoreSnapshot) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "wattwarden_otlp_exports",
            "OTLP metric exports attempted.",
            value=exporter.exports,
        )
        yield CounterMetricFamily(
            "wattwarden_otlp_export_failures",
            "OTLP metric exports that failed (endpoint down, timeout, or rejected).",
            value=exporter.failures,
        )
        yield CounterMetricFamily(
            "wattwarden_otlp_dropped_points",
            "Data points in failed OTLP exports (the next export carries current values).",
            value=exporter.dropped_points,
        )

    return families
