"""Command line and configuration: clear one-line errors, exit codes, the status table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, run_agent

from wattwarden.config import ConfigError, build_config, load_config_file


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


def test_help_on_every_command() -> None:
    for args in (["--help"], ["agent", "--help"], ["status", "--help"]):
        result = wattwarden(*args)
        assert result.returncode == 0
        assert "usage: wattwarden" in result.stdout


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
    result = wattwarden("status", "--agent", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot read GPU state from" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_backend_nvml_without_a_driver_exits_1_instead_of_simulating(tmp_path: Path) -> None:
    result = wattwarden(
        "agent", "--backend", "nvml", "--state-dir", str(tmp_path),
        "--listen", f"127.0.0.1:{free_port()}",  # not the default port: an agent may be there
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
