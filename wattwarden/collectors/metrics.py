"""Metrics are data: each metric is declared once, as a :class:`MetricSpec` row of a table.

A row names the metric (Prometheus name, kind, help, labels), says how to read its series from a
subject (a GPU's view, a host sample ...) and, where it has one, its OpenTelemetry instrument and
its key in the JSON state. The Prometheus collector, the OTLP instruments and the JSON state
iterate the tables; nothing else lists metric names. :func:`values` is the one place where a
missing (None) or NaN value is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from wattwarden.hardware.device import CLOCK_EVENT_LABELS, ClockEvent, GpuReading

if TYPE_CHECKING:  # hints only, so that the store and samples may import this module
    from wattwarden.collectors.samples import GpuSample
    from wattwarden.collectors.store import GpuView

S = TypeVar("S")

LabelValues = tuple[str, ...]
Series = Iterable[tuple[LabelValues, float | None]]
"""What a row reads: label values (beyond the subject's own) and a value, None where missing."""


@dataclass(frozen=True, slots=True)
class OtelSpec(Generic[S]):
    """A row's OpenTelemetry instrument (hw.* semantic conventions)."""

    name: str
    kind: Literal["gauge", "counter", "updowncounter"]
    unit: str
    description: str
    attrs: tuple[str, ...] = ()
    """The attribute name for each of the row's label values, in order."""
    const: tuple[tuple[str, str], ...] = ()
    """Attributes every point of this instrument carries (e.g. ``hw.gpu.task="general"``)."""
    read: Callable[[S], Series] | None = None
    """Where the instrument's series differ from the Prometheus ones; None: the row's ``read``."""


@dataclass(frozen=True, slots=True)
class MetricSpec(Generic[S]):
    """One metric: what Prometheus, OpenTelemetry and the JSON state call it, and how to read it."""

    name: str
    """Prometheus name; a counter's without its ``_total`` suffix."""
    kind: Literal["gauge", "counter"]
    help: str
    read: Callable[[S], Series]
    labels: tuple[str, ...] = ()
    """Labels beyond the subject's own (GPU rows get ``gpu`` and ``uuid`` first)."""
    otel: OtelSpec[S] | None = None
    json: str | Mapping[LabelValues, str] | None = None
    """Key(s) in the subject's JSON object: one key for a single-series row, else a key per
    label values; the value is ``null`` where the series is missing."""


def one(fn: Callable[[S], float | None]) -> Callable[[S], Series]:
    """The read of a single-series row (no labels of its own) from a function of the subject."""

    def read(subject: S) -> Series:
        return (((), fn(subject)),)

    return read


def values(read: Callable[[S], Series], subject: S) -> Iterator[tuple[LabelValues, float]]:
    """The series a read gives for one subject, without missing (None) or NaN values."""
    for labels, value in read(subject):
        if value is not None and not math.isnan(value):
            yield labels, value


def json_values(spec: MetricSpec[S], subject: S) -> Iterator[tuple[str, float | None]]:
    """A row's JSON key(s) and value(s) for one subject (None where the series is missing)."""
    if spec.json is None:
        return
    found = dict(values(spec.read, subject))
    if isinstance(spec.json, str):
        yield spec.json, found.get(())
    else:
        for labels, key in spec.json.items():
            yield key, found.get(labels)


# ------------------------------------------------------------------------------------ GPU table
HW_STATES = ("ok", "degraded", "failed", "predicted_failure")
"""The ``hw.state`` values of the OpenTelemetry ``hw.status`` instrument, in export order."""
_DEGRADED_EVENTS = (
    ClockEvent.HW_SLOWDOWN
    | ClockEvent.SW_THERMAL
    | ClockEvent.HW_THERMAL
    | ClockEvent.HW_POWER_BRAKE
)


def gpu_state(s: GpuSample) -> str:
    """The ``hw.state`` of a GPU: failed (lost), degraded (slowed by hardware/heat), else ok."""
    if not s.up:
        return "failed"
    mask = s.reading.clock_event_mask if s.reading is not None else None
    if mask and mask & _DEGRADED_EVENTS:
        return "degraded"
    return "ok"


def _live(fn: Callable[[GpuView, GpuReading], Series]) -> Callable[[GpuView], Series]:
    """A read of a reachable GPU's current values: a lost GPU's (stale) reading gives nothing."""

    def read(view: GpuView) -> Series:
        r = view.sample.reading
        if r is None or not view.sample.up:
            return ()
        return fn(view, r)

    return read


def _reading(fn: Callable[[GpuReading], float | None]) -> Callable[[GpuView], Series]:
    """A single series read from a reachable GPU's reading."""
    return _live(lambda _view, r: (((), fn(r)),))


def _status(view: GpuView) -> Series:
    state = gpu_state(view.sample)
    return (((s,), 1 if s == state else 0) for s in HW_STATES)


def _memory_limit(view: GpuView) -> Series:
    r = view.sample.reading
    total = r.memory_total_bytes if r is not None else None
    return (((), view.sample.info.memory_total_bytes if total is None else total),)


def _clock_events_active(_view: GpuView, r: GpuReading) -> Series:
    mask = r.clock_event_mask
    if mask is None:
        return ()
    return (((label,), 1.0 if mask & bit else 0.0) for bit, label in CLOCK_EVENT_LABELS)


def _thresholds(view: GpuView) -> Series:
    # from the identity: a lost GPU keeps them, like its limit bounds
    info = view.sample.info
    return (
        (("slowdown",), info.temperature_slowdown_c),
        (("max_operating",), info.temperature_max_operating_c),
    )


GPU_METRICS: tuple[MetricSpec[GpuView], ...] = (
    MetricSpec(
        "gpu_up",
        "gauge",
        "1 if the GPU answers, 0 if it is lost (fell off the bus).",
        one(lambda v: 1.0 if v.sample.up else 0.0),
        otel=OtelSpec(
            "hw.status",
            "updowncounter",
            "1",
            "Operational status: 1 for the GPU's current hw.state, 0 for the others.",
            attrs=("hw.state",),
            read=_status,
        ),
    ),
    MetricSpec(
        "gpu_info",
        "gauge",
        "GPU identity; always 1.",
        lambda v: (
            ((v.sample.info.name, v.sample.info.pci_bus_id, v.sample.info.driver_version), 1.0),
        ),
        labels=("name", "pci_bus_id", "driver_version"),
    ),
    MetricSpec(
        "gpu_power_watts",
        "gauge",
        "Mean power over the export window (sub-second samples).",
        _live(lambda v, _r: (((), v.power_mean_w),)),
        otel=OtelSpec(
            "hw.power",
            "gauge",
            "W",
            "Power drawn by the GPU (mean over the agent's export window).",
        ),
        json="power_watts",
    ),
    MetricSpec(
        "gpu_power_peak_watts",
        "gauge",
        "Peak power over the export window.",
        _live(lambda v, _r: (((), v.power_peak_w),)),
        json="power_peak_watts",
    ),
    MetricSpec(
        "gpu_energy_joules",
        "counter",
        "Energy used by the GPU (hardware counter where supported, else integrated power).",
        one(lambda v: v.sample.energy_j),
        otel=OtelSpec("hw.energy", "counter", "J", "Energy consumed by the GPU."),
        json="energy_joules",
    ),
    MetricSpec(
        "gpu_power_limit_watts",
        "gauge",
        "Enforced power limit.",
        _reading(lambda r: r.power_limit_w),
        json="power_limit_watts",
    ),
    MetricSpec(
        "gpu_power_limit_target_watts",
        "gauge",
        "Power limit the policy engine wants (also in dry-run, where it is not set).",
        # a lost GPU wants nothing: the engine holds it
        one(lambda v: v.power_limit_target_w if v.sample.up else None),
        json="power_limit_target_watts",
    ),
    MetricSpec(
        "gpu_power_limit_default_watts",
        "gauge",
        "Default power limit.",
        one(lambda v: v.sample.info.power_limit_default_w),
        json="power_limit_default_watts",
    ),
    MetricSpec(
        "gpu_power_limit_min_watts",
        "gauge",
        "Lowest settable power limit.",
        one(lambda v: v.sample.info.power_limit_min_w),
        json="power_limit_min_watts",
    ),
    MetricSpec(
        "gpu_power_limit_max_watts",
        "gauge",
        "Highest settable power limit.",
        one(lambda v: v.sample.info.power_limit_max_w),
        json="power_limit_max_watts",
    ),
    MetricSpec(
        "gpu_temperature_celsius",
        "gauge",
        "Temperature.",
        _live(
            lambda _v, r: ((("gpu",), r.temperature_gpu_c), (("memory",), r.temperature_memory_c))
        ),
        labels=("sensor",),
        otel=OtelSpec(
            "hw.temperature",
            "gauge",
            "Cel",
            "Temperature of a GPU sensor.",
            attrs=("hw.sensor_location",),
        ),
        json={("gpu",): "temperature_celsius", ("memory",): "memory_temperature_celsius"},
    ),
    MetricSpec(
        "gpu_temperature_threshold_celsius",
        "gauge",
        "Temperature threshold: slowdown (the hardware halves clocks), max_operating (software "
        "thermal slowdown starts).",
        _thresholds,
        labels=("threshold",),
        json={
            ("slowdown",): "temperature_slowdown_celsius",
            ("max_operating",): "temperature_max_operating_celsius",
        },
    ),
    MetricSpec(
        "gpu_utilization_ratio",
        "gauge",
        "Fraction of time a kernel ran.",
        _reading(lambda r: r.utilization_gpu_ratio),
        otel=OtelSpec(
            "hw.gpu.utilization",
            "gauge",
            "1",
            "Fraction of time the GPU ran a kernel.",
            const=(("hw.gpu.task", "general"),),
        ),
        json="utilization_ratio",
    ),
    MetricSpec(
        "gpu_memory_utilization_ratio",
        "gauge",
        "Fraction of time device memory was read or written.",
        _reading(lambda r: r.utilization_memory_ratio),
        json="memory_utilization_ratio",
    ),
    MetricSpec(
        "gpu_memory_used_bytes",
        "gauge",
        "Device memory in use.",
        _reading(lambda r: r.memory_used_bytes),
        otel=OtelSpec("hw.gpu.memory.usage", "updowncounter", "By", "GPU memory used."),
        json="memory_used_bytes",
    ),
    MetricSpec(
        "gpu_memory_total_bytes",
        "gauge",
        "Device memory in total.",
        _reading(lambda r: r.memory_total_bytes),
        # the size does not change: OpenTelemetry keeps it for a lost GPU, from its identity
        otel=OtelSpec(
            "hw.gpu.memory.limit",
            "updowncounter",
            "By",
            "Size of the GPU memory.",
            read=_memory_limit,
        ),
        json="memory_total_bytes",
    ),
    MetricSpec(
        "gpu_clock_hertz",
        "gauge",
        "Current clock.",
        _live(lambda _v, r: ((("sm",), r.clock_sm_hz), (("memory",), r.clock_memory_hz))),
        labels=("clock",),
        json={("sm",): "clock_sm_hertz", ("memory",): "clock_memory_hertz"},
    ),
    MetricSpec(
        "gpu_clock_event_active",
        "gauge",
        "1 while the clock-event (throttle) reason is active.",
        _live(_clock_events_active),
        labels=("reason",),
    ),
    MetricSpec(
        "gpu_clock_event_seconds",
        "counter",
        "Time the clock-event (throttle) reason was active.",
        lambda v: (((label,), s) for label, s in v.sample.clock_event_seconds.items()),
        labels=("reason",),
    ),
    MetricSpec(
        "gpu_xid_errors",
        "counter",
        "XID errors reported.",
        lambda v: (((str(xid),), n) for xid, n in sorted(v.sample.xid_counts.items())),
        labels=("xid",),
        otel=OtelSpec(
            "hw.errors",
            "counter",
            "{error}",
            "XID errors the driver reported for the GPU (error.type is the XID).",
            attrs=("error.type",),
        ),
    ),
    MetricSpec(
        "gpu_process_memory_used_bytes",
        "gauge",
        "Device memory used by a process.",
        _live(lambda _v, r: (((str(p.pid),), p.memory_used_bytes) for p in r.processes)),
        labels=("pid",),
    ),
    MetricSpec(
        "gpu_process_utilization_ratio",
        "gauge",
        "SM utilization of a process.",
        _live(lambda _v, r: (((str(p.pid),), p.sm_utilization_ratio) for p in r.processes)),
        labels=("pid",),
    ),
)
"""Every GPU metric. A GPU's own labels (``gpu``, ``uuid``) come first, then the row's."""
