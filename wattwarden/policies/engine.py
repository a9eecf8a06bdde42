"""The policy engine: composes policies into one decision per GPU, then acts or records.

Each period (:meth:`PolicyEngine.step`) every policy sees the same inputs and states its intents.
Per GPU the lowest intended limit wins, since every policy's limit is a ceiling it needs, and
every policy's reason is kept on the decision; the limit is held within the GPU's [min, max].
A GPU whose readings are stale (the sampler stalled) or that is lost is held: no new decision
on old data. A GPU the engine capped and that
no policy limits any more goes back to the limit it had before the engine's first change (the
``engine`` policy decides that). A GPU that already has the chosen limit is kept. Otherwise the
decision is a set: in ``apply`` mode the journalled actuator makes it (bounds, rate limit,
read-back); in ``dry_run`` (the default) it is only recorded, and the engine remembers it as the
GPU's *would-be* limit, so a dry run reads like the run it stands for (one set, then keeps).

What is kept: every decision of a period is returned; the history (:meth:`decisions`) keeps the
ones an operator reads (sets, and a hold when a GPU starts being held),
while keeps are only counted (``wattwarden_policy_decisions_total``), so a node that runs
steadily for a day still shows its last 1000 changes. The targets (what the engine wants per
GPU, also in dry-run) go to the store for ``gpu_power_limit_target_watts``.

Safety: on :class:`~wattwarden.hardware.errors.NoPermission` in apply mode (the agent may not
set limits) the engine says why once and falls back to dry-run (:attr:`fallback`); switching
from apply to dry-run (:meth:`set_mode`) first puts back every limit the actuator changed.

Threads: :meth:`step` and :meth:`set_mode` run on one thread at a time (the control loop, or an
API call holding ``_step_lock``); the readers (:meth:`decisions`, :attr:`holding`) may run on
any, under ``_lock``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from threading import Lock

from wattwarden.collectors.jobs import JobView
from wattwarden.collectors.store import GpuView, MetricStore
from wattwarden.hardware.errors import HardwareError, NoPermission
from wattwarden.policies.actuator import LimitActuator, RateLimited
from wattwarden.policies.base import Decision, Intent, Mode, Policy, PolicyInputs

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 5.0
SAME_LIMIT_W = 1.0
"""A GPU within this of the chosen limit already has it (the actuator's read-back slack)."""
KEEP_DECISIONS = 1000
ENGINE = "engine"
"""The ``policy`` of decisions the engine makes itself (holds, and going back to the baseline)."""


class PolicyEngine:
    """Policies in, one decision per GPU out; the actuator below acts on them in apply mode."""

    def __init__(
        self,
        policies: Sequence[Policy],
        actuator: LimitActuator,
        store: MetricStore,
        *,
        mode: Mode = "dry_run",
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        names = [p.name for p in policies]
        if len(set(names)) != len(names) or ENGINE in names:
            raise ValueError(f"policy names must be unique and not {ENGINE!r}: {names}")
        self._policies = tuple(policies)
        self._actuator = actuator
        self._store = store
        self._mode: Mode = mode
        self._stale_after_s = stale_after_s
        self._monotonic = monotonic
        self._wall = wall
        self._lock = Lock()
        self._step_lock = Lock()
        self._decisions: deque[Decision] = deque(maxlen=KEEP_DECISIONS)
        self._baseline: dict[int, float] = {}
        """Per GPU the engine changed: its limit before the first change (what it goes back to)."""
        self._would_be: dict[int, float] = {}
        """Dry-run: the limit each GPU would have, had the engine acted."""
        self._applied: dict[int, tuple[float, float]] = {}
        """Apply mode: per GPU, the limit last set and when (monotonic), until a read shows it."""
        self._last_targets: dict[int, float] = {}
        self._held: dict[int, str] = {}
        """GPUs held in the last period, with why (a hold is logged when it starts)."""
        self._holding: str | None = None
        self.last_logged: list[Decision] = []
        """The decisions of the last period that went to the history (what gets journalled)."""
        self.last_inputs: PolicyInputs | None = None
        """The inputs of the last period (what a migration planner reads after the step)."""
        self.fallback: str | None = None
        """Why apply mode fell back to dry-run (the driver refused permission), else None."""

    # ------------------------------------------------------------------ mode
    @property
    def mode(self) -> Mode:
        """``apply`` or ``dry_run``."""
        return self._mode

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The composed policies, in order."""
        return self._policies

    def set_mode(self, mode: Mode) -> list[str]:
        """Switch mode. Leaving apply first restores every limit changed; returns its failures."""
        with self._step_lock:
            failures: list[str] = []
            if mode == self._mode:
                return failures
            if self._mode == "apply":
                failures = self._actuator.restore_all()
                self._baseline.clear()
                self._applied.clear()
            self._would_be.clear()
            self._mode = mode
            if mode == "apply":
                self.fallback = None
            return failures

    # ------------------------------------------------------------------ step
    def step(self, jobs: Sequence[JobView]) -> list[Decision]:
        """One period: ask every policy, decide per GPU, act (apply) or record (dry-run)."""
        with self._step_lock:
            return self._step(jobs)

    def _step(self, jobs: Sequence[JobView]) -> list[Decision]:
        snapshot = self._store.snapshot()
        inputs = PolicyInputs(snapshot, tuple(jobs), self._monotonic())
        self.last_inputs = inputs
        wanted: dict[int, dict[str, Intent]] = {}
        for policy in self._policies:
            for intent in policy.intents(inputs):
                mine = wanted.setdefault(intent.gpu, {})
                before = mine.get(policy.name)
                if before is None or intent.watts < before.watts:
                    mine[policy.name] = intent
        views = {v.sample.info.index: v for v in snapshot.gpus}
        on_gpu: dict[int, list[str]] = {}
        for job in jobs:
            if job.state == "running":
                on_gpu.setdefault(job.gpu, []).append(job.name)
        now_s = self._wall()
        gpus = sorted(set(wanted) | set(self._baseline) | set(self._would_be))
        decisions = []
        for gpu in gpus:
            decision = self._decide(
                gpu,
                wanted.get(gpu, {}),
                views.get(gpu),
                inputs.now_mono_s,
                now_s=now_s,
                jobs=tuple(sorted(on_gpu.get(gpu, ()))),
            )
            if decision is not None:
                decisions.append(decision)
        held = {d.gpu: d.reason for d in decisions if d.action == "hold"}
        logged = [
            d
            for d in decisions
            if d.action == "set" or (d.action == "hold" and d.gpu not in self._held)
        ]
        for d in decisions:
            self._store.count_policy_decision(d.policy, d.action, d.mode)
        self._store.set_power_limit_targets(self._targets(decisions, views))
        with self._lock:
            self._held = held
            self._holding = "; ".join(held[g] for g in sorted(held)) or None
            self._decisions.extend(logged)
        self.last_logged = logged
        return decisions

    def _targets(self, decisions: list[Decision], views: dict[int, GpuView]) -> dict[int, float]:
        """Per GPU, the limit the engine wants: decided now, else as before, else the one it has."""
        out: dict[int, float] = {}
        for gpu, view in views.items():
            reading = view.sample.reading
            if reading is not None and reading.power_limit_w is not None:
                out[gpu] = reading.power_limit_w
        for gpu, watts in self._last_targets.items():
            if gpu in out:
                out[gpu] = watts
        for d in decisions:
            if d.watts is not None:
                out[d.gpu] = d.watts
            elif d.gpu in self._last_targets:
                out[d.gpu] = self._last_targets[d.gpu]
        self._last_targets = {d.gpu: d.watts for d in decisions if d.watts is not None}
        return out

    def decisions(self) -> list[Decision]:
        """The latest logged decisions, oldest first (a bounded number)."""
        with self._lock:
            return list(self._decisions)

    @property
    def holding(self) -> str | None:
        """Why the engine held GPUs in its last period (stale or lost readings), or None."""
        with self._lock:
            return self._holding

    def _decide(
        self,
        gpu: int,
        intents: dict[str, Intent],
        view: GpuView | None,
        now_mono_s: float,
        *,
        now_s: float,
        jobs: tuple[str, ...],
    ) -> Decision | None:
        stale = _why_stale(gpu, view, now_mono_s, self._stale_after_s)
        if stale is not None:
            if not intents and gpu not in self._baseline and gpu not in self._would_be:
                return None
            return Decision(gpu, "hold", ENGINE, stale, None, self._mode, now_s, intents, jobs=jobs)
        assert view is not None and view.sample.reading is not None
        enforced = view.sample.reading.power_limit_w
        applied = self._applied.get(gpu)
        if applied is not None:  # the limit is read once a second: a set may not show yet
            read_at = view.sample.slow_read_mono_s
            if read_at is None or read_at <= applied[1]:
                enforced = applied[0]
            else:
                del self._applied[gpu]
        current = self._would_be.get(gpu, enforced) if self._mode == "dry_run" else enforced
        if intents:
            policy, intent = min(intents.items(), key=lambda item: (item[1].watts, item[0]))
            watts, reason = _within_bounds(intent, view)
        else:  # nobody limits this GPU any more: back to what it had before the engine
            back = self._baseline.get(gpu, enforced) if self._mode == "apply" else enforced
            if back is None:
                return None
            policy, watts = ENGINE, back
            reason = f"no policy limits GPU {gpu} any more: back to its {back:.0f} W"
        if current is not None and abs(current - watts) < SAME_LIMIT_W:
            if not intents:
                self._baseline.pop(gpu, None)
                self._would_be.pop(gpu, None)
            return Decision(
                gpu, "keep", policy, reason, watts, self._mode, now_s, intents,
                from_w=current, jobs=jobs,
            )  # fmt: skip
        decision = Decision(
            gpu, "set", policy, reason, watts, self._mode, now_s, intents,
            from_w=current, jobs=jobs,
        )  # fmt: skip
        if self._mode != "apply":
            self._store.count_policy_action(policy, "set_power_limit", self._mode)
            if intents:
                self._would_be[gpu] = watts
            else:
                self._would_be.pop(gpu, None)
            return decision
        if intents and gpu not in self._baseline and enforced is not None:
            self._baseline[gpu] = enforced
        try:
            change = self._actuator.set_limit(gpu, watts, reason=f"{policy}: {reason}")
        except NoPermission as e:
            self._fall_back(str(e))
            self._store.count_policy_action(policy, "set_power_limit_failed", "apply")
            return replace(decision, error=str(e))
        except (HardwareError, RateLimited) as e:  # out of range, too soon, driver refused
            self._store.count_policy_action(policy, "set_power_limit_failed", "apply")
            return replace(decision, error=str(e))
        self._store.count_policy_action(policy, "set_power_limit", "apply")
        self._applied[gpu] = (change.enforced_w, now_mono_s)
        if not intents:
            self._baseline.pop(gpu, None)
        return replace(decision, enforced_w=change.enforced_w)

    def _fall_back(self, why: str) -> None:
        """The driver refused permission: say so once, restore what was set, go dry-run."""
        log.error(
            "power limits cannot be set (%s): the policy engine falls back to dry-run; run the "
            "agent with the capability to set limits (root, or CAP_SYS_ADMIN) to apply",
            why,
        )
        self._actuator.restore_all()
        self._baseline.clear()
        self._applied.clear()
        self._mode = "dry_run"
        self.fallback = why


def _within_bounds(intent: Intent, view: GpuView) -> tuple[float, str]:
    """The intent's limit within the GPU's [min, max], and its reason (saying so if clamped).

    A limit outside the range would be refused by the actuator, and a target outside it is one
    the driver can never hold (the limit-mismatch alert compares the two).
    """
    info = view.sample.info
    lo, hi = info.power_limit_min_w, info.power_limit_max_w
    if lo is not None and intent.watts < lo:
        return lo, f"{intent.reason} (held at its {lo:g} W minimum)"
    if hi is not None and intent.watts > hi:
        return hi, f"{intent.reason} (held at its {hi:g} W maximum)"
    return intent.watts, intent.reason


def _why_stale(
    gpu: int, view: GpuView | None, now_mono_s: float, stale_after_s: float
) -> str | None:
    """Why this GPU's readings cannot carry a decision now, or None if they can."""
    if view is None:
        return f"GPU {gpu} is not in the store"
    sample = view.sample
    if not sample.up:
        return f"GPU {gpu} is lost"
    if sample.reading is None or sample.read_mono_s is None:
        return f"GPU {gpu} has not been read yet"
    age = now_mono_s - sample.read_mono_s
    if age > stale_after_s:
        return f"GPU {gpu} readings are {age:.1f} s old (stale after {stale_after_s:g} s)"
    return None
