"""hardware/nvml.py over the fake NVML library, checked against the simulator."""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import pynvml
import pytest
from conftest import FakeNvml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattwarden.collectors.gpu import GpuCollector, PartialCollectionError
from wattwarden.hardware.errors import GpuLost, InvalidArgument, NoPermission
from wattwarden.hardware.nvml import NvmlBackend, install_library
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.hardware.sim.fake_nvml import FakeNvmlLib, install_fake_nvml, uninstall_fake_nvml
from wattwarden.hardware.sim.gpu import SimProcess


def test_nvml_path_over_fake_library_gives_the_same_samples_as_the_simulator(
    fake_nvml: FakeNvml,
) -> None:
    fleet, clock = fake_nvml.fleet, fake_nvml.clock
    for i, gpu in enumerate(fleet.gpus):
        gpu.set_load(i / 8)
    fleet[2].add_process(SimProcess(4242, 0.3, 2 * 2**30))
    fleet[3].set_power_limit_mw(300_000)
    clock.advance(5.0)
    nvml, direct = NvmlBackend(), SimBackend(fleet)
    try:
        for a, b in zip(nvml.devices(), direct.devices(), strict=True):
            assert a.info() == b.info()
            assert a.read() == b.read()
        reading = nvml.devices()[2].read()
        assert reading.processes[0].pid == 4242
        assert reading.processes[0].memory_used_bytes == 2 * 2**30
        assert nvml.devices()[3].read().power_limit_w == 300.0
    finally:
        nvml.close()


def test_pynvml_itself_runs_unchanged_on_the_fake_library(fake_nvml: FakeNvml) -> None:
    fake_nvml.fleet[0].set_load(1.0)
    fake_nvml.clock.advance(2.0)
    pynvml.nvmlInit()
    try:
        assert pynvml.nvmlDeviceGetCount() == 8
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        assert pynvml.nvmlDeviceGetName(h) == "NVIDIA H100 80GB HBM3"
        assert pynvml.nvmlDeviceGetPowerUsage(h) == pytest.approx(700_000, rel=0.02)
        assert pynvml.nvmlDeviceGetPowerManagementLimitConstraints(h) == [200_000, 700_000]
        with pytest.raises(pynvml.NVMLError_FunctionNotFound):
            pynvml.nvmlDeviceGetNvLinkState(h, 0)
    finally:
        pynvml.nvmlShutdown()


def test_not_supported_field_is_none_and_the_others_are_read(fake_nvml: FakeNvml) -> None:
    fake_nvml.fleet[1].inject("not_supported", field="temperature_memory")
    fake_nvml.fleet[1].inject("not_supported", field="power_instant")
    backend = NvmlBackend()
    try:
        r = backend.devices()[1].read()
        assert r.temperature_memory_c is None
        assert r.power_instant_w is None
        assert r.power_w is not None and r.energy_j is not None and r.temperature_gpu_c is not None
    finally:
        backend.close()


def test_lost_gpu_is_reported_down_and_the_others_keep_being_read(fake_nvml: FakeNvml) -> None:
    fleet, clock = fake_nvml.fleet, fake_nvml.clock
    collector = GpuCollector(NvmlBackend(), monotonic=fake_nvml.clock)
    try:
        collector.collect()
        fleet[3].inject("lost")
        fleet[0].set_load(1.0)
        clock.advance(2.0)
        samples = collector.collect()
        assert [s.up for s in samples] == [True, True, True, False, True, True, True, True]
        assert samples[0].reading is not None and samples[0].reading.power_w == pytest.approx(
            700, rel=0.02
        )
        assert samples[3].reading is not None  # last good reading kept, series stay
        assert samples[3].xid_counts == {79: 1}
        fleet[3].inject("clear")
        clock.advance(0.1)
        assert collector.collect()[3].up
    finally:
        collector.close()


def test_xid_events_are_counted_so_repeats_are_never_lost(fake_nvml: FakeNvml) -> None:
    collector = GpuCollector(NvmlBackend(), monotonic=fake_nvml.clock)
    try:
        for _ in range(3):
            fake_nvml.fleet[5].inject("xid", xid=48)
        fake_nvml.fleet[5].inject("xid", xid=94)
        collector.collect()
        fake_nvml.fleet[5].inject("xid", xid=48)
        samples = collector.collect()
        assert samples[5].xid_counts == {48: 4, 94: 1}
        assert all(not s.xid_counts for i, s in enumerate(samples) if i != 5)
    finally:
        collector.close()


def test_set_power_limit_reads_back_the_enforced_limit_and_maps_errors(
    fake_nvml: FakeNvml,
) -> None:
    backend = NvmlBackend()
    try:
        dev = backend.devices()[0]
        assert dev.set_power_limit(450.0) == 450.0
        with pytest.raises(InvalidArgument):
            dev.set_power_limit(800.0)
        fake_nvml.fleet[0].inject("no_permission")
        with pytest.raises(NoPermission):
            dev.set_power_limit(400.0)
        fake_nvml.fleet[0].inject("lost")
        with pytest.raises(GpuLost):
            dev.read()
    finally:
        backend.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(watts=st.floats(200.0, 700.0))
def test_a_limit_is_set_in_whole_milliwatts_never_above_the_watts_asked(
    fake_nvml: FakeNvml, watts: float
) -> None:
    backend, direct = NvmlBackend(), SimBackend(fake_nvml.fleet)
    try:
        for dev in (backend.devices()[0], direct.devices()[1]):
            enforced = dev.set_power_limit(watts)
            assert watts - 0.001 < enforced <= watts + 1e-9  # float noise is forgiven
            assert enforced * 1000 == pytest.approx(round(enforced * 1000), abs=1e-6)
        assert backend.devices()[0].set_power_limit(250.0 - 1e-13) == 250.0  # float noise kept
    finally:
        backend.close()


def test_energy_is_integrated_from_power_when_the_counter_is_not_supported(
    fake_nvml: FakeNvml,
) -> None:
    fleet, clock = fake_nvml.fleet, fake_nvml.clock
    fleet[0].inject("not_supported", field="energy")
    fleet[0].set_load(0.5)
    collector = GpuCollector(NvmlBackend(), monotonic=clock)
    try:
        collector.collect()
        start = fleet[0].true_energy_j()
        for _ in range(600):
            clock.advance(0.1)
            sample = collector.collect()[0]
        truth = fleet[0].true_energy_j() - start
        assert sample.energy_source == "integrated"
        assert sample.energy_j == pytest.approx(truth, rel=0.01)
    finally:
        collector.close()


def test_hardware_errors_other_than_lost_are_raised_with_the_samples(fake_nvml: FakeNvml) -> None:
    class Broken:
        name = "sim"

        def __init__(self, inner: NvmlBackend) -> None:
            self.inner = inner

        def devices(self):  # type: ignore[no-untyped-def]
            return self.inner.devices()

        def drain_xid_events(self):  # type: ignore[no-untyped-def]
            from wattwarden.hardware.errors import HardwareError

            raise HardwareError("event set broke")

        def close(self) -> None:
            self.inner.close()

    collector = GpuCollector(Broken(NvmlBackend()))
    try:
        with pytest.raises(PartialCollectionError) as info:
            collector.collect()
        assert len(info.value.samples) == 8
        assert "event set broke" in str(info.value)
    finally:
        collector.close()


def test_fast_passes_refresh_power_and_energy_and_full_reads_come_once_a_second(
    fake_nvml: FakeNvml,
) -> None:
    fleet, clock = fake_nvml.fleet, fake_nvml.clock
    collector = GpuCollector(NvmlBackend(), monotonic=clock)
    try:
        first_sample = collector.collect()[0]
        first = first_sample.reading
        assert first is not None and first.utilization_gpu_ratio == 0.0
        fleet[0].set_load(1.0)
        clock.advance(0.1)
        fast_sample = collector.collect()[0]
        assert fast_sample.power_source == "instant"
        assert fast_sample.power_w == pytest.approx(700, rel=0.02)  # fresh
        assert fast_sample.energy_j > first_sample.energy_j
        fast = fast_sample.reading
        assert fast is first  # the slow fields are the last full read's, not copied
        clock.advance(1.0)
        full = collector.collect()[0].reading
        assert full is not None and full.utilization_gpu_ratio == 1.0
    finally:
        collector.close()


def test_calls_after_the_last_shutdown_raise_uninitialized_like_real_nvml(
    fake_nvml: FakeNvml,
) -> None:
    pynvml.nvmlInit()
    pynvml.nvmlInit()  # NVML counts inits: two need two shutdowns
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    pynvml.nvmlShutdown()
    assert pynvml.nvmlDeviceGetCount() == 8
    assert pynvml.nvmlDeviceGetPowerUsage(handle) > 0
    pynvml.nvmlShutdown()
    for call in (
        pynvml.nvmlDeviceGetCount,
        pynvml.nvmlSystemGetDriverVersion,
        lambda: pynvml.nvmlDeviceGetHandleByIndex(0),
        lambda: pynvml.nvmlDeviceGetHandleByPciBusId(b"00000000:18:00.0"),
        lambda: pynvml.nvmlDeviceGetPowerUsage(handle),
        lambda: pynvml.nvmlDeviceGetName(handle),
        lambda: pynvml.nvmlDeviceGetFieldValues(handle, [83]),
        pynvml.nvmlEventSetCreate,
    ):
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            call()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlShutdown()  # one shutdown too many
    pynvml.nvmlInit()  # and it comes back
    try:
        assert pynvml.nvmlDeviceGetPowerUsage(handle) > 0
    finally:
        pynvml.nvmlShutdown()


@given(
    index=st.integers(0, 7),
    domain=st.sampled_from(["", "0:", "0000:", "00000000:"]),
    upper=st.booleans(),
    function=st.sampled_from([".0", ""]),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_handle_by_pci_bus_id_takes_every_form_nvml_accepts(
    fake_nvml: FakeNvml, index: int, domain: str, upper: bool, function: str
) -> None:
    if not domain and not function:
        function = ".0"  # bus:device alone is not a form NVML takes
    bus = int(fake_nvml.fleet[index].pci_bus_id.split(":")[1], 16)
    text = f"{domain}{bus:02x}:00{function}"
    text = text.upper() if upper else text
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(text.encode())
        assert pynvml.nvmlDeviceGetIndex(handle) == index
    finally:
        pynvml.nvmlShutdown()


def test_pci_bus_id_not_present_or_malformed_is_not_found_or_invalid(fake_nvml: FakeNvml) -> None:
    pynvml.nvmlInit()
    try:
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlDeviceGetHandleByPciBusId(b"0000:01:00.0")
        for bad in (b"", b"zz", b"18", b"18:00", b"0000:18:00.0.1", b"0000:xx:00.0", b"1:2:3:4"):
            with pytest.raises(pynvml.NVMLError_InvalidArgument):
                pynvml.nvmlDeviceGetHandleByPciBusId(bad)
    finally:
        pynvml.nvmlShutdown()


COUNTED_LOCATIONS = (
    pynvml.NVML_MEMORY_LOCATION_DRAM,
    pynvml.NVML_MEMORY_LOCATION_L2_CACHE,
    pynvml.NVML_MEMORY_LOCATION_SRAM,
)


@pytest.mark.parametrize(("model", "gen"), [("h100-sxm", 5), ("a100-sxm", 4)])
def test_ecc_and_pcie_link_queries_answer_like_the_board(model: str, gen: int) -> None:
    fleet = SimFleet(2, model=model, clock=ManualClock())
    install_fake_nvml(fleet)
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(1)
        assert pynvml.nvmlDeviceGetEccMode(h) == [pynvml.NVML_FEATURE_ENABLED] * 2
        for error in (
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
        ):
            for counter in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC):
                assert pynvml.nvmlDeviceGetTotalEccErrors(h, error, counter) == 0
                for where in COUNTED_LOCATIONS:
                    assert pynvml.nvmlDeviceGetMemoryErrorCounter(h, error, counter, where) == 0
                with pytest.raises(pynvml.NVMLError_NotSupported):
                    pynvml.nvmlDeviceGetMemoryErrorCounter(
                        h, error, counter, pynvml.NVML_MEMORY_LOCATION_TEXTURE_MEMORY
                    )
        assert pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h) == gen
        assert pynvml.nvmlDeviceGetGpuMaxPcieLinkGeneration(h) == gen
        assert pynvml.nvmlDeviceGetMaxPcieLinkWidth(h) == 16
        assert pynvml.nvmlDeviceGetCurrPcieLinkWidth(h) == 16
        assert pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h) == 1  # idle: trained down
        assert pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES) == 0
        fleet[1].set_load(1.0)
        assert pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h) == gen
        assert pynvml.nvmlDeviceGetPcieSpeed(h) == {4: 16000, 5: 32000}[gen]
        assert pynvml.nvmlDeviceGetPcieLinkMaxSpeed(h) == gen  # NVML_PCIE_LINK_MAX_SPEED_*
        assert pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES) > 0
    finally:
        pynvml.nvmlShutdown()
        uninstall_fake_nvml()


class OwnershipProbe:
    """A libnvidia-ml in front of the fake one that notes two threads inside one GPU at once.

    Every device call on a watched handle counts itself in and out, and in between yields the
    interpreter, so that any thread able to enter the same GPU then does.
    """

    def __init__(self, lib: FakeNvmlLib, handles: list[object]) -> None:
        self._lib = lib
        self._watched = {ctypes.cast(h, ctypes.c_void_p).value for h in handles}
        self._inside: dict[int | None, int] = {}
        self._guard = threading.Lock()
        self.overlaps: list[str] = []

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._lib, name)
        if not name.startswith("nvmlDevice"):
            return fn

        def call(*args: Any) -> Any:
            first = args[0] if args else None
            if not isinstance(first, pynvml.c_nvmlDevice_t):
                return fn(*args)
            address = ctypes.cast(first, ctypes.c_void_p).value
            if address not in self._watched:
                return fn(*args)
            with self._guard:
                self._inside[address] = self._inside.get(address, 0) + 1
                if self._inside[address] > 1:
                    self.overlaps.append(name)
            try:
                time.sleep(0)  # a yield, not a wait: let another thread in if it can get in
                return fn(*args)
            finally:
                with self._guard:
                    self._inside[address] -= 1

        return call


def test_one_caller_at_a_time_owns_a_gpu_and_a_set_reads_back_its_own_limit(
    fake_nvml: FakeNvml,
) -> None:
    backend = NvmlBackend()
    gpu = backend.devices()[0]
    probe = OwnershipProbe(fake_nvml.lib, [gpu.handle])
    install_library(probe)
    rounds = 150
    start = threading.Barrier(3)
    errors: list[BaseException] = []
    readbacks: list[tuple[float, float]] = []

    def sampler() -> None:  # what the sampler thread does every pass
        start.wait()
        for _ in range(rounds):
            gpu.read()
            gpu.read_power()

    def actuator(watts: tuple[float, float]) -> None:  # what an HTTP thread does through it
        start.wait()
        for i in range(rounds):
            asked = watts[i % 2]
            readbacks.append((asked, gpu.set_power_limit(asked)))
            gpu.read_power_limit_w()
            gpu.read_energy_j()

    def guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)

    threads = [
        threading.Thread(target=guarded, args=(sampler,)),
        threading.Thread(target=guarded, args=(actuator, (300.0, 350.0))),
        threading.Thread(target=guarded, args=(actuator, (400.0, 450.0))),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        backend.close()
    assert errors == []
    assert len(readbacks) == 2 * rounds
    assert [got for _, got in readbacks] == [asked for asked, _ in readbacks]
    assert probe.overlaps == []
