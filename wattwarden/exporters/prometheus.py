"""Prometheus exposition: a custom collector that renders the store at scrape time.

It only reads a :class:`~wattwarden.collectors.store.StoreSnapshot`; a scrape never calls NVML.
Names and labels follow the metrics contract in DESIGN.md; units are base units and no value is NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from wattwarden import __version__
from wattwarden.collectors.base import AnyRegistration
from wattwarden.collectors.jobs import JobRegistry
from wattwarden.collectors.metrics import GPU_METRICS, MetricSpec, S, values
from wattwarden.collectors.registry import REGISTRATIONS
from wattwarden.collectors.store import GpuView, MetricStore, StoreSnapshot

GPU_LABELS = ["gpu", "uuid"]


def table_families(
    specs: Iterable[MetricSpec[S]],
    own_labels: Sequence[str],
    subjects: Sequence[tuple[Sequence[str], S]],
) -> Iterator[Metric]:
    """One family per row of a metric table, in table order, over every subject.

    ``subjects`` pairs each subject with its own label values (``own_labels``: e.g. a GPU's
    ``gpu`` and ``uuid``), which come before the row's labels. Missing and NaN values are skipped.
    """
    for spec in specs:
        kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
        family = kind(spec.name, spec.help, labels=[*own_labels, *spec.labels])
        for lv, subject in subjects:
            for labels, value in values(spec.read, subject):
                family.add_metric([*lv, *labels], value)
        yield family


class StoreCollector:
    """A prometheus_client custom collector over a :class:`MetricStore`."""

    def __init__(
        self,
        store: MetricStore,
        *,
        backend: str,
        extra: Callable[[StoreSnapshot], Iterator[Metric]] | None = None,
        registrations: Sequence[AnyRegistration] = REGISTRATIONS,
    ) -> None:
        self._store = store
        self._backend = backend
        self._extra = extra
        self._registrations = registrations

    def describe(self) -> list[Metric]:
        """No description: registering must not trigger a collection."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield every family from one snapshot."""
        snap = self._store.snapshot()
        yield from self._gpu_families(snap.gpus)
        yield from self._collector_families(snap)
        yield from self._self_families(snap)
        if self._extra is not None:
            yield from self._extra(snap)

    def _gpu_families(self, gpus: tuple[GpuView, ...]) -> Iterator[Metric]:
        subjects = [((str(v.sample.info.index), v.sample.info.uuid), v) for v in gpus]
        return table_families(GPU_METRICS, GPU_LABELS, subjects)

    def _collector_families(self, snap: StoreSnapshot) -> Iterator[Metric]:
        """Each registered collector's table, over its latest samples (none: no families)."""
        for reg in self._registrations:
            samples = snap.samples(reg.sample_type)
            if samples:
                yield from table_families(reg.metrics, (), [((), s) for s in samples])

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
        yield from _policy_families(snap)


MODES = ("dry_run", "apply")
"""The policy engine's modes, each a series of ``wattwarden_policy_mode``."""


def _policy_families(snap: StoreSnapshot) -> Iterator[Metric]:
    """The control loop's decisions, switches, mode, health and migrations.

    ``wattwarden_policy_decisions_total`` counts what the engine decided each period (set, keep,
    hold per GPU), ``wattwarden_policy_actions_total`` what was done about it (limit changes
    made or recorded, and failed): a steady engine adds keeps, not actions.
    """
    decisions = CounterMetricFamily(
        "wattwarden_policy_decisions",
        "Decisions of the policy engine, one per GPU and period: set, keep or hold.",
        labels=["policy", "action", "mode"],
    )
    for (policy, action, mode_), count in sorted(snap.policy_decisions.items()):
        decisions.add_metric([policy, action, mode_], count)
    state = snap.policy_state
    active = GaugeMetricFamily(
        "wattwarden_policy_active", "1 if the policy is on, 0 if off.", labels=["policy"]
    )
    mode = GaugeMetricFamily(
        "wattwarden_policy_mode",
        "1 for the policy engine's mode in force (dry_run or apply), 0 for the other.",
        labels=["mode"],
    )
    holding = GaugeMetricFamily(
        "wattwarden_policy_holding",
        "1 while the policy engine holds (stale or lost readings, a failing policy), else 0.",
    )
    unreachable = GaugeMetricFamily(
        "wattwarden_power_budget_unreachable",
        "1 while the power budget cannot be met even with every GPU at its minimum limit.",
    )
    fallback = GaugeMetricFamily(
        "wattwarden_policy_apply_fallback",
        "1 after apply mode fell back to dry-run because limits may not be set.",
    )
    if state is not None:
        for name, on in sorted(state.active.items()):
            active.add_metric([name], 1.0 if on else 0.0)
        for m in MODES:
            mode.add_metric([m], 1.0 if m == state.mode else 0.0)
        holding.add_metric([], 1.0 if state.holding else 0.0)
        unreachable.add_metric([], 1.0 if state.budget_unreachable else 0.0)
        fallback.add_metric([], 1.0 if state.fallback else 0.0)
    migrations = CounterMetricFamily(
        "wattwarden_job_migrations",
        "Jobs the policy engine asked to move to another GPU, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted(snap.migrations.items()):
        migrations.add_metric([reason], count)
    yield from (decisions, active, mode, holding, unreachable, fallback, migrations)
    yield from _demand_families(snap)
    yield from _lease_families(snap)


PRIORITIES = ("high", "normal", "low")
"""Job priorities, each a series of ``wattwarden_power_demand_watts`` (and ``..._above_min_``)."""


def _demand_families(snap: StoreSnapshot) -> Iterator[Metric]:
    """What the node would draw unheld, by priority, and whether the budget starves a job."""
    state = snap.policy_state
    demand = GaugeMetricFamily(
        "wattwarden_power_demand_watts",
        "GPU power the node would draw if no limit held it back (a GPU held at its limit counts "
        "its default limit), by the top priority of the jobs on each GPU (none: low).",
        labels=["priority"],
    )
    above_min = GaugeMetricFamily(
        "wattwarden_power_demand_above_min_watts",
        "The part of wattwarden_power_demand_watts above each GPU's minimum power limit (0 for "
        "a GPU that draws less), by priority: the node's floor plus this is what it needs.",
        labels=["priority"],
    )
    starving = GaugeMetricFamily(
        "wattwarden_power_budget_starving",
        "1 while the budget keeps a GPU that runs a high-priority job below what it wants.",
    )
    if state is not None:
        for priority in PRIORITIES:
            demand.add_metric([priority], state.demand_w.get(priority, 0.0))
            above_min.add_metric([priority], state.demand_above_min_w.get(priority, 0.0))
        starving.add_metric([], 1.0 if state.starving else 0.0)
    yield from (demand, above_min, starving)


def _lease_families(snap: StoreSnapshot) -> Iterator[Metric]:
    """A fleet controller's lease: live or not, until when, and how many ran out.

    Its budget is ``wattwarden_power_budget_watts{scope="lease"}``, there only while it is live.
    """
    lease = snap.lease
    active = GaugeMetricFamily(
        "wattwarden_power_lease_active",
        "1 while a fleet controller's lease on the power budget is live (its budget overrides "
        "the local one), else 0.",
    )
    expiry = GaugeMetricFamily(
        "wattwarden_power_lease_expiry_timestamp_seconds",
        "Unix time the live lease runs out at, unless renewed.",
    )
    expirations = CounterMetricFamily(
        "wattwarden_power_lease_expirations",
        "Leases that ran out without a renewal (the local budget was in force again).",
    )
    if lease is not None:
        active.add_metric([], 0.0 if lease.expires_at_s is None else 1.0)
        if lease.expires_at_s is not None:
            expiry.add_metric([], lease.expires_at_s)
        expirations.add_metric([], lease.expirations_total)
    yield from (active, expiry, expirations)


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
