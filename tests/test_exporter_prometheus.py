"""The Prometheus exposition: contract names and labels, windowed power, no NVML at scrape time."""

from __future__ import annotations

import dataclasses
import math
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import FakeNvml
from helpers import parse_metrics, require_binary
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden import __version__
from wattwarden.api.state import state_json
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.host import HostCollector, HostSample
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.rapl import RaplSample
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import LeaseState, MetricStore, PolicyState
from wattwarden.exporters.prometheus import StoreCollector, job_families, make_registry, render
from wattwarden.hardware.device import GpuInfo, GpuReading, ProcessUsage
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim import ManualClock
from wattwarden.hardware.sim.fleet import DRIVER_VERSION
from wattwarden.hardware.sim.gpu import SimGpu, SimProcess

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


# ------------------------------------------------- every value vs the simulator

ClockEventBits = {"idle": 0x1, "sw_power_cap": 0x4, "hw_slowdown": 0x8, "sw_thermal": 0x20,
                  "hw_thermal": 0x40, "hw_power_brake": 0x80}  # fmt: skip
"""NVML's clock-event reason bits, as DESIGN.md lists them."""

# (family, extra labels, the simulator's driver-level value converted by hand to the base unit)
GROUND_TRUTH: list[tuple[str, dict[str, str], Callable[[SimGpu], float]]] = [
    ("gpu_up", {}, lambda g: 1.0),
    ("gpu_power_limit_watts", {}, lambda g: g.power_limit_mw() / 1000),
    ("gpu_power_limit_default_watts", {}, lambda g: g.default_power_limit_mw() / 1000),
    ("gpu_power_limit_min_watts", {}, lambda g: g.power_limit_constraints_mw()[0] / 1000),
    ("gpu_power_limit_max_watts", {}, lambda g: g.power_limit_constraints_mw()[1] / 1000),
    ("gpu_temperature_celsius", {"sensor": "gpu"}, lambda g: g.temperature_c("gpu")),
    ("gpu_temperature_celsius", {"sensor": "memory"}, lambda g: g.temperature_c("memory")),
    ("gpu_temperature_threshold_celsius", {"threshold": "slowdown"},
     lambda g: g.temperature_thresholds_c()[1]),
    ("gpu_temperature_threshold_celsius", {"threshold": "max_operating"},
     lambda g: g.temperature_thresholds_c()[0]),
    ("gpu_utilization_ratio", {}, lambda g: g.utilization_pct()[0] / 100),
    ("gpu_memory_utilization_ratio", {}, lambda g: g.utilization_pct()[1] / 100),
    ("gpu_memory_used_bytes", {}, lambda g: g.memory_bytes()[1]),
    ("gpu_memory_total_bytes", {}, lambda g: g.memory_bytes()[0]),
    ("gpu_clock_hertz", {"clock": "sm"}, lambda g: g.clock_mhz("sm") * 1e6),
    ("gpu_clock_hertz", {"clock": "memory"}, lambda g: g.clock_mhz("mem") * 1e6),
    *[
        ("gpu_clock_event_active", {"reason": reason},
         lambda g, bit=bit: 1.0 if g.clock_event_reasons() & bit else 0.0)
        for reason, bit in ClockEventBits.items()
    ],
]  # fmt: skip


def fleet_in_every_state(fake: FakeNvml) -> None:
    """Idle, loaded, capped, hot, braking, with memory and processes: distinct values per GPU."""
    f = fake.fleet
    f[1].set_load(1.0, memory_bytes=30 * 2**30)
    f[2].set_load(1.0)
    f[2].set_power_limit_mw(300_000)  # capped: sw_power_cap
    f[3].set_load(0.6)
    f[3].inject("overheat", delta_c=60.0)  # thermal slowdown
    f[4].set_load(0.8)
    f[4].inject("power_brake")
    f[5].add_process(SimProcess(4242, 0.35, 3 * 2**30))
    f[6].set_load(0.25, memory_bytes=10**9)
    f[7].inject("xid", xid=48)
    f[7].inject("xid", xid=48)
    f[7].inject("xid", xid=79)


def test_every_gpu_metric_is_the_simulators_value_in_base_units(fake_nvml: FakeNvml) -> None:
    rig = Rig(fake_nvml)
    try:
        fleet_in_every_state(fake_nvml)
        gpus = fake_nvml.fleet.gpus
        rig.sample(1.0, step_s=1.0)  # the first pass: counters start here
        start_j = [g.true_energy_j() for g in gpus]
        active_s = [dict.fromkeys(ClockEventBits, 0.0) for _ in gpus]
        for _ in range(6):  # one full read per pass
            rig.sample(1.0, step_s=1.0)
            for g, seconds in zip(gpus, active_s, strict=True):
                for reason, bit in ClockEventBits.items():
                    seconds[reason] += 1.0 if g.clock_event_reasons() & bit else 0.0
        m = rig.metrics()
        for g in gpus:
            gpu = str(g.index)
            for name, labels, truth in GROUND_TRUTH:
                assert gpu_series(m, name, gpu, **labels) == [truth(g)], (gpu, name, labels)
                assert gpu_series(m, name, gpu, uuid=g.uuid, **labels), (gpu, name, "uuid")
            energy = gpu_series(m, "gpu_energy_joules_total", gpu, uuid=g.uuid)
            assert energy == [pytest.approx(g.true_energy_j() - start_j[g.index], abs=0.01)]
            for reason, seconds in active_s[g.index].items():
                got = gpu_series(m, "gpu_clock_event_seconds_total", gpu, reason=reason)
                assert got == [pytest.approx(seconds)], (gpu, reason)
            power = gpu_series(m, "gpu_power_watts", gpu, uuid=g.uuid)
            peak = gpu_series(m, "gpu_power_peak_watts", gpu, uuid=g.uuid)
            assert power == [pytest.approx(g.true_power_w(), rel=0.03)], gpu
            assert peak[0] >= power[0] and peak == [pytest.approx(g.true_power_w(), rel=0.03)]
            info = [lab for lab, v in m["gpu_info"] if lab["gpu"] == gpu and v == 1.0]
            assert [(i["uuid"], i["name"], i["pci_bus_id"]) for i in info] == [
                (g.uuid, g.spec.name, g.pci_bus_id)
            ]
            assert info[0]["driver_version"] == DRIVER_VERSION
        # the states above are really distinct, so a swap of two sources cannot hide
        assert gpu_series(m, "gpu_clock_event_active", "2", reason="sw_power_cap") == [1.0]
        assert gpu_series(m, "gpu_clock_event_active", "0", reason="idle") == [1.0]
        assert gpu_series(m, "gpu_power_limit_watts", "2") == [300.0]
        assert gpu_series(m, "gpu_memory_used_bytes", "1") == [30 * 2**30]
        assert {lab["xid"]: v for lab, v in m["gpu_xid_errors_total"] if lab["gpu"] == "7"} == {
            "48": 2.0,
            "79": 1.0,
        }
        assert {lab["uuid"] for lab, _ in m["gpu_xid_errors_total"]} == {gpus[7].uuid}
        assert [(lab["pid"], lab["uuid"], v) for lab, v in m["gpu_process_memory_used_bytes"]] == [
            ("4242", gpus[5].uuid, 3 * 2**30)
        ]
        assert [(lab["pid"], v) for lab, v in m["gpu_process_utilization_ratio"]] == [
            ("4242", 0.35)
        ]
    finally:
        rig.sampler.close()


# ------------------------------------------------------ synthetic samples

INFO = GpuInfo(
    index=0,
    uuid="GPU-5e1f",
    name="NVIDIA H100 80GB HBM3",
    pci_bus_id="00000000:18:00.0",
    driver_version="550.54.15",
    memory_total_bytes=80 * 2**30,
    power_limit_min_w=200.0,
    power_limit_max_w=700.0,
    power_limit_default_w=650.0,
    temperature_slowdown_c=90.0,
    temperature_max_operating_c=87.0,
)


def full_reading(**fields: Any) -> GpuReading:
    values: dict[str, Any] = {
        "power_w": 300.0, "power_instant_w": 310.0, "energy_j": 5000.0, "power_limit_w": 500.0,
        "temperature_gpu_c": 61.0, "temperature_memory_c": 66.0, "utilization_gpu_ratio": 0.75,
        "utilization_memory_ratio": 0.25, "memory_used_bytes": 12 * 2**30,
        "memory_total_bytes": 80 * 2**30, "clock_sm_hz": 1.755e9, "clock_memory_hz": 2.619e9,
        "clock_event_mask": 0x4,
        "processes": (ProcessUsage(77, 2**30, 0.5), ProcessUsage(78, None, None)),
    }  # fmt: skip
    values.update(fields)
    return GpuReading(**values)


def synthetic_sample(
    read: GpuReading | None, *, info: GpuInfo = INFO, up: bool = True, power_w: float | None = 300.0
) -> GpuSample:
    return GpuSample(
        info=info,
        up=up,
        timestamp_s=1_700_000_000.0,
        reading=read,
        energy_j=1234.5,
        energy_source="counter",
        power_w=power_w,
        power_source="instant",
        clock_event_seconds={"idle": 3.5, "sw_power_cap": 0.25},
        xid_counts={79: 2},
    )


def metrics_of(
    store: MetricStore, **collector: Any
) -> dict[str, list[tuple[dict[str, str], float]]]:
    body, _ = render(make_registry(StoreCollector(store, backend="sim", **collector)))
    return parse_metrics(body.decode())


def exported(*samples: GpuSample) -> dict[str, list[tuple[dict[str, str], float]]]:
    store = MetricStore(monotonic=ManualClock())
    store.put(samples)
    return metrics_of(store)


@pytest.mark.parametrize(("reason", "bit"), ClockEventBits.items())
def test_each_clock_event_bit_alone_sets_exactly_its_own_series(reason: str, bit: int) -> None:
    m = exported(synthetic_sample(full_reading(clock_event_mask=bit)))
    active = {lab["reason"]: v for lab, v in m["gpu_clock_event_active"]}
    assert active == {r: (1.0 if r == reason else 0.0) for r in ClockEventBits}


@settings(max_examples=60, deadline=None)
@given(mask=st.integers(0, 0xFFFF))
def test_clock_event_series_decode_every_mask_bit_by_bit(mask: int) -> None:
    m = exported(synthetic_sample(full_reading(clock_event_mask=mask)))
    active = {lab["reason"]: v for lab, v in m["gpu_clock_event_active"]}
    assert active == {r: (1.0 if mask & bit else 0.0) for r, bit in ClockEventBits.items()}


def test_no_clock_event_series_where_the_mask_cannot_be_read() -> None:
    m = exported(synthetic_sample(full_reading(clock_event_mask=None)))
    assert "gpu_clock_event_active" not in m
    # the counters of time spent in each reason stay
    seconds = {lab["reason"]: v for lab, v in m["gpu_clock_event_seconds_total"]}
    assert seconds == {"idle": 3.5, "sw_power_cap": 0.25}


maybe = st.one_of(st.none(), st.just(math.nan), st.floats(0.0, 1e12, allow_nan=False))
# each reading field, and the series (name, extra labels) that shows it
READING_SERIES: dict[str, tuple[str, dict[str, str]]] = {
    "power_limit_w": ("gpu_power_limit_watts", {}),
    "temperature_gpu_c": ("gpu_temperature_celsius", {"sensor": "gpu"}),
    "temperature_memory_c": ("gpu_temperature_celsius", {"sensor": "memory"}),
    "utilization_gpu_ratio": ("gpu_utilization_ratio", {}),
    "utilization_memory_ratio": ("gpu_memory_utilization_ratio", {}),
    "memory_used_bytes": ("gpu_memory_used_bytes", {}),
    "memory_total_bytes": ("gpu_memory_total_bytes", {}),
    "clock_sm_hz": ("gpu_clock_hertz", {"clock": "sm"}),
    "clock_memory_hz": ("gpu_clock_hertz", {"clock": "memory"}),
}
INFO_SERIES: dict[str, str] = {
    "power_limit_min_w": "gpu_power_limit_min_watts",
    "power_limit_max_w": "gpu_power_limit_max_watts",
    "power_limit_default_w": "gpu_power_limit_default_watts",
}


@settings(max_examples=80, deadline=None)
@given(
    fields=st.fixed_dictionaries({name: maybe for name in READING_SERIES}),
    limits=st.fixed_dictionaries({name: maybe for name in INFO_SERIES}),
    power_w=maybe,
    process=st.tuples(
        st.one_of(st.none(), st.integers(0, 2**40)), st.one_of(st.none(), st.floats(0, 1))
    ),
)
def test_a_missing_or_nan_field_drops_its_series_and_any_other_value_is_exported_as_is(
    fields: dict[str, float | None],
    limits: dict[str, float | None],
    power_w: float | None,
    process: tuple[int | None, float | None],
) -> None:
    info = dataclasses.replace(INFO, **limits)
    read = full_reading(**fields, processes=(ProcessUsage(4242, *process),))
    m = exported(synthetic_sample(read, info=info, power_w=power_w))
    for name, series in m.items():
        assert not any(math.isnan(v) for _, v in series), name
    given_values = [
        *((READING_SERIES[f], v) for f, v in fields.items()),
        *(((INFO_SERIES[f], {}), v) for f, v in limits.items()),
        (("gpu_power_watts", {}), power_w),
        (("gpu_power_peak_watts", {}), power_w),
        (("gpu_process_memory_used_bytes", {"pid": "4242"}), process[0]),
        (("gpu_process_utilization_ratio", {"pid": "4242"}), process[1]),
    ]
    for (name, labels), value in given_values:
        want = [] if value is None or math.isnan(value) else [value]
        assert gpu_series(m, name, "0", uuid=INFO.uuid, **labels) == want, (name, labels)


# ----------------------------------------------- the rest of the exposition

GPU = {"gpu", "uuid"}
# every family: (type, label names, help); a new family or a renamed one is a contract change
EXPOSITION: dict[str, tuple[str, set[str], str]] = {
    "gpu_up": ("gauge", GPU, "1 if the GPU answers, 0 if it is lost (fell off the bus)."),
    "gpu_info": (
        "gauge", GPU | {"name", "pci_bus_id", "driver_version"}, "GPU identity; always 1.",
    ),
    "gpu_power_watts": ("gauge", GPU, "Mean power over the export window (sub-second samples)."),
    "gpu_power_peak_watts": ("gauge", GPU, "Peak power over the export window."),
    "gpu_energy_joules": (
        "counter", GPU,
        "Energy used by the GPU (hardware counter where supported, else integrated power).",
    ),
    "gpu_power_limit_watts": ("gauge", GPU, "Enforced power limit."),
    "gpu_power_limit_target_watts": (
        "gauge", GPU,
        "Power limit the policy engine wants (also in dry-run, where it is not set).",
    ),
    "gpu_power_limit_default_watts": ("gauge", GPU, "Default power limit."),
    "gpu_power_limit_min_watts": ("gauge", GPU, "Lowest settable power limit."),
    "gpu_power_limit_max_watts": ("gauge", GPU, "Highest settable power limit."),
    "gpu_temperature_celsius": ("gauge", GPU | {"sensor"}, "Temperature."),
    "gpu_temperature_threshold_celsius": (
        "gauge", GPU | {"threshold"},
        "Temperature threshold: slowdown (the hardware halves clocks), max_operating (software "
        "thermal slowdown starts).",
    ),
    "gpu_utilization_ratio": ("gauge", GPU, "Fraction of time a kernel ran."),
    "gpu_memory_utilization_ratio": (
        "gauge", GPU,
        "Fraction of time device memory was read or written.",
    ),
    "gpu_memory_used_bytes": ("gauge", GPU, "Device memory in use."),
    "gpu_memory_total_bytes": ("gauge", GPU, "Device memory in total."),
    "gpu_clock_hertz": ("gauge", GPU | {"clock"}, "Current clock."),
    "gpu_clock_event_active": (
        "gauge", GPU | {"reason"},
        "1 while the clock-event (throttle) reason is active.",
    ),
    "gpu_clock_event_seconds": (
        "counter", GPU | {"reason"},
        "Time the clock-event (throttle) reason was active.",
    ),
    "gpu_xid_errors": ("counter", GPU | {"xid"}, "XID errors reported."),
    "gpu_process_memory_used_bytes": ("gauge", GPU | {"pid"}, "Device memory used by a process."),
    "gpu_process_utilization_ratio": ("gauge", GPU | {"pid"}, "SM utilization of a process."),
    "host_cpu_utilization_ratio": ("gauge", set(), "Host CPU utilization, all cores."),
    "host_memory_used_bytes": ("gauge", set(), "Host memory in use (total - available)."),
    "host_memory_total_bytes": ("gauge", set(), "Host memory in total."),
    "host_energy_joules": ("counter", {"domain"}, "CPU/DRAM energy from RAPL."),
    "host_power_watts": ("gauge", {"domain"}, "CPU/DRAM power from RAPL."),
    "wattwarden_build_info": (
        "gauge", {"version",
        "backend"}, "wattwarden version and GPU backend; always 1.",
    ),
    "wattwarden_collector_up": ("gauge", {"collector"}, "1 if the collector's last pass worked."),
    "wattwarden_collector_errors": ("counter", {"collector"}, "Failed collector passes."),
    "wattwarden_collector_duration_seconds": (
        "gauge", {"collector"},
        "Duration of the collector's last pass.",
    ),
    "wattwarden_last_sample_timestamp_seconds": (
        "gauge", set(),
        "Unix time of the last completed sampler pass.",
    ),
    "wattwarden_power_budget_watts": ("gauge", {"scope"}, "Power budget in force."),
    "wattwarden_policy_actions": (
        "counter", {"policy",
        "action", "mode"}, "Actions the policy engine took.",
    ),
    "wattwarden_policy_decisions": (
        "counter", {"policy", "action", "mode"},
        "Decisions of the policy engine, one per GPU and period: set, keep or hold.",
    ),
    "wattwarden_policy_active": ("gauge", {"policy"}, "1 if the policy is on, 0 if off."),
    "wattwarden_policy_mode": (
        "gauge", {"mode"},
        "1 for the policy engine's mode in force (dry_run or apply), 0 for the other.",
    ),
    "wattwarden_policy_holding": (
        "gauge", set(),
        "1 while the policy engine holds (stale or lost readings, a failing policy), else 0.",
    ),
    "wattwarden_power_budget_unreachable": (
        "gauge", set(),
        "1 while the power budget cannot be met even with every GPU at its minimum limit.",
    ),
    "wattwarden_policy_apply_fallback": (
        "gauge", set(),
        "1 after apply mode fell back to dry-run because limits may not be set.",
    ),
    "wattwarden_job_migrations": (
        "counter", {"reason"},
        "Jobs the policy engine asked to move to another GPU, by reason.",
    ),
    "wattwarden_power_demand_watts": (
        "gauge", {"priority"},
        "GPU power the node would draw if no limit held it back (a GPU held at its limit counts "
        "its default limit), by the top priority of the jobs on each GPU (none: low).",
    ),
    "wattwarden_power_demand_above_min_watts": (
        "gauge", {"priority"},
        "The part of wattwarden_power_demand_watts above each GPU's minimum power limit (0 for "
        "a GPU that draws less), by priority: the node's floor plus this is what it needs.",
    ),
    "wattwarden_power_budget_starving": (
        "gauge", set(),
        "1 while the budget keeps a GPU that runs a high-priority job below what it wants.",
    ),
    "wattwarden_power_lease_active": (
        "gauge", set(),
        "1 while a fleet controller's lease on the power budget is live (its budget overrides "
        "the local one), else 0.",
    ),
    "wattwarden_power_lease_expiry_timestamp_seconds": (
        "gauge", set(), "Unix time the live lease runs out at, unless renewed.",
    ),
    "wattwarden_power_lease_expirations": (
        "counter", set(),
        "Leases that ran out without a renewal (the local budget was in force again).",
    ),
    "gpu_job_energy_joules": (
        "counter", GPU | {"job"},
        "GPU energy attributed to a job (its share of the GPU's active energy).",
    ),
    "gpu_job_power_watts": ("gauge", GPU | {"job"}, "GPU power attributed to a job."),
    "wattwarden_job_tokens": ("counter", {"job"}, "Tokens a job reported."),
    "wattwarden_job_steps": ("counter", {"job"}, "Steps a job reported."),
    "wattwarden_job_tokens_per_joule": (
        "gauge", {"job"},
        "Tokens per joule of attributed GPU energy.",
    ),
    "gpu_idle_energy_joules": ("counter", GPU, "GPU energy at idle power (not attributed)."),
    "gpu_unattributed_energy_joules": (
        "counter", GPU,
        "Active GPU energy with no registered job on the GPU.",
    ),
}  # fmt: skip


def attributed(
    jobs: JobRegistry, clock: ManualClock, energies_j: dict[int, list[float]]
) -> list[GpuSample]:
    """Feed the registry one pass a second with these energy counters; the last samples."""
    samples: list[GpuSample] = []
    for k in range(len(next(iter(energies_j.values())))):
        clock.advance(1.0)
        samples = [
            dataclasses.replace(
                synthetic_sample(full_reading()),
                info=dataclasses.replace(INFO, index=i, uuid=f"GPU-{i}"),
                energy_j=joules[k],
                read_mono_s=clock(),
                slow_read_mono_s=clock(),
            )
            for i, joules in energies_j.items()
        ]
        jobs.attribute(samples)
    return samples


def full_store(clock: ManualClock) -> tuple[MetricStore, JobRegistry]:
    """A store and a job registry with something in every family."""
    jobs = JobRegistry(monotonic=clock)
    jobs.register("train", 4000, 0)
    jobs.progress("train", step=12, samples=96, tokens=6000)
    jobs.register("eval", 4001, 0)
    jobs.progress("eval", step=3, samples=24, tokens=0)
    # GPU 0: 100 W (the lowest seen: idle), then 400 W shared by two jobs; GPU 1: 50 W, 250 W
    samples = attributed(jobs, clock, {0: [0.0, 100.0, 500.0], 1: [0.0, 50.0, 300.0]})
    jobs.unregister("eval")
    store = MetricStore(monotonic=clock)
    store.put([
        *samples, HostSample(1.0, 0.375, 6 * 2**30, 64 * 2**30),
        RaplSample(1.0, "package", 812.5, 95.25), RaplSample(1.0, "dram", 40.5, None),
    ])  # fmt: skip
    store.record_collector("gpu", up=True, duration_s=0.0125, failed=False)
    store.record_collector("rapl", up=False, duration_s=0.5, error="EACCES", failed=True)
    store.record_collector("rapl", up=False, duration_s=0.25, error="EACCES", failed=True)
    store.set_power_budget("node", 2400.0)
    store.set_power_budget("lease", 1800.0)
    store.count_policy_action("budget", "cap", "apply")
    store.count_policy_action("budget", "cap", "apply")
    store.count_policy_action("thermal", "cap", "dry_run")
    store.count_policy_decision("budget", "set", "apply")
    store.count_policy_decision("budget", "keep", "apply")
    store.count_policy_decision("budget", "keep", "apply")
    store.count_policy_decision("engine", "hold", "apply")
    store.set_power_limit_targets({0: 450.0, 1: 700.0})
    store.set_policy_state(
        PolicyState(
            mode="apply",
            active={"thermal": True, "budget": True, "idle": False, "tuner": False},
            holding=True,
            fallback=False,
            budget_unreachable=True,
            demand_w={"high": 1300.0, "normal": 0.0, "low": 410.5},
            demand_above_min_w={"high": 900.0, "normal": 0.0, "low": 10.5},
            starving=True,
        )
    )
    store.set_lease_state(LeaseState(1_700_000_030.0, 3))
    store.count_migration("lost", 0)
    store.count_migration("budget")
    store.count_migration("budget")
    store.mark_pass(1_700_000_001.5)
    return store, jobs


def test_the_exposition_gives_every_family_its_type_labels_and_help() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    store, jobs = full_store(ManualClock())
    registry = make_registry(
        StoreCollector(store, backend="sim", extra=lambda snap: job_families(jobs, snap))
    )
    families = {
        f.name: (f.type, {k for s in f.samples for k in s.labels}, f.documentation)
        for f in text_string_to_metric_families(render(registry)[0].decode())
    }
    assert families == EXPOSITION


def test_job_families_export_the_registrys_split_without_swapping_idle_and_unattributed() -> None:
    clock = ManualClock()
    store, jobs = full_store(clock)
    m = metrics_of(store, extra=lambda snap: job_families(jobs, snap))
    by = {name: {tuple(sorted(lab.items())): v for lab, v in m[name]} for name in m}

    def job(gpu: int, name: str) -> tuple[tuple[str, str], ...]:
        return (("gpu", str(gpu)), ("job", name), ("uuid", f"GPU-{gpu}"))

    def gpu(i: int) -> tuple[tuple[str, str], ...]:
        return (("gpu", str(i)), ("uuid", f"GPU-{i}"))

    # GPU 0: 200 J idle (100 W x 2 s), 300 J active split between its two jobs
    assert by["gpu_job_energy_joules_total"] == {job(0, "eval"): 150.0, job(0, "train"): 150.0}
    assert by["gpu_job_power_watts"] == {job(0, "train"): 150.0}  # eval has finished
    assert by["gpu_idle_energy_joules_total"] == {gpu(0): 200.0, gpu(1): 100.0}
    # GPU 1 has no job: its 200 J over idle is unattributed
    assert by["gpu_unattributed_energy_joules_total"] == {gpu(0): 0.0, gpu(1): 200.0}
    assert by["wattwarden_job_tokens_total"] == {
        (("job", "eval"),): 0.0,
        (("job", "train"),): 6000.0,
    }
    assert by["wattwarden_job_steps_total"] == {(("job", "eval"),): 3.0, (("job", "train"),): 12.0}
    assert by["wattwarden_job_tokens_per_joule"] == {(("job", "train"),): 40.0}
    assert jobs.gpu_splits()[1].unattributed_j == 200.0  # the registry agrees


def test_a_job_on_a_gpu_the_store_has_not_seen_gets_an_empty_uuid() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("train", 4000, 5)
    attributed(jobs, clock, {5: [0.0, 100.0, 500.0]})
    m = metrics_of(MetricStore(monotonic=clock), extra=lambda snap: job_families(jobs, snap))
    for name in (
        "gpu_job_energy_joules_total",
        "gpu_job_power_watts",
        "gpu_idle_energy_joules_total",
        "gpu_unattributed_energy_joules_total",
    ):
        assert [(lab["gpu"], lab["uuid"]) for lab, _ in m[name]] == [("5", "")], name


def test_host_rapl_and_self_health_are_exported_as_stored() -> None:
    store, _ = full_store(ManualClock())
    m = metrics_of(store)

    def plain(name: str) -> dict[tuple[str, ...], float]:
        """Series by their label values, in label-name order."""
        return {tuple(v for _, v in sorted(lab.items())): value for lab, value in m[name]}

    assert plain("host_cpu_utilization_ratio") == {(): 0.375}
    assert plain("host_memory_used_bytes") == {(): 6 * 2**30}
    assert plain("host_memory_total_bytes") == {(): 64 * 2**30}
    assert plain("host_energy_joules_total") == {("dram",): 40.5, ("package",): 812.5}
    assert plain("host_power_watts") == {("package",): 95.25}  # dram's power is unknown
    assert plain("wattwarden_build_info") == {("sim", __version__): 1.0}
    assert plain("wattwarden_collector_up") == {("gpu",): 1.0, ("rapl",): 0.0}
    assert plain("wattwarden_collector_errors_total") == {("gpu",): 0.0, ("rapl",): 2.0}
    assert plain("wattwarden_collector_duration_seconds") == {("gpu",): 0.0125, ("rapl",): 0.25}
    assert plain("wattwarden_last_sample_timestamp_seconds") == {(): 1_700_000_001.5}
    assert plain("wattwarden_power_budget_watts") == {("lease",): 1800.0, ("node",): 2400.0}
    actions = {
        (lab["policy"], lab["action"], lab["mode"]): v
        for lab, v in m["wattwarden_policy_actions_total"]
    }
    assert actions == {("budget", "cap", "apply"): 2.0, ("thermal", "cap", "dry_run"): 1.0}
    decisions = {
        (lab["policy"], lab["action"], lab["mode"]): v
        for lab, v in m["wattwarden_policy_decisions_total"]
    }
    assert decisions == {
        ("budget", "set", "apply"): 1.0,
        ("budget", "keep", "apply"): 2.0,
        ("engine", "hold", "apply"): 1.0,
    }
    assert plain("gpu_power_limit_target_watts") == {("0", "GPU-0"): 450.0, ("1", "GPU-1"): 700.0}
    assert plain("wattwarden_policy_active") == {
        ("budget",): 1.0, ("idle",): 0.0, ("thermal",): 1.0, ("tuner",): 0.0,
    }  # fmt: skip
    assert plain("wattwarden_policy_mode") == {("apply",): 1.0, ("dry_run",): 0.0}
    assert plain("wattwarden_policy_holding") == {(): 1.0}
    assert plain("wattwarden_power_budget_unreachable") == {(): 1.0}
    assert plain("wattwarden_policy_apply_fallback") == {(): 0.0}
    assert plain("wattwarden_job_migrations_total") == {("budget",): 2.0, ("lost",): 0.0}
    assert plain("wattwarden_power_demand_watts") == {
        ("high",): 1300.0, ("low",): 410.5, ("normal",): 0.0,
    }  # fmt: skip
    assert plain("wattwarden_power_demand_above_min_watts") == {
        ("high",): 900.0, ("low",): 10.5, ("normal",): 0.0,
    }  # fmt: skip
    assert plain("wattwarden_power_budget_starving") == {(): 1.0}
    assert plain("wattwarden_power_lease_active") == {(): 1.0}
    assert plain("wattwarden_power_lease_expiry_timestamp_seconds") == {(): 1_700_000_030.0}
    assert plain("wattwarden_power_lease_expirations_total") == {(): 3.0}
    assert plain("gpu_info") == {
        (INFO.driver_version, "0", INFO.name, INFO.pci_bus_id, "GPU-0"): 1.0,
        (INFO.driver_version, "1", INFO.name, INFO.pci_bus_id, "GPU-1"): 1.0,
    }


def test_an_empty_store_exports_only_build_info_and_empty_families() -> None:
    m = metrics_of(MetricStore(monotonic=ManualClock()))
    assert set(m) == {"wattwarden_build_info"}


def test_a_lost_gpu_exports_up_zero_its_identity_and_its_counters_only() -> None:
    lost = synthetic_sample(full_reading(), up=False, power_w=None)
    m = exported(lost)
    families = {name for name, series in m.items() for lab, _ in series if lab.get("gpu") == "0"}
    assert families == {
        "gpu_up", "gpu_info", "gpu_energy_joules_total", "gpu_clock_event_seconds_total",
        "gpu_xid_errors_total", "gpu_power_limit_default_watts", "gpu_power_limit_min_watts",
        "gpu_power_limit_max_watts", "gpu_temperature_threshold_celsius",
    }  # fmt: skip
    assert gpu_series(m, "gpu_up", "0", uuid=INFO.uuid) == [0.0]
    assert gpu_series(m, "gpu_energy_joules_total", "0", uuid=INFO.uuid) == [1234.5]
    assert gpu_series(m, "gpu_xid_errors_total", "0", xid="79") == [2.0]
    assert gpu_series(m, "gpu_power_limit_min_watts", "0") == [200.0]
    assert gpu_series(m, "gpu_power_limit_max_watts", "0") == [700.0]
    assert gpu_series(m, "gpu_power_limit_default_watts", "0") == [650.0]
    never_read = exported(synthetic_sample(None))  # up, but nothing read yet: the same
    assert {n for n, s in never_read.items() for lab, _ in s if lab.get("gpu") == "0"} == families


@pytest.mark.parametrize("mode", ["dry_run", "apply"])
@pytest.mark.parametrize("flag", ["holding", "fallback", "budget_unreachable"])
def test_each_policy_state_field_drives_its_own_gauge_and_only_it(mode: str, flag: str) -> None:
    store = MetricStore(monotonic=ManualClock())
    state = {"holding": False, "fallback": False, "budget_unreachable": False, flag: True}
    store.set_policy_state(PolicyState(mode=mode, active={"idle": True}, **state))
    m = metrics_of(store)
    gauges = {
        "holding": "wattwarden_policy_holding",
        "fallback": "wattwarden_policy_apply_fallback",
        "budget_unreachable": "wattwarden_power_budget_unreachable",
    }
    for field, name in gauges.items():
        assert [v for _, v in m[name]] == [1.0 if field == flag else 0.0], name
    assert {lab["mode"]: v for lab, v in m["wattwarden_policy_mode"]} == {
        "dry_run": 1.0 if mode == "dry_run" else 0.0,
        "apply": 1.0 if mode == "apply" else 0.0,
    }
    assert [(lab["policy"], v) for lab, v in m["wattwarden_policy_active"]] == [("idle", 1.0)]


def test_demand_not_starving_and_no_live_lease_export_zeros() -> None:
    # the quiet case: priorities no GPU has, no job starved, a lease that ran out
    store = MetricStore(monotonic=ManualClock())
    store.set_policy_state(
        PolicyState(
            mode="apply",
            active={"budget": True},
            holding=False,
            fallback=False,
            budget_unreachable=False,
            demand_w={"low": 300.0},
            demand_above_min_w={"high": 50.0},
            starving=False,
        )
    )
    store.set_lease_state(LeaseState(None, 2))
    m = metrics_of(store)
    by_priority = {
        name: {lab["priority"]: v for lab, v in m[name]}
        for name in ("wattwarden_power_demand_watts", "wattwarden_power_demand_above_min_watts")
    }
    assert by_priority == {
        "wattwarden_power_demand_watts": {"high": 0.0, "normal": 0.0, "low": 300.0},
        "wattwarden_power_demand_above_min_watts": {"high": 50.0, "normal": 0.0, "low": 0.0},
    }
    assert [v for _, v in m["wattwarden_power_budget_starving"]] == [0.0]
    assert [v for _, v in m["wattwarden_power_lease_active"]] == [0.0]
    assert "wattwarden_power_lease_expiry_timestamp_seconds" not in m
    assert [v for _, v in m["wattwarden_power_lease_expirations_total"]] == [2.0]


def test_without_a_control_loop_no_policy_gauge_is_exported() -> None:
    store = MetricStore(monotonic=ManualClock())
    store.count_policy_decision("thermal", "keep", "dry_run")
    m = metrics_of(store)
    assert "wattwarden_policy_decisions_total" in m
    for name in ("wattwarden_policy_active", "wattwarden_policy_mode",
                 "wattwarden_policy_holding", "wattwarden_power_budget_unreachable",
                 "wattwarden_policy_apply_fallback"):  # fmt: skip
        assert name not in m, name
