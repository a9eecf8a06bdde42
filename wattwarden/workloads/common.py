"""Settings and torch helpers train and infer share: config checks, device, precision, RNG state.

The frame they run in (meter, progress, report) is :mod:`wattwarden.workloads.runner`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from wattwarden.config import ConfigError
from wattwarden.workloads.energy_sources import SOURCES
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
