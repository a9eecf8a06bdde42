"""Counting OTLP exports: outcomes, failures and dropped points, and their Prometheus families.

The wrapped OTLP exporter's result is counted per export (a failure and its data points); a
change between failing and working is logged once, not per export. :func:`otlp_metric_families`
exposes the counts as ``wattwarden_otlp_*`` self-metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from prometheus_client.core import CounterMetricFamily, Metric

from wattwarden.collectors.store import StoreSnapshot

log = logging.getLogger("wattwarden.exporters.otlp")  # the name operators filter on


class ExportCounts(Protocol):
    """What the self-metrics read: an exporter's counts so far."""

    @property
    def exports(self) -> int:
        """Exports attempted."""
        ...

    @property
    def failures(self) -> int:
        """Exports that failed."""
        ...

    @property
    def dropped_points(self) -> int:
        """Data points in failed exports."""
        ...


class ExportStats:
    """Thread-safe export counters, with a wait for tests and benchmarks."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._cond = threading.Condition()
        self.exports = 0
        self.failures = 0
        self.dropped_points = 0
        self._failing = False

    def record(self, ok: bool, points: int) -> None:
        """Count one export's outcome; log when exports start failing and when they work again."""
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
        """Wait until ``exports`` exports have finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.exports >= exports, timeout=timeout_s)


def _count_points(data: MetricsData) -> int:
    return sum(
        len(metric.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )


class CountingExporter(MetricExporter):
    """Counts the outcome of each export of the wrapped OTLP exporter."""

    def __init__(self, inner: OTLPMetricExporter, stats: ExportStats) -> None:
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


def otlp_metric_families(exporter: ExportCounts) -> Callable[[StoreSnapshot], Iterator[Metric]]:
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
