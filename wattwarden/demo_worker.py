"""A simulated job for ``wattwarden demo``: no PyTorch, but it behaves as a real job does.

Run under ``wattwarden job run`` (which sets ``WATTWARDEN_AGENT_URL``, ``WATTWARDEN_JOB_NAME``,
``WATTWARDEN_TOKEN`` and ``CUDA_VISIBLE_DEVICES`` to its GPU), it

- steps at a rate proportional to its GPU's SM clock, read from the agent's ``/api/v1/state``,
  so a power cap (lower clocks) visibly slows it;
- drives its simulated GPU's load in a shape: ``steady``, ``bursty`` (20 s high, 10 s low) or
  ``diurnal`` (a slow sine, as an inference service's traffic), through ``POST
  /api/v1/sim/load`` on top of the load its registration gives;
- reports its progress (steps, samples, tokens) to ``POST /api/v1/jobs/{name}/progress``;
- checkpoints its step to a file every few seconds and on SIGTERM/SIGINT, and resumes from it
  when started again (after a migration to another GPU, say), then exits 128 + the signal;
- with ``--steps N``, finishes (exit 0) once it reaches step N, as a batch job does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wattwarden.api.contract import SIM_LOAD, STATE
from wattwarden.cliutil import EXIT_FAILURE, Parser, float_arg, int_arg, stop_on_signals
from wattwarden.workloads.agent_client import (
    ENV_AGENT_URL,
    ENV_JOB_NAME,
    ENV_TOKEN,
    AgentClient,
    AgentError,
)

SHAPES = ("steady", "bursty", "diurnal")
REFERENCE_CLOCK_HZ = 1.98e9
"""The SM clock at which a job makes ``--steps-per-s`` (an H100 SXM's boost clock)."""
BURST_HIGH_S, BURST_LOW_S = 20.0, 10.0
DIURNAL_PERIOD_S = 240.0
"""A simulated day of an inference service's traffic, in seconds (slow, but seen in minutes)."""
CHECKPOINT_EVERY_S = 5.0
TICK_S = 1.0


def shape_utilization(shape: str, t: float, low: float, high: float) -> float:
    """The GPU load ``shape`` asks for ``t`` seconds after the job began, within low..high."""
    if shape == "bursty":
        return high if t % (BURST_HIGH_S + BURST_LOW_S) < BURST_HIGH_S else low
    if shape == "diurnal":
        return low + (high - low) * (0.5 - 0.5 * math.cos(2 * math.pi * t / DIURNAL_PERIOD_S))
    return high


@dataclass
class Progress:
    """Cumulative counts, as the agent keeps them."""

    step: float = 0.0
    samples_per_step: int = 1
    tokens_per_step: int = 0

    def counts(self) -> tuple[int, int, int]:
        """(step, samples, tokens) as whole numbers."""
        step = int(self.step)
        return step, step * self.samples_per_step, step * self.tokens_per_step


def load_checkpoint(path: Path) -> float:
    """The step saved in ``path`` (0 when there is none yet)."""
    try:
        return float(json.loads(path.read_text())["step"])
    except FileNotFoundError:
        return 0.0


def save_checkpoint(path: Path, step: float) -> None:
    """Write the step atomically (a kill mid-write leaves the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, path)


def _gpu_from_env() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    try:
        return int(visible)
    except ValueError:
        raise SystemExit(
            f"demo worker: CUDA_VISIBLE_DEVICES={visible!r} is not a GPU index"
        ) from None


def _sm_clock_hz(client: AgentClient, gpu: int) -> float | None:
    """The GPU's SM clock now, or None when the agent does not say (lost GPU, no answer)."""
    try:
        status, state = client.request("GET", STATE)
    except AgentError:
        return None
    if status != 200 or not isinstance(state, dict):
        return None
    for g in state.get("gpus", []):
        if g.get("index") == gpu:
            clock = g.get("clock_sm_hertz")
            return float(clock) if isinstance(clock, int | float) else None
    return None


def _set_load(client: AgentClient, gpu: int, utilization: float) -> None:
    with contextlib.suppress(AgentError):  # the next tick tries again
        client.request("POST", SIM_LOAD, {"gpu": gpu, "utilization": utilization}, auth=True)


def build_parser() -> argparse.ArgumentParser:
    """The worker's flags."""
    p = Parser(prog="python -m wattwarden.demo_worker", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="steady")
    p.add_argument(
        "--extra-load",
        type=float_arg,
        default=0.0,
        metavar="U",
        help="load the shape adds at its peak on top of the job's registered load (0..1)",
    )
    p.add_argument("--steps-per-s", type=float_arg, default=5.0, metavar="R")
    p.add_argument("--steps", type=int_arg, default=0, metavar="N", help="finish at N (0: never)")
    p.add_argument("--samples-per-step", type=int_arg, default=32, metavar="N")
    p.add_argument("--tokens-per-step", type=int_arg, default=0, metavar="N")
    p.add_argument("--checkpoint", type=Path, required=True, metavar="FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT (exit 128 + N) or, with ``--steps``, until done (exit 0)."""
    args = build_parser().parse_args(argv)
    url, name = os.environ.get(ENV_AGENT_URL), os.environ.get(ENV_JOB_NAME)
    if not url or not name:
        print(
            f"demo worker: run it under `wattwarden job run` ({ENV_AGENT_URL} and "
            f"{ENV_JOB_NAME} are not set)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    gpu = _gpu_from_env()
    client = AgentClient(url, token=os.environ.get(ENV_TOKEN), timeout_s=2.0)
    progress = Progress(
        load_checkpoint(args.checkpoint), args.samples_per_step, args.tokens_per_step
    )
    extra = min(max(args.extra_load, 0.0), 1.0)
    started = time.monotonic()
    last = started
    last_checkpoint = started
    with stop_on_signals() as (stop, received):
        while True:
            now = time.monotonic()
            clock = _sm_clock_hz(client, gpu)
            if clock is not None:  # no reading (lost GPU, no agent): no progress
                progress.step += (now - last) * args.steps_per_s * clock / REFERENCE_CLOCK_HZ
            last = now
            done = 0 < args.steps <= progress.step
            if done:
                progress.step = float(args.steps)
            if args.shape != "steady" and extra > 0:
                _set_load(client, gpu, shape_utilization(args.shape, now - started, 0.0, extra))
            # (the agent may be between a restart and the job's registration again)
            with contextlib.suppress(AgentError):
                client.post_progress(name, *progress.counts())
            if now - last_checkpoint >= CHECKPOINT_EVERY_S:
                save_checkpoint(args.checkpoint, progress.step)
                last_checkpoint = now
            if done or stop.wait(TICK_S):
                break
        if args.shape != "steady" and extra > 0:
            _set_load(client, gpu, 0.0)  # the GPU's extra load leaves with the job
        save_checkpoint(args.checkpoint, progress.step)
    client.close()
    return 128 + received[0] if received else 0


if __name__ == "__main__":
    sys.exit(main())
