"""The reference inference workload: greedy generation requests, latency and energy per request.

Each request (a batch of prompts, ``new_tokens`` generated greedily) is one EnergyMeter window.
The report has latency p50/p95/p99, J per request and generated tokens per J. The model is freshly
initialised from the seed, or loaded from the newest training checkpoint in ``checkpoint_dir``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from wattwarden.config import ConfigError
from wattwarden.workloads.checkpoint import CheckpointError, load_latest
from wattwarden.workloads.common import WorkloadConfig, autocast, check_positive
from wattwarden.workloads.meter import EnergyMeter
from wattwarden.workloads.model import SyntheticTokens, TinyLM
from wattwarden.workloads.report import fmt, percentile, ratio, total
from wattwarden.workloads.runner import WorkloadRun, build_model


@dataclass(frozen=True, slots=True)
class InferConfig(WorkloadConfig):
    """Everything ``wattwarden workload infer`` runs with."""

    requests: int = 100
    batch_size: int = 1
    prompt_len: int = 32
    new_tokens: int = 16
    checkpoint_dir: Path | None = None
    warmup: int = 2

    def validate(self) -> None:
        """Raise ConfigError naming the first bad flag."""
        check_positive("--steps", self.requests)
        check_positive("--batch-size", self.batch_size)
        check_positive("--prompt-len", self.prompt_len)
        check_positive("--new-tokens", self.new_tokens)
        check_positive("--warmup", self.warmup, zero_ok=True)
        limit = self.check_model_flags()
        if self.prompt_len + self.new_tokens > limit:
            raise ConfigError(
                f"--prompt-len + --new-tokens must be at most {limit} for --size {self.size}"
            )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request."""

    request: int
    latency_s: float
    tokens: int
    energy_j: float | None
    """Energy of the request on the device that did the work (CPU packages, or the GPUs)."""
    host_energy_j: float | None


@dataclass(slots=True)
class InferResult:
    """What a run did; ``report`` is what ``--report`` writes."""

    records: list[RequestRecord]
    interrupted: bool
    report: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def generate(model: TinyLM, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of ``new_tokens`` tokens after each prompt (full recompute per token)."""
    tokens = prompts
    for _ in range(new_tokens):
        logits = model(tokens)[:, -1, :]
        tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens[:, prompts.shape[1] :]


def _load_weights(model: TinyLM, cfg: InferConfig, device: torch.device) -> str | None:
    if cfg.checkpoint_dir is None:
        return None
    latest = load_latest(cfg.checkpoint_dir, map_location=device)
    if latest is None:
        raise ConfigError(f"--checkpoint-dir: no checkpoint in {cfg.checkpoint_dir}")
    path, state = latest
    trained = state.get("config", {}).get("size")
    if trained != cfg.size:
        raise ConfigError(f"--size {cfg.size}: {path.name} holds a {trained} model")
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from e
    return str(path)


def run_infer(
    cfg: InferConfig,
    *,
    stop: threading.Event | None = None,
    stream: TextIO | None = None,
    tty: bool | None = None,
    meter: EnergyMeter | None = None,
    on_request: Callable[[RequestRecord], None] | None = None,
) -> InferResult:
    """Serve ``cfg.requests`` requests, or fewer if ``stop`` is set.

    ``meter`` measures instead of one opened for ``cfg.device`` (a meter on GPUs reports theirs).
    """
    cfg.validate()
    device, model = build_model(cfg)
    loaded_from = _load_weights(model, cfg, device)
    model.eval()
    prompts = SyntheticTokens(model.size.vocab_size, cfg.prompt_len - 1, cfg.batch_size, cfg.seed)
    tokens_per_request = cfg.batch_size * cfg.new_tokens

    records: list[RequestRecord] = []
    with WorkloadRun(
        cfg, "infer", cfg.requests, device, model, meter=meter, stop=stop, stream=stream, tty=tty
    ) as run:
        for _ in range(cfg.warmup):
            with autocast(device):
                generate(model, prompts.next_batch().to(device), cfg.new_tokens)
        run.meter.begin_window("run")
        run.meter.begin_window("request")
        while len(records) < cfg.requests and not run.stop.is_set():
            batch = prompts.next_batch().to(device, non_blocking=True)
            with autocast(device):
                generate(model, batch, cfg.new_tokens)
            m = run.meter.lap("request")
            n = len(records) + 1
            rec = RequestRecord(
                n, m.elapsed_s, tokens_per_request, run.target.energy_j(m), m.host_total_j
            )
            records.append(rec)
            if on_request is not None:
                on_request(rec)
            run.progress(
                n,
                samples=n * cfg.batch_size,
                tokens=n * tokens_per_request,
                text=f"{rec.latency_s * 1000:.1f} ms  {fmt(rec.energy_j, ' J/req', 3)}  "
                f"{fmt(ratio(rec.tokens, rec.energy_j), ' tok/J', 1)}",
            )
        whole = run.meter.end_window("run")
        run.meter.cancel_window("request")

    interrupted = len(records) < cfg.requests
    latencies = [r.latency_s for r in records]
    n = len(records)
    busy = sum(latencies)
    energy = total([r.energy_j for r in records])

    def ms(q: float) -> float | None:
        p = percentile(latencies, q)
        return None if p is None else p * 1000.0

    summary = {
        "requests": n,
        "time_s": busy,
        "wall_time_s": whole.elapsed_s,
        "latency_ms_p50": ms(50),
        "latency_ms_p95": ms(95),
        "latency_ms_p99": ms(99),
        "latency_ms_mean": busy / n * 1000.0 if n else None,
        "latency_ms_max": max(latencies) * 1000.0 if latencies else None,
        "requests_per_s": n / busy if busy > 0 else 0.0,
        "tokens": n * tokens_per_request,
        "tokens_per_s": n * tokens_per_request / busy if busy > 0 else 0.0,
        "energy_j": energy,
        "j_per_request": ratio(energy, n),
        "tokens_per_j": ratio(n * tokens_per_request, energy),
        "host_energy_j": total([r.host_energy_j for r in records]),
    }
    report = run.report(
        weights_from=loaded_from,
        interrupted=interrupted,
        requests=[asdict(r) for r in records],
        summary=summary,
    )
    per_request = summary["j_per_request"]
    energy_text = (
        run.target.describe(None)
        if per_request is None
        else f"{per_request:.3f} J/request, {fmt(summary['tokens_per_j'], ' tok/J', 1)} "
        f"({run.target.label})"
    )
    run.finish(
        report,
        f"{n} requests: p50 {fmt(summary['latency_ms_p50'], ' ms')}, "
        f"p95 {fmt(summary['latency_ms_p95'], ' ms')}, "
        f"p99 {fmt(summary['latency_ms_p99'], ' ms')}; {energy_text}",
    )
    return InferResult(records, interrupted, report)
