"""Helpers for the deployment-kit tests: test copies of deploy/ configs, a real Prometheus and
Alertmanager on loopback, a webhook receiver, and the PromQL found in the rules and the dashboard.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from helpers import free_port, http_get, require_binary, wait_for

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "wattwarden.json"
RUNBOOK_MD = DEPLOY / "RUNBOOK.md"
AGENT_JOB = "wattwarden"


def load_yaml(path: Path) -> Any:
    """Parse one YAML document."""
    with open(path) as f:
        return yaml.safe_load(f)


def rule_files() -> list[Path]:
    """The rule files prometheus.yml loads, as absolute paths (relative to prometheus.yml)."""
    config = load_yaml(PROMETHEUS_YML)
    return [(PROMETHEUS_DIR / p).resolve() for p in config["rule_files"]]


def rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of the loaded rule files."""
    out: list[dict[str, Any]] = []
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            out.extend(group["rules"])
    return out


def alert_rules() -> list[dict[str, Any]]:
    """The alerting rules."""
    return [r for r in rules() if "alert" in r]


# ------------------------------------------------------------------ test copies of the configs
def prometheus_test_config(
    *, agent_target: str, alertmanager_target: str | None, interval: str = "1s"
) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml for a test: fast intervals, loopback targets.

    The rule files are ours, unchanged (absolute paths to them); the wattwarden scrape job keeps
    its relabelling and only has its service discovery replaced by the agent's address.
    """
    config = copy.deepcopy(load_yaml(PROMETHEUS_YML))
    config["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    config["rule_files"] = [str(p) for p in rule_files()]
    if alertmanager_target is None:
        config.pop("alerting", None)
    else:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [alertmanager_target]}]}]
        }
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == AGENT_JOB]
    assert len(jobs) == 1, f"prometheus.yml must have one scrape job named {AGENT_JOB!r}"
    job = jobs[0]
    for key in list(job):
        if key.endswith("_sd_configs") or key == "static_configs":
            del job[key]
    job["static_configs"] = [{"targets": [agent_target]}]
    job.update(scrape_interval=interval, scrape_timeout=interval)
    config["scrape_configs"] = [job]
    return config


def _routes(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield route
    for child in route.get("routes", []):
        yield from _routes(child)


def alertmanager_test_config(webhook_base: str, *, wait: str = "1s") -> dict[str, Any]:
    """deploy/alertmanager/alertmanager.yml for a test.

    Every webhook URL points at ``webhook_base/<receiver name>``, and grouping waits are short;
    routes, grouping labels and inhibition rules stay as they are.
    """
    config = copy.deepcopy(load_yaml(ALERTMANAGER_YML))
    hooks = 0
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{webhook_base}/{receiver['name']}"
            hooks += 1
    assert hooks, "alertmanager.yml has no webhook receiver to point at the test"
    for route in _routes(config["route"]):
        for key in ("group_wait", "group_interval"):
            if key in route or route is config["route"]:
                route[key] = wait
    return config


def write_yaml(path: Path, data: Any) -> Path:
    """Write YAML and return the path."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------ servers
@dataclass
class Server:
    """An external server process on loopback."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        """The end of its log, for failure messages."""
        return self.log_path.read_text(errors="replace")[-chars:]


@contextmanager
def _serve(cmd: list[str], url: str, log_path: Path) -> Iterator[Server]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        server = Server(proc, url, log_path)
        try:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"{cmd[0]} exited {proc.returncode}:\n{server.log_tail()}")
                return http_get(url + "/-/ready", timeout_s=1)[0] == 200

            wait_for(ready, timeout_s=60, what=f"{cmd[0]} /-/ready")
            yield server
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def run_prometheus(binary: str, config: dict[str, Any], workdir: Path) -> Iterator[Server]:
    """A Prometheus with this config, its TSDB under ``workdir``, on a free loopback port."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = write_yaml(workdir / "prometheus.yml", config)
    port = free_port()
    cmd = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=info",
    ]
    with _serve(cmd, f"http://127.0.0.1:{port}", workdir / "prometheus.log") as server:
        yield server


@contextmanager
def run_alertmanager(binary: str, config: dict[str, Any], workdir: Path) -> Iterator[Server]:
    """An Alertmanager with this config, clustering off, state under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = write_yaml(workdir / "alertmanager.yml", config)
    port = free_port()
    cmd = [
        binary,
        f"--config.file={config_path}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=info",
    ]
    with _serve(cmd, f"http://127.0.0.1:{port}", workdir / "alertmanager.log") as server:
        yield server


def alertmanager_binary() -> str:
    """Alertmanager: ``alertmanager`` upstream, ``prometheus-alertmanager`` on Debian/Ubuntu."""
    return shutil.which("alertmanager") or require_binary("prometheus-alertmanager")


def prom_query(base: str, expr: str) -> dict[str, Any]:
    """Run an instant query; return the decoded answer whatever its status."""
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    _, body = http_get(url, timeout_s=10)
    answer: dict[str, Any] = json.loads(body)
    return answer


# ------------------------------------------------------------------ webhook receiver
@dataclass(frozen=True)
class Notification:
    """One alert out of a webhook notification, with the receiver path it came to."""

    receiver: str
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass
class WebhookReceiver:
    """An HTTP server on loopback recording Alertmanager webhook notifications."""

    notifications: list[Notification] = field(default_factory=list)
    payloads: list[dict[str, Any]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _record(self, path: str, payload: dict[str, Any]) -> None:
        receiver = path.strip("/")
        with self._cond:
            self.payloads.append(payload)
            for alert in payload.get("alerts", []):
                self.notifications.append(
                    Notification(
                        receiver=receiver,
                        status=str(alert["status"]),
                        labels=dict(alert["labels"]),
                        annotations=dict(alert.get("annotations", {})),
                    )
                )
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[Notification], bool], *, timeout_s: float, what: str
    ) -> Notification:
        """Block until a notification matching ``predicate`` has come; fail at the deadline."""
        found: list[Notification] = []

        def seen() -> bool:
            found[:] = [n for n in self.notifications if predicate(n)]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(seen, timeout=timeout_s):
                got = [
                    (n.receiver, n.status, n.labels.get("alertname"), n.labels.get("gpu"))
                    for n in self.notifications
                ]
                raise AssertionError(f"no notification of {what} within {timeout_s} s; got {got}")
        return found[0]

    @contextmanager
    def running(self) -> Iterator[WebhookReceiver]:
        """Serve on 127.0.0.1 on a thread while in the block."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(length) or b"{}")
                receiver._record(self.path, payload)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join(timeout=10)


# ------------------------------------------------------------------ dashboard PromQL
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard model."""
    with open(DASHBOARD_JSON) as f:
        model: dict[str, Any] = json.load(f)
    return model


def dashboard_panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in model.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_targets(model: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every Prometheus query in the dashboard."""
    return [
        (p.get("title", ""), t)
        for p in dashboard_panels(model)
        for t in p.get("targets", [])
        if "expr" in t
    ]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]); fail on one not in ``values``."""

    def repl(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name not in values:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(repl, expr)
