"""Agent configuration: defaults, then a TOML file, then command-line flags.

Validation errors are one line naming the key and the problem.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from wattwarden.hardware.sim.models import MODELS

DEFAULT_PORT = 9767
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"


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


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``wattwarden agent`` runs with."""

    listen: str = DEFAULT_LISTEN
    interval_ms: int = 100
    window_s: float = 15.0
    state_dir: Path | None = None
    sim: int | None = None
    sim_model: str = "h100-sxm"
    backend: str = "auto"
    """``auto`` (NVML if a driver is present, else simulate), ``nvml`` (fail without), ``sim``."""
    rapl_root: Path = Path("/sys/class/powercap")
    power_budget_watts: float | None = None
    apply: bool = False
    otlp_endpoint: str | None = None
    otlp_headers: str | None = None
    """``k=v,k2=v2`` (e.g. an Authorization header); OTEL_EXPORTER_OTLP_HEADERS is added too."""
    otlp_interval_s: float | None = None
    log_level: str = "info"
    web_config: Path | None = None
    """TLS and basic auth, in the exporter-toolkit web-config format."""

    @property
    def host_port(self) -> tuple[str, int]:
        """The listen address split into host and port."""
        return parse_listen(self.listen)

    @property
    def resolved_state_dir(self) -> Path:
        """The state directory, defaulted."""
        return self.state_dir if self.state_dir is not None else default_state_dir()


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


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"must be within {lo}..{hi}, got {v}")
        return v

    return check


def _float_in(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"must be a number, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"must be within {lo:g}..{hi:g}, got {v:g}")
        return float(v)

    return check


def _string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v


def _path(v: Any) -> Path:
    return Path(_string(v))


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _listen(v: Any) -> str:
    parse_listen(_string(v))
    return str(v)


def _model(v: Any) -> str:
    if v not in MODELS:
        raise ValueError(f"must be one of {', '.join(sorted(MODELS))}, got {v!r}")
    return str(v)


def _backend(v: Any) -> str:
    if v not in ("auto", "nvml", "sim"):
        raise ValueError(f"must be one of auto, nvml, sim; got {v!r}")
    return str(v)


def _log_level(v: Any) -> str:
    if v not in ("debug", "info", "warning", "error"):
        raise ValueError(f"must be one of debug, info, warning, error; got {v!r}")
    return str(v)


def _url(v: Any) -> str:
    s = _string(v)
    if not s.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {s!r}")
    return s


VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "listen": _listen,
    "interval_ms": _int_in(10, 60_000),
    "window_s": _float_in(1.0, 3600.0),
    "state_dir": _path,
    "sim": _int_in(1, 64),
    "sim_model": _model,
    "backend": _backend,
    "rapl_root": _path,
    "power_budget_watts": _float_in(1.0, 1e6),
    "apply": _bool,
    "otlp_endpoint": _url,
    "otlp_headers": _string,
    "otlp_interval_s": _float_in(1.0, 3600.0),
    "log_level": _log_level,
    "web_config": _path,
}
assert set(VALIDATORS) == {f.name for f in fields(AgentConfig)}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read and validate a TOML file into config values."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from e
    return validate(raw, source=f"config {path}")


def validate(raw: Mapping[str, Any], *, source: str, flags: bool = False) -> dict[str, Any]:
    """Check every key; the first problem raises a ConfigError naming it."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        check = VALIDATORS.get(key)
        if check is None:
            known = ", ".join(sorted(VALIDATORS))
            raise ConfigError(f"{source}: unknown key {key!r} (known keys: {known})")
        try:
            out[key] = check(value)
        except ValueError as e:
            name = "--" + key.replace("_", "-") if flags else f"key {key!r}"
            raise ConfigError(f"{source}: {name} {e}") from None
    return out


def build_config(file: Path | None, flags: Mapping[str, Any]) -> AgentConfig:
    """Defaults, then the file, then flags that were given (not None).

    Settings that contradict each other (wherever each came from) are refused, naming both.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if file is not None:
        from_file = load_config_file(file)
        values.update(from_file)
        where.update({k: f"{k} = {v!r} in config {file}" for k, v in from_file.items()})
    given = validate(
        {k: v for k, v in flags.items() if v is not None}, source="command line", flags=True
    )
    values.update(given)
    where.update({k: f"--{k.replace('_', '-')} {v}" for k, v in given.items()})
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
