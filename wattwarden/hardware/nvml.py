"""The NVML backend: the only module that imports pynvml (nvidia-ml-py).

The same code runs on real GPUs and on the simulated fleet: for the simulator, a fake
``libnvidia-ml`` is installed *below* pynvml (:func:`install_library`, called by the simulator's
``install_fake_nvml`` where the simulated backend is chosen), so every call here goes through the
real pynvml module either way. This module never imports the simulator.

Reads are batched: power (average and instant), the energy counter, the enforced limit and memory
temperature come from one ``nvmlDeviceGetFieldValues`` call where the driver supports it.
NVML errors are mapped into :mod:`wattwarden.hardware.errors`; NotSupported means "omit this field".
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

import pynvml  # noqa: TID251 - this module is the one chokepoint for pynvml

from wattwarden.hardware.device import (
    GpuInfo,
    GpuReading,
    PowerReading,
    ProcessUsage,
    XidEvent,
    enforced_or_requested,
    limit_milliwatts,
)
from wattwarden.hardware.errors import (
    GpuLost,
    HardwareError,
    HardwareUnavailable,
    InvalidArgument,
    NoPermission,
    NotSupported,
)

T = TypeVar("T")

FI_MEMORY_TEMP = 82
FI_TOTAL_ENERGY_CONSUMPTION = 83
FI_POWER_AVERAGE = 185
FI_POWER_INSTANT = 186
FI_POWER_CURRENT_LIMIT = 190
_BATCH_FIELDS = (
    FI_POWER_AVERAGE,
    FI_POWER_INSTANT,
    FI_TOTAL_ENERGY_CONSUMPTION,
    FI_POWER_CURRENT_LIMIT,
    FI_MEMORY_TEMP,
)
_FAST_FIELDS = (FI_POWER_INSTANT, FI_TOTAL_ENERGY_CONSUMPTION)


class _Value(ctypes.Union):
    _fields_ = (
        ("dVal", ctypes.c_double),
        ("uiVal", ctypes.c_uint),
        ("ulVal", ctypes.c_ulong),
        ("ullVal", ctypes.c_ulonglong),
        ("sllVal", ctypes.c_longlong),
        ("siVal", ctypes.c_int),
        ("usVal", ctypes.c_ushort),
    )


class _FieldValue(ctypes.Structure):
    """``nvmlFieldValue_t``, laid out as pynvml's ``c_nvmlFieldValue_t``.

    pynvml's structures route every attribute access through Python-level hooks (for printing),
    which made them most of the cost of a 10 Hz power read; this plain structure, reused between
    calls, goes to the same C function (looked up through pynvml) without them.
    """

    _fields_ = (
        ("fieldId", ctypes.c_uint32),
        ("scopeId", ctypes.c_uint32),
        ("timestamp", ctypes.c_int64),
        ("latencyUsec", ctypes.c_int64),
        ("valueType", ctypes.c_uint),
        ("nvmlReturn", ctypes.c_uint),
        ("value", _Value),
    )


assert ctypes.sizeof(_FieldValue) == ctypes.sizeof(pynvml.c_nvmlFieldValue_t)


def _get_field_values(handle: Any, values: Any) -> None:
    """``nvmlDeviceGetFieldValues`` through pynvml's function lookup, on our own array."""
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")
    ret = fn(handle, ctypes.c_int32(len(values)), ctypes.byref(values))
    if ret != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(ret)


_XID_EVENT = 0x8
_MHZ = 1e6
_install_lock = threading.Lock()


def _map_error(e: pynvml.NVMLError, what: str) -> HardwareError:
    code = e.value
    text = f"{what}: {e}"
    if code == pynvml.NVML_ERROR_GPU_IS_LOST:
        return GpuLost(text)
    if code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
        return NotSupported(text)
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return NoPermission(text)
    if code == pynvml.NVML_ERROR_INVALID_ARGUMENT:
        return InvalidArgument(text)
    if code in (
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    ):
        return HardwareUnavailable(text)
    return HardwareError(text)


class CallTimings:
    """Per-NVML-call latency, collected when asked for (the real-GPU report uses it)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        """Record one call."""
        self.samples.setdefault(name, []).append(seconds)


def _call(timings: CallTimings | None, name: str, fn: Callable[..., T], *args: Any) -> T:
    """Call a pynvml function, mapping its errors."""
    start = time.perf_counter() if timings is not None else 0.0
    try:
        return fn(*args)
    except pynvml.NVMLError as e:
        raise _map_error(e, name) from e
    finally:
        if timings is not None:
            timings.add(name, time.perf_counter() - start)


def _opt(timings: CallTimings | None, name: str, fn: Callable[..., T], *args: Any) -> T | None:
    """Like :func:`_call`, but NotSupported gives None."""
    try:
        return _call(timings, name, fn, *args)
    except NotSupported:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlGpu:
    """One GPU through NVML, with one owner at a time.

    Who calls it: the sampler thread reads it every pass (:meth:`read`, :meth:`read_power`,
    :meth:`info`); HTTP threads reach it through the actuator (:meth:`info`,
    :meth:`read_power_limit_w`, :meth:`set_power_limit`) and the energy endpoint
    (:meth:`read_energy_j`); the main thread at start and exit (:meth:`info`, the actuator's
    recovery and restore). Never a full :meth:`read` outside the sampler.

    Each call reuses per-GPU state (the cached field-value arrays, the process-utilization
    cursor, the cached info), so every public method holds ``_lock`` for all of its driver calls:
    one caller owns the GPU for the length of a call, and a set and its read-back are one step.
    Uncontended, the lock costs well under a microsecond a call.
    """

    def __init__(
        self, handle: Any, index: int, driver_version: str, timings: CallTimings | None = None
    ) -> None:
        self._handle = handle
        self._index = index
        self._driver_version = driver_version
        self._timings = timings
        self._lock = threading.Lock()
        self._info: GpuInfo | None = None
        self._batch_supported = True
        self._field_arrays: dict[tuple[int, ...], Any] = {}
        self._process_util_since = 0

    @property
    def index(self) -> int:
        """The NVML index."""
        return self._index

    @property
    def handle(self) -> Any:
        """The NVML device handle."""
        return self._handle

    def info(self) -> GpuInfo:
        """Static facts, read once."""
        with self._lock:
            if self._info is None:
                h, t = self._handle, self._timings
                mem = _opt(t, "nvmlDeviceGetMemoryInfo", pynvml.nvmlDeviceGetMemoryInfo, h)
                limits = _opt(
                    t,
                    "nvmlDeviceGetPowerManagementLimitConstraints",
                    pynvml.nvmlDeviceGetPowerManagementLimitConstraints,
                    h,
                )
                default = _opt(
                    t,
                    "nvmlDeviceGetPowerManagementDefaultLimit",
                    pynvml.nvmlDeviceGetPowerManagementDefaultLimit,
                    h,
                )
                pci = _call(t, "nvmlDeviceGetPciInfo", pynvml.nvmlDeviceGetPciInfo, h)
                slowdown = self._threshold_c(pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
                max_operating = self._threshold_c(pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX)
                self._info = GpuInfo(
                    index=self._index,
                    uuid=_text(_call(t, "nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, h)),
                    name=_text(_call(t, "nvmlDeviceGetName", pynvml.nvmlDeviceGetName, h)),
                    pci_bus_id=_text(pci.busId),
                    driver_version=self._driver_version,
                    memory_total_bytes=None if mem is None else int(mem.total),
                    power_limit_min_w=None if limits is None else limits[0] / 1000.0,
                    power_limit_max_w=None if limits is None else limits[1] / 1000.0,
                    power_limit_default_w=None if default is None else default / 1000.0,
                    temperature_slowdown_c=slowdown,
                    temperature_max_operating_c=max_operating,
                )
            return self._info

    def _threshold_c(self, kind: int) -> float | None:
        """One temperature threshold in C, None where the GPU has none (caller holds ``_lock``).

        Drivers older than a threshold kind answer InvalidArgument rather than NotSupported
        (GPU_MAX came in a later NVML); either way the GPU gives no such threshold, and a
        missing threshold must not make the whole identity unreadable.
        """
        try:
            value = _opt(
                self._timings,
                "nvmlDeviceGetTemperatureThreshold",
                pynvml.nvmlDeviceGetTemperatureThreshold,
                self._handle,
                kind,
            )
        except InvalidArgument:
            return None
        return None if value is None else float(value)

    def _batch(self, field_ids: tuple[int, ...]) -> dict[int, int]:
        """One field-values call; the fields the device answered, by id (caller holds ``_lock``).

        The array is cached per field set and reused, so two calls at once would write into
        the same memory: hence the lock.
        """
        if not self._batch_supported:
            return {}
        values = self._field_arrays.get(field_ids)
        if values is None:
            values = (_FieldValue * len(field_ids))()
            for i, fid in enumerate(field_ids):
                values[i].fieldId = fid
            self._field_arrays[field_ids] = values
        try:
            _call(
                self._timings, "nvmlDeviceGetFieldValues", _get_field_values, self._handle, values
            )
        except NotSupported:
            self._batch_supported = False
            return {}
        out: dict[int, int] = {}
        for fv in values:
            status = fv.nvmlReturn
            if status == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise GpuLost(f"GPU {self._index} is lost")
            if status != pynvml.NVML_SUCCESS:
                continue
            if fv.valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG:
                out[fv.fieldId] = int(fv.value.ullVal)
            else:
                out[fv.fieldId] = int(fv.value.uiVal)
        return out

    def read(self) -> GpuReading:
        """One read: a field-values batch plus the calls NVML has no field for."""
        with self._lock:
            h, t = self._handle, self._timings
            fields = self._batch(_BATCH_FIELDS)

            def field_or(fid: int, name: str, fn: Callable[..., int], *args: Any) -> int | None:
                if fid in fields:
                    return fields[fid]
                return _opt(t, name, fn, h, *args)

            power = field_or(
                FI_POWER_AVERAGE, "nvmlDeviceGetPowerUsage", pynvml.nvmlDeviceGetPowerUsage
            )
            instant = fields.get(FI_POWER_INSTANT)
            energy = field_or(
                FI_TOTAL_ENERGY_CONSUMPTION,
                "nvmlDeviceGetTotalEnergyConsumption",
                pynvml.nvmlDeviceGetTotalEnergyConsumption,
            )
            limit = field_or(
                FI_POWER_CURRENT_LIMIT,
                "nvmlDeviceGetEnforcedPowerLimit",
                pynvml.nvmlDeviceGetEnforcedPowerLimit,
            )
            temp_mem = fields.get(FI_MEMORY_TEMP)
            temp = _opt(
                t,
                "nvmlDeviceGetTemperature",
                pynvml.nvmlDeviceGetTemperature,
                h,
                pynvml.NVML_TEMPERATURE_GPU,
            )
            util = _opt(t, "nvmlDeviceGetUtilizationRates", pynvml.nvmlDeviceGetUtilizationRates, h)
            mem = _opt(t, "nvmlDeviceGetMemoryInfo", pynvml.nvmlDeviceGetMemoryInfo, h)
            sm = _opt(
                t, "nvmlDeviceGetClockInfo", pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM
            )
            memclk = _opt(
                t, "nvmlDeviceGetClockInfo", pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM
            )
            reasons = _opt(
                t,
                "nvmlDeviceGetCurrentClocksEventReasons",
                pynvml.nvmlDeviceGetCurrentClocksEventReasons,
                h,
            )
            return GpuReading(
                power_w=None if power is None else power / 1000.0,
                power_instant_w=None if instant is None else instant / 1000.0,
                energy_j=None if energy is None else energy / 1000.0,
                power_limit_w=None if limit is None else limit / 1000.0,
                temperature_gpu_c=None if temp is None else float(temp),
                temperature_memory_c=None if temp_mem is None else float(temp_mem),
                utilization_gpu_ratio=None if util is None else util.gpu / 100.0,
                utilization_memory_ratio=None if util is None else util.memory / 100.0,
                memory_used_bytes=None if mem is None else int(mem.used),
                memory_total_bytes=None if mem is None else int(mem.total),
                clock_sm_hz=None if sm is None else sm * _MHZ,
                clock_memory_hz=None if memclk is None else memclk * _MHZ,
                clock_event_mask=None if reasons is None else int(reasons),
                processes=self._processes(),
            )

    def read_power(self) -> PowerReading:
        """Instant power and the energy counter in one field-values call."""
        with self._lock:
            fields = self._batch(_FAST_FIELDS)
            instant = fields.get(FI_POWER_INSTANT)
            energy = fields.get(FI_TOTAL_ENERGY_CONSUMPTION)
            if energy is None:
                energy = _opt(
                    self._timings,
                    "nvmlDeviceGetTotalEnergyConsumption",
                    pynvml.nvmlDeviceGetTotalEnergyConsumption,
                    self._handle,
                )
            average = None
            if instant is None:
                average = _opt(
                    self._timings,
                    "nvmlDeviceGetPowerUsage",
                    pynvml.nvmlDeviceGetPowerUsage,
                    self._handle,
                )
            return PowerReading(
                power_instant_w=None if instant is None else instant / 1000.0,
                energy_j=None if energy is None else energy / 1000.0,
                power_w=None if average is None else average / 1000.0,
            )

    def read_energy_j(self) -> float:
        """The energy counter alone (nvmlDeviceGetTotalEnergyConsumption), in J."""
        with self._lock:
            mj = _call(
                self._timings,
                "nvmlDeviceGetTotalEnergyConsumption",
                pynvml.nvmlDeviceGetTotalEnergyConsumption,
                self._handle,
            )
            return int(mj) / 1000.0

    def read_power_limit_w(self) -> float:
        """The enforced power limit alone (nvmlDeviceGetEnforcedPowerLimit), in W."""
        with self._lock:
            return self._enforced_limit_w()

    def _enforced_limit_w(self) -> float:
        """The enforced limit, in W; the caller holds ``_lock``."""
        mw = _call(
            self._timings,
            "nvmlDeviceGetEnforcedPowerLimit",
            pynvml.nvmlDeviceGetEnforcedPowerLimit,
            self._handle,
        )
        return int(mw) / 1000.0

    def _processes(self) -> tuple[ProcessUsage, ...]:
        """Processes on this GPU and their SM share since the last call (caller holds ``_lock``)."""
        h, t = self._handle, self._timings
        procs = _opt(
            t,
            "nvmlDeviceGetComputeRunningProcesses",
            pynvml.nvmlDeviceGetComputeRunningProcesses,
            h,
        )
        if not procs:
            return ()
        sm: dict[int, float] = {}
        try:
            samples = _call(
                t,
                "nvmlDeviceGetProcessUtilization",
                pynvml.nvmlDeviceGetProcessUtilization,
                h,
                self._process_util_since,
            )
            for s in samples:
                sm[int(s.pid)] = s.smUtil / 100.0
                self._process_util_since = max(self._process_util_since, int(s.timeStamp))
        except NotSupported:
            pass
        except HardwareError as e:
            if not isinstance(e.__cause__, pynvml.NVMLError_NotFound):
                raise
        return tuple(
            ProcessUsage(
                pid=int(p.pid),
                memory_used_bytes=None if p.usedGpuMemory is None else int(p.usedGpuMemory),
                sm_utilization_ratio=sm.get(int(p.pid)),
            )
            for p in sorted(procs, key=lambda p: int(p.pid))
        )

    def set_power_limit(self, watts: float) -> float:
        """Request a limit, then read back the enforced one (it can differ).

        The requested limit where the enforced one cannot be read (the set went through).
        """
        milliwatts = limit_milliwatts(watts)
        with self._lock:
            _call(
                self._timings,
                "nvmlDeviceSetPowerManagementLimit",
                pynvml.nvmlDeviceSetPowerManagementLimit,
                self._handle,
                milliwatts,
            )
            return enforced_or_requested(self._enforced_limit_w, milliwatts)


class NvmlBackend:
    """GPUs through NVML, real or fake. Raises HardwareUnavailable where there is no driver."""

    name = "nvml"

    def __init__(self, *, timings: CallTimings | None = None) -> None:
        self.timings = timings
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise _map_error(e, "nvmlInit") from e
        self._closed = False
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
            count = pynvml.nvmlDeviceGetCount()
            self._devices = [
                NvmlGpu(pynvml.nvmlDeviceGetHandleByIndex(i), i, driver, timings)
                for i in range(count)
            ]
        except pynvml.NVMLError as e:
            pynvml.nvmlShutdown()
            raise _map_error(e, "enumerating GPUs") from e
        self._index_by_address = {_address(d.handle): d.index for d in self._devices}
        self._events = self._register_xid_events()

    def _register_xid_events(self) -> Any:
        try:
            events = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError:
            return None
        for d in self._devices:
            try:
                pynvml.nvmlDeviceRegisterEvents(d.handle, _XID_EVENT, events)
            except pynvml.NVMLError:
                continue  # no XID events for this GPU (e.g. not supported); reads still work
        return events

    def devices(self) -> Sequence[NvmlGpu]:
        """The GPUs in index order."""
        return self._devices

    def drain_xid_events(self) -> list[XidEvent]:
        """XID events since the last call, without blocking."""
        out: list[XidEvent] = []
        if self._events is None:
            return out
        while True:
            try:
                data = pynvml.nvmlEventSetWait_v2(self._events, 0)
            except pynvml.NVMLError_Timeout:
                return out
            except pynvml.NVMLError as e:
                raise _map_error(e, "nvmlEventSetWait") from e
            index = self._index_by_address.get(_address(data.device))
            if index is not None and data.eventType & _XID_EVENT:
                out.append(XidEvent(index, int(data.eventData)))

    def close(self) -> None:
        """Free the event set and shut NVML down; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._events is not None:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlEventSetFree(self._events)
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _address(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def install_library(lib: object) -> None:
    """Put a stand-in for ``libnvidia-ml`` below pynvml, for this process.

    Everything that calls pynvml afterwards (this backend, gpustat, nvitop, zeus) goes through
    ``lib``. The simulator's fake library is put here by
    :func:`wattwarden.hardware.sim.fake_nvml.install_fake_nvml`; this module knows no simulator.
    Undo with :func:`uninstall_library`.
    """
    with _install_lock:
        pynvml.nvmlLib = lib
        pynvml._nvmlGetFunctionPointer_cache.clear()


def uninstall_library() -> None:
    """Forget the stand-in; the next nvmlInit loads the real library again."""
    with _install_lock:
        pynvml.nvmlLib = None
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlLib_refcount = 0


def pynvml_module() -> ModuleType:
    """The pynvml module (for tools that want to call it directly over the same library)."""
    module: ModuleType = pynvml
    return module
