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

The instruments are the GPU metric table's rows that name one
(:data:`~wattwarden.collectors.metrics.GPU_METRICS`, :mod:`.otlp_instruments`); settings come from
:mod:`.otlp_config`, export counting and its self-metrics from :mod:`.otlp_export`.

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
import threading
from collections.abc import Mapping

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

from wattwarden import __version__
from wattwarden.collectors.metrics import HW_STATES, gpu_state
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.otlp_config import (
    DEFAULT_CLOSE_TIMEOUT_S,
    SCOPE_NAME,
    AttributeValue,
    OtlpConfig,
    build_resource,
    parse_headers,
    positive_seconds,
    resolve_config,
)
from wattwarden.exporters.otlp_export import CountingExporter, ExportStats, otlp_metric_families
from wattwarden.exporters.otlp_instruments import Instruments

__all__ = [
    "HW_STATES",
    "OtlpConfig",
    "OtlpExporter",
    "build_resource",
    "gpu_state",
    "otlp_metric_families",
    "parse_headers",
    "resolve_config",
]

log = logging.getLogger(__name__)


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
        self._stats = ExportStats(self.config.endpoint)
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
                CountingExporter(inner, self._stats),
                export_interval_millis=self.config.interval_s * 1000.0,
                export_timeout_millis=self.config.timeout_s * 1000.0,
            )
            provider = MeterProvider(
                metric_readers=[reader], resource=self._resource, shutdown_on_exit=False
            )
            meter = provider.get_meter(SCOPE_NAME, __version__)
            Instruments(self._store).register(meter)
            self._provider = provider
        log.info(
            "OTLP: exporting hw.* metrics to %s every %g s",
            self.config.endpoint,
            self.config.interval_s,
        )

    def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Export once more, waiting at most ``timeout_s``, then stop; idempotent."""
        bound = min(positive_seconds(timeout_s, "timeout_s"), self.config.timeout_s)
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
