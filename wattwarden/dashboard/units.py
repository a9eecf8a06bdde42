"""Numbers as an operator reads them (units always), and what state a GPU is in."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from wattwarden.dashboard.sources import GpuState

JOULES_PER_KWH = 3.6e6
JOULES_PER_WH = 3600.0

GPU_STATES = ("ok", "capped", "throttled", "hot", "lost")
"""What a GPU is, most urgent last; each GPU is in one (the most urgent that holds)."""
THROTTLE_EVENTS = frozenset({"sw_power_cap", "hw_slowdown", "hw_power_brake"})
THERMAL_EVENTS = frozenset({"sw_thermal", "hw_thermal"})
CAPPED_MARGIN_W = 1.0


def gpu_state(g: GpuState) -> str:
    """The GPU's state, the most urgent that holds.

    ``lost`` (off the bus), ``hot`` (at its max operating temperature, or thermal clock events),
    ``throttled`` (clocks held back by power), ``capped`` (limit under its default), else ``ok``.
    """
    if not g.up:
        return "lost"
    events = set(g.clock_events)
    hot_at = g.temperature_max_operating_c or g.temperature_slowdown_c
    if events & THERMAL_EVENTS or (
        g.temperature_c is not None and hot_at is not None and g.temperature_c >= hot_at
    ):
        return "hot"
    if events & THROTTLE_EVENTS:
        return "throttled"
    if (
        g.power_limit_w is not None
        and g.power_limit_default_w is not None
        and g.power_limit_w < g.power_limit_default_w - CAPPED_MARGIN_W
    ):
        return "capped"
    return "ok"


def count_states(gpus: Iterable[GpuState]) -> dict[str, int]:
    """GPUs per state, every state named (0 where none)."""
    counts = Counter(gpu_state(g) for g in gpus)
    return {s: counts.get(s, 0) for s in GPU_STATES}


def watts(w: float | None, digits: int = 0) -> str:
    """``412 W``, ``2.41 kW`` from 10 kW on; ``—`` for unknown (never 0)."""
    if w is None:
        return "—"
    if abs(w) >= 10_000:
        return f"{w / 1000:,.2f} kW"
    return f"{w:,.{digits}f} W"


def energy(j: float | None) -> str:
    """Joules in the unit that reads best: J, kJ, then kWh and MWh."""
    if j is None:
        return "—"
    if abs(j) < 1_000:
        return f"{j:,.0f} J"
    if abs(j) < JOULES_PER_KWH:
        return f"{j / 1000:,.1f} kJ"
    if abs(j) < 1000 * JOULES_PER_KWH:
        return f"{j / JOULES_PER_KWH:,.2f} kWh"
    return f"{j / JOULES_PER_KWH / 1000:,.2f} MWh"


def celsius(c: float | None) -> str:
    """``64 °C``."""
    return "—" if c is None else f"{c:.0f} °C"


def percent(ratio: float | None) -> str:
    """A 0..1 ratio as ``87 %``."""
    return "—" if ratio is None else f"{ratio * 100:.0f} %"


def gigahertz(hz: float | None) -> str:
    """A clock as ``1.98 GHz`` (short enough for a metric in a card two to a row)."""
    return "—" if hz is None else f"{hz / 1e9:,.2f} GHz"


def duration(seconds: float | None) -> str:
    """``45 s``, ``12 min``, ``3.5 h``."""
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def age(timestamp_s: float | None, now_s: float | None = None) -> str:
    """How long ago a wall-clock time was: ``3 s ago``."""
    if timestamp_s is None:
        return "never"
    now = time.time() if now_s is None else now_s
    return f"{duration(max(now - timestamp_s, 0.0))} ago"


def clock_time(timestamp_s: float | None) -> str:
    """A wall-clock time as local ``HH:MM:SS``."""
    if timestamp_s is None:
        return "—"
    return time.strftime("%H:%M:%S", time.localtime(timestamp_s))
