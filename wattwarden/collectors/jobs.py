"""Jobs on the node and the attribution of GPU energy to them.

Each GPU pass splits the GPU's energy since the previous pass into idle energy (its idle power
times the pass's duration) and active energy. Active energy goes to the jobs on that GPU: all of
it to a job alone on the GPU; shared by per-process SM utilization when several jobs share one
(the approach Kepler takes for processes on a node), equally where the driver gives no
per-process figure. Active energy on a GPU with no registered job is kept as "unattributed", so
jobs + idle + unattributed always add up to the GPU's energy.

Idle power is learned only from spans the slow tier proved idle: utilization is read once a
second while energy is read every pass, so a span counts only when the utilization read at its
start and the one at its end both say idle (the whole span lies between two idle readings).
Learning from passes whose *latest* utilization said idle would count the busy power drawn
after a load starts, before the next utilization read, as idle. What is used as idle power is
also never above :func:`idle_ceiling_w`, what the board can physically idle at.

Finished jobs (unregistered, or reaped when their process went away) stay readable with their
totals for a bounded retention (:data:`FINISHED_KEEP` jobs, :data:`FINISHED_KEEP_S` seconds), so
the API and a Prometheus scrape between the end and the next scrape still see their cost.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wattwarden.collectors.samples import GpuSample
from wattwarden.hardware.device import GpuInfo

log = logging.getLogger(__name__)

PRIORITIES = ("high", "normal", "low")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
"""A job name, matched whole (``fullmatch``: ``$`` would accept a trailing newline)."""
MAX_JOBS = 1024
"""Running jobs at most. Each adds series to every scrape; 1024 keeps /metrics small and fast."""
FINISHED_KEEP = 100
"""Finished jobs kept at most (the most recently finished)."""
FINISHED_KEEP_S = 3600.0
"""How long a finished job stays readable (API and /metrics), in seconds."""
PID_MAX = 2**31 - 1
"""Largest pid accepted (Linux's pid_max is at most 2**22; beyond a C int os.kill fails)."""
COUNT_MAX = 2**63 - 1
"""Largest progress count accepted (a signed 64-bit counter)."""
SCHEDULER_KINDS = ("kubernetes", "slurm")
_SCHEDULER_IDS = {
    # NAMESPACE/POD: a DNS-1123 label, then a DNS-1123 subdomain (Kubernetes object names)
    "kubernetes": re.compile(
        r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?"
    ),
    "slurm": re.compile(r"[0-9]{1,20}"),  # SLURM_JOB_ID, as scontrol takes it
}


@dataclass(frozen=True, slots=True)
class SchedulerRef:
    """Where a scheduler runs a job, so that a fleet controller can ask it to move the job.

    ``kind`` is ``kubernetes`` (``id`` ``NAMESPACE/POD``: the Eviction API's pod) or ``slurm``
    (``id`` the job id: ``scontrol requeue`` takes it).
    """

    kind: str
    id: str

    @classmethod
    def checked(cls, kind: object, id_: object) -> SchedulerRef:
        """A reference with a known kind and an id of that kind's shape; ValueError says why."""
        if not isinstance(kind, str) or kind not in SCHEDULER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SCHEDULER_KINDS)}, got {kind!r}")
        if not isinstance(id_, str) or not _SCHEDULER_IDS[kind].fullmatch(id_):
            shape = "NAMESPACE/POD" if kind == "kubernetes" else "a numeric job id"
            shown = repr(id_) if len(repr(id_)) <= 40 else repr(id_)[:37] + "..."
            raise ValueError(f"id of a {kind} job must be {shape}, got {shown}")
        return cls(kind, id_)


IDLE_UTILIZATION = 0.01
"""Utilization at or under which a GPU reads idle."""
IDLE_SMOOTHING = 0.2
"""Weight of each newly proven idle span (about one second) in the learned idle power."""
IDLE_CEILING_OF_MAX = 1 / 3
"""Idle ceiling as a fraction of the maximum limit, where the minimum limit is unknown."""


def idle_ceiling_w(info: GpuInfo) -> float | None:
    """The most a board can draw at idle, from its identity: its minimum power limit.

    The driver must hold the board at its minimum limit under full load by lowering clocks, so
    at idle (lowest clocks, no work) it draws less: an H100 SXM idles at about 70 W with a
    200 W minimum limit, an A100 SXM at about 55 W with 100 W, an L4 at about 16 W with 40 W.
    Where the minimum is unknown, a third of the maximum (or default) limit, above every
    datacenter board's idle share. None when the GPU gives no limits at all.
    """
    if info.power_limit_min_w is not None and info.power_limit_min_w > 0:
        return info.power_limit_min_w
    top = info.power_limit_max_w or info.power_limit_default_w
    return None if top is None or top <= 0 else top * IDLE_CEILING_OF_MAX


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


class JobError(ValueError):
    """A bad job request (unknown job, bad name, priority, pid or count)."""


class JobConflict(JobError):
    """A registration names a running job of another process (HTTP 409)."""


@dataclass(slots=True)
class Job:
    """A registered job and what it has reported."""

    name: str
    pid: int
    gpu: int
    priority: str
    registered_at_s: float
    utilization: float | None = None
    """Load it puts on a simulated GPU (ignored on real GPUs)."""
    tune: bool = False
    """The energy tuner may choose its GPU's power limit."""
    migratable: bool = False
    """A supervisor follows its ``target_gpu``: the policy engine may move it."""
    scheduler: SchedulerRef | None = None
    """Where a scheduler runs it (Kubernetes pod, Slurm job), if it said."""
    step: int = 0
    samples: int = 0
    tokens: int = 0
    last_progress_s: float | None = None
    target_gpu: int | None = None
    energy_by_gpu_j: dict[int, float] = field(default_factory=dict)
    power_w: float = 0.0
    last_seen_s: float = field(default_factory=time.monotonic)
    """Monotonic time of the last request about this job (its supervisor polls every second)."""
    registered_mono_s: float = 0.0
    finished_at_s: float | None = None
    """Wall-clock time it finished (unregistered or reaped); None while it runs."""
    finished_mono_s: float | None = None
    migrations: int = 0
    """Moves to another GPU completed (re-registrations of the running job on another GPU)."""


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the API and exporters see it."""

    name: str
    pid: int
    gpu: int
    priority: str
    registered_at_s: float
    step: int
    samples: int
    tokens: int
    target_gpu: int | None
    energy_by_gpu_j: dict[int, float]
    power_w: float
    state: str = "running"
    """``running``, or ``finished`` (kept for the retention, with its final totals)."""
    finished_at_s: float | None = None
    duration_s: float = 0.0
    """From registration to the end (or to now while it runs)."""
    tune: bool = False
    """The energy tuner may choose its GPU's power limit."""
    migratable: bool = False
    """A supervisor follows its ``target_gpu``: the policy engine may move it."""
    migrations: int = 0
    """Moves to another GPU completed; a finished job keeps its count."""
    scheduler: SchedulerRef | None = None
    """Where a scheduler runs it (Kubernetes pod, Slurm job), if it said."""

    @property
    def energy_j(self) -> float:
        """Energy attributed across every GPU the job ran on."""
        return sum(self.energy_by_gpu_j.values())

    @property
    def tokens_per_joule(self) -> float | None:
        """Efficiency, where the job reports tokens."""
        energy = self.energy_j
        return self.tokens / energy if self.tokens and energy > 0 else None

    @property
    def mean_power_w(self) -> float | None:
        """Attributed energy over the job's duration."""
        return self.energy_j / self.duration_s if self.duration_s > 0 else None


@dataclass(frozen=True, slots=True)
class GpuSplit:
    """Where one GPU's energy went."""

    idle_j: float
    unattributed_j: float
    idle_power_w: float | None
    """The idle power in use: learned from proven-idle spans, else the lowest power seen; never
    above the board's idle ceiling."""


@dataclass(slots=True)
class _GpuTrack:
    energy_j: float
    mono_s: float
    ceiling_w: float | None
    idle_w: float | None = None
    """Learned from proven-idle spans only."""
    min_w: float | None = None
    idle_j: float = 0.0
    unattributed_j: float = 0.0
    slow_mono_s: float | None = None
    """When the utilization in force was read; None when unknown."""
    slow_idle: bool = False
    """Whether that reading said idle."""
    span_j: float = 0.0
    span_s: float = 0.0
    """Energy and time since that reading (a candidate idle span)."""

    def idle_power_w(self) -> float | None:
        idle = self.idle_w if self.idle_w is not None else self.min_w
        if idle is not None and self.ceiling_w is not None:
            idle = min(idle, self.ceiling_w)
        return idle

    def forget_span(self) -> None:
        self.slow_mono_s, self.slow_idle = None, False
        self.span_j = self.span_s = 0.0


Listener = Callable[[Job | None, Job | None], None]
"""Called with (old, new) on every registration change: (None, job) added, (job, None) removed."""


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= COUNT_MAX:
        raise JobError(f"{name} must be an integer in 0..{COUNT_MAX}, got {value!r}")
    return value


class JobRegistry:
    """Thread-safe registry of jobs with per-GPU energy attribution.

    ``pid_alive`` tells whether a pid still runs (the agent passes :func:`process_alive`); a
    registration may then replace a job whose process is gone. Without it, only the job's own
    pid, or the move the agent asked for (a pending ``target_gpu``), may re-register a name.
    """

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        pid_alive: Callable[[int], bool] | None = None,
    ) -> None:
        self._monotonic = monotonic
        self._pid_alive = pid_alive
        self._lock = threading.Lock()  # guards everything below; listeners run outside it
        self._jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()
        """Finished jobs by name, oldest first."""
        self._gpus: dict[int, _GpuTrack] = {}
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Be told of registrations, moves and removals (the simulator places load this way)."""
        self._listeners.append(listener)

    def _notify(self, old: Job | None, new: Job | None) -> None:
        for listener in self._listeners:
            listener(old, new)

    # ------------------------------------------------------------ registration
    def register(
        self, name: str, pid: int, gpu: int, priority: str = "normal", *,
        utilization: float | None = None, tune: bool = False, migratable: bool = False,
        scheduler: SchedulerRef | None = None,
    ) -> tuple[JobView, bool]:  # fmt: skip
        """Add a job, or update the pid/GPU of one with that name. Returns (job, created).

        A running job registered again on another GPU has moved: its ``migrations`` count grows
        by one, and its totals carry over.

        Raises :class:`JobConflict` when the name belongs to a running job of another process,
        unless that job is moving to ``gpu`` (its supervisor re-registers it after the move)
        or its process is gone. A finished job's name may be registered again: the new run
        replaces the finished record.
        """
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise JobError(f"job name {name!r} must be 1-64 of A-Z a-z 0-9 _ . : - ")
        if priority not in PRIORITIES:
            raise JobError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 1 <= pid <= PID_MAX:
            raise JobError(f"pid must be an integer in 1..{PID_MAX}, got {pid!r}")
        if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu <= PID_MAX:
            raise JobError(f"gpu must be a GPU index, got {gpu!r}")
        if utilization is not None and not (
            isinstance(utilization, int | float)
            and not isinstance(utilization, bool)
            and 0.0 < utilization <= 1.0
        ):
            raise JobError(f"utilization must be within (0, 1], got {utilization}")
        now = self._monotonic()
        with self._lock:
            old = self._jobs.get(name)
            if old is None:
                if len(self._jobs) >= MAX_JOBS:
                    raise JobError(
                        f"{MAX_JOBS} jobs are running, the most one agent tracks; "
                        f"job {name!r} is refused"
                    )
                self._finished.pop(name, None)
                job = Job(
                    name, pid, gpu, priority, time.time(), utilization, tune, migratable, scheduler
                )
                job.registered_mono_s = now
            else:
                if pid != old.pid and not self._may_replace(old, gpu):
                    raise JobConflict(
                        f"job {name!r} is running as pid {old.pid} on GPU {old.gpu}; "
                        "give another job another name"
                    )
                job = Job(
                    name, pid, gpu, priority, old.registered_at_s, utilization, tune, migratable,
                    scheduler, old.step,
                    old.samples, old.tokens, old.last_progress_s,
                    None if old.target_gpu == gpu else old.target_gpu,
                    dict(old.energy_by_gpu_j), 0.0,
                )  # fmt: skip
                job.registered_mono_s = old.registered_mono_s
                job.migrations = old.migrations + (1 if gpu != old.gpu else 0)
            job.last_seen_s = now
            self._jobs[name] = job
            view = self._view(job, now)
        self._notify(old, job)
        return view, old is None

    def _may_replace(self, old: Job, gpu: int) -> bool:
        """A new pid may take a running job's name: the move the agent asked for, or a dead pid."""
        if old.target_gpu is not None and old.target_gpu == gpu:
            return True
        return self._pid_alive is not None and not self._pid_alive(old.pid)

    def unregister(self, name: str) -> JobView:
        """End a job (its process ended): it moves to the finished jobs, with its totals."""
        now = self._monotonic()
        with self._lock:
            job = self._live(name)
            del self._jobs[name]
            job.finished_at_s, job.finished_mono_s = time.time(), now
            job.power_w, job.target_gpu = 0.0, None
            self._finished.pop(name, None)
            self._finished[name] = job
            self._prune(now)
            view = self._view(job, now)
        self._notify(job, None)
        return view

    def progress(self, name: str, *, step: int, samples: int, tokens: int) -> JobView:
        """Record progress a job reports (cumulative counts, each 0..2**63-1)."""
        counts = (_count("step", step), _count("samples", samples), _count("tokens", tokens))
        now = self._monotonic()
        with self._lock:
            job = self._live(name)
            job.step, job.samples, job.tokens = counts
            job.last_progress_s = time.time()
            job.last_seen_s = now
            return self._view(job, now)

    def request_migration(self, name: str, gpu: int) -> JobView:
        """Ask a job's supervisor to move it to another GPU (it polls for ``target_gpu``)."""
        with self._lock:
            job = self._live(name)
            job.target_gpu = None if gpu == job.gpu else gpu
            return self._view(job, self._monotonic())

    def get(self, name: str) -> JobView:
        """One job, running or finished within the retention."""
        now = self._monotonic()
        with self._lock:
            self._prune(now)
            job = self._jobs.get(name) or self._finished.get(name)
            if job is None:
                raise JobError(f"no job named {name!r}")
            return self._view(job, now)

    def jobs(self) -> list[JobView]:
        """All jobs, running and finished within the retention, by name."""
        now = self._monotonic()
        with self._lock:
            self._prune(now)
            every = {**self._finished, **self._jobs}
            return [self._view(every[n], now) for n in sorted(every)]

    def touch(self, name: str) -> None:
        """Note that the job (its supervisor) was heard from; a finished job stays finished."""
        with self._lock:
            job = self._jobs.get(name)
            if job is not None:
                job.last_seen_s = self._monotonic()
            elif name not in self._finished:
                raise JobError(f"no job named {name!r}")

    def silent_pids(self, grace_s: float) -> dict[str, int]:
        """Pids of running jobs not heard from for ``grace_s``, by name (candidates for reaping)."""
        now = self._monotonic()
        with self._lock:
            return {n: j.pid for n, j in self._jobs.items() if now - j.last_seen_s > grace_s}

    def reap(self, grace_s: float, alive: Callable[[int], bool] = process_alive) -> list[str]:
        """Finish the jobs whose supervisor went silent for ``grace_s`` and whose process is gone.

        Both must hold: in a container the agent may not see the job's pid, but a live
        supervisor polls its job every second. A failure with one job is logged and the others
        are still reaped. Returns the names reaped.
        """
        reaped = []
        for name, pid in self.silent_pids(grace_s).items():
            try:
                if alive(pid):
                    continue
                log.warning("job %s: process %d is gone; it has finished", name, pid)
                self.unregister(name)
                reaped.append(name)
            except JobError:
                continue  # ended meanwhile
            except Exception:
                log.exception("reaping job %s (pid %d) failed; the other jobs go on", name, pid)
        return reaped

    def _live(self, name: str) -> Job:
        job = self._jobs.get(name)
        if job is None:
            if name in self._finished:
                raise JobError(f"no job named {name!r} is running (it has finished)")
            raise JobError(f"no job named {name!r}")
        return job

    def _prune(self, now: float) -> None:
        finished = self._finished
        while len(finished) > FINISHED_KEEP:
            finished.popitem(last=False)
        while finished:
            ended = next(iter(finished.values())).finished_mono_s
            if ended is not None and now - ended <= FINISHED_KEEP_S:
                break
            finished.popitem(last=False)

    @staticmethod
    def _view(job: Job, now: float) -> JobView:
        end = job.finished_mono_s if job.finished_mono_s is not None else now
        return JobView(
            job.name, job.pid, job.gpu, job.priority, job.registered_at_s, job.step, job.samples,
            job.tokens, job.target_gpu, dict(job.energy_by_gpu_j), job.power_w,
            "running" if job.finished_at_s is None else "finished", job.finished_at_s,
            max(0.0, end - job.registered_mono_s), job.tune, job.migratable, job.migrations,
            job.scheduler,
        )  # fmt: skip

    # ------------------------------------------------------------- attribution
    def attribute(self, samples: Sequence[GpuSample]) -> None:
        """Split each GPU's energy since the previous pass between idle, jobs and the rest."""
        now = self._monotonic()
        with self._lock:
            for s in samples:
                self._attribute_gpu(s, now)

    def _attribute_gpu(self, s: GpuSample, now: float) -> None:
        index = s.info.index
        track = self._gpus.get(index)
        if not s.up or s.reading is None:
            if track is not None:
                track.forget_span()  # nothing proves the gap idle
            return
        t = s.read_mono_s if s.read_mono_s is not None else now
        if track is None:
            track = self._gpus[index] = _GpuTrack(s.energy_j, t, idle_ceiling_w(s.info))
            self._note_slow_read(track, s)
            return
        delta_j = s.energy_j - track.energy_j
        dt = t - track.mono_s
        if dt <= 0:
            return  # the same read again (a failed pass): nothing new
        track.energy_j, track.mono_s = s.energy_j, t
        if delta_j < 0:
            track.forget_span()
            return
        power = delta_j / dt
        track.min_w = power if track.min_w is None else min(track.min_w, power)
        track.span_j += delta_j
        track.span_s += dt
        if s.slow_read_mono_s != track.slow_mono_s:
            # A new utilization reading closes the span: idle if it and the one that opened
            # the span both read idle, and the span ends at this reading.
            if track.slow_idle and _idle(s) and s.slow_read_mono_s == t and track.span_s > 0:
                span_w = track.span_j / track.span_s
                track.idle_w = (
                    span_w
                    if track.idle_w is None
                    else track.idle_w + IDLE_SMOOTHING * (span_w - track.idle_w)
                )
            self._note_slow_read(track, s)
        idle_w = track.idle_power_w() or 0.0
        idle_j = min(delta_j, idle_w * dt)
        active_j = delta_j - idle_j
        track.idle_j += idle_j
        jobs = [j for j in self._jobs.values() if j.gpu == index]
        if not jobs:
            track.unattributed_j += active_j
            return
        util_by_pid = {p.pid: p.sm_utilization_ratio for p in s.reading.processes}
        weights = [util_by_pid.get(j.pid) for j in jobs]
        if any(w is None for w in weights) or sum(w or 0.0 for w in weights) <= 0:
            weights = [1.0] * len(jobs)
        total = sum(w or 0.0 for w in weights)
        for job, w in zip(jobs, weights, strict=True):
            share = active_j * (w or 0.0) / total
            job.energy_by_gpu_j[index] = job.energy_by_gpu_j.get(index, 0.0) + share
            job.power_w = share / dt

    @staticmethod
    def _note_slow_read(track: _GpuTrack, s: GpuSample) -> None:
        track.slow_mono_s, track.slow_idle = s.slow_read_mono_s, _idle(s)
        track.span_j = track.span_s = 0.0

    def gpu_splits(self) -> dict[int, GpuSplit]:
        """Idle and unattributed energy per GPU."""
        with self._lock:
            return {
                i: GpuSplit(t.idle_j, t.unattributed_j, t.idle_power_w())
                for i, t in sorted(self._gpus.items())
            }


def _idle(s: GpuSample) -> bool:
    util = None if s.reading is None else s.reading.utilization_gpu_ratio
    return s.slow_read_mono_s is not None and util is not None and util <= IDLE_UTILIZATION
