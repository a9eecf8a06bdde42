"""Attribution of GPU energy to jobs, and jobs in the agent's API and metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeNvml
from helpers import http_get, http_json, parse_metrics, run_agent, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import JobError, JobRegistry
from wattwarden.hardware.nvml import NvmlBackend, install_fake_nvml, uninstall_fake_nvml
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.gpu import SimProcess


def run_passes(fake: FakeNvml, collector: GpuCollector, jobs: JobRegistry, seconds: float) -> None:
    for _ in range(round(seconds / 0.1)):
        fake.clock.advance(0.1)
        jobs.attribute(collector.collect())


@contextmanager
def sim_gpu(model: str = "h100-sxm") -> Iterator[tuple[ManualClock, SimFleet, GpuCollector]]:
    """One simulated GPU read through the fake NVML and the real collector (no fixture, so
    Hypothesis can build a fresh one for every example)."""
    clock = ManualClock()
    fleet = SimFleet(1, model=model, clock=clock)
    install_fake_nvml(fleet)
    collector = GpuCollector(NvmlBackend(), monotonic=clock)
    try:
        yield clock, fleet, collector
    finally:
        collector.close()
        uninstall_fake_nvml()


def passes(clock: ManualClock, collector: GpuCollector, jobs: JobRegistry, n: int) -> None:
    for _ in range(n):
        clock.advance(0.1)
        jobs.attribute(collector.collect())


@settings(max_examples=100, deadline=None)
@given(
    idle_passes=st.integers(min_value=20, max_value=80),
    offset_s=st.floats(min_value=0.0, max_value=0.099),
    utilization=st.floats(min_value=0.05, max_value=1.0),
)
def test_job_energy_is_within_2_percent_of_ground_truth_at_every_load_start_phase(
    idle_passes: int, offset_s: float, utilization: float
) -> None:
    # The load starts at any phase of the once-a-second utilization read (and between two
    # 100 ms power reads): busy power within that second must never be learned as idle.
    with sim_gpu() as (clock, fleet, collector):
        jobs = JobRegistry(monotonic=clock)
        passes(clock, collector, jobs, 1)
        first_j = collector.latest[0].energy_j
        passes(clock, collector, jobs, idle_passes - 1)
        clock.advance(offset_s)
        fleet[0].add_process(SimProcess(101, utilization, 10**9))
        jobs.register("train", 101, 0)
        passes(clock, collector, jobs, 200)
        gpu_j = collector.latest[0].energy_j - first_j
        split = jobs.gpu_splits()[0]
        job_j = jobs.get("train").energy_j
        assert job_j + split.idle_j + split.unattributed_j == pytest.approx(gpu_j, rel=1e-9)
        assert job_j == pytest.approx(fleet[0].true_process_energy_j(101), rel=0.02)
        assert split.idle_power_w == pytest.approx(fleet[0].spec.idle_w, rel=0.01)


def test_idle_power_is_never_taken_above_the_boards_minimum_power_limit() -> None:
    # Busy from the first read: nothing proves an idle interval, and the lowest power seen is
    # busy power. What counts as idle stays at or under what the board can idle at.
    with sim_gpu() as (clock, fleet, collector):
        fleet[0].add_process(SimProcess(101, 0.9, 10**9))
        jobs = JobRegistry(monotonic=clock)
        jobs.register("busy", 101, 0)
        passes(clock, collector, jobs, 50)
        split = jobs.gpu_splits()[0]
        assert split.idle_power_w is not None
        assert split.idle_power_w <= fleet[0].spec.power_min_w
        assert jobs.get("busy").energy_j > 0


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
            job_url = url + "/api/v1/jobs/llm-train"
            req_status, ended = http_json(job_url, token=tok, method="DELETE")
            assert req_status == 200 and ended["state"] == "finished"
            # finished, not forgotten: its record and final counters stay for the retention
            status, kept = http_json(job_url)
            assert status == 200 and kept["state"] == "finished"
            assert kept["energy_joules"] >= ended["energy_joules"] > 0
            m = parse_metrics(http_get(url + "/metrics")[1].decode())
            assert any(lab["job"] == "llm-train" for lab, _ in m["gpu_job_energy_joules_total"])
            assert not any(lab["job"] == "llm-train" for lab, _ in m.get("gpu_job_power_watts", []))
            assert http_json(url + "/api/v1/jobs/never-registered")[0] == 404
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_job_whose_process_died_is_reaped_and_kept_as_finished(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        body = {"name": "orphan", "pid": gone.pid, "gpu": 0}
        status, _ = http_json(agent.url + "/api/v1/jobs", body, token=agent.token)
        assert status == 201

        def finished() -> list[dict[str, Any]]:
            jobs = http_json(agent.url + "/api/v1/jobs")[1]["jobs"]
            return [j for j in jobs if j["state"] == "finished"]

        jobs = wait_for(finished, timeout_s=10, what="the dead job to be reaped")
        assert [j["name"] for j in jobs] == ["orphan"] and jobs[0]["finished_at"] is not None
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
