"""The reference training workload: a small transformer LM on synthetic tokens, energy per step.

Each step is one EnergyMeter window (a ``lap``: one counter read per step), so the report has
time, samples/s, tokens/s, J/step and tokens/J for every step. Checkpoints are written every
``checkpoint_every`` steps, at the end, and when ``stop`` is set (the CLI sets it on SIGTERM or
SIGINT); a run started on a directory that holds a checkpoint resumes from it exactly: model,
optimizer, random states and the data stream's position are all restored, so the loss trajectory
is the one the uninterrupted run would have had (bit for bit on the CPU).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from wattwarden.config import ConfigError
from wattwarden.workloads.checkpoint import (
    CheckpointError,
    load_latest,
    remove_stale_temp_files,
    save_checkpoint,
)
from wattwarden.workloads.common import (
    WorkloadConfig,
    autocast,
    check_positive,
    rng_state,
    set_rng_state,
)
from wattwarden.workloads.meter import EnergyMeter, Measurement
from wattwarden.workloads.model import SyntheticTokens, lr_at
from wattwarden.workloads.report import fmt, ratio, total
from wattwarden.workloads.runner import EnergyTarget, WorkloadRun, build_model

log = logging.getLogger(__name__)

#: Settings a checkpoint must share with the run that resumes it.
_RESUME_KEYS = ("size", "batch_size", "seq_len", "seed", "lr", "warmup_steps")
_FLAGS = {k: "--" + k.replace("_", "-") for k in _RESUME_KEYS}


@dataclass(frozen=True, slots=True)
class TrainConfig(WorkloadConfig):
    """Everything ``wattwarden workload train`` runs with."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def validate(self) -> None:
        """Raise ConfigError naming the first bad flag."""
        check_positive("--steps", self.steps)
        check_positive("--batch-size", self.batch_size)
        check_positive("--seq-len", self.seq_len)
        check_positive("--warmup-steps", self.warmup_steps)
        check_positive("--checkpoint-every", self.checkpoint_every, zero_ok=True)
        check_positive("--keep-checkpoints", self.keep_checkpoints)
        limit = self.check_model_flags()
        if self.seq_len > limit:
            raise ConfigError(f"--seq-len must be at most {limit} for --size {self.size}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"--lr must be within (0, 1), got {self.lr}")


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One training step."""

    step: int
    loss: float
    lr: float
    time_s: float
    samples_per_s: float
    tokens_per_s: float
    energy_j: float | None
    """Energy of the step on the device that did the work (CPU packages, or the GPUs)."""
    host_energy_j: float | None
    tokens_per_j: float | None
    """Tokens per joule of ``energy_j``."""


@dataclass(slots=True)
class TrainResult:
    """What a run did; ``report`` is what ``--report`` writes."""

    start_step: int
    final_step: int
    interrupted: bool
    records: list[StepRecord]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        """Loss per step run in this process."""
        return [r.loss for r in self.records]


@dataclass(slots=True)
class _Totals:
    time_s: float = 0.0
    energy_j: float | None = None
    host_energy_j: float | None = None

    def add(self, m: Measurement, energy_j: float | None) -> None:
        self.time_s += m.elapsed_s
        if energy_j is not None:
            self.energy_j = (self.energy_j or 0.0) + energy_j
        if m.host_total_j is not None:
            self.host_energy_j = (self.host_energy_j or 0.0) + m.host_total_j


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    for key in _RESUME_KEYS:
        theirs, ours = saved.get(key), getattr(cfg, key)
        if theirs != ours:
            raise ConfigError(
                f"--checkpoint-dir: {path.name} was made with {_FLAGS[key]} {theirs}, "
                f"not {ours}; pass the same flags or use another --checkpoint-dir"
            )


def run_train(
    cfg: TrainConfig,
    *,
    stop: threading.Event | None = None,
    stream: TextIO | None = None,
    tty: bool | None = None,
    meter: EnergyMeter | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Train until ``cfg.steps`` (counted from step 0, across resumes) or until ``stop`` is set.

    ``on_step`` is called after every step (before any checkpoint of that step). ``meter``
    measures instead of one opened for ``cfg.device`` (a meter on GPUs reports their energy).
    """
    cfg.validate()
    device, model = build_model(cfg)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    data = SyntheticTokens(model.size.vocab_size, cfg.seq_len, cfg.batch_size, cfg.seed)
    totals = _Totals()
    start_step = 0
    resumed_from: str | None = None
    if cfg.checkpoint_dir is not None:
        if remove_stale_temp_files(cfg.checkpoint_dir):
            log.info("removed a partial checkpoint a killed run left in %s", cfg.checkpoint_dir)
        latest = load_latest(cfg.checkpoint_dir, map_location=device)
        if latest is not None:
            path, state = latest
            _check_resumable(state["config"], cfg, path)
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                data.load_state_dict(state["data"])
                set_rng_state(state["rng"], device)
            except (KeyError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from e
            start_step = int(state["step"])
            saved_totals = state.get("totals", {})
            totals = _Totals(
                float(saved_totals.get("time_s", 0.0)),
                saved_totals.get("energy_j"),
                saved_totals.get("host_energy_j"),
            )
            resumed_from = str(path)
    model.train()

    records: list[StepRecord] = []
    checkpoints: list[dict[str, Any]] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    step = start_step
    with WorkloadRun(
        cfg, "train", cfg.steps, device, model, meter=meter, stop=stop, stream=stream, tty=tty
    ) as run:
        if resumed_from is not None:
            run.display.message(f"resumed from {resumed_from} at step {start_step}")

        def checkpoint(step: int) -> None:
            assert cfg.checkpoint_dir is not None
            state = {
                "config": {k: getattr(cfg, k) for k in _RESUME_KEYS},
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "data": data.state_dict(),
                "rng": rng_state(device),
                "totals": {
                    "time_s": totals.time_s,
                    "energy_j": totals.energy_j,
                    "host_energy_j": totals.host_energy_j,
                },
            }
            path = save_checkpoint(cfg.checkpoint_dir, step, state, keep=cfg.keep_checkpoints)
            m = run.meter.lap("step")  # the write is not part of the next step
            checkpoints.append(
                {
                    "step": step,
                    "path": str(path),
                    "time_s": m.elapsed_s,
                    "energy_j": run.target.energy_j(m),
                }
            )

        run.meter.begin_window("run")
        run.meter.begin_window("step")
        while step < cfg.steps and not run.stop.is_set():
            lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = data.next_batch().to(device, non_blocking=True)
            with autocast(device):
                loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_value = float(loss.item())
            m = run.meter.lap("step")
            step += 1
            energy = run.target.energy_j(m)
            totals.add(m, energy)
            rec = StepRecord(
                step=step,
                loss=loss_value,
                lr=lr,
                time_s=m.elapsed_s,
                samples_per_s=cfg.batch_size / m.elapsed_s if m.elapsed_s > 0 else 0.0,
                tokens_per_s=tokens_per_step / m.elapsed_s if m.elapsed_s > 0 else 0.0,
                energy_j=energy,
                host_energy_j=m.host_total_j,
                tokens_per_j=ratio(tokens_per_step, energy),
            )
            records.append(rec)
            if on_step is not None:
                on_step(rec)
            run.progress(
                step,
                samples=step * cfg.batch_size,
                tokens=step * tokens_per_step,
                text=f"loss {rec.loss:.3f}  {rec.time_s * 1000:.1f} ms  "
                f"{rec.tokens_per_s:.0f} tok/s  "
                f"{fmt(rec.energy_j, ' J', 2)}  {fmt(rec.tokens_per_j, ' tok/J', 1)}",
            )
            if (
                cfg.checkpoint_dir is not None
                and cfg.checkpoint_every
                and step % cfg.checkpoint_every == 0
                and step < cfg.steps
            ):
                checkpoint(step)
        interrupted = step < cfg.steps
        if cfg.checkpoint_dir is not None and step > start_step:
            checkpoint(step)
        run.display.close()
        whole = run.meter.end_window("run")
        run.meter.cancel_window("step")

    if interrupted:
        run.display.message(f"stopped at step {step} of {cfg.steps}; checkpoint written")
    report = run.report(
        resumed_from=resumed_from,
        start_step=start_step,
        final_step=step,
        interrupted=interrupted,
        steps=[asdict(r) for r in records],
        checkpoints=checkpoints,
        summary=_summary(cfg, records, whole, run.target),
        total_since_step_0={
            "steps": step,
            "time_s": totals.time_s,
            "energy_j": totals.energy_j,
            "host_energy_j": totals.host_energy_j,
        },
    )
    s = report["summary"]
    efficiency = "" if s["tokens_per_j"] is None else f", {s['tokens_per_j']:.1f} tok/J"
    run.finish(
        report,
        f"{len(records)} steps in {s['time_s']:.2f} s, {s['tokens_per_s']:.0f} tok/s, "
        f"{run.target.describe(s['energy_j'])}{efficiency}, "
        f"final loss {fmt(s['final_loss'], '', 4)}",
    )
    return TrainResult(start_step, step, interrupted, records, report)


def _summary(
    cfg: TrainConfig, records: list[StepRecord], whole: Measurement, target: EnergyTarget
) -> dict[str, Any]:
    n = len(records)
    step_time = sum(r.time_s for r in records)
    samples, tokens = n * cfg.batch_size, n * cfg.batch_size * cfg.seq_len
    energy = total([r.energy_j for r in records])
    return {
        "steps": n,
        "time_s": step_time,
        "wall_time_s": whole.elapsed_s,
        "samples": samples,
        "tokens": tokens,
        "samples_per_s": samples / step_time if step_time > 0 else 0.0,
        "tokens_per_s": tokens / step_time if step_time > 0 else 0.0,
        "energy_j": energy,
        "j_per_step": ratio(energy, n),
        "tokens_per_j": ratio(tokens, energy),
        "host_energy_j": total([r.host_energy_j for r in records]),
        "run_energy_j": target.energy_j(whole),
        "final_loss": records[-1].loss if records else None,
    }
