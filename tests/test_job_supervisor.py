"""`wattwarden job run`: registration, environment, signal forwarding, unregistering, migration."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    finish,
    http_get,
    http_json,
    parse_metrics,
    refused_port,
    run_agent,
    wait_for,
)

from wattwarden.api.testing import SimAgent
from wattwarden.collectors.jobs import Job, JobError, SchedulerRef
from wattwarden.hardware.sim.fleet import SimFleet

TOKEN = "job-test-token"

# A stand-in workload: records its pid and environment, then exits or waits for a signal.
CHILD = r"""
import json, os, signal, sys, threading, time
out_dir, mode = sys.argv[1], sys.argv[2]
got, received = threading.Event(), []
def on_signal(signum, frame):
    received.append(signum)
    got.set()
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
env = {k: v for k, v in os.environ.items() if k.startswith(("CUDA_VISIBLE", "WATTWARDEN_"))}
tmp = os.path.join(out_dir, ".start.tmp%d" % os.getpid())
with open(tmp, "w") as f:
    json.dump({"pid": os.getpid(), "env": env, "t": time.time()}, f)
os.replace(tmp, os.path.join(out_dir, "start-%d.json" % os.getpid()))
if mode == "exit3":
    sys.exit(3)
got.wait(120)
tmp = os.path.join(out_dir, ".sig.tmp%d" % os.getpid())
with open(tmp, "w") as f:
    json.dump(received, f)
os.replace(tmp, os.path.join(out_dir, "signals-%d.json" % os.getpid()))
sys.exit(7)
"""


class Registrations:
    """What the agent's job registry was told: (pid, gpu, priority) per registration."""

    def __init__(self, agent: SimAgent) -> None:
        self.seen: list[tuple[int, int, str]] = []
        agent.jobs.add_listener(self._on_change)

    def _on_change(self, old: Job | None, new: Job | None) -> None:
        if new is not None:
            self.seen.append((new.pid, new.gpu, new.priority))


@pytest.fixture
def agent() -> Iterator[SimAgent]:
    with SimAgent(SimFleet(4), token=TOKEN) as a:
        yield a


def state_of(agent: SimAgent, name: str) -> str | None:
    """The job's state at the agent (running, finished), None if it never heard of it."""
    try:
        return agent.jobs.get(name).state
    except JobError:
        return None


def running_pid(agent: SimAgent, name: str) -> int | None:
    return agent.jobs.get(name).pid if state_of(agent, name) == "running" else None


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "out").mkdir()
    return tmp_path


SCHEDULER_ENV = ("SLURM_JOB_ID", "POD_NAMESPACE", "POD_NAME")


def supervise(
    workdir: Path, url: str, mode: str, *extra: str, name: str = "j1",
    env_extra: dict[str, str] | None = None,
) -> subprocess.Popen[str]:  # fmt: skip
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WATTWARDEN_") and k not in SCHEDULER_ENV
    }
    env.update(env_extra or {})
    cmd = [
        sys.executable, "-m", "wattwarden", "job", "run", "--name", name, "--agent", url,
        "--token-file", str(workdir / "token"), "--poll-interval", "0.1", *extra,
        "--", sys.executable, str(workdir / "child.py"), str(workdir / "out"), mode,
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def starts(workdir: Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in (workdir / "out").glob("start-*.json")]
    return sorted(found, key=lambda s: s["t"])


def signals_of(workdir: Path, pid: int) -> list[int] | None:
    path = workdir / "out" / f"signals-{pid}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_registers_the_child_with_its_env_and_exits_with_its_code(agent: SimAgent, workdir: Path):
    registrations = Registrations(agent)
    proc = supervise(workdir, agent.url, "exit3", "--gpu", "1", "--priority", "high")
    code, err = finish(proc)
    assert code == 3, err
    (child,) = starts(workdir)
    assert registrations.seen == [(child["pid"], 1, "high")]
    assert [r.status for r in agent.matching("POST", "/api/v1/jobs")] == [201]  # the token held
    assert child["env"] == {
        "CUDA_VISIBLE_DEVICES": "1",
        "WATTWARDEN_AGENT_URL": agent.url,
        "WATTWARDEN_JOB_NAME": "j1",
        "WATTWARDEN_TOKEN": TOKEN,
    }
    assert [r.status for r in agent.matching("DELETE", "/api/v1/jobs/j1")] == [200]
    assert state_of(agent, "j1") == "finished"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_forwards_the_signal_to_the_child_once_and_unregisters(
    agent: SimAgent, workdir: Path, sig: signal.Signals
):
    proc = supervise(workdir, agent.url, "wait")
    try:
        (child,) = wait_for(lambda: starts(workdir), what="the child to start")
        agent.wait_until(lambda: running_pid(agent, "j1") == child["pid"], what="registration")
        proc.send_signal(sig)
    finally:
        code, err = finish(proc)
    assert code == 7, err  # the child's own exit code
    assert signals_of(workdir, child["pid"]) == [sig]
    assert state_of(agent, "j1") == "finished"
    assert len(starts(workdir)) == 1  # a stop is not a migration


def test_moves_the_job_when_the_agent_sets_a_target_gpu(agent: SimAgent, workdir: Path):
    registrations = Registrations(agent)
    proc = supervise(workdir, agent.url, "wait", "--gpu", "0")
    try:
        (first,) = wait_for(lambda: starts(workdir), what="the first child")
        agent.wait_until(lambda: running_pid(agent, "j1") == first["pid"], what="registration")
        status, body = http_json(f"{agent.url}/api/v1/jobs/j1/migrate", {"gpu": 2}, token=TOKEN)
        assert status == 200 and body["target_gpu"] == 2
        second = wait_for(lambda: starts(workdir)[1:], what="a restart")[0]
        agent.wait_until(lambda: running_pid(agent, "j1") == second["pid"], what="re-registration")
        proc.send_signal(signal.SIGTERM)
    finally:
        code, err = finish(proc)
    assert code == 7, err
    assert "moving job j1 from GPU 0 to GPU 2" in err
    assert signals_of(workdir, first["pid"]) == [signal.SIGTERM]  # stopped to checkpoint
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert second["env"]["CUDA_VISIBLE_DEVICES"] == "2"
    assert second["env"]["WATTWARDEN_JOB_NAME"] == "j1"
    assert registrations.seen == [(first["pid"], 0, "normal"), (second["pid"], 2, "normal")]
    assert len(starts(workdir)) == 2
    assert state_of(agent, "j1") == "finished" and agent.jobs.get("j1").target_gpu is None


def test_unreachable_agent_at_start_exits_1_without_running_the_command(workdir: Path):
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"
        code, err = finish(supervise(workdir, url, "exit3"))
    assert code == 1
    assert err.strip().splitlines() == [
        f"wattwarden job: cannot reach the agent at {url}: [Errno 111] Connection refused; "
        "start it with `wattwarden agent`, or pass --agent URL"
    ]
    assert starts(workdir) == []


def test_a_wrong_token_is_a_clear_error_and_the_child_is_stopped(workdir: Path):
    def answer_once_the_child_runs(method: str, path: str) -> None:
        # hold the 401 until the child has installed its SIGTERM handler and said so
        if method == "POST" and path == "/api/v1/jobs":
            wait_for(lambda: starts(workdir) or None, timeout_s=4, what="the child's start record")

    with SimAgent(token="another-token") as agent:
        agent.on_request = answer_once_the_child_runs
        code, err = finish(supervise(workdir, agent.url, "wait"))
    assert code == 1
    assert "cannot register job j1" in err and "401" in err and "--token-file" in err
    assert agent.jobs.jobs() == []
    # the supervisor stopped its child with SIGTERM and waited for it to exit
    (child,) = starts(workdir)
    assert signals_of(workdir, child["pid"]) == [signal.SIGTERM]


def test_training_job_moves_to_another_gpu_and_resumes_from_its_checkpoint(tmp_path: Path):
    pytest.importorskip("torch")
    ckdir, report = tmp_path / "ck", tmp_path / "report.json"

    def newest() -> int:
        return max((int(p.stem[5:]) for p in ckdir.glob("ckpt-*.pt")), default=0)

    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTWARDEN_")}
        cmd = [
            sys.executable, "-m", "wattwarden", "job", "run", "--name", "lm", "--gpu", "0",
            "--agent", agent.url, "--token-file", str(agent.state_dir / "token"),
            "--poll-interval", "0.2", "--",
            sys.executable, "-m", "wattwarden", "workload", "train", "--steps", "1000000",
            "--batch-size", "2", "--seq-len", "16", "--threads", "1", "--checkpoint-every", "5",
            "--checkpoint-dir", str(ckdir), "--report", str(report),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(newest, timeout_s=60, what="a first checkpoint")
            status, body = http_json(
                f"{agent.url}/api/v1/jobs/lm/migrate", {"gpu": 1}, token=agent.token
            )
            assert status == 200, body

            def moved() -> bool:
                status, job = http_json(f"{agent.url}/api/v1/jobs/lm")
                return status == 200 and job["gpu"] == 1

            wait_for(moved, timeout_s=60, what="the job registered on GPU 1")
            stopped_at = newest()  # the checkpoint the first run wrote on SIGTERM
            wait_for(lambda: newest() > stopped_at, timeout_s=60, what="progress on GPU 1")

            def job_in_metrics() -> dict[str, float] | None:
                m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
                energy = {lab["gpu"]: v for lab, v in m.get("gpu_job_energy_joules_total", [])
                          if lab["job"] == "lm"}  # fmt: skip
                power = {lab["gpu"]: v for lab, v in m["gpu_power_watts"]}
                efficiency = [v for lab, v in m.get("wattwarden_job_tokens_per_joule", [])
                              if lab["job"] == "lm"]  # fmt: skip
                done = energy.get("0", 0) > 0 and energy.get("1", 0) > 0 and efficiency
                return power if done and power["1"] > power["0"] else None

            # its energy shows up in /metrics on both GPUs, and its power now draws on GPU 1
            wait_for(job_in_metrics, timeout_s=30, what="the job's energy and power in /metrics")
            proc.send_signal(signal.SIGTERM)
        finally:
            code, err = finish(proc, timeout_s=120)
        assert code == 128 + signal.SIGTERM, err
        status, ended = http_json(f"{agent.url}/api/v1/jobs/lm")
        assert status == 200 and ended["state"] == "finished"  # unregistered when it exited
    assert "moving job lm from GPU 0 to GPU 1" in err
    (per_gpu,) = [line for line in err.splitlines() if "per GPU: " in line]
    assert "GPU 0: " in per_gpu and "GPU 1: " in per_gpu  # it moved: its cost on each
    final = json.loads(report.read_text())  # written by the run on GPU 1
    assert final["resumed_from"].endswith(f"ckpt-{stopped_at:09d}.pt")
    assert final["start_step"] == stopped_at and final["final_step"] > stopped_at
    # a CPU run reports CPU energy (RAPL) or none; its simulated GPU's energy is in /metrics
    assert final["energy_device"] == "cpu" and final["gpus"] == []


SUMMARY = re.compile(
    r"energy (?P<j>[\d.]+) J \((?P<wh>[\d.]+) Wh\), mean power (?P<w>[\d.]+) W, "
    r"tokens/J (?P<tpj>\S+)"
)


def test_job_run_prints_what_the_job_cost_and_the_agent_keeps_its_totals(
    tmp_path: Path, workdir: Path
) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        (workdir / "token").write_text(agent.token + "\n")
        proc = supervise(workdir, agent.url, "wait", "--gpu", "1", name="costly")
        try:
            wait_for(
                lambda: http_json(f"{agent.url}/api/v1/jobs/costly")[1]["energy_joules"] > 100,
                timeout_s=30,
                what="the job to draw energy",
            )
            proc.send_signal(signal.SIGTERM)
        finally:
            code, err = finish(proc)
        assert code == 7, err
        status, record = http_json(f"{agent.url}/api/v1/jobs/costly")
        assert status == 200 and record["state"] == "finished"
        assert record["finished_at"] >= record["registered_at"]
        assert record["duration_seconds"] > 0 and record["energy_joules"] > 100
        m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
        kept = [v for lab, v in m["gpu_job_energy_joules_total"] if lab["job"] == "costly"]
        assert kept == [pytest.approx(record["energy_joules"])]
    lines = [line for line in err.splitlines() if line.startswith("wattwarden job: ")]
    assert re.search(r"job costly ended \(exit 7\) after \d+\.\d s", err), err
    match = SUMMARY.search(err)
    assert match is not None, err
    joules = float(match["j"])
    assert joules == pytest.approx(record["energy_joules"], abs=0.1)
    assert float(match["wh"]) == pytest.approx(joules / 3600, abs=1e-4)
    # the job alone on a simulated GPU at 80 % load: about 0.8 x 630 W of active power
    assert 300 < float(match["w"]) < 600
    assert match["tpj"] == "n/a"  # it reported no tokens
    assert not any("per GPU" in line for line in lines)  # it never moved


def test_a_second_job_run_under_a_running_jobs_name_is_refused_not_taken_over(
    tmp_path: Path, workdir: Path
) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        (workdir / "token").write_text(agent.token + "\n")
        first = supervise(workdir, agent.url, "wait", name="dup")
        try:
            (child,) = wait_for(lambda: starts(workdir), what="the first child")
            wait_for(
                lambda: http_json(f"{agent.url}/api/v1/jobs/dup")[1].get("pid") == child["pid"],
                what="registration",
            )
            code, err = finish(supervise(workdir, agent.url, "wait", name="dup"))
            assert code == 1
            assert "cannot register job dup" in err
            assert f"job 'dup' is running as pid {child['pid']}" in err
            status, job = http_json(f"{agent.url}/api/v1/jobs/dup")
            assert status == 200 and job["pid"] == child["pid"] and job["state"] == "running"
            first.send_signal(signal.SIGTERM)
        finally:
            code, err = finish(first)
        assert code == 7, err


def test_a_job_name_with_a_trailing_newline_is_a_usage_error(agent: SimAgent, workdir: Path):
    code, err = finish(supervise(workdir, agent.url, "exit3", name="a\n"))
    assert code == 2
    assert "--name must be" in err
    assert starts(workdir) == [] and agent.jobs.jobs() == [] and agent.requests == []


@pytest.mark.parametrize(
    ("env", "scheduler"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "4242"}, SchedulerRef("slurm", "4242")),
        ({"POD_NAMESPACE": "ml", "POD_NAME": "train-0"}, SchedulerRef("kubernetes", "ml/train-0")),
        ({"POD_NAME": "train-0"}, None),  # without its namespace a pod cannot be named
    ],
    ids=["none", "slurm", "kubernetes", "pod-without-namespace"],
)
def test_job_run_tells_the_agent_which_scheduler_runs_the_job(
    agent: SimAgent, workdir: Path, env: dict[str, str], scheduler: SchedulerRef | None
) -> None:
    code, err = finish(supervise(workdir, agent.url, "exit3", env_extra=env))
    assert code == 3, err
    assert agent.jobs.get("j1").scheduler == scheduler
    status, record = http_json(f"{agent.url}/api/v1/jobs/j1")
    assert status == 200
    assert record["scheduler"] == (
        None if scheduler is None else {"kind": scheduler.kind, "id": scheduler.id}
    )


def test_a_slurm_job_id_out_of_shape_is_a_usage_error(agent: SimAgent, workdir: Path) -> None:
    code, err = finish(supervise(workdir, agent.url, "exit3", env_extra={"SLURM_JOB_ID": "x1"}))
    assert code == 2
    assert "$SLURM_JOB_ID" in err and "'x1'" in err
    assert starts(workdir) == [] and agent.requests == []


def test_registers_again_when_the_agent_reports_the_job_finished_while_it_runs(
    agent: SimAgent, workdir: Path
):
    registrations = Registrations(agent)
    proc = supervise(workdir, agent.url, "wait")
    try:
        (child,) = wait_for(lambda: starts(workdir), what="the child to start")
        agent.wait_until(lambda: running_pid(agent, "j1") == child["pid"], what="registration")
        agent.jobs.unregister("j1")  # as after a reap while unreachable
        agent.wait_until(lambda: len(registrations.seen) == 2, what="a new registration")
        proc.send_signal(signal.SIGTERM)
    finally:
        code, err = finish(proc)
    assert code == 7, err
    assert [pid for pid, _, _ in registrations.seen] == [child["pid"], child["pid"]]
    assert len(starts(workdir)) == 1  # the process ran on, it was not restarted
    assert state_of(agent, "j1") == "finished"


def test_a_name_taken_by_another_process_is_neither_followed_nor_ended(
    agent: SimAgent, workdir: Path
):
    proc = supervise(workdir, agent.url, "wait", "--gpu", "0")
    try:
        (child,) = wait_for(lambda: starts(workdir), what="the child to start")
        agent.wait_until(lambda: running_pid(agent, "j1") == child["pid"], what="registration")
        # the agent ended the job (a reap) and another process took the name, then was moved
        agent.jobs.unregister("j1")
        agent.jobs.register("j1", os.getpid(), 1)
        agent.jobs.request_migration("j1", 3)
        polls = len(agent.matching("GET", "/api/v1/jobs/j1"))
        agent.wait_until(
            lambda: len(agent.matching("GET", "/api/v1/jobs/j1")) >= polls + 2,
            what="two polls after the name was taken",
        )
        proc.send_signal(signal.SIGTERM)
    finally:
        code, err = finish(proc)
    assert code == 7, err
    assert len(starts(workdir)) == 1  # the other job's move was not followed
    assert running_pid(agent, "j1") == os.getpid()  # and it was not ended at exit
    assert agent.matching("DELETE", "/api/v1/jobs/j1") == []
    assert err.count(f"the agent's job j1 is now pid {os.getpid()}; job j1 runs on untracked") == 1
