"""The simulated node the policy tests and benchmarks run on behaves as the agent's parts do."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from wattwarden.nodesim import SimJob, SimNode
from wattwarden.policies.base import Intent, PolicyInputs


class CapAll:
    name = "cap"

    def __init__(self, watts: float) -> None:
        self.watts = watts

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        return [Intent(v.sample.info.index, self.watts, "cap") for v in inputs.snapshot.gpus]


def test_a_job_loads_its_gpu_and_progresses_slower_under_a_cap(tmp_path: Path) -> None:
    free = SimNode(2, state_dir=tmp_path / "a")
    capped = SimNode(2, state_dir=tmp_path / "b", policies=[CapAll(300.0)], mode="apply")
    for node in (free, capped):
        node.add_job(SimJob("train", 0, utilization=1.0, steps_per_s=2.0))
        node.run(30)
    assert free.fleet[0].true_power_w() > 600 > 90 > free.fleet[1].true_power_w()
    assert capped.fleet[0].true_power_w() <= 300.0 + 1e-6
    assert 0 < capped.sim_jobs["train"].steps < free.sim_jobs["train"].steps <= 60.0 + 1e-6
    assert free.jobs.get("train").step == int(free.sim_jobs["train"].steps)
    capped.close()
    assert capped.limits_w() == [700.0, 700.0]


def test_a_move_resumes_from_the_last_checkpoint_on_the_target_gpu(tmp_path: Path) -> None:
    node = SimNode(4, state_dir=tmp_path)
    job = node.add_job(SimJob("train", 1, checkpoint_every=10, restart_s=5.0))
    node.run(25)
    done = job.steps
    node.jobs.request_migration("train", 3)
    node.run(1)
    assert job.steps == job.checkpoint == 20 < done and job.resumes_at is not None
    assert node.fleet[1].true_utilization() == 0.0  # its load left the old GPU at once
    node.run(6)
    assert node.jobs.get("train").gpu == 3 and node.fleet[3].true_utilization() > 0.8
    assert job.moves == [(1, 3, job.moves[0][2])] and job.steps > 20
