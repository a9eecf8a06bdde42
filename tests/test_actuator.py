"""The journalled actuator never leaves a GPU capped, whatever the driver can or cannot read."""

from __future__ import annotations

import logging
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.hardware.device import GpuDevice, GpuInfo, GpuReading, PowerReading
from wattwarden.hardware.errors import (
    GpuLost,
    HardwareError,
    InvalidArgument,
    NoPermission,
    NotSupported,
)
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.backend import SimBackend, SimDevice
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml, uninstall_fake_nvml
from wattwarden.policies.actuator import (
    JournalledDecision,
    LimitActuator,
    LimitChange,
    RateLimited,
)

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
    with pytest.raises(InvalidArgument) as refused:
        actuator.set_limit(0, 300, reason="test")
    assert str(refused.value) == (
        "GPU 0: its current power limit cannot be read (power limit not supported) and it "
        "reports no default limit; refusing a change that could not be undone"
    )
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


# ---------------------------------------------------------------- the promises, on a fake GPU
class FakeGpu:
    """A GPU behind the GpuDevice protocol whose driver calls a test can watch and break.

    ``enforce`` maps a requested limit to the one the driver enforces (a clamp); ``on_set`` runs
    inside the driver call, before it takes effect (to look at the journal, or to die there).
    """

    def __init__(
        self,
        index: int,
        uuid: str,
        *,
        limit_w: float = 500.0,
        min_w: float | None = 100.0,
        max_w: float | None = 700.0,
        default_w: float | None = 700.0,
    ) -> None:
        self.index = index
        self.uuid = uuid
        self.limit_w = limit_w
        self.min_w, self.max_w, self.default_w = min_w, max_w, default_w
        self.sets: list[float] = []
        self.enforce: Callable[[float], float] = lambda w: w
        self.on_set: Callable[[float], None] | None = None
        self.set_error: HardwareError | None = None
        self.read_error: HardwareError | None = None
        self.info_error: HardwareError | None = None

    def info(self) -> GpuInfo:
        if self.info_error is not None:
            raise self.info_error
        return GpuInfo(
            self.index, self.uuid, "Fake", f"0000:{self.index:02x}:00.0", "1.0", None,
            self.min_w, self.max_w, self.default_w,
        )  # fmt: skip

    def read(self) -> GpuReading:
        raise AssertionError("the actuator must not do a full read (it races the sampler)")

    def read_power(self) -> PowerReading:
        raise AssertionError("the actuator does not read power")

    def read_energy_j(self) -> float:
        raise AssertionError("the actuator does not read energy")

    def read_power_limit_w(self) -> float:
        if self.read_error is not None:
            raise self.read_error
        return self.limit_w

    def set_power_limit(self, watts: float) -> float:
        self.sets.append(watts)
        if self.on_set is not None:
            self.on_set(watts)
        if self.set_error is not None:
            raise self.set_error
        self.limit_w = self.enforce(watts)
        return self.limit_w


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def journal_rows(path: Path) -> tuple[dict[str, tuple[int, float]], list[tuple[Any, ...]]]:
    """What the journal file holds, read through a connection of its own: (originals, changes)."""
    db = sqlite3.connect(path)
    try:
        originals = {u: (g, w) for u, g, w in db.execute("SELECT uuid, gpu, watts FROM originals")}
        changes = db.execute(
            "SELECT gpu, uuid, requested_watts, enforced_watts, reason, status FROM changes "
            "ORDER BY id"
        ).fetchall()
    finally:
        db.close()
    return originals, changes


@pytest.mark.parametrize("watts", [100.0, 700.0])
def test_the_range_ends_themselves_are_allowed(tmp_path: Path, watts: float) -> None:
    gpu = FakeGpu(0, "GPU-a", limit_w=400.0)
    actuator = LimitActuator([gpu], tmp_path / "j.sqlite3", min_interval_s=0)
    assert actuator.set_limit(0, watts, reason="edge") == LimitChange(0, watts, watts)
    assert gpu.sets == [watts]
    actuator.close()


@pytest.mark.parametrize("watts", [99.9, 700.1, 0.0, -5.0, 10_000.0])
def test_a_limit_outside_the_range_is_refused_before_the_driver_is_called(
    tmp_path: Path, watts: float
) -> None:
    gpu = FakeGpu(0, "GPU-a", limit_w=400.0)
    journal = tmp_path / "j.sqlite3"
    actuator = LimitActuator([gpu], journal, min_interval_s=0)
    with pytest.raises(InvalidArgument) as refused:
        actuator.set_limit(0, watts, reason="out of range")
    assert str(refused.value) == (
        f"power limit {watts:g} W for GPU 0 is outside its range [100, 700] W"
    )
    assert gpu.sets == []
    assert journal_rows(journal) == ({}, [])  # nothing journalled for a change never made
    actuator.close()


@pytest.mark.parametrize(("min_w", "max_w"), [(None, 700.0), (100.0, None), (None, None)])
def test_a_gpu_that_does_not_report_its_range_is_never_changed(
    tmp_path: Path, min_w: float | None, max_w: float | None
) -> None:
    gpu = FakeGpu(3, "GPU-a", min_w=min_w, max_w=max_w)
    actuator = LimitActuator([gpu], tmp_path / "j.sqlite3", min_interval_s=0)
    with pytest.raises(InvalidArgument, match=r"^GPU 3 does not report its power-limit range$"):
        actuator.set_limit(3, 300, reason="test")
    assert gpu.sets == []
    actuator.close()


def test_an_unknown_gpu_index_is_refused(tmp_path: Path) -> None:
    actuator = LimitActuator([FakeGpu(0, "GPU-a")], tmp_path / "j.sqlite3", min_interval_s=0)
    with pytest.raises(KeyError):
        actuator.set_limit(1, 300, reason="test")
    actuator.close()


def test_restore_returns_to_the_limit_found_before_the_first_of_several_changes(
    tmp_path: Path,
) -> None:
    gpu = FakeGpu(0, "GPU-a", limit_w=450.0)
    journal = tmp_path / "j.sqlite3"
    actuator = LimitActuator([gpu], journal, min_interval_s=0)
    for watts in (300.0, 250.0, 400.0):
        actuator.set_limit(0, watts, reason="cap")
        assert actuator.originals() == {"GPU-a": (0, 450.0)}
    assert gpu.limit_w == 400.0
    assert actuator.restore_all() == []
    assert gpu.limit_w == 450.0
    assert actuator.originals() == {}
    actuator.close()
    assert journal_rows(journal)[0] == {}


def test_after_a_restore_the_next_change_journals_the_limit_found_then(tmp_path: Path) -> None:
    gpu = FakeGpu(0, "GPU-a", limit_w=450.0)
    actuator = LimitActuator([gpu], tmp_path / "j.sqlite3", min_interval_s=0)
    actuator.set_limit(0, 300, reason="cap")
    assert actuator.restore_all() == []
    gpu.limit_w = 600.0  # an operator changed it by hand while we held no cap
    actuator.set_limit(0, 200, reason="cap")
    assert actuator.originals() == {"GPU-a": (0, 600.0)}
    actuator.close()


class Died(BaseException):
    """The process dying inside the driver call (not an error the actuator may handle)."""


def test_the_journal_holds_the_original_and_the_intent_before_the_driver_is_called(
    tmp_path: Path,
) -> None:
    gpu = FakeGpu(1, "GPU-b", limit_w=650.0)
    journal = tmp_path / "j.sqlite3"
    seen: list[tuple[dict[str, tuple[int, float]], list[tuple[Any, ...]]]] = []

    def die(watts: float) -> None:
        seen.append(journal_rows(journal))
        raise Died

    gpu.on_set = die
    crashed = LimitActuator([gpu], journal, min_interval_s=0)
    with pytest.raises(Died):
        crashed.set_limit(1, 300, reason="budget")
    assert seen == [({"GPU-b": (1, 650.0)}, [(1, "GPU-b", 300.0, None, "budget", "intended")])]
    crashed.close()
    # the limit may or may not have been taken when the process died: recover restores either way
    gpu.on_set = None
    gpu.limit_w = 300.0
    restarted = LimitActuator([gpu], journal, min_interval_s=0)
    assert restarted.recover() == []
    assert gpu.limit_w == 650.0
    assert restarted.originals() == {}
    restarted.close()


def test_a_driver_error_is_journalled_as_failed_and_raised(tmp_path: Path) -> None:
    gpu = FakeGpu(0, "GPU-a", limit_w=500.0)
    gpu.set_error = NoPermission("set calls need root")
    journal = tmp_path / "j.sqlite3"
    clock = Clock()
    actuator = LimitActuator([gpu], journal, min_interval_s=10, monotonic=clock)
    with pytest.raises(NoPermission):
        actuator.set_limit(0, 300, reason="budget")
    originals, changes = journal_rows(journal)
    assert changes == [(0, "GPU-a", 300.0, None, "budget", "failed: set calls need root")]
    assert originals == {"GPU-a": (0, 500.0)}
    # a change that failed does not start the interval: the retry is not rate-limited
    gpu.set_error = None
    assert actuator.set_limit(0, 300, reason="retry").enforced_w == 300.0
    assert journal_rows(journal)[1][-1] == (0, "GPU-a", 300.0, 300.0, "retry", "done")
    actuator.close()


@pytest.mark.parametrize(
    ("enforced_w", "warned"), [(280.0, True), (151.5, True), (151.0, False), (150.5, False)]
)
def test_an_enforced_limit_more_than_a_watt_off_the_request_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, enforced_w: float, warned: bool
) -> None:
    gpu = FakeGpu(0, "GPU-a", limit_w=500.0)
    gpu.enforce = lambda w: enforced_w
    actuator = LimitActuator([gpu], tmp_path / "j.sqlite3", min_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="wattwarden.policies.actuator"):
        actuator.set_limit(0, 150, reason="cap")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = [f"GPU 0: requested 150 W, driver enforces {enforced_w:.0f} W"] if warned else []
    assert warnings == expected
    actuator.close()


def test_the_enforced_limit_is_read_back_returned_and_journalled(tmp_path: Path) -> None:
    gpu = FakeGpu(0, "GPU-a", limit_w=500.0)
    gpu.enforce = lambda w: max(w, 280.0)  # the driver holds a floor above the board's minimum
    journal = tmp_path / "j.sqlite3"
    actuator = LimitActuator([gpu], journal, min_interval_s=0)
    change = actuator.set_limit(0, 150, reason="deep cap")
    assert change == LimitChange(gpu=0, requested_w=150.0, enforced_w=280.0)
    assert journal_rows(journal)[1] == [(0, "GPU-a", 150.0, 280.0, "deep cap", "done")]
    actuator.close()


def test_restore_finds_each_gpu_by_uuid_when_indices_moved_between_boots(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite3"
    a, b = FakeGpu(0, "GPU-a", limit_w=600.0), FakeGpu(1, "GPU-b", limit_w=550.0)
    crashed = LimitActuator([a, b], journal, min_interval_s=0)
    crashed.set_limit(0, 300, reason="cap")
    crashed.set_limit(1, 200, reason="cap")
    crashed.close()  # the process died; after a reboot the bus enumerates them the other way
    a.index, b.index = 1, 0
    restarted = LimitActuator([b, a], journal, min_interval_s=0)
    assert restarted.recover() == []
    assert (a.limit_w, b.limit_w) == (600.0, 550.0)
    assert a.sets == [300.0, 600.0] and b.sets == [200.0, 550.0]
    restarted.close()


def test_a_gpu_missing_at_restore_is_reported_and_stays_journalled(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite3"
    a, b = FakeGpu(0, "GPU-a", limit_w=600.0), FakeGpu(1, "GPU-b", limit_w=550.0)
    crashed = LimitActuator([a, b], journal, min_interval_s=0)
    crashed.set_limit(0, 300, reason="cap")
    crashed.set_limit(1, 200, reason="cap")
    crashed.close()
    a.info_error = GpuLost("fell off the bus")  # the first GPU listed, the first journalled
    restarted = LimitActuator([a, b], journal, min_interval_s=0)
    assert restarted.recover() == ["GPU 0 (GPU-a) not present; its limit stays journalled"]
    assert b.limit_w == 550.0  # the others are still restored
    assert restarted.originals() == {"GPU-a": (0, 600.0)}
    restarted.close()
    a.info_error = None  # back on the bus: the next start restores it
    again = LimitActuator([a, b], journal, min_interval_s=0)
    assert again.recover() == []
    assert a.limit_w == 600.0
    assert again.originals() == {}
    again.close()


def test_a_failed_restore_keeps_the_row_and_the_next_recover_restores_it(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite3"
    a, b = FakeGpu(0, "GPU-a", limit_w=600.0), FakeGpu(1, "GPU-b", limit_w=550.0)
    actuator = LimitActuator([a, b], journal, min_interval_s=0)
    actuator.set_limit(0, 300, reason="cap")
    actuator.set_limit(1, 200, reason="cap")
    a.set_error = NoPermission("no root")
    assert actuator.restore_all() == ["GPU 0: restoring 600 W failed: no root"]
    assert b.limit_w == 550.0  # one failure does not stop the others
    assert actuator.originals() == {"GPU-a": (0, 600.0)}
    actuator.close()
    assert journal_rows(journal)[0] == {"GPU-a": (0, 600.0)}
    a.set_error = None
    restarted = LimitActuator([a, b], journal, min_interval_s=0)
    assert restarted.recover() == []
    assert a.limit_w == 600.0
    assert restarted.originals() == {}
    restarted.close()


def test_recover_with_nothing_journalled_touches_no_gpu(tmp_path: Path) -> None:
    gpu = FakeGpu(0, "GPU-a", limit_w=321.0)
    actuator = LimitActuator([gpu], tmp_path / "j.sqlite3", min_interval_s=0)
    assert actuator.recover() == []
    assert gpu.sets == []
    actuator.close()


def test_the_rate_limit_is_per_gpu_and_ends_exactly_min_interval_later(tmp_path: Path) -> None:
    a, b = FakeGpu(0, "GPU-a"), FakeGpu(1, "GPU-b")
    clock = Clock()  # steps below are exact in binary floating point
    actuator = LimitActuator([a, b], tmp_path / "j.sqlite3", min_interval_s=5, monotonic=clock)
    actuator.set_limit(0, 300, reason="cap")
    clock.now += 3.0
    actuator.set_limit(1, 300, reason="cap")  # another GPU's change does not wait for GPU 0's
    clock.now += 1.5
    with pytest.raises(RateLimited) as refused:
        actuator.set_limit(0, 250, reason="cap")
    assert str(refused.value) == "GPU 0: limit changed 4.50 s ago; at most one change per 5 s"
    assert a.sets == [300.0]  # refused before the driver
    clock.now += 0.5  # exactly min_interval_s after GPU 0's last change: allowed
    assert actuator.set_limit(0, 250, reason="cap").enforced_w == 250.0
    with pytest.raises(RateLimited, match=r"^GPU 1: limit changed 2\.00 s ago"):
        actuator.set_limit(1, 250, reason="cap")  # GPU 1 counts from its own change
    assert b.sets == [300.0]
    actuator.close()


def test_the_default_interval_is_one_second(tmp_path: Path) -> None:
    clock = Clock()
    actuator = LimitActuator([FakeGpu(0, "GPU-a")], tmp_path / "j.sqlite3", monotonic=clock)
    actuator.set_limit(0, 300, reason="cap")
    clock.now += 0.999
    with pytest.raises(RateLimited):
        actuator.set_limit(0, 250, reason="cap")
    clock.now += 0.001
    actuator.set_limit(0, 250, reason="cap")
    actuator.close()


def test_concurrent_changes_never_interleave_a_journal_entry_and_a_driver_call(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "j.sqlite3"
    gpus = [FakeGpu(i, f"GPU-{i}", limit_w=600.0) for i in range(2)]
    problems: list[str] = []
    calls = 0

    def check(watts: float) -> None:
        nonlocal calls
        calls += 1
        _, changes = journal_rows(journal)
        intended = [c for c in changes if c[-1] == "intended"]
        # exactly one change is in flight, and it is the one this driver call makes
        if len(intended) != 1 or intended[0][2] != watts or changes[-1] != intended[0]:
            problems.append(f"driver asked for {watts} W while the journal held {changes[-3:]}")

    for g in gpus:
        g.on_set = check
    actuator = LimitActuator(gpus, journal, min_interval_s=0)
    start = threading.Barrier(4)

    def hammer(worker: int) -> None:
        start.wait()
        for i in range(15):
            actuator.set_limit(worker % 2, 100 + worker * 100 + i, reason=f"w{worker}")

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert calls == 60
    _, changes = journal_rows(journal)
    assert len(changes) == 60 and {c[-1] for c in changes} == {"done"}
    assert actuator.originals() == {"GPU-0": (0, 600.0), "GPU-1": (1, 600.0)}
    actuator.close()


def test_after_a_damaged_journal_every_gpu_goes_back_to_its_default_whatever_fails(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "j.sqlite3"
    journal.write_bytes(b"not a journal" * 100)
    no_default = FakeGpu(0, "GPU-0", limit_w=300.0, default_w=None)
    at_default = FakeGpu(1, "GPU-1", limit_w=700.0)
    unreadable = FakeGpu(2, "GPU-2", limit_w=300.0)
    unreadable.read_error = NotSupported("power limit not supported")
    refuses = FakeGpu(3, "GPU-3", limit_w=300.0)
    refuses.set_error = NoPermission("no root")
    lost = FakeGpu(4, "GPU-4", limit_w=300.0)
    lost.info_error = GpuLost("fell off the bus")
    capped = FakeGpu(5, "GPU-5", limit_w=250.0, default_w=600.0)
    gpus = [capped, lost, refuses, unreadable, at_default, no_default]  # listed out of order
    actuator = LimitActuator(gpus, journal, min_interval_s=0)
    assert actuator.damaged == "not an SQLite database"
    assert actuator.recover() == [
        "GPU 0: no default limit known; left as it is",
        "GPU 3: restoring its default limit failed: no root",
        "GPU 4: restoring its default limit failed: fell off the bus",
    ]
    assert [g.limit_w for g in sorted(gpus, key=lambda g: g.index)] == [
        300.0, 700.0, 700.0, 300.0, 300.0, 600.0,
    ]  # fmt: skip
    assert at_default.sets == [] and no_default.sets == []  # nothing to do: not touched
    assert unreadable.sets == [700.0]  # unreadable: set anyway
    actuator.close()


# ------------------------------------------------------------------ journal retention
def test_prune_drops_changes_and_decisions_older_than_the_retention_and_never_originals(
    tmp_path: Path,
) -> None:
    wall = Clock()
    gpu = FakeGpu(0, "GPU-a", limit_w=650.0)
    path = tmp_path / "j.sqlite3"
    actuator = LimitActuator([gpu], path, min_interval_s=0, wall=wall)
    actuator.set_limit(0, 400, reason="old")  # journals the original 650 W at t=1000
    actuator.journal_decisions([JournalledDecision(wall.now, 0, "budget", "set", "apply",
                                                   650.0, 400.0, "old", "train")])  # fmt: skip
    wall.now += 100.0
    actuator.set_limit(0, 300, reason="new")
    actuator.journal_decisions([JournalledDecision(wall.now, 0, "budget", "set", "apply",
                                                   400.0, 300.0, "new", "")])  # fmt: skip
    wall.now += 50.0
    assert actuator.prune(100.0) == 2  # at 1150: the rows of 1000 are older than 100 s
    originals, changes = journal_rows(path)
    assert [c[4] for c in changes] == ["new"]
    assert [d.reason for d in actuator.journalled_decisions()] == ["new"]
    assert originals == {"GPU-a": (0, 650.0)}  # a year-old cap still goes back to 650 W
    assert actuator.prune(0.0) == 2  # everything journalled before now ...
    assert journal_rows(path) == ({"GPU-a": (0, 650.0)}, [])  # ... but the originals
    assert actuator.restore_all() == []
    assert gpu.limit_w == 650.0
    actuator.close()


def test_a_row_exactly_the_retention_old_is_kept(tmp_path: Path) -> None:
    wall = Clock()
    actuator = LimitActuator([FakeGpu(0, "GPU-a")], tmp_path / "j.sqlite3", wall=wall)
    actuator.set_limit(0, 400, reason="cap")
    wall.now += 60.0
    assert actuator.prune(60.0) == 0
    wall.now += 0.5
    assert actuator.prune(60.0) == 1
    actuator.close()


def test_a_negative_retention_is_refused(tmp_path: Path) -> None:
    actuator = LimitActuator([FakeGpu(0, "GPU-a")], tmp_path / "j.sqlite3")
    with pytest.raises(ValueError, match="older_than_s must be 0 or more"):
        actuator.prune(-1.0)
    actuator.close()


def test_decisions_are_journalled_with_every_field_and_read_back_in_order(tmp_path: Path) -> None:
    actuator = LimitActuator([FakeGpu(0, "GPU-a")], tmp_path / "j.sqlite3")
    rows = [
        JournalledDecision(1.5, 0, "thermal", "set", "dry_run", 700.0, 630.0, "hot", "a,b"),
        JournalledDecision(2.5, 1, "engine", "hold", "apply", None, None, "GPU 1 is lost", "",
                           None),
        JournalledDecision(3.5, 1, "migration", "migrate", "apply", None, None, "move", "a",
                           "no job named 'a'"),
    ]  # fmt: skip
    actuator.journal_decisions(rows)
    actuator.journal_decisions([])
    assert actuator.journalled_decisions() == rows
    actuator.close()
