"""EnergyMeter windows against the simulator's ground truth: counters, polling, the agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for

from wattwarden.api.testing import SimAgent
from wattwarden.hardware.errors import HardwareUnavailable
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml, uninstall_fake_nvml
from wattwarden.workloads.meter import EnergyMeter, EnergySourceError, visible_gpu


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fleet(clock: ManualClock) -> Iterator[SimFleet]:
    f = SimFleet(4, clock=clock)
    install_fake_nvml(f)
    yield f
    uninstall_fake_nvml()


@pytest.fixture
def real_fleet() -> Iterator[SimFleet]:
    f = SimFleet(2)
    install_fake_nvml(f)
    yield f
    uninstall_fake_nvml()


def no_nvml() -> None:
    raise HardwareUnavailable("no libnvidia-ml (test)")


def within(measured: float, truth: float, rel: float = 0.01) -> bool:
    """For polled windows: integrating sampled power is approximate."""
    return abs(measured - truth) <= rel * truth


COUNTER_RESOLUTION_J = 1e-3
"""NVML's energy counter counts whole millijoules of the simulator's exact integral."""


def to_the_millijoule(measured: float, truth: float) -> bool:
    """For counter windows: the difference of two truncated mJ readings is off by < 1 mJ."""
    return abs(measured - truth) <= COUNTER_RESOLUTION_J


def test_counter_window_matches_ground_truth_to_the_millijoule(fleet: SimFleet, clock: ManualClock):
    fleet[0].set_load(0.7)
    fleet[2].set_load(0.3)
    with EnergyMeter(gpus=[0, 1, 2], source="nvml", clock=clock, host=False) as meter:
        assert meter.source == "nvml" and meter.polled_gpus == ()
        before = [g.true_energy_j() for g in fleet]
        meter.begin_window("w")
        clock.advance(12.5)
        m = meter.end_window("w")
        truth = [g.true_energy_j() - b for g, b in zip(fleet, before, strict=True)]
    assert m.elapsed_s == pytest.approx(12.5)
    assert set(m.gpu_energy_j) == {0, 1, 2}
    for i in (0, 1, 2):
        assert to_the_millijoule(m.gpu_energy_j[i], truth[i]), (i, m.gpu_energy_j[i], truth[i])
    assert m.gpu_energy_j[0] > m.gpu_energy_j[2] > m.gpu_energy_j[1] > 0


def test_nested_and_overlapping_windows_each_match_ground_truth(
    fleet: SimFleet, clock: ManualClock
):
    g = fleet[0]
    g.set_load(0.9)
    with EnergyMeter(gpus=[0], source="nvml", clock=clock, host=False) as meter:
        e0 = g.true_energy_j()
        meter.begin_window("outer")
        clock.advance(2)
        e1 = g.true_energy_j()
        meter.begin_window("a")
        clock.advance(3)
        g.set_load(0.2)
        e2 = g.true_energy_j()
        meter.begin_window("b")  # overlaps a
        clock.advance(4)
        e3 = g.true_energy_j()
        a = meter.end_window("a")
        with meter.measure("inner") as inner:  # nested in b and outer
            clock.advance(1)
        e4 = g.true_energy_j()
        b = meter.end_window("b")
        outer = meter.end_window("outer")
        assert meter.open_windows == ()
    assert inner.measurement is not None
    cases = [
        (outer, 10, e4 - e0),
        (a, 7, e3 - e1),
        (b, 5, e4 - e2),
        (inner.measurement, 1, e4 - e3),
    ]
    for m, seconds, truth in cases:
        assert m.elapsed_s == pytest.approx(seconds), m.name
        assert to_the_millijoule(m.gpu_energy_j[0], truth), (m.name, m.gpu_energy_j[0], truth)


def test_lap_closes_and_reopens_at_one_read(fleet: SimFleet, clock: ManualClock):
    fleet[1].set_load(0.5)
    with EnergyMeter(gpus=[1], source="nvml", clock=clock, host=False) as meter:
        start = fleet[1].true_energy_j()
        meter.begin_window("step")
        laps = []
        for seconds in (0.02, 0.03, 0.05):
            clock.advance(seconds)
            laps.append(meter.lap("step"))
        total = fleet[1].true_energy_j() - start
    assert [m.elapsed_s for m in laps] == pytest.approx([0.02, 0.03, 0.05])
    # per-lap energies add up to the whole exactly (to the counter's 1 mJ resolution)
    assert sum(m.gpu_energy_j[1] for m in laps) == pytest.approx(total, abs=0.002)


def test_window_names_are_checked(fleet: SimFleet, clock: ManualClock):
    with EnergyMeter(gpus=[0], source="nvml", clock=clock, host=False) as meter:
        meter.begin_window("x")
        with pytest.raises(ValueError, match="already open"):
            meter.begin_window("x")
        with pytest.raises(ValueError, match="not open"):
            meter.end_window("y")
        with pytest.raises(RuntimeError), meter.measure("body"):
            raise RuntimeError("boom")
        assert meter.open_windows == ("x",)  # the failed body's window was cancelled


def test_unknown_gpu_is_a_clear_error(fleet: SimFleet):
    with pytest.raises(EnergySourceError, match="no GPU 9"):
        EnergyMeter(gpus=[9], source="nvml", host=False)


def test_polling_fallback_when_energy_counter_not_supported(real_fleet: SimFleet):
    g = real_fleet[0]
    g.set_load(0.7)
    g.inject("not_supported", field="energy")
    with EnergyMeter(gpus=[0, 1], source="nvml", poll_interval_s=0.01, host=False) as meter:
        assert meter.polled_gpus == (0,)  # GPU 1 still has its counter
        source = meter._source
        before = g.true_energy_j()
        meter.begin_window("w")
        start = source.samples_taken
        # let the poller integrate about 40 samples (wait on its count, not a fixed sleep)
        wait_for(lambda: source.samples_taken >= start + 40, timeout_s=30, what="40 samples")
        m = meter.end_window("w")
        truth = g.true_energy_j() - before
    assert truth > 0
    assert within(m.gpu_energy_j[0], truth), (m.gpu_energy_j[0], truth)
    assert 1 in m.gpu_energy_j


def test_counter_lost_mid_run_switches_to_polling(real_fleet: SimFleet):
    g = real_fleet[0]
    g.set_load(0.6)
    with EnergyMeter(gpus=[0], source="nvml", poll_interval_s=0.01, host=False) as meter:
        assert meter.polled_gpus == ()
        before = g.true_energy_j()
        meter.begin_window("w")
        g.inject("not_supported", field="energy")
        meter.begin_window("after")  # this read finds the counter gone and starts polling
        assert meter.polled_gpus == (0,)
        source = meter._source
        wait_for(lambda: source.samples_taken >= 30, timeout_s=30, what="power samples")
        m = meter.end_window("w")
        truth = g.true_energy_j() - before
    assert within(m.gpu_energy_j[0], truth, rel=0.02), (m.gpu_energy_j[0], truth)


def rapl_tree(root: Path, joules: float) -> Path:
    """A powercap sysfs tree with one package zone at ``joules``."""
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text(f"{round(joules * 1e6)}\n")
    return root


def test_agent_source_matches_ground_truth(clock: ManualClock, tmp_path: Path):
    fleet = SimFleet(3, clock=clock)
    fleet[1].set_load(0.8)
    rapl = rapl_tree(tmp_path / "powercap", 100.0)

    with SimAgent(fleet, rapl_root=rapl) as agent:
        meter = EnergyMeter(
            gpus=[1, 2], source="agent", agent_url=agent.url, clock=clock, host=True
        )
        with meter:
            assert meter.source == "agent"
            before = [g.true_energy_j() for g in fleet]
            meter.begin_window("w")
            clock.advance(7.0)
            rapl_tree(rapl, 142.5)
            agent.sample()  # the agent's sampler reads the host's counters
            m = meter.end_window("w")
            truth = [g.true_energy_j() - b for g, b in zip(fleet, before, strict=True)]
            for _ in range(3):  # more windows
                meter.begin_window("again")
                clock.advance(1.0)
                meter.end_window("again")
        energy_reads = agent.matching("GET", "/api/v1/energy")
    assert m.elapsed_s == pytest.approx(7.0)
    assert set(m.gpu_energy_j) == {1, 2}
    assert to_the_millijoule(m.gpu_energy_j[1], truth[1]), (m.gpu_energy_j[1], truth[1])
    assert to_the_millijoule(m.gpu_energy_j[2], truth[2]), (m.gpu_energy_j[2], truth[2])
    assert m.host_energy_j == {"package-0": pytest.approx(42.5)}
    assert m.host_total_j == pytest.approx(42.5)
    assert len(energy_reads) == 1 + 2 + 6  # open, one window, three more


def test_auto_uses_nvml_when_present(fleet: SimFleet):
    with EnergyMeter(gpus=[0], host=False) as meter:
        assert meter.source == "nvml"


def test_auto_falls_back_to_agent_then_to_none(clock: ManualClock, free_agent_url: str):
    fleet = SimFleet(1, clock=clock)
    with SimAgent(fleet) as agent:
        meter = EnergyMeter(gpus=[0], agent_url=agent.url, backend_factory=no_nvml, host=False)
        with meter:
            assert meter.source == "agent"
    meter = EnergyMeter(
        gpus=[0], agent_url=free_agent_url, backend_factory=no_nvml, clock=clock, host=False
    )
    with meter:
        assert meter.source == "none"
        meter.begin_window("w")
        clock.advance(2.5)
        m = meter.end_window("w")
    assert m.gpu_energy_j == {} and m.gpu_total_j is None
    assert m.elapsed_s == 2.5  # no energy source, but the window still times itself


def test_forced_agent_source_fails_clearly_when_unreachable(free_agent_url: str):
    with pytest.raises(EnergySourceError, match="cannot reach the agent"):
        EnergyMeter(gpus=[0], source="agent", agent_url=free_agent_url, host=False)


def test_host_energy_from_rapl_tree(fleet: SimFleet, clock: ManualClock, tmp_path: Path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text("1000000\n")
    with EnergyMeter(gpus=[0], source="nvml", clock=clock, rapl_root=tmp_path) as meter:
        meter.begin_window("w")
        (zone / "energy_uj").write_text("4500000\n")
        clock.advance(1)
        m = meter.end_window("w")
    assert m.host_energy_j == {"package-0": pytest.approx(3.5)}


def test_visible_gpu_reads_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert visible_gpu() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    assert visible_gpu(default=5) == 5
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu() == 0


@pytest.fixture
def free_agent_url() -> Iterator[str]:
    from helpers import refused_port

    with refused_port() as port:
        yield f"http://127.0.0.1:{port}"
