"""``wattwarden workload train|infer`` and ``wattwarden job run``.

Registered into the main command tree by :func:`add_workload_parser` and :func:`add_job_parser`.
Nothing here imports torch: the handlers import the workloads when they run, so ``--help``
and the other commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wattwarden.cliutil import EXIT_FAILURE, float_arg, int_arg, setup_logging, stop_on_signals
from wattwarden.config import ConfigError
from wattwarden.workloads.agent_client import (
    DEFAULT_AGENT_URL,
    ENV_AGENT_URL,
    check_url,
    resolve_token,
)

SIZES = ("tiny", "small", "medium")
#: The load a simulated GPU gets from a job that does not say (the agent's default, kept equal
#: to ``wattwarden.agent.SIM_JOB_UTILIZATION``; workloads talk to the agent over HTTP only).
SIM_JOB_UTILIZATION = 0.8
ENERGY_SOURCES = ("auto", "nvml", "agent", "none")


def _common_flags(p: argparse.ArgumentParser, *, steps_help: str, batch_default: int) -> None:
    p.add_argument("--steps", type=int_arg, default=100, metavar="N", help=steps_help)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--size", choices=SIZES, default="tiny", help="model size (default tiny)")
    p.add_argument(
        "--batch-size",
        type=int_arg,
        default=batch_default,
        metavar="B",
        help=f"default {batch_default}",
    )
    p.add_argument("--seed", type=int_arg, default=0, metavar="S", help="data and init seed")
    p.add_argument("--report", type=Path, metavar="FILE", help="write a JSON report here")
    p.add_argument(
        "--gpu",
        type=int_arg,
        metavar="I",
        help="NVML index of the GPU to measure (default: first of CUDA_VISIBLE_DEVICES, else 0)",
    )
    p.add_argument(
        "--energy-source",
        choices=ENERGY_SOURCES,
        default="auto",
        help="GPU energy (--device cuda) from nvml in this process, the agent's /api/v1/energy, "
        "or none (default auto: in order); --device cpu reports CPU package energy from RAPL "
        "where readable (auto) or none",
    )
    p.add_argument(
        "--rapl-root",
        type=Path,
        metavar="DIR",
        help="powercap sysfs tree CPU energy is read from (default /sys/class/powercap)",
    )
    p.add_argument(
        "--agent",
        metavar="URL",
        help=f"agent to read energy from (default ${ENV_AGENT_URL}, else {DEFAULT_AGENT_URL})",
    )
    p.add_argument("--threads", type=int_arg, metavar="N", help="torch CPU threads")
    p.add_argument(
        "--log-interval",
        type=float_arg,
        default=5.0,
        metavar="S",
        help="seconds between progress lines when stderr is not a terminal (default 5)",
    )


def add_workload_parser(subparsers: Any) -> None:
    """Register ``workload train`` and ``workload infer``."""
    workload = subparsers.add_parser(
        "workload",
        help="reference PyTorch training and inference jobs, metered per step",
        description="Reference PyTorch workloads (a small transformer LM on synthetic tokens) "
        "that report time and energy per step from EnergyMeter windows.",
    )
    sub = workload.add_subparsers(dest="workload", required=True, parser_class=type(workload))

    train = sub.add_parser(
        "train",
        help="train the LM; checkpoints, resumes exactly, J/step and tokens/J",
        description="Train a small decoder-only transformer on synthetic tokens. Checkpoints "
        "every N steps, at the end and on SIGTERM/SIGINT (then exits 128+signal); a run on a "
        "directory with a checkpoint resumes from it exactly.",
    )
    _common_flags(
        train, steps_help="train up to this step, counted across resumes", batch_default=8
    )
    train.add_argument("--seq-len", type=int_arg, default=64, metavar="L", help="default 64")
    train.add_argument(
        "--lr", type=float_arg, default=1e-3, help="peak learning rate (default 1e-3)"
    )
    train.add_argument("--warmup-steps", type=int_arg, default=10, metavar="N", help="default 10")
    train.add_argument(
        "--checkpoint-dir", type=Path, metavar="DIR", help="checkpoints (and resume)"
    )
    train.add_argument(
        "--checkpoint-every",
        type=int_arg,
        default=0,
        metavar="N",
        help="also checkpoint every N steps (default 0: only at the end and on SIGTERM)",
    )
    train.add_argument(
        "--keep-checkpoints", type=int_arg, default=2, metavar="K", help="newest K kept (default 2)"
    )
    train.set_defaults(func=cmd_train)

    infer = sub.add_parser(
        "infer",
        help="greedy generation requests; latency p50/p95/p99, J/request, tokens/J",
        description="Serve generation requests with the LM (fresh weights, or the newest "
        "training checkpoint in --checkpoint-dir) and report latency and energy per request.",
    )
    _common_flags(infer, steps_help="number of requests (default 100)", batch_default=1)
    infer.add_argument("--prompt-len", type=int_arg, default=32, metavar="L", help="default 32")
    infer.add_argument("--new-tokens", type=int_arg, default=16, metavar="N", help="default 16")
    infer.add_argument("--warmup", type=int_arg, default=2, metavar="N", help="unmeasured requests")
    infer.add_argument("--checkpoint-dir", type=Path, metavar="DIR", help="load trained weights")
    infer.set_defaults(func=cmd_infer)


def add_job_parser(subparsers: Any) -> None:
    """Register ``job run``."""
    job = subparsers.add_parser(
        "job",
        help="run a command as a supervised, migratable job",
        description="Supervised jobs registered with the node agent.",
    )
    sub = job.add_subparsers(dest="job_command", required=True, parser_class=type(job))
    run = sub.add_parser(
        "run",
        help="run CMD on a GPU, registered with the agent; moved when the agent asks",
        description="Run CMD with CUDA_VISIBLE_DEVICES=I and WATTWARDEN_AGENT_URL, "
        "WATTWARDEN_JOB_NAME, WATTWARDEN_TOKEN set; register it with the agent, forward "
        "SIGTERM/SIGINT, unregister on exit and exit with its code. When the agent sets the "
        "job's target_gpu, stop CMD with SIGTERM and start it again on that GPU.",
        usage="wattwarden job run --name NAME [--gpu I] [--priority P] [--tune] [--agent URL] "
        "[--token-file F] [--sim-utilization U] -- CMD [ARG ...]",
    )
    run.add_argument("--name", required=True, help="job name (A-Z a-z 0-9 _ . : -)")
    run.add_argument("--gpu", type=int_arg, default=0, metavar="I", help="GPU index (default 0)")
    run.add_argument("--priority", choices=("high", "normal", "low"), default="normal")
    run.add_argument(
        "--tune",
        action="store_true",
        help="let the agent's energy tuner choose this job's power limit (when the agent runs "
        "the tuner policy)",
    )
    run.add_argument(
        "--agent", metavar="URL", help=f"agent (default ${ENV_AGENT_URL}, else {DEFAULT_AGENT_URL})"
    )
    run.add_argument(
        "--token-file",
        type=Path,
        metavar="F",
        help="agent write token (default $WATTWARDEN_TOKEN, else the state dir's token)",
    )
    run.add_argument(
        "--sim-utilization",
        type=float_arg,
        metavar="U",
        help="GPU load a simulated fleet gives this job, 0 < U <= 1 (default: the agent's, "
        f"{SIM_JOB_UTILIZATION:g}); real GPUs ignore it",
    )
    run.add_argument(
        "--poll-interval", type=float_arg, default=1.0, metavar="S", help=argparse.SUPPRESS
    )
    run.add_argument(
        "--stop-timeout",
        type=float_arg,
        default=120.0,
        metavar="S",
        help="seconds a stopped job gets to checkpoint before SIGKILL (default 120)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command after --")
    run.set_defaults(func=cmd_job_run)


# ------------------------------------------------------------------ handlers
def _require_torch(workload: str) -> None:
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(
            f"wattwarden workload {workload}: needs PyTorch, which is not installed: "
            "pip install 'wattwarden[workloads]' (the README says how to get the CPU build)"
        )


def _shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags train and infer share, as WorkloadConfig fields."""
    return {
        "size": args.size,
        "seed": args.seed,
        "device": args.device,
        "report": args.report,
        "gpu": args.gpu,
        "energy_source": args.energy_source,
        "agent_url": args.agent,
        "threads": args.threads,
        "log_interval_s": args.log_interval,
        "rapl_root": args.rapl_root,
    }


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``workload train``."""
    setup_logging(logging.WARNING, timestamps=False)
    if args.agent is not None:
        check_url(args.agent)
    _require_torch("train")
    from wattwarden.workloads.checkpoint import CheckpointError  # noqa: PLC0415 - torch
    from wattwarden.workloads.train import TrainConfig, run_train  # noqa: PLC0415 - torch

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        **_shared_settings(args),
    )
    cfg.validate()
    return _run_until_signalled("train", lambda stop: run_train(cfg, stop=stop), CheckpointError)


def _run_until_signalled(
    name: str,
    run: Callable[[threading.Event], Any],
    checkpoint_error: type[Exception],
) -> int:
    """Run a workload that stops at a checkpoint on SIGTERM/SIGINT; exit 128+N when signalled."""
    with stop_on_signals() as (stop, received):
        try:
            result = run(stop)
        except (checkpoint_error, OSError) as e:
            print(f"wattwarden workload {name}: {e}", file=sys.stderr)
            return EXIT_FAILURE
    if result.interrupted and received:
        return 128 + int(received[0])
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Run ``workload infer``."""
    setup_logging(logging.WARNING, timestamps=False)
    if args.agent is not None:
        check_url(args.agent)
    _require_torch("infer")
    from wattwarden.workloads.checkpoint import CheckpointError  # noqa: PLC0415 - torch
    from wattwarden.workloads.infer import InferConfig, run_infer  # noqa: PLC0415 - torch

    cfg = InferConfig(
        requests=args.steps,
        batch_size=args.batch_size,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        checkpoint_dir=args.checkpoint_dir,
        warmup=args.warmup,
        **_shared_settings(args),
    )
    cfg.validate()
    return _run_until_signalled("infer", lambda stop: run_infer(cfg, stop=stop), CheckpointError)


def cmd_job_run(args: argparse.Namespace) -> int:
    """Run ``job run``."""
    from wattwarden.api.contract import valid_job_name  # noqa: PLC0415
    from wattwarden.workloads.agent_client import AgentClient  # noqa: PLC0415
    from wattwarden.workloads.job import JobSupervisor, scheduler_from_env  # noqa: PLC0415

    setup_logging(logging.INFO, timestamps=False)
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("no command to run; put it after --, e.g. `-- python train.py`")
    if not valid_job_name(args.name):
        raise ConfigError(
            f"--name must be 1-64 of A-Z a-z 0-9 _ . : - (a letter or digit first), "
            f"got {args.name!r}"
        )
    if args.gpu < 0:
        raise ConfigError(f"--gpu must be a GPU index (0 or more), got {args.gpu}")
    if args.poll_interval <= 0:
        raise ConfigError(f"--poll-interval must be positive, got {args.poll_interval}")
    if args.stop_timeout <= 0:
        raise ConfigError(f"--stop-timeout must be positive, got {args.stop_timeout}")
    if args.sim_utilization is not None and not 0.0 < args.sim_utilization <= 1.0:
        raise ConfigError(f"--sim-utilization must be within (0, 1], got {args.sim_utilization}")
    url = check_url(args.agent or os.environ.get(ENV_AGENT_URL) or DEFAULT_AGENT_URL)
    token = resolve_token(args.token_file)
    try:
        scheduler_from_env(os.environ)  # where a scheduler runs it: told to the agent
    except ValueError as e:
        raise ConfigError(str(e)) from None
    supervisor = JobSupervisor(
        args.name,
        command,
        client=AgentClient(url, token=token),
        gpu=args.gpu,
        priority=args.priority,
        poll_interval_s=args.poll_interval,
        stop_timeout_s=args.stop_timeout,
        sim_utilization=args.sim_utilization,
        tune=args.tune,
    )
    return supervisor.run()
