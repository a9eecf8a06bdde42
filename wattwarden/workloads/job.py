"""``wattwarden job run``: supervise one workload process on one GPU, and move it when told to.

The supervisor starts the command with ``CUDA_VISIBLE_DEVICES`` set to its GPU and the
``WATTWARDEN_*`` variables the workloads read, registers it with the agent (``POST
/api/v1/jobs``), forwards SIGTERM and SIGINT to it, and unregisters it (``DELETE
/api/v1/jobs/{name}``) when it exits, exiting with its code.

Migration: about once a second it asks the agent about the job (``GET /api/v1/jobs/{name}``).
When the answer's ``target_gpu`` differs from the job's GPU, it stops the process with SIGTERM
(the reference workloads checkpoint on SIGTERM), waits for it, and starts the same command again
with ``CUDA_VISIBLE_DEVICES`` set to the new GPU (the workload resumes from its checkpoint),
registering it again with the new GPU and process id (the agent accepts a new pid for a running
job's name only for the move it asked for, or once the old process is gone; another job
already running under the name is an error, never taken over).

Should the name pass to another process while the job runs (the agent ended the job, say after
losing touch with the supervisor, and another ``job run`` took the name: the agent's 409 on
registering again, or a record with another pid), the job runs on untracked: the supervisor says
so, never follows a move asked of the other job, and never ends the other job at exit.

At exit it prints what the job cost on stderr: duration, energy (J and Wh), mean power and
tokens per joule, per GPU where it moved, from the agent's final record of the job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from types import FrameType
from typing import Any, TextIO

from wattwarden.api.contract import PRIORITIES, JobRecord, SchedulerRef, valid_job_name
from wattwarden.workloads.agent_client import (
    ENV_AGENT_URL,
    ENV_JOB_NAME,
    ENV_TOKEN,
    AgentClient,
    AgentError,
    AgentUnreachable,
)

log = logging.getLogger(__name__)

JOULES_PER_WH = 3600.0
EXIT_FAILURE = 1
EXIT_CANNOT_RUN = 127
_FORWARDED = (signal.SIGTERM, signal.SIGINT)


ENV_SLURM_JOB_ID = "SLURM_JOB_ID"
ENV_POD_NAMESPACE = "POD_NAMESPACE"
ENV_POD_NAME = "POD_NAME"
"""Set by the Kubernetes downward API (``fieldRef: metadata.namespace`` / ``metadata.name``)."""


def scheduler_from_env(environ: Mapping[str, str]) -> SchedulerRef | None:
    """Where a scheduler runs this job, from its environment; None when none says.

    A Slurm job has ``$SLURM_JOB_ID``; a Kubernetes pod has ``$POD_NAMESPACE`` and ``$POD_NAME``
    where its spec maps them from the downward API. ValueError when a variable is set but is
    not of its scheduler's shape.
    """
    slurm = environ.get(ENV_SLURM_JOB_ID, "").strip()
    if slurm:
        try:
            return SchedulerRef.checked("slurm", slurm)
        except ValueError as e:
            raise ValueError(f"${ENV_SLURM_JOB_ID}: {e}") from None
    namespace = environ.get(ENV_POD_NAMESPACE, "").strip()
    pod = environ.get(ENV_POD_NAME, "").strip()
    if namespace and pod:
        try:
            return SchedulerRef.checked("kubernetes", f"{namespace}/{pod}")
        except ValueError as e:
            raise ValueError(f"${ENV_POD_NAMESPACE}/${ENV_POD_NAME}: {e}") from None
    return None


def exit_code(returncode: int) -> int:
    """A child's status as a shell reports it: its code, or 128 + N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


class JobSupervisor:
    """Runs ``command`` as a registered, migratable job. :meth:`run` returns the exit code."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        client: AgentClient,
        gpu: int = 0,
        priority: str = "normal",
        poll_interval_s: float = 1.0,
        stop_timeout_s: float = 120.0,
        environ: Mapping[str, str] | None = None,
        stream: TextIO | None = None,
        sim_utilization: float | None = None,
        tune: bool = False,
    ) -> None:
        if not valid_job_name(name):
            raise ValueError(f"bad job name {name!r}")
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
        if not command:
            raise ValueError("no command to run")
        self.name = name
        self.command = list(command)
        self.client = client
        self.gpu = gpu
        self.priority = priority
        self.poll_interval_s = poll_interval_s
        self.stop_timeout_s = stop_timeout_s
        self.sim_utilization = sim_utilization
        """GPU load a simulated fleet gives the job (None: the agent's default)."""
        self.tune = tune
        """Let the agent's energy tuner choose the job's power limit."""
        self._environ = dict(os.environ if environ is None else environ)
        self.scheduler = scheduler_from_env(self._environ)
        """Where a scheduler runs the job (told to the agent, for a fleet controller's moves)."""
        self._stream = sys.stderr if stream is None else stream
        self._child: subprocess.Popen[bytes] | None = None
        self._registered = False
        self._stopping = threading.Event()
        self._poll_failed = False
        self._taken_by: int | None = None
        """The pid that holds the job's name at the agent instead of the child (said once)."""
        self._started_s: float | None = None
        """Monotonic time the first child started (for the summary)."""
        self._ever_registered = False
        self.restarts = 0

    # ---------------------------------------------------------------- output
    def _say(self, text: str) -> None:
        self._stream.write(f"wattwarden job: {text}\n")
        self._stream.flush()

    # ----------------------------------------------------------------- child
    def child_env(self, gpu: int) -> dict[str, str]:
        """The environment the command runs with on ``gpu``."""
        env = dict(self._environ)
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        env[ENV_AGENT_URL] = self.client.url
        env[ENV_JOB_NAME] = self.name
        if self.client.token:
            env[ENV_TOKEN] = self.client.token
        else:
            env.pop(ENV_TOKEN, None)
        return env

    def _start(self) -> subprocess.Popen[bytes]:
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards it once, instead of the child getting it twice.
        child = subprocess.Popen(self.command, env=self.child_env(self.gpu), process_group=0)
        if self._started_s is None:
            self._started_s = time.monotonic()
        self._child = child
        return child

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def _stop_child(self, child: subprocess.Popen[bytes]) -> int:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``; the child's return code."""
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            return child.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self._say(
                f"job {self.name} did not stop within {self.stop_timeout_s:.0f} s of SIGTERM; "
                "killing it"
            )
            child.kill()
            return child.wait()

    # ----------------------------------------------------------------- agent
    def _register(self, pid: int) -> None:
        # A 409 (another process runs a job of this name) is an error: never take it over.
        self.client.register_job(
            self.name,
            pid,
            self.gpu,
            self.priority,
            utilization=self.sim_utilization,
            tune=self.tune,
            migratable=True,  # this supervisor follows target_gpu
            scheduler=self.scheduler,
        )
        self._registered = self._ever_registered = True
        self._taken_by = None

    def _name_taken(self, by: int | None, why: str) -> None:
        """Another process holds the job's name at the agent: run on untracked, end nothing."""
        if self._registered or by != self._taken_by:
            self._say(f"{why}; job {self.name} runs on untracked")
        self._registered = False
        self._taken_by = by

    def _unregister(self) -> JobRecord | None:
        """End the job at the agent; its final record (with totals), where the agent gives it."""
        if not self._registered:
            return None
        self._registered = False
        try:
            record = self.client.unregister_job(self.name)
            if record is None:  # already ended there (reaped): its finished record, if kept
                record = self.client.job(self.name)
        except AgentError as e:
            self._say(f"could not unregister job {self.name}: {e}")
            return None
        return record

    def _summary(self, code: int, record: JobRecord | None) -> None:
        """What the job cost, on stderr."""
        started = self._started_s
        duration_s = 0.0 if started is None else time.monotonic() - started
        self._say(f"job {self.name} ended (exit {code}) after {duration_s:.1f} s")
        if record is None:
            self._say("energy: not reported by the agent")
            return
        energy = record.energy_joules
        mean = f"{energy / duration_s:.1f} W" if duration_s > 0 else "n/a"
        efficiency = record.tokens_per_joule
        per_joule = "n/a" if efficiency is None else f"{efficiency:.3g}"
        self._say(
            f"energy {energy:.1f} J ({energy / JOULES_PER_WH:.4f} Wh), mean power {mean}, "
            f"tokens/J {per_joule}"
        )
        by_gpu = record.energy_joules_by_gpu
        if len(by_gpu) > 1:
            parts = [f"GPU {gpu}: {joules:.1f} J" for gpu, joules in sorted(by_gpu.items())]
            self._say("per GPU: " + ", ".join(parts))

    def _target_gpu(self, pid: int) -> int | None:
        """The GPU the agent wants the job on, or None (no wish, or no answer)."""
        try:
            job = self.client.job(self.name)
            if job is None or job.state == "finished":
                # restarted, or it ended the job while the process runs: register it again
                log.warning("the agent has no running job %s; registering it again", self.name)
                self._register(pid)
                return None
        except AgentError as e:
            if e.status == HTTPStatus.CONFLICT:  # another process took the name meanwhile
                self._name_taken(None, f"cannot register job {self.name} again: {e}")
                return None
            if not self._poll_failed:
                self._say(f"{e}; job {self.name} keeps running, retrying every second")
                self._poll_failed = True
            return None
        if self._poll_failed:
            self._say(f"the agent at {self.client.url} answers again")
            self._poll_failed = False
        if job.pid != pid:  # the name is another process's now: its moves are not ours
            self._name_taken(job.pid, f"the agent's job {self.name} is now pid {job.pid}")
            return None
        target = job.target_gpu
        return target if target is not None and target >= 0 else None

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        """Supervise until the command exits (for good); returns the exit code to use."""
        try:
            self.client.healthz()
        except AgentUnreachable as e:
            self._say(f"{e}; start it with `wattwarden agent`, or pass --agent URL")
            return EXIT_FAILURE
        except AgentError as e:
            self._say(str(e))
            return EXIT_FAILURE
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._on_signal) for s in _FORWARDED}
        code: int | None = None
        try:
            code = self._loop()
            return code
        finally:
            child = self._child
            if (
                child is not None and child.poll() is None
            ):  # only on our own bug or KeyboardInterrupt
                self._stop_child(child)
            record = self._unregister()
            if code is not None and self._ever_registered:
                self._summary(code, record)
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.client.close()

    def _loop(self) -> int:
        while True:
            try:
                child = self._start()
            except OSError as e:
                self._say(f"cannot run {self.command[0]!r}: {e.strerror or e}")
                return EXIT_CANNOT_RUN
            try:
                self._register(child.pid)
            except AgentError as e:
                self._say(f"cannot register job {self.name}: {e}")
                self._stop_child(child)
                return EXIT_FAILURE
            log.info("job %s: pid %d on GPU %d", self.name, child.pid, self.gpu)
            target = self._supervise(child)
            if target is None:
                return exit_code(child.wait())
            self.gpu = target
            self.restarts += 1
            if self._stopping.is_set():  # a signal came between the stop and the restart
                return exit_code(child.returncode)

    def _supervise(self, child: subprocess.Popen[bytes]) -> int | None:
        """Wait for the child; a GPU index when it was stopped to move there, else None."""
        next_poll = time.monotonic() + self.poll_interval_s
        while True:
            try:
                child.wait(timeout=max(next_poll - time.monotonic(), 0.0))
                return None
            except subprocess.TimeoutExpired:
                pass
            next_poll = time.monotonic() + self.poll_interval_s
            if self._stopping.is_set():
                continue  # the signal was forwarded; wait for the child to act on it
            target = self._target_gpu(child.pid)
            if target is None or target == self.gpu or child.poll() is not None:
                continue
            self._say(f"moving job {self.name} from GPU {self.gpu} to GPU {target}")
            code = self._stop_child(child)
            if self._stopping.is_set():
                return None  # told to stop while moving: do not start it again
            log.info("job %s stopped for the move (exit %d)", self.name, exit_code(code))
            return target
