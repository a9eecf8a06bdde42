"""A fake ``libnvidia-ml`` over the simulator, for the real pynvml module to call.

nvidia-ml-py looks every C function up with ``getattr(pynvml.nvmlLib, name)`` and calls it with
ctypes arguments. :class:`FakeNvmlLib` provides those functions in Python: each writes its results
through the ``byref`` arguments' ``_obj`` and returns an NVML status code. Installed as
``pynvml.nvmlLib`` (:func:`install_fake_nvml`, where the simulated backend is chosen), the unchanged
pynvml module, and the tools built on it (gpustat, nvitop, zeus), run against the simulated GPUs.

The fake itself needs only the objects pynvml hands it; it is put below pynvml through
:mod:`wattwarden.hardware.nvml`, the one module that imports pynvml (which never imports this one).
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from wattwarden.hardware import nvml
from wattwarden.hardware.errors import GpuLost, InvalidArgument, NoPermission, NotSupported
from wattwarden.hardware.sim.fleet import CUDA_DRIVER_VERSION, DRIVER_VERSION, SimFleet
from wattwarden.hardware.sim.gpu import SimGpu

# NVML status codes (nvml.h)
SUCCESS = 0
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_NOT_FOUND = 6
ERROR_INSUFFICIENT_SIZE = 7
ERROR_TIMEOUT = 10
ERROR_GPU_IS_LOST = 15
ERROR_ARGUMENT_VERSION_MISMATCH = 25
ERROR_UNKNOWN = 999

_ERROR_STRINGS = {
    SUCCESS: b"Success",
    ERROR_UNINITIALIZED: b"Uninitialized",
    ERROR_INVALID_ARGUMENT: b"Invalid Argument",
    ERROR_NOT_SUPPORTED: b"Not Supported",
    ERROR_NO_PERMISSION: b"Insufficient Permissions",
    ERROR_NOT_FOUND: b"Not Found",
    ERROR_INSUFFICIENT_SIZE: b"Insufficient Size",
    ERROR_TIMEOUT: b"Timeout",
    ERROR_GPU_IS_LOST: b"GPU is lost",
    ERROR_ARGUMENT_VERSION_MISMATCH: b"Argument version mismatch",
    ERROR_UNKNOWN: b"Unknown Error",
}

# Field ids (nvml.h NVML_FI_DEV_*)
FI_MEMORY_TEMP = 82
FI_TOTAL_ENERGY_CONSUMPTION = 83
FI_POWER_AVERAGE = 185
FI_POWER_INSTANT = 186
FI_POWER_MIN_LIMIT = 187
FI_POWER_MAX_LIMIT = 188
FI_POWER_DEFAULT_LIMIT = 189
FI_POWER_CURRENT_LIMIT = 190
FI_ENERGY = 191
FI_POWER_REQUESTED_LIMIT = 192

VALUE_TYPE_UNSIGNED_INT = 1
VALUE_TYPE_UNSIGNED_LONG_LONG = 3

CLOCK_GRAPHICS, CLOCK_SM, CLOCK_MEM, CLOCK_VIDEO = 0, 1, 2, 3
EVENT_XID_CRITICAL_ERROR = 0x8
SUPPORTED_CLOCK_EVENTS = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80
TEMPERATURE_V1 = 1  # version number in the top byte of nvmlTemperature_v1 (0x100000C)
PCIE_UTIL_TX_BYTES, PCIE_UTIL_RX_BYTES = 0, 1
# Synthetic PCIe traffic at full load, in KB/s (host-to-device input feeding on an H100 node).
PCIE_TX_KBPS_AT_FULL_LOAD = 2_000_000
PCIE_RX_KBPS_AT_FULL_LOAD = 6_000_000

_ARCH = {"h100-sxm": 9, "a100-sxm": 7}
# PCIe: SXM5 boards (H100) link at Gen5 x16, SXM4 (A100) at Gen4 x16; an idle GPU trains its link
# down to Gen1 to save power, as ``nvidia-smi -q`` shows on real hosts.
_PCIE_MAX_GEN = {"h100-sxm": 5, "a100-sxm": 4}
PCIE_IDLE_GEN = 1
PCIE_WIDTH = 16
_PCIE_MBPS_PER_LANE = {1: 2500, 2: 5000, 3: 8000, 4: 16000, 5: 32000}
_PCIE_MAX_SPEED_ENUM = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}  # NVML_PCIE_LINK_MAX_SPEED_*MBPS
# ECC (nvml.h): error types, counter types, memory locations
MEMORY_ERROR_TYPES = (0, 1)  # corrected, uncorrected
ECC_COUNTER_TYPES = (0, 1)  # volatile, aggregate
MEMORY_LOCATIONS = range(8)  # L1, L2, DRAM, register file, texture, texture shm, CBU, SRAM
_UNSUPPORTED_LOCATIONS = (4, 5, 6)  # texture memory and CBU have no counters on Ampere/Hopper
_COMPUTE_CAPABILITY = {"h100-sxm": (9, 0), "a100-sxm": (8, 0)}


def _val(x: Any) -> Any:
    """The Python value of a ctypes scalar, or ``x`` itself."""
    return x.value if hasattr(x, "value") else x


def _put(ref: Any, value: Any) -> None:
    """Write a scalar through a ``byref`` argument."""
    ref._obj.value = value


def _put_str(buf: Any, size: Any, text: str) -> int:
    data = text.encode()
    if len(data) + 1 > _val(size):
        return ERROR_INSUFFICIENT_SIZE
    buf.value = data
    return SUCCESS


class _Uninitialized(Exception):
    """A call before nvmlInit or after the matching nvmlShutdown."""


def _status(fn: Callable[..., int]) -> Callable[..., int]:
    """Map the simulator's exceptions into NVML status codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> int:
        try:
            return fn(*args)
        except _Uninitialized:
            return ERROR_UNINITIALIZED
        except GpuLost:
            return ERROR_GPU_IS_LOST
        except NotSupported:
            return ERROR_NOT_SUPPORTED
        except NoPermission:
            return ERROR_NO_PERMISSION
        except InvalidArgument:
            return ERROR_INVALID_ARGUMENT

    return wrapper


class FakeNvmlLib:
    """The NVML C API, in Python, over a :class:`SimFleet`.

    Only functions NVML really has are defined; anything else raises ``AttributeError``, which
    pynvml turns into ``NVML_ERROR_FUNCTION_NOT_FOUND`` exactly as with an old driver.
    """

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self._lock = threading.Lock()
        self._initialized = 0
        self._handles: list[Any] = []  # struct instances; their addresses are the handles
        self._by_address: dict[int, SimGpu] = {}
        self._event_sets: dict[int, tuple[Any, set[int], deque[tuple[int, int]]]] = {}
        self.calls = 0

    # ----------------------------------------------------------------- helpers
    def _check_init(self) -> None:
        """Like NVML: every call but init and error strings needs a live nvmlInit (ref-counted)."""
        if self._initialized == 0:
            raise _Uninitialized

    def _gpu(self, handle: Any) -> SimGpu:
        self.calls += 1
        self._check_init()
        address = ctypes.cast(handle, ctypes.c_void_p).value
        gpu = self._by_address.get(address or 0)
        if gpu is None:
            raise InvalidArgument("unknown device handle")
        return gpu

    def _put_handle(self, ref: Any, gpu: SimGpu) -> None:
        with self._lock:
            if not self._handles:
                struct_type = ref._obj._type_
                self._handles = [struct_type() for _ in self.fleet.gpus]
                self._by_address = {
                    ctypes.addressof(s): g
                    for s, g in zip(self._handles, self.fleet.gpus, strict=True)
                }
        ref._obj.contents = self._handles[gpu.index]

    # ------------------------------------------------------------------ system
    @_status
    def nvmlInitWithFlags(self, flags: Any) -> int:
        """NvmlInitWithFlags."""
        with self._lock:
            self._initialized += 1
        return SUCCESS

    def nvmlInit_v2(self) -> int:
        """nvmlInit_v2."""
        return self.nvmlInitWithFlags(0)

    def nvmlShutdown(self) -> int:
        """NvmlShutdown."""
        with self._lock:
            if self._initialized == 0:
                return ERROR_UNINITIALIZED
            self._initialized -= 1
        return SUCCESS

    def nvmlErrorString(self, result: Any) -> bytes:
        """NvmlErrorString (pynvml sets ``restype = c_char_p``, so this returns bytes)."""
        return _ERROR_STRINGS.get(_val(result), b"Unknown Error")

    @_status
    def nvmlSystemGetDriverVersion(self, buf: Any, size: Any) -> int:
        """NvmlSystemGetDriverVersion."""
        self._check_init()
        return _put_str(buf, size, DRIVER_VERSION)

    @_status
    def nvmlSystemGetNVMLVersion(self, buf: Any, size: Any) -> int:
        """NvmlSystemGetNVMLVersion."""
        self._check_init()
        return _put_str(buf, size, "12." + DRIVER_VERSION)

    @_status
    def nvmlSystemGetCudaDriverVersion(self, ref: Any) -> int:
        """NvmlSystemGetCudaDriverVersion."""
        self._check_init()
        _put(ref, CUDA_DRIVER_VERSION)
        return SUCCESS

    nvmlSystemGetCudaDriverVersion_v2 = nvmlSystemGetCudaDriverVersion

    def nvmlDeviceGetCount_v2(self, ref: Any) -> int:
        """nvmlDeviceGetCount_v2."""
        if self._initialized == 0:
            return ERROR_UNINITIALIZED
        _put(ref, len(self.fleet.gpus))
        return SUCCESS

    # ----------------------------------------------------------------- handles
    @_status
    def nvmlDeviceGetHandleByIndex_v2(self, index: Any, ref: Any) -> int:
        """nvmlDeviceGetHandleByIndex_v2."""
        self._check_init()
        i = _val(index)
        if not 0 <= i < len(self.fleet.gpus):
            return ERROR_INVALID_ARGUMENT
        self._put_handle(ref, self.fleet.gpus[i])
        return SUCCESS

    @_status
    def nvmlDeviceGetHandleByUUID(self, uuid: Any, ref: Any) -> int:
        """NvmlDeviceGetHandleByUUID."""
        self._check_init()
        want = _val(uuid)
        want = want.decode() if isinstance(want, bytes) else str(want)
        for g in self.fleet.gpus:
            if g.uuid == want:
                self._put_handle(ref, g)
                return SUCCESS
        return ERROR_NOT_FOUND

    @_status
    def nvmlDeviceGetHandleByPciBusId_v2(self, bus_id: Any, ref: Any) -> int:
        """nvmlDeviceGetHandleByPciBusId_v2, taking every form NVML accepts.

        ``domain:bus:device.function``, ``domain:bus:device`` and ``bus:device.function``, hex,
        any case and width (``00000000:18:00.0``, ``0000:18:00.0``, ``18:00.0``).
        """
        self._check_init()
        text = _val(bus_id)
        want = parse_pci_bus_id(text.decode() if isinstance(text, bytes) else str(text))
        if want is None:
            return ERROR_INVALID_ARGUMENT
        for g in self.fleet.gpus:
            if parse_pci_bus_id(g.pci_bus_id) == want:
                self._put_handle(ref, g)
                return SUCCESS
        return ERROR_NOT_FOUND

    # ------------------------------------------------------------ static facts
    @_status
    def nvmlDeviceGetIndex(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetIndex."""
        _put(ref, self._gpu(handle).index)
        return SUCCESS

    @_status
    def nvmlDeviceGetMinorNumber(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetMinorNumber."""
        _put(ref, self._gpu(handle).index)
        return SUCCESS

    @_status
    def nvmlDeviceGetName(self, handle: Any, buf: Any, size: Any) -> int:
        """NvmlDeviceGetName."""
        return _put_str(buf, size, self._gpu(handle).spec.name)

    @_status
    def nvmlDeviceGetUUID(self, handle: Any, buf: Any, size: Any) -> int:
        """NvmlDeviceGetUUID."""
        return _put_str(buf, size, self._gpu(handle).uuid)

    @_status
    def nvmlDeviceGetSerial(self, handle: Any, buf: Any, size: Any) -> int:
        """NvmlDeviceGetSerial."""
        return _put_str(buf, size, f"165{self._gpu(handle).index:010d}")

    @_status
    def nvmlDeviceGetPciInfo_v3(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetPciInfo_v3."""
        g = self._gpu(handle)
        info = ref._obj
        info.busId = g.pci_bus_id.encode()
        info.busIdLegacy = g.pci_bus_id[4:].encode()
        info.domain = 0
        info.bus = int(g.pci_bus_id.split(":")[1], 16)
        info.device = 0
        info.pciDeviceId = 0x233010DE
        info.pciSubSystemId = 0x16C110DE
        return SUCCESS

    @_status
    def nvmlDeviceGetCudaComputeCapability(self, handle: Any, major: Any, minor: Any) -> int:
        """NvmlDeviceGetCudaComputeCapability."""
        cc = _COMPUTE_CAPABILITY.get(self._gpu(handle).spec.key, (9, 0))
        _put(major, cc[0])
        _put(minor, cc[1])
        return SUCCESS

    @_status
    def nvmlDeviceGetArchitecture(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetArchitecture."""
        _put(ref, _ARCH.get(self._gpu(handle).spec.key, 9))
        return SUCCESS

    @_status
    def nvmlDeviceGetPersistenceMode(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetPersistenceMode (always enabled on the simulated hosts)."""
        self._gpu(handle)
        _put(ref, 1)
        return SUCCESS

    @_status
    def nvmlDeviceGetComputeMode(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetComputeMode (default)."""
        self._gpu(handle)
        _put(ref, 0)
        return SUCCESS

    @_status
    def nvmlDeviceGetDisplayActive(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetDisplayActive (data-center boards drive no display)."""
        self._gpu(handle)
        _put(ref, 0)
        return SUCCESS

    nvmlDeviceGetDisplayMode = nvmlDeviceGetDisplayActive

    @_status
    def nvmlDeviceGetDriverModel(self, handle: Any, current: Any, pending: Any) -> int:
        """Windows driver models (WDDM/TCC) do not exist on Linux: NotSupported, as there."""
        self._gpu(handle)
        return ERROR_NOT_SUPPORTED

    nvmlDeviceGetDriverModel_v2 = nvmlDeviceGetDriverModel

    @_status
    def nvmlDeviceGetMigMode(self, handle: Any, current: Any, pending: Any) -> int:
        """MIG-capable boards with MIG disabled (current and pending mode 0)."""
        self._gpu(handle)
        _put(current, 0)
        _put(pending, 0)
        return SUCCESS

    @_status
    def nvmlDeviceIsMigDeviceHandle(self, handle: Any, ref: Any) -> int:
        """Every simulated handle is a physical GPU, never a MIG instance."""
        self._gpu(handle)
        _put(ref, 0)
        return SUCCESS

    @_status
    def nvmlDeviceGetEccMode(self, handle: Any, current: Any, pending: Any) -> int:
        """ECC is always on for HBM (current and pending mode enabled)."""
        self._gpu(handle)
        _put(current, 1)
        _put(pending, 1)
        return SUCCESS

    @_status
    def nvmlDeviceGetDefaultEccMode(self, handle: Any, ref: Any) -> int:
        """ECC is on by default."""
        self._gpu(handle)
        _put(ref, 1)
        return SUCCESS

    @_status
    def nvmlDeviceGetTotalEccErrors(
        self, handle: Any, error_type: Any, counter_type: Any, ref: Any
    ) -> int:
        """ECC is on (HBM) and the simulated memory never errs: zero for every counter."""
        self._gpu(handle)
        if _val(error_type) not in MEMORY_ERROR_TYPES or _val(counter_type) not in (
            ECC_COUNTER_TYPES
        ):
            return ERROR_INVALID_ARGUMENT
        _put(ref, 0)
        return SUCCESS

    @_status
    def nvmlDeviceGetMemoryErrorCounter(
        self, handle: Any, error_type: Any, counter_type: Any, location: Any, ref: Any
    ) -> int:
        """Errors per memory location: zero where the board counts them, else NotSupported."""
        self._gpu(handle)
        where = _val(location)
        if (
            _val(error_type) not in MEMORY_ERROR_TYPES
            or _val(counter_type) not in ECC_COUNTER_TYPES
            or where not in MEMORY_LOCATIONS
        ):
            return ERROR_INVALID_ARGUMENT
        if where in _UNSUPPORTED_LOCATIONS:
            return ERROR_NOT_SUPPORTED
        _put(ref, 0)
        return SUCCESS

    @_status
    def nvmlDeviceGetFanSpeed(self, handle: Any, ref: Any) -> int:
        """SXM boards have no fan of their own."""
        self._gpu(handle)
        return ERROR_NOT_SUPPORTED

    @_status
    def nvmlDeviceGetC2cModeInfoV(self, handle: Any, ref: Any) -> int:
        """No NVLink-C2C: these boards are not Grace Hopper superchips (zeus asks)."""
        self._gpu(handle)
        return ERROR_NOT_SUPPORTED

    @_status
    def nvmlDeviceGetPerformanceState(self, handle: Any, ref: Any) -> int:
        """P0 under load, P0 idle with clocks down (as on HGX boards with persistence on)."""
        self._gpu(handle)
        _put(ref, 0)
        return SUCCESS

    nvmlDeviceGetPowerState = nvmlDeviceGetPerformanceState

    # ------------------------------------------------------------------- power
    @_status
    def nvmlDeviceGetPowerUsage(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetPowerUsage: 1 s average on Ampere and newer, in mW."""
        _put(ref, self._gpu(handle).power_average_mw())
        return SUCCESS

    @_status
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetTotalEnergyConsumption, in mJ."""
        _put(ref, self._gpu(handle).total_energy_mj())
        return SUCCESS

    @_status
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetEnforcedPowerLimit, in mW."""
        _put(ref, self._gpu(handle).enforced_power_limit_mw())
        return SUCCESS

    @_status
    def nvmlDeviceGetPowerManagementLimit(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetPowerManagementLimit, in mW."""
        _put(ref, self._gpu(handle).power_limit_mw())
        return SUCCESS

    @_status
    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetPowerManagementDefaultLimit, in mW."""
        _put(ref, self._gpu(handle).default_power_limit_mw())
        return SUCCESS

    @_status
    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any, lo: Any, hi: Any) -> int:
        """nvmlDeviceGetPowerManagementLimitConstraints, in mW."""
        mn, mx = self._gpu(handle).power_limit_constraints_mw()
        _put(lo, mn)
        _put(hi, mx)
        return SUCCESS

    @_status
    def nvmlDeviceGetPowerManagementMode(self, handle: Any, ref: Any) -> int:
        """Power management is always enabled."""
        self._gpu(handle)
        _put(ref, 1)
        return SUCCESS

    @_status
    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit: Any) -> int:
        """nvmlDeviceSetPowerManagementLimit, in mW."""
        self._gpu(handle).set_power_limit_mw(int(_val(limit)))
        return SUCCESS

    # ---------------------------------------------------- thermals and clocks
    @_status
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: Any, ref: Any) -> int:
        """NvmlDeviceGetTemperature (GPU sensor only, as in NVML)."""
        if _val(sensor) != 0:
            return ERROR_INVALID_ARGUMENT
        _put(ref, self._gpu(handle).temperature_c("gpu"))
        return SUCCESS

    @_status
    def nvmlDeviceGetTemperatureV(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetTemperatureV (versioned struct ``nvmlTemperature_v1``; GPU sensor only)."""
        temp = ref._obj
        if temp.version >> 24 != TEMPERATURE_V1:
            return ERROR_ARGUMENT_VERSION_MISMATCH
        if _val(temp.sensorType) != 0:
            return ERROR_INVALID_ARGUMENT
        temp.temperature = self._gpu(handle).temperature_c("gpu")
        return SUCCESS

    @_status
    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, kind: Any, ref: Any) -> int:
        """Shutdown (0), slowdown (1), GPU max operating (3) thresholds."""
        sw, hw = self._gpu(handle).temperature_thresholds_c()
        value = {0: hw + 2, 1: hw, 3: sw}.get(_val(kind))
        if value is None:
            return ERROR_NOT_SUPPORTED
        _put(ref, value)
        return SUCCESS

    @_status
    def nvmlDeviceGetClockInfo(self, handle: Any, kind: Any, ref: Any) -> int:
        """nvmlDeviceGetClockInfo, in MHz."""
        k = _val(kind)
        which = {CLOCK_GRAPHICS: "sm", CLOCK_SM: "sm", CLOCK_MEM: "mem"}.get(k)
        if which is None:
            return ERROR_NOT_SUPPORTED
        _put(ref, self._gpu(handle).clock_mhz(which))
        return SUCCESS

    @_status
    def nvmlDeviceGetMaxClockInfo(self, handle: Any, kind: Any, ref: Any) -> int:
        """nvmlDeviceGetMaxClockInfo, in MHz."""
        which = {CLOCK_GRAPHICS: "sm", CLOCK_SM: "sm", CLOCK_MEM: "mem"}.get(_val(kind))
        if which is None:
            return ERROR_NOT_SUPPORTED
        _put(ref, self._gpu(handle).max_clock_mhz(which))
        return SUCCESS

    @_status
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetCurrentClocksEventReasons."""
        _put(ref, self._gpu(handle).clock_event_reasons())
        return SUCCESS

    nvmlDeviceGetCurrentClocksThrottleReasons = nvmlDeviceGetCurrentClocksEventReasons

    @_status
    def nvmlDeviceGetSupportedClocksEventReasons(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetSupportedClocksEventReasons."""
        self._gpu(handle)
        _put(ref, SUPPORTED_CLOCK_EVENTS)
        return SUCCESS

    nvmlDeviceGetSupportedClocksThrottleReasons = nvmlDeviceGetSupportedClocksEventReasons

    # ----------------------------------------------------- utilization, memory
    @_status
    def nvmlDeviceGetUtilizationRates(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetUtilizationRates, in percent."""
        gpu_pct, mem_pct = self._gpu(handle).utilization_pct()
        ref._obj.gpu = gpu_pct
        ref._obj.memory = mem_pct
        return SUCCESS

    @_status
    def nvmlDeviceGetEncoderUtilization(self, handle: Any, util: Any, period: Any) -> int:
        """No video work runs on the simulated GPUs."""
        self._gpu(handle)
        _put(util, 0)
        _put(period, 167000)
        return SUCCESS

    nvmlDeviceGetDecoderUtilization = nvmlDeviceGetEncoderUtilization

    @_status
    def nvmlDeviceGetPcieThroughput(self, handle: Any, counter: Any, ref: Any) -> int:
        """PCIe TX/RX throughput in KB/s; synthetic, proportional to the GPU's utilization."""
        kind = _val(counter)
        if kind not in (PCIE_UTIL_TX_BYTES, PCIE_UTIL_RX_BYTES):
            return ERROR_INVALID_ARGUMENT
        gpu_pct, _ = self._gpu(handle).utilization_pct()
        tx = kind == PCIE_UTIL_TX_BYTES
        full = PCIE_TX_KBPS_AT_FULL_LOAD if tx else PCIE_RX_KBPS_AT_FULL_LOAD
        _put(ref, full * gpu_pct // 100)
        return SUCCESS

    def _pcie_gen(self, handle: Any) -> tuple[int, int]:
        """(current, max) link generation: the board's maximum under load, Gen1 when idle."""
        gpu = self._gpu(handle)
        top = _PCIE_MAX_GEN.get(gpu.spec.key, 4)
        busy = gpu.utilization_pct()[0] > 0
        return (top if busy else PCIE_IDLE_GEN), top

    @_status
    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetCurrPcieLinkGeneration."""
        _put(ref, self._pcie_gen(handle)[0])
        return SUCCESS

    @_status
    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetMaxPcieLinkGeneration (of the link: the GPU and the slot agree here)."""
        _put(ref, self._pcie_gen(handle)[1])
        return SUCCESS

    nvmlDeviceGetGpuMaxPcieLinkGeneration = nvmlDeviceGetMaxPcieLinkGeneration

    @_status
    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetCurrPcieLinkWidth (x16; the width does not train down at idle)."""
        self._gpu(handle)
        _put(ref, PCIE_WIDTH)
        return SUCCESS

    nvmlDeviceGetMaxPcieLinkWidth = nvmlDeviceGetCurrPcieLinkWidth

    @_status
    def nvmlDeviceGetPcieSpeed(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetPcieSpeed: the current per-lane rate in MB/s."""
        _put(ref, _PCIE_MBPS_PER_LANE[self._pcie_gen(handle)[0]])
        return SUCCESS

    @_status
    def nvmlDeviceGetPcieLinkMaxSpeed(self, handle: Any, ref: Any) -> int:
        """NvmlDeviceGetPcieLinkMaxSpeed, as an NVML_PCIE_LINK_MAX_SPEED_* value."""
        _put(ref, _PCIE_MAX_SPEED_ENUM[self._pcie_gen(handle)[1]])
        return SUCCESS

    @_status
    def nvmlDeviceGetMemoryInfo(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetMemoryInfo, in bytes."""
        total, used = self._gpu(handle).memory_bytes()
        ref._obj.total = total
        ref._obj.used = used
        ref._obj.free = total - used
        return SUCCESS

    @_status
    def nvmlDeviceGetMemoryInfo_v2(self, handle: Any, ref: Any) -> int:
        """nvmlDeviceGetMemoryInfo_v2 (reserved memory is zero here)."""
        total, used = self._gpu(handle).memory_bytes()
        ref._obj.total = total
        ref._obj.reserved = 0
        ref._obj.used = used
        ref._obj.free = total - used
        return SUCCESS

    @_status
    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any, count: Any, procs: Any) -> int:
        """Compute processes with their memory; the NVML two-call size protocol."""
        running = sorted(self._gpu(handle).processes(), key=lambda p: p.pid)
        capacity = count._obj.value
        count._obj.value = len(running)
        if not running:
            return SUCCESS
        if procs is None or capacity < len(running):
            return ERROR_INSUFFICIENT_SIZE
        for i, p in enumerate(running):
            procs[i].pid = p.pid
            procs[i].usedGpuMemory = p.memory_bytes
            procs[i].gpuInstanceId = 0xFFFFFFFF
            procs[i].computeInstanceId = 0xFFFFFFFF
        return SUCCESS

    nvmlDeviceGetComputeRunningProcesses_v2 = nvmlDeviceGetComputeRunningProcesses_v3

    @_status
    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: Any, count: Any, procs: Any) -> int:
        """No graphics processes on the simulated GPUs."""
        self._gpu(handle)
        count._obj.value = 0
        return SUCCESS

    nvmlDeviceGetGraphicsRunningProcesses_v2 = nvmlDeviceGetGraphicsRunningProcesses_v3
    nvmlDeviceGetMPSComputeRunningProcesses_v3 = nvmlDeviceGetGraphicsRunningProcesses_v3
    nvmlDeviceGetMPSComputeRunningProcesses_v2 = nvmlDeviceGetGraphicsRunningProcesses_v3

    @_status
    def nvmlDeviceGetProcessUtilization(
        self, handle: Any, samples: Any, count: Any, since: Any
    ) -> int:
        """Per-process SM utilization samples; the NVML two-call size protocol."""
        gpu = self._gpu(handle)
        running = sorted(gpu.processes(), key=lambda p: p.pid)
        if not running:
            return ERROR_NOT_FOUND
        capacity = count._obj.value
        count._obj.value = len(running)
        if samples is None or capacity < len(running):
            return ERROR_INSUFFICIENT_SIZE
        now_us = int(time.time() * 1e6)
        for i, p in enumerate(running):
            samples[i].pid = p.pid
            samples[i].timeStamp = now_us
            samples[i].smUtil = round(p.utilization * 100)
            samples[i].memUtil = round(p.utilization * 55)
            samples[i].encUtil = 0
            samples[i].decUtil = 0
        return SUCCESS

    # ------------------------------------------------------------ field values
    @_status
    def nvmlDeviceGetFieldValues(self, handle: Any, count: Any, ref: Any) -> int:
        """Batched reads of power, energy, limits and memory temperature."""
        gpu = self._gpu(handle)
        if gpu.lost:
            return ERROR_GPU_IS_LOST
        values = ref._obj
        now_us = int(time.time() * 1e6)
        for i in range(_val(count)):
            fv = values[i]
            fv.timestamp = now_us
            fv.latencyUsec = 0
            read = self._field_reader(gpu, fv.fieldId) if fv.scopeId == 0 else None
            if read is None:
                fv.nvmlReturn = ERROR_NOT_SUPPORTED
                continue
            try:
                value, kind = read()
            except NotSupported:
                fv.nvmlReturn = ERROR_NOT_SUPPORTED
                continue
            except GpuLost:
                fv.nvmlReturn = ERROR_GPU_IS_LOST
                continue
            fv.valueType = kind
            if kind == VALUE_TYPE_UNSIGNED_LONG_LONG:
                fv.value.ullVal = value
            else:
                fv.value.uiVal = value
            fv.nvmlReturn = SUCCESS
        return SUCCESS

    @staticmethod
    def _field_reader(gpu: SimGpu, field_id: int) -> Callable[[], tuple[int, int]] | None:
        entry = _FIELD_READERS.get(field_id)
        if entry is None:
            return None
        read, kind = entry
        return lambda: (read(gpu), kind)

    # ------------------------------------------------------------------ events
    @_status
    def nvmlEventSetCreate(self, ref: Any) -> int:
        """NvmlEventSetCreate."""
        self._check_init()
        struct = ref._obj._type_()
        with self._lock:
            self._event_sets[ctypes.addressof(struct)] = (struct, set(), deque(maxlen=4096))
        ref._obj.contents = struct
        return SUCCESS

    def _event_set(self, event_set: Any) -> tuple[Any, set[int], deque[tuple[int, int]]] | None:
        return self._event_sets.get(ctypes.cast(event_set, ctypes.c_void_p).value or 0)

    @_status
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any, ref: Any) -> int:
        """Only XID critical errors are simulated."""
        self._gpu(handle)
        _put(ref, EVENT_XID_CRITICAL_ERROR)
        return SUCCESS

    @_status
    def nvmlDeviceRegisterEvents(self, handle: Any, types: Any, event_set: Any) -> int:
        """NvmlDeviceRegisterEvents (XID critical errors only)."""
        gpu = self._gpu(handle)
        es = self._event_set(event_set)
        if es is None:
            return ERROR_INVALID_ARGUMENT
        if _val(types) & ~EVENT_XID_CRITICAL_ERROR:
            return ERROR_NOT_SUPPORTED
        es[1].add(gpu.index)
        return SUCCESS

    def nvmlEventSetWait_v2(self, event_set: Any, ref: Any, timeout_ms: Any) -> int:
        """Wait up to ``timeout_ms`` for an XID on a registered GPU."""
        if self._initialized == 0:
            return ERROR_UNINITIALIZED
        es = self._event_set(event_set)
        if es is None:
            return ERROR_INVALID_ARGUMENT
        _, registered, queue = es
        deadline = time.monotonic() + _val(timeout_ms) / 1000.0
        while True:
            for index in sorted(registered):
                queue.extend((index, x) for x in self.fleet.gpus[index].pop_xids())
            if queue:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ERROR_TIMEOUT
            threading.Event().wait(min(remaining, 0.01))
        index, xid = queue.popleft()
        data = ref._obj
        data.device = ctypes.pointer(self._handles[index]) if self._handles else None
        data.eventType = EVENT_XID_CRITICAL_ERROR
        data.eventData = xid
        data.gpuInstanceId = 0xFFFFFFFF
        data.computeInstanceId = 0xFFFFFFFF
        return SUCCESS

    def nvmlEventSetFree(self, event_set: Any) -> int:
        """NvmlEventSetFree."""
        with self._lock:
            self._event_sets.pop(ctypes.cast(event_set, ctypes.c_void_p).value or 0, None)
        return SUCCESS


def install_fake_nvml(fleet: SimFleet) -> FakeNvmlLib:
    """Put a fake libnvidia-ml over ``fleet`` below pynvml, for this process.

    Everything that calls pynvml afterwards (our NVML backend, gpustat, nvitop, zeus) sees the
    simulated GPUs. Undo with :func:`uninstall_fake_nvml`.
    """
    lib = FakeNvmlLib(fleet)
    nvml.install_library(lib)
    return lib


def uninstall_fake_nvml() -> None:
    """Forget the fake library; the next nvmlInit loads the real one again."""
    nvml.uninstall_library()


def parse_pci_bus_id(text: str) -> tuple[int, int, int, int] | None:
    """(domain, bus, device, function) from any form NVML takes; None if it is none of them."""
    parts = text.strip().split(":")
    if len(parts) == 3:
        domain, bus, rest = parts
    elif len(parts) == 2:
        domain, (bus, rest) = "0", parts
    else:
        return None
    if "." in rest:
        device, function = rest.split(".", 1)
    elif len(parts) == 3:
        device, function = rest, "0"  # domain:bus:device
    else:
        return None
    try:
        out = tuple(int(x, 16) for x in (domain, bus, device, function))
    except ValueError:
        return None
    limits = (0xFFFFFFFF, 0xFF, 0x1F, 0x7)
    if any(not x.isalnum() for x in (domain, bus, device, function)) or any(
        not 0 <= v <= hi for v, hi in zip(out, limits, strict=True)
    ):
        return None
    return out[0], out[1], out[2], out[3]


_U32, _U64 = VALUE_TYPE_UNSIGNED_INT, VALUE_TYPE_UNSIGNED_LONG_LONG
#: field id -> (read from the simulated GPU, NVML value type); built once, not per call
_FIELD_READERS: dict[int, tuple[Callable[[SimGpu], int], int]] = {
    FI_MEMORY_TEMP: (lambda g: g.temperature_c("memory"), _U32),
    FI_TOTAL_ENERGY_CONSUMPTION: (SimGpu.total_energy_mj, _U64),
    FI_ENERGY: (SimGpu.total_energy_mj, _U64),
    FI_POWER_AVERAGE: (SimGpu.power_average_mw, _U32),
    FI_POWER_INSTANT: (SimGpu.power_instant_mw, _U32),
    FI_POWER_MIN_LIMIT: (lambda g: g.power_limit_constraints_mw()[0], _U32),
    FI_POWER_MAX_LIMIT: (lambda g: g.power_limit_constraints_mw()[1], _U32),
    FI_POWER_DEFAULT_LIMIT: (SimGpu.default_power_limit_mw, _U32),
    FI_POWER_CURRENT_LIMIT: (SimGpu.enforced_power_limit_mw, _U32),
    FI_POWER_REQUESTED_LIMIT: (SimGpu.power_limit_mw, _U32),
}
