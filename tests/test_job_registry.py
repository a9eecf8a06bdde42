"""The job registry at its edges: names, pids, counts, caps, conflicts, finished jobs, reaping."""

from __future__ import annotations

import os
import string
from types import SimpleNamespace

import pytest
from helpers import parse_metrics
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.agent import JOB_SILENCE_S, Agent
from wattwarden.api.state import job_json
from wattwarden.collectors.jobs import (
    COUNT_MAX,
    FINISHED_KEEP,
    FINISHED_KEEP_S,
    MAX_JOBS,
    PID_MAX,
    JobConflict,
    JobError,
    JobRegistry,
)
from wattwarden.collectors.store import MetricStore
from wattwarden.exporters.prometheus import StoreCollector, job_families, make_registry, render
from wattwarden.hardware.sim import ManualClock

NAME_CHARS = set(string.ascii_letters + string.digits + "_.:-")


@settings(max_examples=300, deadline=None)
@given(name=st.text(alphabet=st.sampled_from([*sorted(NAME_CHARS), "\n", " ", "\t", "/", "é"])))
def test_a_job_name_is_accepted_only_when_every_character_is_allowed(name: str) -> None:
    jobs = JobRegistry()
    whole = 1 <= len(name) <= 64 and set(name) <= NAME_CHARS and name[0].isalnum()
    try:
        jobs.register(name, 1, 0)
    except JobError as e:
        assert not whole, e
        assert "job name" in str(e)
    else:
        assert whole


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(JobError, match="job name 'a\\\\n'"):
        JobRegistry().register("a\n", 1, 0)


@pytest.mark.parametrize("pid", [0, -1, PID_MAX + 1, 2**63, 10**400, True, 1.5])
def test_a_pid_outside_1_to_2_31_minus_1_is_refused(pid: object) -> None:
    with pytest.raises(JobError, match=r"pid must be an integer in 1\.\.2147483647"):
        JobRegistry().register("j", pid, 0)  # type: ignore[arg-type]


def test_the_largest_pid_is_accepted() -> None:
    view, created = JobRegistry().register("j", PID_MAX, 0)
    assert created and view.pid == PID_MAX


@pytest.mark.parametrize("field", ["step", "samples", "tokens"])
@pytest.mark.parametrize("value", [-1, COUNT_MAX + 1, 10**400])
def test_a_progress_count_outside_0_to_2_63_minus_1_is_refused_by_name(
    field: str, value: int
) -> None:
    jobs = JobRegistry()
    jobs.register("j", 1, 0)
    counts = {"step": 1, "samples": 1, "tokens": 1, field: value}
    with pytest.raises(JobError, match=f"{field} must be an integer in 0..{COUNT_MAX}"):
        jobs.progress("j", **counts)
    assert jobs.get("j").step == 0  # nothing half-recorded
    jobs.progress("j", step=COUNT_MAX, samples=0, tokens=COUNT_MAX)
    assert jobs.get("j").tokens == COUNT_MAX


def test_running_jobs_are_capped_and_the_error_names_the_cap() -> None:
    jobs = JobRegistry()
    for i in range(MAX_JOBS):
        jobs.register(f"j{i}", 1 + i, 0)
    with pytest.raises(JobError, match=f"{MAX_JOBS} jobs are running"):
        jobs.register("one-more", 99999, 0)
    jobs.register("j0", 1, 1)  # moving a running job is not a new one
    jobs.unregister("j1")  # a finished job frees its place
    jobs.register("one-more", 99999, 0)
    assert sum(j.state == "running" for j in jobs.jobs()) == MAX_JOBS


def test_a_second_process_cannot_take_over_a_running_jobs_name() -> None:
    jobs = JobRegistry()
    jobs.register("train", 100, 0)
    with pytest.raises(JobConflict, match="job 'train' is running as pid 100 on GPU 0"):
        jobs.register("train", 200, 0)
    assert jobs.get("train").pid == 100
    view, created = jobs.register("train", 100, 0, "high")  # its own pid: an update
    assert not created and view.priority == "high"


def test_the_supervisor_may_re_register_its_job_on_the_gpu_the_agent_moved_it_to() -> None:
    jobs = JobRegistry()
    jobs.register("train", 100, 0)
    jobs.request_migration("train", 2)
    with pytest.raises(JobConflict):
        jobs.register("train", 200, 1)  # not the move that was asked for
    view, created = jobs.register("train", 200, 2)
    assert not created and (view.pid, view.gpu, view.target_gpu) == (200, 2, None)
    with pytest.raises(JobConflict):
        jobs.register("train", 300, 2)  # the move is done: no second takeover


def test_a_name_whose_process_is_gone_may_be_registered_again() -> None:
    jobs = JobRegistry(pid_alive=lambda pid: pid != 100)
    jobs.register("train", 100, 0)
    view, created = jobs.register("train", 200, 0)
    assert view.pid == 200 and not created


def test_a_finished_job_stays_readable_with_its_totals() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("train", 100, 0)
    jobs.progress("train", step=10, samples=80, tokens=4000)
    clock.advance(20.0)
    end = jobs.unregister("train")
    clock.advance(30.0)
    view = jobs.get("train")
    assert view.state == end.state == "finished"
    assert view.duration_s == pytest.approx(20.0)
    assert view.finished_at_s is not None and view.finished_at_s >= view.registered_at_s
    assert view.power_w == 0.0 and view.tokens == 4000
    assert [j.name for j in jobs.jobs()] == ["train"]
    body = job_json(view)
    assert body["state"] == "finished" and body["duration_seconds"] == pytest.approx(20.0)
    assert body["finished_at"] == view.finished_at_s and body["tokens"] == 4000
    jobs.touch("train")  # a supervisor's late poll: no error, still finished
    assert jobs.get("train").state == "finished"
    with pytest.raises(JobError, match="no job named 'train' is running"):
        jobs.progress("train", step=11, samples=88, tokens=4400)
    with pytest.raises(JobError, match="no job named 'ghost'"):
        jobs.get("ghost")


def test_finished_jobs_are_kept_for_a_bounded_count_and_age() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    for i in range(FINISHED_KEEP + 5):
        jobs.register(f"j{i:03d}", 1 + i, 0)
        jobs.unregister(f"j{i:03d}")
    names = [j.name for j in jobs.jobs()]
    assert len(names) == FINISHED_KEEP and names[0] == "j005"  # the oldest went first
    clock.advance(FINISHED_KEEP_S - 1)
    assert len(jobs.jobs()) == FINISHED_KEEP
    clock.advance(2)
    assert jobs.jobs() == []
    with pytest.raises(JobError, match="no job named 'j104'"):
        jobs.get("j104")


def test_a_new_run_under_a_finished_jobs_name_replaces_the_finished_record() -> None:
    jobs = JobRegistry()
    jobs.register("train", 100, 0)
    jobs.unregister("train")
    view, created = jobs.register("train", 200, 1)
    assert created and view.state == "running"
    assert [(j.name, j.state) for j in jobs.jobs()] == [("train", "running")]


def test_a_finished_jobs_final_counters_stay_in_metrics_without_a_power_gauge() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("train", 100, 0)
    jobs.progress("train", step=3, samples=24, tokens=960)
    jobs._jobs["train"].energy_by_gpu_j[0] = 1234.5  # as attribution would have left it
    jobs.unregister("train")
    store = MetricStore(monotonic=clock)
    registry = make_registry(
        StoreCollector(store, backend="sim", extra=lambda snap: job_families(jobs, snap))
    )
    m = parse_metrics(render(registry)[0].decode())
    assert [(lab["job"], v) for lab, v in m["gpu_job_energy_joules_total"]] == [("train", 1234.5)]
    assert [v for lab, v in m["wattwarden_job_tokens_total"]] == [960]
    assert "gpu_job_power_watts" not in m
    clock.advance(FINISHED_KEEP_S + 1)
    m = parse_metrics(render(registry)[0].decode())
    assert "gpu_job_energy_joules_total" not in m


def test_the_reaper_goes_on_past_a_job_whose_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("bad", 4242, 0)
    jobs.register("gone", 4343, 0)
    clock.advance(JOB_SILENCE_S + 1)

    def kill(pid: int, sig: int) -> None:
        if pid == 4242:
            raise OverflowError("signed integer is greater than maximum")
        raise ProcessLookupError(pid)

    monkeypatch.setattr(os, "kill", kill)
    Agent._reap_jobs(SimpleNamespace(jobs=jobs))  # type: ignore[arg-type]
    states = {j.name: j.state for j in jobs.jobs()}
    assert states["gone"] == "finished"
