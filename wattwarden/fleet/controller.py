"""The fleet controller: one power budget for many nodes, read from Prometheus, leased to agents.

Level-triggered, like the controllers operators trust (Kubernetes controllers, Dynamo): each
period (:meth:`FleetController.period`) reads the whole fleet again and computes what each node
should hold, so a missed period or a restart costs nothing:

1. read Prometheus (:class:`~wattwarden.fleet.prom.FleetReader`), every figure at one time. If
   that fails (down, slow, erroring) the controller *holds*: it pushes nothing, so no lease is
   ever built from stale data; the leases in force run out on their own and each agent falls
   back to its local budget.
2. model each node (:func:`~wattwarden.fleet.model.build_view`). A node seen for the first time
   has its current lease read from its agent (``GET /api/v1/policy/lease``): after a restart the
   controller resumes from what is in force, so budgets do not jump.
3. sort the nodes: *ok* (fresh series, agent answered its last push) take part in the split;
   *unreachable* ones (fresh series, but the agent did not answer, or another controller holds
   it, or it refused the push) keep the share they hold, out of the split, and get one push a
   period at that share (a renewal; after a 409, the attempt to take over once the other's
   lease has run out); *stale* ones (series too old, or gone) keep their share until their lease
   could have expired, then it is released to the others.
4. split and plan (:mod:`wattwarden.fleet.allocate`), then, in apply mode, push in two phases:
   renewals and decreases, then the increases that the answered decreases released.
5. ask the scheduler to move a job off each node that is starving (its agent says a
   high-priority job's GPU is held back) and that the split cannot give more.

Leases carry the controller's id and its generation (the start time in integer milliseconds):
a restart of the same id is a newer generation and takes its own leases over at once, while a
second controller with another id gets 409 until the first one's leases expire, so two
controllers started by mistake never fight.

Dry-run (the default) computes, logs and exports what it would lease, and pushes nothing.

Threads: :meth:`FleetController.run` owns every piece of state below; pushes and reads fan out
to worker threads that only return results. The metrics object has its own lock.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

from wattwarden.api.http import HttpServer
from wattwarden.config import ConfigError, parse_listen
from wattwarden.fleet import allocate
from wattwarden.fleet.allocate import EPSILON_W, PRIORITIES, Bands, Plan
from wattwarden.fleet.config import ControllerConfig, read_secret
from wattwarden.fleet.leases import (
    AgentCredentials,
    AgentLink,
    AgentUnreachable,
    Lease,
    PushResult,
    push_all,
)
from wattwarden.fleet.metrics import ControllerMetrics, ControllerState, app
from wattwarden.fleet.model import FleetView, NodeObservation, build_view
from wattwarden.fleet.prom import Auth, FleetReader, PrometheusClient, PrometheusError, Readings
from wattwarden.fleet.schedulers import JobRef, MoveResult, Scheduler, scheduler_for

log = logging.getLogger(__name__)

DEFAULT_PERIOD_S = 5.0
DEFAULT_LEASE_S = 30.0
DEFAULT_AGENT_PORT = 9767
MIGRATION_COOLDOWN_S = 600.0
"""A job asked to move is not asked again for this long, whatever the scheduler said."""
MIGRATABLE_PRIORITIES = ("low", "normal")
"""Jobs that may be moved to make room for high-priority work on their node."""


class Reader(Protocol):
    """Reads one period's figures (:class:`~wattwarden.fleet.prom.FleetReader`)."""

    def read(self, at_s: float) -> Readings:
        """Everything at ``at_s``; PrometheusError when it cannot."""


class Link(Protocol):
    """The agents' API (:class:`~wattwarden.fleet.leases.AgentLink`)."""

    def push(self, lease: Lease) -> PushResult:
        """Give one agent its lease."""

    def read_lease(self, instance: str) -> dict[str, Any] | None:
        """The lease an agent holds; AgentUnreachable without an answer."""

    def release(self, instance: str, controller: str) -> PushResult:
        """Hand a lease back."""

    def jobs(self, instance: str) -> list[dict[str, Any]]:
        """An agent's jobs; AgentUnreachable without an answer."""


PushAll = Callable[[Link, Sequence[Lease], int], list[PushResult]]


def default_push_all(link: Link, leases: Sequence[Lease], concurrency: int) -> list[PushResult]:
    """:func:`~wattwarden.fleet.leases.push_all`, bounded by ``concurrency``."""
    return push_all(cast(AgentLink, link), leases, concurrency=concurrency)


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """What the loop runs with (the command's settings, checked)."""

    budget_w: float
    controller_id: str
    period_s: float = DEFAULT_PERIOD_S
    lease_s: float = DEFAULT_LEASE_S
    apply: bool = False
    concurrency: int = 64
    agent_port: int = DEFAULT_AGENT_PORT
    stale_after_s: float | None = None
    """None: 3 periods or 2 scrape intervals, the larger (see :mod:`wattwarden.fleet.model`)."""
    bands: Bands = field(default_factory=Bands)
    migration_cooldown_s: float = MIGRATION_COOLDOWN_S
    release_on_exit: bool = False

    @property
    def mode(self) -> str:
        """``apply`` or ``dry_run``."""
        return "apply" if self.apply else "dry_run"


@dataclass(slots=True)
class _Node:
    """What the controller knows of one node between periods (owned by the loop's thread)."""

    address: str
    committed_w: float | None = None
    """The lease that may be in force (ours, or another controller's where known)."""
    expires_mono: float | None = None
    """When that lease has expired at the latest (our monotonic clock)."""
    expires_wall: float | None = None
    """When it expires on the agent's clock, as its last answer said."""
    ours: bool = False
    problem: str | None = None
    """The last push's result when not ``ok``: unreachable, conflict, unauthorized, rejected."""
    needs_read: bool = True
    """Its lease is to be read from the agent (first seen, or the last read got no answer)."""


@dataclass(frozen=True, slots=True)
class Migration:
    """A move asked of (or, in dry-run, that would be asked of) the scheduler."""

    node: str
    job: JobRef
    result: MoveResult | None
    """None in dry-run."""


@dataclass(frozen=True, slots=True)
class PeriodReport:
    """What one period did (for logs and tests)."""

    holding: str | None
    """Why the period held (pushed nothing), or None."""
    states: dict[str, str] = field(default_factory=dict)
    """Each node's state: ok, unreachable or stale."""
    plan: Plan | None = None
    pushes: list[tuple[Lease, PushResult]] = field(default_factory=list)
    would_lease: dict[str, float] = field(default_factory=dict)
    """The lease each node would get (dry-run) or was pushed (apply), by instance."""
    migrations: list[Migration] = field(default_factory=list)


class FleetController:
    """The controller's loop and its state between periods."""

    def __init__(
        self,
        settings: ControllerSettings,
        reader: Reader,
        link: Link,
        *,
        metrics: ControllerMetrics | None = None,
        scheduler: Scheduler | None = None,
        push: PushAll = default_push_all,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.reader = reader
        self.link = link
        self.scheduler = scheduler
        self.metrics = metrics or ControllerMetrics(
            settings.budget_w, settings.mode, scheduler.name if scheduler else None
        )
        self._push_all = push
        self._mono = monotonic
        self._wall = wall
        self.generation = int(wall() * 1000)
        """The start time in integer milliseconds: a restart is a newer generation."""
        self._nodes: dict[str, _Node] = {}
        self._said: dict[str, str] = {}  # per subject, the last thing logged (log once)
        self._said_about: dict[str, set[str]] = {}  # per node, the kinds said of it
        self._cooldown: dict[tuple[str, str], float] = {}  # (kind, id) -> when asked
        self._would: dict[str, float] = {}
        self._reachable = True

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Run periods on a monotonic grid until ``stop`` is set; then :meth:`close`."""
        log.info(
            "controller %s (generation %d) in %s mode: budget %.0f W, period %g s, lease %g s",
            self.settings.controller_id,
            self.generation,
            self.settings.mode,
            self.settings.budget_w,
            self.settings.period_s,
            self.settings.lease_s,
        )
        try:
            next_at = self._mono()
            while True:
                try:
                    self.period()
                except Exception:  # a bug of ours must not stop the loop: log it and hold
                    log.exception("controller period failed; holding until the next one")
                next_at += self.settings.period_s
                now = self._mono()
                if next_at < now:  # late: skip the missed periods instead of bunching them
                    next_at = now + self.settings.period_s
                if stop.wait(next_at - now):
                    break
        finally:
            self.close()

    def close(self) -> None:
        """Release our leases if configured to (they are otherwise left to expire)."""
        if not (self.settings.release_on_exit and self.settings.apply):
            return
        ours = [i for i, n in self._nodes.items() if n.ours and n.committed_w is not None]
        if not ours:
            return

        def release(instance: str) -> PushResult:
            return self.link.release(self._nodes[instance].address, self.settings.controller_id)

        with ThreadPoolExecutor(min(len(ours), self.settings.concurrency)) as pool:
            results = list(pool.map(release, ours))
        done = sum(r.result == "ok" for r in results)
        log.info(
            "released %d of %d leases on exit; the agents use their local budgets", done, len(ours)
        )

    # ------------------------------------------------------------------ one period
    def period(self) -> PeriodReport:
        """Read, model, split, push (apply mode), move jobs; publish the metrics.

        The cyclic garbage collector is paused for the period (:func:`_gc_paused`): a period
        at fleet scale builds some 100,000 objects that live until it ends (decoded answers,
        the view, the plan), and automatic collections scanning them while they are all alive
        found nothing to free yet cost a tenth of the period. One young collection at the end
        does what they would have done.
        """
        with _gc_paused():
            return self._period()

    def _period(self) -> PeriodReport:
        started = self._mono()
        at_s = self._wall()
        self._expire(started)
        try:
            readings = self.reader.read(at_s)
        except PrometheusError as e:
            return self._hold(str(e), started)
        view = build_view(
            readings,
            period_s=self.settings.period_s,
            agent_port=self.settings.agent_port,
            stale_after_s=self.settings.stale_after_s,
        )
        self._discover(view)
        states, held = self._classify(view)
        ok_nodes = _ok_demands(view, states)
        committed_ok = {
            n.instance: c
            for n in ok_nodes
            if (c := self._nodes[n.instance].committed_w) is not None
        }
        plan = allocate.plan(
            self.settings.budget_w, ok_nodes, committed_ok, held, self.settings.bands
        )
        self._say_reachability(plan, held)
        report_pushes: list[tuple[Lease, PushResult]] = []
        if self.settings.apply:
            would = self._apply(plan, view, states, ok_nodes, report_pushes)
        else:
            would = {**plan.first, **plan.raises}
            self._log_dry_run(plan, would)
        migrations = self._migrate(view, ok_nodes, plan)
        self._publish(view, states=states, plan=plan, would=would, started=started, at_s=at_s)
        return PeriodReport(None, states, plan, report_pushes, would, migrations)

    def _hold(self, why: str, started: float) -> PeriodReport:
        """Prometheus could not be read: push nothing; the leases in force run out on their own."""
        self._say(
            "prometheus",
            f"holding: {why}; no lease is pushed until Prometheus answers",
            logging.WARNING,
        )
        self.metrics.update(
            prometheus_up=False,
            holding=True,
            holding_reason=why,
            node_budget_w=self._ours(),
            lease_expiry_min_s=self._expiry_min(),
            period_duration_s=self._mono() - started,
            last_period_s=self._wall(),
            last_period_mono=self._mono(),
        )
        return PeriodReport(why)

    def _expire(self, now: float) -> None:
        """Forget leases that have expired for sure (their node is back to its local budget)."""
        for n in self._nodes.values():
            if n.expires_mono is not None and n.expires_mono <= now:
                n.committed_w, n.expires_mono, n.expires_wall, n.ours = None, None, None, False

    def _discover(self, view: FleetView) -> None:
        """Read the current lease of each node seen for the first time (a restart resumes).

        A node whose agent did not answer is read again next period, until it does.
        """
        for i, obs in view.nodes.items():
            if i not in self._nodes:
                self._nodes[i] = _Node(obs.address)
        new = [i for i in view.nodes if self._nodes[i].needs_read]
        if not new:
            return

        def read(instance: str) -> tuple[str, dict[str, Any] | AgentUnreachable | None]:
            try:
                return instance, self.link.read_lease(view.nodes[instance].address)
            except AgentUnreachable as e:
                return instance, e

        with ThreadPoolExecutor(min(len(new), self.settings.concurrency)) as pool:
            answers = list(pool.map(read, new))
        now = self._mono()
        for instance, answer in answers:
            node = self._nodes[instance]
            if isinstance(answer, AgentUnreachable):
                node.problem = "unreachable"
                self._say(
                    f"unreachable:{instance}", f"node {instance}: cannot read its lease: {answer}"
                )
                continue
            node.needs_read = False
            if node.problem == "unreachable":
                node.problem = None
            if answer is None:
                continue
            try:
                budget = float(answer["power_budget_watts"])
                remaining = float(answer["remaining_s"])
                holder = str(answer["holder"])
                generation = int(answer["generation"])
            except (KeyError, TypeError, ValueError):
                self._say(
                    f"record:{instance}",
                    f"node {instance}: its lease record is out of shape: {answer}",
                )
                continue
            if not (math.isfinite(budget) and budget > 0 and remaining > 0):
                continue
            node.committed_w = budget
            node.expires_mono = now + remaining
            expires_at = answer.get("expires_at")
            node.expires_wall = float(expires_at) if isinstance(expires_at, int | float) else None
            node.ours = holder == self.settings.controller_id
            if node.ours:
                log.info(
                    "node %s: resuming from our lease of %.0f W (generation %d)",
                    instance,
                    budget,
                    generation,
                )
            else:
                # in dry-run (a shadow of a live controller, say) it only counts as in force
                node.problem = "conflict" if self.settings.apply else None
                self._say(
                    f"conflict:{instance}",
                    f"node {instance}: holds a lease of {budget:.0f} W from controller "
                    f"{holder!r} (generation {generation}) for another {remaining:.0f} s; "
                    "its share is held until it expires",
                )

    def _classify(self, view: FleetView) -> tuple[dict[str, str], dict[str, float]]:
        """Each node's state, and the shares held out of the split (node -> lease)."""
        states: dict[str, str] = {}
        held: dict[str, float] = {}
        said_about = self._said_about
        for instance in sorted(self._nodes.keys() | view.nodes.keys()):
            node, obs = self._nodes[instance], view.nodes.get(instance)
            if obs is None or not obs.fresh:
                states[instance] = "stale"
                why = "gone from Prometheus" if obs is None else obs.problem
                self._say(
                    f"stale:{instance}",
                    f"node {instance}: stale ({why}); its lease share is held "
                    "until the lease could have expired",
                )
                if node.committed_w is None:
                    if obs is None:
                        del self._nodes[instance]
                    continue
                held[instance] = node.committed_w
                continue
            node.address = obs.address
            if node.problem == "conflict" and obs.lease_w is not None and not node.ours:
                # another controller's lease, as its agent reports it now
                node.committed_w = obs.lease_w
                node.expires_mono = self._mono() + self.settings.lease_s
            if node.problem is not None or not obs.scraped:
                states[instance] = "unreachable"
                # its lease, or (holding none of ours) its floor: room to push it one later
                held[instance] = (
                    node.committed_w if node.committed_w is not None else obs.floor_w or 0.0
                )
                if not obs.scraped:
                    self._say(
                        f"scrape:{instance}",
                        f"node {instance}: Prometheus cannot scrape its agent; its share is held",
                    )
                continue
            states[instance] = "ok"
            if instance in said_about:
                self._forget(instance, "stale", "scrape", "unreachable", "conflict", "refused")
        return states, held

    # ------------------------------------------------------------------ apply mode
    def _apply(
        self,
        plan: Plan,
        view: FleetView,
        states: Mapping[str, str],
        ok_nodes: Sequence[allocate.NodeDemand],
        report: list[tuple[Lease, PushResult]],
    ) -> dict[str, float]:
        """Push in two phases; returns what each node was pushed."""
        first = dict(plan.first)
        retry_without: list[str] = []
        for instance, state in states.items():
            if state != "unreachable":
                continue
            node = self._nodes[instance]
            if node.committed_w is not None:
                first[instance] = node.committed_w  # renewal at the share it holds
            else:
                retry_without.append(instance)
        self._push(first, plan, report)
        committed = {i: n.committed_w for i, n in self._nodes.items() if n.committed_w is not None}
        floors = {n.instance: n.floor_w for n in ok_nodes}
        grants = allocate.grant(self.settings.budget_w, plan, committed, floors)
        room = (
            self.settings.budget_w
            - math.fsum(committed.values())
            - math.fsum(g - committed.get(i, 0.0) for i, g in grants.items())
        )
        for instance in retry_without:  # agents that hold none of our leases yet: their floor
            floor = view.nodes[instance].floor_w or 0.0
            if 0 < floor <= room:
                grants[instance] = floor
                room -= floor
        self._push(grants, plan, report)
        return {**first, **grants}

    def _push(
        self, values: Mapping[str, float], plan: Plan, report: list[tuple[Lease, PushResult]]
    ) -> None:
        if not values:
            return
        names = sorted(values)
        nodes, ttl_s = self._nodes, self.settings.lease_s
        controller, generation = self.settings.controller_id, self.generation
        leases = [  # by position (instance, budget, ttl, controller, generation): 1,250 a period
            Lease(nodes[i].address, values[i], ttl_s, controller, generation) for i in names
        ]
        results = self._push_all(self.link, leases, self.settings.concurrency)
        done = self._mono()
        report.extend(zip(leases, results, strict=True))
        # Counted once for the batch (one lock, not one a push), and the common answer, ok,
        # recorded inline: this loop runs for every node pushed, twice a period.
        tally: dict[str, int] = {}
        info = log.isEnabledFor(logging.INFO)
        said_about, expires_mono = self._said_about, done + ttl_s
        for instance, lease, result in zip(names, leases, results, strict=True):
            answer = result.result
            tally[answer] = tally.get(answer, 0) + 1
            if answer != "ok":
                self._record_refusal(instance, lease, result, done)
                continue
            node = nodes[instance]
            before, budget = node.committed_w, lease.budget_w
            node.committed_w, node.expires_mono, node.expires_wall = (
                budget,
                expires_mono,
                result.expires_at,
            )
            node.ours, node.problem, node.needs_read = True, None, False
            if instance in said_about:
                self._forget(instance, "unreachable", "conflict", "refused")
            if info and (before is None or abs(before - budget) > EPSILON_W):
                was = "none" if before is None else f"{before:.0f} W"
                reason = plan.split.reasons.get(instance, "share held")
                log.info("node %s: lease %s -> %.0f W: %s", instance, was, budget, reason)
        self.metrics.count_pushes(tally)

    def _record_refusal(self, instance: str, lease: Lease, result: PushResult, done: float) -> None:
        """Update what the node may hold from a push that was not answered ``ok``."""
        node = self._nodes[instance]
        before = node.committed_w
        node.problem = result.result
        if result.result == "unreachable":
            # the push may have landed: the node may hold either lease until the new one expires
            node.committed_w = max(before or 0.0, lease.budget_w)
            node.expires_mono = max(node.expires_mono or 0.0, done + lease.ttl_s)
            self._say(
                f"unreachable:{instance}",
                f"node {instance}: agent unreachable ({result.message}); its share is held",
                logging.WARNING,
            )
        elif result.result == "conflict":
            node.ours = False
            self._say(
                f"conflict:{instance}",
                f"node {instance}: lease refused (409: {result.message}); its "
                "share is held and the push retried once a period",
                logging.WARNING,
            )
        else:
            self._say(
                f"refused:{instance}",
                f"node {instance}: lease {result.result} ({result.status}: {result.message})",
                logging.WARNING,
            )

    # ------------------------------------------------------------------ migration
    def _migrate(
        self, view: FleetView, ok_nodes: Sequence[allocate.NodeDemand], plan: Plan
    ) -> list[Migration]:
        """Ask the scheduler to move one job off each starving node the split cannot help."""
        starving = [
            n
            for n in ok_nodes
            if view.nodes[n.instance].starving
            and plan.split.shares_w[n.instance] < n.need_w("high") - EPSILON_W
        ]
        if not starving:
            return []
        if self.scheduler is None:
            for n in starving:
                self._say(
                    f"migrate:{n.instance}",
                    f"node {n.instance}: starving a high-priority "
                    "job and the budget cannot give it more; no --scheduler to move a job "
                    "off it",
                )
            return []
        scheduler = self.scheduler
        now = self._mono()

        def one(instance: str) -> Migration | None:
            address = view.nodes[instance].address
            try:
                records = self.link.jobs(address)
            except AgentUnreachable as e:
                self._say(f"migrate:{instance}", f"node {instance}: cannot list its jobs: {e}")
                return None
            job = self._pick(address, records, scheduler.name, now)
            if job is None:
                self._say(
                    f"migrate:{instance}",
                    f"node {instance}: starving, and no running "
                    f"{'/'.join(MIGRATABLE_PRIORITIES)}-priority job of {scheduler.name} "
                    "may move (or all were asked recently)",
                )
                return None
            if not self.settings.apply:
                log.info(
                    "dry-run: would ask %s to move job %s (%s priority, %s) off node %s",
                    scheduler.name,
                    job.name,
                    job.priority,
                    job.id,
                    instance,
                )
                return Migration(instance, job, None)
            try:
                result = scheduler.move(job)
            except Exception as e:  # an adapter's bug must not stop the loop
                log.exception("scheduler %s failed moving %s", scheduler.name, job.id)
                result = MoveResult("failed", f"{type(e).__name__}: {e}")
            return Migration(instance, job, result)

        with ThreadPoolExecutor(min(len(starving), self.settings.concurrency)) as pool:
            done = [m for m in pool.map(one, [n.instance for n in starving]) if m is not None]
        for m in done:
            if m.result is None:
                continue
            self._cooldown[(m.job.kind, m.job.id)] = now
            self._forget(m.node, "migrate")
            self.metrics.count_migration(scheduler.name, m.result.result)
            log.info(
                "node %s: asked %s to move job %s (%s priority, %s): %s%s",
                m.node,
                scheduler.name,
                m.job.name,
                m.job.priority,
                m.job.id,
                m.result.result,
                f" ({m.result.message})" if m.result.message else "",
            )
        return done

    def _pick(
        self, address: str, records: Sequence[Mapping[str, Any]], kind: str, now: float
    ) -> JobRef | None:
        """The lowest-priority running, migratable job of ``kind`` out of its cooldown."""
        cooldown = self.settings.migration_cooldown_s
        candidates: list[JobRef] = []
        for record in records:
            if record.get("state", "running") != "running" or record.get("migratable") is False:
                continue
            ref = JobRef.from_record(address, record)
            if ref is None or ref.kind != kind or ref.priority not in MIGRATABLE_PRIORITIES:
                continue
            asked = self._cooldown.get((ref.kind, ref.id))
            if asked is not None and now - asked < cooldown:
                continue
            candidates.append(ref)
        if not candidates:
            return None
        return min(candidates, key=lambda j: (-PRIORITIES.index(j.priority), j.name, j.id))

    # ------------------------------------------------------------------ reporting
    def _say(self, subject: str, message: str, level: int = logging.INFO) -> None:
        """Log ``message`` once per subject (``what:node``, or ``prometheus``) until forgotten.

        A node that stays unreachable for an hour is said once, not once a period.
        """
        if subject not in self._said:
            self._said[subject] = message
            what, sep, instance = subject.partition(":")
            if sep:
                self._said_about.setdefault(instance, set()).add(what)
            log.log(level, "%s", message)

    def _forget(self, instance: str, *what: str) -> None:
        """The node is past these problems: say them again if they come back."""
        said = self._said_about.get(instance)
        if not said:  # the common case: nothing was said of it (a period forgets for every node)
            return
        for w in what:
            if w in said:
                said.discard(w)
                self._said.pop(f"{w}:{instance}", None)
        if not said:
            del self._said_about[instance]

    def _say_reachability(self, plan: Plan, held: Mapping[str, float]) -> None:
        reachable = plan.split.reachable
        if reachable != self._reachable:
            self._reachable = reachable
            if reachable:
                log.info("the budget is reachable again")
            else:
                log.warning(
                    "budget unreachable: the floors of %d nodes need %.0f W more than the "
                    "%.0f W left after %d held shares; every node is held at its floor",
                    len(plan.split.shares_w),
                    plan.split.shortfall_w,
                    plan.split.budget_w,
                    len(held),
                )
        if self._said.get("prometheus"):
            log.info("Prometheus answers again")
            self._said.pop("prometheus")

    def _log_dry_run(self, plan: Plan, would: Mapping[str, float]) -> None:
        for instance, w in sorted(would.items()):
            if abs(self._would.get(instance, -1.0) - w) > EPSILON_W:
                now = self._nodes[instance].committed_w
                log.info(
                    "dry-run: would lease node %s %.0f W (holds %s): %s",
                    instance,
                    w,
                    "none" if now is None else f"{now:.0f} W",
                    plan.split.reasons.get(instance, ""),
                )
        self._would = dict(would)

    def _ours(self) -> dict[str, float]:
        return {
            i: n.committed_w for i, n in self._nodes.items() if n.ours and n.committed_w is not None
        }

    def _expiry_min(self) -> float | None:
        now_mono, now_wall = self._mono(), self._wall()
        times = [
            n.expires_wall if n.expires_wall is not None else now_wall + (n.expires_mono - now_mono)
            for n in self._nodes.values()
            if n.ours and n.committed_w is not None and n.expires_mono is not None
        ]
        return min(times, default=None)

    def _publish(
        self,
        view: FleetView,
        *,
        states: Mapping[str, str],
        plan: Plan,
        would: Mapping[str, float],
        started: float,
        at_s: float,
    ) -> None:
        counts = dict.fromkeys(("ok", "unreachable", "stale"), 0)
        for state in states.values():
            counts[state] += 1
        # the view's cluster_power_w, from the freshness _classify found (not stale: fresh)
        nodes = view.nodes
        cluster_power_w = math.fsum(
            nodes[i].power_w or 0.0 for i, s in states.items() if s != "stale"
        )
        node_budget = self._ours() if self.settings.apply else dict(would)
        self.metrics.publish(
            ControllerState(
                budget_w=self.settings.budget_w,
                mode=self.settings.mode,
                cluster_power_w=cluster_power_w,
                node_budget_w=node_budget,
                nodes=counts,
                prometheus_up=True,
                holding=False,
                shortfall_w=plan.split.shortfall_w,
                lease_expiry_min_s=self._expiry_min(),
                period_duration_s=self._mono() - started,
                last_period_s=self._wall(),
                last_period_mono=self._mono(),
                holding_reason="",
            )
        )
        log.debug(
            "period at %.3f: %s; %.0f W of %.0f W leased",
            at_s,
            counts,
            math.fsum(node_budget.values()),
            self.settings.budget_w,
        )


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Automatic garbage collection off inside, then one young collection.

    Process-wide, so counted: periods of several controllers in one process (tests) overlap
    safely, the last one out restores what the first one found. Reference counting still frees
    everything that is not in a cycle; cycles wait for the collection at the end or the next.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()
                gc.collect(0)


def _ok_demands(view: FleetView, states: Mapping[str, str]) -> list[allocate.NodeDemand]:
    return [view.nodes[i].demand() for i, s in sorted(states.items()) if s == "ok"]


__all__ = [
    "ControllerSettings",
    "FleetController",
    "Link",
    "Migration",
    "NodeObservation",
    "PeriodReport",
    "Reader",
]


# ---------------------------------------------------------------------- the command
def serve(cfg: ControllerConfig, stop: threading.Event) -> int:
    """``wattwarden controller``: build everything from ``cfg``, run until ``stop``; exit code.

    ConfigError for what the user can fix (tokens, credentials, a taken listen address).
    """
    credentials = AgentCredentials.load(
        None if cfg.token_dir is None else str(cfg.token_dir),
        None if cfg.token_file is None else str(cfg.token_file),
    )
    if cfg.apply and cfg.token_dir is None and cfg.token_file is None:
        raise ConfigError(
            "--apply needs --token-dir or --token-file: agents refuse leases without their token"
        )
    agent_auth = None
    if cfg.agent_basic_auth_user is not None and cfg.agent_basic_auth_password_file is not None:
        password = read_secret(cfg.agent_basic_auth_password_file, "agent_basic_auth_password_file")
        agent_auth = (cfg.agent_basic_auth_user, password)
    prom_auth = Auth(
        ca_file=None if cfg.prometheus_ca_file is None else str(cfg.prometheus_ca_file)
    )
    if cfg.prometheus_basic_auth_user and cfg.prometheus_basic_auth_password_file:
        password = read_secret(
            cfg.prometheus_basic_auth_password_file, "prometheus_basic_auth_password_file"
        )
        prom_auth = replace(prom_auth, basic_auth=(cfg.prometheus_basic_auth_user, password))
    if cfg.prometheus_bearer_token_file is not None:
        token = read_secret(cfg.prometheus_bearer_token_file, "prometheus_bearer_token_file")
        prom_auth = replace(prom_auth, bearer_token=token)
    assert cfg.prometheus is not None and cfg.budget_watts is not None  # build_config checked
    try:
        client = PrometheusClient(cfg.prometheus, timeout_s=cfg.timeout_s, auth=prom_auth)
    except ValueError as e:
        raise ConfigError(f"--prometheus: {e}") from None
    link = AgentLink(
        credentials,
        scheme=cfg.agent_scheme,
        ca_file=None if cfg.agent_ca_file is None else str(cfg.agent_ca_file),
        basic_auth=agent_auth,
        timeout_s=cfg.timeout_s,
    )
    scheduler = scheduler_for(
        cfg.scheduler,
        kubernetes_api=cfg.kubernetes_api,
        kubernetes_token_file=(
            None if cfg.kubernetes_token_file is None else str(cfg.kubernetes_token_file)
        ),
        kubernetes_ca_file=None if cfg.kubernetes_ca_file is None else str(cfg.kubernetes_ca_file),
    )
    settings = ControllerSettings(
        budget_w=cfg.budget_watts,
        controller_id=cfg.controller_id,
        period_s=cfg.period_s,
        lease_s=cfg.lease_s,
        apply=cfg.apply,
        concurrency=cfg.concurrency,
        agent_port=cfg.agent_port,
        stale_after_s=cfg.stale_after_s,
        bands=Bands(fraction=cfg.deadband_fraction, min_w=cfg.deadband_w),
        migration_cooldown_s=cfg.migration_cooldown_s,
        release_on_exit=cfg.release_on_exit,
    )
    host, port = parse_listen(cfg.listen)
    try:
        server = HttpServer(host, port)
    except OSError as e:
        raise ConfigError(f"--listen {cfg.listen}: cannot listen: {e.strerror or e}") from None
    reader = FleetReader(client, cfg.job)
    controller = FleetController(settings, reader, link, scheduler=scheduler)
    try:
        stalled = max(3 * cfg.period_s, cfg.period_s + 8 * cfg.timeout_s)
        server.start(app(controller.metrics, stalled_after_s=stalled))
        bound = server.address
        print(
            f"wattwarden controller: {settings.mode} with a {cfg.budget_watts:.0f} W budget over "
            f'up{{job="{cfg.job}"}} from {cfg.prometheus}; /metrics and /healthz on '
            f"http://{bound[0]}:{bound[1]}",
            flush=True,
        )
        controller.run(stop)
    finally:
        server.close()
        reader.close()
        link.close()
    return 0
