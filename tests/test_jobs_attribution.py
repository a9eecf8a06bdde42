"""Attribution of GPU energy to jobs, and jobs in the agent's API and metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeNvml
from helpers import http_get, http_json, parse_metrics, run_agent, wait_for

from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import JobError, JobRegistry
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim.gpu import SimProcess


def run_passes(fake: FakeNvml, collector: GpuCollector, jobs: JobRegistry, seconds: float) -> None:
    for _ in range(round(seconds / 0.1)):
        fake.clock.advance(0.1)
        jobs.attribute(collector.collect())


def test_job_energies_plus_idle_add_up_to_the_gpu_energy_within_1_percent(
    fake_nvml: FakeNvml,
) -> None:
    fleet = fake_nvml.fleet
    jobs = JobRegistry(monotonic=fake_nvml.clock)
    collector = GpuCollector(NvmlBackend(), monotonic=fake_nvml.clock)
    try:
        run_passes(fake_nvml, collector, jobs, 5.0)  # idle: learns each GPU's idle power
        start = fleet[0].true_energy_j()
        fleet[0].add_process(SimProcess(101, 0.7, 10**9))
        jobs.register("train-a", 101, 0)
        run_passes(fake_nvml, collector, jobs, 20.0)
        fleet[0].add_process(SimProcess(102, 0.3, 10**9))
        jobs.register("train-b", 102, 0)
        run_passes(fake_nvml, collector, jobs, 20.0)
        total = fleet[0].true_energy_j() - start
        split = jobs.gpu_splits()[0]
        idle_since_start = 70.0 * 40.0
        job_energy = sum(j.energy_j for j in jobs.jobs())
        assert split.idle_power_w == pytest.approx(70.0, rel=0.01)
        assert job_energy + idle_since_start == pytest.approx(total, rel=0.01)
        assert split.unattributed_j < 0.01 * total
    finally:
        collector.close()


def test_two_jobs_sharing_a_gpu_split_within_5_percent_of_ground_truth(
    fake_nvml: FakeNvml,
) -> None:
    fleet = fake_nvml.fleet
    jobs = JobRegistry(monotonic=fake_nvml.clock)
    collector = GpuCollector(NvmlBackend(), monotonic=fake_nvml.clock)
    try:
        run_passes(fake_nvml, collector, jobs, 3.0)
        for pid, util, name in ((201, 0.6, "big"), (202, 0.25, "small")):
            fleet[4].add_process(SimProcess(pid, util, 10**9))
            jobs.register(name, pid, 4)
        run_passes(fake_nvml, collector, jobs, 30.0)
        by_name = {j.name: j.energy_j for j in jobs.jobs()}
        assert by_name["big"] == pytest.approx(fleet[4].true_process_energy_j(201), rel=0.05)
        assert by_name["small"] == pytest.approx(fleet[4].true_process_energy_j(202), rel=0.05)
        assert by_name["big"] > 2 * by_name["small"]
    finally:
        collector.close()


def test_registry_refuses_bad_names_priorities_and_unknown_jobs() -> None:
    jobs = JobRegistry()
    with pytest.raises(JobError, match="job name"):
        jobs.register("bad name!", 1, 0)
    with pytest.raises(JobError, match="priority must be one of high, normal, low"):
        jobs.register("ok", 1, 0, "urgent")
    with pytest.raises(JobError, match="no job named 'ghost'"):
        jobs.unregister("ghost")


def test_a_job_shows_in_metrics_with_energy_and_its_power_moves_with_it(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with run_agent(tmp_path / "state", "--sim", "4", "--window-s", "1") as agent:
            url, tok = agent.url, agent.token
            body = {"name": "llm-train", "pid": sleeper.pid, "gpu": 1, "priority": "high"}
            status, job = http_json(url + "/api/v1/jobs", body, token=tok)
            assert status == 201 and job["gpu"] == 1
            http_json(url + "/api/v1/jobs/llm-train/progress",
                      {"step": 10, "samples": 80, "tokens": 40960}, token=tok)  # fmt: skip

            def job_metrics() -> dict[str, list[tuple[dict[str, str], float]]] | None:
                m = parse_metrics(http_get(url + "/metrics")[1].decode())
                energy = [v for lab, v in m.get("gpu_job_energy_joules_total", [])
                          if lab["job"] == "llm-train" and lab["gpu"] == "1"]  # fmt: skip
                return m if energy and energy[0] > 0 else None

            m = wait_for(job_metrics, timeout_s=15, what="job energy > 0 in /metrics")
            assert any(lab["job"] == "llm-train" for lab, _ in m["wattwarden_job_tokens_per_joule"])
            # move it to GPU 3 (what a migration does): GPU 1's power falls, GPU 3's rises
            status, _ = http_json(url + "/api/v1/jobs", {**body, "gpu": 3}, token=tok)
            assert status == 200

            def moved() -> bool:
                m = parse_metrics(http_get(url + "/metrics")[1].decode())
                power = {lab["gpu"]: v for lab, v in m["gpu_power_watts"]}
                return power["3"] > 400 and power["1"] < 100

            wait_for(moved, timeout_s=15, what="power to move from GPU 1 to GPU 3")
            status, jobs = http_json(url + "/api/v1/jobs")
            assert set(jobs["jobs"][0]["energy_joules_by_gpu"]) == {"1", "3"}
            assert http_json(url + "/api/v1/jobs/llm-train", method="DELETE")[0] == 401
            req_status, _ = http_json(url + "/api/v1/jobs/llm-train", token=tok, method="DELETE")
            assert req_status == 200
            assert http_json(url + "/api/v1/jobs/llm-train")[0] == 404
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_job_whose_process_died_is_unregistered(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        body = {"name": "orphan", "pid": gone.pid, "gpu": 0}
        status, _ = http_json(agent.url + "/api/v1/jobs", body, token=agent.token)
        assert status == 201
        wait_for(
            lambda: http_json(agent.url + "/api/v1/jobs")[1]["jobs"] == [],
            timeout_s=10,
            what="the dead job to be reaped",
        )
    assert os.path.exists(agent.state_dir / "token")


def test_energy_endpoint_reads_counters_now(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        _, first = http_json(agent.url + "/api/v1/energy")

        def advanced() -> dict[str, Any] | None:
            reading = http_json(agent.url + "/api/v1/energy")[1]
            later = reading["gpus"][0]["energy_joules"] > first["gpus"][0]["energy_joules"]
            return reading if later else None

        second = wait_for(advanced, timeout_s=5, what="the energy counter to advance")
        assert [g["index"] for g in second["gpus"]] == [0, 1]
        assert second["gpus"][0]["uuid"].startswith("GPU-")
