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
from typing import Generic, Literal, TypeVar

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
