"""Dashboard render time per page, the live refresh, and the dashboard's load on the agent.

For 8 and 64 simulated GPUs, an agent process (``benchmarks.dashboard_node``: the agent's API
over a node that has replayed 15 minutes of a seeded mixed-priority trace under a budget, with
its policy loop deciding in apply mode) serves per-second history, running and finished jobs and
decisions. The dashboard's own Streamlit script runs in this process under Streamlit's
``AppTest`` (the script run a browser's page load or rerun triggers, without the browser's
drawing), against that agent over HTTP:

- **page render**: each page (Fleet, GPUs with its default 8 cards and with all GPUs on one
  page, Jobs, Policy) from a cold cache, as on a page load (every fetch goes to the agent);
- **live refresh**: the GPU cards' fragment body (what ``st.fragment(run_every=...)`` reruns
  every 1-2 s: one state fetch, the history top-up since the last refresh, the cards) with the
  cache expired between refreshes, as in a running browser tab;
- **load on the agent**: requests sent per render and per refresh (the sources' own counts),
  and the agent process's CPU time per render and per refresh (``psutil``, user + system);
- **baselines in the same run**: the bare Streamlit script floor (a script that writes one
  line, under the same ``AppTest``), and one Prometheus scrape of the agent's ``/metrics`` (its
  CPU per scrape), which every agent serves every 15 s anyway.

Goals: a page under 1 s, a live refresh under 300 ms (median and p95 reported).

    python -m benchmarks.dashboard_render [--repeats 7] [--refreshes 20] [--quick]
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from benchmarks.common import Option, percentile, run_benchmark, table

NAME = "dashboard_render"
SIZES = (8, 64)
HISTORY_S = 900.0
PAGE_GOAL_S = 1.0
REFRESH_GOAL_S = 0.3
SCRAPES = 100
CACHE_EXPIRY_S = 1.05
"""Longer than the sources' cache TTL (at most 1 s): a refresh then fetches again."""
PAGES = (  # (label, page file, GPUs per page on the GPUs page)
    ("Fleet", "views/fleet.py", None),
    ("GPUs (8 per page)", "views/gpus.py", 8),
    ("GPUs (all on one page)", "views/gpus.py", 64),
    ("Jobs", "views/jobs.py", None),
    ("Policy", "views/policy.py", None),
)
BARE_SCRIPT = "import streamlit as st\nst.write('wattwarden')\n"
REFRESH_SCRIPT = """
import os
from wattwarden.dashboard import ui
from wattwarden.dashboard.settings import from_environ_or_argv
from wattwarden.dashboard.views import gpus
settings = from_environ_or_argv([])
ui.set_settings(settings)
ctx = ui.context()
gpus.cards(ctx, settings.agents[0], float(os.environ["BENCH_WINDOW_S"]), 0,
           int(os.environ["BENCH_CARDS"]))
"""


@contextmanager
def agent_node(gpus: int, history_s: float) -> Iterator[tuple[str, psutil.Process, float]]:
    """The benchmark node's agent process: (URL, its process, seconds it took to build)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.dashboard_node", "--gpus", str(gpus),
         "--history-s", str(history_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"benchmark node did not start: {line}")
        built_s = float(line[3].split("=")[1])
        yield line[1], psutil.Process(proc.pid), built_s
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)


def cpu_s(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process so far."""
    t = proc.cpu_times()
    return float(t.user + t.system)


def app_test(script: str | None = None) -> Any:
    """An AppTest of the dashboard's script (or of ``script``), generous timeout."""
    from streamlit.testing.v1 import AppTest

    from wattwarden.dashboard import APP_PATH

    if script is not None:
        return AppTest.from_string(script, default_timeout=120)
    return AppTest.from_file(str(APP_PATH), default_timeout=120)


def timed(run: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def check(at: Any, what: str) -> None:
    if len(at.exception):
        raise RuntimeError(f"{what}: exception on the page: {at.exception[0].value}")
    errors = [e.value for e in at.error]
    if errors:
        raise RuntimeError(f"{what}: error on the page: {errors[0]}")


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median_s": percentile(values, 50),
        "p95_s": percentile(values, 95),
        "max_s": max(values),
        "n": len(values),
    }


def measure_size(gpus: int, *, repeats: int, refreshes: int, history_s: float) -> dict[str, Any]:
    from wattwarden.dashboard import ui
    from wattwarden.dashboard.settings import from_environ_or_argv

    with agent_node(gpus, history_s) as (url, agent, built_s):
        os.environ["WATTWARDEN_DASHBOARD_ARGS"] = f"--agent {url} --refresh-s 2"
        settings = from_environ_or_argv([])

        # the floor: the bare Streamlit script under the same harness
        bare = app_test(BARE_SCRIPT)
        bare.run()
        floor = [timed(bare.run) for _ in range(repeats)]

        pages: dict[str, Any] = {}
        at = app_test()
        at.run()  # imports, first navigation: not timed
        check(at, "first run")
        for label, path, per_page in PAGES:
            if per_page is not None and per_page > gpus:
                continue
            if per_page is not None:
                at.session_state["gpus_per_page"] = per_page
                at.session_state["gpus_window_min"] = 15
            at.switch_page(path)
            at.run()  # warm: the page's own imports and Vega specs
            check(at, label)
            times, requests, agent_cpu = [], [], []
            for _ in range(repeats):
                ui.reset_sources()  # a cold cache: every fetch goes to the agent
                cpu0 = cpu_s(agent)
                times.append(timed(at.run))
                agent_cpu.append(cpu_s(agent) - cpu0)
                check(at, label)
                sources = ui.sources_for(settings)
                requests.append(sum(sources.request_counts().values()))
            pages[label] = {
                **stats(times),
                "requests": max(requests),
                "agent_cpu_ms": 1000 * sum(agent_cpu) / len(agent_cpu),
            }

        # the live refresh: the GPU cards' fragment body, cache expired between refreshes
        refresh: dict[str, Any] = {}
        for cards in sorted({8, gpus}):
            os.environ["BENCH_WINDOW_S"] = str(15 * 60)
            os.environ["BENCH_CARDS"] = str(cards)
            ui.reset_sources()
            frag = app_test(REFRESH_SCRIPT)
            frag.run()  # the first fetch of the whole window: a page load, not a refresh
            check(frag, "refresh")
            times, requests, agent_cpu = [], [], []
            for _ in range(refreshes):
                time.sleep(CACHE_EXPIRY_S)  # a refresh comes after the cache expired
                sources = ui.sources_for(settings)
                before = sum(sources.request_counts().values())
                cpu0 = cpu_s(agent)
                times.append(timed(frag.run))
                agent_cpu.append(cpu_s(agent) - cpu0)
                check(frag, "refresh")
                requests.append(sum(sources.request_counts().values()) - before)
            refresh[f"{cards} cards"] = {
                **stats(times),
                "requests": max(requests),
                "agent_cpu_ms": 1000 * sum(agent_cpu) / len(agent_cpu),
            }

        # a Prometheus scrape of the same agent, for the load comparison
        # (CPU time is counted in clock ticks: many scrapes, then divided)
        cpu0 = cpu_s(agent)
        for _ in range(SCRAPES):
            with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
                r.read()
        scrape_cpu = [(cpu_s(agent) - cpu0) / SCRAPES]
    return {
        "gpus": gpus,
        "history_s": history_s,
        "node_build_s": built_s,
        "bare_script": stats(floor),
        "pages": pages,
        "refresh": refresh,
        "scrape_agent_cpu_ms": 1000 * sum(scrape_cpu) / len(scrape_cpu),
    }


def run(repeats: int, refreshes: int, history_s: float) -> dict[str, Any]:
    """Measure every size."""
    # AppTest's session state is set from outside a script run: Streamlit warns each time
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    os.environ.setdefault("STREAMLIT_GLOBAL_DEVELOPMENT_MODE", "false")
    sizes = {
        str(n): measure_size(n, repeats=repeats, refreshes=refreshes, history_s=history_s)
        for n in SIZES
    }
    goals = {}
    for n, s in sizes.items():
        pages_ok = all(p["median_s"] < PAGE_GOAL_S for p in s["pages"].values())
        refresh_ok = all(r["median_s"] < REFRESH_GOAL_S for r in s["refresh"].values())
        goals[n] = {"pages_under_1s": pages_ok, "refresh_under_300ms": refresh_ok}
    return {
        "sizes": sizes,
        "goals": goals,
        "page_goal_s": PAGE_GOAL_S,
        "refresh_goal_s": REFRESH_GOAL_S,
        "command": "python -m benchmarks.dashboard_render",
    }


def report(payload: dict[str, Any]) -> str:
    rows = []
    for n, s in payload["sizes"].items():
        floor = s["bare_script"]["median_s"]
        scrape = s["scrape_agent_cpu_ms"]
        for label, p in s["pages"].items():
            rows.append([
                n, f"page {label}", f"{1000 * p['median_s']:.0f}", f"{1000 * p['p95_s']:.0f}",
                f"{p['median_s'] / floor:.0f}x", p["requests"], f"{p['agent_cpu_ms']:.1f}",
                f"{p['agent_cpu_ms'] / scrape:.2f}x" if scrape > 0 else "-",
            ])  # fmt: skip
        for label, r in s["refresh"].items():
            rows.append([
                n, f"refresh {label}", f"{1000 * r['median_s']:.0f}", f"{1000 * r['p95_s']:.0f}",
                f"{r['median_s'] / floor:.0f}x", r["requests"], f"{r['agent_cpu_ms']:.1f}",
                f"{r['agent_cpu_ms'] / scrape:.2f}x" if scrape > 0 else "-",
            ])  # fmt: skip
        rows.append([n, "bare script (floor)", f"{1000 * floor:.0f}",
                     f"{1000 * s['bare_script']['p95_s']:.0f}", "1x", 0, "-", "-"])  # fmt: skip
        rows.append([n, "Prometheus scrape", "-", "-", "-", 1, f"{scrape:.1f}", "1.00x"])
    lines = [
        table(
            [
                "GPUs",
                "what",
                "med ms",
                "p95 ms",
                "vs floor",
                "requests",
                "agent CPU ms",
                "vs scrape",
            ],
            rows,
        ),
        "",
    ]
    for n, g in payload["goals"].items():
        lines.append(
            f"{n} GPUs: pages < 1 s: {'met' if g['pages_under_1s'] else 'MISSED'}; "
            f"live refresh < 300 ms: {'met' if g['refresh_under_300ms'] else 'MISSED'}"
        )
    return "\n".join(lines)


OPTIONS = (
    Option("--repeats", 7, "renders per page", quick=2),
    Option("--refreshes", 20, "live refreshes per size", quick=3),
    Option("--history-s", HISTORY_S, "simulated history the node has", quick=120.0),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/dashboard_render.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
