"""The collector registry: a collector is one module and one registration line."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import parse_metrics
from test_rapl import make_zone

from wattwarden.agent import Agent
from wattwarden.api.state import state_json
from wattwarden.collectors.base import CollectorSettings, Registration
from wattwarden.collectors.errors import CollectorUnavailable
from wattwarden.collectors.host import HostSample
from wattwarden.collectors.metrics import MetricSpec
from wattwarden.collectors.rapl import RaplSample
from wattwarden.collectors.registry import REGISTRATIONS, open_collectors
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.config import AgentConfig
from wattwarden.exporters.prometheus import StoreCollector, make_registry, render
from wattwarden.hardware.sim.fake_nvml import uninstall_fake_nvml


@dataclass(frozen=True)
class Settings:
    rapl_root: Path


# ---- a whole new collector, as its own module would hold it ----------------------------------
@dataclass(frozen=True, slots=True)
class FanSample:
    fan: str
    rpm: float | None

    @property
    def key(self) -> str:
        return self.fan


class FanCollector:
    name = "fan"
    interval_s: float | None = None

    def collect(self) -> Sequence[FanSample]:
        return [FanSample("front", 1200.0), FanSample("back", None)]

    def close(self) -> None:
        pass


FAN_METRICS: tuple[MetricSpec[FanSample], ...] = (
    MetricSpec("fan_speed_rpm", "gauge", "Fan speed.", lambda f: (((f.fan,), f.rpm),), ("fan",)),
)


def _open_fan(settings: CollectorSettings) -> FanCollector:
    return FanCollector()


FAN = Registration("fan", False, _open_fan, FanSample, FAN_METRICS)
# -----------------------------------------------------------------------------------------------


def test_host_and_rapl_open_in_registration_order_where_rapl_zones_exist(tmp_path: Path) -> None:
    make_zone(tmp_path, "0", "package-0", 0, 2**32)
    opened = open_collectors(Settings(tmp_path))
    assert [c.name for c in opened.collectors] == ["host", "rapl"]
    assert opened.absent == []


def test_a_machine_without_rapl_runs_without_it_and_says_why_in_one_line(tmp_path: Path) -> None:
    opened = open_collectors(Settings(tmp_path / "missing"))
    assert [c.name for c in opened.collectors] == ["host"]
    assert opened.absent == [
        f"RAPL: no zones under {tmp_path / 'missing'}; host CPU energy is not collected"
    ]


def test_the_agent_logs_why_rapl_is_absent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "missing"
    cfg = AgentConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state", sim=1, rapl_root=missing)
    with caplog.at_level(logging.INFO, logger="wattwarden.agent"):
        agent = Agent(cfg)
    try:
        assert [c.name for c in agent.sampler.collectors] == ["gpu", "host"]
    finally:
        agent.close()
        uninstall_fake_nvml()
    said = [r.getMessage() for r in caplog.records if r.name == "wattwarden.agent"]
    assert [m for m in said if "RAPL" in m] == [
        f"RAPL: no zones under {missing}; host CPU energy is not collected"
    ]


def test_only_the_named_collectors_open_when_names_are_given(tmp_path: Path) -> None:
    make_zone(tmp_path, "0", "package-0", 0, 2**32)
    registrations = (*REGISTRATIONS, FAN)
    by_default = open_collectors(Settings(tmp_path), registrations=registrations)
    assert [c.name for c in by_default.collectors] == ["host", "rapl"]  # fan is off by default
    named = open_collectors(
        Settings(tmp_path), enabled={"fan", "rapl"}, registrations=registrations
    )
    assert [c.name for c in named.collectors] == ["rapl", "fan"]


def test_each_registration_is_named_as_its_collector_and_declares_distinct_metrics(
    tmp_path: Path,
) -> None:
    make_zone(tmp_path, "0", "package-0", 0, 2**32)
    opened = open_collectors(Settings(tmp_path))
    assert [c.name for c in opened.collectors] == [r.name for r in REGISTRATIONS]
    names = [spec.name for r in REGISTRATIONS for spec in r.metrics]
    assert len(names) == len(set(names)) > 0


def test_a_factory_that_finds_no_source_is_left_out_not_raised(tmp_path: Path) -> None:
    def absent(settings: CollectorSettings) -> FanCollector:
        raise CollectorUnavailable("fans: no hwmon fan inputs; fan speeds are not collected")

    gone = Registration("fan", True, absent, FanSample, FAN_METRICS)
    opened = open_collectors(Settings(tmp_path), registrations=(gone,))
    assert (opened.collectors, opened.absent) == (
        [],
        ["fans: no hwmon fan inputs; fan speeds are not collected"],
    )


def test_a_collector_added_by_its_registration_alone_is_sampled_stored_and_exported(
    tmp_path: Path,
) -> None:
    opened = open_collectors(Settings(tmp_path), enabled={"fan"}, registrations=(FAN,))
    store = MetricStore()
    Sampler(store, opened.collectors).run_once()
    collector = StoreCollector(store, backend="sim", registrations=(*REGISTRATIONS, FAN))
    text = render(make_registry(collector))[0].decode()
    metrics = parse_metrics(text)
    assert metrics["fan_speed_rpm"] == [({"fan": "front"}, 1200.0)]  # back's None is skipped
    assert metrics["wattwarden_collector_up"] == [({"collector": "fan"}, 1.0)]
    assert "# HELP fan_speed_rpm Fan speed." in text
    assert "host_" not in text  # a collector without samples has no families, not empty ones


def test_the_json_state_shows_host_and_rapl_samples_as_before() -> None:
    store = MetricStore()
    empty = state_json(store.snapshot(), backend="sim", node="n", mode="dry_run")
    assert (empty["host"], empty["rapl"]) == (None, [])
    store.put(
        [
            HostSample(1.0, 0.375, 6 * 2**30, 64 * 2**30),
            RaplSample(1.0, "package-0", 812.5, 95.25),
            RaplSample(1.0, "package-0/dram", 40.5, None),
        ]
    )
    state = state_json(store.snapshot(), backend="sim", node="n", mode="dry_run")
    assert state["host"] == {
        "cpu_utilization_ratio": 0.375,
        "memory_used_bytes": 6 * 2**30,
        "memory_total_bytes": 64 * 2**30,
    }
    assert list(state["host"]) == [
        "cpu_utilization_ratio",
        "memory_used_bytes",
        "memory_total_bytes",
    ]
    assert state["rapl"] == [
        {"domain": "package-0", "energy_joules": 812.5, "power_watts": 95.25},
        {"domain": "package-0/dram", "energy_joules": 40.5, "power_watts": None},
    ]
