"""Migration end to end: the agent moves a job off a lost GPU, and it resumes from its checkpoint.

The real agent (simulated fleet, ``--apply``, its control loop running the migration planner),
the real supervisor (``wattwarden job run``) and the reference training workload, tiny and on
the CPU: the GPU falls off the bus through the simulator's fault API, the agent asks the job to
move, the supervisor stops it (it checkpoints on SIGTERM) and starts it again on another GPU,
where its simulated load now shows, and it carries on from the step it stopped at.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import finish, http_get, http_json, parse_metrics, run_agent, wait_for

pytest.importorskip("torch")  # the reference workload trains a PyTorch model

GPUS = 4
LOST = 2


def gpu_state(url: str, index: int) -> dict[str, Any]:
    status, state = http_json(url + "/api/v1/state")
    assert status == 200
    (gpu,) = [g for g in state["gpus"] if g["index"] == index]
    return dict(gpu)


def test_a_lost_gpus_job_is_restarted_on_another_gpu_and_resumes_from_its_checkpoint(
    tmp_path: Path,
):
    ckdir, report = tmp_path / "ck", tmp_path / "report.json"

    def newest() -> int:
        return max((int(p.stem[5:]) for p in ckdir.glob("ckpt-*.pt")), default=0)

    with run_agent(tmp_path / "state", "--sim", str(GPUS), "--apply") as agent:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTWARDEN_")}
        cmd = [
            sys.executable, "-m", "wattwarden", "job", "run", "--name", "lm",
            "--gpu", str(LOST), "--priority", "high",
            "--agent", agent.url, "--token-file", str(agent.state_dir / "token"),
            "--poll-interval", "0.2", "--",
            sys.executable, "-m", "wattwarden", "workload", "train", "--steps", "1000000",
            "--batch-size", "2", "--seq-len", "16", "--threads", "1", "--checkpoint-every", "5",
            "--checkpoint-dir", str(ckdir), "--report", str(report),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        try:
            before_fault = wait_for(newest, timeout_s=90, what="a first checkpoint on GPU 2")
            assert gpu_state(agent.url, LOST)["utilization_ratio"] > 0.5  # its load is there
            status, body = http_json(
                agent.url + "/api/v1/sim/faults", {"gpu": LOST, "fault": "lost"}, token=agent.token
            )
            assert status == 200, body

            def moved() -> list[int]:
                status, job = http_json(agent.url + "/api/v1/jobs/lm")
                gpu = job.get("gpu") if status == 200 else None
                return [] if gpu in (None, LOST) else [int(gpu)]  # GPU 0 is a GPU, not a no

            (new_gpu,) = wait_for(moved, timeout_s=90, what="the job registered on another GPU")
            assert gpu_state(agent.url, LOST)["up"] is False
            wait_for(
                lambda: gpu_state(agent.url, new_gpu)["utilization_ratio"] > 0.5,
                timeout_s=30,
                what=f"the job's simulated load on GPU {new_gpu}",
            )
            stopped_at = newest()
            wait_for(lambda: newest() > stopped_at, timeout_s=90, what="progress on the new GPU")
            metrics = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
            proc.send_signal(signal.SIGTERM)
        finally:
            code, err = finish(proc, timeout_s=120)
    assert code == 128 + signal.SIGTERM, err
    assert f"moving job lm from GPU {LOST} to GPU {new_gpu}" in err
    migrations = {
        labels["reason"]: value
        for labels, value in metrics.get("wattwarden_job_migrations_total", [])
    }
    assert migrations.get("lost") == 1.0, migrations
    assert sum(migrations.values()) == 1.0  # one move, for that reason alone
    final = json.loads(report.read_text())  # written by the run on the new GPU
    assert final["start_step"] >= before_fault > 0  # it resumed, it did not start over
    assert final["resumed_from"].endswith(f"ckpt-{final['start_step']:09d}.pt")
    assert final["final_step"] > final["start_step"]
