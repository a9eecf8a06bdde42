"""The Prometheus exposition: contract names and labels, windowed power, no NVML at scrape time."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator

import pytest
from conftest import FakeNvml
from helpers import parse_metrics, require_binary

from wattwarden.api.state import state_json
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.host import HostCollector
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.prometheus import StoreCollector, make_registry, render
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim.gpu import SimProcess

CONTRACT_GPU_METRICS = {
    "gpu_up", "gpu_info", "gpu_power_watts", "gpu_power_peak_watts", "gpu_energy_joules_total",
    "gpu_power_limit_watts", "gpu_power_limit_default_watts", "gpu_power_limit_min_watts",
    "gpu_power_limit_max_watts", "gpu_temperature_celsius", "gpu_utilization_ratio",
    "gpu_memory_utilization_ratio", "gpu_memory_used_bytes", "gpu_memory_total_bytes",
    "gpu_clock_hertz", "gpu_clock_event_active", "gpu_clock_event_seconds_total",
}  # fmt: skip


class Rig:
    def __init__(self, fake: FakeNvml, window_s: float = 15.0) -> None:
        self.fake = fake
        self.store = MetricStore(window_s=window_s, interval_s=0.1, monotonic=fake.clock)
        self.collector = GpuCollector(NvmlBackend(), monotonic=fake.clock)
        self.sampler = Sampler(self.store, [self.collector, HostCollector()], monotonic=fake.clock)
        self.registry = make_registry(StoreCollector(self.store, backend="sim"))

    def sample(self, seconds: float, step_s: float = 0.1) -> None:
        for _ in range(round(seconds / step_s)):
            self.fake.clock.advance(step_s)
            self.sampler.run_once()

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        body, _ = render(self.registry)
        return parse_metrics(body.decode())


@pytest.fixture
def rig(fake_nvml: FakeNvml) -> Iterator[Rig]:
    r = Rig(fake_nvml)
    try:
        yield r
    finally:
        r.sampler.close()


def test_every_contract_metric_is_exported_with_gpu_and_uuid_labels_and_no_nan(rig: Rig) -> None:
    for i, gpu in enumerate(rig.fake.fleet.gpus):
        gpu.set_load(i / 7)
    rig.fake.fleet[4].inject("xid", xid=48)
    rig.sample(2.0)
    metrics = rig.metrics()
    assert CONTRACT_GPU_METRICS | {"gpu_xid_errors_total"} <= set(metrics)
    for name, series in metrics.items():
        for labels, value in series:
            assert not math.isnan(value), name
            if name.startswith("gpu_"):
                assert {"gpu", "uuid"} <= set(labels), name
    assert len(metrics["gpu_power_watts"]) == 8
    reasons = {lab["reason"] for lab, _ in metrics["gpu_clock_event_active"]}
    assert reasons == {"idle", "sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal",
                       "hw_power_brake"}  # fmt: skip
    assert [v for lab, v in metrics["gpu_xid_errors_total"] if lab["gpu"] == "4"] == [1.0]
    for name in (
        "wattwarden_build_info",
        "wattwarden_collector_up",
        "wattwarden_last_sample_timestamp_seconds",
        "host_cpu_utilization_ratio",
    ):
        assert name in metrics


def test_power_is_the_window_mean_and_peak_so_a_spike_between_scrapes_is_kept(
    fake_nvml: FakeNvml,
) -> None:
    rig = Rig(fake_nvml, window_s=15.0)
    try:
        gpu = fake_nvml.fleet[0]
        rig.sample(14.0)  # idle at 70 W ...
        gpu.set_load(1.0)
        rig.sample(1.0)  # ... then a one-second spike to 700 W just before the scrape
        gpu.set_load(0.0)
        m = rig.metrics()
        power = next(v for lab, v in m["gpu_power_watts"] if lab["gpu"] == "0")
        peak = next(v for lab, v in m["gpu_power_peak_watts"] if lab["gpu"] == "0")
        assert power == pytest.approx((14 * 70 + 1 * 700) / 15, rel=0.03)
        assert peak == pytest.approx(700, rel=0.02)
    finally:
        rig.sampler.close()


def test_a_scrape_never_calls_nvml(rig: Rig) -> None:
    rig.sample(1.0)
    calls = rig.fake.lib.calls
    for _ in range(5):
        rig.metrics()
    assert rig.fake.lib.calls == calls


def test_lost_gpu_keeps_gpu_up_zero_and_counters_but_no_stale_gauges(rig: Rig) -> None:
    rig.sample(0.5)
    rig.fake.fleet[3].inject("lost")
    rig.sample(0.5)
    m = rig.metrics()
    up = {lab["gpu"]: v for lab, v in m["gpu_up"]}
    assert up == {str(i): (0.0 if i == 3 else 1.0) for i in range(8)}
    for kept in ("gpu_info", "gpu_energy_joules_total", "gpu_power_limit_max_watts"):
        assert any(lab["gpu"] == "3" for lab, _ in m[kept]), kept
    for dropped in ("gpu_power_watts", "gpu_temperature_celsius", "gpu_utilization_ratio"):
        assert not any(lab["gpu"] == "3" for lab, _ in m[dropped]), dropped
        assert any(lab["gpu"] == "2" for lab, _ in m[dropped]), dropped
    collector_up = {lab["collector"]: v for lab, v in m["wattwarden_collector_up"]}
    assert collector_up["gpu"] == 1.0


def test_promtool_check_metrics_passes_on_real_output(rig: Rig) -> None:
    promtool = require_binary("promtool")
    for i, gpu in enumerate(rig.fake.fleet.gpus):
        gpu.set_load(i / 7)
    rig.fake.fleet[2].inject("xid", xid=79)
    rig.sample(1.0)
    body, _ = render(rig.registry)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == ""
    assert result.stderr.decode().strip() == ""


def test_openmetrics_is_served_when_asked_for(rig: Rig) -> None:
    rig.sample(0.2)
    body, content_type = render(rig.registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_a_failing_after_pass_hook_is_logged_and_sampling_goes_on(fake_nvml: FakeNvml) -> None:
    store = MetricStore(monotonic=fake_nvml.clock)
    calls = []

    def hook() -> None:
        calls.append(1)
        raise OSError(28, "No space left on device")

    sampler = Sampler(store, [GpuCollector(NvmlBackend(), monotonic=fake_nvml.clock)], on_pass=hook)
    try:
        for _ in range(3):
            fake_nvml.clock.advance(0.1)
            sampler.run_once()
        assert len(calls) == 3
        assert sampler.passes == 3
        assert store.snapshot().collectors["gpu"].up
    finally:
        sampler.close()


def gpu_series(
    m: dict[str, list[tuple[dict[str, str], float]]], name: str, gpu: str, **labels: str
) -> list[float]:
    return [
        v
        for lab, v in m.get(name, [])
        if lab["gpu"] == gpu and all(lab.get(k) == want for k, want in labels.items())
    ]


def test_power_comes_from_the_energy_counter_when_both_power_fields_stop_answering(
    rig: Rig,
) -> None:
    gpu = rig.fake.fleet[0]
    rig.sample(2.0)  # idle, 70 W from the power fields
    gpu.inject("not_supported", field="power")
    gpu.inject("not_supported", field="power_instant")
    gpu.set_load(0.7)
    rig.sample(5.0)
    start_j = gpu.true_energy_j()
    rig.sample(15.0)  # one whole export window after the fields went
    true_w = (gpu.true_energy_j() - start_j) / 15.0
    m = rig.metrics()
    assert gpu_series(m, "gpu_power_watts", "0") == [pytest.approx(true_w, rel=0.01)]
    assert true_w > 400  # not the idle value from before
    state = state_json(rig.store.snapshot(), backend="sim", node="n", mode="dry_run")
    assert state["gpus"][0]["power_source"] == "counter"
    assert state["gpus"][0]["power_watts"] == pytest.approx(true_w, rel=0.01)
    assert state["gpus"][1]["power_source"] == "instant"


def test_power_gauges_go_when_neither_power_nor_energy_can_be_read(rig: Rig) -> None:
    gpu = rig.fake.fleet[0]
    rig.sample(2.0)
    for name in ("power", "power_instant", "energy"):
        gpu.inject("not_supported", field=name)
    gpu.set_load(1.0)
    rig.sample(20.0)  # past the export window: nothing from before may be left
    m = rig.metrics()
    assert gpu_series(m, "gpu_up", "0") == [1.0]
    for name in ("gpu_power_watts", "gpu_power_peak_watts"):
        assert gpu_series(m, name, "0") == [], name
        assert gpu_series(m, name, "1") != [], name
    state = state_json(rig.store.snapshot(), backend="sim", node="n", mode="dry_run")
    assert state["gpus"][0]["power_watts"] is None
    assert state["gpus"][0]["power_source"] is None


# Each simulator field, and the gauges (name, extra labels) that show it.
FIELD_GAUGES: dict[str, list[tuple[str, dict[str, str]]]] = {
    "temperature": [("gpu_temperature_celsius", {"sensor": "gpu"})],
    "temperature_memory": [("gpu_temperature_celsius", {"sensor": "memory"})],
    "utilization": [("gpu_utilization_ratio", {}), ("gpu_memory_utilization_ratio", {})],
    "memory": [("gpu_memory_used_bytes", {}), ("gpu_memory_total_bytes", {})],
    "clocks": [("gpu_clock_hertz", {"clock": "sm"}), ("gpu_clock_hertz", {"clock": "memory"})],
    "clock_events": [("gpu_clock_event_active", {"reason": "idle"})],
    "power_limit": [("gpu_power_limit_watts", {})],
    "processes": [("gpu_process_memory_used_bytes", {})],
    "power": [],  # with the instant field still there, power stays (see the next case)
}


@pytest.mark.parametrize("fields", [[f] for f in FIELD_GAUGES] + [["power", "power_instant"]])
def test_a_field_that_stops_answering_drops_its_gauges_and_never_freezes(
    rig: Rig, fields: list[str]
) -> None:
    for gpu in rig.fake.fleet[0], rig.fake.fleet[1]:
        gpu.add_process(SimProcess(4000 + gpu.index, 0.3, 10**9))
    rig.sample(2.0)
    before = rig.metrics()
    for name in fields:
        rig.fake.fleet[0].inject("not_supported", field=name)
    rig.sample(2.0)  # more than one slow-tier period
    m = rig.metrics()
    gauges = [g for f in fields for g in FIELD_GAUGES.get(f, [])]
    for name, labels in gauges:
        assert gpu_series(before, name, "0", **labels), (name, labels)
        assert gpu_series(m, name, "0", **labels) == [], (name, labels)
        assert gpu_series(m, name, "1", **labels), (name, labels)
    power = gpu_series(m, "gpu_power_watts", "0")
    assert len(power) == 1  # power always stays: from a power field, else the energy counter
    rig.fake.fleet[0].set_load(1.0)  # and it is today's power, not a frozen one
    rig.sample(16.0)
    assert gpu_series(rig.metrics(), "gpu_power_watts", "0")[0] > 500


def test_state_of_a_lost_gpu_keeps_its_identity_and_counters_but_no_readings(rig: Rig) -> None:
    rig.fake.fleet[3].set_load(0.5)
    rig.sample(1.5)
    rig.fake.fleet[3].inject("lost")
    rig.sample(0.5)
    state = state_json(rig.store.snapshot(), backend="sim", node="n", mode="dry_run")
    lost = state["gpus"][3]
    assert lost["up"] is False
    assert lost["uuid"] == rig.fake.fleet[3].uuid and lost["energy_joules"] > 0
    assert lost["power_limit_max_watts"] == 700.0  # identity stays
    for reading in (
        "power_watts", "power_peak_watts", "power_instant_watts", "power_limit_watts",
        "temperature_celsius", "memory_temperature_celsius", "utilization_ratio",
        "memory_utilization_ratio", "memory_used_bytes", "clock_sm_hertz", "clock_memory_hertz",
    ):  # fmt: skip
        assert lost[reading] is None, reading
    assert lost["clock_events"] == [] and lost["processes"] == []
    assert state["gpus"][2]["temperature_celsius"] is not None
