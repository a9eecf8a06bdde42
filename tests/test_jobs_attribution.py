"""Attribution of GPU energy to jobs, and jobs in the agent's API and metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeNvml
from helpers import http_get, http_json, parse_metrics, run_agent, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.jobs import (
    IDLE_SMOOTHING,
    IDLE_UTILIZATION,
    GpuSplit,
    JobError,
    JobRegistry,
    idle_ceiling_w,
)
from wattwarden.collectors.samples import GpuSample
from wattwarden.hardware.device import GpuInfo, GpuReading, ProcessUsage
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml, uninstall_fake_nvml
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


# ------------------------------------------------------------------------------------------------
# Attribution on hand-built samples: every figure below is worked out by hand.

INFO = GpuInfo(0, "GPU-hand-0", "Hand GPU", "00000000:01:00.0", "1.0", 2**30, 100.0, 400.0, 300.0)
"""A GPU whose idle ceiling is its 100 W minimum limit."""


def gpu_sample(
    t: float | None,
    energy_j: float,
    *,
    util: float | None = 0.0,
    slow_t: float | None = None,
    processes: tuple[ProcessUsage, ...] = (),
    up: bool = True,
    info: GpuInfo = INFO,
) -> GpuSample:
    """One pass: the energy counter read at ``t``, the utilization read at ``slow_t``."""
    reading = GpuReading(
        None, None, energy_j, None, None, None, util, None, None, None, None, None, None, processes
    )
    return GpuSample(info, up, 0.0, reading, energy_j, "counter", None, None, t, slow_t)


def learn_idle(jobs: JobRegistry, watts: float, info: GpuInfo = INFO) -> None:
    """One proven-idle span of 1 s at ``watts``: idle reads at t=0 and t=1, ending at t=1."""
    jobs.attribute([gpu_sample(0.0, 0.0, slow_t=0.0, info=info)])
    jobs.attribute([gpu_sample(1.0, watts, slow_t=1.0, info=info)])


def split(jobs: JobRegistry, gpu: int = 0) -> tuple[float, float, float | None]:
    s = jobs.gpu_splits()[gpu]
    return s.idle_j, s.unattributed_j, s.idle_power_w


def test_a_jobs_share_is_joules_and_its_power_is_that_share_over_the_pass() -> None:
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    assert split(jobs) == (50.0, 0.0, 50.0)
    jobs.register("train", 7, 0)
    # 0.5 s at 300 W: 150 J, of which 25 J idle (50 W x 0.5 s) and 125 J the job's
    jobs.attribute([gpu_sample(1.5, 200.0, slow_t=1.0)])
    view = jobs.get("train")
    assert view.energy_by_gpu_j == {0: 125.0}
    assert view.power_w == 250.0  # 125 J / 0.5 s
    assert split(jobs) == (75.0, 0.0, 50.0)
    # 0.25 s at 100 W: 25 J, 12.5 J idle, 12.5 J the job's at 50 W
    jobs.attribute([gpu_sample(1.75, 225.0, slow_t=1.0)])
    view = jobs.get("train")
    assert view.energy_by_gpu_j == {0: 137.5} and view.power_w == 50.0
    assert split(jobs) == (87.5, 0.0, 50.0)


def test_a_pass_without_its_own_read_time_is_timed_by_the_registrys_clock() -> None:
    clock = ManualClock(0.0)
    jobs = JobRegistry(monotonic=clock)
    jobs.register("train", 7, 0)
    info = replace(INFO, power_limit_min_w=None, power_limit_max_w=None)
    jobs.attribute([gpu_sample(None, 0.0, util=0.5, slow_t=0.0, info=info)])
    clock.advance(0.5)
    jobs.attribute([gpu_sample(None, 40.0, util=0.5, slow_t=0.0, info=info)])  # 80 W
    clock.advance(0.25)
    jobs.attribute([gpu_sample(None, 70.0, util=0.5, slow_t=0.0, info=info)])  # 120 W
    # idle power is the lowest seen (80 W): the second pass is 20 J idle, 10 J the job's
    assert split(jobs) == (60.0, 0.0, 80.0)
    view = jobs.get("train")
    assert view.energy_by_gpu_j == {0: 10.0} and view.power_w == 40.0


def test_active_energy_on_a_gpu_without_a_job_is_kept_as_unattributed() -> None:
    jobs = JobRegistry()
    jobs.register("elsewhere", 7, 1)
    learn_idle(jobs, 50.0)
    jobs.attribute([gpu_sample(1.5, 200.0, slow_t=1.0)])
    assert split(jobs) == (75.0, 125.0, 50.0)
    jobs.attribute([gpu_sample(2.0, 300.0, slow_t=1.0)])  # 200 W: 25 J idle, 75 J active
    assert split(jobs) == (100.0, 200.0, 50.0)
    view = jobs.get("elsewhere")
    assert view.energy_by_gpu_j == {} and view.power_w == 0.0


def test_a_pass_drawing_less_than_idle_power_is_all_idle_and_nothing_is_negative() -> None:
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    jobs.register("train", 7, 0)
    jobs.attribute([gpu_sample(1.5, 65.0, slow_t=1.0)])  # 30 W for 0.5 s
    assert split(jobs) == (65.0, 0.0, 50.0)
    view = jobs.get("train")
    assert view.energy_by_gpu_j == {0: 0.0} and view.power_w == 0.0


def test_an_energy_counter_that_goes_back_skips_the_pass_and_the_next_one_resumes() -> None:
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    jobs.register("train", 7, 0)
    jobs.attribute([gpu_sample(1.5, 10.0, slow_t=1.0)])  # the counter reset (driver reload)
    assert split(jobs) == (50.0, 0.0, 50.0)
    view = jobs.get("train")
    assert view.energy_by_gpu_j == {} and view.power_w == 0.0
    # the next pass counts from the new value: 0.5 s at 200 W, 25 J idle, 75 J the job's
    jobs.attribute([gpu_sample(2.0, 110.0, slow_t=1.0)])
    assert split(jobs) == (75.0, 0.0, 50.0)
    view = jobs.get("train")
    assert view.energy_by_gpu_j == {0: 75.0} and view.power_w == 150.0


def test_passes_that_draw_nothing_or_under_a_joule_still_count_toward_an_idle_span() -> None:
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    jobs.attribute([gpu_sample(1.5, 50.0, slow_t=1.0)])  # the counter did not move
    jobs.attribute([gpu_sample(1.75, 50.5, slow_t=1.0)])  # 0.5 J
    jobs.attribute([gpu_sample(2.0, 110.0, slow_t=2.0)])  # the span: 60 J over 1 s
    assert split(jobs)[2] == pytest.approx(52.0, rel=1e-12)  # 50 + 0.2 x (60 - 50)


def test_a_gpu_seen_drawing_nothing_counts_no_energy_as_idle_until_idle_is_learned() -> None:
    jobs = JobRegistry()
    info = replace(INFO, power_limit_min_w=None, power_limit_max_w=None, power_limit_default_w=None)
    jobs.attribute([gpu_sample(0.0, 0.0, util=0.5, slow_t=0.0, info=info)])
    jobs.attribute([gpu_sample(1.0, 0.0, util=0.5, slow_t=0.0, info=info)])
    jobs.attribute([gpu_sample(2.0, 100.0, util=0.5, slow_t=0.0, info=info)])
    assert split(jobs) == (0.0, 100.0, 0.0)


def test_the_same_read_twice_or_an_older_one_attributes_nothing() -> None:
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    jobs.register("train", 7, 0)
    jobs.attribute([gpu_sample(1.5, 200.0, slow_t=1.0)])
    jobs.attribute([gpu_sample(1.5, 200.0, slow_t=1.0)])  # a failed pass repeats its read
    jobs.attribute([gpu_sample(1.25, 100.0, slow_t=1.0)])
    assert split(jobs) == (75.0, 0.0, 50.0)
    assert jobs.get("train").energy_by_gpu_j == {0: 125.0}


@pytest.mark.parametrize(
    ("gap", "why"),
    [
        (gpu_sample(1.5, 10.0, slow_t=1.0), "the counter went back"),
        (gpu_sample(1.0, 50.0, slow_t=1.0, up=False), "the GPU was lost"),
        (replace(gpu_sample(1.5, 75.0, slow_t=1.0), reading=None), "nothing was read"),
    ],
)
def test_a_span_with_a_gap_is_never_learned_as_idle(gap: GpuSample, why: str) -> None:
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    jobs.attribute([gap])
    # idle reads on both sides, 80 W since the gap: still nothing proves the span idle
    after = 10.0 + 40.0 if gap.energy_j == 10.0 else 90.0
    jobs.attribute([gpu_sample(2.0, after, slow_t=2.0)])
    assert split(jobs)[2] == 50.0, why


def test_a_gpu_lost_from_its_first_pass_is_not_tracked() -> None:
    jobs = JobRegistry()
    jobs.attribute([gpu_sample(1.0, 50.0, slow_t=1.0, up=False)])
    jobs.attribute([replace(gpu_sample(1.0, 50.0, slow_t=1.0), reading=None)])
    assert jobs.gpu_splits() == {}


def test_the_first_pass_of_a_gpu_only_starts_its_count() -> None:
    jobs = JobRegistry()
    jobs.register("train", 7, 0)
    jobs.attribute([gpu_sample(5.0, 123456.0, util=0.9, slow_t=5.0)])
    assert jobs.gpu_splits()[0] == GpuSplit(0.0, 0.0, None)
    assert jobs.get("train").energy_by_gpu_j == {}


def test_gpu_splits_are_per_gpu_by_index() -> None:
    jobs = JobRegistry()
    one = replace(INFO, index=1)
    jobs.register("on-one", 7, 1)
    jobs.attribute([gpu_sample(0.0, 0.0, slow_t=0.0, info=one), gpu_sample(0.0, 0.0, slow_t=0.0)])
    # GPU 1 at 60 W, then 100 W; GPU 0 at 40 W, then 100 W (idle: the lowest power seen)
    jobs.attribute([gpu_sample(1.0, 60.0, util=0.5, slow_t=0.0, info=one),
                    gpu_sample(1.0, 40.0, util=0.5, slow_t=0.0)])  # fmt: skip
    jobs.attribute([gpu_sample(2.0, 160.0, util=0.5, slow_t=0.0, info=one),
                    gpu_sample(2.0, 140.0, util=0.5, slow_t=0.0)])  # fmt: skip
    splits = jobs.gpu_splits()
    assert list(splits) == [0, 1]
    assert splits[0] == GpuSplit(80.0, 60.0, 40.0)
    assert splits[1] == GpuSplit(120.0, 0.0, 60.0)
    assert jobs.get("on-one").energy_by_gpu_j == {1: 40.0}


def two_jobs_share(processes: tuple[ProcessUsage, ...]) -> tuple[float, float]:
    """Two jobs (pids 7 and 8) on GPU 0 share 125 J of active energy over 0.5 s."""
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    jobs.register("a", 7, 0)
    jobs.register("b", 8, 0)
    jobs.attribute([gpu_sample(1.5, 200.0, util=0.9, slow_t=1.0, processes=processes)])
    a, b = jobs.get("a"), jobs.get("b")
    assert a.power_w == 2 * a.energy_by_gpu_j[0] and b.power_w == 2 * b.energy_by_gpu_j[0]
    assert split(jobs) == (75.0, 0.0, 50.0)
    return a.energy_by_gpu_j[0], b.energy_by_gpu_j[0]


def test_jobs_sharing_a_gpu_split_active_energy_by_their_sm_utilization() -> None:
    usage = (ProcessUsage(7, None, 0.75), ProcessUsage(9, None, 0.5), ProcessUsage(8, None, 0.25))
    assert two_jobs_share(usage) == (93.75, 31.25)  # pid 9 is no job: it takes no share


def test_a_job_at_0_sm_utilization_beside_a_busy_one_gets_no_share() -> None:
    assert two_jobs_share((ProcessUsage(7, None, 0.0), ProcessUsage(8, None, 0.5))) == (0, 125)


@pytest.mark.parametrize(
    ("processes", "case"),
    [
        ((ProcessUsage(7, None, 0.9),), "one job is not in the driver's list"),
        ((ProcessUsage(7, None, 0.9), ProcessUsage(8, None, None)), "one gives no figure"),
        ((ProcessUsage(7, None, None), ProcessUsage(8, None, 0.9)), "the other gives none"),
        ((ProcessUsage(7, None, 0.0), ProcessUsage(8, None, 0.0)), "the figures sum to 0"),
        ((), "the driver lists no process"),
    ],
)
def test_jobs_sharing_a_gpu_split_equally_without_a_figure_for_each(
    processes: tuple[ProcessUsage, ...], case: str
) -> None:
    assert two_jobs_share(processes) == (62.5, 62.5), case


def test_a_job_alone_on_a_gpu_takes_all_active_energy_whatever_its_utilization() -> None:
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    jobs.register("train", 7, 0)
    jobs.attribute([gpu_sample(1.5, 200.0, slow_t=1.0, processes=(ProcessUsage(7, None, 0.3),))])
    assert jobs.get("train").energy_by_gpu_j == {0: 125.0}


def idle_power_after_a_span(opening: float | None, closing: float | None, **end: Any) -> float:
    """Reads at t=0 (utilization ``opening``), 0.5 (40 W) and 1 (60 W, ``closing``): 50 W
    is learned if the span is proven idle, else the lowest power seen (40 W) is used."""
    jobs = JobRegistry()
    jobs.attribute([gpu_sample(0.0, 0.0, util=opening, slow_t=0.0)])
    jobs.attribute([gpu_sample(0.5, 20.0, util=opening, slow_t=0.0)])
    jobs.attribute([gpu_sample(1.0, 50.0, **{"util": closing, "slow_t": 1.0, **end})])
    idle_w = split(jobs)[2]
    assert idle_w is not None
    return idle_w


@pytest.mark.parametrize(
    ("util", "idle_w"),
    [(0.0, 50.0), (IDLE_UTILIZATION, 50.0), (0.0101, 40.0), (0.5, 40.0), (None, 40.0)],
)
def test_a_span_is_idle_only_at_or_under_the_idle_utilization(
    util: float | None, idle_w: float
) -> None:
    assert IDLE_UTILIZATION == 0.01
    assert idle_power_after_a_span(util, util) == idle_w


def test_a_span_is_learned_only_between_two_idle_reads_ending_at_the_energy_read() -> None:
    assert idle_power_after_a_span(0.0, 0.0) == 50.0
    assert idle_power_after_a_span(0.5, 0.0) == 40.0  # the load ended within the span
    assert idle_power_after_a_span(0.0, 0.5) == 40.0  # a load started within the span
    assert idle_power_after_a_span(0.0, 0.0, slow_t=0.9) == 40.0  # 0.9-1.0 s is not proven
    assert idle_power_after_a_span(0.0, 0.0, slow_t=None) == 40.0  # no utilization read


def test_learned_idle_power_moves_a_fifth_of_the_way_with_each_idle_span() -> None:
    assert IDLE_SMOOTHING == 0.2
    jobs = JobRegistry()
    learn_idle(jobs, 50.0)
    learned = []
    for t in (1.5, 2.0, 2.5):  # 0.5 s spans at 90 W: 50 -> 58 -> 64.4 -> 69.52
        jobs.attribute([gpu_sample(t, 50.0 + 90.0 * (t - 1.0), slow_t=t)])
        learned.append(split(jobs)[2])
    assert learned == pytest.approx([58.0, 64.4, 69.52], rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    first_w=st.floats(min_value=0.0, max_value=99.0),
    then_w=st.floats(min_value=0.0, max_value=99.0),
    spans=st.integers(min_value=1, max_value=12),
    passes_per_span=st.integers(min_value=1, max_value=5),
)
def test_learned_idle_power_after_n_spans_follows_the_smoothing(
    first_w: float, then_w: float, spans: int, passes_per_span: int
) -> None:
    # A span of several passes counts once, at its mean power: here its first pass draws twice
    # the mean and the others less.
    jobs = JobRegistry()
    learn_idle(jobs, first_w)
    t, energy, opened = 1.0, first_w, 1.0
    dt = 1.0 / passes_per_span
    rest_w = then_w * (passes_per_span - 2) / (passes_per_span - 1) if passes_per_span > 1 else 0
    for _ in range(spans):
        for i in range(passes_per_span):
            w = then_w if passes_per_span == 1 else 2 * then_w if i == 0 else rest_w
            t, energy = t + dt, energy + w * dt
            if i == passes_per_span - 1:
                opened = t
            jobs.attribute([gpu_sample(t, energy, slow_t=opened)])
    expected = then_w + (first_w - then_w) * (1 - IDLE_SMOOTHING) ** spans
    assert split(jobs)[2] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_idle_power_in_use_never_exceeds_the_boards_idle_ceiling() -> None:
    jobs = JobRegistry()
    learn_idle(jobs, 150.0)  # learned 150 W, but this board idles under its 100 W minimum limit
    assert split(jobs) == (100.0, 50.0, 100.0)
    jobs.register("train", 7, 0)
    jobs.attribute([gpu_sample(1.5, 275.0, slow_t=1.0)])  # 250 W: 50 J idle, 75 J the job's
    assert split(jobs) == (150.0, 50.0, 100.0)
    assert jobs.get("train").energy_by_gpu_j == {0: 75.0}


@pytest.mark.parametrize(
    ("limits", "ceiling"),
    [
        ((100.0, 400.0, 300.0), 100.0),  # the minimum limit
        ((0.5, 400.0, 300.0), 0.5),
        ((0.0, 300.0, 250.0), 100.0),  # no usable minimum: a third of the maximum
        ((-5.0, 300.0, 250.0), 100.0),
        ((None, 300.0, 250.0), 100.0),
        ((None, None, 240.0), 80.0),  # else of the default
        ((None, 0.0, 240.0), 80.0),
        ((None, 0.75, None), 0.25),
        ((None, 0.0, None), None),  # no limit at all: no ceiling
        ((None, None, 0.0), None),
        ((None, None, -3.0), None),
        ((None, None, None), None),
    ],
)
def test_the_idle_ceiling_is_the_minimum_limit_else_a_third_of_the_maximum(
    limits: tuple[float | None, float | None, float | None], ceiling: float | None
) -> None:
    lo, hi, default = limits
    info = replace(INFO, power_limit_min_w=lo, power_limit_max_w=hi, power_limit_default_w=default)
    assert idle_ceiling_w(info) == (pytest.approx(ceiling, rel=1e-12) if ceiling else None)


def test_without_a_ceiling_the_learned_idle_power_is_used_as_learned() -> None:
    jobs = JobRegistry()
    info = replace(INFO, power_limit_min_w=None, power_limit_max_w=None, power_limit_default_w=None)
    learn_idle(jobs, 150.0, info)
    assert split(jobs) == (150.0, 0.0, 150.0)


@settings(max_examples=100, deadline=None)
@given(
    passes=st.lists(
        st.tuples(
            st.sampled_from([0.25, 0.5, 1.0]),  # pass length, s
            st.floats(min_value=0.0, max_value=700.0),  # power, W
            st.sampled_from([None, 0.0, 0.005, 0.3, 1.0]),  # a utilization read at its end
        ),
        min_size=1,
        max_size=30,
    ),
    sm=st.lists(st.sampled_from([None, 0.0, 0.2, 0.7]), min_size=0, max_size=3),
)
def test_jobs_idle_and_unattributed_add_up_to_the_gpus_energy_and_none_is_negative(
    passes: list[tuple[float, float, float | None]], sm: list[float | None]
) -> None:
    jobs = JobRegistry()
    for i in range(len(sm)):
        jobs.register(f"j{i}", 100 + i, 0)
    usage = tuple(ProcessUsage(100 + i, None, u) for i, u in enumerate(sm))
    t, energy, slow_t, util = 0.0, 0.0, 0.0, 0.0
    jobs.attribute([gpu_sample(t, energy, util=util, slow_t=slow_t)])
    for dt, watts, read in passes:
        t, energy = t + dt, energy + watts * dt
        if read is not None:
            slow_t, util = t, read
        jobs.attribute([gpu_sample(t, energy, util=util, slow_t=slow_t, processes=usage)])
    idle_j, unattributed_j, _ = split(jobs)
    by_job = [j.energy_by_gpu_j.get(0, 0.0) for j in jobs.jobs()]
    assert idle_j >= 0 and unattributed_j >= 0 and all(e >= 0 for e in by_job)
    assert idle_j + unattributed_j + sum(by_job) == pytest.approx(energy, rel=1e-9, abs=1e-9)
    if sm:
        assert unattributed_j == 0.0
