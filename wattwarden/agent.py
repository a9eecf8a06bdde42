"""The node agent: picks a GPU backend, wires collectors, store, exporters and the HTTP API."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from wattwarden.api.server import AgentContext, ApiServer, energy_json
from wattwarden.api.token import TokenError, ensure_token
from wattwarden.api.webconfig import load_web_config
from wattwarden.collectors.base import Collector
from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import Job, JobRegistry, process_alive
from wattwarden.collectors.rapl import RaplSample
from wattwarden.collectors.registry import open_collectors
from wattwarden.collectors.sampler import Cadence, Sampler
from wattwarden.collectors.store import MetricStore, StoreSnapshot
from wattwarden.config import AgentConfig, ConfigError
from wattwarden.exporters.otlp import OtlpExporter, otlp_metric_families
from wattwarden.exporters.prometheus import StoreCollector, job_families, make_registry
from wattwarden.hardware.device import GpuBackend
from wattwarden.hardware.errors import HardwareUnavailable
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.policies.actuator import JournalError, LimitActuator
from wattwarden.policies.control import PolicyLoop, PolicySettings
from wattwarden.policies.migration import Migrator

if TYPE_CHECKING:  # the simulator is loaded only when it is chosen (open_backend)
    from wattwarden.hardware.sim.fleet import SimFleet

log = logging.getLogger("wattwarden.agent")

AUTO_SIM_GPUS = 8
REAP_EVERY_S = 1.0
JOB_SILENCE_S = 5.0
SIM_JOB_UTILIZATION = 0.8  # a simulated job's GPU load unless it registers one (--sim-utilization)
SIM_JOB_MEMORY_BYTES = 20 * 2**30
SIM_SAVE_EVERY_S = 10.0
JOURNAL_FILE = "journal.sqlite3"
LOCK_FILE = "lock"


class BackendError(Exception):
    """The GPU backend asked for cannot run here."""


@dataclass
class Backend:
    """The chosen GPU backend, and the simulated fleet behind it if any."""

    backend: GpuBackend
    fleet: SimFleet | None
    description: str


def open_otlp(cfg: AgentConfig, store: MetricStore) -> OtlpExporter | None:
    """The OTLP exporter, when an endpoint is configured (flag, config or OTEL_* variable)."""
    env = os.environ
    if not (
        cfg.otlp_endpoint
        or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        return None
    try:
        return OtlpExporter(
            store,
            endpoint=cfg.otlp_endpoint,
            headers=cfg.otlp_headers,
            interval_s=cfg.otlp_interval_s,
            host_name=node_name(),
        )
    except ValueError as e:
        raise ConfigError(f"OTLP: {e}") from e


def node_name() -> str:
    """The node's name: ``$NODE_NAME``, else the hostname.

    In Kubernetes the hostname is the pod's; the DaemonSet sets NODE_NAME from the downward API.
    """
    return os.environ.get("NODE_NAME") or socket.gethostname()


def open_backend(cfg: AgentConfig) -> Backend:
    """NVML if a driver is present (or ``--sim N``), else a simulated fleet of 8 GPUs.

    The simulated fleet is read through the fake NVML library and the same NVML backend code.
    """
    state_dir = cfg.resolved_state_dir
    if cfg.sim is None and cfg.backend != "sim":
        try:
            backend = NvmlBackend()
        except HardwareUnavailable as e:
            if cfg.backend == "nvml":
                raise BackendError(f"backend nvml: no usable NVIDIA driver ({e})") from e
            reason = f"no NVIDIA driver found ({e})"
        else:
            names = sorted({d.info().name for d in backend.devices()}) or ["no GPUs"]
            return Backend(
                backend, None, f"NVML: {len(backend.devices())} GPU(s): {', '.join(names)}"
            )
        count = AUTO_SIM_GPUS
    else:
        reason = "simulation asked for"
        count = cfg.sim if cfg.sim is not None else AUTO_SIM_GPUS
    from wattwarden.hardware.sim.fake_nvml import install_fake_nvml  # noqa: PLC0415 - sim only
    from wattwarden.hardware.sim.fleet import SimFleet  # noqa: PLC0415 - sim only

    fleet = SimFleet(count, model=cfg.sim_model, state_dir=state_dir)
    install_fake_nvml(fleet)
    backend = NvmlBackend()
    return Backend(
        backend,
        fleet,
        f"{reason}: simulated fleet of {count} x {fleet.gpus[0].spec.name} "
        f"(driver state in {state_dir / 'sim'})",
    )


class StateDirLock:
    """An exclusive lock on ``<state-dir>/lock``, held for the agent's life.

    One agent per state dir: two would share one journal, and the one that exits first would
    forget (or the other restore) limits the other set. The holder's pid is written in the file
    so a second agent can name it. The lock goes with the process, even on ``kill -9``.
    """

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(f"state dir {state_dir} is not writable: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise ConfigError(
                f"state dir {state_dir} is in use by another wattwarden agent{pid}; "
                "give each agent its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Let the next agent in; safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Agent:
    """A running node agent. ``start()``, then ``close()`` (restores any limit it changed)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        state_dir = cfg.resolved_state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise ConfigError(f"state dir {state_dir}: {e.strerror or e}") from e
        # before the journal is opened or the simulated driver state is touched
        self._lock = StateDirLock(state_dir)
        try:
            token = ensure_token(state_dir)
        except TokenError as e:
            raise ConfigError(str(e)) from e
        web = None
        if cfg.web_config is not None:
            try:
                web = load_web_config(cfg.web_config)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        host, port = cfg.host_port
        try:  # bind first: a taken port is a usage error, found before touching any GPU
            self.server = ApiServer(host, port, None if web is None else web.ssl_context)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        self.opened = open_backend(cfg)
        self.backend_kind = "sim" if self.opened.fleet is not None else "nvml"
        interval_s = cfg.interval_ms / 1000.0
        self.store = MetricStore(window_s=cfg.window_s, interval_s=interval_s)
        self.gpu_collector = GpuCollector(self.opened.backend)
        opened = open_collectors(cfg)
        for reason in opened.absent:
            log.info("%s", reason)
        collectors: list[Collector] = [self.gpu_collector, *opened.collectors]
        self._reap_cadence = Cadence(REAP_EVERY_S)
        self._save_cadence = Cadence(SIM_SAVE_EVERY_S)
        self.jobs = JobRegistry(pid_alive=process_alive)
        if self.opened.fleet is not None:
            self.jobs.add_listener(self._place_on_sim)
        self.sampler = Sampler(self.store, collectors, interval_s=interval_s, on_pass=self._on_pass)
        try:
            self.actuator = LimitActuator(
                self.opened.backend.devices(),
                state_dir / JOURNAL_FILE,
                # below the period, so the engine's own changes are never refused as too soon
                min_interval_s=min(1.0, 0.5 * cfg.policy_period_s),
            )
        except JournalError as e:
            raise ConfigError(str(e)) from e
        failures = self.actuator.recover()
        if failures:
            log.error("%d power limit(s) could not be restored; see above", len(failures))
        self.policy = PolicyLoop(
            store=self.store,
            jobs=self.jobs,
            actuator=self.actuator,
            settings=PolicySettings(
                thermal_margin_c=cfg.thermal_margin_c,
                idle_after_s=cfg.idle_after_s,
                tune_eta=cfg.tune_eta,
                max_slowdown=cfg.max_slowdown,
                tune_all_jobs=cfg.tune_all_jobs,
            ),
            policies=cfg.policy,
            budget_w=cfg.power_budget_watts,
            mode="apply" if cfg.apply else "dry_run",
            period_s=cfg.policy_period_s,
            migrator=Migrator(),
            journal_retention_s=cfg.journal_retention_s,
        )
        self.otlp = open_otlp(cfg, self.store)
        otlp_families = None if self.otlp is None else otlp_metric_families(self.otlp)

        def extra(snap: StoreSnapshot) -> Iterator[Metric]:
            yield from job_families(self.jobs, snap)
            if otlp_families is not None:
                yield from otlp_families(snap)

        self.registry = make_registry(
            StoreCollector(self.store, backend=self.backend_kind, extra=extra)
        )
        self.context = AgentContext(
            store=self.store,
            registry=self.registry,
            token=token,
            backend=self.backend_kind,
            node=node_name(),
            interval_s=interval_s,
            actuator=self.actuator,
            fleet=self.opened.fleet,
            mode="apply" if cfg.apply else "dry_run",
            jobs=self.jobs,
            energy=self._read_energy,
            web=web,
            policy=self.policy,
        )
        self._closed = threading.Event()

    def _on_pass(self) -> None:
        self.jobs.attribute(self.gpu_collector.latest)
        if self._reap_cadence.due():
            self._reap_jobs()
        fleet = self.opened.fleet
        if fleet is not None and self._save_cadence.due():
            fleet.save()

    def _reap_jobs(self) -> None:
        """Forget jobs whose process is gone and whose supervisor went silent.

        Both must hold: in a container the agent may not see the job's pid, but a live
        supervisor polls its job every second.
        """
        self.jobs.reap(JOB_SILENCE_S)  # one job's failure never stops the others

    def _place_on_sim(self, old: Job | None, new: Job | None) -> None:
        """On the simulated fleet a job's process drives its GPU's load, and moves with it."""
        from wattwarden.hardware.sim.gpu import SimProcess  # noqa: PLC0415 - sim only

        fleet = self.opened.fleet
        assert fleet is not None
        if old is not None and 0 <= old.gpu < len(fleet):
            fleet[old.gpu].remove_process(old.pid)
        if new is not None and 0 <= new.gpu < len(fleet):
            asked = new.utilization is not None
            util = new.utilization if new.utilization is not None else SIM_JOB_UTILIZATION
            fleet[new.gpu].add_process(SimProcess(new.pid, util, SIM_JOB_MEMORY_BYTES, new.name))
            log.info(
                "job %s placed on simulated GPU %d at %.0f%% utilization (%s)",
                new.name,
                new.gpu,
                util * 100,
                "as registered" if asked else "the default; job run --sim-utilization sets it",
            )

    def _read_energy(self) -> dict[str, Any]:
        """GPU energy counters read now (not from the store), for EnergyMeter windows."""
        rapl = self.store.snapshot().samples(RaplSample)
        return energy_json(self.opened.backend.devices(), rapl)

    @property
    def url(self) -> str:
        """Base URL the API listens on."""
        host, port = self.server.address
        web = self.context.web
        scheme = "https" if web is not None and web.ssl_context is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def start(self) -> None:
        """Take a first sample (so the first scrape has data), then serve."""
        self.sampler.run_once()
        self.sampler.start()
        self.policy.start()
        self.server.start(self.context)
        if self.otlp is not None:
            self.otlp.start()
            log.info("exporting OTLP metrics to %s", self.otlp.endpoint)
        status = self.policy.status()
        on = [name for name, active in status.policies.items() if active]
        budget = status.power_budget_w
        log.info(
            "policy engine: %s every %g s, budget %s, mode %s",
            ", ".join(on) or "no policy",
            status.period_s,
            "none" if budget is None else f"{budget:.0f} W",
            status.mode,
        )
        log.info(
            "%s; serving %s/metrics every %d ms, mode %s",
            self.opened.description,
            self.url,
            self.cfg.interval_ms,
            self.context.mode_in_force,
        )

    def close(self) -> None:
        """Stop serving and sampling, restore power limits, persist simulated driver state."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.server.close()
        if self.otlp is not None:
            self.otlp.close()
        self.policy.close()  # before restoring: no period may cap a GPU after its restore
        failures = self.actuator.restore_all()
        self.actuator.close()
        self.sampler.close()  # closes the GPU backend too
        if self.opened.fleet is not None:
            self.opened.fleet.save()
        if failures:
            log.error("exiting with %d power limit(s) not restored (journalled)", len(failures))
        self._lock.release()
