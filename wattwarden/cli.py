"""The ``wattwarden`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wattwarden import __version__
from wattwarden.cliutil import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    add_setting_flags,
    arg_type,
    int_arg,
    setup_logging,
    stop_on_signals,
)
from wattwarden.config import (
    DEFAULT_LISTEN,
    SETTINGS,
    AgentConfig,
    ConfigError,
    build_config,
    parse_listen,
    validate,
)

DEFAULT_AGENT_URL = f"http://{DEFAULT_LISTEN}"


def _agent_url(text: str) -> str:
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a valid URL ({e}): {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"expected an http:// or https:// URL such as {DEFAULT_AGENT_URL}, got {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = Parser(
        prog="wattwarden",
        description="GPU energy monitoring and power management for AI hosts.",
    )
    parser.add_argument("--version", action="version", version=f"wattwarden {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    agent = sub.add_parser(
        "agent",
        help="run the node agent (NVML, or a simulated fleet when no driver is present)",
        description="Sample GPUs (NVML, or a simulated fleet of 8 GPUs when no NVIDIA driver is "
        "present) and the host, serve Prometheus metrics and a JSON API, and run the policy "
        "engine (thermal guard; budget capping with a budget; dry-run unless --apply).",
    )
    agent.add_argument("--config", type=Path, help="TOML file; flags override its keys")
    add_setting_flags(agent, SETTINGS.values())
    agent.set_defaults(func=cmd_agent)

    status = sub.add_parser(
        "status",
        help="one-shot table of power, limit, target, temperature, utilization, memory, clock "
        "events; budget and mode",
        description="Print one table of every GPU, from a running agent (with the limit its "
        "policy engine wants, the budget and the mode), or read locally (NVML, or a simulated "
        "fleet with --sim N) when no agent answers.",
    )
    source = status.add_mutually_exclusive_group()
    source.add_argument(
        "--agent",
        type=_agent_url,
        metavar="URL",
        help=f"agent to ask (default {DEFAULT_AGENT_URL}, else read locally)",
    )
    source.add_argument(
        "--sim",
        type=int_arg,
        metavar="N",
        help="read a fresh simulated fleet of N GPUs",
    )
    status.add_argument("--json", action="store_true", help="print the JSON state instead")
    status.set_defaults(func=cmd_status)

    from wattwarden.workloads.cli import add_job_parser, add_workload_parser  # no torch import

    add_job_parser(sub)
    add_workload_parser(sub)
    _add_dashboard_parsers(sub)
    _add_controller_parser(sub)
    return parser


def _listen_arg(text: str) -> str:
    """A ``--listen`` flag's text, checked as the agent checks its own."""
    parse_listen(text)  # ValueError says what is wrong
    return text


def _add_dashboard_parsers(sub: Any) -> None:
    """``dashboard`` and ``demo`` (their flags need no Streamlit: ``--help`` works without it)."""
    from wattwarden.dashboard.settings import DEFAULT_LISTEN as DASHBOARD_LISTEN
    from wattwarden.dashboard.settings import add_arguments

    dashboard = sub.add_parser(
        "dashboard",
        help="the operator dashboard (Streamlit): fleet, GPUs, jobs, policy",
        description="Serve the Streamlit dashboard: fleet power against its budget, live GPU "
        "charts, jobs and their energy, the policy engine's decisions and actions, and firing "
        "alerts. Reads the agents' API (and Prometheus and Alertmanager when given) over HTTP; "
        "needs the dashboard extra: pip install 'wattwarden[dashboard]'.",
    )
    add_arguments(dashboard)
    dashboard.add_argument(
        "--listen",
        type=arg_type(_listen_arg),
        default=DASHBOARD_LISTEN,
        metavar="HOST:PORT",
        help=f"address to serve the dashboard on (default {DASHBOARD_LISTEN})",
    )
    dashboard.set_defaults(func=cmd_dashboard)

    demo = sub.add_parser(
        "demo",
        help="the whole stack on a simulated fleet: agent, policy engine, jobs, dashboard",
        description="Start an agent on a simulated fleet with the policy engine acting on a "
        "power budget (about 65 %% of the GPUs' default limits, so capping shows), a few "
        "simulated jobs of different priorities and load shapes, and the dashboard; print its "
        "URL. Ctrl-C stops everything and restores the power limits. Needs the dashboard "
        "extra: pip install 'wattwarden[dashboard]'.",
    )
    demo.add_argument(
        "--listen",
        type=arg_type(_listen_arg),
        default=DASHBOARD_LISTEN,
        metavar="HOST:PORT",
        help=f"address to serve the dashboard on (default {DASHBOARD_LISTEN})",
    )
    demo.add_argument(
        "--gpus",
        type=int_arg,
        default=8,
        metavar="N",
        help="simulated GPUs, 1..64 (default 8)",
    )
    demo.set_defaults(func=cmd_demo)


def _add_controller_parser(sub: Any) -> None:
    """``controller``: flags from the controller's settings (no HTTP stack loaded for --help)."""
    from wattwarden.fleet.config import CONTROLLER_SETTINGS

    controller = sub.add_parser(
        "controller",
        help="fleet power-budget controller: Prometheus in, leases to the agents out",
        description="Split one power budget among the nodes' agents: each period, read the "
        "nodes' GPU power, limits, demand by priority and health from Prometheus, share the "
        "budget (every node at least the sum of its GPUs' minimum limits; high-priority "
        "demand first; bands so budgets do not churn) and push each agent its share as a "
        "lease that expires unless renewed. Dry-run unless --apply. SIGTERM or SIGINT stops "
        "it; the leases are left to expire, after which each agent uses its local budget.",
    )
    controller.add_argument("--config", type=Path, help="TOML file; flags override its keys")
    add_setting_flags(controller, CONTROLLER_SETTINGS.values())
    controller.set_defaults(func=cmd_controller)


# ---------------------------------------------------------------------- agent
def agent_config(args: argparse.Namespace) -> AgentConfig:
    """The agent's settings: defaults, then ``--config``'s keys, then the flags given."""
    return build_config(args.config, {name: getattr(args, name) for name in SETTINGS})


def cmd_agent(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM or SIGINT."""
    cfg = agent_config(args)
    setup_logging(cfg.log_level, timestamps=True)
    # imported late: `status` and `--help` need not load the agent stack
    from wattwarden.agent import Agent, BackendError

    with stop_on_signals(logging.getLogger("wattwarden.agent")) as (stop, _):
        try:
            agent = Agent(cfg)
        except BackendError as e:
            print(f"wattwarden agent: {e}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            agent.start()
            stop.wait()
        finally:
            agent.close()
    return EXIT_OK


# ---------------------------------------------------------------- controller
def cmd_controller(args: argparse.Namespace) -> int:
    """Run the fleet controller until SIGTERM or SIGINT."""
    from wattwarden.fleet.config import CONTROLLER_SETTINGS, build_config

    cfg = build_config(args.config, {name: getattr(args, name) for name in CONTROLLER_SETTINGS})
    setup_logging(cfg.log_level, timestamps=True)
    from wattwarden.fleet.controller import serve

    with stop_on_signals(logging.getLogger("wattwarden.fleet")) as (stop, _):
        return serve(cfg, stop)


# ----------------------------------------------------------------- dashboard
def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard until SIGTERM or SIGINT (exit 0), or until Streamlit fails (1)."""
    from wattwarden.dashboard import launch
    from wattwarden.dashboard.settings import DashboardSettings

    settings = DashboardSettings.from_namespace(args)
    with stop_on_signals() as (stop, _):
        try:
            proc = launch.serve(settings, args.listen)
        except launch.StreamlitMissing as e:
            print(f"wattwarden dashboard: {e}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            url = launch.dashboard_url(*launch.listen_of(proc))
            if not launch.wait_healthy(proc, stop=stop):
                if stop.is_set():
                    return EXIT_OK
                why = (
                    f"Streamlit exited with code {proc.returncode}"
                    if proc.poll() is not None
                    else "Streamlit did not answer its health check in time"
                )
                print(f"wattwarden dashboard: {why}; not serving {url}", file=sys.stderr)
                return EXIT_FAILURE
            print(
                f"wattwarden dashboard: serving {url} (agents: {', '.join(settings.agents)}); "
                "Ctrl-C stops it",
                flush=True,
            )
            while not stop.wait(0.5):
                if proc.poll() is not None:
                    print(
                        f"wattwarden dashboard: Streamlit exited unexpectedly "
                        f"(code {proc.returncode})",
                        file=sys.stderr,
                    )
                    return EXIT_FAILURE
            return EXIT_OK
        finally:
            launch.stop(proc)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo until SIGTERM or SIGINT."""
    from wattwarden.demo import run_demo

    return run_demo(listen=args.listen, gpus=args.gpus)


# --------------------------------------------------------------------- status
def _fetch_state(url: str, timeout_s: float = 3.0) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/api/v1/state", timeout=timeout_s) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


def _local_state(sim: int | None) -> dict[str, Any]:
    from wattwarden.api.state import gpu_json
    from wattwarden.collectors.gpu import GpuCollector, PartialCollectionError
    from wattwarden.hardware.errors import HardwareUnavailable
    from wattwarden.hardware.nvml import NvmlBackend

    if sim is not None:
        from wattwarden.hardware.sim.fake_nvml import install_fake_nvml
        from wattwarden.hardware.sim.fleet import SimFleet

        install_fake_nvml(SimFleet(sim))
    try:
        backend = NvmlBackend()
    except HardwareUnavailable as e:
        raise ConnectionError(
            f"no agent at {DEFAULT_AGENT_URL} and no NVIDIA driver here ({e}); "
            "start one with `wattwarden agent`, or try `wattwarden status --sim 8`"
        ) from e
    collector = GpuCollector(backend)
    try:
        try:
            samples = collector.collect()
        except PartialCollectionError as e:
            samples = e.samples
        return {
            "node": "local",
            "backend": "sim" if sim is not None else "nvml",
            "gpus": [gpu_json(s) for s in samples],
        }
    finally:
        collector.close()


def _fmt(value: float | None, unit: str, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}{unit}"


def _watts_or_none(watts: float | None) -> str:
    return "none" if watts is None else f"{watts:.0f} W"


def format_status(state: dict[str, Any]) -> str:
    """An nvidia-smi/gpustat-like table, then the node's total, budget and policy mode.

    TARGET is the limit the policy engine wants (in dry-run too, where it is not set); a
    holding engine or a fallback from apply to dry-run is said on a line of its own.
    """
    header = ("GPU", "NAME", "POWER", "LIMIT", "TARGET", "TEMP", "UTIL", "MEMORY", "CLOCK EVENTS")
    rows = [header]
    for g in state.get("gpus", []):
        if not g["up"]:
            rows.append((str(g["index"]), g["name"], "LOST", "-", "-", "-", "-", "-", "gpu_up=0"))
            continue
        used, total = g["memory_used_bytes"], g["memory_total_bytes"]
        mem = (
            "-" if used is None or total is None else f"{used / 2**30:.1f}/{total / 2**30:.1f} GiB"
        )
        util = g["utilization_ratio"]
        rows.append(
            (
                str(g["index"]),
                g["name"],
                _fmt(g["power_watts"], " W"),
                _fmt(g["power_limit_watts"], " W"),
                _fmt(g.get("power_limit_target_watts"), " W"),
                _fmt(g["temperature_celsius"], " C"),
                _fmt(None if util is None else util * 100, "%"),
                mem,
                ",".join(e for e in g["clock_events"]) or "none",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {0, 2, 3, 4, 5, 6}
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    total_power = sum(g["power_watts"] or 0.0 for g in state.get("gpus", []) if g["up"])
    count = len(state.get("gpus", []))
    node, backend = state.get("node", "?"), state.get("backend", "?")
    summary = f"{count} GPU(s), {total_power:.0f} W in total"
    if "policy_mode" in state:  # from an agent (a local read has no policy engine)
        budget, lease = state.get("power_budget_watts"), state.get("power_budget_lease_watts")
        if lease is not None:  # a live lease is the budget in force, above or below the node's
            summary += f", budget {lease:.0f} W (leased; node's own {_watts_or_none(budget)})"
        else:
            summary += f", budget {_watts_or_none(budget)}"
        summary += f", mode {state['policy_mode']}"
    lines.append(f"{summary}, node {node} ({backend})")
    if state.get("policy_fallback"):
        lines.append(f"apply fell back to dry-run: {state['policy_fallback']}")
    if state.get("policy_holding"):
        lines.append(f"policy engine holding: {state['policy_holding']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the table once."""
    try:
        if args.sim is not None:
            sim = validate({"sim": args.sim}, source="command line", flags=True)["sim"]
            state = _local_state(sim)
        elif args.agent is not None:
            state = _fetch_state(args.agent)
        else:
            try:
                state = _fetch_state(DEFAULT_AGENT_URL, timeout_s=1.0)
            except (urllib.error.URLError, OSError):
                state = _local_state(None)
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        where = args.agent or DEFAULT_AGENT_URL
        print(f"wattwarden status: cannot read GPU state from {where}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(state, indent=1) if args.json else format_status(state))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe is found here, not at exit
    except ConfigError as e:
        print(f"wattwarden {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (`wattwarden status | head -1`): stop quietly, as other CLIs do;
        # stdout goes to /dev/null so the interpreter's final flush does not complain again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
