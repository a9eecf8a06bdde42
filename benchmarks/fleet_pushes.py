"""Lease push fan-out to 1,250 agents: a period's pushes, concurrent vs sequential.

The agents are one local fake: a separate process (so that it does not share the controller's
interpreter lock) with an asyncio loop listening on one loopback port per agent, answering each
``POST /api/v1/policy/lease`` as an agent does (200 and the lease record, ``expires_at`` in it).
``--servers N`` splits the agents over N such processes, to tell whether one Python server is the
bottleneck.

Each period pushes every agent its lease with :func:`wattwarden.fleet.leases.push_all` over one
:class:`~wattwarden.fleet.leases.AgentLink`, at concurrency 16, 64 and 256, side by side with
sequential pushes (concurrency 1, the baseline, same run), and with two connection strategies:
one connection per push (``Connection: close``) and kept-alive connections per agent (the
default; a renewal then costs one request, not a TCP handshake). The first period of a
kept-alive run opens the connections and is reported apart; the figure is the median of the
periods after it. Goal: a period's pushes in under 2 s.

    python -m benchmarks.fleet_pushes [--agents 1250] [--periods 5] [--servers 1] [--quick]
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import socket
import statistics
import time
from typing import Any

from benchmarks.common import Option, run_benchmark, table
from wattwarden.fleet.leases import AgentCredentials, AgentLink, Lease, push_all

NAME = "fleet_pushes"
CONCURRENCY = (1, 16, 64, 256)
GOAL_S = 2.0
TIMEOUT_S = 10.0
TTL_S = 30.0


# ------------------------------------------------------------------------------ fake agents
async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency_s: float
) -> None:
    """Serve one connection: lease POSTs answered like an agent after ``latency_s``, until the
    client closes."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                key = name.strip().lower()
                if key == b"content-length":
                    length = int(value)
                elif key == b"connection" and value.strip().lower() == b"close":
                    close = True
            lease = json.loads(await reader.readexactly(length)) if length else {}
            if latency_s > 0:
                await asyncio.sleep(latency_s)  # the agent's service time, modelled
            ttl = float(lease.get("ttl_s", TTL_S))
            record = {**lease, "expires_at": time.time() + ttl, "remaining_s": ttl}
            body = json.dumps(record).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n%s\r\n%s"
                % (len(body), b"Connection: close\r\n" if close else b"", body)
            )
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _serve(
    count: int, silent: int, latency_s: float, ports_out: multiprocessing.connection.Connection
) -> None:
    """A fake-agent process: ``count`` answering and ``silent`` never-accepting loopback
    listeners; sends their ports (answering ones first) and serves until terminated."""

    async def main() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _answer(reader, writer, latency_s)

        servers = [
            await asyncio.start_server(answer, "127.0.0.1", 0, backlog=1024) for _ in range(count)
        ]
        mute = [socket.create_server(("127.0.0.1", 0), backlog=1024) for _ in range(silent)]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        ports_out.send(ports + [m.getsockname()[1] for m in mute])
        await asyncio.Event().wait()  # until the parent terminates this process

    asyncio.run(main())


class FakeAgents:
    """``agents`` fake agents over ``servers`` processes (the last ``silent`` of them accept
    nothing); ``instances`` are their addresses."""

    def __init__(self, agents: int, servers: int, *, silent: int = 0, latency_s: float = 0) -> None:
        ctx = multiprocessing.get_context("fork")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.instances: list[str] = []
        shares = [agents // servers + (1 if i < agents % servers else 0) for i in range(servers)]
        for n, share in enumerate(shares):
            parent, child = ctx.Pipe(duplex=False)
            mute = silent if n == len(shares) - 1 else 0
            proc = ctx.Process(
                target=_serve, args=(share - mute, mute, latency_s, child), daemon=True
            )
            proc.start()
            self.procs.append(proc)
            if not parent.poll(60):
                raise RuntimeError("a fake-agent process did not start within 60 s")
            self.instances += [f"127.0.0.1:{p}" for p in parent.recv()]

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.join(10)


# ---------------------------------------------------------------------------------- measure
def run_periods(
    instances: list[str],
    concurrency: int,
    keep_alive: bool,
    periods: int,
    *,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """``periods`` periods of pushes to every instance; their wall times and results."""
    link = AgentLink(
        AgentCredentials(shared="bench-token"), timeout_s=timeout_s, keep_alive=keep_alive
    )
    times: list[float] = []
    failed = 0
    try:
        for period in range(periods):
            leases = [Lease(i, 1000.0 + period, TTL_S, "bench", 1) for i in instances]
            start = time.perf_counter()
            results = push_all(link, leases, concurrency=concurrency)
            times.append(time.perf_counter() - start)
            failed += sum(r.result != "ok" for r in results)
    finally:
        link.close()
    steady = times[1:] if len(times) > 1 else times
    return {
        "concurrency": concurrency,
        "keep_alive": keep_alive,
        "period_s": times,
        "first_period_s": times[0],
        "median_period_s": statistics.median(steady),
        "max_period_s": max(steady),
        "pushes_per_s": len(instances) / statistics.median(steady),
        "failed_pushes": failed,
        "unreachable_per_period": failed / periods,
    }


def measure(agents: int, periods: int, servers: int, latency_ms: float) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for latency in (0.0, latency_ms):
        fake = FakeAgents(agents, servers, latency_s=latency / 1000)
        try:
            for keep_alive in (False, True):
                for c in CONCURRENCY:
                    run = run_periods(fake.instances, c, keep_alive, periods)
                    runs.append({"agent_latency_ms": latency, **run})
        finally:
            fake.close()
    for run in runs:
        base = next(
            r
            for r in runs
            if (r["keep_alive"], r["agent_latency_ms"], r["concurrency"])
            == (run["keep_alive"], run["agent_latency_ms"], 1)
        )
        run["speedup_vs_sequential"] = base["median_period_s"] / run["median_period_s"]
        run["goal_met"] = run["median_period_s"] < GOAL_S and run["max_period_s"] < GOAL_S

    # a fleet with 1 % of its agents silent (accepting nothing): each waits out the timeout
    silent = max(1, agents // 100)
    fake = FakeAgents(agents, servers, silent=silent, latency_s=latency_ms / 1000)
    try:
        silent_runs = [
            {"agent_latency_ms": latency_ms, "silent_agents": silent, **run}
            for c in (64, 256)
            for run in [run_periods(fake.instances, c, True, 2, timeout_s=2.0)]
        ]
    finally:
        fake.close()

    def pick(latency: float, c: int, keep_alive: bool) -> dict[str, Any]:
        return next(
            r
            for r in runs
            if (r["agent_latency_ms"], r["concurrency"], r["keep_alive"])
            == (latency, c, keep_alive)
        )

    default = pick(latency_ms, 64, True)
    return {
        "agents": agents,
        "periods": periods,
        "fake_servers": servers,
        "agent_latency_ms": latency_ms,
        "fake": "asyncio loop per process, one loopback listener per agent",
        "goal_s": GOAL_S,
        "runs": runs,
        "silent_runs": silent_runs,
        "keep_alive_speedup_at_64": {
            str(lat): pick(lat, 64, False)["median_period_s"]
            / pick(lat, 64, True)["median_period_s"]
            for lat in (0.0, latency_ms)
        },
        "default_64_vs_sequential": default["speedup_vs_sequential"],
        "goal_met_at_default_64": default["goal_met"],
        "cpu_count": os.cpu_count(),
    }


def report(payload: dict[str, Any]) -> str:
    rows = [
        (
            r["agent_latency_ms"],
            "kept alive" if r["keep_alive"] else "one per push",
            r["concurrency"],
            r["median_period_s"],
            r["max_period_s"],
            r["first_period_s"],
            round(r["pushes_per_s"]),
            r["speedup_vs_sequential"],
            r["failed_pushes"],
            "yes" if r["goal_met"] else "NO",
        )
        for r in payload["runs"]
    ]
    head = (
        f"{payload['agents']} agents on {payload['fake_servers']} fake-agent process(es), "
        f"{payload['periods']} periods each (median and max of those after the first)"
    )
    silent = [
        (
            r["silent_agents"],
            r["concurrency"],
            r["median_period_s"],
            r["first_period_s"],
            r["unreachable_per_period"],
        )
        for r in payload["silent_runs"]
    ]
    goal = payload["goal_s"]
    lines = [
        head,
        table(
            [
                "agent ms",
                "connections",
                "concurrency",
                "period s (med)",
                "period s (max)",
                "first s",
                "pushes/s",
                "x sequential",
                "failed",
                f"< {goal:g} s",
            ],
            rows,
        ),
        "",
        "with 1 % of the agents silent (kept alive, timeout 2 s, 2 periods):",
        table(["silent", "concurrency", "period s (med)", "first s", "unreachable/period"], silent),
        "",
        "kept-alive vs one connection per push at concurrency 64: "
        + ", ".join(f"{v:.2f}x at {k} ms" for k, v in payload["keep_alive_speedup_at_64"].items()),
        f"at {payload['agent_latency_ms']:g} ms an agent, concurrency 64 kept alive: "
        f"{payload['default_64_vs_sequential']:.1f}x sequential; goal (a period's pushes "
        f"< {goal:g} s): {'met' if payload['goal_met_at_default_64'] else 'MISSED'}",
    ]
    return "\n".join(lines)


OPTIONS = (
    Option("--agents", 1250, "fake agents (one loopback port each)", quick=200),
    Option("--periods", 5, "periods per concurrency and connection strategy", quick=2),
    Option("--servers", 1, "fake-agent processes the agents are split over"),
    Option(
        "--latency-ms",
        2.5,
        "an agent's service time per push (the agent's p50 in http_load: 2.6 ms)",
    ),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/fleet_pushes.json``."""
    return run_benchmark(NAME, __doc__, measure, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
