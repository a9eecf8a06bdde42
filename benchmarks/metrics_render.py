"""(b) /metrics render time for 8 GPUs: our StoreCollector vs plain prometheus_client metrics.

Ours: a :class:`MetricStore` filled by real sampler passes (GpuCollector over the fake NVML on the
simulated fleet, plus the host collector), 15 s of 10 Hz samples in the export window, rendered
through ``StoreCollector`` + ``make_registry`` + ``render`` as the agent does on every scrape
(a store snapshot, window mean and peak, and every family built at scrape time).

Baseline: a plain ``CollectorRegistry`` holding ordinary ``Gauge`` / ``Counter`` objects with the
same metric names, label names and label values, i.e. the same series with the same values,
rendered with ``generate_latest``. (Counter ``_created`` series are turned off so the series match;
the benchmark checks that both expositions hold exactly the same set of series.) Values in the
baseline are set once, before timing: it measures only exposition, the cheapest a scrape can be.

Both are rendered interleaved, many times; per render, wall time (``perf_counter``) and process
CPU time. Goal: ours no slower than the baseline, and under 5 ms median.

    python -m benchmarks.metrics_render [--renders 2000] [--quick]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import Option, run_benchmark, summary, table
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.host import HostCollector
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.prometheus import StoreCollector, make_registry, render
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim.clock import ManualClock
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml
from wattwarden.hardware.sim.fleet import SimFleet

NAME = "metrics_render"
GPUS = 8
LOADS = (0.97, 0.95, 0.92, 0.9, 0.75, 0.5, 0.2, 0.0)
INTERVAL_S = 0.1
WINDOW_S = 15.0
GOAL_MEDIAN_MS = 5.0


def filled_registry(passes: int) -> tuple[CollectorRegistry, MetricStore]:
    """Our registry over a store filled by ``passes`` sampler passes, 100 ms apart."""
    clock = ManualClock()
    fleet = SimFleet(GPUS, seed=1, clock=clock)
    for gpu, load in zip(fleet.gpus, LOADS, strict=True):
        gpu.set_load(load)
    install_fake_nvml(fleet)
    store = MetricStore(window_s=WINDOW_S, interval_s=INTERVAL_S, monotonic=clock)
    gpu_collector = GpuCollector(NvmlBackend(), monotonic=clock)
    sampler = Sampler(
        store, [gpu_collector, HostCollector()], interval_s=INTERVAL_S, monotonic=clock
    )
    for _ in range(passes):
        sampler.run_once()
        clock.advance(INTERVAL_S)
    store.set_power_budget("node", 5600.0)
    return make_registry(StoreCollector(store, backend="sim")), store


def plain_registry(ours: CollectorRegistry) -> CollectorRegistry:
    """Ordinary Gauge/Counter objects holding the same series as ``ours`` (values set once)."""
    plain = CollectorRegistry(auto_describe=False)
    for family in ours.collect():
        # the families' declared label names (kept even when a family has no sample yet)
        labelnames: list[str] = list(getattr(family, "_labelnames", ()))
        for s in family.samples:
            for name in s.labels:
                if name not in labelnames:
                    labelnames.append(name)
        if family.type == "counter":
            counter = Counter(family.name, family.documentation, labelnames, registry=plain)
            for s in family.samples:
                if s.name.endswith("_total"):
                    (counter.labels(**s.labels) if labelnames else counter).inc(s.value)
        elif family.type == "gauge":
            gauge = Gauge(family.name, family.documentation, labelnames, registry=plain)
            for s in family.samples:
                (gauge.labels(**s.labels) if labelnames else gauge).set(s.value)
        else:
            raise TypeError(f"unexpected family type {family.type} for {family.name}")
    return plain


def series(body: bytes) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every (sample name, labels) pair in a text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def run(renders: int, passes: int) -> dict[str, Any]:
    """Fill, check the two registries agree, then time both renderers."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    ours, _store = filled_registry(passes)
    plain = plain_registry(ours)

    ours_body, _ = render(ours)
    plain_body = generate_latest(plain)
    ours_series, plain_series = series(ours_body), series(plain_body)
    if ours_series != plain_series:
        raise SystemExit(
            "series differ: only ours "
            f"{sorted(ours_series - plain_series)[:5]}, only plain "
            f"{sorted(plain_series - ours_series)[:5]}"
        )

    candidates: dict[str, tuple[str, Callable[[], object]]] = {
        "ours_text": ("wattwarden StoreCollector -> render() [text]", lambda: render(ours)),
        "plain_text": (
            "plain Gauge/Counter -> generate_latest [text]",
            lambda: generate_latest(plain),
        ),
        "ours_openmetrics": (
            "wattwarden StoreCollector -> render() [OpenMetrics]",
            lambda: render(ours, OPENMETRICS),
        ),
        "plain_openmetrics": (
            "plain Gauge/Counter -> generate_latest [OpenMetrics]",
            lambda: generate_openmetrics(plain),  # type: ignore[no-untyped-call]
        ),
    }
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    keys = list(candidates)
    for key in keys:
        for _ in range(20):
            candidates[key][1]()
    for r in range(renders):
        for j in range(len(keys)):
            key = keys[(r + j) % len(keys)]
            fn = candidates[key][1]
            c0, w0 = time.process_time_ns(), time.perf_counter_ns()
            fn()
            w1, c1 = time.perf_counter_ns(), time.process_time_ns()
            wall[key].append((w1 - w0) / 1e6)
            cpu[key].append((c1 - c0) / 1e6)

    results: dict[str, dict[str, Any]] = {
        key: {"label": label, "wall_ms": summary(wall[key]), "cpu_ms": summary(cpu[key])}
        for key, (label, _fn) in candidates.items()
    }
    ratios = {
        fmt: {
            stat: results[f"ours_{fmt}"]["wall_ms"][stat] / results[f"plain_{fmt}"]["wall_ms"][stat]
            for stat in ("median", "p95")
        }
        for fmt in ("text", "openmetrics")
    }
    ours_median = results["ours_text"]["wall_ms"]["median"]
    return {
        "params": {
            "gpus": GPUS,
            "loads": LOADS,
            "sampler_passes": passes,
            "interval_s": INTERVAL_S,
            "window_s": WINDOW_S,
            "renders": renders,
        },
        "series": len(ours_series),
        "body_bytes": {"ours_text": len(ours_body), "plain_text": len(plain_body)},
        "results": results,
        "ratios_wall_ours_over_plain": ratios,
        "goal": f"ours no slower than plain (ratio <= 1) and median < {GOAL_MEDIAN_MS} ms [text]",
        "goal_met": {
            "no_slower": ratios["text"]["median"] <= 1.0,
            "under_5ms": ours_median < GOAL_MEDIAN_MS,
        },
    }


def report(payload: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    rows = [
        [
            r["label"],
            r["wall_ms"]["median"],
            r["wall_ms"]["p95"],
            r["cpu_ms"]["median"],
        ]
        for r in payload["results"].values()
    ]
    p = payload["params"]
    out = [
        f"/metrics render, {p['gpus']} GPUs, {payload['series']} series, "
        f"{p['renders']} renders each (store: {p['sampler_passes']} sampler passes)",
        table(["renderer", "wall ms med", "wall ms p95", "CPU ms med"], rows),
        "ours/plain wall-time ratio (<= 1 means ours is no slower):",
    ]
    for fmt, r in payload["ratios_wall_ours_over_plain"].items():
        out.append(f"  {fmt:12s} median {r['median']:.2f}x   p95 {r['p95']:.2f}x")
    out.append(f"goal met: {payload['goal_met']}  ({payload['goal']})")
    return "\n".join(out)


OPTIONS = (
    Option("--renders", 2000, "renders of each candidate", quick=200),
    Option("--passes", 200, "sampler passes that fill the store first"),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/metrics_render.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
