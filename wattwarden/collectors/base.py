"""The collector protocol and its registration: one module per source, each reporting its health.

A collector module holds its sample type, its :class:`Collector` and its metric rows, and ends
with one :class:`Registration`; :mod:`wattwarden.collectors.registry` lists the registrations.
The store keeps the latest sample per (sample type, :attr:`Sample.key`) and the exporters iterate
each registration's metric rows, so neither names a collector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from wattwarden.collectors.metrics import MetricSpec


class Sample(Protocol):
    """What a collector yields."""

    @property
    def key(self) -> str:
        """Which series of its collector the sample is (e.g. a RAPL domain); ``""`` if only one.

        The store keeps the latest sample of each type and key.
        """
        ...


class Collector(Protocol):
    """A source of samples. ``collect`` may raise; the sampler counts it and carries on."""

    name: str
    """Label value for ``wattwarden_collector_*{collector=...}``."""
    interval_s: float | None
    """Minimum seconds between collections; None means every sampler tick."""

    def collect(self) -> Sequence[Sample]:
        """Read the source once."""
        ...

    def close(self) -> None:
        """Release what the collector holds."""
        ...


class CollectorSettings(Protocol):
    """The agent's settings a collector factory may read (the agent's config satisfies it)."""

    @property
    def rapl_root(self) -> Path:
        """The powercap sysfs root RAPL zones are found under."""
        ...


S = TypeVar("S", bound=Sample)


@dataclass(frozen=True, slots=True)
class Registration(Generic[S]):
    """How the agent opens one collector and how its samples are exported.

    ``factory`` raises :class:`~wattwarden.collectors.errors.CollectorUnavailable` with a
    one-line reason when the source is absent on this machine; the agent logs the reason and
    runs without it.
    """

    name: str
    default_enabled: bool
    factory: Callable[[CollectorSettings], Collector]
    sample_type: type[S]
    metrics: tuple[MetricSpec[S], ...]
    """Rows read from each of the collector's latest samples (subject: one sample)."""


AnyRegistration = Registration[Any]
