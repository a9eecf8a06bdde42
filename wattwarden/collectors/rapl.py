"""CPU package/DRAM energy from RAPL through the Linux powercap sysfs tree.

``energy_uj`` counts up to ``max_energy_range_uj`` and wraps to zero; the collector adds the range
back when it sees a wrap. Since Linux 5.10 (CVE-2020-8694, "PLATYPUS") ``energy_uj`` is readable by
root only on most distributions: then the collector says so once and reports itself down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wattwarden.collectors.base import CollectorSettings, Registration
from wattwarden.collectors.errors import CollectorUnavailable
from wattwarden.collectors.metrics import MetricSpec

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/powercap")
_ZONE_PREFIX = "intel-rapl:"


@dataclass(frozen=True, slots=True)
class RaplSample:
    """One RAPL power-capping domain (package, core, uncore, dram, psys)."""

    timestamp_s: float
    domain: str
    energy_j: float
    """Monotonic since the agent started (wrap-arounds of the hardware counter handled)."""
    power_w: float | None
    """Mean power since the previous sample."""

    @property
    def key(self) -> str:
        """One sample per domain."""
        return self.domain


@dataclass(slots=True)
class _Zone:
    domain: str
    energy_path: Path
    range_uj: int
    last_uj: int | None = None
    last_mono_s: float | None = None
    total_j: float = 0.0


def _read_text(path: Path) -> str:
    return path.read_text()


class RaplCollector:
    """Energy counters of every RAPL zone under a powercap root (injectable for tests)."""

    name = "rapl"

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        *,
        interval_s: float = 1.0,
        read_text: Callable[[Path], str] = _read_text,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.interval_s: float | None = interval_s
        self._read = read_text
        self._monotonic = monotonic
        self._wall = wall
        self._zones = self._discover(root)

    @property
    def domains(self) -> list[str]:
        """Domain labels found, e.g. ``package-0``, ``package-0/dram``."""
        return [z.domain for z in self._zones]

    def _discover(self, root: Path) -> list[_Zone]:
        zones: list[_Zone] = []
        if not root.is_dir():
            return zones
        for path in sorted(root.glob(f"{_ZONE_PREFIX}*")):
            parts = path.name[len(_ZONE_PREFIX) :].split(":")
            if not (path / "energy_uj").exists():
                continue
            try:
                name = self._read(path / "name").strip()
                range_uj = int(self._read(path / "max_energy_range_uj").strip())
            except (OSError, ValueError) as e:
                log.warning("RAPL zone %s skipped: %s", path, e)
                continue
            if len(parts) > 1:
                parent = root / f"{_ZONE_PREFIX}{parts[0]}" / "name"
                try:
                    name = f"{self._read(parent).strip()}/{name}"
                except OSError:
                    name = f"{parts[0]}/{name}"
            zones.append(_Zone(domain=name, energy_path=path / "energy_uj", range_uj=range_uj))
        return zones

    def available(self) -> bool:
        """Whether any RAPL zone exists on this machine."""
        return bool(self._zones)

    def collect(self) -> Sequence[RaplSample]:
        """Read each zone; counters are monotonic across hardware wrap-arounds."""
        samples = []
        for zone in self._zones:
            try:
                uj = int(self._read(zone.energy_path).strip())
            except PermissionError as e:
                raise CollectorUnavailable(
                    f"cannot read {zone.energy_path} ({e.strerror}): RAPL energy is root-only on "
                    "kernels since 5.10; run the agent as root or grant read access to energy_uj "
                    "(e.g. a udev rule); host_energy_joules_total is omitted until then"
                ) from e
            now = self._monotonic()
            power = None
            if zone.last_uj is not None and zone.last_mono_s is not None:
                delta = uj - zone.last_uj
                if delta < 0:  # the counter wrapped at max_energy_range_uj
                    delta += zone.range_uj
                zone.total_j += delta / 1e6
                dt = now - zone.last_mono_s
                power = delta / 1e6 / dt if dt > 0 else None
            zone.last_uj, zone.last_mono_s = uj, now
            samples.append(RaplSample(self._wall(), zone.domain, zone.total_j, power))
        return samples

    def close(self) -> None:
        """Nothing to release."""


RAPL_METRICS: tuple[MetricSpec[RaplSample], ...] = (
    MetricSpec(
        "host_energy_joules",
        "counter",
        "CPU/DRAM energy from RAPL.",
        lambda r: (((r.domain,), r.energy_j),),
        labels=("domain",),
    ),
    MetricSpec(
        "host_power_watts",
        "gauge",
        "CPU/DRAM power from RAPL.",
        lambda r: (((r.domain,), r.power_w),),
        labels=("domain",),
    ),
)


def _open(settings: CollectorSettings) -> RaplCollector:
    rapl = RaplCollector(settings.rapl_root)
    if not rapl.available():
        raise CollectorUnavailable(
            f"RAPL: no zones under {settings.rapl_root}; host CPU energy is not collected"
        )
    return rapl


REGISTRATION = Registration("rapl", True, _open, RaplSample, RAPL_METRICS)
