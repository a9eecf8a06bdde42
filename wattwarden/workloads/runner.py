"""The frame train and infer run in: model, meter, progress, and the report's shared fields.

::

    device, model = build_model(cfg)
    with WorkloadRun(cfg, "train", total, device, model, meter=..., stop=..., stream=...) as run:
        ...  # each step: run.meter.lap(...), then run.progress(...)
    report = run.report(steps=..., summary=...)
    run.finish(report, "100 steps in ...")

A job file holds only its own loop, records and summary.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import torch

from wattwarden import __version__
from wattwarden.collectors.rapl import DEFAULT_ROOT as RAPL_ROOT
from wattwarden.config import ConfigError
from wattwarden.workloads.common import (
    WorkloadConfig,
    check_energy_source,
    resolve_device,
    seed_everything,
)
from wattwarden.workloads.meter import EnergyMeter, EnergySourceError, Measurement, visible_gpu
from wattwarden.workloads.model import SIZES, TinyLM
from wattwarden.workloads.report import ProgressDisplay, ProgressReporter, write_json_atomic


def build_model(cfg: WorkloadConfig) -> tuple[torch.device, TinyLM]:
    """The device ``cfg`` names and a freshly seeded model on it (torch threads set first)."""
    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    return device, TinyLM(SIZES[cfg.size]).to(device)


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


class WorkloadRun:
    """One run of a workload: its meter and energy target, progress lines, agent progress.

    The meter is the one given (a meter on GPUs reports their energy), else one opened for
    ``cfg.device`` and closed with the run. Leaving the ``with`` block ends the progress bar,
    sends the final progress to the agent and closes an own meter; the report is built after.
    """

    def __init__(
        self,
        cfg: WorkloadConfig,
        workload: str,
        total: int,
        device: torch.device,
        model: TinyLM,
        *,
        meter: EnergyMeter | None,
        stop: threading.Event | None,
        stream: TextIO | None,
        tty: bool | None,
    ) -> None:
        self.cfg = cfg
        self.workload = workload
        self.device = device
        self.model = model
        self.stop = stop or threading.Event()
        self._own_meter = meter is None
        if meter is None:
            meter = open_meter(
                gpu=cfg.gpu,
                source=cfg.energy_source,
                agent_url=cfg.agent_url,
                device=device,
                rapl_root=cfg.rapl_root,
            )
        self.meter = meter
        self.target = EnergyTarget.of(meter, device, cfg.energy_source)
        self._reporter = ProgressReporter.from_env()
        self.display = ProgressDisplay(
            total,
            label=workload,
            stream=sys.stderr if stream is None else stream,
            tty=tty,
            interval_s=cfg.log_interval_s,
        )
        self.started_at = time.time()
        """Wall-clock (unix) time the run began, for the report."""

    def progress(self, done: int, *, samples: int, tokens: int, text: str) -> None:
        """Count ``done`` steps: to the agent (when supervised) and on the progress display."""
        if self._reporter is not None:
            self._reporter.update(done, samples, tokens)
        self.display.update(done, text)

    def close(self) -> None:
        """End the progress bar, send the final progress, close the meter if the run opened it."""
        self.display.close()
        if self._reporter is not None:
            self._reporter.close()
        if self._own_meter:
            self.meter.close()

    def __enter__(self) -> WorkloadRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def report(self, **fields: Any) -> dict[str, Any]:
        """What every workload reports (versions, config, model, energy), then ``fields``."""
        return {
            "workload": self.workload,
            "wattwarden_version": __version__,
            "torch_version": torch.__version__,
            "started_at": self.started_at,
            "config": self.cfg.as_json(),
            "device": str(self.device),
            "precision": "bf16-autocast" if self.device.type == "cuda" else "fp32",
            "model": {
                **self.model.size.as_dict(),
                "size": self.cfg.size,
                "parameters": self.model.parameter_count(),
            },
            "energy_device": self.target.device,
            "energy_source": self.target.source,
            "gpus": list(self.meter.gpus),
            "polled_gpus": list(self.meter.polled_gpus),
            **fields,
        }

    def finish(self, report: dict[str, Any], summary_line: str) -> None:
        """Write the report where ``--report`` says, and print the summary line."""
        if self.cfg.report is not None:
            write_json_atomic(self.cfg.report, report)
        self.display.message(summary_line)
