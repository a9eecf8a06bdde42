"""Jobs on the node and the attribution of GPU energy to them.

Each GPU pass splits the GPU's energy since the previous pass into idle energy (its idle power,
learned from the passes where it sat idle) and active energy. Active energy goes to the jobs on
that GPU: all of it to a job alone on the GPU; shared by per-process SM utilization when several
jobs share one (the approach Kepler takes for processes on a node), equally where the driver gives
no per-process figure. Active energy on a GPU with no registered job is kept as "unattributed", so
jobs + idle + unattributed always add up to the GPU's energy.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wattwarden.collectors.samples import GpuSample

PRIORITIES = ("high", "normal", "low")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_IDLE_UTILIZATION = 0.01
_IDLE_SMOOTHING = 0.2


class JobError(ValueError):
    """A bad job request (unknown job, bad name or priority)."""


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
    step: int = 0
    samples: int = 0
    tokens: int = 0
    last_progress_s: float | None = None
    target_gpu: int | None = None
    energy_by_gpu_j: dict[int, float] = field(default_factory=dict)
    power_w: float = 0.0
    last_seen_s: float = field(default_factory=time.monotonic)
    """Monotonic time of the last request about this job (its supervisor polls every second)."""


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

    @property
    def energy_j(self) -> float:
        """Energy attributed across every GPU the job ran on."""
        return sum(self.energy_by_gpu_j.values())

    @property
    def tokens_per_joule(self) -> float | None:
        """Efficiency, where the job reports tokens."""
        energy = self.energy_j
        return self.tokens / energy if self.tokens and energy > 0 else None


@dataclass(frozen=True, slots=True)
class GpuSplit:
    """Where one GPU's energy went."""

    idle_j: float
    unattributed_j: float
    idle_power_w: float | None


@dataclass(slots=True)
class _GpuTrack:
    energy_j: float
    mono_s: float
    idle_w: float | None = None
    min_w: float | None = None
    idle_j: float = 0.0
    unattributed_j: float = 0.0


Listener = Callable[[Job | None, Job | None], None]
"""Called with (old, new) on every registration change: (None, job) added, (job, None) removed."""


class JobRegistry:
    """Thread-safe registry of jobs with per-GPU energy attribution."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
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
        utilization: float | None = None,
    ) -> tuple[JobView, bool]:  # fmt: skip
        """Add a job, or update the pid/GPU of one with that name. Returns (job, created)."""
        if not _NAME.match(name):
            raise JobError(f"job name {name!r} must be 1-64 of A-Z a-z 0-9 _ . : - ")
        if priority not in PRIORITIES:
            raise JobError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        if pid <= 0:
            raise JobError(f"pid must be positive, got {pid}")
        if utilization is not None and not 0.0 < utilization <= 1.0:
            raise JobError(f"utilization must be within (0, 1], got {utilization}")
        with self._lock:
            old = self._jobs.get(name)
            if old is None:
                job = Job(name, pid, gpu, priority, time.time(), utilization)
            else:
                job = Job(
                    name, pid, gpu, priority, old.registered_at_s, utilization, old.step,
                    old.samples, old.tokens, old.last_progress_s,
                    None if old.target_gpu == gpu else old.target_gpu,
                    dict(old.energy_by_gpu_j), 0.0,
                )  # fmt: skip
            job.last_seen_s = self._monotonic()
            self._jobs[name] = job
            view = self._view(job)
        self._notify(old, job)
        return view, old is None

    def unregister(self, name: str) -> JobView:
        """Remove a job (its process ended)."""
        with self._lock:
            job = self._jobs.pop(name, None)
            if job is None:
                raise JobError(f"no job named {name!r}")
            view = self._view(job)
        self._notify(job, None)
        return view

    def progress(self, name: str, *, step: int, samples: int, tokens: int) -> JobView:
        """Record progress a job reports (cumulative counts)."""
        with self._lock:
            job = self._get(name)
            job.step, job.samples, job.tokens = step, samples, tokens
            job.last_progress_s = time.time()
            job.last_seen_s = self._monotonic()
            return self._view(job)

    def request_migration(self, name: str, gpu: int) -> JobView:
        """Ask a job's supervisor to move it to another GPU (it polls for ``target_gpu``)."""
        with self._lock:
            job = self._get(name)
            job.target_gpu = None if gpu == job.gpu else gpu
            return self._view(job)

    def get(self, name: str) -> JobView:
        """One job."""
        with self._lock:
            return self._view(self._get(name))

    def jobs(self) -> list[JobView]:
        """All jobs, by name."""
        with self._lock:
            return [self._view(self._jobs[n]) for n in sorted(self._jobs)]

    def touch(self, name: str) -> None:
        """Note that the job (its supervisor) was heard from."""
        with self._lock:
            self._get(name).last_seen_s = self._monotonic()

    def silent_pids(self, grace_s: float) -> dict[str, int]:
        """Pids of jobs not heard from for ``grace_s``, by name (candidates for reaping)."""
        now = self._monotonic()
        with self._lock:
            return {n: j.pid for n, j in self._jobs.items() if now - j.last_seen_s > grace_s}

    def _get(self, name: str) -> Job:
        job = self._jobs.get(name)
        if job is None:
            raise JobError(f"no job named {name!r}")
        return job

    @staticmethod
    def _view(job: Job) -> JobView:
        return JobView(
            job.name, job.pid, job.gpu, job.priority, job.registered_at_s, job.step, job.samples,
            job.tokens, job.target_gpu, dict(job.energy_by_gpu_j), job.power_w,
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
        if track is None or not s.up or s.reading is None:
            if s.up and s.reading is not None:
                self._gpus[index] = _GpuTrack(s.energy_j, now)
            return
        delta_j = s.energy_j - track.energy_j
        dt = now - track.mono_s
        track.energy_j, track.mono_s = s.energy_j, now
        if dt <= 0 or delta_j < 0:
            return
        power = delta_j / dt
        track.min_w = power if track.min_w is None else min(track.min_w, power)
        util = s.reading.utilization_gpu_ratio
        if util is not None and util <= _IDLE_UTILIZATION:
            track.idle_w = (
                power
                if track.idle_w is None
                else track.idle_w + _IDLE_SMOOTHING * (power - track.idle_w)
            )
        idle_w = track.idle_w if track.idle_w is not None else track.min_w
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

    def gpu_splits(self) -> dict[int, GpuSplit]:
        """Idle and unattributed energy per GPU."""
        with self._lock:
            return {
                i: GpuSplit(t.idle_j, t.unattributed_j, t.idle_w)
                for i, t in sorted(self._gpus.items())
            }
