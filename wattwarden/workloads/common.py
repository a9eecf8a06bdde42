"""Pieces the training and inference workloads share: device, precision, RNG state, the meter."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from wattwarden.collectors.rapl import DEFAULT_ROOT as RAPL_ROOT
from wattwarden.config import ConfigError
from wattwarden.workloads.meter import (
    SOURCES,
    EnergyMeter,
    EnergySourceError,
    Measurement,
    visible_gpu,
)
from wattwarden.workloads.model import SIZES

DEVICES = ("cpu", "cuda")


def check_positive(flag: str, value: int, *, zero_ok: bool = False) -> None:
    """Raise ConfigError naming ``flag`` unless ``value`` is positive (or zero when allowed)."""
    lo = 0 if zero_ok else 1
    if value < lo:
        need = "zero or more" if zero_ok else "at least 1"
        raise ConfigError(f"{flag} must be {need}, got {value}")


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Settings train and infer share (each adds its own)."""

    size: str = "tiny"
    seed: int = 0
    device: str = "cpu"
    report: Path | None = None
    gpu: int | None = None
    energy_source: str = "auto"
    agent_url: str | None = None
    threads: int | None = None
    log_interval_s: float = 5.0
    rapl_root: Path | None = None
    """Powercap sysfs root that CPU energy is read from (None: /sys/class/powercap)."""

    def check_model_flags(self) -> int:
        """Check the shared flags; returns the model size's longest sequence."""
        check_energy_source(self.energy_source, self.device)
        return check_model_flags(self.size, self.seed, self.threads)

    def as_json(self) -> dict[str, Any]:
        """The config as JSON-able values."""
        return config_json(self)


def check_model_flags(size: str, seed: int, threads: int | None) -> int:
    """Flags both workloads take; returns the model size's longest sequence."""
    if threads is not None:
        check_positive("--threads", threads)
    if size not in SIZES:
        raise ConfigError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if seed < 0:
        raise ConfigError(f"--seed must be zero or more, got {seed}")
    return SIZES[size].max_seq_len


def check_energy_source(source: str, device: str) -> None:
    """``--energy-source`` picks where GPU energy comes from; a CPU run is measured with RAPL."""
    if source not in SOURCES:
        raise ConfigError(f"--energy-source must be one of {', '.join(SOURCES)}, got {source!r}")
    if device == "cpu" and source in ("nvml", "agent"):
        raise ConfigError(
            f"--energy-source {source} reads GPU energy, but --device cpu runs on the CPU, "
            "whose energy comes from RAPL: use --energy-source auto (or none)"
        )


def config_json(config: Any) -> dict[str, Any]:
    """A workload config (a dataclass) as JSON-able values, for reports."""
    out: dict[str, Any] = asdict(config)
    for key in ("checkpoint_dir", "report", "rapl_root"):
        out[key] = None if out[key] is None else str(out[key])
    return out


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda`` (the first visible GPU); ConfigError when CUDA is not there."""
    if name not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device cuda: torch {torch.__version__} sees no CUDA GPU here; use --device cpu"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 mixed precision on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def open_meter(
    *,
    gpu: int | None,
    source: str,
    agent_url: str | None,
    device: torch.device,
    rapl_root: Path | None = None,
) -> EnergyMeter:
    """An EnergyMeter on the device that does the work.

    On CUDA: the workload's GPU (``--gpu``, else ``CUDA_VISIBLE_DEVICES``) from ``source``, and
    the host's RAPL counters beside it. On the CPU: RAPL only (``source`` ``none``: nothing);
    never a GPU, which a CPU run does not use.
    """
    check_energy_source(source, device.type)
    root = RAPL_ROOT if rapl_root is None else rapl_root
    if device.type != "cuda":
        return EnergyMeter(gpus=[], source="none", host=source != "none", rapl_root=root)
    index = visible_gpu() if gpu is None else gpu
    if index < 0:
        raise ConfigError(f"--gpu must be a GPU index (0 or more), got {index}")
    try:
        return EnergyMeter(
            gpus=[index],
            source=source,
            agent_url=agent_url,
            sync=torch.cuda.synchronize,
            rapl_root=root,
        )
    except EnergySourceError as e:
        raise ConfigError(f"--energy-source {source}: {e}") from e


def meter_for(
    cfg: WorkloadConfig, device: torch.device, meter: EnergyMeter | None
) -> tuple[EnergyMeter, bool, EnergyTarget]:
    """The meter a workload reports from (the one given, else its own), and what it measures.

    Returns (meter, whether the workload opened it and so closes it, its target).
    """
    own = meter is None
    if meter is None:
        meter = open_meter(
            gpu=cfg.gpu,
            source=cfg.energy_source,
            agent_url=cfg.agent_url,
            device=device,
            rapl_root=cfg.rapl_root,
        )
    return meter, own, EnergyTarget.of(meter, device, cfg.energy_source)


@dataclass(frozen=True, slots=True)
class EnergyTarget:
    """Whose energy a workload reports: the device that did the work, and where it is read.

    ``device`` is ``cpu`` (CPU packages, from RAPL) or ``gpu`` (the measured GPUs); ``source``
    is ``rapl``, ``nvml``, ``agent`` or ``none`` (not measured, for ``reason``).
    """

    device: str
    source: str
    reason: str = ""

    @classmethod
    def of(cls, meter: EnergyMeter, device: torch.device, requested: str) -> EnergyTarget:
        """The target of ``meter`` on ``device`` (a meter given on GPUs measures those)."""
        if device.type == "cuda" or meter.gpus:
            if meter.source != "none":
                return cls("gpu", meter.source)
            why = "--energy-source none" if requested == "none" else "no NVML and no agent"
            return cls("gpu", "none", why)
        if meter.rapl_readable:
            return cls("cpu", "rapl")
        return cls("cpu", "none", "--energy-source none" if requested == "none" else "no RAPL")

    @property
    def measured(self) -> bool:
        """Whether energy is measured at all."""
        return self.source != "none"

    def energy_j(self, m: Measurement) -> float | None:
        """The target's energy in one measurement window, or None."""
        if not self.measured:
            return None
        return m.gpu_total_j if self.device == "gpu" else m.cpu_energy_j

    @property
    def label(self) -> str:
        """What the figure is, for a summary line: ``CPU (RAPL) energy``, ``GPU energy (nvml)``."""
        return "CPU (RAPL) energy" if self.device == "cpu" else f"GPU energy ({self.source})"

    def describe(self, energy_j: float | None) -> str:
        """``12.3 J CPU (RAPL) energy``, or ``energy: not measured (no RAPL)``."""
        if not self.measured:
            return f"energy: not measured ({self.reason})"
        if energy_j is None:
            return f"{self.label}: not measured (a read failed)"
        return f"{energy_j:.1f} J {self.label}"


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random state a step can consume (dropout, init): torch CPU and CUDA, Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed torch (all devices) and Python's ``random``."""
    random.seed(seed)
    torch.manual_seed(seed)
