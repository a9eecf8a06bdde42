"""The metric tables, the README's metric list and the shipped queries name the same metrics.

GPU metrics are rows of ``GPU_METRICS``, other collectors' rows of their registrations; the
agent's own and the job families are written in the Prometheus exporter. The README lists each
exported name with its type, labels and OpenTelemetry instrument; the recording and alert rules
and the Grafana dashboard may only query names that are exported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import Metric
from promstack import dashboard, dashboard_targets, rules

from wattwarden.api.state import gpu_json
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.metrics import (
    GPU_METRICS,
    MetricSpec,
    _live,
    _reading,
    gpu_state,
    json_values,
    one,
    values,
)
from wattwarden.collectors.registry import REGISTRATIONS
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import GpuView, MetricStore, StoreSnapshot
from wattwarden.exporters.otlp import otlp_metric_families
from wattwarden.exporters.prometheus import StoreCollector, job_families
from wattwarden.fleet.metrics import METRICS as CONTROLLER_METRICS
from wattwarden.hardware.device import ClockEvent, GpuInfo, GpuReading, ProcessUsage

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


def controller_names() -> set[str]:
    """What the fleet controller's own /metrics serves (counters with their ``_total``)."""
    return {m.name + ("_total" if m.kind == "counter" else "") for m in CONTROLLER_METRICS}


def test_every_metric_the_rules_and_dashboard_query_is_exported() -> None:
    names = queried_names()
    assert {"gpu_power_watts", "gpu_up", "wattwarden_power_budget_watts"} <= names  # read them
    assert "wattwarden_controller_budget_watts" in names  # the controller's alerts read it
    missing = names - set(exported_rows()) - controller_names()
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


# ------------------------------------------------------------------ every row's series, in full
IDENTITY = GpuInfo(
    3, "GPU-x", "NVIDIA H100", "00000000:18:00.0", "550", 2**36, 200.0, 700.0, 700.0, 90.0, 87.0
)
READ = replace(
    FULL,
    memory_total_bytes=2**36 - 2**20,  # the driver's figure, a little under the identity's
    clock_event_mask=ClockEvent.SW_POWER_CAP,
    processes=(ProcessUsage(101, 2**20, 0.5), ProcessUsage(202, None, None)),
)


def _view(reading: GpuReading | None, up: bool = True, info: GpuInfo = IDENTITY) -> GpuView:
    sample = GpuSample(
        info,
        up,
        1.0,
        reading,
        12.5,
        "counter",
        clock_event_seconds={"idle": 1.0, "sw_power_cap": 0.5},
        xid_counts={79: 1, 13: 2},
    )
    return GpuView(sample, 305.0 if up else None, 320.0 if up else None, 450.0)


ALL_SERIES: dict[str, list[tuple[tuple[str, ...], float]]] = {
    "gpu_up": [((), 1.0)],
    "gpu_info": [(("NVIDIA H100", "00000000:18:00.0", "550"), 1.0)],
    "gpu_power_watts": [((), 305.0)],
    "gpu_power_peak_watts": [((), 320.0)],
    "gpu_energy_joules": [((), 12.5)],
    "gpu_power_limit_watts": [((), 500.0)],
    "gpu_power_limit_target_watts": [((), 450.0)],
    "gpu_power_limit_default_watts": [((), 700.0)],
    "gpu_power_limit_min_watts": [((), 200.0)],
    "gpu_power_limit_max_watts": [((), 700.0)],
    "gpu_temperature_celsius": [(("gpu",), 61.0), (("memory",), 66.0)],
    "gpu_temperature_threshold_celsius": [(("slowdown",), 90.0), (("max_operating",), 87.0)],
    "gpu_utilization_ratio": [((), 0.75)],
    "gpu_memory_utilization_ratio": [((), 0.25)],
    "gpu_memory_used_bytes": [((), 2**30)],
    "gpu_memory_total_bytes": [((), 2**36 - 2**20)],
    "gpu_clock_hertz": [(("sm",), 1.7e9), (("memory",), 2.6e9)],
    "gpu_clock_event_active": [
        (("idle",), 0.0),
        (("sw_power_cap",), 1.0),
        (("hw_slowdown",), 0.0),
        (("sw_thermal",), 0.0),
        (("hw_thermal",), 0.0),
        (("hw_power_brake",), 0.0),
    ],
    "gpu_clock_event_seconds": [(("idle",), 1.0), (("sw_power_cap",), 0.5)],
    "gpu_xid_errors": [(("13",), 2), (("79",), 1)],  # by XID, ascending
    "gpu_process_memory_used_bytes": [(("101",), 2**20)],  # pid 202 reports none: no series
    "gpu_process_utilization_ratio": [(("101",), 0.5)],
}
"""Every GPU row's series (label values beyond gpu and uuid, value) for one fully read GPU."""

ALL_OTEL: dict[str, list[tuple[dict[str, str], float]]] = {
    "hw.status": [
        ({"hw.state": "ok"}, 1),
        ({"hw.state": "degraded"}, 0),
        ({"hw.state": "failed"}, 0),
        ({"hw.state": "predicted_failure"}, 0),
    ],
    "hw.power": [({}, 305.0)],
    "hw.energy": [({}, 12.5)],
    "hw.temperature": [
        ({"hw.sensor_location": "gpu"}, 61.0),
        ({"hw.sensor_location": "memory"}, 66.0),
    ],
    "hw.gpu.utilization": [({"hw.gpu.task": "general"}, 0.75)],
    "hw.gpu.memory.usage": [({}, 2**30)],
    "hw.gpu.memory.limit": [({}, 2**36 - 2**20)],
    "hw.errors": [({"error.type": "13"}, 2), ({"error.type": "79"}, 1)],
}
"""Every OpenTelemetry instrument's points (attributes beyond the GPU's own, value)."""

ALL_JSON = {
    "power_watts": 305.0,
    "power_peak_watts": 320.0,
    "energy_joules": 12.5,
    "power_limit_watts": 500.0,
    "power_limit_target_watts": 450.0,
    "power_limit_default_watts": 700.0,
    "power_limit_min_watts": 200.0,
    "power_limit_max_watts": 700.0,
    "temperature_celsius": 61.0,
    "memory_temperature_celsius": 66.0,
    "temperature_slowdown_celsius": 90.0,
    "temperature_max_operating_celsius": 87.0,
    "utilization_ratio": 0.75,
    "memory_utilization_ratio": 0.25,
    "memory_used_bytes": 2**30,
    "memory_total_bytes": 2**36 - 2**20,
    "clock_sm_hertz": 1.7e9,
    "clock_memory_hertz": 2.6e9,
}


def _otel_points(spec: MetricSpec[GpuView], view: GpuView) -> list[tuple[dict[str, str], float]]:
    assert spec.otel is not None
    return [
        ({**dict(zip(spec.otel.attrs, labels, strict=True)), **dict(spec.otel.const)}, value)
        for labels, value in values(spec.otel.read or spec.read, view)
    ]


def test_every_gpu_row_reads_its_label_values_and_value_from_a_fully_read_gpu() -> None:
    view = _view(READ)
    series = {s.name: list(values(s.read, view)) for s in GPU_METRICS}
    assert series == ALL_SERIES
    for spec in GPU_METRICS:
        assert {len(labels) for labels, _ in series[spec.name]} == {len(spec.labels)}, spec.name


def test_every_otel_instrument_reads_its_attributes_and_value_from_a_fully_read_gpu() -> None:
    view = _view(READ)
    otel = {s.otel.name: _otel_points(s, view) for s in GPU_METRICS if s.otel is not None}
    assert otel == ALL_OTEL


def test_every_json_key_reads_its_value_from_a_fully_read_gpu() -> None:
    view = _view(READ)
    state = {k: v for s in GPU_METRICS for k, v in json_values(s, view)}
    assert state == ALL_JSON


@pytest.mark.parametrize(
    ("reading", "up", "limit"),
    [
        (READ, True, 2**36 - 2**20),
        (READ, False, 2**36 - 2**20),
        (EMPTY, True, 2**36),
        (None, True, 2**36),
        (None, False, 2**36),
    ],
    ids=["read", "lost", "unsupported", "never-read", "lost-before-a-read"],
)
def test_otel_memory_limit_is_the_read_size_else_the_identitys_even_for_a_lost_gpu(
    reading: GpuReading | None, up: bool, limit: int
) -> None:
    (spec,) = (
        s for s in GPU_METRICS if s.otel is not None and s.otel.name == "hw.gpu.memory.limit"
    )
    assert _otel_points(spec, _view(reading, up)) == [({}, limit)]


def test_a_lost_gpu_reports_failed_keeps_its_counters_and_drops_its_stale_reading() -> None:
    view = _view(READ, up=False)
    series = {s.name: list(values(s.read, view)) for s in GPU_METRICS}
    assert {name: v for name, v in series.items() if v} == {
        "gpu_up": [((), 0.0)],
        "gpu_info": ALL_SERIES["gpu_info"],
        "gpu_energy_joules": [((), 12.5)],
        "gpu_power_limit_default_watts": [((), 700.0)],
        "gpu_power_limit_min_watts": [((), 200.0)],
        "gpu_power_limit_max_watts": [((), 700.0)],
        "gpu_temperature_threshold_celsius": ALL_SERIES["gpu_temperature_threshold_celsius"],
        "gpu_clock_event_seconds": ALL_SERIES["gpu_clock_event_seconds"],
        "gpu_xid_errors": ALL_SERIES["gpu_xid_errors"],
    }
    (status,) = (s for s in GPU_METRICS if s.otel is not None and s.otel.name == "hw.status")
    assert [v for _, v in _otel_points(status, view)] == [0, 0, 1, 0]  # ok degraded failed pf


# ------------------------------------------------------------------------ the helpers of a row
def test_live_reads_give_an_up_gpus_view_and_reading_and_nothing_for_a_lost_or_unread_one() -> None:
    # The table's rows make their reads once, at import; these make them afresh, as a new row does.
    live = _live(lambda v, r: (((v.sample.info.uuid,), r.power_limit_w),))
    reading = _reading(lambda r: r.utilization_gpu_ratio)
    assert list(live(_view(READ))) == [(("GPU-x",), 500.0)]
    assert list(reading(_view(READ))) == [((), 0.75)]
    for view in (_view(READ, up=False), _view(None), _view(None, up=False)):
        assert list(live(view)) == []
        assert list(reading(view)) == []


def test_one_reads_a_single_series_from_the_subject() -> None:
    def energy(view: GpuView) -> float:
        return view.sample.energy_j

    assert list(one(energy)(_view(None, up=False))) == [((), 12.5)]
    assert list(one(lambda _v: None)(_view(READ))) == [((), None)]


def test_values_skip_missing_and_nan_values_and_keep_zero() -> None:
    series = [(("a",), 1.5), (("b",), None), (("c",), math.nan), (("d",), 0.0), (("e",), -1.0)]
    assert list(values(lambda _s: series, None)) == [(("a",), 1.5), (("d",), 0.0), (("e",), -1.0)]


def test_json_values_give_each_key_its_value_or_none_where_missing() -> None:
    def read(_s: object) -> list[tuple[tuple[str, ...], float | None]]:
        return [((), 4.0), (("x",), 1.0), (("y",), math.nan)]

    single: MetricSpec[object] = MetricSpec("m", "gauge", "h", read, json="m_key")
    keyed: MetricSpec[object] = MetricSpec(
        "k", "gauge", "h", read, json={("y",): "y_key", ("x",): "x_key", ("z",): "z_key"}
    )
    unkeyed: MetricSpec[object] = MetricSpec("u", "gauge", "h", read)
    assert list(json_values(single, None)) == [("m_key", 4.0)]
    assert list(json_values(keyed, None)) == [("y_key", None), ("x_key", 1.0), ("z_key", None)]
    assert list(json_values(unkeyed, None)) == []
    missing: MetricSpec[object] = MetricSpec(
        "n", "gauge", "h", lambda _s: [((), None)], json="n_key"
    )
    assert list(json_values(missing, None)) == [("n_key", None)]


@pytest.mark.parametrize(
    ("mask", "up", "state"),
    [
        (0, True, "ok"),
        (None, True, "ok"),
        (ClockEvent.IDLE | ClockEvent.SW_POWER_CAP, True, "ok"),
        (ClockEvent.HW_SLOWDOWN, True, "degraded"),
        (ClockEvent.SW_THERMAL, True, "degraded"),
        (ClockEvent.HW_THERMAL, True, "degraded"),
        (ClockEvent.HW_POWER_BRAKE, True, "degraded"),
        (ClockEvent.IDLE | ClockEvent.HW_THERMAL, True, "degraded"),
        (0, False, "failed"),
        (ClockEvent.HW_THERMAL, False, "failed"),
    ],
)
def test_gpu_state_is_failed_when_lost_degraded_when_slowed_by_hardware_or_heat_else_ok(
    mask: int | None, up: bool, state: str
) -> None:
    assert gpu_state(_view(replace(READ, clock_event_mask=mask), up).sample) == state


def test_gpu_state_of_a_gpu_never_read_is_ok_and_failed_once_lost() -> None:
    assert (gpu_state(_view(None).sample), gpu_state(_view(None, up=False).sample)) == (
        "ok",
        "failed",
    )
