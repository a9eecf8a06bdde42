"""The controller's settings: defaults, then ``--config controller.toml``, then flags.

Each setting is declared once, as a field of :class:`ControllerConfig` made with
:func:`wattwarden.config.setting` (the agent's pattern): its default, its kind (how it is read
and what is allowed), help and metavar. The TOML key is the field's name, the flag is ``--`` and
the name with dashes; the keys, the flags of ``wattwarden controller`` and the validation of
both come from :data:`CONTROLLER_SETTINGS`, read and layered by the agent's own functions
(:func:`wattwarden.config.layered`). Errors are one line naming the key or the flag.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wattwarden.config import (
    LOG_LEVELS,
    Choice,
    ConfigError,
    FilePath,
    Integer,
    Listen,
    Number,
    Setting,
    Switch,
    Text,
    Url,
    layered,
    parse_listen,
    setting,
    settings_of,
)

DEFAULT_LISTEN = "127.0.0.1:9768"
CONTROLLER_ID = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")
"""What the agents accept as a controller id (the lease contract)."""
SCHEDULERS = ("none", "kubernetes", "slurm")


@dataclass(frozen=True, slots=True)
class ControllerId:
    """1 to 128 of ``A-Z a-z 0-9 _ . : @ / -``: the agents' lease contract."""

    def parse(self, text: str) -> str:
        """See :class:`wattwarden.config.Kind`."""
        return text

    def check(self, value: Any) -> str:
        """See :class:`wattwarden.config.Kind`."""
        if not isinstance(value, str) or not CONTROLLER_ID.match(value):
            raise ValueError(
                f"must be 1 to 128 of the characters A-Z a-z 0-9 _ . : @ / -, got {value!r}"
            )
        return value


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """Everything ``wattwarden controller`` runs with; each field is a setting, in --help order."""

    prometheus: str | None = setting(
        None,
        Url(),
        "Prometheus HTTP API to read the fleet from (or Thanos Query, Mimir, VictoriaMetrics); "
        "required",
        "URL",
    )
    budget_watts: float | None = setting(
        None, Number(1.0, 1e9), "the fleet's GPU power budget, split among nodes; required", "W"
    )
    apply: bool = setting(
        False, Switch(), "push leases to the agents (default: dry-run: compute, log and export)"
    )
    period_s: float = setting(
        5.0,
        Number(0.5, 3600.0),
        "seconds between periods; each renews every lease (default 5)",
        "S",
    )
    lease_s: float = setting(
        30.0,
        Number(1.0, 3600.0),
        "a lease's time to live: an agent not renewed in time falls back to its local budget "
        "(default 30; at least twice the period)",
        "S",
    )
    job: str = setting(
        "wattwarden", Text(), "the agents' scrape job in Prometheus (default wattwarden)", "NAME"
    )
    id: str | None = setting(
        None,
        ControllerId(),
        "this controller's id in the leases (default: the host name); another id waits for "
        "this one's leases to expire",
        "ID",
    )
    token_dir: Path | None = setting(
        None, FilePath(), "agents' write tokens, one file per agent named HOST:PORT", "DIR"
    )
    token_file: Path | None = setting(
        None, FilePath(), "one write token shared by every agent", "FILE"
    )
    listen: str = setting(
        DEFAULT_LISTEN,
        Listen(),
        f"address of the controller's own /metrics and /healthz (default {DEFAULT_LISTEN})",
        "HOST:PORT",
    )
    concurrency: int = setting(
        64, Integer(1, 1024), "most pushes and agent reads in flight at once (default 64)", "N"
    )
    timeout_s: float = setting(
        2.0,
        Number(0.1, 60.0),
        "timeout of every call to Prometheus and to an agent, in seconds (default 2)",
        "S",
    )
    scheduler: str = setting(
        "none",
        Choice(SCHEDULERS),
        "move a low-priority job off a node starving a high-priority one: none (default), "
        "kubernetes (Eviction API), slurm (scontrol requeue)",
        "{" + ",".join(SCHEDULERS) + "}",
    )
    kubernetes_api: str | None = setting(
        None,
        Url(),
        "the Kubernetes API server for --scheduler kubernetes when the controller runs outside "
        "the cluster (default: in a pod, from its service account)",
        "URL",
    )
    kubernetes_token_file: Path | None = setting(
        None,
        FilePath(),
        "file holding a bearer token for --kubernetes-api (re-read at each eviction)",
        "FILE",
    )
    kubernetes_ca_file: Path | None = setting(
        None, FilePath(), "CA bundle to verify --kubernetes-api's TLS certificate", "FILE"
    )
    stale_after_s: float | None = setting(
        None,
        Number(1.0, 86400.0),
        "a node whose series are older is stale (default: 3 periods or 2 scrape intervals, "
        "the larger)",
        "S",
    )
    deadband_w: float = setting(
        50.0,
        Number(0.0, 1e6),
        "a node's lease moves only when its share differs by more than this or "
        "--deadband-fraction of its ceiling, the larger (default 50)",
        "W",
    )
    deadband_fraction: float = setting(
        0.02, Number(0.0, 0.5), "see --deadband-w (default 0.02)", "F"
    )
    migration_cooldown_s: float = setting(
        600.0,
        Number(0.0, 86400.0),
        "a job asked to move is not asked again for this long (default 600)",
        "S",
    )
    agent_port: int = setting(
        9767,
        Integer(1, 65535),
        "the agents' port where neither the targets API nor the instance label gives one "
        "(default 9767)",
        "PORT",
    )
    agent_scheme: str = setting(
        "http",
        Choice(("http", "https")),
        "how to reach the agents' API (default http)",
        "{http,https}",
    )
    agent_ca_file: Path | None = setting(
        None, FilePath(), "CA bundle to verify the agents' TLS certificates", "FILE"
    )
    agent_basic_auth_user: str | None = setting(
        None, Text(), "basic auth user for reading the agents' API", "USER"
    )
    agent_basic_auth_password_file: Path | None = setting(
        None, FilePath(), "file holding that user's password", "FILE"
    )
    prometheus_ca_file: Path | None = setting(
        None, FilePath(), "CA bundle to verify Prometheus's TLS certificate", "FILE"
    )
    prometheus_basic_auth_user: str | None = setting(
        None, Text(), "basic auth user for Prometheus", "USER"
    )
    prometheus_basic_auth_password_file: Path | None = setting(
        None, FilePath(), "file holding that user's password", "FILE"
    )
    prometheus_bearer_token_file: Path | None = setting(
        None, FilePath(), "file holding a bearer token for Prometheus", "FILE"
    )
    release_on_exit: bool = setting(
        False,
        Switch(),
        "hand the leases back on SIGTERM/SIGINT (default: leave them to expire, so a restart "
        "changes no node's budget)",
    )
    log_level: str = setting("info", Choice(LOG_LEVELS), metavar="{" + ",".join(LOG_LEVELS) + "}")

    @property
    def controller_id(self) -> str:
        """``id``, or the host name."""
        return self.id if self.id is not None else default_id()


def default_id() -> str:
    """The host name, as a controller id (characters outside the contract become ``-``)."""
    name = re.sub(r"[^A-Za-z0-9_.:@/-]", "-", socket.gethostname())[:128]
    return name or "wattwarden-controller"


#: Every setting by name (the TOML key), in ``--help`` order.
CONTROLLER_SETTINGS: dict[str, Setting] = settings_of(ControllerConfig)


def build_config(file: Path | None, flags: Mapping[str, Any]) -> ControllerConfig:
    """Defaults, then the file, then the flags given (not None); then the checks across keys."""
    values, where = layered(file, flags, CONTROLLER_SETTINGS)
    cfg = replace(ControllerConfig(), **values)
    _check(cfg, where)
    return cfg


def _named(key: str, where: Mapping[str, str]) -> str:
    return where.get(key, CONTROLLER_SETTINGS[key].flag)


def _check(cfg: ControllerConfig, where: Mapping[str, str]) -> None:
    """Refuse missing required settings and combinations that cannot work, naming them."""
    for key in ("prometheus", "budget_watts"):
        if getattr(cfg, key) is None:
            raise ConfigError(
                f"{CONTROLLER_SETTINGS[key].flag} is required (or the key {key!r} in --config)"
            )
    if cfg.lease_s < 2 * cfg.period_s:
        raise ConfigError(
            f"{_named('lease_s', where)} must be at least twice {_named('period_s', where)} "
            f"({cfg.period_s:g} s): a lease must outlive a missed renewal"
        )
    if cfg.token_dir is not None and cfg.token_file is not None:
        raise ConfigError(
            f"{_named('token_dir', where)} and {_named('token_file', where)} exclude each "
            "other: give one"
        )
    for prefix in ("agent", "prometheus"):
        user, password = f"{prefix}_basic_auth_user", f"{prefix}_basic_auth_password_file"
        if (getattr(cfg, user) is None) != (getattr(cfg, password) is None):
            raise ConfigError(
                f"{_named(user, where) if getattr(cfg, user) else _named(password, where)} "
                f"needs {CONTROLLER_SETTINGS[password if getattr(cfg, user) else user].flag} too"
            )
    if cfg.prometheus_basic_auth_user is not None and cfg.prometheus_bearer_token_file:
        raise ConfigError(
            f"{_named('prometheus_basic_auth_user', where)} and "
            f"{_named('prometheus_bearer_token_file', where)} exclude each other: give one"
        )
    if cfg.agent_ca_file is not None and cfg.agent_scheme != "https":
        raise ConfigError(
            f"{_named('agent_ca_file', where)} needs --agent-scheme https (it verifies TLS)"
        )
    if cfg.prometheus_ca_file is not None and not str(cfg.prometheus).startswith("https://"):
        raise ConfigError(
            f"{_named('prometheus_ca_file', where)} needs an https:// --prometheus URL"
        )
    kubernetes = ("kubernetes_api", "kubernetes_token_file", "kubernetes_ca_file")
    for key in kubernetes:
        if getattr(cfg, key) is not None and cfg.scheduler != "kubernetes":
            raise ConfigError(f"{_named(key, where)} needs --scheduler kubernetes")
    for key in kubernetes[1:]:
        if getattr(cfg, key) is not None and cfg.kubernetes_api is None:
            raise ConfigError(
                f"{_named(key, where)} needs --kubernetes-api (in a pod, the service "
                "account's token and CA are used)"
            )
    if cfg.kubernetes_ca_file is not None and not str(cfg.kubernetes_api).startswith("https://"):
        raise ConfigError(
            f"{_named('kubernetes_ca_file', where)} needs an https:// --kubernetes-api URL"
        )
    parse_listen(cfg.listen)


def read_secret(path: Path, key: str) -> str:
    """A password or token file's content, stripped; ConfigError naming the flag and the file."""
    flag = CONTROLLER_SETTINGS[key].flag
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{flag} {path}: the file is empty")
    return text
