"""Command line and configuration: clear one-line errors, exit codes, the status table."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import refused_port, run_agent
from hypothesis import event, given, settings
from hypothesis import strategies as st

from wattwarden.cli import agent_config, build_parser
from wattwarden.cliutil import stop_on_signals
from wattwarden.config import (
    SETTINGS,
    AgentConfig,
    Choice,
    ConfigError,
    FilePath,
    Integer,
    Listen,
    Number,
    PolicyNames,
    Setting,
    Switch,
    Text,
    Url,
    build_config,
    load_config_file,
    validate,
)


def wattwarden(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wattwarden", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("intervall_ms = 100\n", "unknown key 'intervall_ms'"),
        ("interval_ms = 'fast'\n", "key 'interval_ms' must be an integer, got 'fast'"),
        ("interval_ms = 5\n", "key 'interval_ms' must be within 10..60000, got 5"),
        ("listen = 'example.org:80'\n", "key 'listen' host must be an IP address or localhost"),
        ("sim_model = 'b200'\n", "key 'sim_model' must be one of a100-sxm, h100-sxm"),
        ("apply = 'yes'\n", "key 'apply' must be true or false"),
        ("interval_ms = \n", "not valid TOML"),
    ],
)
def test_bad_config_key_exits_2_with_one_line_naming_it(
    tmp_path: Path, toml: str, expected: str
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml)
    result = wattwarden("agent", "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert str(cfg) in lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--interval-ms", "0"], "--interval-ms must be within 10..60000, got 0"),
        (["--interval-ms", "fast"], "argument --interval-ms: expected an integer, got 'fast'"),
        (["--listen", "nowhere"], "argument --listen: expected HOST:PORT, got 'nowhere'"),
        (["--sim", "65"], "--sim must be within 1..64, got 65"),
        (["--window-s", "0.1"], "--window-s must be within 1..3600"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_flag_exits_2_with_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = wattwarden("agent", "--state-dir", str(tmp_path), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    result = wattwarden("agent", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("interval_ms = 250\nwindow_s = 30\nsim = 4\n")
    assert load_config_file(cfg)["interval_ms"] == 250
    built = build_config(cfg, {"interval_ms": 50, "sim": None})
    assert (built.interval_ms, built.window_s, built.sim) == (50, 30.0, 4)
    with pytest.raises(ConfigError):
        build_config(None, {"power_budget_watts": -5.0})


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command of the argparse tree, the top level included, as its words."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def test_the_command_tree_reaches_every_subcommand() -> None:
    leaves = {("agent",), ("status",), ("job", "run"), ("workload", "train"), ("workload", "infer")}
    assert leaves <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_on_every_command(command: tuple[str, ...]) -> None:
    result = wattwarden(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(('wattwarden', *command))} "), result.stdout
    for child in (c[-1] for c in COMMANDS if c[:-1] == command and c):
        assert child in result.stdout, f"{child!r} missing from the help of {command}"


def test_status_on_a_simulated_fleet_prints_a_table() -> None:
    result = wattwarden("status", "--sim", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["GPU", "NAME", "POWER", "LIMIT"]
    assert len(lines) == 1 + 3 + 1
    assert "NVIDIA H100 80GB HBM3" in lines[1] and "700 W" in lines[1] and "idle" in lines[1]


def test_status_against_an_agent_shows_its_gpus_and_a_lost_one(tmp_path: Path) -> None:
    from helpers import http_json

    with run_agent(tmp_path / "state", "--sim", "4") as agent:
        status, _ = http_json(agent.url + "/api/v1/sim/faults", {"gpu": 2, "fault": "lost"},
                              token=agent.token)  # fmt: skip
        assert status == 200
        http_json(agent.url + "/api/v1/sim/load", {"gpu": 1, "utilization": 1.0}, token=agent.token)

        def table() -> str | None:
            out = wattwarden("status", "--agent", agent.url).stdout
            return out if "LOST" in out and "100%" in out else None

        from helpers import wait_for

        out = wait_for(table, timeout_s=20, what="status to show the lost GPU and the load")
        row = {line.split()[0]: line for line in out.splitlines()[1:5]}
        assert "LOST" in row["2"]
        assert "100%" in row["1"]


def test_status_against_an_unreachable_agent_exits_1_with_the_reason() -> None:
    with refused_port() as port:
        result = wattwarden("status", "--agent", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert "cannot read GPU state from" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_backend_nvml_without_a_driver_exits_1_instead_of_simulating(tmp_path: Path) -> None:
    result = wattwarden(
        "agent", "--backend", "nvml", "--state-dir", str(tmp_path),
        "--listen", "127.0.0.1:0",  # not the default port: an agent may be there
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("wattwarden agent: backend nvml: no usable NVIDIA driver")
    )


def test_no_apply_overrides_apply_in_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("apply = true\n")
    assert build_config(cfg, {}).apply is True
    assert build_config(cfg, {"apply": False}).apply is False


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a usage error (exit 2), with no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("toml", "args", "names"),
    [
        ("", ["--backend", "nvml", "--sim", "3"], ("--backend nvml", "--sim 3")),
        ("sim = 3\n", ["--backend", "nvml"], ("--backend nvml", "sim = 3 in config")),
        ('backend = "nvml"\n', ["--sim", "2"], ("backend = 'nvml' in config", "--sim 2")),
        ('backend = "nvml"\nsim = 4\n', [], ("backend = 'nvml' in config", "sim = 4 in config")),
    ],
)
def test_backend_nvml_with_a_simulated_fleet_exits_2_naming_both(
    tmp_path: Path, toml: str, args: list[str], names: tuple[str, str]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml)
    result = wattwarden(
        "agent", "--config", str(cfg), "--state-dir", str(tmp_path / "s"),
        "--listen", "127.0.0.1:0", *args, timeout=30,
    )  # fmt: skip
    line = one_line_error(result)
    assert "conflicts with" in line
    for name in names:
        assert name in line


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        (lambda p: p.write_text(""), "is empty; delete"),
        (lambda p: p.write_text("\n  \n"), "is empty; delete"),
        (lambda p: p.mkdir(), "is not a regular file; delete"),
        (lambda p: p.write_text("abc12\n"), "too weak"),
        (lambda p: p.write_bytes(b"\xff\xfe" * 20), "is not text"),
        (lambda p: (p.write_text("x" * 43 + "\n"), p.chmod(0o644)), "chmod 600"),
        (lambda p: (p.write_text("x" * 43 + "\n"), p.chmod(0o640)), "mode 0640"),
    ],
    ids=["empty", "blank", "directory", "short", "binary", "world-readable", "group-readable"],
)
def test_unusable_token_file_exits_2_with_one_line_saying_how_to_fix_it(
    tmp_path: Path, prepare: Callable[[Path], object], expected: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    token = state / "token"
    prepare(token)
    if token.is_file() and "mode" not in expected and "chmod" not in expected:
        token.chmod(0o600)  # private: only the content is wrong
    result = wattwarden(
        "agent", "--sim", "1", "--state-dir", str(state), "--listen", "127.0.0.1:0", timeout=30
    )
    line = one_line_error(result)
    assert str(token) in line and expected in line


def test_read_only_state_dir_exits_2_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits; an immutable directory stops it too
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(state)], check=False).returncode:
            pytest.skip("running as root without chattr +i: cannot make a read-only directory")
    else:
        state.chmod(0o555)
    try:
        result = wattwarden(
            "agent", "--sim", "1", "--state-dir", str(state), "--listen", "127.0.0.1:0", timeout=30
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(state)], check=True)
        state.chmod(0o755)
    line = one_line_error(result)
    assert f"state dir {state} is not writable" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("notaurl", "expected an http:// or https:// URL"),
        ("ftp://127.0.0.1:9767", "expected an http:// or https:// URL"),
        ("http://", "expected an http:// or https:// URL"),
        ("http://127.0.0.1:port", "not a valid URL"),
    ],
)
def test_status_with_a_bad_agent_url_exits_2_with_one_line(url: str, expected: str) -> None:
    line = one_line_error(wattwarden("status", "--agent", url, timeout=30))
    assert "--agent" in line and expected in line


def test_status_into_a_closed_pipe_exits_quietly() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, like `| head -0`
    try:
        result = subprocess.run(
            [sys.executable, "-m", "wattwarden", "status", "--sim", "2"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 1


# ------------------------------------------------------------------ one declaration per setting
AGENT_PARSER = build_parser()


def _agent_parser() -> argparse.ArgumentParser:
    for action in AGENT_PARSER._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["agent"]
    raise AssertionError("no agent command")


def test_every_setting_is_a_field_a_flag_and_a_toml_key_and_nothing_else_is() -> None:
    assert list(SETTINGS) == [f.name for f in dataclasses.fields(AgentConfig)]
    flags = {s.flag for s in SETTINGS.values()}
    flags |= {"--no-" + s.flag[2:] for s in SETTINGS.values() if isinstance(s.kind, Switch)}
    options = {o for a in _agent_parser()._actions for o in a.option_strings}
    assert options == flags | {"-h", "--help", "--config"}
    with pytest.raises(ConfigError) as e:
        validate({"nope": 1}, source="config x")
    assert str(e.value).endswith(f"(known keys: {', '.join(sorted(SETTINGS))})")
    assert all(getattr(AgentConfig(), s.name) == s.default for s in SETTINGS.values())


def _toml(value: Any) -> str:
    """``value`` as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else {math.inf: "inf", -math.inf: "-inf"}.get(value, repr(value))
        )
    if isinstance(value, int):
        return str(value)
    out = []
    for c in value:
        if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _flag(s: Setting, value: Any) -> list[str]:
    """``value`` as ``wattwarden agent`` flags (``--name=text``: a text may start with a dash)."""
    if isinstance(s.kind, Switch):
        return [s.flag if value else "--no-" + s.flag[2:]]
    return [f"{s.flag}={repr(value) if isinstance(value, float) else value}"]


def _outcome(argv: list[str]) -> tuple[str, Any]:
    """("ok", the config) or ("refused", the one-line error) for ``wattwarden agent ARGV``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = AGENT_PARSER.parse_args(["agent", *argv])
        return "ok", agent_config(args)
    except SystemExit as e:
        assert e.code == 2
        return "refused", err.getvalue().strip()
    except ConfigError as e:
        return "refused", str(e)


def _two_valid_values(s: Setting) -> tuple[Any, Any]:
    """Two different values the setting accepts, the first not its default."""
    k = s.kind
    if isinstance(k, Integer | Number):
        return k.hi, k.lo
    if isinstance(k, Choice):
        first = next(o for o in k.options if o != s.default)
        return first, next(o for o in k.options if o != first)
    return {
        Text: ("Authorization=Bearer x", "k=v"),
        Url: ("https://127.0.0.1:4318", "http://[::1]:4318/v1/metrics"),
        Listen: ("[::1]:0", "localhost:1"),
        FilePath: ("/srv/wattwarden", "relative/dir"),
        Switch: (True, False),
        PolicyNames: ("thermal,budget", "idle"),
    }[type(k)]


@pytest.mark.parametrize("s", SETTINGS.values(), ids=lambda s: s.name)
def test_each_setting_reaches_the_config_from_its_flag_and_its_key_and_the_flag_wins(
    s: Setting, tmp_path: Path
) -> None:
    value, other = _two_valid_values(s)
    expected = s.kind.check(value)
    assert expected != s.default
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"{s.name} = {_toml(value)}\n")
    from_flag, from_file = _outcome(_flag(s, value)), _outcome(["--config", str(cfg)])
    assert from_flag == from_file == ("ok", replace(AgentConfig(), **{s.name: expected}))
    overridden = _outcome(["--config", str(cfg), *_flag(s, other)])
    assert overridden == ("ok", replace(AgentConfig(), **{s.name: s.kind.check(other)}))


def _values(s: Setting) -> st.SearchStrategy[Any]:
    """Values a user may give the setting, inside and outside what its kind allows."""
    k = s.kind
    text = st.just("") | st.text(max_size=30)
    if isinstance(k, Integer):
        near = st.integers(k.lo - 3, k.lo + 3) | st.integers(k.hi - 3, k.hi + 3)
        return near | st.integers() | st.floats()
    if isinstance(k, Number):
        near = st.floats(k.lo - 1, k.lo + 1) | st.floats(k.hi - 1, k.hi + 1)
        return near | st.integers(int(k.lo) - 3, int(k.hi) + 3) | st.floats() | st.integers()
    if isinstance(k, Choice):
        near = [o.upper() for o in k.options] + [f" {o}" for o in k.options] + [k.options[0][:-1]]
        return st.sampled_from(k.options) | st.sampled_from(near) | text
    if isinstance(k, Url):
        scheme = st.sampled_from(["http://", "https://", "ftp://", "", "HTTP://"])
        return st.builds(str.__add__, scheme, text)
    if isinstance(k, Listen):
        host = st.sampled_from(["127.0.0.1", "[::1]", "::1", "localhost", "", "example.org"])
        port = st.integers(-3, 65540).map(str) | text
        hostport = st.builds("{}{}{}".format, host, st.sampled_from([":", "", "::"]), port)
        return hostport | text
    if isinstance(k, Switch):
        return st.booleans()
    if isinstance(k, PolicyNames):
        word = st.sampled_from(["thermal", "budget", "idle", "tuner", "none", "Thermal", "x", ""])
        spaced = st.builds("{}{}{}".format, st.sampled_from(["", " "]), word, st.just(""))
        return st.lists(spaced, max_size=5).map(",".join) | text
    return text


@pytest.mark.parametrize("s", SETTINGS.values(), ids=lambda s: s.name)
@settings(deadline=None)
@given(data=st.data())
def test_a_flag_and_its_toml_key_accept_and_refuse_the_same_values(
    s: Setting, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    value = data.draw(_values(s), label=s.name)
    cfg = tmp_path_factory.mktemp("cfg") / "agent.toml"
    cfg.write_text(f"{s.name} = {_toml(value)}\n", encoding="utf-8")
    flag_status, flag_result = _outcome(_flag(s, value))
    file_status, file_result = _outcome(["--config", str(cfg)])
    assert flag_status == file_status, (flag_result, file_result)
    event(flag_status)
    if flag_status == "ok":
        assert repr(getattr(flag_result, s.name)) == repr(getattr(file_result, s.name))
    else:
        assert len(flag_result.splitlines()) == len(file_result.splitlines()) == 1
        assert s.flag in flag_result
        assert f"key {s.name!r}" in file_result


def test_a_signal_sets_the_stop_event_is_logged_and_the_old_handlers_come_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    log = logging.getLogger("wattwarden.agent")
    with caplog.at_level(logging.INFO, logger=log.name), stop_on_signals(log) as (stop, got):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(10)
    assert got == [signal.SIGTERM]
    assert [r.getMessage() for r in caplog.records] == ["SIGTERM: shutting down"]
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize(
    ("node_w", "lease_w", "said"),
    [
        (None, None, ", budget none, mode apply"),
        (2400.0, None, ", budget 2400 W, mode apply"),
        (2400.0, 3000.0, ", budget 3000 W (leased; node's own 2400 W), mode apply"),
        (None, 1500.0, ", budget 1500 W (leased; node's own none), mode apply"),
    ],
)
def test_status_names_the_budget_in_force_a_lease_over_the_nodes_own(
    node_w: float | None, lease_w: float | None, said: str
) -> None:
    from wattwarden.cli import format_status

    state = {"node": "n", "backend": "sim", "gpus": [], "policy_mode": "apply",
             "power_budget_watts": node_w, "power_budget_lease_watts": lease_w}  # fmt: skip
    assert said in format_status(state)
