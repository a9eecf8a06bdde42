"""Per-model parameters for the simulated GPUs.

Figures are from public datasheets and ``nvidia-smi -q`` output of real boards: limit bounds, clocks
and memory size are the vendor's; idle power and the thermal constants are typical of an air- or
liquid-cooled HGX board. The power model is ``P = idle + dynamic * util * (f / f_max) ** alpha``:
with alpha = 2.6 and 5 % memory-bound work, removing 1 % of power near TDP costs about 0.4 % of
throughput, inside the 0.35-0.5 % that power-capping studies measured on A100 (e.g. Patel et al.,
"Characterizing Power Management Opportunities for LLMs in the Cloud", ASPLOS 2024).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuModelSpec:
    """What distinguishes one GPU model from another in the simulator."""

    key: str
    name: str
    power_min_w: float
    power_max_w: float
    power_default_w: float
    idle_w: float
    sm_clock_max_mhz: float
    sm_clock_min_mhz: float
    sm_clock_idle_mhz: float
    mem_clock_mhz: float
    memory_total_bytes: int
    thermal_resistance_c_per_w: float
    thermal_tau_s: float
    sw_thermal_c: float
    """Max operating temperature: software thermal slowdown engages here."""
    hw_slowdown_c: float
    """Hardware slowdown: clocks halve."""
    alpha: float = 2.6
    memory_bound_fraction: float = 0.05

    @property
    def dynamic_w(self) -> float:
        """Dynamic power at full utilization and maximum clock."""
        return self.power_default_w - self.idle_w


_MIB = 1024 * 1024

MODELS: dict[str, GpuModelSpec] = {
    spec.key: spec
    for spec in (
        GpuModelSpec(
            key="h100-sxm",
            name="NVIDIA H100 80GB HBM3",
            power_min_w=200.0,
            power_max_w=700.0,
            power_default_w=700.0,
            idle_w=70.0,
            sm_clock_max_mhz=1980.0,
            sm_clock_min_mhz=345.0,
            sm_clock_idle_mhz=345.0,
            mem_clock_mhz=2619.0,
            memory_total_bytes=81559 * _MIB,
            thermal_resistance_c_per_w=0.065,
            thermal_tau_s=20.0,
            sw_thermal_c=87.0,
            hw_slowdown_c=90.0,
        ),
        GpuModelSpec(
            key="a100-sxm",
            name="NVIDIA A100-SXM4-80GB",
            power_min_w=100.0,
            power_max_w=400.0,
            power_default_w=400.0,
            idle_w=55.0,
            sm_clock_max_mhz=1410.0,
            sm_clock_min_mhz=210.0,
            sm_clock_idle_mhz=210.0,
            mem_clock_mhz=1593.0,
            memory_total_bytes=81920 * _MIB,
            thermal_resistance_c_per_w=0.11,
            thermal_tau_s=20.0,
            sw_thermal_c=85.0,
            hw_slowdown_c=92.0,
        ),
    )
}
