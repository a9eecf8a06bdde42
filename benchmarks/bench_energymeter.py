"""EnergyMeter window overhead next to Zeus's ZeusMonitor, on the same fake NVML.

Both read the same simulated H100s (``SimFleet``, real clock, 50 % load) through the unchanged
pynvml module over the fake ``libnvidia-ml``. Each contender opens and closes windows in a tight
loop; rounds of all contenders alternate, so drift on a busy machine hits them alike. Reported
per window (begin + end): wall time (median, p95) and the NVML calls it made, and the ratio to
ZeusMonitor on the same GPUs. Zeus is called with ``sync_execution=False`` (no CUDA here; our
meter has no sync hook set either), so both measure only their own bookkeeping and driver reads.

Contenders:

- ``wattwarden begin/end``: ``EnergyMeter(source="nvml")``, ``begin_window`` + ``end_window``;
- ``wattwarden lap``: ``lap()`` closes a window and opens the next with one read (a training loop);
- ``wattwarden polled``: a GPU without an energy counter (``not_supported`` fault): windows read
  the background integrator (no driver call); its thread's CPU share is reported separately;
- ``zeus begin/end``: ``ZeusMonitor(gpu_indices=..., cpu_indices=[])``;
- ``wattwarden agent``: ``EnergyMeter(source="agent")`` against a real ``wattwarden agent --sim 8``
  subprocess on loopback (measured last, alone: the agent's sampler takes CPU).

Also the energy each contender measured over one 0.5 s window, against ``SimGpu.true_energy_j()``.

    python -m benchmarks.bench_energymeter [--windows 2000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import Option, run_benchmark, summary, table
from wattwarden.hardware.sim.fake_nvml import FakeNvmlLib, install_fake_nvml, uninstall_fake_nvml
from wattwarden.hardware.sim.fleet import SimFleet
from wattwarden.workloads.agent_client import AgentClient
from wattwarden.workloads.meter import EnergyMeter

NAME = "bench_energymeter"
REPO_ROOT = Path(__file__).resolve().parent.parent

Window = Callable[[], object]


def zeus_available() -> bool:
    try:
        import zeus.monitor  # noqa: F401
    except ImportError:
        return False
    return True


def make_contenders(
    fleet: SimFleet, gpus: list[int]
) -> tuple[dict[str, Window], list[Callable[[], None]], dict[str, Any]]:
    """Window functions by name, their closers, and extra objects (for accuracy checks)."""
    contenders: dict[str, Window] = {}
    closers: list[Callable[[], None]] = []
    extra: dict[str, Any] = {}
    n = len(gpus)

    meter = EnergyMeter(gpus=gpus, source="nvml", host=False)
    closers.append(meter.close)
    extra[f"wattwarden begin/end ({n} GPU)"] = meter

    def begin_end() -> object:
        meter.begin_window("w")
        return meter.end_window("w")

    contenders[f"wattwarden begin/end ({n} GPU)"] = begin_end
    lap_meter = EnergyMeter(gpus=gpus, source="nvml", host=False)
    closers.append(lap_meter.close)
    lap_meter.begin_window("step")
    contenders[f"wattwarden lap ({n} GPU)"] = lambda: lap_meter.lap("step")

    if zeus_available():
        from zeus.monitor import ZeusMonitor

        zeus = ZeusMonitor(gpu_indices=gpus, cpu_indices=[])
        extra[f"zeus begin/end ({n} GPU)"] = zeus

        def zeus_window() -> object:
            zeus.begin_window("w", sync_execution=False)
            return zeus.end_window("w", sync_execution=False)

        contenders[f"zeus begin/end ({n} GPU)"] = zeus_window
    return contenders, closers, extra


def time_windows(fn: Window, count: int) -> list[float]:
    """Seconds per window, one sample per call."""
    out = []
    perf = time.perf_counter
    for _ in range(count):
        t0 = perf()
        fn()
        out.append(perf() - t0)
    return out


def calls_per_window(lib: FakeNvmlLib, fn: Window, count: int = 200) -> float:
    before = lib.calls
    for _ in range(count):
        fn()
    return (lib.calls - before) / count


def accuracy_pct(
    fleet: SimFleet, gpu: int, begin: Callable[[], None], end: Callable[[], float]
) -> float:
    """Relative error (%) of one 0.5 s window against the ground truth."""
    e0 = fleet[gpu].true_energy_j()
    begin()
    threading.Event().wait(0.5)  # the window's length, not synchronisation
    measured = end()
    truth = fleet[gpu].true_energy_j() - e0
    return (measured - truth) / truth * 100.0


@contextlib.contextmanager
def real_agent(gpus: int) -> Iterator[str]:
    """A ``wattwarden agent --sim N`` subprocess on a free loopback port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "wattwarden", "agent", "--sim", str(gpus),
            "--listen", f"127.0.0.1:{port}", "--state-dir", str(Path(tmp) / "state"),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTWARDEN_")}
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the agent did not start") from None
                    threading.Event().wait(0.2)  # polling interval of a deadline loop
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def poller_cpu_share(fleet: SimFleet, seconds: float) -> float:
    """% of one core the polling thread uses at its default interval (process CPU while idle)."""
    fleet[8].inject("not_supported", field="energy")
    with EnergyMeter(gpus=[8], source="nvml", host=False):
        c0, w0 = time.process_time(), time.monotonic()
        threading.Event().wait(seconds)
        share = (time.process_time() - c0) / (time.monotonic() - w0) * 100.0
    fleet[8].inject("clear")
    return share


def run(windows: int, rounds: int, agent_windows: int) -> dict[str, Any]:
    logging.getLogger("zeus").setLevel(logging.ERROR)
    # a 10 us window can read the same mJ twice; zeus warns about it, which is no news here
    warnings.filterwarnings("ignore", message="The energy consumption of one or more GPUs")
    fleet = SimFleet(9)  # GPUs 0-7 for the contenders, GPU 8 without an energy counter
    for g in fleet:
        g.set_load(0.5)
    lib = install_fake_nvml(fleet)
    try:
        contenders: dict[str, Window] = {}
        closers: list[Callable[[], None]] = []
        extra: dict[str, Any] = {}
        for gpus in ([0], list(range(8))):
            c, cl, ex = make_contenders(fleet, gpus)
            contenders.update(c)
            closers.extend(cl)
            extra.update(ex)
        # a GPU with no counter, measured by the background integrator
        fleet[8].inject("not_supported", field="energy")
        polled = EnergyMeter(gpus=[8], source="nvml", host=False)
        closers.append(polled.close)

        def polled_window() -> object:
            polled.begin_window("w")
            return polled.end_window("w")

        contenders["wattwarden polled (1 GPU, no counter)"] = polled_window

        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for fn in contenders.values():
            time_windows(fn, max(windows // 10, 20))  # warm-up
        for _ in range(rounds):
            for name, fn in contenders.items():
                samples[name].extend(time_windows(fn, windows))
        calls = {name: calls_per_window(lib, fn) for name, fn in contenders.items()}

        accuracy: dict[str, float] = {}
        meter = extra["wattwarden begin/end (1 GPU)"]
        accuracy["wattwarden begin/end (1 GPU)"] = accuracy_pct(
            fleet, 0, lambda: meter.begin_window("acc"),
            lambda: meter.end_window("acc").gpu_energy_j[0],
        )  # fmt: skip
        accuracy["wattwarden polled (1 GPU, no counter)"] = accuracy_pct(
            fleet, 8, lambda: polled.begin_window("acc"),
            lambda: polled.end_window("acc").gpu_energy_j[8],
        )  # fmt: skip
        zeus = extra.get("zeus begin/end (1 GPU)")
        if zeus is not None:
            accuracy["zeus begin/end (1 GPU)"] = accuracy_pct(
                fleet, 0, lambda: zeus.begin_window("acc", sync_execution=False),
                lambda: zeus.end_window("acc", sync_execution=False).gpu_energy[0],
            )  # fmt: skip
        for close in closers:
            close()
        fleet[8].inject("clear")
        poll_share = poller_cpu_share(fleet, 3.0)
    finally:
        uninstall_fake_nvml()

    with real_agent(8) as url:
        meter = EnergyMeter(gpus=[0], source="agent", agent_url=url, host=False)
        client = AgentClient(url, keep_alive=False)
        try:
            agent_fn: Window = lambda: (meter.begin_window("w"), meter.end_window("w"))  # noqa: E731
            time_windows(agent_fn, 20)
            samples["wattwarden agent (1 GPU, HTTP)"] = time_windows(agent_fn, agent_windows)
            energy_get = time_windows(client.energy, agent_windows)
        finally:
            meter.close()
            client.close()

    stats = {name: summary([s * 1e6 for s in values]) for name, values in samples.items()}
    rows = []
    for name, st in stats.items():
        n_gpus = "8 GPU" if "(8 GPU" in name else "1 GPU"
        zeus_name = f"zeus begin/end ({n_gpus})"
        ref = stats.get(zeus_name)
        rows.append(
            {
                "contender": name,
                "median_us": st["median"],
                "p95_us": st["p95"],
                "nvml_calls_per_window": calls.get(name),
                "ratio_to_zeus": (st["median"] / ref["median"]) if ref else None,
                "accuracy_pct": accuracy.get(name),
            }
        )
    return {
        "windows_per_round": windows,
        "rounds": rounds,
        "rows": rows,
        "stats_us": stats,
        "agent_energy_get_us": summary([s * 1e6 for s in energy_get]),
        "poller_cpu_pct_of_core": poll_share,
        "zeus_version": _version("zeus"),
        "torch_version": _version("torch"),
    }


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def report(payload: dict[str, Any]) -> str:
    def num(v: object) -> object:
        return float("nan") if v is None else v

    rows = [
        (
            r["contender"],
            num(r["median_us"]),
            num(r["p95_us"]),
            num(r["nvml_calls_per_window"]),
            num(r["ratio_to_zeus"]),
            num(r["accuracy_pct"]),
        )
        for r in payload["rows"]
    ]
    headers = ("contender (window = begin + end)", "median us", "p95 us", "NVML calls",
               "x zeus", "error % (0.5 s)")  # fmt: skip
    lines = [table(headers, rows)]
    lines.append(
        f"polling thread (GPU without a counter, 50 ms): "
        f"{payload['poller_cpu_pct_of_core']:.2f} % of one core"
    )
    g = payload["agent_energy_get_us"]
    lines.append(
        f"agent GET /api/v1/energy alone: median {g['median']:.0f} us, p95 {g['p95']:.0f} us"
    )
    if payload["zeus_version"] is None:
        lines.append("zeus is not installed (pip install zeus): its rows are missing")
    return "\n".join(lines)


OPTIONS = (
    Option("--windows", 2000, "windows per contender per round", quick=200),
    Option("--rounds", 5, quick=2),
    Option("--agent-windows", 500, quick=100),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/bench_energymeter.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
