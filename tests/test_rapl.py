"""RAPL through powercap sysfs: fixture trees, wrap-around, and permission denied."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import parse_metrics

from wattwarden.collectors.errors import CollectorUnavailable
from wattwarden.collectors.rapl import RaplCollector
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.prometheus import StoreCollector, make_registry, render
from wattwarden.hardware.sim import ManualClock


def make_zone(
    root: Path, zone: str, name: str, energy_uj: int, range_uj: int, kind: str = "intel-rapl"
) -> Path:
    path = root / f"{kind}:{zone}"
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return path / "energy_uj"


def test_domains_are_named_after_their_package(tmp_path: Path) -> None:
    make_zone(tmp_path, "0", "package-0", 0, 2**32)
    make_zone(tmp_path, "0:0", "core", 0, 2**32)
    make_zone(tmp_path, "0:1", "dram", 0, 2**32)
    make_zone(tmp_path, "1", "package-1", 0, 2**32)
    assert RaplCollector(tmp_path).domains == [
        "package-0", "package-0/core", "package-0/dram", "package-1"
    ]  # fmt: skip


def test_an_mmio_zone_mirroring_a_package_is_not_counted_twice(tmp_path: Path) -> None:
    # intel-rapl-mmio:0 is the same package-0 energy read through MMIO instead of the MSR
    package = make_zone(tmp_path, "0", "package-0", 7_000_000, 262_143_328_850)
    mmio = make_zone(tmp_path, "0", "package-0", 7_000_000, 262_143_328_850, "intel-rapl-mmio")
    clock = ManualClock()
    rapl = RaplCollector(tmp_path, monotonic=clock)
    assert rapl.domains == ["package-0"]
    rapl.collect()
    clock.advance(2.0)
    for counter in (package, mmio):
        counter.write_text(f"{7_000_000 + 150_000_000}\n")  # 150 J over 2 s
    samples = rapl.collect()
    assert sum(s.energy_j for s in samples) == pytest.approx(150.0, rel=1e-12)
    assert sum(s.power_w or 0.0 for s in samples) == pytest.approx(75.0, rel=1e-12)


def test_energy_and_power_from_counter_deltas(tmp_path: Path) -> None:
    energy = make_zone(tmp_path, "0", "package-0", 5_000_000, 262_143_328_850)
    clock = ManualClock()
    rapl = RaplCollector(tmp_path, monotonic=clock)
    first = rapl.collect()[0]
    assert first.energy_j == 0.0 and first.power_w is None
    clock.advance(2.0)
    energy.write_text(f"{5_000_000 + 180_000_000}\n")
    second = rapl.collect()[0]
    assert second.energy_j == pytest.approx(180.0)
    assert second.power_w == pytest.approx(90.0)


def test_counter_wrap_around_is_added_back(tmp_path: Path) -> None:
    range_uj = 262_143_328_850
    energy = make_zone(tmp_path, "0", "package-0", range_uj - 1_000_000, range_uj)
    clock = ManualClock()
    rapl = RaplCollector(tmp_path, monotonic=clock)
    rapl.collect()
    clock.advance(1.0)
    energy.write_text("4000000\n")  # wrapped: 1 J before the top, 4 J after
    sample = rapl.collect()[0]
    assert sample.energy_j == pytest.approx(5.0)
    assert sample.power_w == pytest.approx(5.0)


def test_no_powercap_tree_means_no_rapl(tmp_path: Path) -> None:
    assert not RaplCollector(tmp_path / "missing").available()


def test_unreadable_energy_is_reported_once_and_collector_down_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_zone(tmp_path, "0", "package-0", 1, 2**32)

    def read_text(path: Path) -> str:
        if path.name == "energy_uj":  # root-only since Linux 5.10 (we run tests as any user)
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_text()

    rapl = RaplCollector(tmp_path, read_text=read_text)
    with pytest.raises(CollectorUnavailable, match="root-only"):
        rapl.collect()
    store = MetricStore()
    sampler = Sampler(store, [rapl])
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            sampler.run_once()
    assert sum("energy_uj" in r.getMessage() for r in caplog.records) == 1
    health = store.snapshot().collectors["rapl"]
    assert not health.up
    metrics = parse_metrics(render(make_registry(StoreCollector(store, backend="sim")))[0].decode())
    assert metrics["wattwarden_collector_up"] == [({"collector": "rapl"}, 0.0)]
    assert "host_energy_joules_total" not in metrics
