"""The hardware layer's exception tree.

Every foreign error (NVML status codes, OS errors from sysfs) is mapped into one of these at the
boundary, so callers never see pynvml's exception classes.
"""


class HardwareError(Exception):
    """A hardware read or write failed."""


class HardwareUnavailable(HardwareError):
    """No driver or library: this backend cannot run on this machine."""


class GpuLost(HardwareError):
    """The GPU fell off the bus (NVML_ERROR_GPU_IS_LOST); it needs a reset or a reboot."""


class NotSupported(HardwareError):
    """The device does not support this query; callers omit the series."""


class NoPermission(HardwareError):
    """The caller lacks the privilege for this call (set calls need root)."""


class InvalidArgument(HardwareError):
    """A value was outside what the device accepts, e.g. a power limit out of range."""
