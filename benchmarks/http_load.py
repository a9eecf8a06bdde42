"""HTTP load on the agent's API: the previous stdlib server vs the uvicorn/Starlette one.

Both serve the same /metrics render (8 simulated GPUs, a store filled by 200 sampler passes,
rendered per request through ``render`` as the agent does). Each server runs in its own child
process with ``RLIMIT_NOFILE`` lowered to 200 (as under a tight systemd ``LimitNOFILE``), so
that the connection-hungry scenario reaches the fd limit, as it did in the issue; the load comes
from this process, on loopback.

Per server:
- ``keepalive``: 20 concurrent scrapers, each on one kept-alive connection, for ``--seconds``;
- ``new_conn``: 20 concurrent scrapers, a new connection per request, for ``--seconds``;
- ``idle_slow``: 200 idle connections and 50 slowloris ones (a header line every second) held
  open, then ``--probes`` new scrapes one after another, each with a 3 s timeout: their latency
  and how many failed.

Baseline ("old"): a faithful copy of the previous setup (``ThreadingHTTPServer``, listen backlog
5, HTTP/1.1 handler, Nagle off, 60 s socket timeout, the same ``render`` call), kept here since
the package no longer has it. New: ``wattwarden.api.server.ApiServer`` with default limits.

    python -m benchmarks.http_load [--seconds 5] [--probes 10] [--quick]
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from benchmarks.common import Option, percentile, run_benchmark, table

NAME = "http_load"
SCRAPERS = 20
IDLE = 200
SLOW = 50
SERVER_NOFILE = 200
PROBE_TIMEOUT_S = 3.0


# ------------------------------------------------------------------ the servers (child process)
def _registry() -> Any:
    from benchmarks.metrics_render import filled_registry

    return filled_registry(200)


def serve_old() -> tuple[ThreadingHTTPServer, int]:
    """The previous stdlib server, as it served /metrics."""
    from prometheus_client import CollectorRegistry

    from wattwarden.exporters.prometheus import render

    registry, _ = _registry()

    class Handler(BaseHTTPRequestHandler):
        server_version = "wattwarden"
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        timeout = 60
        reg: CollectorRegistry = registry

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def handle(self) -> None:
            with contextlib.suppress(ConnectionError, TimeoutError):
                super().handle()

        def do_GET(self) -> None:
            body, content_type = render(self.reg, self.headers.get("Accept"))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def serve_new() -> tuple[Any, int]:
    """The uvicorn/Starlette server with its default limits."""
    from wattwarden.api.server import AgentContext, ApiServer

    registry, store = _registry()
    server = ApiServer("127.0.0.1", 0)
    ctx = AgentContext(
        store=store, registry=registry, token="bench", backend="sim", node="bench",
        interval_s=0.1,
    )  # fmt: skip
    server.start(ctx)
    return server, server.address[1]


def main_child(kind: str) -> None:
    """Serve until stdin closes; print the port first (the child process's main)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(SERVER_NOFILE, hard), hard))
    _, port = serve_old() if kind == "old" else serve_new()
    print(port, flush=True)
    sys.stdin.read()  # the parent closes our stdin when done


# ------------------------------------------------------------------------- the load (parent)
def _scrape(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200 or b"gpu_power_watts" not in body:
        raise OSError(f"status {resp.status}")


def concurrent(port: int, seconds: float, keep_alive: bool) -> dict[str, Any]:
    """SCRAPERS threads scraping for ``seconds``; rates, latency percentiles, errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def scraper() -> None:
        conn: http.client.HTTPConnection | None = None
        mine: list[float] = []
        failed = 0
        while time.monotonic() < stop:
            if conn is None or not keep_alive:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            t0 = time.perf_counter()
            try:
                _scrape(conn)
                mine.append(time.perf_counter() - t0)
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = None
            if conn is not None and not keep_alive:
                conn.close()
        if conn is not None:
            conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    start = time.monotonic()
    threads = [threading.Thread(target=scraper) for _ in range(SCRAPERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


def idle_and_slow(port: int, probes: int) -> dict[str, Any]:
    """Hold IDLE idle and SLOW slowloris connections, then time ``probes`` new scrapes."""
    held: list[socket.socket] = []
    slow: list[socket.socket] = []
    refused = 0
    for i in range(IDLE + SLOW):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        except OSError:
            refused += 1
            continue
        held.append(s)
        if i >= IDLE:
            try:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)
            except OSError:
                pass
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for s in slow:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n")

    ticker = threading.Thread(target=trickle, daemon=True)
    ticker.start()
    latencies: list[float] = []
    failed = 0
    try:
        for _ in range(probes):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
            t0 = time.perf_counter()
            try:
                _scrape(conn)
                latencies.append(time.perf_counter() - t0)
            except (OSError, http.client.HTTPException):
                failed += 1
            finally:
                conn.close()
    finally:
        stop.set()
        ticker.join()
        for s in held:
            s.close()
    return {
        "held_connections": len(held),
        "refused_while_opening": refused,
        "probes": probes,
        "probe_errors": failed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "max_ms": max(latencies) * 1e3 if latencies else float("nan"),
    }


def measure(kind: str, seconds: float, probes: int) -> dict[str, Any]:
    """Start one server in a child process and run every scenario against it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import benchmarks.http_load as b; b.main_child({kind!r})"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        t = time.monotonic()
        port = int(proc.stdout.readline())
        print(f"{kind}: serving after {time.monotonic() - t:.1f} s", file=sys.stderr)
        out = {}
        for name, run in (
            ("keepalive", lambda: concurrent(port, seconds, keep_alive=True)),
            ("new_conn", lambda: concurrent(port, seconds, keep_alive=False)),
            ("idle_slow", lambda: idle_and_slow(port, probes)),
        ):
            t = time.monotonic()
            out[name] = run()
            print(f"{kind} {name}: {time.monotonic() - t:.1f} s", file=sys.stderr)
        return out
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def report(payload: dict[str, Any]) -> str:
    """The tables."""
    rows = []
    for kind, r in payload["results"].items():
        for scenario in ("keepalive", "new_conn"):
            s = r[scenario]
            rows.append([kind, scenario, s["req_per_s"], s["p50_ms"], s["p99_ms"], s["errors"]])
    load = table(["server", "20 scrapers", "req/s", "p50 ms", "p99 ms", "errors"], rows)
    rows = []
    for kind, r in payload["results"].items():
        s = r["idle_slow"]
        rows.append([kind, s["held_connections"], s["refused_while_opening"],
                     s["probe_errors"], s["p50_ms"], s["max_ms"]])  # fmt: skip
    slow = table(
        ["server", "held of 250", "not accepted", "failed scrapes", "p50 ms", "max ms"], rows
    )
    return f"{load}\n\nnew scrapes while idle and slowloris connections are held:\n{slow}"


def run(seconds: float, probes: int) -> dict[str, Any]:
    """Load both servers in turn; return the JSON payload."""
    return {
        "params": {
            "scrapers": SCRAPERS, "seconds": seconds, "idle": IDLE, "slow": SLOW,
            "probes": probes, "probe_timeout_s": PROBE_TIMEOUT_S,
            "server_rlimit_nofile": SERVER_NOFILE, "gpus": 8,
        },
        "results": {kind: measure(kind, seconds, probes) for kind in ("old", "new")},
        "notes": [
            "old: stdlib ThreadingHTTPServer as previously shipped (backlog 5, a thread per "
            "connection, 60 s socket timeout); new: uvicorn h11 + Starlette, default HttpLimits",
            "servers run in a child process with RLIMIT_NOFILE 200; load from the parent on "
            "loopback; both share the same CPUs, so req/s is a relative figure",
            "idle_slow: 'not accepted' = of the 250 connections, those not accepted within "
            "0.5 s; a failed scrape timed out after probe_timeout_s, was refused or reset",
        ],
    }  # fmt: skip


OPTIONS = (
    Option("--seconds", 5.0, "length of each load run", quick=1.0),
    Option("--probes", 10, "new scrapes under idle+slow", quick=3),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the tables, write ``results/http_load.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
