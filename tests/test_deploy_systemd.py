"""The systemd units in deploy/systemd: valid, sandboxed within their exposure budgets, and
compatible with what the agent does inside the sandbox.

``systemd-analyze verify`` checks that ExecStart's program exists and is executable, and the
units name the installed path ``/usr/local/bin/wattwarden``. So the verify test checks a copy of
each unit in a temporary directory whose ExecStart program is replaced by a stub executable
there; every other line is verified as shipped. ``systemd-analyze security --offline=true``
scores the shipped files themselves.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import SERVING_LINE, http_get, parse_metrics, require_binary, wait_for

from wattwarden.cli import build_parser
from wattwarden.config import SETTINGS, load_config_file, validate

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
EXPORTER = "wattwarden-exporter.service"
AGENT = "wattwarden-agent.service"
CONTROLLER = "wattwarden-controller.service"
# `systemd-analyze security` exposure (0 = fully sandboxed, 10 = none) that README.md and
# deploy/INSTALL.md claim (the controller's in INSTALL.md only); systemd prints it to one decimal.
CLAIMED_EXPOSURE = {EXPORTER: 1.4, AGENT: 2.1, CONTROLLER: 1.1}
DOCS = [Path(__file__).resolve().parents[1] / "README.md", SYSTEMD_DIR.parent / "INSTALL.md"]
INSTALLED_BINARY = "/usr/local/bin/wattwarden"
STATE_DIR = "/var/lib/wattwarden"  # %S/wattwarden for a system unit

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> keys -> values in file order (keys may repeat; an empty value is kept)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name: str) -> dict[str, list[str]]:
    """The [Service] section of a shipped unit."""
    return parse_unit((SYSTEMD_DIR / name).read_text())["Service"]


def exec_start_argv(name: str, opts: str = "") -> list[str]:
    """ExecStart as argv, with %S expanded and $WATTWARDEN_OPTS replaced by ``opts``."""
    (line,) = unit(name)["ExecStart"]
    argv: list[str] = []
    for word in shlex.split(line.replace("%S", "/var/lib")):
        if word in ("$WATTWARDEN_OPTS", "${WATTWARDEN_OPTS}"):
            argv.extend(shlex.split(opts))
        else:
            argv.append(word)
    return argv


def default_file_opts() -> str:
    """WATTWARDEN_OPTS as set by the shipped /etc/default/wattwarden example."""
    for line in (SYSTEMD_DIR / "wattwarden.default").read_text().splitlines():
        if line.startswith("WATTWARDEN_OPTS="):
            return shlex.split(line.partition("=")[2])[0]
    raise AssertionError("wattwarden.default sets no WATTWARDEN_OPTS")


# ------------------------------------------------------------------ systemd-analyze
@pytest.mark.parametrize("name", [EXPORTER, AGENT, CONTROLLER])
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    stub = tmp_path / "bin" / "wattwarden"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (SYSTEMD_DIR / name).read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    copy = tmp_path / name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={stub} "))

    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    # verify exits 0 on unknown keys and unparsable values too, logging a line naming the file:
    # any line about this unit is a failure.
    about_unit = [ln for ln in (result.stdout + result.stderr).splitlines() if name in ln]
    assert result.returncode == 0, result.stdout + result.stderr
    assert about_unit == []


def exposure(name: str) -> float:
    analyze = require_binary("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(SYSTEMD_DIR / name)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if name in ln]
    assert warnings == [], warnings
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


def test_exporter_unit_exposure_is_the_documented_1_4() -> None:
    assert exposure(EXPORTER) == CLAIMED_EXPOSURE[EXPORTER]


def test_agent_unit_exposure_is_the_documented_2_1() -> None:
    assert exposure(AGENT) == CLAIMED_EXPOSURE[AGENT]


def test_controller_unit_exposure_is_the_documented_1_1() -> None:
    assert exposure(CONTROLLER) == CLAIMED_EXPOSURE[CONTROLLER]


def test_the_docs_claim_the_exposures_the_tests_pin() -> None:
    readme, install = (path.read_text() for path in DOCS)
    exporter, agent = CLAIMED_EXPOSURE[EXPORTER], CLAIMED_EXPOSURE[AGENT]
    assert re.findall(r"exposure (\d+\.\d)\b", readme) == [str(exporter), str(agent)]
    assert f"about {exporter} for the exporter and {agent} for the agent" in install
    command = f"`systemd-analyze security {CONTROLLER}`"
    assert f"{command} (about {CLAIMED_EXPOSURE[CONTROLLER]})" in install


# ------------------------------------------------------------------ what the units say
def test_exporter_runs_unprivileged_without_capabilities_and_never_applies() -> None:
    svc = unit(EXPORTER)
    assert svc["DynamicUser"] == ["yes"]
    assert "User" not in svc
    assert svc["CapabilityBoundingSet"] == [""]
    assert svc["AmbientCapabilities"] == [""]
    assert svc["NoNewPrivileges"] == ["yes"]
    assert "--apply" not in exec_start_argv(EXPORTER, default_file_opts())


def test_agent_runs_as_root_with_cap_sys_admin_only_and_applies() -> None:
    svc = unit(AGENT)
    assert svc["User"] == ["root"]
    assert svc["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
    assert svc["AmbientCapabilities"] == [""]
    assert svc["NoNewPrivileges"] == ["yes"]
    assert "--apply" in exec_start_argv(AGENT)


@pytest.mark.parametrize("name", [EXPORTER, AGENT])
def test_unit_allows_nvidia_devices_only(name: str) -> None:
    svc = unit(name)
    assert svc["DevicePolicy"] == ["closed"]
    assert "PrivateDevices" not in svc  # it would hide /dev/nvidia* whatever DeviceAllow says
    groups = {entry.split()[0] for entry in svc["DeviceAllow"]}
    assert groups == {"char-nvidia", "char-nvidiactl", "char-nvidia-frontend", "char-nvidia-caps"}


@pytest.mark.parametrize("name", [EXPORTER, AGENT])
def test_unit_writes_only_to_its_private_state_directory(name: str) -> None:
    svc = unit(name)
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["ProtectHome"] == ["yes"]
    assert svc["PrivateTmp"] == ["yes"]
    assert svc["StateDirectory"] == ["wattwarden"]
    assert svc["StateDirectoryMode"] == ["0700"]
    assert svc["UMask"] == ["0077"]
    assert "ReadWritePaths" not in svc


@pytest.mark.parametrize("name", [EXPORTER, AGENT])
def test_unit_restarts_on_failure_but_not_on_a_config_error(name: str) -> None:
    svc = unit(name)
    assert svc["Restart"] == ["always"]
    assert svc["RestartSec"] == ["5s"]
    assert svc["RestartPreventExitStatus"] == ["2"]  # the CLI's exit status for bad config


def test_exporter_and_agent_units_conflict_with_each_other() -> None:
    exporter = parse_unit((SYSTEMD_DIR / EXPORTER).read_text())["Unit"]
    agent = parse_unit((SYSTEMD_DIR / AGENT).read_text())["Unit"]
    assert exporter["Conflicts"] == [AGENT]
    assert agent["Conflicts"] == [EXPORTER]


@pytest.mark.parametrize(("name", "applies"), [(EXPORTER, False), (AGENT, True)])
def test_unit_command_line_is_accepted_by_the_cli(name: str, applies: bool) -> None:
    for opts in ("", default_file_opts()):
        argv = exec_start_argv(name, opts)
        assert argv[0] == INSTALLED_BINARY
        args = build_parser().parse_args(argv[1:])
        assert args.command == "agent"
        assert args.state_dir == Path(STATE_DIR)
        assert bool(args.apply) is applies
    assert args.config == Path("/etc/wattwarden/agent.toml")


# ------------------------------------------------------------------ the fleet controller unit
CONTROLLER_CONFIG = "/etc/wattwarden/controller.toml"
CREDENTIALS_DIR = f"/run/credentials/{CONTROLLER}"  # %d of a system unit


def test_controller_runs_as_a_dynamic_user_without_capabilities_devices_or_state() -> None:
    svc = unit(CONTROLLER)
    assert svc["DynamicUser"] == ["yes"]
    assert "User" not in svc
    assert svc["CapabilityBoundingSet"] == [""]
    assert svc["AmbientCapabilities"] == [""]
    assert svc["NoNewPrivileges"] == ["yes"]
    # It talks HTTP only: no device, no state, nothing writable.
    assert svc["PrivateDevices"] == ["yes"]
    assert "DeviceAllow" not in svc
    for key in ("StateDirectory", "ReadWritePaths", "CacheDirectory", "LogsDirectory"):
        assert key not in svc, key
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["ProtectHome"] == ["yes"]
    assert svc["PrivateTmp"] == ["yes"]
    assert svc["UMask"] == ["0077"]


def test_controller_sandbox_allows_ip_and_unix_sockets_and_the_service_syscalls_only() -> None:
    svc = unit(CONTROLLER)
    assert svc["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert svc["MemoryDenyWriteExecute"] == ["yes"]
    assert svc["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert svc["SystemCallErrorNumber"] == ["EPERM"]
    assert svc["SystemCallArchitectures"] == ["native"]
    assert svc["RestrictNamespaces"] == ["yes"]


def test_controller_restarts_on_failure_but_not_on_a_config_error() -> None:
    svc = unit(CONTROLLER)
    assert svc["Restart"] == ["on-failure"]
    assert svc["RestartSec"] == ["5s"]
    assert svc["RestartPreventExitStatus"] == ["2"]


def test_controller_reads_the_agent_token_from_its_credentials_directory() -> None:
    svc = unit(CONTROLLER)
    (credential,) = svc["LoadCredential"]
    name, _, source = credential.partition(":")
    assert source.startswith("/etc/wattwarden/")
    # The shipped config points at systemd's copy of that credential, not at the file in /etc
    # (which stays root's: a dynamic user could not read it).
    settings = tomllib.loads((SYSTEMD_DIR / "controller.toml.example").read_text())
    assert settings["token_file"] == f"{CREDENTIALS_DIR}/{name}"


def test_controller_unit_command_line_is_accepted_by_the_cli() -> None:
    argv = exec_start_argv(CONTROLLER)
    assert argv == [INSTALLED_BINARY, "controller", "--config", CONTROLLER_CONFIG]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "controller"
    assert str(args.config) == CONTROLLER_CONFIG


def test_example_controller_toml_is_a_valid_config_and_so_is_every_commented_key() -> None:
    from wattwarden.fleet.config import CONTROLLER_SETTINGS, build_config

    path = SYSTEMD_DIR / "controller.toml.example"
    values = load_config_file(path, CONTROLLER_SETTINGS)
    # Dry-run, the fleet's budget, Prometheus on loopback; the token systemd hands the unit.
    assert values["apply"] is False
    assert values["budget_watts"] > 0
    assert values["prometheus"].startswith("http://127.0.0.1:")
    config = build_config(path, {})
    assert config.token_file == Path(CREDENTIALS_DIR) / "agent-token"
    commented = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"# (\w+) = (.+)", line)
        if m and m.group(1) in CONTROLLER_SETTINGS:
            commented.update(tomllib.loads(f"{m.group(1)} = {m.group(2)}"))
    validate(commented, source=str(path), settings=CONTROLLER_SETTINGS)
    # Every key of the controller is shown, set or commented.
    assert set(values) | set(commented) == set(CONTROLLER_SETTINGS)


# ------------------------------------------------------------------ example settings
def test_example_agent_toml_is_a_valid_config_and_so_is_every_commented_key() -> None:
    path = SYSTEMD_DIR / "agent.toml.example"
    values = load_config_file(path)
    assert values["listen"] == "127.0.0.1:9767"
    commented = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"# (\w+) = (.+)", line)
        if m and m.group(1) in SETTINGS:
            commented.update(tomllib.loads(f"{m.group(1)} = {m.group(2)}"))
    validate(commented, source=str(path))
    documented = set(values) | set(commented)
    # Every key but the two the units own (state_dir, apply) and the simulator's is shown.
    assert documented == set(SETTINGS) - {"state_dir", "apply", "sim", "sim_model"}


# ------------------------------------------------------------------ the agent in the sandbox
_AUDIT_WRAPPER = r"""
import os, runpy, sys
log = open(os.environ["WW_AUDIT_LOG"], "a", buffering=1)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.chmod",
               "os.chown", "os.symlink", "os.link", "os.truncate", "os.utime",
               "shutil.rmtree", "shutil.move", "shutil.copyfile", "sqlite3.connect"}
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not isinstance(path, int) and isinstance(flags, int) and flags & WRITE:
            log.write(f"open\t{os.fsdecode(path)}\n")
    elif event in PATH_EVENTS:
        for arg in args[:2]:
            if isinstance(arg, (str, bytes, os.PathLike)):
                log.write(f"{event}\t{os.fsdecode(arg)}\n")
sys.addaudithook(hook)
sys.argv = ["wattwarden", *sys.argv[1:]]
runpy.run_module("wattwarden", run_name="__main__", alter_sys=True)
"""

_MDWE_WRAPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}")
os.execv(sys.executable, [sys.executable, "-m", "wattwarden", *sys.argv[1:]])
"""


def _run_agent_briefly(
    argv: list[str], state_dir: Path, cwd: Path, log_path: Path, extra_env: dict[str, str]
) -> str:
    """Start the agent, wait for /healthz, scrape /metrics once, stop it with SIGTERM."""
    env = {
        **os.environ,
        **extra_env,
        # As in the units: no home directory, no bytecode written next to the package.
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("STATE_DIRECTORY", None)
    cmd = [
        *argv,
        "agent",
        "--sim",
        "2",
        "--interval-ms",
        "50",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(state_dir),
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:

            def started() -> re.Match[str] | None:
                if proc.poll() is not None:
                    raise AssertionError(f"agent exited {proc.returncode}: {log_path.read_text()}")
                return SERVING_LINE.search(log_path.read_text())

            url = f"http://127.0.0.1:{wait_for(started, timeout_s=30, what='the start line')[2]}"

            def healthy() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"agent exited {proc.returncode}: {log_path.read_text()}")
                return http_get(url + "/healthz", timeout_s=1)[0] == 200

            wait_for(healthy, timeout_s=30, what="agent /healthz")
            status, body = http_get(url + "/metrics")
            assert status == 200
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
    assert code == 0, log_path.read_text()
    return body.decode()


def test_agent_writes_nothing_outside_its_state_dir(tmp_path: Path) -> None:
    # ProtectSystem=strict and ProtectHome=yes leave only the state directory writable (and a
    # private /tmp, which the agent does not need either).
    wrapper = tmp_path / "audit_wrapper.py"
    wrapper.write_text(_AUDIT_WRAPPER)
    audit_log = tmp_path / "audit.log"
    state_dir = tmp_path / "state"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _run_agent_briefly(
        [sys.executable, str(wrapper)],
        state_dir,
        cwd,
        tmp_path / "a.log",
        {"WW_AUDIT_LOG": str(audit_log)},
    )

    state_dir = state_dir.resolve()
    writes = [ln.split("\t", 1) for ln in audit_log.read_text().splitlines()]
    paths = {(event, (cwd / p).resolve()) for event, p in writes}
    assert {p for _, p in paths} >= {state_dir / "token", state_dir / "journal.sqlite3"}
    outside = sorted(
        (e, str(p)) for e, p in paths if p != state_dir and not p.is_relative_to(state_dir)
    )
    assert outside == []


def test_agent_serves_metrics_under_memory_deny_write_execute(tmp_path: Path) -> None:
    # MemoryDenyWriteExecute=yes refuses writable+executable mappings. The kernel's own
    # PR_SET_MDWE (Linux >= 6.3, inherited across execve) enforces the same rule.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    wrapper = tmp_path / "mdwe_wrapper.py"
    wrapper.write_text(_MDWE_WRAPPER)
    body = _run_agent_briefly(
        [sys.executable, str(wrapper)], tmp_path / "state", tmp_path, tmp_path / "a.log", {}
    )
    power = parse_metrics(body)["gpu_power_watts"]
    assert sorted(labels["gpu"] for labels, _ in power) == ["0", "1"]
