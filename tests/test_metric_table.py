"""The metric tables, the README's metric list and the shipped queries name the same metrics.

GPU metrics are rows of ``GPU_METRICS``, other collectors' rows of their registrations; the
agent's own and the job families are written in the Prometheus exporter. The README lists each
exported name with its type, labels and OpenTelemetry instrument; the recording and alert rules
and the Grafana dashboard may only query names that are exported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import Metric
from promstack import dashboard, dashboard_targets, rules

from wattwarden.api.state import gpu_json
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.metrics import GPU_METRICS, MetricSpec, values
from wattwarden.collectors.registry import REGISTRATIONS
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import GpuView, MetricStore, StoreSnapshot
from wattwarden.exporters.otlp import otlp_metric_families
from wattwarden.exporters.prometheus import StoreCollector, job_families
from wattwarden.hardware.device import GpuInfo, GpuReading

README = Path(__file__).resolve().parent.parent / "README.md"

Row = tuple[str, str, str]
"""(type, labels joined by ', ', OpenTelemetry instrument or '') of one exported name."""


def _exposed(name: str, kind: str) -> str:
    return name + "_total" if kind == "counter" else name


def _table_rows(specs: tuple[MetricSpec[Any], ...], own: tuple[str, ...]) -> dict[str, Row]:
    return {
        _exposed(s.name, s.kind): (
            s.kind,
            ", ".join((*own, *s.labels)),
            s.otel.name if s.otel is not None else "",
        )
        for s in specs
    }


class _Counts:
    exports = failures = dropped_points = 0


def _hand_written_rows() -> dict[str, Row]:
    """The agent's own, job and OTLP families, as a scrape yields them (no GPU, no collector)."""
    store = MetricStore()
    store.mark_pass(1_700_000_000.0)

    def extra(snap: StoreSnapshot) -> Iterator[Metric]:
        return chain(job_families(JobRegistry(), snap), otlp_metric_families(_Counts())(snap))

    collector = StoreCollector(store, backend="sim", extra=extra, registrations=())
    gpu_names = {s.name for s in GPU_METRICS}
    return {
        _exposed(f.name, f.type): (f.type, ", ".join(getattr(f, "_labelnames", ())), "")
        for f in collector.collect()
        if f.name not in gpu_names
    }


def exported_rows() -> dict[str, Row]:
    """Every name a scrape can show, from the tables and the hand-written families."""
    rows = _table_rows(GPU_METRICS, ("gpu", "uuid"))
    for reg in REGISTRATIONS:
        rows.update(_table_rows(reg.metrics, ()))
    rows.update(_hand_written_rows())
    return rows


def readme_rows(text: str) -> dict[str, Row]:
    """The README's metric list: ``| `name` | type | labels | `otel` |`` lines."""
    rows: dict[str, Row] = {}
    for m in re.finditer(r"^\| `([a-z_:]+)` \| (\w+) \| ([^|]*)\| ([^|]*)\|$", text, re.M):
        name, kind, labels, otel = m.groups()
        assert name not in rows, f"README lists {name} twice"
        rows[name] = (kind, labels.strip(), otel.strip().strip("`"))
    return rows


def queried_names() -> set[str]:
    """Metric names the recording and alert rules and the dashboard (panels, variables) query."""
    exprs = [str(r["expr"]) for r in rules()]
    model = dashboard()
    exprs += [str(t["expr"]) for _, t in dashboard_targets(model)]
    for var in model.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(str(query.get("query", "")) if isinstance(query, dict) else str(query or ""))
    names: set[str] = set()
    for expr in exprs:
        unquoted = re.sub(r'"[^"]*"|\'[^\']*\'', '""', expr)  # label values are not names
        for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", unquoted):
            if ":" not in token and token.startswith(("gpu_", "host_", "wattwarden_")):
                names.add(token)
    return names


# ------------------------------------------------------------------------------------- the tests
def test_the_readme_lists_every_exported_metric_with_its_type_labels_and_otel_instrument() -> None:
    assert readme_rows(README.read_text()) == exported_rows()


def test_the_readme_check_fails_on_a_dropped_row_or_a_renamed_entry() -> None:
    text = README.read_text()
    exported = exported_rows()
    renamed = text.replace("| `gpu_clock_hertz` |", "| `gpu_clock_hz` |")
    assert renamed != text and readme_rows(renamed) != exported
    dropped = dict(exported)
    dropped.pop("gpu_power_peak_watts", None)
    assert readme_rows(text) != dropped


def test_every_metric_the_rules_and_dashboard_query_is_exported() -> None:
    names = queried_names()
    assert {"gpu_power_watts", "gpu_up", "wattwarden_power_budget_watts"} <= names  # read them
    missing = names - set(exported_rows())
    assert missing == set()


def test_a_renamed_row_breaks_the_queries_that_use_it() -> None:
    renamed = {n.replace("gpu_power_watts", "gpu_power_w") for n in exported_rows()}
    assert "gpu_power_watts" in queried_names() - renamed


# ------------------------------------------------------------------ a GPU with nothing readable
INFO = GpuInfo(3, "GPU-x", "NVIDIA H100", "00000000:18:00.0", "550", None, None, None, None)
EMPTY = GpuReading(*([None] * 13))
FULL = GpuReading(300.0, 310.0, 5e3, 500.0, 61.0, 66.0, 0.75, 0.25, 2**30, 2**36, 1.7e9, 2.6e9, 4)

KEPT = {"gpu_up", "gpu_info", "gpu_energy_joules", "gpu_clock_event_seconds", "gpu_xid_errors"}
"""What a GPU with no readings keeps: identity, liveness and counters."""


def _sample(reading: GpuReading | None, up: bool) -> GpuSample:
    return GpuSample(
        INFO,
        up,
        1.0,
        reading,
        12.5,
        "counter",
        clock_event_seconds={"idle": 1.0},
        xid_counts={79: 1},
    )


@pytest.mark.parametrize(
    ("reading", "up"),
    [(EMPTY, True), (None, True), (FULL, False)],
    ids=["every-field-unsupported", "never-read", "lost-with-a-stale-reading"],
)
def test_a_gpu_without_current_readings_keeps_only_its_identity_liveness_and_counters(
    reading: GpuReading | None, up: bool
) -> None:
    view = GpuView(_sample(reading, up), None, None)
    emitted = {s.name for s in GPU_METRICS if list(values(s.read, view))}
    assert emitted == KEPT
    otel = {
        s.otel.name
        for s in GPU_METRICS
        if s.otel is not None and list(values(s.otel.read or s.read, view))
    }
    assert otel == {"hw.status", "hw.energy", "hw.errors"} | (
        {"hw.gpu.memory.limit"} if reading is FULL else set()
    )
    state = gpu_json(view.sample)
    for spec in GPU_METRICS:
        keys = [spec.json] if isinstance(spec.json, str) else list((spec.json or {}).values())
        for key in keys:
            if spec.name not in KEPT:
                assert state[key] is None, key
