"""Prometheus exposition: a custom collector that renders the store at scrape time.

It only reads a :class:`~wattwarden.collectors.store.StoreSnapshot`; a scrape never calls NVML.
Names and labels follow the metrics contract in DESIGN.md; units are base units and no value is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from wattwarden import __version__
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.store import GpuView, MetricStore, StoreSnapshot
from wattwarden.hardware.device import CLOCK_EVENT_LABELS

GPU_LABELS = ["gpu", "uuid"]


def _ok(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


class StoreCollector:
    """A prometheus_client custom collector over a :class:`MetricStore`."""

    def __init__(
        self,
        store: MetricStore,
        *,
        backend: str,
        extra: Callable[[StoreSnapshot], Iterator[Metric]] | None = None,
    ) -> None:
        self._store = store
        self._backend = backend
        self._extra = extra

    def describe(self) -> list[Metric]:
        """No description: registering must not trigger a collection."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield every family from one snapshot."""
        snap = self._store.snapshot()
        yield from self._gpu_families(snap.gpus)
        yield from self._host_families(snap)
        yield from self._self_families(snap)
        if self._extra is not None:
            yield from self._extra(snap)

    def _gpu_families(self, gpus: tuple[GpuView, ...]) -> Iterator[Metric]:
        g = GaugeMetricFamily
        up = g(
            "gpu_up", "1 if the GPU answers, 0 if it is lost (fell off the bus).", labels=GPU_LABELS
        )
        info = g(
            "gpu_info",
            "GPU identity; always 1.",
            labels=[*GPU_LABELS, "name", "pci_bus_id", "driver_version"],
        )
        power = g(
            "gpu_power_watts",
            "Mean power over the export window (sub-second samples).",
            labels=GPU_LABELS,
        )
        peak = g("gpu_power_peak_watts", "Peak power over the export window.", labels=GPU_LABELS)
        energy = CounterMetricFamily(
            "gpu_energy_joules",
            "Energy used by the GPU (hardware counter where supported, else integrated power).",
            labels=GPU_LABELS,
        )
        limit = g("gpu_power_limit_watts", "Enforced power limit.", labels=GPU_LABELS)
        limit_default = g(
            "gpu_power_limit_default_watts", "Default power limit.", labels=GPU_LABELS
        )
        limit_min = g(
            "gpu_power_limit_min_watts", "Lowest settable power limit.", labels=GPU_LABELS
        )
        limit_max = g(
            "gpu_power_limit_max_watts", "Highest settable power limit.", labels=GPU_LABELS
        )
        temp = g("gpu_temperature_celsius", "Temperature.", labels=[*GPU_LABELS, "sensor"])
        util = g("gpu_utilization_ratio", "Fraction of time a kernel ran.", labels=GPU_LABELS)
        mem_util = g(
            "gpu_memory_utilization_ratio",
            "Fraction of time device memory was read or written.",
            labels=GPU_LABELS,
        )
        mem_used = g("gpu_memory_used_bytes", "Device memory in use.", labels=GPU_LABELS)
        mem_total = g("gpu_memory_total_bytes", "Device memory in total.", labels=GPU_LABELS)
        clock = g("gpu_clock_hertz", "Current clock.", labels=[*GPU_LABELS, "clock"])
        event_active = g(
            "gpu_clock_event_active",
            "1 while the clock-event (throttle) reason is active.",
            labels=[*GPU_LABELS, "reason"],
        )
        event_seconds = CounterMetricFamily(
            "gpu_clock_event_seconds",
            "Time the clock-event (throttle) reason was active.",
            labels=[*GPU_LABELS, "reason"],
        )
        xid = CounterMetricFamily(
            "gpu_xid_errors", "XID errors reported.", labels=[*GPU_LABELS, "xid"]
        )
        proc_mem = g(
            "gpu_process_memory_used_bytes",
            "Device memory used by a process.",
            labels=[*GPU_LABELS, "pid"],
        )
        proc_util = g(
            "gpu_process_utilization_ratio",
            "SM utilization of a process.",
            labels=[*GPU_LABELS, "pid"],
        )
        for view in gpus:
            s = view.sample
            i = s.info
            lv = [str(i.index), i.uuid]
            up.add_metric(lv, 1.0 if s.up else 0.0)
            info.add_metric([*lv, i.name, i.pci_bus_id, i.driver_version], 1.0)
            energy.add_metric(lv, s.energy_j)
            for label, seconds in s.clock_event_seconds.items():
                event_seconds.add_metric([*lv, label], seconds)
            for code, count in sorted(s.xid_counts.items()):
                xid.add_metric([*lv, str(code)], count)
            for gauge, value in (
                (limit_default, i.power_limit_default_w),
                (limit_min, i.power_limit_min_w),
                (limit_max, i.power_limit_max_w),
            ):
                if _ok(value):
                    gauge.add_metric(lv, value)  # type: ignore[arg-type]
            r = s.reading
            if r is None or not s.up:
                continue  # a lost GPU keeps gpu_up 0, its identity and counters; no stale gauges
            if _ok(view.power_mean_w):
                power.add_metric(lv, view.power_mean_w)  # type: ignore[arg-type]
            if _ok(view.power_peak_w):
                peak.add_metric(lv, view.power_peak_w)  # type: ignore[arg-type]
            for gauge, value in (
                (limit, r.power_limit_w),
                (util, r.utilization_gpu_ratio),
                (mem_util, r.utilization_memory_ratio),
                (mem_used, r.memory_used_bytes),
                (mem_total, r.memory_total_bytes),
            ):
                if _ok(value):
                    gauge.add_metric(lv, value)  # type: ignore[arg-type]
            if _ok(r.temperature_gpu_c):
                temp.add_metric([*lv, "gpu"], r.temperature_gpu_c)  # type: ignore[arg-type]
            if _ok(r.temperature_memory_c):
                temp.add_metric([*lv, "memory"], r.temperature_memory_c)  # type: ignore[arg-type]
            if _ok(r.clock_sm_hz):
                clock.add_metric([*lv, "sm"], r.clock_sm_hz)  # type: ignore[arg-type]
            if _ok(r.clock_memory_hz):
                clock.add_metric([*lv, "memory"], r.clock_memory_hz)  # type: ignore[arg-type]
            if r.clock_event_mask is not None:
                for bit, label in CLOCK_EVENT_LABELS:
                    event_active.add_metric([*lv, label], 1.0 if r.clock_event_mask & bit else 0.0)
            for p in r.processes:
                if p.memory_used_bytes is not None:
                    proc_mem.add_metric([*lv, str(p.pid)], p.memory_used_bytes)
                if p.sm_utilization_ratio is not None:
                    proc_util.add_metric([*lv, str(p.pid)], p.sm_utilization_ratio)
        yield from (
            up,
            info,
            power,
            peak,
            energy,
            limit,
            limit_default,
            limit_min,
            limit_max,
            temp,
            util,
            mem_util,
            mem_used,
            mem_total,
            clock,
            event_active,
            event_seconds,
            xid,
            proc_mem,
            proc_util,
        )

    def _host_families(self, snap: StoreSnapshot) -> Iterator[Metric]:
        if snap.host is not None:
            h = snap.host
            yield GaugeMetricFamily(
                "host_cpu_utilization_ratio",
                "Host CPU utilization, all cores.",
                value=h.cpu_utilization_ratio,
            )
            yield GaugeMetricFamily(
                "host_memory_used_bytes",
                "Host memory in use (total - available).",
                value=h.memory_used_bytes,
            )
            yield GaugeMetricFamily(
                "host_memory_total_bytes", "Host memory in total.", value=h.memory_total_bytes
            )
        if snap.rapl:
            energy = CounterMetricFamily(
                "host_energy_joules", "CPU/DRAM energy from RAPL.", labels=["domain"]
            )
            power = GaugeMetricFamily(
                "host_power_watts", "CPU/DRAM power from RAPL.", labels=["domain"]
            )
            for r in snap.rapl:
                energy.add_metric([r.domain], r.energy_j)
                if _ok(r.power_w):
                    power.add_metric([r.domain], r.power_w)  # type: ignore[arg-type]
            yield energy
            yield power

    def _self_families(self, snap: StoreSnapshot) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "wattwarden_build_info",
            "wattwarden version and GPU backend; always 1.",
            labels=["version", "backend"],
        )
        build.add_metric([__version__, self._backend], 1.0)
        yield build
        up = GaugeMetricFamily(
            "wattwarden_collector_up",
            "1 if the collector's last pass worked.",
            labels=["collector"],
        )
        errors = CounterMetricFamily(
            "wattwarden_collector_errors", "Failed collector passes.", labels=["collector"]
        )
        duration = GaugeMetricFamily(
            "wattwarden_collector_duration_seconds",
            "Duration of the collector's last pass.",
            labels=["collector"],
        )
        for name in sorted(snap.collectors):
            h = snap.collectors[name]
            up.add_metric([name], 1.0 if h.up else 0.0)
            errors.add_metric([name], h.errors_total)
            duration.add_metric([name], h.duration_s)
        yield from (up, errors, duration)
        if snap.last_sample_s is not None:
            yield GaugeMetricFamily(
                "wattwarden_last_sample_timestamp_seconds",
                "Unix time of the last completed sampler pass.",
                value=snap.last_sample_s,
            )
        budget = GaugeMetricFamily(
            "wattwarden_power_budget_watts", "Power budget in force.", labels=["scope"]
        )
        for scope, watts in sorted(snap.power_budgets_w.items()):
            budget.add_metric([scope], watts)
        yield budget
        actions = CounterMetricFamily(
            "wattwarden_policy_actions",
            "Actions the policy engine took.",
            labels=["policy", "action", "mode"],
        )
        for (policy, action, mode), count in sorted(snap.policy_actions.items()):
            actions.add_metric([policy, action, mode], count)
        yield actions


def make_registry(collector: StoreCollector) -> CollectorRegistry:
    """A registry holding only our collector (no process/platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """Body and content type for a scrape, honouring OpenMetrics negotiation."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def job_families(jobs: JobRegistry, snap: StoreSnapshot) -> Iterator[Metric]:
    """Per-job energy attribution and progress, for ``StoreCollector(extra=...)``.

    Finished jobs keep their final counters for the registry's retention, so a scrape between a
    job's end and the next scrape still sees its total; their power gauge goes (they draw none).
    """
    uuids = {v.sample.info.index: v.sample.info.uuid for v in snap.gpus}
    energy = CounterMetricFamily(
        "gpu_job_energy_joules",
        "GPU energy attributed to a job (its share of the GPU's active energy).",
        labels=[*GPU_LABELS, "job"],
    )
    power = GaugeMetricFamily(
        "gpu_job_power_watts", "GPU power attributed to a job.", labels=[*GPU_LABELS, "job"]
    )
    tokens = CounterMetricFamily("wattwarden_job_tokens", "Tokens a job reported.", labels=["job"])
    steps = CounterMetricFamily("wattwarden_job_steps", "Steps a job reported.", labels=["job"])
    efficiency = GaugeMetricFamily(
        "wattwarden_job_tokens_per_joule",
        "Tokens per joule of attributed GPU energy.",
        labels=["job"],
    )
    for job in jobs.jobs():
        for gpu, joules in sorted(job.energy_by_gpu_j.items()):
            energy.add_metric([str(gpu), uuids.get(gpu, ""), job.name], joules)
        if job.state == "running":
            power.add_metric([str(job.gpu), uuids.get(job.gpu, ""), job.name], job.power_w)
        tokens.add_metric([job.name], job.tokens)
        steps.add_metric([job.name], job.step)
        if job.tokens_per_joule is not None:
            efficiency.add_metric([job.name], job.tokens_per_joule)
    idle = CounterMetricFamily(
        "gpu_idle_energy_joules", "GPU energy at idle power (not attributed).", labels=GPU_LABELS
    )
    unattributed = CounterMetricFamily(
        "gpu_unattributed_energy_joules",
        "Active GPU energy with no registered job on the GPU.",
        labels=GPU_LABELS,
    )
    for gpu, split in jobs.gpu_splits().items():
        lv = [str(gpu), uuids.get(gpu, "")]
        idle.add_metric(lv, split.idle_j)
        unattributed.add_metric(lv, split.unattributed_j)
    yield from (energy, power, tokens, steps, efficiency, idle, unattributed)
