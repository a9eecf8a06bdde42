"""A whole node on the simulator's clock, run faster than real time.

The same parts as the agent — a simulated fleet read through the GpuDevice protocol, the GPU
collector and sampler, the store, the job registry with its energy attribution, the journalled
actuator and the policy engine — wired on one :class:`~wattwarden.hardware.sim.ManualClock`
instead of threads and wall time. :meth:`SimNode.run` advances the clock one sampling pass at a
time and runs a policy period whenever one is due, so a 30-minute trace takes seconds, and every
pass can be checked (the property tests do; the benchmarks replay traces on it).

Jobs here are simulated workloads (:class:`SimJob`): a process on a GPU at some utilization that
makes progress at ``steps_per_s`` times the GPU's relative throughput (what its power limit and
temperature leave of its clocks), checkpoints every ``checkpoint_every`` steps, and follows the
agent's ``target_gpu`` as ``wattwarden job run`` does: it stops, loses the steps since its last
checkpoint, and resumes on the new GPU after ``restart_s``.

No HTTP and no threads: what is tested here is the decision logic on realistic physics; the
agent tests cover the same parts behind the API.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import Job, JobRegistry
from wattwarden.collectors.sampler import Sampler
from wattwarden.collectors.store import MetricStore
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.hardware.sim.clock import ManualClock
from wattwarden.hardware.sim.fleet import SimFleet
from wattwarden.hardware.sim.gpu import SimProcess
from wattwarden.policies.actuator import LimitActuator
from wattwarden.policies.base import Decision, Mode, Policy
from wattwarden.policies.engine import PolicyEngine

START_S = 1000.0
WALL_OFFSET_S = 1.7e9
"""Wall time = this + the manual clock (a plausible epoch, for timestamps)."""
JOB_MEMORY_BYTES = 20 * 2**30
JOURNAL_FILE = "journal.sqlite3"

AfterPeriod = Callable[["SimNode", list[Decision]], None]


@dataclass
class SimJob:
    """A simulated workload: load on a GPU, progress that follows the GPU's clocks."""

    name: str
    gpu: int
    priority: str = "normal"
    utilization: float = 0.9
    steps_per_s: float = 1.0
    """Steps per second on an uncapped GPU."""
    tune: bool = False
    migratable: bool = True
    checkpoint_every: int = 50
    """Steps between checkpoints; a move loses the steps since the last one."""
    restart_s: float = 20.0
    """Seconds from stop to running again on the new GPU (checkpoint load, warm-up)."""
    steps: float = 0.0
    """Steps done (fractional: progress is integrated exactly between passes)."""
    checkpoint: int = 0
    """The step of the last checkpoint."""
    moves: list[tuple[int, int, float]] = field(default_factory=list)
    """Each move: (from GPU, to GPU, simulated time it resumed)."""
    resumes_at: float | None = None
    """While moving: when it runs again."""
    pid: int = 0


class SimNode:
    """One node: simulated fleet, collector, store, registry, actuator and engine on one clock."""

    def __init__(
        self,
        gpus: int = 8,
        *,
        state_dir: Path,
        policies: Sequence[Policy] = (),
        mode: Mode = "dry_run",
        model: str = "h100-sxm",
        interval_s: float = 0.1,
        period_s: float = 1.0,
        full_interval_s: float = 1.0,
        seed: int = 0,
        after_period: Iterable[AfterPeriod] = (),
    ) -> None:
        self.clock = ManualClock(START_S)
        self.interval_s = interval_s
        self.period_s = period_s
        self.fleet = SimFleet(gpus, model=model, clock=self.clock, seed=seed, wall_clock=self.wall)
        self.backend = SimBackend(self.fleet)
        self.collector = GpuCollector(
            self.backend, monotonic=self.clock, wall=self.wall, full_interval_s=full_interval_s
        )
        self.store = MetricStore(interval_s=interval_s, monotonic=self.clock)
        self.jobs = JobRegistry(monotonic=self.clock)
        self.jobs.add_listener(self._place)
        self.sampler = Sampler(
            self.store,
            [self.collector],
            interval_s=interval_s,
            monotonic=self.clock,
            wall=self.wall,
            on_pass=lambda: self.jobs.attribute(self.collector.latest),
        )
        # one change per GPU per period at most, with slack for the pass grid
        self.actuator = LimitActuator(
            self.backend.devices(),
            state_dir / JOURNAL_FILE,
            min_interval_s=period_s * 0.5,
            monotonic=self.clock,
        )
        self.engine = PolicyEngine(
            policies, self.actuator, self.store, mode=mode, monotonic=self.clock, wall=self.wall
        )
        self.after_period = list(after_period)
        self.sim_jobs: dict[str, SimJob] = {}
        self._pids = itertools.count(10_000)
        self._next_period = self.clock() + period_s
        self.decisions: list[Decision] = []
        """Every decision of every period (sets, keeps and holds), oldest first."""
        self.sampler.run_once()

    # ------------------------------------------------------------------ time
    def wall(self) -> float:
        """Wall-clock time on the simulated clock."""
        return WALL_OFFSET_S + self.clock()

    def run(self, seconds: float, on_pass: Callable[[SimNode], None] | None = None) -> None:
        """Advance ``seconds`` of simulated time, one sampling pass at a time."""
        end = self.clock() + seconds
        while self.clock() < end - 1e-9:
            dt = min(self.interval_s, end - self.clock())
            self._progress(dt)
            self.clock.advance(dt)
            self.sampler.run_once()
            if self.clock() >= self._next_period - 1e-9:
                self._next_period += self.period_s
                self.period()
            if on_pass is not None:
                on_pass(self)

    def period(self) -> list[Decision]:
        """One policy period now (run calls it when due): report progress, decide, follow moves."""
        for job in self.sim_jobs.values():
            if job.resumes_at is None:
                self.jobs.progress(job.name, step=int(job.steps), samples=0, tokens=0)
        decisions = self.engine.step(self.jobs.jobs())
        self.decisions.extend(decisions)
        for hook in self.after_period:
            hook(self, decisions)
        self._follow_moves()
        return decisions

    # ------------------------------------------------------------------ jobs
    def add_job(self, job: SimJob) -> SimJob:
        """Start a job on its GPU, registered with the node's registry."""
        job.pid = next(self._pids)
        self.sim_jobs[job.name] = job
        self._register(job)
        return job

    def end_job(self, name: str) -> SimJob:
        """Stop a job (it unregisters, its load leaves the GPU)."""
        job = self.sim_jobs.pop(name)
        self.jobs.unregister(name)
        return job

    def _register(self, job: SimJob) -> None:
        self.jobs.register(
            job.name,
            job.pid,
            job.gpu,
            job.priority,
            utilization=job.utilization,
            tune=job.tune,
            migratable=job.migratable,
        )

    def _place(self, old: Job | None, new: Job | None) -> None:
        if old is not None:
            self.fleet[old.gpu].remove_process(old.pid)
        if new is not None and new.finished_at_s is None:
            util = new.utilization if new.utilization is not None else 0.8
            self.fleet[new.gpu].add_process(SimProcess(new.pid, util, JOB_MEMORY_BYTES, new.name))

    def _progress(self, dt: float) -> None:
        """Integrate each running job's steps over the next ``dt`` at its GPU's throughput."""
        now = self.clock()
        for job in self.sim_jobs.values():
            if job.resumes_at is not None:
                if now < job.resumes_at:
                    continue
                job.resumes_at = None
                self._register(job)
            gpu = self.fleet[job.gpu]
            if gpu.lost:
                continue
            before = job.steps
            job.steps += dt * job.steps_per_s * gpu.relative_throughput()
            if math.floor(job.steps / job.checkpoint_every) > math.floor(
                before / job.checkpoint_every
            ):
                job.checkpoint = int(job.steps // job.checkpoint_every * job.checkpoint_every)

    def _follow_moves(self) -> None:
        """Do what a supervisor does on a new ``target_gpu``: stop, lose work, resume there."""
        for view in self.jobs.jobs():
            job = self.sim_jobs.get(view.name)
            if job is None or view.target_gpu is None or view.target_gpu == job.gpu:
                continue
            if job.resumes_at is not None:
                continue
            self.fleet[job.gpu].remove_process(job.pid)
            old, job.gpu = job.gpu, view.target_gpu
            job.steps = float(job.checkpoint)
            job.pid = next(self._pids)
            job.resumes_at = self.clock() + job.restart_s
            job.moves.append((old, job.gpu, job.resumes_at))

    # -------------------------------------------------------------- readings
    def power_w(self) -> float:
        """The node's GPU power now (ground truth, every GPU that is up)."""
        return sum(g.true_power_w() for g in self.fleet.gpus if not g.lost)

    def limits_w(self) -> list[float]:
        """Every GPU's power limit now, in index order."""
        return [float(g.state()["power_limit_w"]) for g in self.fleet.gpus]

    def close(self) -> None:
        """Restore every limit the engine changed and close the journal."""
        self.actuator.restore_all()
        self.actuator.close()
