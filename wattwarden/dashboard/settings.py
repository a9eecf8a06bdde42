"""The dashboard's settings: which agents, Prometheus and Alertmanager to read, and how often.

One set of flags serves the ``wattwarden dashboard`` command and the Streamlit script, so what
the launcher passes (:meth:`DashboardSettings.to_argv`) is what the script reads back
(:meth:`DashboardSettings.from_argv`). Tests and embedders may hand the flags to the script in
``$WATTWARDEN_DASHBOARD_ARGS`` instead (shell words, as :func:`shlex.join` writes them).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit

from wattwarden.config import DEFAULT_LISTEN as DEFAULT_AGENT_LISTEN
from wattwarden.config import ConfigError

__all__ = [
    "DEFAULT_AGENT_URL",
    "DEFAULT_LISTEN",
    "ENV_ARGS",
    "DashboardSettings",
    "add_arguments",
    "from_environ_or_argv",
]

DEFAULT_LISTEN = "127.0.0.1:8501"
DEFAULT_AGENT_URL = f"http://{DEFAULT_AGENT_LISTEN}"  # the agent's default address
ENV_ARGS = "WATTWARDEN_DASHBOARD_ARGS"
REFRESH_S = (1.0, 60.0)
TIMEOUT_S = (0.1, 30.0)


def _check_url(flag: str, url: str) -> str:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a port that is not a number
    except ValueError as e:
        raise ConfigError(f"{flag}: not a valid URL ({e}): {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{flag}: expected an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def _check_seconds(flag: str, value: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{flag}: must be a number of seconds, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{flag}: must be within {lo:g}..{hi:g} seconds, got {value:g}")
    return float(value)


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """Where the dashboard reads from, and its cadence. Checked when made (ConfigError)."""

    agents: tuple[str, ...] = (DEFAULT_AGENT_URL,)
    prometheus: str | None = None
    alertmanager: str | None = None
    token_file: str | None = None  # None: $WATTWARDEN_TOKEN, else the default state dir's token
    refresh_s: float = 2.0  # live charts refresh
    timeout_s: float = 2.0  # per HTTP request

    def __post_init__(self) -> None:
        """Check every field; the error names the flag that sets it."""
        if not self.agents:
            raise ConfigError("--agent: at least one agent URL is needed")
        agents = tuple(_check_url("--agent", a) for a in self.agents)
        if len(set(agents)) != len(agents):
            raise ConfigError(f"--agent: an agent is given twice in {', '.join(agents)}")
        object.__setattr__(self, "agents", agents)
        for flag, name in (("--prometheus", "prometheus"), ("--alertmanager", "alertmanager")):
            url = getattr(self, name)
            if url is not None:
                object.__setattr__(self, name, _check_url(flag, url))
        if self.token_file is not None and not self.token_file:
            raise ConfigError("--token-file: must not be empty")
        object.__setattr__(
            self, "refresh_s", _check_seconds("--refresh-s", self.refresh_s, REFRESH_S)
        )
        object.__setattr__(
            self, "timeout_s", _check_seconds("--timeout-s", self.timeout_s, TIMEOUT_S)
        )

    def to_argv(self) -> list[str]:
        """The flags that :meth:`from_argv` reads back as these settings."""
        argv: list[str] = []
        for url in self.agents:
            argv += ["--agent", url]
        if self.prometheus is not None:
            argv += ["--prometheus", self.prometheus]
        if self.alertmanager is not None:
            argv += ["--alertmanager", self.alertmanager]
        if self.token_file is not None:
            argv += ["--token-file", self.token_file]
        argv += ["--refresh-s", repr(self.refresh_s), "--timeout-s", repr(self.timeout_s)]
        return argv

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> DashboardSettings:
        """Settings from a namespace that :func:`add_arguments`' flags filled (None: default)."""
        given = {
            "agents": tuple(args.agent) if args.agent else None,
            "prometheus": args.prometheus,
            "alertmanager": args.alertmanager,
            "token_file": args.token_file,
            "refresh_s": args.refresh_s,
            "timeout_s": args.timeout_s,
        }
        return cls(**{k: v for k, v in given.items() if v is not None})

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> DashboardSettings:
        """Settings from :func:`add_arguments`' flags; ConfigError names a bad flag."""
        parser = _RaisingParser(prog="wattwarden dashboard", add_help=False, allow_abbrev=False)
        add_arguments(parser)
        return cls.from_namespace(parser.parse_args(list(argv)))


class _RaisingParser(argparse.ArgumentParser):
    """argparse whose usage errors are ConfigError rather than an exit."""

    def error(self, message: str) -> NoReturn:
        """Raise the usage error as a ConfigError (one line, naming the flag)."""
        if message.startswith("argument "):
            message = message.removeprefix("argument ")
        raise ConfigError(message)


def _arg(check: Callable[[str], object]) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return check(text)
        except ConfigError as e:
            # argparse puts "argument --flag: " in front itself
            raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None

    return convert


def _seconds_arg(flag: str, bounds: tuple[float, float]) -> Callable[[str], object]:
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{flag}: expected a number of seconds, got {text!r}") from None
        return _check_seconds(flag, value, bounds)

    return _arg(check)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the dashboard's flags (all default to None: :class:`DashboardSettings`' defaults)."""
    parser.add_argument(
        "--agent",
        action="append",
        type=_arg(lambda t: _check_url("--agent", t)),
        metavar="URL",
        help=f"agent to show (repeat for several nodes; default {DEFAULT_AGENT_URL})",
    )
    parser.add_argument(
        "--prometheus",
        type=_arg(lambda t: _check_url("--prometheus", t)),
        metavar="URL",
        help="Prometheus to read fleet power, budget and energy from (default: the agents)",
    )
    parser.add_argument(
        "--alertmanager",
        type=_arg(lambda t: _check_url("--alertmanager", t)),
        metavar="URL",
        help="Alertmanager to list firing alerts from",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="the agents' write token (default $WATTWARDEN_TOKEN, else the state dir's token)",
    )
    parser.add_argument(
        "--refresh-s",
        type=_seconds_arg("--refresh-s", REFRESH_S),
        metavar="S",
        help=f"live charts refresh every S seconds ({REFRESH_S[0]:g}..{REFRESH_S[1]:g}, default 2)",
    )
    parser.add_argument(
        "--timeout-s",
        type=_seconds_arg("--timeout-s", TIMEOUT_S),
        metavar="S",
        help=f"per HTTP request ({TIMEOUT_S[0]:g}..{TIMEOUT_S[1]:g}, default 2)",
    )


def from_environ_or_argv(argv: Sequence[str]) -> DashboardSettings:
    """Settings from ``$WATTWARDEN_DASHBOARD_ARGS`` when set (and not empty), else ``argv``."""
    env = os.environ.get(ENV_ARGS, "").strip()
    if env:
        try:
            words = shlex.split(env)
        except ValueError as e:
            raise ConfigError(f"${ENV_ARGS}: {e}") from None
        return DashboardSettings.from_argv(words)
    return DashboardSettings.from_argv(argv)
