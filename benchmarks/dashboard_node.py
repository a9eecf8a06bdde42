"""A node with minutes of history behind the agent's real HTTP API, for the dashboard benchmark.

A :class:`~wattwarden.nodesim.SimNode` replays the seeded job trace of ``policy_vs_uniform``
(priorities, compute and light phases, idle GPUs) for ``--history-s`` simulated seconds under
a budget of 65 % of the default limits, with the agent's policy loop (thermal guard and budget
capper, apply mode) deciding every period, so the store holds per-second history, the job
registry holds running and finished jobs, and the loop holds decisions, as an agent that has
run that long does. Then the agent's own API app (``build_app``: routes, auth, contract) serves
that state on 127.0.0.1. The simulated clock stops there: what the dashboard reads is frozen,
which is what a render benchmark wants.

Run as a process of its own so that its CPU time is the agent's alone::

    python -m benchmarks.dashboard_node --gpus 64 [--history-s 900]

prints one line ``ready <url> <token>`` and serves until stdin closes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.policy_vs_uniform import Event, make_trace, set_utilization
from wattwarden.api.http import HttpServer
from wattwarden.api.server import AgentContext, build_app
from wattwarden.exporters.prometheus import StoreCollector, job_families, make_registry
from wattwarden.hardware.sim.models import MODELS
from wattwarden.nodesim import SimJob, SimNode
from wattwarden.policies.control import PolicyLoop

MODEL = "h100-sxm"
BUDGET_FRACTION = 0.65
INTERVAL_S = 0.5
TOKEN = "bench-token"


def build_node(gpus: int, history_s: float, state_dir: Path, seed: int = 1) -> tuple[
    SimNode, PolicyLoop
]:  # fmt: skip
    """A node that has run the trace for ``history_s`` simulated seconds, and its policy loop."""
    budget_w = BUDGET_FRACTION * gpus * MODELS[MODEL].power_default_w
    node = SimNode(gpus, state_dir=state_dir, mode="apply", model=MODEL, interval_s=INTERVAL_S)
    loop = PolicyLoop(
        store=node.store,
        jobs=node.jobs,
        actuator=node.actuator,
        policies=["thermal", "budget"],
        budget_w=budget_w,
        mode="apply",
        monotonic=node.clock,
        wall=node.wall,
    )
    node.after_period.append(lambda _node, _decisions: loop.period())
    # a trace twice as long, cut at history_s: jobs still run at the end, as on a busy node
    trace: list[Event] = [e for e in make_trace(gpus, 2 * history_s, seed) if e.at_s < history_s]
    start = node.clock()
    for event in trace:
        node.run(max(0.0, start + event.at_s - node.clock()))
        if event.kind == "start":
            node.add_job(SimJob(event.job, event.gpu, event.priority, event.utilization, 1.0))
        elif event.kind == "phase":
            set_utilization(node, event.job, event.utilization)
        else:
            node.end_job(event.job)
    node.run(start + history_s - node.clock())
    return node, loop


def serve(node: SimNode, loop: PolicyLoop) -> HttpServer:
    """The agent's API app over the node's state, on 127.0.0.1 (a free port)."""
    context = AgentContext(
        store=node.store,
        registry=make_registry(  # /metrics as the agent serves it, for the scrape baseline
            StoreCollector(
                node.store, backend="sim", extra=lambda snap: job_families(node.jobs, snap)
            )
        ),
        token=TOKEN,
        backend="sim",
        node="bench-node",
        interval_s=INTERVAL_S,
        actuator=node.actuator,
        fleet=node.fleet,
        mode="apply",
        jobs=node.jobs,
        policy=loop,
    )
    server = HttpServer("127.0.0.1", 0)
    server.start(build_app(context))
    return server


def main(argv: list[str] | None = None) -> int:
    """Build the node, serve it, print ``ready URL TOKEN``, serve until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--history-s", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        node, loop = build_node(args.gpus, args.history_s, Path(tmp), args.seed)
        server = serve(node, loop)
        host, port = server.address
        print(f"ready http://{host}:{port} {TOKEN} built_s={time.perf_counter() - t0:.1f}")
        sys.stdout.flush()
        try:
            sys.stdin.read()  # the parent closes stdin to stop us
        finally:
            server.close()
            node.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
