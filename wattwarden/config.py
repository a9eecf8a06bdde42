"""Agent configuration: defaults, then a TOML file, then command-line flags.

Each setting is declared once, as a field of :class:`AgentConfig` made by :func:`setting`: its
default, its :class:`Kind` (how its value is read and what is allowed), help and metavar. Its
TOML key is the field's name and its flag ``--`` + the name with dashes; the keys ``--config``
accepts, the flags of ``wattwarden agent`` and the validation of both come from :data:`SETTINGS`.
Validation errors are one line naming the key or flag and the problem.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from wattwarden.hardware.sim.models import MODELS
from wattwarden.policies.control import (
    BUDGET_RANGE_W,
    DEFAULT_PERIOD_S,
    DEFAULT_RETENTION_S,
    PERIOD_RANGE_S,
    parse_policies,
)

DEFAULT_PORT = 9767
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
LOG_LEVELS = ("debug", "info", "warning", "error")

T = TypeVar("T")


class ConfigError(Exception):
    """Bad configuration or usage; the message is one line naming the key and the problem."""


def default_state_dir() -> Path:
    """The default state directory.

    systemd's ``$STATE_DIRECTORY``, else ``$XDG_STATE_HOME/wattwarden``, else
    ``~/.local/state/wattwarden``.
    """
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "wattwarden"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; the host must be an IP address or ``localhost``."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host must be an IP address or localhost, got {host!r}") from None
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port must be a number, got {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be within 0..65535, got {port}")
    return host, port


def parse_int(text: str) -> int:
    """A flag's text as an integer; ValueError says what is wrong."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def parse_number(text: str) -> float:
    """A flag's text as a number; ValueError says what is wrong."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


# ------------------------------------------------------------------ kinds of setting
class Kind(Protocol):
    """How one setting's value is read from a flag and checked, whichever way it came."""

    def parse(self, text: str) -> Any:
        """A flag's text as the value :meth:`check` takes; ValueError says what is wrong."""

    def check(self, value: Any) -> Any:
        """A TOML value, or a flag's parsed value, as the config value; ValueError says why not."""


def _string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class Integer:
    """An integer within ``lo..hi``."""

    lo: int
    hi: int

    def parse(self, text: str) -> int:
        """See :class:`Kind`."""
        return parse_int(text)

    def check(self, value: Any) -> int:
        """See :class:`Kind`."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if not self.lo <= value <= self.hi:
            raise ValueError(f"must be within {self.lo}..{self.hi}, got {value}")
        return value


@dataclass(frozen=True, slots=True)
class Number:
    """A number (integer or float) within ``lo..hi``, kept as a float."""

    lo: float
    hi: float

    def parse(self, text: str) -> float:
        """See :class:`Kind`."""
        return parse_number(text)

    def check(self, value: Any) -> float:
        """See :class:`Kind`."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        if not self.lo <= value <= self.hi:
            # an integer as it was written: one too large for a float cannot be formatted as one
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise ValueError(f"must be within {self.lo:g}..{self.hi:g}, got {shown}")
        return float(value)


@dataclass(frozen=True, slots=True)
class Text:
    """A non-empty string."""

    def parse(self, text: str) -> str:
        """See :class:`Kind`."""
        return text

    def check(self, value: Any) -> str:
        """See :class:`Kind`."""
        return _string(value)


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a few words."""

    options: tuple[str, ...]

    def parse(self, text: str) -> str:
        """See :class:`Kind`."""
        return text

    def check(self, value: Any) -> str:
        """See :class:`Kind`."""
        if not isinstance(value, str) or value not in self.options:
            raise ValueError(f"must be one of {', '.join(self.options)}; got {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class Url:
    """An ``http://`` or ``https://`` URL."""

    def parse(self, text: str) -> str:
        """See :class:`Kind`."""
        return text

    def check(self, value: Any) -> str:
        """See :class:`Kind`."""
        s = _string(value)
        if not s.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {s!r}")
        return s


@dataclass(frozen=True, slots=True)
class Listen:
    """``HOST:PORT`` (see :func:`parse_listen`); a flag's text is checked as it is parsed."""

    def parse(self, text: str) -> str:
        """See :class:`Kind`."""
        parse_listen(text)
        return text

    def check(self, value: Any) -> str:
        """See :class:`Kind`."""
        parse_listen(_string(value))
        return str(value)


@dataclass(frozen=True, slots=True)
class FilePath:
    """A path (a non-empty string in TOML)."""

    def parse(self, text: str) -> Path:
        """See :class:`Kind`."""
        return Path(_string(text))

    def check(self, value: Any) -> Path:
        """See :class:`Kind`."""
        return value if isinstance(value, Path) else Path(_string(value))


@dataclass(frozen=True, slots=True)
class Switch:
    """True or false; on the command line ``--name`` and ``--no-name``."""

    def parse(self, text: str) -> bool:
        """See :class:`Kind`; a switch takes no text, so there is none to parse."""
        raise ValueError(f"takes no value, got {text!r}")

    def check(self, value: Any) -> bool:
        """See :class:`Kind`."""
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class PolicyNames:
    """Policy names, each at most once: a TOML list, or a comma-separated string.

    The string form is the flag's (``--policy thermal,budget``); ``none`` in it, or an empty
    TOML list, names none. The API's ``POST /api/v1/policy`` reads them the same way.
    """

    def parse(self, text: str) -> str:
        """See :class:`Kind`."""
        return text

    def check(self, value: Any) -> tuple[str, ...]:
        """See :class:`Kind`."""
        return parse_policies(value)


# ------------------------------------------------------------------ the settings
@dataclass(frozen=True, slots=True)
class Setting:
    """One agent setting: an :class:`AgentConfig` field, a TOML key and a flag."""

    name: str
    """The field's name and the TOML key."""
    default: Any
    kind: Kind
    help: str | None
    metavar: str | None

    @property
    def flag(self) -> str:
        """The command-line flag: ``--`` and the name with dashes."""
        return "--" + self.name.replace("_", "-")


def setting(default: T, kind: Kind, help: str | None = None, metavar: str | None = None) -> T:
    """Declare an :class:`AgentConfig` field as a setting (a TOML key and a flag)."""
    return field(default=default, metadata={"kind": kind, "help": help, "metavar": metavar})


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``wattwarden agent`` runs with; each field is a setting, in ``--help`` order."""

    sim: int | None = setting(None, Integer(1, 64), "simulate N GPUs (1..64)", "N")
    sim_model: str = setting(
        "h100-sxm", Choice(tuple(sorted(MODELS))), "simulated model: h100-sxm (default), a100-sxm"
    )
    backend: str = setting(
        "auto",
        Choice(("auto", "nvml", "sim")),
        "auto (default: NVML if a driver is present, else simulate), nvml (exit 1 without "
        "a driver: for GPU hosts, so a broken driver never looks like a healthy fleet), sim",
    )
    listen: str = setting(
        DEFAULT_LISTEN, Listen(), f"address to serve on (default {DEFAULT_LISTEN})", "HOST:PORT"
    )
    state_dir: Path | None = setting(
        None,
        FilePath(),
        "token, journal and simulated driver state "
        "(default $STATE_DIRECTORY or ~/.local/state/wattwarden)",
        "DIR",
    )
    interval_ms: int = setting(
        100, Integer(10, 60_000), "GPU sampling interval (default 100)", "MS"
    )
    window_s: float = setting(
        15.0,
        Number(1.0, 3600.0),
        "export window for mean/peak power (default 15, the scrape interval)",
        "S",
    )
    rapl_root: Path = setting(
        Path("/sys/class/powercap"),
        FilePath(),
        "powercap sysfs root (default /sys/class/powercap)",
        "DIR",
    )
    power_budget_watts: float | None = setting(
        None,
        Number(*BUDGET_RANGE_W),
        "node power budget: budget capping keeps the GPUs under it (also exported, for the "
        "over-budget alert)",
        "W",
    )
    apply: bool = setting(
        False, Switch(), "act on power limits (default: dry-run); --no-apply forces dry-run"
    )
    policy: tuple[str, ...] | None = setting(
        None,
        PolicyNames(),
        "policies to run: thermal, budget, idle, tuner, or none (default: thermal, and budget "
        "when a budget is set)",
        "P,...",
    )
    policy_period_s: float = setting(
        DEFAULT_PERIOD_S,
        Number(*PERIOD_RANGE_S),
        f"policy engine period (default {DEFAULT_PERIOD_S:g})",
        "S",
    )
    thermal_margin_c: float = setting(
        5.0,
        Number(0.5, 30.0),
        "thermal guard: lower a GPU's limit once it is this close to its throttle point "
        "(default 5)",
        "C",
    )
    idle_after_s: float = setting(
        300.0, Number(1.0, 86400.0), "idle capping: cap a GPU idle this long (default 300)", "S"
    )
    tune_eta: float = setting(
        0.5,
        Number(0.0, 1.0),
        "energy tuner: weight of energy against time in the cost it minimises (default 0.5)",
        "ETA",
    )
    max_slowdown: float | None = setting(
        None,
        Number(0.0, 1.0),
        "energy tuner: the most a job's step may slow down, e.g. 0.05 (default: no bound)",
        "F",
    )
    tune_all_jobs: bool = setting(
        False,
        Switch(),
        "energy tuner: tune every job running alone on its GPU, not only those run with --tune",
    )
    journal_retention_s: float = setting(
        DEFAULT_RETENTION_S,
        Number(60.0, 10 * 365 * 86400.0),
        "keep journalled limit changes and decisions this long (default 30 days); the limits "
        "to restore are kept whatever their age",
        "S",
    )
    otlp_endpoint: str | None = setting(
        None,
        Url(),
        "export OTLP/HTTP metrics there (also OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT)",
        "URL",
    )
    otlp_headers: str | None = setting(
        None, Text(), "OTLP request headers, e.g. for auth", "K=V,..."
    )
    """``k=v,k2=v2`` (e.g. an Authorization header); OTEL_EXPORTER_OTLP_HEADERS is added too."""
    otlp_interval_s: float | None = setting(
        None, Number(1.0, 3600.0), "OTLP export interval (default 60)", "S"
    )
    log_level: str = setting("info", Choice(LOG_LEVELS), metavar="{" + ",".join(LOG_LEVELS) + "}")
    web_config: Path | None = setting(
        None,
        FilePath(),
        "TLS and basic auth (Prometheus exporter-toolkit web-config YAML)",
        "FILE",
    )

    @property
    def host_port(self) -> tuple[str, int]:
        """The listen address split into host and port."""
        return parse_listen(self.listen)

    @property
    def resolved_state_dir(self) -> Path:
        """The state directory, defaulted."""
        return self.state_dir if self.state_dir is not None else default_state_dir()


def settings_of(config: type) -> dict[str, Setting]:
    """Every setting of a config dataclass made with :func:`setting`, by name, in field order."""
    return {
        f.name: Setting(
            f.name, f.default, f.metadata["kind"], f.metadata["help"], f.metadata["metavar"]
        )
        for f in fields(config)
    }


#: Every setting by name (the TOML key), in ``--help`` order.
SETTINGS: dict[str, Setting] = settings_of(AgentConfig)


def load_config_file(path: Path, settings: Mapping[str, Setting] | None = None) -> dict[str, Any]:
    """Read and validate a TOML file into config values (of ``settings``, the agent's if None)."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from e
    return validate(raw, source=f"config {path}", settings=settings)


def validate(
    raw: Mapping[str, Any],
    *,
    source: str,
    flags: bool = False,
    settings: Mapping[str, Setting] | None = None,
) -> dict[str, Any]:
    """Check every key (or, with ``flags``, every flag's parsed value); the first problem raises.

    The keys are those of ``settings`` (the agent's if None). The ConfigError names the key (or
    the flag) and the problem.
    """
    table = SETTINGS if settings is None else settings
    out: dict[str, Any] = {}
    for key, value in raw.items():
        s = table.get(key)
        if s is None:
            known = ", ".join(sorted(table))
            raise ConfigError(f"{source}: unknown key {key!r} (known keys: {known})")
        try:
            out[key] = s.kind.check(value)
        except ValueError as e:
            name = s.flag if flags else f"key {key!r}"
            raise ConfigError(f"{source}: {name} {e}") from None
    return out


def layered(
    file: Path | None, flags: Mapping[str, Any], settings: Mapping[str, Setting]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's values, then the flags that were given (not None) over them, each checked.

    Also where each value came from, as an error names it (``key = value in config FILE`` or
    ``--flag value``), for the checks across settings.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if file is not None:
        from_file = load_config_file(file, settings)
        values.update(from_file)
        where.update({k: f"{k} = {v!r} in config {file}" for k, v in from_file.items()})
    given = validate(
        {k: v for k, v in flags.items() if v is not None},
        source="command line",
        flags=True,
        settings=settings,
    )
    values.update(given)
    where.update({k: f"{settings[k].flag} {v}" for k, v in given.items()})
    return values, where


def build_config(file: Path | None, flags: Mapping[str, Any]) -> AgentConfig:
    """Defaults, then the file, then flags that were given (not None), by setting name.

    Settings that contradict each other (wherever each came from) are refused, naming both.
    """
    values, where = layered(file, flags, SETTINGS)
    _check_conflicts(values, where)
    return replace(AgentConfig(), **values)


def _check_conflicts(values: Mapping[str, Any], where: Mapping[str, str]) -> None:
    """Refuse combinations where one setting would silently override another."""
    if values.get("backend") == "nvml" and values.get("sim") is not None:
        # a unit that promises to stop on a broken driver must never serve a simulated fleet
        raise ConfigError(
            f"{where['backend']} conflicts with {where['sim']} (a simulated fleet); "
            "drop one of them"
        )
