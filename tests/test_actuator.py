"""The journalled actuator never leaves a GPU capped, whatever the driver can or cannot read."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.hardware.device import GpuDevice, GpuInfo, GpuReading
from wattwarden.hardware.errors import HardwareError, InvalidArgument, NotSupported
from wattwarden.hardware.nvml import NvmlBackend, install_fake_nvml, uninstall_fake_nvml
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.backend import SimBackend, SimDevice
from wattwarden.policies.actuator import LimitActuator

H100_DEFAULT_W = 700.0


def true_limit(fleet: SimFleet, gpu: int) -> float:
    return float(fleet[gpu].state()["power_limit_w"])


@contextmanager
def devices_over(fleet: SimFleet, kind: str) -> Iterator[Sequence[GpuDevice]]:
    """The fleet's GPUs through the simulator directly, or through pynvml over the fake NVML."""
    if kind == "sim":
        yield SimBackend(fleet).devices()
        return
    install_fake_nvml(fleet)
    backend = NvmlBackend()
    try:
        yield backend.devices()
    finally:
        backend.close()
        uninstall_fake_nvml()


@pytest.mark.parametrize("kind", ["sim", "nvml"])
def test_unreadable_limit_journals_the_default_and_restore_all_puts_it_back(
    tmp_path: Path, kind: str
) -> None:
    fleet = SimFleet(2, clock=ManualClock())
    with devices_over(fleet, kind) as devices:
        actuator = LimitActuator(devices, tmp_path / "journal.sqlite3", min_interval_s=0)
        devices[0].info()  # static facts are read at start, before the fault
        fleet[0].inject("not_supported", field="power_limit")
        change = actuator.set_limit(0, 300, reason="test")
        assert change.enforced_w == 300.0  # the set went through: no error while it is applied
        assert true_limit(fleet, 0) == 300.0
        assert actuator.originals()[fleet[0].uuid] == (0, H100_DEFAULT_W)
        assert actuator.restore_all() == []
        actuator.close()
    assert true_limit(fleet, 0) == H100_DEFAULT_W


@pytest.mark.parametrize("kind", ["sim", "nvml"])
def test_unreadable_limit_is_restored_after_a_crash_by_recover(tmp_path: Path, kind: str) -> None:
    fleet = SimFleet(2, clock=ManualClock())
    journal = tmp_path / "journal.sqlite3"
    with devices_over(fleet, kind) as devices:
        devices[1].info()
        fleet[1].inject("not_supported", field="power_limit")
        crashed = LimitActuator(devices, journal, min_interval_s=0)
        crashed.set_limit(1, 250, reason="test")
        crashed.close()  # no restore: the process died here
        assert true_limit(fleet, 1) == 250.0
        restarted = LimitActuator(devices, journal, min_interval_s=0)
        assert restarted.recover() == []
        restarted.close()
    assert true_limit(fleet, 1) == H100_DEFAULT_W


class NoDefaultDevice:
    """A GPU that reports its range but neither its current nor its default limit."""

    def __init__(self, inner: SimDevice) -> None:
        self._inner = inner
        self.index = inner.index

    def info(self) -> GpuInfo:
        info = self._inner.info()
        return GpuInfo(
            info.index, info.uuid, info.name, info.pci_bus_id, info.driver_version,
            info.memory_total_bytes, info.power_limit_min_w, info.power_limit_max_w, None,
        )  # fmt: skip

    def read(self) -> GpuReading:
        raise AssertionError("set_limit must not do a full read (it races the sampler)")

    def read_power_limit_w(self) -> float:
        raise NotSupported("power limit not supported")

    def set_power_limit(self, watts: float) -> float:
        return self._inner.set_power_limit(watts)


def test_change_whose_original_is_unknown_is_refused_and_not_made(tmp_path: Path) -> None:
    fleet = SimFleet(1, clock=ManualClock())
    device = NoDefaultDevice(SimBackend(fleet).devices()[0])
    actuator = LimitActuator([device], tmp_path / "journal.sqlite3", min_interval_s=0)
    with pytest.raises(InvalidArgument, match="could not be undone"):
        actuator.set_limit(0, 300, reason="test")
    assert true_limit(fleet, 0) == H100_DEFAULT_W
    assert actuator.originals() == {}
    actuator.close()


class NarrowReadsOnly:
    """Fails the test on a full read: the actuator needs only the enforced limit."""

    def __init__(self, inner: SimDevice) -> None:
        self._inner = inner
        self.index = inner.index
        self.info = inner.info
        self.read_power_limit_w = inner.read_power_limit_w
        self.set_power_limit = inner.set_power_limit

    def read(self) -> GpuReading:
        raise AssertionError("set_limit must not do a full read (it races the sampler)")


def test_set_limit_reads_only_the_enforced_limit_not_the_whole_device(tmp_path: Path) -> None:
    fleet = SimFleet(1, clock=ManualClock())
    fleet[0].set_power_limit_mw(500_000)
    device = NarrowReadsOnly(SimBackend(fleet).devices()[0])
    actuator = LimitActuator([device], tmp_path / "journal.sqlite3", min_interval_s=0)
    actuator.set_limit(0, 300, reason="test")
    assert actuator.originals()[fleet[0].uuid] == (0, 500.0)
    actuator.close()


# One step of a run: set a limit, break or mend the limit read, or crash and restart.
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 1), st.integers(200, 700)),
        st.tuples(st.just("break_read"), st.integers(0, 1), st.just(0)),
        st.tuples(st.just("mend_read"), st.integers(0, 1), st.just(0)),
        st.tuples(st.just("crash"), st.just(0), st.just(0)),
    ),
    max_size=12,
)


@pytest.mark.parametrize("kind", ["sim", "nvml"])
@settings(max_examples=60, deadline=None)
@given(
    initial=st.tuples(st.integers(200, 700), st.integers(200, 700)),
    read_broken_at_start=st.tuples(st.booleans(), st.booleans()),
    steps=_steps,
)
def test_no_sequence_of_changes_faults_and_crashes_leaves_a_gpu_capped(
    kind: str,
    initial: tuple[int, int],
    read_broken_at_start: tuple[bool, bool],
    steps: list[tuple[str, int, int]],
) -> None:
    fleet = SimFleet(2, clock=ManualClock())
    for gpu, watts in enumerate(initial):
        fleet[gpu].set_power_limit_mw(watts * 1000)
    # what each GPU must end at: the limit found before the first change, else the default
    expected: dict[int, float] = {}
    baseline = [float(w) for w in initial]  # the limit an undisturbed GPU keeps
    broken = {0: False, 1: False}
    with tempfile.TemporaryDirectory() as tmp, devices_over(fleet, kind) as devices:
        journal = Path(tmp) / "journal.sqlite3"
        for d in devices:
            d.info()
        for gpu, brk in enumerate(read_broken_at_start):
            if brk:
                fleet[gpu].inject("not_supported", field="power_limit")
                broken[gpu] = True
        actuator = LimitActuator(devices, journal, min_interval_s=0)
        for op, gpu, watts in steps:
            if op == "set":
                before = true_limit(fleet, gpu)
                try:
                    actuator.set_limit(gpu, watts, reason="property")
                except HardwareError:
                    continue
                expected.setdefault(gpu, H100_DEFAULT_W if broken[gpu] else before)
            elif op == "break_read":
                fleet[gpu].inject("not_supported", field="power_limit")
                broken[gpu] = True
            elif op == "mend_read":
                fleet[gpu].inject("clear")
                broken[gpu] = False
            else:
                actuator.close()
                actuator = LimitActuator(devices, journal, min_interval_s=0)
                assert actuator.recover() == []
                for g, w in expected.items():
                    assert true_limit(fleet, g) == w
                    baseline[g] = w
                expected.clear()
        assert actuator.restore_all() == []
        actuator.close()
    for gpu, watts in enumerate(baseline):
        assert true_limit(fleet, gpu) == expected.get(gpu, watts)
