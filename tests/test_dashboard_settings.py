"""The dashboard's flags: what the launcher passes is what the script reads back."""

from __future__ import annotations

import argparse
import shlex

import pytest

from wattwarden.config import ConfigError
from wattwarden.dashboard.settings import (
    DEFAULT_AGENT_URL,
    ENV_ARGS,
    DashboardSettings,
    add_arguments,
    from_environ_or_argv,
)
from wattwarden.workloads.agent_client import DEFAULT_AGENT_URL as CLIENT_DEFAULT


def test_defaults_are_the_local_agent_every_2_s() -> None:
    s = DashboardSettings.from_argv([])
    assert s == DashboardSettings()
    assert s.agents == (DEFAULT_AGENT_URL,) == (CLIENT_DEFAULT,)
    assert (s.prometheus, s.alertmanager, s.token_file) == (None, None, None)
    assert (s.refresh_s, s.timeout_s) == (2.0, 2.0)


def test_to_argv_reads_back_as_the_same_settings() -> None:
    s = DashboardSettings(
        agents=("http://127.0.0.1:1", "https://u:p@127.0.0.1:2/x"),
        prometheus="http://127.0.0.1:9090",
        alertmanager="http://127.0.0.1:9093",
        token_file="tok en",
        refresh_s=1.25,
        timeout_s=0.1,
    )
    assert DashboardSettings.from_argv(s.to_argv()) == s
    assert DashboardSettings.from_argv(DashboardSettings().to_argv()) == DashboardSettings()


def test_a_trailing_slash_is_dropped_so_one_agent_is_one_url() -> None:
    assert DashboardSettings(agents=("http://127.0.0.1:9767/",)).agents == (DEFAULT_AGENT_URL,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--refresh-s", "0.5"], "--refresh-s: must be within 1..60 seconds, got 0.5"),
        (["--refresh-s", "61"], "--refresh-s: must be within 1..60 seconds, got 61"),
        (["--timeout-s", "x"], "--timeout-s: expected a number of seconds, got 'x'"),
        (["--timeout-s", "nan"], "--timeout-s: must be a number of seconds, got nan"),
        (["--agent", "ftp://h"], "--agent: expected an http:// or https:// URL, got 'ftp://h'"),
        (["--prometheus", "localhost:9090"], "--prometheus: expected an http:// or https://"),
        (["--alertmanager", "http://h:x"], "--alertmanager: not a valid URL"),
        (["--agent", "http://h:1", "--agent", "http://h:1/"], "--agent: an agent is given twice"),
        (["--token-file", ""], "--token-file: must not be empty"),
        (["--listen", "x"], "unrecognized arguments: --listen x"),
    ],
)
def test_a_bad_flag_is_a_config_error_naming_it(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        DashboardSettings.from_argv(argv)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_the_commands_parser_takes_the_same_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="wattwarden dashboard")
    add_arguments(parser)
    args = parser.parse_args(["--agent", "http://127.0.0.1:1", "--refresh-s", "5"])
    assert DashboardSettings.from_namespace(args) == DashboardSettings(
        agents=("http://127.0.0.1:1",), refresh_s=5.0
    )
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--refresh-s", "0"])
    assert e.value.code == 2
    assert "argument --refresh-s: must be within 1..60 seconds, got 0" in capsys.readouterr().err


def test_the_environment_wins_over_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = DashboardSettings(agents=("http://127.0.0.1:5",), token_file="a b")
    monkeypatch.setenv(ENV_ARGS, shlex.join(wanted.to_argv()))
    assert from_environ_or_argv(["--pytest-flag"]) == wanted
    monkeypatch.setenv(ENV_ARGS, "  ")
    assert from_environ_or_argv(["--refresh-s", "3"]).refresh_s == 3.0
    monkeypatch.setenv(ENV_ARGS, "--agent 'unclosed")
    with pytest.raises(ConfigError, match=f"^\\${ENV_ARGS}: "):
        from_environ_or_argv([])
