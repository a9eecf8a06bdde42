"""The simulated GPU behaves like the hardware it stands in for."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from wattwarden.hardware.device import ClockEvent
from wattwarden.hardware.errors import GpuLost, InvalidArgument, NoPermission, NotSupported
from wattwarden.hardware.sim import MODELS, ManualClock, SimFleet, SimGpu
from wattwarden.hardware.sim.fleet import sim_pci_bus_id, sim_uuid


def make_gpu(
    model: str = "h100-sxm", clock: ManualClock | None = None
) -> tuple[SimGpu, ManualClock]:
    clock = clock or ManualClock()
    gpu = SimGpu(0, MODELS[model], uuid=sim_uuid(0, 0), pci_bus_id=sim_pci_bus_id(0), clock=clock)
    return gpu, clock


def test_energy_counter_equals_integral_of_true_power_within_0_1_percent() -> None:
    gpu, clock = make_gpu()
    start = clock()
    # a bursty, varying load over 60 s, with a limit change in the middle
    gpu.set_load_schedule([(start + t, (0.15 + 0.8 * ((t * 7) % 3 == 0)) % 1.0) for t in range(60)])
    integral = 0.0
    e0 = gpu.total_energy_mj()
    for step in range(6000):
        if step == 3000:
            gpu.set_power_limit_mw(350_000)
        p = gpu.true_power_w()
        clock.advance(0.01)
        integral += p * 0.01
    counted = (gpu.total_energy_mj() - e0) / 1000.0
    assert integral > 60 * 70  # something ran
    assert counted == pytest.approx(integral, rel=1e-3)


def test_lower_power_limit_lowers_power_and_clocks() -> None:
    gpu, clock = make_gpu()
    gpu.set_load(1.0)
    clock.advance(2.0)
    power_full, clock_full = gpu.true_power_w(), gpu.clock_mhz("sm")
    gpu.set_power_limit_mw(400_000)
    clock.advance(2.0)
    power_capped, clock_capped = gpu.true_power_w(), gpu.clock_mhz("sm")
    assert power_full == pytest.approx(700.0, rel=1e-6)
    assert power_capped == pytest.approx(400.0, rel=1e-6)
    assert clock_capped < clock_full
    assert gpu.clock_event_reasons() & ClockEvent.SW_POWER_CAP


@pytest.mark.parametrize("model", ["a100-sxm", "h100-sxm"])
def test_removing_one_percent_of_power_costs_035_to_050_percent_of_throughput(model: str) -> None:
    gpu, clock = make_gpu(model)
    spec = MODELS[model]
    gpu.set_load(1.0)
    clock.advance(1.0)
    base = gpu.relative_throughput()
    gpu.set_power_limit_mw(round(spec.power_default_w * 0.99 * 1000))
    clock.advance(1.0)
    loss = 1.0 - gpu.relative_throughput() / base
    assert 0.0035 <= loss <= 0.0050


def test_steady_state_temperature_follows_first_order_rc_model() -> None:
    gpu, clock = make_gpu()
    spec = MODELS["h100-sxm"]
    gpu.set_load(0.6)
    t0_temp = gpu.true_temperature_c()
    power = gpu.true_power_w()
    t_ss = 30.0 + power * spec.thermal_resistance_c_per_w
    elapsed = 0.0
    for target in (5.0, 20.0, 60.0):
        clock.advance(target - elapsed)
        elapsed = target
        expected = t_ss + (t0_temp - t_ss) * math.exp(-elapsed / spec.thermal_tau_s)
        assert gpu.true_temperature_c() == pytest.approx(expected, abs=1e-6)
    clock.advance(600.0)
    assert gpu.true_temperature_c() == pytest.approx(t_ss, abs=1e-3)


def test_overheating_engages_thermal_slowdown_and_holds_power_below_limit() -> None:
    gpu, clock = make_gpu()
    gpu.set_load(1.0)
    gpu.inject("overheat")
    for _ in range(100):
        clock.advance(1.0)
    temp = gpu.true_temperature_c()
    assert temp > 85.0
    assert gpu.clock_event_reasons() & (ClockEvent.SW_THERMAL | ClockEvent.HW_SLOWDOWN)
    assert gpu.true_power_w() < 700.0 * 0.8


def test_idle_gpu_reports_idle_clock_event_and_idle_power() -> None:
    gpu, clock = make_gpu()
    clock.advance(1.0)
    assert gpu.clock_event_reasons() == ClockEvent.IDLE
    assert gpu.true_power_w() == MODELS["h100-sxm"].idle_w


def test_power_reading_is_a_one_second_average_while_instant_field_follows_the_step() -> None:
    gpu, clock = make_gpu()
    clock.advance(2.0)
    gpu.set_load(1.0)
    clock.advance(0.5)
    instant = gpu.power_instant_mw() / 1000
    average = gpu.power_average_mw() / 1000
    assert instant == pytest.approx(700.0, rel=0.02)
    assert average == pytest.approx((70.0 + 700.0) / 2, rel=0.02)
    clock.advance(1.0)
    assert gpu.power_average_mw() / 1000 == pytest.approx(700.0, rel=0.02)


def test_sensor_noise_is_small_and_deterministic_for_the_same_instant() -> None:
    gpu, clock = make_gpu()
    gpu.set_load(0.5)
    readings = []
    for _ in range(200):
        clock.advance(0.1)
        readings.append(gpu.power_instant_mw() / 1000)
        assert gpu.power_instant_mw() / 1000 == readings[-1]
    true = gpu.true_power_w()
    assert max(abs(r - true) for r in readings) <= true * 0.0101
    assert len(set(readings)) > 50


def test_power_limit_outside_model_bounds_is_refused() -> None:
    gpu, _ = make_gpu("a100-sxm")
    with pytest.raises(InvalidArgument):
        gpu.set_power_limit_mw(99_000)
    with pytest.raises(InvalidArgument):
        gpu.set_power_limit_mw(401_000)
    gpu.set_power_limit_mw(100_000)
    assert gpu.enforced_power_limit_mw() == 100_000


def test_faults_lost_not_supported_no_permission_and_clear() -> None:
    gpu, clock = make_gpu()
    gpu.inject("not_supported", field="energy")
    with pytest.raises(NotSupported):
        gpu.total_energy_mj()
    assert gpu.power_average_mw() > 0
    gpu.inject("no_permission")
    with pytest.raises(NoPermission):
        gpu.set_power_limit_mw(300_000)
    gpu.inject("xid", xid=48)
    gpu.inject("lost")
    with pytest.raises(GpuLost):
        gpu.power_average_mw()
    assert gpu.pop_xids() == [48, 79]
    gpu.inject("clear")
    clock.advance(0.1)
    assert gpu.total_energy_mj() > 0
    gpu.set_power_limit_mw(300_000)


def test_bad_fault_parameters_are_refused_with_the_name() -> None:
    gpu, _ = make_gpu()
    with pytest.raises(InvalidArgument, match="unknown fault 'melt'"):
        gpu.inject("melt")
    with pytest.raises(InvalidArgument, match="field must be one of"):
        gpu.inject("not_supported", field="fan")


def test_driver_state_outlives_the_fleet_like_a_real_driver(tmp_path: Path) -> None:
    clock, wall = ManualClock(), ManualClock(1_700_000_000.0)
    fleet = SimFleet(2, clock=clock, state_dir=tmp_path, wall_clock=wall)
    fleet[1].set_power_limit_mw(300_000)
    fleet[1].set_load(1.0)
    clock.advance(10.0)
    fleet.save()
    energy_before = fleet[1].true_energy_j()
    wall.advance(100.0)  # the agent was down for 100 s
    again = SimFleet(2, clock=ManualClock(), state_dir=tmp_path, wall_clock=wall)
    assert again[1].enforced_power_limit_mw() == 300_000
    assert again[0].enforced_power_limit_mw() == 700_000
    assert again[1].true_energy_j() == pytest.approx(energy_before + 70.0 * 100.0)
    assert (tmp_path / "sim" / "driver-state.json").exists()


def test_sim_load_refuses_negative_or_oversized_memory() -> None:
    gpu, _ = make_gpu()
    total = MODELS["h100-sxm"].memory_total_bytes
    for bad in (-1, total + 1, 2**64 - 1):
        with pytest.raises(InvalidArgument, match="memory_bytes must be an integer within"):
            gpu.set_load(0.5, bad)
    gpu.set_load(0.5, total)
    assert gpu.memory_bytes() == (total, total)


def test_a_smaller_fleet_keeps_the_state_of_the_gpus_it_does_not_simulate(tmp_path: Path) -> None:
    clock, wall = ManualClock(), ManualClock(1_700_000_000.0)
    eight = SimFleet(8, clock=clock, state_dir=tmp_path, wall_clock=wall)
    eight[5].set_power_limit_mw(400_000)
    eight[7].set_load(1.0)
    clock.advance(10.0)
    eight.save()
    energy_7 = eight[7].true_energy_j()
    wall.advance(50.0)
    three = SimFleet(3, clock=ManualClock(), state_dir=tmp_path, wall_clock=wall)
    three[0].set_power_limit_mw(250_000)
    three.save()
    a100 = SimFleet(2, model="a100-sxm", clock=ManualClock(), state_dir=tmp_path, wall_clock=wall)
    a100[1].set_power_limit_mw(150_000)
    a100.save()
    wall.advance(50.0)
    again = SimFleet(8, clock=ManualClock(), state_dir=tmp_path, wall_clock=wall)
    assert again[5].enforced_power_limit_mw() == 400_000
    assert again[0].enforced_power_limit_mw() == 250_000
    # the GPU no run simulated kept counting at idle all along, as on a real host
    assert again[7].true_energy_j() == pytest.approx(energy_7 + 70.0 * 100.0)
    a100_again = SimFleet(2, model="a100-sxm", clock=ManualClock(), state_dir=tmp_path)
    assert a100_again[1].enforced_power_limit_mw() == 150_000


BAD_VALUES = [float("nan"), float("inf"), float("-inf"), -1.0, 1e300, "700", None, True]


@pytest.mark.parametrize("field", ["power_limit_w", "energy_j", "saved_at"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=repr)
def test_a_bad_value_in_the_state_file_is_set_aside_and_the_fleet_starts_fresh(
    tmp_path: Path, field: str, bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    wall = ManualClock(1_700_000_000.0)
    fleet = SimFleet(2, clock=ManualClock(), state_dir=tmp_path, wall_clock=wall)
    fleet[0].set_power_limit_mw(300_000)
    path = tmp_path / "sim" / "driver-state.json"
    data = json.loads(path.read_text())
    if field == "saved_at":
        data["saved_at"] = bad
        for g in data["gpus"]:
            g.pop("saved_at", None)
    else:
        data["gpus"][1][field] = bad
    path.write_text(json.dumps(data))  # json writes NaN and Infinity as bare words
    again = SimFleet(2, clock=ManualClock(), state_dir=tmp_path, wall_clock=wall)
    for gpu in again.gpus:
        assert math.isfinite(gpu.true_energy_j()) and 0 <= gpu.total_energy_mj() < 2**63
        assert gpu.enforced_power_limit_mw() == 700_000
    assert len(list(path.parent.glob("driver-state.json.bad-*"))) == 1
    assert any(r.levelname == "ERROR" and "is invalid" in r.getMessage() for r in caplog.records), (
        caplog.text
    )


def test_a_state_file_that_is_not_json_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "sim" / "driver-state.json"
    path.parent.mkdir()
    path.write_text("{not json")
    fleet = SimFleet(2, clock=ManualClock(), state_dir=tmp_path)
    assert fleet[0].enforced_power_limit_mw() == 700_000
    assert (path.parent / next(path.parent.glob("driver-state.json.bad-*")).name).read_text() == (
        "{not json"
    )
