"""``wattwarden demo``: the whole stack on a simulated fleet, in one command.

It starts, each as a process of its own as an operator would run them:

1. an agent on a simulated fleet (``wattwarden agent --backend sim``) in a fresh temporary state
   directory, with the policy engine acting (``--apply``) on a power budget of about 65 % of the
   GPUs' default limits, so budget capping shows, and idle capping after a minute;
2. a few simulated jobs of different priorities and load shapes, each under the real job
   supervisor (``wattwarden job run``), so that migrations and progress work as for real jobs:
   the job process is :mod:`wattwarden.demo_worker` (no PyTorch); a batch job finishes and is
   started again under a new name, so finished jobs show too; some GPUs stay idle;
3. the dashboard (:mod:`wattwarden.dashboard.launch`) on that agent, with its token.

Ctrl-C or SIGTERM stops the jobs, the dashboard and the agent (which restores the power limits
it changed), says whether the limits are back at their defaults, removes the temporary
directory and exits 0. A process that dies unexpectedly is named, the rest are stopped, and
the demo exits 1. No process outlives the demo: each child runs in a process group of its own,
the demo adopts orphaned descendants (a child subreaper, on Linux) and ends every one it saw.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import psutil

from wattwarden.cliutil import EXIT_FAILURE, EXIT_OK, stop_on_signals
from wattwarden.config import ConfigError
from wattwarden.dashboard import launch
from wattwarden.dashboard.settings import DashboardSettings
from wattwarden.workloads.agent_client import AgentClient, AgentError

GPUS_MAX = 64
SIM_MODEL = "h100-sxm"
BUDGET_FRACTION = 0.65
IDLE_AFTER_S = 60
POLICIES = "thermal,budget,idle"
START_TIMEOUT_S = 90.0
JOB_STOP_TIMEOUT_S = 20.0
AGENT_STOP_TIMEOUT_S = 30.0
SERVING_LINE = re.compile(r"serving (https?://\S+?)/metrics")
LOG_TAIL_LINES = 8


@dataclass(frozen=True, slots=True)
class JobKind:
    """A kind of simulated job: priority, load shape and pace."""

    name: str
    priority: str
    shape: str
    utilization: float
    """The GPU load its registration gives (``job run --sim-utilization``)."""
    extra_load: float
    """What its shape adds on top at its peak (``POST /api/v1/sim/load``)."""
    steps_per_s: float
    steps: int
    """Finish after this many steps (0: runs until stopped)."""
    samples_per_step: int
    tokens_per_step: int
    what: str


# In the order they are placed: a small fleet gets the first ones.
KINDS = (
    JobKind("train-llm", "high", "steady", 0.95, 0.0, 4.0, 0, 32, 32 * 2048, "LLM pre-training"),
    # about 2 minutes under the budget's caps, then run again under a new name
    JobKind(
        "eval", "low", "steady", 0.7, 0.0, 6.0, 500, 64, 64 * 512, "batch eval, 500 steps, rerun"
    ),
    JobKind("finetune", "normal", "bursty", 0.3, 0.65, 6.0, 0, 16, 16 * 1024, "fine-tune"),
    JobKind("serve-chat", "high", "diurnal", 0.15, 0.7, 20.0, 0, 8, 8 * 256, "inference service"),
    JobKind("train-vision", "normal", "steady", 0.85, 0.0, 8.0, 0, 256, 0, "vision training"),
    JobKind("sweep", "low", "bursty", 0.25, 0.6, 10.0, 0, 64, 0, "hyperparameter sweep"),
)


@dataclass(frozen=True, slots=True)
class PlacedJob:
    """One job of the demo on its GPU; a batch job's runs are ``NAME-run1``, ``NAME-run2``..."""

    name: str
    gpu: int
    kind: JobKind

    def run_name(self, run: int) -> str:
        """The job's name at the agent for its ``run``-th run."""
        return f"{self.name}-run{run}" if self.kind.steps else self.name


def plan_jobs(gpus: int) -> list[PlacedJob]:
    """The jobs for a fleet of ``gpus``: one per GPU on three quarters of them, the rest idle.

    Up to 8 GPUs the idle ones are the last; on a bigger fleet the kinds repeat
    (``train-llm-2``...) and the jobs spread over its GPUs.
    """
    count = gpus - gpus // 4
    jobs = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        cycle = i // len(KINDS)
        name = kind.name if cycle == 0 else f"{kind.name}-{cycle + 1}"
        jobs.append(PlacedJob(name, i if gpus <= 8 else i * gpus // count, kind))
    return jobs


def power_budget_watts(gpus: int) -> float:
    """About 65 % of the simulated GPUs' default limits, in whole watts."""
    from wattwarden.hardware.sim.models import MODELS  # noqa: PLC0415 - the demo's model only

    return float(round(BUDGET_FRACTION * gpus * MODELS[SIM_MODEL].power_default_w))


@dataclass
class Child:
    """A process the demo started."""

    what: str
    proc: subprocess.Popen[bytes]
    log: Path
    job: PlacedJob | None = None
    run: int = 1


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``), so none escapes the demo."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


class Demo:
    """The demo's processes, from start to stop. :meth:`run` returns the exit code."""

    def __init__(
        self, listen: str, gpus: int, *, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        if not 1 <= gpus <= GPUS_MAX:
            raise ConfigError(f"--gpus: must be within 1..{GPUS_MAX}, got {gpus}")
        self.host, port = launch.parse_listen_flag(listen)
        self.port = port
        self.gpus = gpus
        self.budget_w = power_budget_watts(gpus)
        self.jobs = plan_jobs(gpus)
        self.out = sys.stdout if out is None else out
        self.err = sys.stderr if err is None else err
        self.dir: Path | None = None
        self.agent: Child | None = None
        self.agent_url = ""
        self.dashboard: Child | None = None
        self.job_children: list[Child] = []
        self._seen: dict[int, psutil.Process] = {}
        """Every descendant seen while running (psutil checks a pid's identity on use)."""

    # -------------------------------------------------------------- output
    def _say(self, text: str, *, error: bool = False) -> None:
        stream = self.err if error else self.out
        stream.write(f"wattwarden demo: {text}\n")
        stream.flush()

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        """Start everything, print the URLs, and wait for Ctrl-C/SIGTERM or a child's death."""
        launch.require_streamlit()
        self.port = launch.check_port_free(self.host, self.port)  # port 0: a free one
        _become_subreaper()
        self.dir = Path(tempfile.mkdtemp(prefix="wattwarden-demo-"))
        code = EXIT_FAILURE
        with stop_on_signals() as (stop, _):
            try:
                code = self._run(stop)
            finally:
                stopped_cleanly = self._shutdown()
                shutil.rmtree(self.dir, ignore_errors=True)
                if not stopped_cleanly:
                    code = EXIT_FAILURE
        return code

    def _run(self, stop: threading.Event) -> int:
        assert self.dir is not None
        if not self._start_agent(stop):
            return EXIT_OK if stop.is_set() else EXIT_FAILURE
        for job in self.jobs:
            self.job_children.append(self._start_job(job, 1))
        if not self._start_dashboard(stop):
            return EXIT_OK if stop.is_set() else EXIT_FAILURE
        self._print_block()
        while not stop.wait(0.5):
            self._note_descendants()
            failed = self._check_children()
            if failed is not None:
                self._report_death(failed)
                return EXIT_FAILURE
        return EXIT_OK

    # ------------------------------------------------------------- children
    def _spawn(self, what: str, cmd: list[str], log_name: str) -> Child:
        assert self.dir is not None
        log_path = self.dir / "logs" / log_name
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # Ctrl-C reaches the demo only; it stops each child once
            )
        return Child(what, proc, log_path)

    def _start_agent(self, stop: threading.Event) -> bool:
        """Start the agent; True once its /healthz answers."""
        assert self.dir is not None
        cmd = [
            sys.executable,
            "-m",
            "wattwarden",
            "agent",
            "--backend",
            "sim",
            "--sim",
            str(self.gpus),
            "--sim-model",
            SIM_MODEL,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(self.dir / "state"),
            "--power-budget-watts",
            f"{self.budget_w:g}",
            "--apply",
            "--policy",
            POLICIES,
            "--idle-after-s",
            str(IDLE_AFTER_S),
        ]
        self.agent = agent = self._spawn("the agent", cmd, "agent.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not stop.wait(0.1):  # polling interval
            if agent.proc.poll() is not None:
                self._report_death(agent)
                return False
            if time.monotonic() > deadline:
                self._say(f"the agent did not start within {START_TIMEOUT_S:.0f} s", error=True)
                return False
            if not self.agent_url:
                found = SERVING_LINE.search(agent.log.read_text(errors="replace"))
                if found is None:
                    continue
                self.agent_url = found[1]
            client = AgentClient(self.agent_url, timeout_s=1.0)
            try:
                if client.healthz() == 200:
                    return True
            except AgentError:
                pass
            finally:
                client.close()
        return False

    @property
    def token_file(self) -> Path:
        """The agent's write token."""
        assert self.dir is not None
        return self.dir / "state" / "token"

    def _start_job(self, job: PlacedJob, run: int) -> Child:
        assert self.dir is not None
        name = job.run_name(run)
        kind = job.kind
        worker = [
            sys.executable,
            "-m",
            "wattwarden.demo_worker",
            "--shape",
            kind.shape,
            "--extra-load",
            f"{kind.extra_load:g}",
            "--steps-per-s",
            f"{kind.steps_per_s:g}",
            "--steps",
            str(kind.steps),
            "--samples-per-step",
            str(kind.samples_per_step),
            "--tokens-per-step",
            str(kind.tokens_per_step),
            "--checkpoint",
            str(self.dir / "checkpoints" / f"{name}.json"),
        ]
        cmd = [
            sys.executable,
            "-m",
            "wattwarden",
            "job",
            "run",
            "--name",
            name,
            "--gpu",
            str(job.gpu),
            "--priority",
            kind.priority,
            "--sim-utilization",
            f"{kind.utilization:g}",
            "--agent",
            self.agent_url,
            "--token-file",
            str(self.token_file),
            "--stop-timeout",
            "10",
            "--",
            *worker,
        ]
        child = self._spawn(f"job {name}", cmd, f"job-{name}.log")
        child.job, child.run = job, run
        return child

    def _start_dashboard(self, stop: threading.Event) -> bool:
        """Start the dashboard; True once its health check answers."""
        assert self.dir is not None
        settings = DashboardSettings(agents=(self.agent_url,), token_file=str(self.token_file))
        log_path = self.dir / "logs" / "dashboard.log"
        with open(log_path, "ab") as log:
            proc = launch.serve(
                settings, launch.listen_text(self.host, self.port), stdout=log, stderr=log
            )
        self.dashboard = dashboard = Child("the dashboard", proc, log_path)
        if launch.wait_healthy(proc, timeout_s=START_TIMEOUT_S, stop=stop):
            return True
        if stop.is_set():
            return False
        if proc.poll() is not None:
            self._report_death(dashboard)
        else:
            self._say(f"the dashboard did not answer within {START_TIMEOUT_S:.0f} s", error=True)
        return False

    def _children(self) -> list[Child]:
        return [c for c in (self.agent, self.dashboard, *self.job_children) if c is not None]

    def _check_children(self) -> Child | None:
        """A child that died unexpectedly; a batch job that finished is started again."""
        for i, child in enumerate(self.job_children):
            code = child.proc.poll()
            if code is None:
                continue
            job = child.job
            if job is not None and job.kind.steps and code == 0:
                nxt = self._start_job(job, child.run + 1)
                self.job_children[i] = nxt
                self._say(
                    f"job {job.run_name(child.run)} finished its {job.kind.steps} steps; "
                    f"running it again as {job.run_name(child.run + 1)}"
                )
                continue
            return child
        for server in (self.agent, self.dashboard):
            if server is not None and server.proc.poll() is not None:
                return server
        return None

    def _report_death(self, child: Child) -> None:
        code = child.proc.returncode
        self._say(
            f"{child.what} exited unexpectedly ({_exit_text(code)}); stopping the rest", error=True
        )
        tail = _tail(child.log)
        if tail:
            self.err.write("".join(f"  | {line}\n" for line in tail))
            self.err.flush()

    # ----------------------------------------------------------- the block
    def _print_block(self) -> None:
        assert self.dir is not None and self.dashboard is not None
        url = launch.dashboard_url(self.host, self.port)
        default_total = self.budget_w / BUDGET_FRACTION
        busy = {j.gpu for j in self.jobs}
        idle = [str(i) for i in range(self.gpus) if i not in busy]
        lines = [
            f"wattwarden demo: {self.gpus} simulated {SIM_MODEL} GPU(s), "
            "the policy engine on a budget, simulated jobs",
            "",
            f"  Dashboard  {url}",
            f"  Agent      {self.agent_url}  (write token in {self.token_file})",
            f"  Budget     {self.budget_w:.0f} W, {BUDGET_FRACTION:.0%} of the GPUs' "
            f"{default_total:.0f} W default limits; policies {POLICIES.replace(',', ', ')}; "
            "mode apply",
        ]
        shown = self.jobs[:12]
        for n, job in enumerate(shown):
            label = "Jobs" if n == 0 else ""
            lines.append(
                f"  {label:<9}  {job.run_name(1):<16} GPU {job.gpu:<3} {job.kind.priority:<7}"
                f"{job.kind.shape:<8} {job.kind.what}"
            )
        if len(self.jobs) > len(shown):
            lines.append(f"  {'':<9}  ... and {len(self.jobs) - len(shown)} more")
        if idle:
            lines.append(f"  Idle       GPU {', '.join(idle)} (capped after {IDLE_AFTER_S} s idle)")
        lines += [
            f"  Files      {self.dir} (logs; removed on exit)",
            "",
            "Ctrl-C stops everything.",
        ]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    # ------------------------------------------------------------- shutdown
    def _note_descendants(self) -> None:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process().children(recursive=True):
                self._seen.setdefault(p.pid, p)

    def _shutdown(self) -> bool:
        """Stop jobs, then the dashboard, then the agent; end every descendant seen.

        True when the agent exited 0 (it restored the power limits it changed).
        """
        self._note_descendants()
        jobs = [c for c in self.job_children if c.proc.poll() is None]
        for c in jobs:  # the supervisor forwards SIGTERM to its job, then unregisters it
            _signal(c.proc, signal.SIGTERM)
        _wait_all((c.proc for c in jobs), JOB_STOP_TIMEOUT_S)
        if self.dashboard is not None:
            launch.stop(self.dashboard.proc)
        agent_ok = True
        if self.agent is not None:
            _signal(self.agent.proc, signal.SIGTERM)
            _wait_all([self.agent.proc], AGENT_STOP_TIMEOUT_S)
            agent_ok = self.agent.proc.returncode == 0
        self._note_descendants()
        self._end_the_rest()
        if self.agent is not None and agent_ok:
            self._say_limits()
        elif self.agent is not None:
            self._say(
                f"the agent did not stop cleanly ({_exit_text(self.agent.proc.returncode)})",
                error=True,
            )
        return agent_ok

    def _end_the_rest(self) -> None:
        """SIGKILL whatever of the demo's processes is still there, and reap it."""
        for c in self._children():
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.kill()
            c.proc.wait()
        direct = {c.proc.pid for c in self._children()}
        left = []
        for pid, p in self._seen.items():
            if pid in direct:
                continue
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
                    left.append(p)
        psutil.wait_procs(left, timeout=5)

    def _say_limits(self) -> None:
        """Whether the simulated driver holds every GPU's default limit again."""
        from wattwarden.hardware.sim.models import MODELS  # noqa: PLC0415 - the demo's model

        assert self.dir is not None
        try:
            data = json.loads((self.dir / "state" / "sim" / "driver-state.json").read_text())
            gpus = data["gpus"]
        except (OSError, ValueError, KeyError) as e:
            self._say(f"cannot read the simulated driver's limits: {e}", error=True)
            return
        off = [
            f"GPU {i} at {g['power_limit_w']:.0f} W"
            for i, g in enumerate(gpus)
            if abs(g["power_limit_w"] - MODELS[g["model"]].power_default_w) > 0.5
        ]
        if off:
            self._say("power limits not at their defaults: " + ", ".join(off), error=True)
        else:
            self._say(f"stopped; power limits back at their defaults on all {len(gpus)} GPU(s)")


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _wait_all(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(deadline - time.monotonic(), 0.0))


def run_demo(listen: str, gpus: int) -> int:
    """``wattwarden demo``: the exit code (ConfigError for bad flags, raised)."""
    demo = Demo(listen, gpus)
    try:
        return demo.run()
    except launch.StreamlitMissing as e:
        print(f"wattwarden demo: {e}", file=sys.stderr)
        return EXIT_FAILURE
