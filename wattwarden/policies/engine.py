"""The policy engine: composes policies into one decision per GPU, then acts or records.

Each period (:meth:`PolicyEngine.step`) every policy sees the same inputs and states its intents.
Per GPU the lowest intended limit wins, since every policy's limit is a ceiling it needs, and
every policy's reason is kept on the decision. A GPU whose readings are stale (the sampler
stalled) or that is lost is held: no new decision on old data. A GPU that already enforces the
chosen limit is kept. Otherwise the decision is a set: in ``apply`` mode the journalled actuator
makes it (bounds, rate limit, read-back); in ``dry_run`` (the default) it is only recorded.

Threads: :meth:`step` runs on one thread (the engine's period); :meth:`decisions` may be read
from any (the HTTP API), under ``_lock``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from threading import Lock

from wattwarden.collectors.jobs import JobView
from wattwarden.collectors.store import GpuView, MetricStore
from wattwarden.hardware.errors import HardwareError
from wattwarden.policies.actuator import LimitActuator, RateLimited
from wattwarden.policies.base import Decision, Intent, Mode, Policy, PolicyInputs

DEFAULT_STALE_AFTER_S = 5.0
SAME_LIMIT_W = 1.0
"""A GPU within this of the chosen limit already enforces it (the actuator's read-back slack)."""
KEEP_DECISIONS = 1000
ENGINE = "engine"
"""The ``policy`` of decisions the engine makes itself (holds)."""


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
        self.mode: Mode = mode
        self._stale_after_s = stale_after_s
        self._monotonic = monotonic
        self._wall = wall
        self._lock = Lock()
        self._decisions: deque[Decision] = deque(maxlen=KEEP_DECISIONS)

    def step(self, jobs: Sequence[JobView]) -> list[Decision]:
        """One period: ask every policy, decide per GPU, act (apply) or record (dry-run)."""
        snapshot = self._store.snapshot()
        inputs = PolicyInputs(snapshot, tuple(jobs), self._monotonic())
        wanted: dict[int, dict[str, Intent]] = {}
        for policy in self._policies:
            for intent in policy.intents(inputs):
                mine = wanted.setdefault(intent.gpu, {})
                before = mine.get(policy.name)
                if before is None or intent.watts < before.watts:
                    mine[policy.name] = intent
        views = {v.sample.info.index: v for v in snapshot.gpus}
        now_s = self._wall()
        decisions = [
            self._decide(gpu, intents, views.get(gpu), inputs.now_mono_s, now_s)
            for gpu, intents in sorted(wanted.items())
        ]
        with self._lock:
            self._decisions.extend(decisions)
        return decisions

    def decisions(self) -> list[Decision]:
        """The latest decisions, oldest first (a bounded number)."""
        with self._lock:
            return list(self._decisions)

    def _decide(
        self,
        gpu: int,
        intents: dict[str, Intent],
        view: GpuView | None,
        now_mono_s: float,
        now_s: float,
    ) -> Decision:
        stale = _why_stale(gpu, view, now_mono_s, self._stale_after_s)
        if stale is not None:
            return Decision(gpu, "hold", ENGINE, stale, None, self.mode, now_s, intents)
        policy, intent = min(intents.items(), key=lambda item: (item[1].watts, item[0]))
        reading = None if view is None else view.sample.reading
        current = None if reading is None else reading.power_limit_w
        if current is not None and abs(current - intent.watts) < SAME_LIMIT_W:
            return Decision(
                gpu, "keep", policy, intent.reason, intent.watts, self.mode, now_s, intents
            )
        decision = Decision(
            gpu, "set", policy, intent.reason, intent.watts, self.mode, now_s, intents
        )
        if self.mode != "apply":
            self._store.count_policy_action(policy, "set_power_limit", self.mode)
            return decision
        try:
            change = self._actuator.set_limit(
                gpu, intent.watts, reason=f"{policy}: {intent.reason}"
            )
        except (HardwareError, RateLimited) as e:  # out of range, too soon, driver refused
            self._store.count_policy_action(policy, "set_power_limit_failed", self.mode)
            return replace(decision, error=str(e))
        self._store.count_policy_action(policy, "set_power_limit", self.mode)
        return replace(decision, enforced_w=change.enforced_w)


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
