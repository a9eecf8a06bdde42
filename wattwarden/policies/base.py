"""The policy engine's vocabulary: what a policy sees, what it asks for, and what was decided.

A policy is level-triggered: each period it gets the whole current state (:class:`PolicyInputs`,
one copy shared by every policy) and says which power limit it wants on which GPU and why
(:class:`Intent`). It never touches hardware and never acts; the engine
(:mod:`wattwarden.policies.engine`) composes the intents into one :class:`Decision` per GPU and
hands it to the actuator, or only records it in dry-run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from wattwarden.collectors.jobs import JobView
from wattwarden.collectors.store import StoreSnapshot

Mode = Literal["dry_run", "apply"]
"""``dry_run`` records decisions only (the default); ``apply`` acts on them."""

Action = Literal["set", "keep", "hold"]
"""What a decision does to a GPU's limit (see :attr:`Decision.action`)."""


@dataclass(frozen=True, slots=True)
class PolicyInputs:
    """What every policy sees in one period: one copy, taken once, shared by all."""

    snapshot: StoreSnapshot
    """The store: GPUs (latest samples, enforced limits, power windows), budgets, collectors."""
    jobs: tuple[JobView, ...]
    """The job registry's view: who runs where, at what priority, drawing how much."""
    now_mono_s: float
    """The period's monotonic time, on the clock the samples' ``read_mono_s`` use."""


@dataclass(frozen=True, slots=True)
class Intent:
    """One policy's wish for one GPU: a power limit, and why."""

    gpu: int
    watts: float
    reason: str
    """One line an operator reads, e.g. ``node at 2510 W over its 2400 W budget``."""


class Policy(Protocol):
    """One policy: from the period's inputs to the limits it wants. Pure: no hardware, no I/O."""

    @property
    def name(self) -> str:
        """Its name, unique in an engine: the ``policy`` of its decisions and action counts."""
        ...

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        """The limits it wants now; none for a GPU it has no opinion on."""
        ...


@dataclass(frozen=True, slots=True)
class Decision:
    """What the engine decided for one GPU in one period, and why."""

    gpu: int
    action: Action
    """``set``: a new limit (made in apply mode, recorded only in dry-run); ``keep``: the GPU
    already enforces the chosen limit; ``hold``: no decision, its readings are stale or it is
    lost."""
    policy: str
    """The policy whose intent won (the lowest limit); ``engine`` for a hold, and for a GPU that
    no policy limits any more going back to the limit it had before the engine's first change."""
    reason: str
    """The winning intent's reason, or why the engine held."""
    watts: float | None
    """The chosen limit; None for a hold."""
    mode: Mode
    timestamp_s: float
    """Wall-clock time of the period, for the decisions timeline."""
    intents: dict[str, Intent] = field(default_factory=dict)
    """Every policy's intent for this GPU, by policy name: the losers' reasons are kept too."""
    enforced_w: float | None = None
    """After a set in apply mode: the limit the driver enforces, read back."""
    error: str | None = None
    """After a set in apply mode that the actuator refused: why (range, rate limit, driver)."""
    from_w: float | None = None
    """The limit before the decision: enforced in apply mode, the engine's previous target in
    dry-run (what the limit would be had it acted)."""
    jobs: tuple[str, ...] = ()
    """The running jobs on the GPU, by name."""
