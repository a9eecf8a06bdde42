"""``wattwarden demo``: agent, policy engine on a budget, simulated jobs and the dashboard, as one
command that Ctrl-C stops whole.

One demo run on 4 simulated GPUs is shared by the tests of its running state; the last of them
stops it with SIGINT. A second, smaller run has one of its jobs killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from demorun import DemoRun, start_demo, stop_demo
from helpers import finish, free_port, http_get, http_json, wait_for

pytest.importorskip("streamlit")

H100_DEFAULT_W = 700.0


def gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() for p in processes)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    tmp = tmp_path_factory.mktemp("demo")
    run = start_demo(tmp, "--listen", f"127.0.0.1:{free_port()}", "--gpus", "4")
    try:
        yield run
    finally:
        stop_demo(run)


def test_the_block_says_the_dashboard_agent_budget_and_jobs(demo: DemoRun) -> None:
    assert demo.dashboard_url.startswith("http://127.0.0.1:")
    assert demo.agent_url.startswith("http://127.0.0.1:")
    budget = demo.line("Budget")
    assert budget.startswith("1820 W, 65% of the GPUs' 2800 W default limits")
    assert "thermal, budget, idle" in budget
    assert "mode apply" in budget
    assert re.search(r"train-llm\s+GPU 0\s+high\s+steady", demo.block)
    assert re.search(r"eval-run1\s+GPU 1\s+low\s+steady", demo.block)
    assert re.search(r"finetune\s+GPU 2\s+normal\s+bursty", demo.block)
    assert demo.line("Idle").startswith("GPU 3 ")
    assert demo.files.is_dir()


def test_the_dashboard_answers_its_health_check(demo: DemoRun) -> None:
    assert http_get(demo.dashboard_url + "/_stcore/health") == (200, b"ok")


def test_the_agent_acts_on_the_budget_with_thermal_budget_and_idle(demo: DemoRun) -> None:
    state = demo.state()
    assert state["backend"] == "sim"
    assert len(state["gpus"]) == 4
    assert state["power_budget_watts"] == 1820
    assert state["policy_mode"] == "apply"
    status, policy = http_json(demo.agent_url + "/api/v1/policy")
    assert status == 200
    assert {name for name, on in policy["policies"].items() if on} == {"thermal", "budget", "idle"}


def test_the_jobs_run_with_their_priorities_and_report_progress(demo: DemoRun) -> None:
    expected = {"train-llm": ("high", 0), "eval-run1": ("low", 1), "finetune": ("normal", 2)}

    def progressing() -> dict[str, dict[str, Any]] | None:
        jobs = demo.jobs()
        running = {n: j for n, j in jobs.items() if n in expected and j["state"] == "running"}
        if len(running) < len(expected) or any(j["step"] < 2 for j in running.values()):
            return None
        return running

    jobs = wait_for(progressing, timeout_s=60, what="three jobs past step 2")
    for name, (priority, gpu) in expected.items():
        job = jobs[name]
        assert (job["priority"], job["gpu"]) == (priority, gpu), job
        assert job["samples"] > job["step"] > 0
        assert job["tokens"] > 0
        assert job["migratable"] is True  # run under the supervisor, which follows moves


def test_ctrl_c_stops_everything_and_the_limits_come_back(demo: DemoRun) -> None:
    # the budget (65 % of the defaults) under three busy GPUs: a limit is capped before the stop
    def capped() -> list[int]:
        return [
            g["index"] for g in demo.state()["gpus"] if g["power_limit_watts"] < H100_DEFAULT_W - 1
        ]

    wait_for(capped, timeout_s=60, what="a GPU capped under the budget")
    processes = demo.descendants()
    commands = [" ".join(p.cmdline()[1:4]) for p in processes]
    assert commands.count("-m wattwarden agent") == 1
    assert commands.count("-m streamlit run") == 1
    assert commands.count("-m wattwarden job") == 3
    assert sum(c.startswith("-m wattwarden.demo_worker ") for c in commands) == 3
    files = demo.files

    demo.proc.send_signal(signal.SIGINT)
    code, err = demo.wait(timeout_s=90)
    out = demo.rest_of_stdout()
    assert code == 0, err
    assert "Traceback" not in err
    assert "power limits back at their defaults on all 4 GPU(s)" in out
    wait_for(lambda: gone(processes), timeout_s=10, what="every process of the demo gone")
    assert not files.exists()


def test_bad_flags_are_one_line_and_exit_2() -> None:
    for args, said in [
        (["--gpus", "0"], "--gpus: must be within 1..64, got 0"),
        (["--gpus", "65"], "--gpus: must be within 1..64, got 65"),
        (["--gpus", "many"], "--gpus"),
        (["--listen", "nonsense"], "--listen: expected HOST:PORT"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "wattwarden", "demo", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and said in lines[0], (args, result.stderr)


def test_a_dashboard_port_in_use_is_named_and_nothing_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "wattwarden", "demo", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TMPDIR": str(tmp_path)},
            check=False,
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is already in use" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no temporary state made


def test_a_job_killed_is_named_and_the_rest_stopped_without_orphans(tmp_path: Path) -> None:
    run = start_demo(tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--gpus", "2")
    processes: list[psutil.Process] = []
    try:

        def both_workers() -> list[psutil.Process] | None:
            processes = run.descendants()
            workers = [p for p in processes if p.cmdline()[1:3] == ["-m", "wattwarden.demo_worker"]]
            return processes if len(workers) == 2 else None

        processes = wait_for(both_workers, timeout_s=60, what="both job processes")
        (supervisor,) = [
            p for p in processes if "job run --name train-llm " in " ".join(p.cmdline())
        ]
        (worker,) = supervisor.children()
        supervisor.kill()  # its job process is orphaned: the demo must end it too
        code, err = run.wait(timeout_s=90)
        assert code == 1, err
        assert "job train-llm exited unexpectedly (killed by SIGKILL); stopping the rest" in err
        assert "Traceback" not in err
        wait_for(lambda: gone([*processes, worker]), timeout_s=10, what="no orphan left")
        assert not run.files.exists()
    finally:
        stop_demo(run)
        for p in processes:  # what a failure of the demo's would leave behind
            with contextlib.suppress(psutil.Error):
                p.kill()


# ------------------------------------------------------------------ the demo's job process
def start_worker(agent: Any, name: str, checkpoint: Path, *args: str) -> subprocess.Popen[str]:
    """``python -m wattwarden.demo_worker`` as ``job run`` starts it on GPU 0, registered."""
    env = {
        **os.environ,
        "WATTWARDEN_AGENT_URL": agent.url,
        "WATTWARDEN_JOB_NAME": name,
        "WATTWARDEN_TOKEN": agent.token,
        "CUDA_VISIBLE_DEVICES": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "wattwarden.demo_worker", "--checkpoint", str(checkpoint), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    body = {"name": name, "pid": proc.pid, "gpu": 0, "priority": "low"}
    assert http_json(agent.url + "/api/v1/jobs", body, token=agent.token)[0] in (200, 201)
    return proc


@pytest.fixture
def busy_agent() -> Iterator[Any]:
    from wattwarden.api.testing import SimAgent

    with SimAgent() as agent:
        agent.fleet[0].set_load(1.0)  # full clocks on GPU 0
        agent.sample()
        yield agent


def job_step(agent: Any, name: str) -> int:
    status, job = http_json(f"{agent.url}/api/v1/jobs/{name}")
    assert status == 200
    return int(job["step"])


def test_a_batch_worker_finishes_at_its_steps_with_its_progress_reported(
    busy_agent: Any, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "eval.json"
    proc = start_worker(
        busy_agent, "eval", checkpoint, "--steps", "40", "--steps-per-s", "30",
        "--samples-per-step", "8", "--tokens-per-step", "100",
    )  # fmt: skip
    code, err = finish(proc)
    assert code == 0, err
    assert json.loads(checkpoint.read_text())["step"] == 40
    job = http_json(busy_agent.url + "/api/v1/jobs/eval")[1]
    assert (job["step"], job["samples"], job["tokens"]) == (40, 320, 4000)


def test_a_worker_resumes_from_its_checkpoint_and_stops_on_sigterm(
    busy_agent: Any, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "train.json"
    checkpoint.write_text(json.dumps({"step": 1000.0}))
    proc = start_worker(busy_agent, "train", checkpoint, "--steps-per-s", "20")
    try:
        # resumed: the first progress it reports is past the checkpoint's step, not from 0
        wait_for(lambda: job_step(busy_agent, "train") > 1000, what="progress past step 1000")
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc, timeout_s=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert json.loads(checkpoint.read_text())["step"] >= job_step(busy_agent, "train") > 1000


def test_load_shapes_bursty_and_diurnal() -> None:
    from wattwarden.demo_worker import shape_utilization

    bursty = [shape_utilization("bursty", t, 0.1, 0.9) for t in (0, 19.9, 20, 29.9, 30)]
    assert bursty == [0.9, 0.9, 0.1, 0.1, 0.9]  # 20 s high, 10 s low, again
    diurnal = [shape_utilization("diurnal", t, 0.1, 0.9) for t in (0, 60, 120, 180, 240)]
    assert diurnal == pytest.approx([0.1, 0.5, 0.9, 0.5, 0.1])
    assert shape_utilization("steady", 77, 0.1, 0.9) == 0.9


def test_the_mix_scales_with_the_fleet() -> None:
    from wattwarden.demo import plan_jobs, power_budget_watts

    assert [(j.name, j.gpu) for j in plan_jobs(1)] == [("train-llm", 0)]
    eight = plan_jobs(8)
    assert [j.gpu for j in eight] == [0, 1, 2, 3, 4, 5]  # GPUs 6 and 7 idle
    assert {j.kind.priority for j in eight} == {"high", "normal", "low"}
    assert {j.kind.shape for j in eight} == {"steady", "bursty", "diurnal"}
    big = plan_jobs(64)
    assert len(big) == 48
    assert len({j.gpu for j in big}) == 48 and max(j.gpu for j in big) > 56  # spread out
    assert len({j.name for j in big}) == 48
    assert power_budget_watts(8) == 3640  # 65 % of 8 x 700 W
