"""The collector protocol: one module per source, each reporting its own health."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from wattwarden.collectors.samples import Sample


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
