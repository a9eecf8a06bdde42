"""A simulated job's GPU load is explicit: `job run --sim-utilization U` drives its GPU at U."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import http_json, run_agent, wait_for

from wattwarden import agent as agent_module
from wattwarden.cli import main


def job_run(agent_url: str, token_file: Path, *flags: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, "-m", "wattwarden", "job", "run", "--name", "sim-load", "--gpu", "1",
        "--agent", agent_url, "--token-file", str(token_file), *flags, "--",
        sys.executable, "-c", "import time; time.sleep(300)",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


@pytest.mark.parametrize(("flags", "expected"), [(["--sim-utilization", "0.35"], 0.35), ([], None)])
def test_a_simulated_job_drives_its_gpu_at_the_utilization_it_asked_for(
    tmp_path: Path, flags: list[str], expected: float | None
) -> None:
    expected = agent_module.SIM_JOB_UTILIZATION if expected is None else expected
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        proc = job_run(agent.url, agent.state_dir / "token", *flags)
        try:

            def job_process_on_gpu_1() -> dict[str, Any] | None:
                status, job = http_json(f"{agent.url}/api/v1/jobs/sim-load")
                if status != 200:
                    return None
                status, state = http_json(f"{agent.url}/api/v1/state")
                gpus = {g["index"]: g for g in state["gpus"]}
                procs = [p for p in gpus[1]["processes"] if p["pid"] == job["pid"]]
                busy = gpus[1]["utilization_ratio"] or 0.0
                return gpus | {"job": procs[0]} if procs and busy > 0 else None

            seen = wait_for(job_process_on_gpu_1, timeout_s=30, what="the job's process on GPU 1")
        finally:
            err = stop(proc)
    assert seen["job"]["utilization_ratio"] == pytest.approx(expected)
    assert seen[1]["utilization_ratio"] == pytest.approx(expected, abs=0.02)
    assert seen[0]["utilization_ratio"] == pytest.approx(0.0, abs=0.02)  # nothing placed there
    log = next(tmp_path.glob("agent-*.log")).read_text()
    assert f"job sim-load placed on simulated GPU 1 at {expected:.0%} utilization" in log, log + err


def test_sim_utilization_help_states_the_agents_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["job", "run", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: the agent's, {agent_module.SIM_JOB_UTILIZATION:g}" in text


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan", "x"])
def test_sim_utilization_out_of_range_is_a_usage_error(value: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "wattwarden", "job", "run", "--name", "a",
         "--sim-utilization", value, "--", "true"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sim-utilization" in lines[0], out.stderr
