"""The control loop: the policy engine, run once a period on its own thread, steered over the API.

:class:`PolicyLoop` owns the :class:`~wattwarden.policies.engine.PolicyEngine`, one object per
policy (:data:`POLICY_NAMES`), an optional migration planner and the node's local power budget.
Each period (:meth:`PolicyLoop.period`) it

1. steps the engine over the job registry's jobs (one decision per GPU, acted on in apply mode);
2. asks the migration planner which jobs to move, and asks each one's supervisor to move it
   (:meth:`~wattwarden.collectors.jobs.JobRegistry.request_migration`) in apply mode; in
   dry-run a move is only recorded, as a limit change is;
3. journals what an operator reads (limit sets, holds as they start, moves) and publishes the
   loop's state to the store: the budget in force, the mode, which policies are on, and whether
   the engine holds, fell back to dry-run, or cannot meet the budget.

Periods sit on a monotonic grid (no drift; a late period does not bunch the next ones up). The
loop is level-triggered, like the controllers operators trust (Kubernetes controllers, Dynamo):
each period reads the whole state again, so a missed period costs nothing.

A policy that raises does not stop the loop: the period is skipped (nothing changes: the engine
holds), the error is logged once per distinct message, counted, and said in
:attr:`PolicyLoop.holding` until a period runs cleanly again.

Steering (:meth:`PolicyLoop.update`, ``POST /api/v1/policy``): the budget, the mode and which
policies run are changed between periods, under the loop's lock, after checking every value (a
ValueError names the one at fault). A policy switched off stops having intents, so the engine
gives its GPUs back the limits they had; one switched on starts afresh. Leaving apply mode
restores every limit changed (:meth:`PolicyEngine.set_mode`).

Leases (:meth:`PolicyLoop.set_lease`, ``POST /api/v1/policy/lease``): a fleet controller leases
the node a budget for ``ttl_s`` seconds, under its id and a generation. While the lease is live
its budget is the one in force, above or below the local one (it overrides it); when it runs out
on the loop's monotonic clock without a renewal, the local budget is in force again, on the
node's own: the expiry is logged once, counted, and the next decisions' reasons name the budget
they used. Expiry is checked each period and on every read, so an expired lease is never in
force nor shown. A live lease held by another controller id cannot be taken (a conflict), nor
renewed by its holder with a lower generation than the one held (a restarted controller has a
newer generation, so it takes its own leases over at once; another one waits for the expiry).
A lease is not persisted: a restarted agent runs on its local budget until the controller's
next push.

Which policies run: the ``thermal`` guard, and ``budget`` capping whenever a budget is in force,
unless a list was given (the ``policy`` setting, or the API); ``idle`` capping and the energy
``tuner`` only when listed.

Threads: the loop's thread runs periods; API threads call :meth:`update` (which waits for a
period in progress) and the readers (:meth:`status`, :meth:`decisions`), which take the lock
only briefly.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from wattwarden.collectors.jobs import JobError, JobRegistry
from wattwarden.collectors.store import LeaseState, MetricStore, PolicyState
from wattwarden.policies.actuator import JournalledDecision, LimitActuator
from wattwarden.policies.base import Decision, Intent, Mode, Policy, PolicyInputs
from wattwarden.policies.capping import BudgetCapper, demand_by_priority
from wattwarden.policies.engine import PolicyEngine
from wattwarden.policies.idle import IdleCapper
from wattwarden.policies.migration import Migrator
from wattwarden.policies.thermal import ThermalGuard
from wattwarden.policies.tuner import EnergyTuner

log = logging.getLogger(__name__)

POLICY_NAMES = ("thermal", "budget", "idle", "tuner")
"""Every policy the loop can run, in the order they are composed."""
MODES: tuple[Mode, ...] = ("dry_run", "apply")
MIGRATION_REASONS = ("budget", "thermal", "xid", "lost")
"""Why a job is moved (the ``reason`` of ``wattwarden_job_migrations_total``)."""
MIGRATION = "migration"
"""The ``policy`` of a move in the decisions."""
BUDGET_SCOPE = "node"
LEASE_SCOPE = "lease"
"""The store's (and ``wattwarden_power_budget_watts``'s) scope of a live lease's budget."""
LEASE_TTL_RANGE_S = (1.0, 3600.0)
GENERATION_MAX = 2**63 - 1
CONTROLLER_PATTERN = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}")
"""A controller id: 1-128 of A-Z a-z 0-9 _ . : @ / -."""
LOCAL_BUDGET = "local budget"
"""How the reasons name the local budget when it is in force."""
BUDGET_RANGE_W = (1.0, 1e6)
"""A power budget's bounds, the same for the setting and the API."""
PERIOD_RANGE_S = (0.1, 3600.0)
DEFAULT_PERIOD_S = 1.0
DEFAULT_RETENTION_S = 30 * 86400.0
PRUNE_EVERY_S = 3600.0
KEEP_MOVES = 1000
STOP_TIMEOUT_S = 10.0


# ------------------------------------------------------------------ what the loop is built with
@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The settings each policy is built with (the agent's settings of the same names)."""

    thermal_margin_c: float = 5.0
    idle_after_s: float = 300.0
    tune_eta: float = 0.5
    max_slowdown: float | None = None
    tune_all_jobs: bool = False


Budget = Callable[[], float | None]


def build_policy(name: str, settings: PolicySettings, budget_w: Budget) -> Policy:
    """A fresh policy object of that name, built with the settings."""
    if name == "thermal":
        return ThermalGuard(margin_c=settings.thermal_margin_c)
    if name == "budget":
        return BudgetCapper(budget_w)
    if name == "idle":
        return IdleCapper(idle_after_s=settings.idle_after_s)
    if name == "tuner":
        return EnergyTuner(
            eta=settings.tune_eta,
            max_slowdown=settings.max_slowdown,
            tune_all=settings.tune_all_jobs,
        )
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")


def parse_policies(value: object) -> tuple[str, ...]:
    """Policy names from a list, or a comma-separated string (``none``: no policy).

    What the ``policy`` setting and ``POST /api/v1/policy`` take; ValueError says what is wrong.
    """
    listed = f"a list of {', '.join(POLICY_NAMES)} (or none)"
    if isinstance(value, str):
        if value.strip() == "none":
            return ()
        items: list[object] = [part.strip() for part in value.split(",")]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"must be {listed}, got {value!r}")
    try:
        return check_policies(items)
    except ValueError as e:
        raise ValueError(f"must be {listed}: it {e}") from None


def check_policies(names: Iterable[object]) -> tuple[str, ...]:
    """Policy names, checked: each known, none twice; ValueError says which is not."""
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in POLICY_NAMES:
            raise ValueError(f"names {name!r}, which is not a policy")
        if name in out:
            raise ValueError(f"names {name!r} twice")
        out.append(name)
    return tuple(out)


def check_budget(watts: object) -> float | None:
    """A power budget (None: none), checked against :data:`BUDGET_RANGE_W`."""
    if watts is None:
        return None
    if isinstance(watts, bool) or not isinstance(watts, int | float):
        raise ValueError(f"must be a number of watts or null, got {watts!r}")
    lo, hi = BUDGET_RANGE_W
    if not lo <= watts <= hi:
        raise ValueError(f"must be within {lo:g}..{hi:g}, got {watts!r}")
    return float(watts)


def check_mode(mode: object) -> Mode:
    """``dry_run`` or ``apply``."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def check_lease(budget_w: object, ttl_s: object, controller: object, generation: object) -> None:
    """A lease's fields, checked in that order; ValueError names the field and the problem.

    The budget is a finite number of watts > 0, the ttl 1..3600 s, the controller id 1-128 of
    A-Z a-z 0-9 _ . : @ / -, and the generation an integer 0..2**63-1.
    """
    if (
        isinstance(budget_w, bool)
        or not isinstance(budget_w, int | float)
        or not math.isfinite(budget_w)
        or budget_w <= 0
    ):
        raise ValueError(f"power_budget_watts must be a finite number > 0, got {budget_w!r}")
    lo, hi = LEASE_TTL_RANGE_S
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not lo <= ttl_s <= hi:
        raise ValueError(f"ttl_s must be a number within {lo:g}..{hi:g}, got {ttl_s!r}")
    check_controller(controller)
    if (
        isinstance(generation, bool)
        or not isinstance(generation, int)
        or not 0 <= generation <= GENERATION_MAX
    ):
        raise ValueError(f"generation must be an integer within 0..2**63-1, got {generation!r}")


def check_controller(controller: object) -> str:
    """A controller id (see :data:`CONTROLLER_PATTERN`); ValueError naming ``controller``."""
    if not isinstance(controller, str) or not CONTROLLER_PATTERN.fullmatch(controller):
        shown = repr(controller) if len(repr(controller)) <= 40 else repr(controller)[:37] + "..."
        raise ValueError(f"holder must be 1-128 of A-Z a-z 0-9 _ . : @ / -, got {shown}")
    return controller


@dataclass(frozen=True, slots=True)
class Lease:
    """A fleet controller's budget for this node, live until ``expires_mono_s``."""

    budget_w: float
    ttl_s: float
    controller: str
    generation: int
    expires_mono_s: float
    """When it runs out, on the loop's monotonic clock (what decides)."""
    expires_at_s: float
    """The same as wall-clock time (what is shown and exported)."""

    @property
    def source(self) -> str:
        """How the reasons name it: ``lease from controller X gen N``."""
        return f"lease from controller {self.controller} gen {self.generation}"

    def remaining_s(self, now_mono_s: float) -> float:
        """Seconds left at ``now_mono_s`` (0 once run out)."""
        return max(0.0, self.expires_mono_s - now_mono_s)


class LeaseConflict(Exception):
    """A lease change refused: another controller holds a live lease, or a stale generation."""


class PolicyFailed(Exception):
    """A policy raised while stating its intents."""

    def __init__(self, policy: str, error: BaseException) -> None:
        super().__init__(f"policy {policy} failed: {type(error).__name__}: {error}")
        self.policy = policy


class _Switch:
    """One policy, on or off. Off, it has no intents; turned on, it is built afresh.

    The engine composes these (always all of them, in :data:`POLICY_NAMES` order), so its own
    state (the limits to go back to, the dry-run's would-be limits) survives a switch.
    """

    def __init__(self, name: str, make: Callable[[], Policy]) -> None:
        self._name = name
        self._make = make
        self.policy: Policy | None = None

    @property
    def name(self) -> str:
        """The policy's name."""
        return self._name

    @property
    def on(self) -> bool:
        """Whether the policy runs."""
        return self.policy is not None

    def switch(self, on: bool) -> None:
        """Turn on (a fresh object, unless already on) or off."""
        if on and self.policy is None:
            self.policy = self._make()
        elif not on:
            self.policy = None

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        """The policy's intents (none while off); PolicyFailed if it raises."""
        if self.policy is None:
            return ()
        try:
            return list(self.policy.intents(inputs))
        except Exception as e:
            raise PolicyFailed(self._name, e) from e


# ------------------------------------------------------------------ what the loop reports
@dataclass(frozen=True, slots=True)
class MoveRecord:
    """A move the loop asked for (apply) or would have (dry-run)."""

    job: str
    from_gpu: int
    to_gpu: int
    reason: str
    """One of :data:`MIGRATION_REASONS`."""
    mode: Mode
    timestamp_s: float
    error: str | None = None
    """Why the registry refused the move (the job ended meanwhile)."""
    detail: str = ""
    """The planner's explanation."""

    @property
    def explanation(self) -> str:
        """One line for the decisions and the log."""
        move = f"move job {self.job} from GPU {self.from_gpu} to GPU {self.to_gpu}"
        return (
            f"{move} ({self.reason}): {self.detail}" if self.detail else f"{move} ({self.reason})"
        )


@dataclass(frozen=True, slots=True)
class LoopStatus:
    """What ``GET /api/v1/policy`` shows."""

    mode: Mode
    power_budget_w: float | None
    """The budget in force: a live lease's, else the local one."""
    policies: dict[str, bool]
    """Every policy by name, on or off."""
    fallback: str | None
    """Why apply mode fell back to dry-run, or None."""
    holding: str | None
    """Why the engine holds (stale or lost readings, a failing policy), or None."""
    budget_unreachable: bool
    period_s: float
    periods: int
    """Periods run since start."""
    errors_total: int
    """Periods skipped because a policy (or the planner) raised."""
    last_error: str | None = None
    restore_failures: tuple[str, ...] = field(default=())
    """After a switch out of apply mode: limits that could not be restored (journalled)."""
    local_power_budget_w: float | None = None
    """The node's own budget (in force while no lease is live)."""
    lease: Lease | None = None
    """The live lease, or None."""
    lease_remaining_s: float | None = None
    """Seconds the live lease has left, when this status was taken."""
    lease_expirations: int = 0
    """Leases that ran out without a renewal since start."""


class Unchanged(enum.Enum):
    """The type of :data:`UNCHANGED`."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED
"""A setting :meth:`PolicyLoop.update` leaves as it is (for the budget, where None clears it)."""


class PolicyLoop:
    """The engine and its policies, run every ``period_s`` seconds on a thread of their own."""

    def __init__(
        self,
        *,
        store: MetricStore,
        jobs: JobRegistry,
        actuator: LimitActuator,
        settings: PolicySettings | None = None,
        policies: Sequence[str] | None = None,
        budget_w: float | None = None,
        mode: Mode = "dry_run",
        period_s: float = DEFAULT_PERIOD_S,
        migrator: Migrator | None = None,
        journal_retention_s: float | None = DEFAULT_RETENTION_S,
        factory: Callable[[str, PolicySettings, Budget], Policy] = build_policy,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        lo, hi = PERIOD_RANGE_S
        if not lo <= period_s <= hi:
            raise ValueError(f"period_s must be within {lo:g}..{hi:g}, got {period_s!r}")
        self._store = store
        self._jobs = jobs
        self._actuator = actuator
        self._settings = settings or PolicySettings()
        self._explicit = None if policies is None else parse_policies(policies)
        self._budget_w = check_budget(budget_w)
        self.period_s = period_s
        self._migrator = migrator
        self._retention_s = journal_retention_s
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        """Held by a period and by :meth:`update`: steering happens between periods."""
        self._switches = {name: _Switch(name, self._maker(factory, name)) for name in POLICY_NAMES}
        self.engine = PolicyEngine(
            list(self._switches.values()),
            actuator,
            store,
            mode=check_mode(mode),
            monotonic=monotonic,
            wall=wall,
        )
        self._moves: deque[MoveRecord] = deque(maxlen=KEEP_MOVES)
        self._moves_lock = threading.Lock()  # brief: readers never wait for a period
        self._failure: str | None = None
        self._last_error: dict[str, str] = {}
        """The last error of each of the thread's own tasks (a period, pruning), to log once."""
        self.errors_total = 0
        self.periods = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_prune_s = monotonic()
        self._lease: Lease | None = None
        self._lease_lock = threading.Lock()
        """Brief: guards the lease and its store series (expiry may happen on any reader)."""
        self.lease_expirations = 0
        self._period_source = LOCAL_BUDGET
        """Which budget :meth:`budget_w` last gave (the capper's reasons name it)."""
        self._apply_switches()
        self._store.set_power_budget(BUDGET_SCOPE, self._budget_w)
        for reason in MIGRATION_REASONS:
            self._store.count_migration(reason, 0)  # every reason's series exists from start
        self._publish_lease()
        self._publish()

    def _maker(
        self, factory: Callable[[str, PolicySettings, Budget], Policy], name: str
    ) -> Callable[[], Policy]:
        return lambda: factory(name, self._settings, self.budget_w)

    # ------------------------------------------------------------------ reading
    def budget_w(self) -> float | None:
        """The budget in force: a live lease's, else the local one (read by the budget policy).

        :meth:`budget_source` then says which it was.
        """
        lease = self.lease()
        self._period_source = LOCAL_BUDGET if lease is None else lease.source
        return self._budget_w if lease is None else lease.budget_w

    def budget_source(self) -> str:
        """Which budget the last :meth:`budget_w` gave: ``local budget`` or the lease's source."""
        return self._period_source

    @property
    def local_budget_w(self) -> float | None:
        """The node's own budget (in force while no lease is live)."""
        return self._budget_w

    def lease(self) -> Lease | None:
        """The live lease, or None; a lease that has run out is dropped here (a read expires)."""
        with self._lease_lock:
            return self._live(self._monotonic())

    def _live(self, now: float) -> Lease | None:
        """The live lease at ``now``; expires one that ran out. Holds ``_lease_lock``."""
        lease = self._lease
        if lease is None or now < lease.expires_mono_s:
            return lease
        self._lease = None
        self.lease_expirations += 1
        local = self._budget_w
        log.warning(
            "lease from controller %s (generation %d) expired %.1f s after its last renewal "
            "(%.0f W for %g s): the local budget is in force again (%s)",
            lease.controller,
            lease.generation,
            lease.ttl_s + now - lease.expires_mono_s,
            lease.budget_w,
            lease.ttl_s,
            "none" if local is None else f"{local:.0f} W",
        )
        self._publish_lease()
        return None

    def _publish_lease(self) -> None:
        """The lease's budget series and state into the store. Holds ``_lease_lock``."""
        lease = self._lease
        self._store.set_power_budget(LEASE_SCOPE, None if lease is None else lease.budget_w)
        self._store.set_lease_state(
            LeaseState(None if lease is None else lease.expires_at_s, self.lease_expirations)
        )

    @property
    def mode(self) -> Mode:
        """The mode in force (``dry_run`` after a fallback)."""
        return self.engine.mode

    def active(self) -> dict[str, bool]:
        """Every policy by name: on or off."""
        return {name: s.on for name, s in self._switches.items()}

    @property
    def holding(self) -> str | None:
        """Why the engine holds now, or None."""
        return self._failure or self.engine.holding

    def _capper(self) -> BudgetCapper | None:
        policy = self._switches["budget"].policy
        return policy if isinstance(policy, BudgetCapper) else None

    def budget_unreachable(self) -> bool:
        """Whether the budget policy found the budget unreachable in its last period."""
        capper = self._capper()
        return capper is not None and capper.unreachable

    def status(self, restore_failures: Sequence[str] = ()) -> LoopStatus:
        """The loop's state now."""
        failure = self._failure
        with self._lease_lock:
            now = self._monotonic()
            lease = self._live(now)
            expirations = self.lease_expirations
        return LoopStatus(
            mode=self.engine.mode,
            power_budget_w=self._budget_w if lease is None else lease.budget_w,
            policies=self.active(),
            fallback=self.engine.fallback,
            holding=failure or self.engine.holding,
            budget_unreachable=self.budget_unreachable(),
            period_s=self.period_s,
            periods=self.periods,
            errors_total=self.errors_total,
            last_error=failure,
            restore_failures=tuple(restore_failures),
            local_power_budget_w=self._budget_w,
            lease=lease,
            lease_remaining_s=None if lease is None else lease.remaining_s(now),
            lease_expirations=expirations,
        )

    def decisions(self, limit: int | None = None) -> list[Decision | MoveRecord]:
        """Recent decisions (limit sets, holds as they start, moves), oldest first."""
        with self._moves_lock:
            moves = list(self._moves)
        merged: list[Decision | MoveRecord] = [*self.engine.decisions(), *moves]
        merged.sort(key=lambda d: d.timestamp_s)  # stable: a period's moves after its sets
        return merged if limit is None else merged[-limit:] if limit > 0 else []

    # ------------------------------------------------------------------ steering
    def update(
        self,
        *,
        budget_w: object = UNCHANGED,
        mode: object = None,
        policies: object = None,
    ) -> LoopStatus:
        """Change the budget (None clears it), the mode and which policies run.

        Every value is checked before anything changes (ValueError naming the field); then the
        change is made between periods. Returns the new status, with any limits that could not
        be restored when leaving apply mode.
        """
        try:
            budget = self._budget_w if budget_w is UNCHANGED else check_budget(budget_w)
        except ValueError as e:
            raise ValueError(f"power_budget_watts {e}") from None
        try:
            new_mode = None if mode is None else check_mode(mode)
        except ValueError as e:
            raise ValueError(f"mode {e}") from None
        try:
            names = None if policies is None else parse_policies(policies)
        except ValueError as e:
            raise ValueError(f"policies {e}") from None
        failures: list[str] = []
        with self._lock:
            if budget != self._budget_w:
                log.info("power budget: %s", "none" if budget is None else f"{budget:.0f} W")
            self._budget_w = budget
            self._store.set_power_budget(BUDGET_SCOPE, budget)
            if names is not None:
                self._explicit = names
            self._apply_switches()
            if new_mode is not None and new_mode != self.engine.mode:
                log.info("policy engine mode: %s", new_mode)
                failures = self.engine.set_mode(new_mode)
            self._publish()
        return self.status(failures)

    def set_lease(
        self, *, budget_w: object, ttl_s: object, controller: object, generation: object
    ) -> Lease:
        """Take or renew the lease: its budget is in force for ``ttl_s`` from now.

        ValueError names a bad field. :class:`LeaseConflict` when a live lease is held by
        another controller id, or its holder sends a lower generation than the one held. A
        renewal by the holder (same id, generation at least the one held) replaces the budget
        and the expiry. Waits for a period in progress, as :meth:`update` does.
        """
        check_lease(budget_w, ttl_s, controller, generation)
        assert isinstance(budget_w, int | float) and isinstance(ttl_s, int | float)
        assert isinstance(controller, str) and isinstance(generation, int)
        with self._lock:
            with self._lease_lock:
                now = self._monotonic()
                held = self._live(now)
                if held is not None and held.controller != controller:
                    raise LeaseConflict(_held_by(held, now))
                if held is not None and generation < held.generation:
                    raise LeaseConflict(
                        f"stale generation: controller {controller!r} holds the lease with "
                        f"generation {held.generation}, not {generation}"
                    )
                lease = Lease(
                    float(budget_w), float(ttl_s), controller, generation,
                    now + ttl_s, self._wall() + ttl_s,
                )  # fmt: skip
                self._lease = lease
                self._publish_lease()
            if held is None or held.generation != generation or held.budget_w != lease.budget_w:
                log.info(
                    "%s: %.0f W for %g s%s",
                    lease.source,
                    lease.budget_w,
                    lease.ttl_s,
                    "" if held is not None else " (overrides the local budget)",
                )
            self._apply_switches()
            self._publish()
        return lease

    def release_lease(self, controller: object) -> None:
        """The holder gives the lease up: the local budget is in force again.

        Nothing to do when no lease is live; :class:`LeaseConflict` when another controller
        holds it; ValueError for a bad id.
        """
        check_controller(controller)
        with self._lock:
            with self._lease_lock:
                now = self._monotonic()
                held = self._live(now)
                if held is None:
                    return
                if held.controller != controller:
                    raise LeaseConflict(_held_by(held, now))
                self._lease = None
                self._publish_lease()
            log.info("%s released: the local budget is in force again", held.source)
            self._apply_switches()
            self._publish()

    def _apply_switches(self) -> None:
        wanted = self._wanted()
        for name, s in self._switches.items():
            if s.on != (name in wanted):
                log.info("policy %s %s", name, "on" if name in wanted else "off")
            s.switch(name in wanted)
        capper = self._capper()
        if capper is not None:  # its reasons say which budget it capped to
            capper.source = self.budget_source

    def _wanted(self) -> tuple[str, ...]:
        if self._explicit is not None:
            return self._explicit
        budget = self._budget_w is not None or self.lease() is not None
        return ("thermal", "budget") if budget else ("thermal",)

    # ------------------------------------------------------------------ one period
    def period(self) -> list[Decision]:
        """One period: decide (and act, in apply mode), plan moves, journal, publish."""
        with self._lock:
            return self._period()

    def _period(self) -> list[Decision]:
        self.periods += 1
        self.lease()  # one that ran out is dropped (logged, counted) before anything is decided
        self._apply_switches()  # a lease taken or run out turns the budget policy on or off
        failure = None
        moves: list[MoveRecord] = []
        try:
            decisions = self.engine.step(self._jobs.jobs())
        except Exception as e:  # a failing policy holds the loop, never stops it
            decisions, failure = [], e
        else:
            try:
                moves = self._migrate(decisions)
            except Exception as e:  # the limits decided stand; no job moves this period
                failure = e
            self._journal(moves)
        if failure is not None:
            self._failed(failure)
        elif self._failure is not None:
            log.info("policy engine runs again after: %s", self._failure)
            self._failure = None
        self._publish()
        return decisions

    def _failed(self, e: Exception) -> None:
        self.errors_total += 1
        message = str(e) if isinstance(e, PolicyFailed) else f"{type(e).__name__}: {e}"
        if message != self._failure:  # each error once, until it changes or the loop recovers
            log.error("policy engine holds: %s", message, exc_info=e)
        self._failure = message

    def _migrate(self, decisions: list[Decision]) -> list[MoveRecord]:
        inputs = self.engine.last_inputs
        if self._migrator is None or inputs is None:
            return []
        self._migrator.capper = self._capper()  # a budget policy turned on again is a new one
        try:
            planned = self._migrator.plan(inputs, decisions)
        except Exception as e:
            raise PolicyFailed(MIGRATION, e) from e
        mode = self.engine.mode
        now = self._wall()
        records = []
        for move in planned:
            error = None
            if mode == "apply":
                try:
                    self._jobs.request_migration(move.job, move.to_gpu)
                except JobError as e:  # ended or unregistered since the period began
                    error = str(e)
                else:
                    self._store.count_migration(move.reason)
            self._store.count_policy_decision(MIGRATION, "migrate", mode)
            record = MoveRecord(
                move.job, move.from_gpu, move.to_gpu, move.reason, mode, now, error, move.detail
            )
            log.info(
                "%s%s%s",
                record.explanation,
                "" if mode == "apply" else " (dry-run: not moved)",
                "" if error is None else f": refused: {error}",
            )
            records.append(record)
        with self._moves_lock:
            self._moves.extend(records)
        return records

    def _journal(self, moves: list[MoveRecord]) -> None:
        """Journal what the engine's history shows (sets, holds as they start), and moves."""
        rows = [_journalled(d) for d in self.engine.last_logged]
        rows += [
            JournalledDecision(
                m.timestamp_s, m.from_gpu, MIGRATION, "migrate", m.mode, None, None,
                m.explanation, m.job, m.error,
            )
            for m in moves
        ]  # fmt: skip
        if rows:
            self._actuator.journal_decisions(rows)

    def _publish(self) -> None:
        inputs = self.engine.last_inputs
        capper = self._capper()
        self._store.set_policy_state(
            PolicyState(
                mode=self.engine.mode,
                active=self.active(),
                holding=self.holding is not None,
                fallback=self.engine.fallback is not None,
                budget_unreachable=self.budget_unreachable(),
                demand_w={} if inputs is None else demand_by_priority(inputs),
                demand_above_min_w=(
                    {} if inputs is None else demand_by_priority(inputs, above_min=True)
                ),
                starving=capper is not None and bool(capper.starving),
            )
        )

    # ------------------------------------------------------------------ the thread
    def prune_journal(self) -> int:
        """Drop journalled changes and decisions older than the retention (never originals)."""
        if self._retention_s is None:
            return 0
        pruned = self._actuator.prune(self._retention_s)
        if pruned:
            log.info(
                "journal: pruned %d row(s) older than %g days", pruned, self._retention_s / 86400
            )
        return pruned

    def start(self) -> None:
        """Prune the journal, then run periods on a daemon thread until :meth:`close`."""
        self._thread = threading.Thread(target=self._run, name="wattwarden-policy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = self._monotonic()
        while True:
            now = self._monotonic()
            if now >= self._next_prune_s:
                self._next_prune_s = now + PRUNE_EVERY_S
                self._guarded(self.prune_journal, "journal pruning")
            self._guarded(self.period, "policy period")
            next_at += self.period_s
            now = self._monotonic()
            next_at = max(next_at, now)  # fell behind: skip missed periods rather than burst
            if self._stop.wait(next_at - now):
                return

    def _guarded(self, fn: Callable[[], object], what: str) -> None:
        try:
            fn()
        except Exception as e:  # e.g. the journal's disk is full: the loop goes on
            message = f"{type(e).__name__}: {e}"
            if self._last_error.get(what) != message:  # once, until it changes or recovers
                self._last_error[what] = message
                log.exception("%s failed", what)
        else:
            self._last_error.pop(what, None)

    def close(self) -> None:
        """Stop the thread (a period in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)


def _held_by(lease: Lease, now: float) -> str:
    return (
        f"lease held by controller {lease.controller!r} (generation {lease.generation}) "
        f"for another {lease.remaining_s(now):.1f} s"
    )


def _journalled(d: Decision) -> JournalledDecision:
    return JournalledDecision(
        d.timestamp_s, d.gpu, d.policy, d.action, d.mode, d.from_w, d.watts, d.reason,
        ",".join(d.jobs), d.error,
    )  # fmt: skip
