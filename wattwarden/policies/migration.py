"""The migration planner: which job to move off which GPU, and where, when capping is not enough.

Once per period, after the engine's step, :meth:`Migrator.plan` reads the same inputs the
policies saw (:class:`~wattwarden.policies.base.PolicyInputs`) and the engine's decisions, and
returns the moves it wants (:class:`Move`). It never moves anything itself: the control loop asks
the job registry for each move (``request_migration``), and the job's supervisor (``wattwarden
job run``) does the move the way it already does for an operator's ``POST
/api/v1/jobs/NAME/migrate``: SIGTERM, the workload checkpoints and exits, the same command
starts again on the new GPU and resumes from its checkpoint. Only jobs that registered as
migratable (a supervisor follows their ``target_gpu``) are ever moved.

Triggers, checked in this order each period (a GPU is the source or the target of one move per
period at most, so a second job on it moves in a later period):

1. **lost** — a GPU that fell off the bus (its sample is not up) runs a job: the job cannot run
   there, it restarts elsewhere.
2. **xid** — a critical XID was newly counted on a GPU (its ``xid_counts`` grew for an XID in
   :data:`CRITICAL_XIDS`): the jobs that were running on it move off. The set is the one the
   ``GpuXidErrorCritical`` alert in ``deploy/prometheus/rules/alerts.yml`` fires on (a test
   checks both agree): an XID that needs the GPU drained and reset.
3. **thermal** — a GPU at or over its throttle point (the lower of its max operating and its
   slowdown temperature, the thresholds the GPU reports: the thermal guard's
   :func:`~wattwarden.policies.thermal.ceiling_c`, so both agree), or whose clocks the driver
   already slows for heat (the sw_thermal or hw_thermal clock-event reason: the driver holds a
   GPU at its max operating temperature, so its reading may hover just under it), or within
   ``hot_margin_c`` of it for ``hot_for_s`` while its limit already is the GPU's minimum:
   capping has nothing left to cool it with.
4. **budget** — the budget capper (``capper``: its ``starving`` GPUs and ``unreachable`` flag)
   cannot hold the budget without starving a high-priority job. On one node, moving a job to
   an idle GPU does not lower the node's power (the idle GPU starts drawing what the old one
   drew), so only two moves are made, each of which provably helps:

   - *split*: a starving GPU (a high-priority job's limit is below its need) also runs a
     lower-priority job. That job moves to a GPU that already draws its whole limit (the
     enforced one, or one the engine has just cut below its draw) and runs nothing above that
     job's priority. Neither GPU can draw more than its limit, and the limits do not change,
     so node power does not rise; the high-priority job gets the whole of its GPU's power
     instead of sharing it.
   - *consolidate*: the budget is unreachable (the minimum limits alone exceed it) and the
     node draws more than its budget. A job that runs alone on a GPU at its limit moves to
     another GPU at its limit (nothing above its priority there). The target draws no more
     (it is at its limit); the source now runs nothing and draws its idle power, which is
     below its minimum limit (a driver holds a loaded board at its minimum limit by lowering
     its clocks, so an idle board draws less), so node power falls.

   Any other move under a budget (to an idle GPU, or of a high-priority job) is not made: it
   would raise node power or slow the job it is meant to help.

Which job: lowest priority first on the affected GPU (moving it relieves the GPU while the
more important job keeps running without a restart); for a lost GPU or a critical XID every
job must leave, so the highest priority goes first and gets the best target. Never a job that is
not migratable, one already moving (its ``target_gpu`` is set), or one moved within
``cooldown_s`` (no ping-pong): the one exception is a job whose GPU is lost, which cannot run
where it is, and even then never back to the GPU it left within the cooldown.

Which target (lost, xid, thermal): the healthiest GPU with headroom. It must be up and freshly
read (within ``stale_after_s``, the engine's rule for holding), at least ``target_margin_c``
under its throttle point, with no critical XID ever counted, not starving a high-priority job,
and not the GPU the job left within the cooldown. Among those: the fewest jobs (moves already
on their way there count), then the most limit headroom (its limit minus its draw), then the
coolest. None suitable: no move, and the log says so once until that changes.

What is taken from where: the move itself is the checkpoint-stop-restart path of the job
supervisor (``wattwarden/workloads/job.py``), so a migration costs the steps since the last
checkpoint plus a restart, which is why moves are rare and cooled down. The critical XID list
follows NVIDIA's XID catalogue as the alert rules do. Priority first (the lower-priority job
gives way) is the rule the budget split uses (``policies/budget.py``, after POLCA and Dynamo);
those papers cap power and do not move jobs, so nothing else here comes from them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from wattwarden.collectors.jobs import PRIORITIES, JobView
from wattwarden.collectors.store import GpuView
from wattwarden.policies.base import Decision, PolicyInputs
from wattwarden.policies.engine import DEFAULT_STALE_AFTER_S
from wattwarden.policies.thermal import ceiling_c

log = logging.getLogger(__name__)

Reason = Literal["budget", "thermal", "xid", "lost"]
"""Why a job moves; the ``reason`` label of ``wattwarden_job_migrations_total``."""

CRITICAL_XIDS = frozenset({48, 62, 64, 74, 79, 95, 119, 120})
"""XIDs that need the GPU drained and reset: the ``GpuXidErrorCritical`` alert's set
(``deploy/prometheus/rules/alerts.yml``): 48 double-bit ECC, 62 internal micro-controller halt,
64 ECC page retirement failure, 74 NVLink, 79 fallen off the bus, 95 uncontained ECC, 119/120
GSP timeout/error."""

DEFAULT_COOLDOWN_S = 600.0
DEFAULT_HOT_MARGIN_C = 5.0
"""Within this of its throttle point a GPU is hot (the thermal guard's own default margin)."""
DEFAULT_TARGET_MARGIN_C = 10.0
DEFAULT_HOT_FOR_S = 30.0
"""Hot at its minimum limit this long before its job moves: longer than a die's thermal time
constant (tens of seconds), so a GPU still cooling after its last cut is given the time."""
DEFAULT_BIND_FRACTION = 0.05
BIND_MIN_W = 10.0
"""A GPU draws its whole limit when its draw is within the larger of ``bind_fraction`` of the
limit and this (a driver holds a capped board a little under its limit)."""
THERMAL_EVENTS = 0x20 | 0x40
"""NVML's clock-event bits that say the driver or the board already slows the GPU for heat
(``ClockEvent.SW_THERMAL | ClockEvent.HW_THERMAL``; policies read them from the reading's mask
and hold no device types)."""
AT_MIN_W = 1.0
"""A limit within this of the GPU's minimum is at its minimum (the engine's keep band)."""
_RANK = {p: i for i, p in enumerate(PRIORITIES)}  # high 0, normal 1, low 2


class CapperState(Protocol):
    """What the planner reads of the budget capper, after the engine's step."""

    @property
    def unreachable(self) -> bool:
        """The minimum limits alone exceed the budget."""
        ...

    @property
    def starving(self) -> frozenset[int]:
        """GPUs running a high-priority job whose limit is below its need because of the budget."""
        ...


@dataclass(frozen=True, slots=True)
class Move:
    """One job to move: the control loop calls ``registry.request_migration(job, to_gpu)``."""

    job: str
    from_gpu: int
    to_gpu: int
    reason: Reason
    detail: str = ""
    """One line for the log, e.g. ``GPU 2 is lost: job lm (high) restarts on GPU 5 (...)``."""


@dataclass(slots=True)
class _Moved:
    at_s: float
    from_gpu: int


class Migrator:
    """Plans job moves off lost, faulty, overheating or budget-starved GPUs (see the module).

    Keyword-only settings: ``capper`` (the budget capper's state, or None: no budget moves; the
    control loop may replace it between periods), ``cooldown_s`` (no second move of a job
    within it), ``critical_xids``, ``hot_margin_c`` and ``hot_for_s`` (hot at its minimum limit
    for this long: move), ``target_margin_c`` (a target's least distance under its throttle
    point), ``bind_fraction`` (how close to its limit a GPU draws to count as at its limit) and
    ``stale_after_s`` (readings older than this neither trigger a move nor qualify a target).
    """

    def __init__(
        self,
        *,
        capper: CapperState | None = None,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        critical_xids: frozenset[int] = CRITICAL_XIDS,
        hot_margin_c: float = DEFAULT_HOT_MARGIN_C,
        target_margin_c: float = DEFAULT_TARGET_MARGIN_C,
        hot_for_s: float = DEFAULT_HOT_FOR_S,
        bind_fraction: float = DEFAULT_BIND_FRACTION,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
    ) -> None:
        for name, value in (
            ("cooldown_s", cooldown_s),
            ("stale_after_s", stale_after_s),
            ("hot_margin_c", hot_margin_c),
            ("target_margin_c", target_margin_c),
            ("hot_for_s", hot_for_s),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be 0 or more, got {value!r}")
        if target_margin_c < hot_margin_c:
            raise ValueError(
                f"target_margin_c ({target_margin_c!r}) must be at least hot_margin_c "
                f"({hot_margin_c!r}): a target must not be hot"
            )
        if not 0 <= bind_fraction < 1:
            raise ValueError(f"bind_fraction must be in [0, 1), got {bind_fraction!r}")
        self.capper = capper
        self.cooldown_s = cooldown_s
        self.critical_xids = frozenset(critical_xids)
        self.hot_margin_c = hot_margin_c
        self.target_margin_c = target_margin_c
        self.hot_for_s = hot_for_s
        self.bind_fraction = bind_fraction
        self.stale_after_s = stale_after_s
        self._moved: dict[str, _Moved] = {}
        """Jobs moved within the cooldown, by name: when, and from which GPU."""
        self._xid_seen: dict[str, dict[int, int]] = {}
        """Critical XID counts last seen, by GPU UUID."""
        self._xid_evacuate: dict[str, int] = {}
        """Jobs that were on a GPU when a critical XID was counted there: name -> GPU index."""
        self._hot_since: dict[str, float] = {}
        """GPUs hot at their minimum limit: UUID -> since when (period clock)."""
        self._said: set[str] = set()
        """What was logged once and holds still (no target for a job, no budget move helps)."""

    # ---------------------------------------------------------------------------------- plan
    def plan(self, inputs: PolicyInputs, decisions: Sequence[Decision]) -> list[Move]:
        """The moves to make now (often none); at most one per GPU, as source or target."""
        plan = _Plan(self, inputs, decisions)
        now, views, limits = plan.now, plan.views, plan.limits
        self._forget(now, plan.running)
        self._watch_xids(views, plan.running)
        said_now: set[str] = set()
        for view in sorted(views.values(), key=lambda v: v.sample.info.index):
            index = view.sample.info.index
            if not view.sample.up:
                plan.relieve(index, "lost", f"GPU {index} is lost", said_now)
        for index in sorted({g for g in self._xid_evacuate.values() if g in views}):
            if not views[index].sample.up:
                continue  # lost: its jobs already go for that reason
            xids = self._critical(views[index])
            what = ", ".join(str(x) for x in sorted(xids)) or "critical"
            plan.relieve(index, "xid", f"GPU {index} reported XID {what}", said_now)
        for index, view in sorted(views.items()):
            if index in plan.held:
                continue  # stale readings (or lost): no move on old temperatures
            why = self._overheating(view, limits.get(index), now)
            if why is not None:
                plan.relieve(index, "thermal", why, said_now)
        plan.budget(said_now)
        for gone in self._said - said_now:
            self._said.discard(gone)
        return plan.moves

    # ------------------------------------------------------------------------------- state
    def _forget(self, now: float, running: Sequence[JobView]) -> None:
        names = {j.name for j in running}
        for name, moved in list(self._moved.items()):
            if name not in names or now - moved.at_s >= self.cooldown_s:
                del self._moved[name]
        where = {j.name: j.gpu for j in running}
        for name, gpu in list(self._xid_evacuate.items()):
            if where.get(name) != gpu:
                del self._xid_evacuate[name]  # it left that GPU (or ended)

    def _watch_xids(self, views: dict[int, GpuView], running: Sequence[JobView]) -> None:
        """Mark the jobs on a GPU whose critical XID count grew since the last period."""
        for index, view in views.items():
            counts = self._critical(view)
            before = self._xid_seen.get(view.sample.info.uuid, {})
            self._xid_seen[view.sample.info.uuid] = counts
            if any(n > before.get(x, 0) for x, n in counts.items()):
                for job in running:
                    if job.gpu == index:
                        self._xid_evacuate[job.name] = index

    def _critical(self, view: GpuView) -> dict[int, int]:
        return {
            x: n for x, n in view.sample.xid_counts.items() if x in self.critical_xids and n > 0
        }

    def _overheating(self, view: GpuView, limit_w: float | None, now: float) -> str | None:
        """Why the GPU's jobs should leave it for its heat, or None."""
        sample = view.sample
        info = sample.info
        temp = _temperature(view)
        ceiling = ceiling_c(info)
        mask = None if sample.reading is None else sample.reading.clock_event_mask
        where = f"GPU {info.index} at {'?' if temp is None else f'{temp:.0f}'} C"
        if sample.up and mask is not None and mask & THERMAL_EVENTS:
            return f"{where}, its clocks slowed for heat by the driver"
        if temp is None or ceiling is None or not sample.up:
            self._hot_since.pop(info.uuid, None)
            return None
        if temp >= ceiling:
            return f"{where}, at or over its {ceiling:.0f} C throttle point"
        if limit_w is None and sample.reading is not None:
            limit_w = sample.reading.power_limit_w
        at_min = (
            limit_w is not None
            and info.power_limit_min_w is not None
            and limit_w <= info.power_limit_min_w + AT_MIN_W
        )
        if not at_min or temp < ceiling - self.hot_margin_c:
            self._hot_since.pop(info.uuid, None)
            return None
        since = self._hot_since.setdefault(info.uuid, now)
        if now - since < self.hot_for_s:
            return None
        return (
            f"{where}, within {self.hot_margin_c:g} C of its {ceiling:.0f} C throttle point "
            f"for {now - since:.0f} s at its minimum limit"
        )

    def _say_once(self, key: str, said_now: set[str], message: str) -> None:
        said_now.add(key)
        if key not in self._said:
            self._said.add(key)
            log.warning("migration: %s", message)


class _Plan:
    """One period's planning: the GPUs already claimed, the moves so far."""

    def __init__(
        self, owner: Migrator, inputs: PolicyInputs, decisions: Sequence[Decision]
    ) -> None:
        self.m = owner
        self.now = inputs.now_mono_s
        self.views = {v.sample.info.index: v for v in inputs.snapshot.gpus}
        self.held = {d.gpu for d in decisions if d.action == "hold"} | {
            i for i, v in self.views.items() if not _fresh(v, self.now, owner.stale_after_s)
        }
        """GPUs the engine holds, or would (lost, unread or stale): no trigger, no target."""
        self.limits = {d.gpu: d.watts for d in decisions if d.watts is not None}
        """The engine's limits this period (in dry-run too: what the limit would be)."""
        self.running = [j for j in inputs.jobs if j.state == "running"]
        budgets = inputs.snapshot.power_budgets_w
        # a live lease's budget overrides the node's own (the lease scope is there only then)
        self.budgets_w = (budgets["lease"],) if "lease" in budgets else tuple(budgets.values())
        self.claimed: set[int] = set()
        self.moves: list[Move] = []
        # jobs per GPU, counting moves already on their way as being at their target
        self.load: dict[int, list[JobView]] = {}
        for j in self.running:
            self.load.setdefault(j.gpu if j.target_gpu is None else j.target_gpu, []).append(j)
        capper = owner.capper
        self.starving = frozenset() if capper is None else frozenset(capper.starving)

    # --------------------------------------------------------------------------- choosing
    def _movable(self, gpu: int, reason: Reason) -> list[JobView]:
        """Jobs on ``gpu`` that may move now, in the order they should go."""
        lost = reason == "lost"
        out = []
        for j in self.running:
            if j.gpu != gpu or not j.migratable or j.target_gpu is not None:
                continue
            if reason == "xid" and self.m._xid_evacuate.get(j.name) != gpu:
                continue
            moved = self.m._moved.get(j.name)
            if moved is not None and not lost:
                continue  # within its cooldown; a job that cannot run where it is may go
            out.append(j)
        first_high = reason in ("lost", "xid")  # all must leave: the important one first
        return sorted(
            out,
            key=lambda j: (_RANK.get(j.priority, 1) * (1 if first_high else -1), j.name),
        )

    def _healthy(self, index: int, job: JobView) -> bool:
        """A GPU fit to take a job: up, fresh, cool, no critical XID, not the one it just left."""
        view = self.views.get(index)
        if view is None or index in self.claimed or index in self.held:
            return False
        sample = view.sample
        if not sample.up or sample.reading is None or self.m._critical(view):
            return False
        if index == job.gpu or index in self.starving:
            return False
        moved = self.m._moved.get(job.name)
        if moved is not None and moved.from_gpu == index:
            return False
        temp = _temperature(view)
        if temp is None:
            return False
        ceiling = ceiling_c(sample.info)
        return ceiling is None or temp <= ceiling - self.m.target_margin_c

    def _headroom_w(self, index: int) -> float:
        view = self.views[index]
        limit = self._limit_w(index)
        draw = _draw_w(view)
        return 0.0 if limit is None or draw is None else limit - draw

    def _limit_w(self, index: int) -> float | None:
        """The limit in force: the engine's decision this period, else the enforced one."""
        if index in self.limits:
            return self.limits[index]
        reading = self.views[index].sample.reading
        return None if reading is None else reading.power_limit_w

    def _binding(self, index: int) -> bool:
        """The GPU draws its whole limit: more load cannot raise its power.

        The limit is the lower of the enforced one and the engine's decision this period: a GPU
        drawing more than a limit just cut below its draw is held at that limit from now on.
        """
        limit = self._pinned_w(index)
        draw = _draw_w(self.views[index])
        if limit is None or draw is None:
            return False
        return draw >= limit - max(self.m.bind_fraction * limit, BIND_MIN_W)

    def _pinned_w(self, index: int) -> float | None:
        """The limit that holds the GPU's power from now on: enforced, or lower if decided so."""
        reading = self.views[index].sample.reading
        enforced = None if reading is None else reading.power_limit_w
        decided = self.limits.get(index)
        known = [w for w in (enforced, decided) if w is not None]
        return min(known) if known else None

    def _add(self, job: JobView, to_gpu: int, reason: Reason, detail: str) -> None:
        self.moves.append(Move(job.name, job.gpu, to_gpu, reason, detail))
        self.claimed.update((job.gpu, to_gpu))
        self.load.setdefault(to_gpu, []).append(job)
        self.m._moved[job.name] = _Moved(self.now, job.gpu)

    def _describe(self, index: int) -> str:
        view = self.views[index]
        temp = _temperature(view)
        jobs = len(self.load.get(index, []))
        return (
            f"{'idle' if not jobs else f'{jobs} job(s)'}, "
            f"{'?' if temp is None else f'{temp:.0f}'} C, "
            f"{self._headroom_w(index):.0f} W headroom"
        )

    # ---------------------------------------------------------------------------- triggers
    def relieve(self, gpu: int, reason: Reason, why: str, said_now: set[str]) -> None:
        """Move the first job in line off ``gpu`` to the healthiest GPU, if one is fit."""
        if gpu in self.claimed:
            return
        for job in self._movable(gpu, reason):
            fit = [i for i in self.views if self._healthy(i, job)]
            if not fit:
                self.m._say_once(
                    f"{reason}:{job.name}",
                    said_now,
                    f"{why}, but no GPU is fit to take job {job.name} ({job.priority}): "
                    "none is up, cool, free of critical XIDs and unclaimed; it stays",
                )
                return
            best = min(
                fit,
                key=lambda i: (
                    len(self.load.get(i, [])),
                    -self._headroom_w(i),
                    _temperature(self.views[i]) or 0.0,
                    i,
                ),
            )
            verb = "restarts" if reason in ("lost", "xid") else "moves"
            self._add(
                job,
                best,
                reason,
                f"{why}: job {job.name} ({job.priority}) {verb} on GPU {best} "
                f"({self._describe(best)})",
            )
            return

    def budget(self, said_now: set[str]) -> None:
        """Split a starving GPU, or consolidate under an unreachable budget (see the module)."""
        capper = self.m.capper
        if capper is None or not (self.starving or capper.unreachable):
            return
        # a move already under way (its job stopped, not yet started again) may be the help
        helped = any(j.target_gpu is not None for j in self.running)
        for gpu in sorted(self.starving):
            helped |= self._split(gpu)
        if capper.unreachable and self._over_budget():
            helped |= self._consolidate()
        if not helped:
            what = (
                f"GPU(s) {', '.join(str(g) for g in sorted(self.starving))} starve a "
                "high-priority job"
                if self.starving
                else "the budget is unreachable"
            )
            self.m._say_once(
                "budget",
                said_now,
                f"{what}; no move helps (no lower-priority migratable job shares a starving "
                "GPU, and no GPU already at its limit can take one): no job moves",
            )
        else:
            said_now.add("budget")  # keep the episode open: say it again only after it ends

    def _split(self, gpu: int) -> bool:
        if gpu in self.claimed or gpu not in self.views:
            return False
        for job in self._movable(gpu, "budget"):
            if job.priority == "high":
                continue
            target = self._binding_target(job)
            if target is None:
                continue
            self._add(
                job,
                target,
                "budget",
                f"GPU {gpu} starves a high-priority job: job {job.name} ({job.priority}) shares "
                f"it and moves to GPU {target}, already at its {self._pinned_w(target) or 0:.0f} W "
                "limit, so node power does not rise",
            )
            return True
        return False

    def _consolidate(self) -> bool:
        alone = []
        for gpu, jobs in self.load.items():
            on = [j for j in self.running if j.gpu == gpu]
            if len(jobs) != 1 or len(on) != 1 or gpu in self.claimed or gpu not in self.views:
                continue
            (job,) = on
            if job.priority == "high" or not self._binding(gpu):
                continue
            if job not in self._movable(gpu, "budget"):
                continue
            alone.append(job)
        # lowest priority first; then the GPU drawing the most (it frees the most)
        alone.sort(key=lambda j: (-_RANK.get(j.priority, 1), -(_draw_w(self.views[j.gpu]) or 0)))
        for job in alone:
            target = self._binding_target(job)
            if target is None:
                continue
            self._add(
                job,
                target,
                "budget",
                f"the budget is unreachable and the node draws {self._node_w():.0f} W, over its "
                f"{min(w for w in self.budgets_w if w > 0):.0f} W budget: "
                f"job {job.name} ({job.priority}) leaves GPU {job.gpu} idle and joins GPU "
                f"{target}, already at its {self._pinned_w(target) or 0:.0f} W limit",
            )
            return True
        return False

    def _binding_target(self, job: JobView) -> int | None:
        """A fit GPU already at its limit that runs nothing above the job's priority."""
        rank = _RANK.get(job.priority, 1)
        fit = [
            i
            for i in self.views
            if self._healthy(i, job)
            and self._binding(i)
            and all(_RANK.get(j.priority, 1) >= rank for j in self.load.get(i, []))
        ]
        if not fit:
            return None
        return min(fit, key=lambda i: (self._pinned_w(i) or 0.0, len(self.load.get(i, [])), i))

    def _node_w(self) -> float:
        return sum(_draw_w(v) or 0.0 for v in self.views.values() if v.sample.up)

    def _over_budget(self) -> bool:
        """The node draws more than the budget in force (a live lease's, else the node's own)."""
        budgets = [w for w in self.budgets_w if w > 0]
        return bool(budgets) and self._node_w() > min(budgets)


def _fresh(view: GpuView, now_s: float, stale_after_s: float) -> bool:
    """Up and read within ``stale_after_s`` (the engine's rule for holding a GPU)."""
    sample = view.sample
    read = sample.read_mono_s
    return (
        sample.up
        and sample.reading is not None
        and read is not None
        and now_s - read <= stale_after_s
    )


def _temperature(view: GpuView) -> float | None:
    reading = view.sample.reading
    return None if reading is None else reading.temperature_gpu_c


def _draw_w(view: GpuView) -> float | None:
    """What the GPU draws now: this pass's power, else the window's mean."""
    sample = view.sample
    return sample.power_w if sample.power_w is not None else view.power_mean_w
