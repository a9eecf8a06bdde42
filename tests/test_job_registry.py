"""The job registry at its edges: names, pids, counts, caps, conflicts, finished jobs, reaping."""

from __future__ import annotations

import os
import string
import time
from types import SimpleNamespace

import pytest
from helpers import parse_metrics
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.agent import JOB_SILENCE_S, Agent
from wattwarden.api.contract import JobRecord
from wattwarden.collectors.jobs import (
    COUNT_MAX,
    FINISHED_KEEP,
    FINISHED_KEEP_S,
    MAX_JOBS,
    PID_MAX,
    Job,
    JobConflict,
    JobError,
    JobRegistry,
    process_alive,
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


def test_each_move_to_another_gpu_counts_one_migration_and_a_finished_job_keeps_its_count() -> None:
    jobs = JobRegistry()
    assert jobs.register("train", 100, 0)[0].migrations == 0
    assert jobs.register("train", 100, 0)[0].migrations == 0  # a periodic re-registration
    jobs.request_migration("train", 2)
    assert jobs.get("train").migrations == 0  # asked for, not done
    assert jobs.register("train", 200, 2)[0].migrations == 1  # its supervisor, after the move
    assert jobs.register("train", 200, 2)[0].migrations == 1
    assert jobs.register("train", 200, 1)[0].migrations == 2  # the job moved itself
    end = jobs.unregister("train")
    assert end.migrations == jobs.get("train").migrations == 2
    assert JobRecord.from_view(end).to_json()["migrations"] == 2
    assert jobs.register("train", 300, 1)[0].migrations == 0  # a new run starts from none


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
    body = JobRecord.from_view(view).to_json()
    assert JobRecord.from_json(body) == JobRecord.from_view(view)  # what clients read back
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


@pytest.mark.parametrize("name", ["a", "Z9", "0_.:-", "a" * 64])
def test_a_name_of_1_to_64_allowed_characters_is_accepted(name: str) -> None:
    view, created = JobRegistry().register(name, 1, 0)
    assert created and view.name == name


@pytest.mark.parametrize("name", ["", "a" * 65, "_a", "-a", ".a", ":a", 7, None])
def test_a_name_empty_too_long_or_not_starting_alnum_is_refused(name: object) -> None:
    with pytest.raises(JobError, match=r"job name .* must be 1-64 of A-Z a-z 0-9 _ \. : -"):
        JobRegistry().register(name, 1, 0)  # type: ignore[arg-type]


def test_the_smallest_pid_is_accepted() -> None:
    view, _ = JobRegistry().register("j", 1, 0)
    assert view.pid == 1


@pytest.mark.parametrize("gpu", [0, 7, PID_MAX])
def test_a_gpu_index_from_0_is_accepted(gpu: int) -> None:
    view, _ = JobRegistry().register("j", 1, gpu)
    assert view.gpu == gpu


@pytest.mark.parametrize("gpu", [-1, PID_MAX + 1, True, False, 1.0, "0", None])
def test_a_gpu_that_is_no_index_is_refused(gpu: object) -> None:
    with pytest.raises(JobError, match=f"gpu must be a GPU index, got {gpu!r}"):
        JobRegistry().register("j", 1, gpu)  # type: ignore[arg-type]


@pytest.mark.parametrize("priority", ["high", "normal", "low"])
def test_each_priority_is_accepted(priority: str) -> None:
    assert JobRegistry().register("j", 1, 0, priority)[0].priority == priority


def test_a_job_registers_with_normal_priority_by_default() -> None:
    assert JobRegistry().register("j", 1, 0)[0].priority == "normal"


@pytest.mark.parametrize("utilization", [None, 1e-9, 0.5, 1.0, 1])
def test_a_utilization_within_0_exclusive_to_1_is_accepted(utilization: float | None) -> None:
    jobs = JobRegistry()
    placed: list[Job | None] = []
    jobs.add_listener(lambda old, new: placed.append(new))
    jobs.register("j", 1, 0, utilization=utilization)
    assert placed[0] is not None and placed[0].utilization == utilization


@pytest.mark.parametrize("utilization", [0.0, 0, -0.5, 1.0001, 2, True, "0.5"])
def test_a_utilization_outside_0_exclusive_to_1_is_refused(utilization: object) -> None:
    with pytest.raises(JobError, match=rf"utilization must be within \(0, 1\], got {utilization}"):
        JobRegistry().register("j", 1, 0, utilization=utilization)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [True, 1.0, "3", None])
def test_a_progress_count_that_is_not_an_integer_is_refused(value: object) -> None:
    jobs = JobRegistry()
    jobs.register("j", 1, 0)
    with pytest.raises(JobError, match=rf"samples must be an integer in 0\.\.{COUNT_MAX}, got"):
        jobs.progress("j", step=1, samples=value, tokens=1)  # type: ignore[arg-type]


def test_progress_counts_are_recorded_each_in_its_field() -> None:
    jobs = JobRegistry()
    jobs.register("j", 1, 0)
    view = jobs.progress("j", step=0, samples=2, tokens=3)
    assert (view.step, view.samples, view.tokens) == (0, 2, 3)
    view = jobs.progress("j", step=5, samples=40, tokens=COUNT_MAX)
    assert (view.step, view.samples, view.tokens) == (5, 40, COUNT_MAX)


def test_the_running_jobs_cap_allows_exactly_max_jobs() -> None:
    assert MAX_JOBS == 1024
    jobs = JobRegistry()
    for i in range(MAX_JOBS - 1):
        jobs.register(f"j{i}", 1 + i, 0)
    view, created = jobs.register("last", 5000, 0)  # the 1024th
    assert created and view.name == "last"
    with pytest.raises(JobError, match="job 'one-more' is refused"):
        jobs.register("one-more", 5001, 0)
    jobs.register("last", 5000, 0, "high")  # updating a running job at the cap is no new one


def test_re_registering_keeps_the_jobs_progress_energy_and_start() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    placed: list[Job] = []
    jobs.add_listener(lambda old, new: placed.append(new) if new is not None else None)
    first, _ = jobs.register("train", 100, 0, utilization=0.5)
    before = time.time()
    jobs.progress("train", step=3, samples=24, tokens=960)
    after = time.time()
    job = placed[0]
    job.energy_by_gpu_j[0], job.power_w = 42.0, 300.0  # as attribution would have left them
    clock.advance(10.0)
    view, created = jobs.register("train", 100, 1, "low", utilization=0.25)
    assert not created
    assert (view.name, view.gpu, view.priority) == ("train", 1, "low")
    assert (view.step, view.samples, view.tokens) == (3, 24, 960)
    assert view.energy_by_gpu_j == {0: 42.0} and view.power_w == 0.0
    assert view.registered_at_s == first.registered_at_s and view.duration_s == 10.0
    again = placed[1]
    assert again is not job and again.utilization == 0.25
    progressed = again.last_progress_s
    assert progressed is not None and before <= progressed <= after
    assert job.energy_by_gpu_j == {0: 42.0}  # the old record is left as it was


def test_a_re_runs_old_finished_record_takes_no_place_among_the_finished_jobs() -> None:
    jobs = JobRegistry()
    for i in range(FINISHED_KEEP):
        jobs.register(f"j{i:03d}", 1 + i, 0)
        jobs.unregister(f"j{i:03d}")
    jobs.register("j050", 5000, 0)  # a new run under a finished job's name
    jobs.register("new", 5001, 0)
    jobs.unregister("new")  # the 100th finished job: the oldest one stays
    views = jobs.jobs()
    assert len(views) == FINISHED_KEEP + 1 and views[0].name == "j000"
    assert [v.state for v in views if v.name == "j050"] == ["running"]


def test_a_pending_move_survives_a_re_registration_on_the_old_gpu() -> None:
    jobs = JobRegistry()
    jobs.register("train", 100, 0)
    assert jobs.request_migration("train", 2).target_gpu == 2
    view, _ = jobs.register("train", 100, 0)  # its supervisor's periodic re-registration
    assert view.target_gpu == 2
    view, _ = jobs.register("train", 100, 2)  # the move done
    assert view.target_gpu is None


def test_a_move_to_the_gpu_a_job_is_on_clears_the_pending_move() -> None:
    jobs = JobRegistry()
    jobs.register("train", 100, 1)
    jobs.request_migration("train", 3)
    assert jobs.request_migration("train", 1).target_gpu is None
    with pytest.raises(JobConflict):
        jobs.register("train", 200, 1)  # no move pending: a new pid is a conflict again


def test_a_job_with_no_pending_move_cannot_be_taken_over_on_any_gpu() -> None:
    jobs = JobRegistry()
    jobs.register("train", 100, 0)
    for gpu in (0, 1):
        with pytest.raises(JobConflict, match=r"; give another job another name$"):
            jobs.register("train", 200, gpu)


def test_a_name_whose_process_still_runs_may_not_be_taken_over() -> None:
    asked: list[int] = []

    def alive(pid: int) -> bool:
        asked.append(pid)
        return True

    jobs = JobRegistry(pid_alive=alive)
    jobs.register("train", 100, 0)
    with pytest.raises(JobConflict):
        jobs.register("train", 200, 0)
    assert asked == [100]  # the running job's pid, not the newcomer's


def test_listeners_hear_of_each_registration_move_and_end() -> None:
    jobs = JobRegistry()
    heard: list[tuple[tuple[str, int] | None, tuple[str, int] | None]] = []
    jobs.add_listener(lambda old, new: heard.append((
        None if old is None else (old.name, old.gpu), None if new is None else (new.name, new.gpu)
    )))  # fmt: skip
    jobs.register("train", 100, 0)
    jobs.register("train", 100, 2)
    jobs.unregister("train")
    assert heard == [(None, ("train", 0)), (("train", 0), ("train", 2)), (("train", 2), None)]


def test_an_ended_job_has_no_power_and_no_pending_move() -> None:
    jobs = JobRegistry()
    jobs.register("train", 100, 0)
    jobs.request_migration("train", 1)
    jobs._jobs["train"].power_w = 250.0
    view = jobs.unregister("train")
    assert (view.state, view.power_w, view.target_gpu) == ("finished", 0.0, None)
    with pytest.raises(JobError, match="no job named 'train' is running"):
        jobs.unregister("train")
    with pytest.raises(JobError, match="no job named 'train' is running"):
        jobs.request_migration("train", 2)


def test_a_running_jobs_duration_runs_to_now_and_a_finished_ones_to_its_end() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("train", 100, 0)
    assert jobs.get("train").duration_s == 0.0
    clock.advance(0.25)
    assert jobs.get("train").duration_s == 0.25
    clock.advance(12.25)
    assert jobs.get("train").duration_s == 12.5
    assert jobs.jobs()[0].duration_s == 12.5
    jobs.unregister("train")
    clock.advance(100.0)
    assert jobs.get("train").duration_s == 12.5


def test_a_jobs_energy_power_and_tokens_per_joule_are_from_its_totals() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("train", 100, 0)
    view = jobs.get("train")
    assert (view.energy_j, view.tokens_per_joule, view.mean_power_w) == (0, None, None)
    jobs._jobs["train"].energy_by_gpu_j.update({0: 300.0, 2: 100.0})
    jobs.progress("train", step=1, samples=1, tokens=2000)
    clock.advance(8.0)
    view = jobs.get("train")
    assert view.energy_j == 400.0 and view.tokens_per_joule == 5.0 and view.mean_power_w == 50.0


def test_finished_jobs_beyond_the_count_go_oldest_first_at_the_boundary() -> None:
    assert FINISHED_KEEP == 100
    jobs = JobRegistry()
    for i in range(FINISHED_KEEP):
        jobs.register(f"j{i:03d}", 1 + i, 0)
        jobs.unregister(f"j{i:03d}")
    assert len(jobs.jobs()) == FINISHED_KEEP  # exactly the count: all kept
    jobs.register("j000", 1, 0)
    jobs.unregister("j000")  # ended again: now the most recent
    jobs.register("last", 999, 0)
    jobs.unregister("last")
    names = [j.name for j in jobs.jobs()]
    assert len(names) == FINISHED_KEEP and "j001" not in names and "j000" in names


def test_a_finished_job_is_kept_exactly_its_retention_and_no_longer() -> None:
    assert FINISHED_KEEP_S == 3600.0
    clock = ManualClock(0.0)
    jobs = JobRegistry(monotonic=clock)
    jobs.register("early", 1, 0)
    jobs.unregister("early")
    clock.advance(10.0)
    jobs.register("late", 2, 0)
    jobs.unregister("late")
    clock.advance(FINISHED_KEEP_S - 10.0)  # "early" ended exactly the retention ago
    assert jobs.get("early").state == "finished"
    clock.advance(0.5)
    assert [j.name for j in jobs.jobs()] == ["late"]  # one past it; the later one stays
    with pytest.raises(JobError, match="no job named 'early'"):
        jobs.get("early")


def test_a_running_job_is_never_pruned_with_the_finished_ones() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("long", 1, 0)
    clock.advance(FINISHED_KEEP_S * 3)
    assert [(j.name, j.state) for j in jobs.jobs()] == [("long", "running")]


def test_touching_an_unknown_job_is_an_error() -> None:
    with pytest.raises(JobError, match="no job named 'ghost'"):
        JobRegistry().touch("ghost")


def test_a_job_is_silent_only_past_the_grace_since_it_was_last_heard_from() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("quiet", 100, 0)
    jobs.register("polled", 200, 0)
    jobs.register("reporting", 300, 0)
    clock.advance(3.0)
    jobs.touch("polled")
    jobs.progress("reporting", step=1, samples=1, tokens=1)
    clock.advance(2.0)
    assert jobs.silent_pids(5.0) == {}  # exactly the grace: not yet silent
    clock.advance(0.25)
    assert jobs.silent_pids(5.0) == {"quiet": 100}
    clock.advance(3.0)
    assert jobs.silent_pids(5.0) == {"quiet": 100, "polled": 200, "reporting": 300}
    jobs.register("quiet", 100, 0)  # a re-registration is being heard from
    assert jobs.silent_pids(5.0) == {"polled": 200, "reporting": 300}


def test_a_silent_job_is_reaped_only_when_its_process_is_gone() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    for name, pid in (("alive", 100), ("gone", 200), ("heard", 300)):
        jobs.register(name, pid, 0)
    clock.advance(6.0)
    jobs.touch("heard")
    asked: list[int] = []

    def alive(pid: int) -> bool:
        asked.append(pid)
        return pid == 100

    assert jobs.reap(5.0, alive) == ["gone"]
    assert sorted(asked) == [100, 200]  # a job heard from within the grace is not checked
    states = {j.name: j.state for j in jobs.jobs()}
    assert states == {"alive": "running", "gone": "finished", "heard": "running"}
    assert jobs.reap(5.0, alive) == []


def test_the_reaper_goes_on_past_a_check_that_raises_and_a_job_ended_meanwhile() -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    for name, pid in (("a-bad", 100), ("b-ended", 200), ("c-gone", 300)):
        jobs.register(name, pid, 0)
    clock.advance(6.0)

    def alive(pid: int) -> bool:
        if pid == 100:
            raise RuntimeError("cannot tell")
        if pid == 200:
            jobs.unregister("b-ended")  # its supervisor ended it while the reaper looked
        return False

    assert jobs.reap(5.0, alive) == ["c-gone"]
    states = {j.name: j.state for j in jobs.jobs()}
    assert states == {"a-bad": "running", "b-ended": "finished", "c-gone": "finished"}


def test_the_reaper_checks_pids_with_process_alive_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = ManualClock()
    jobs = JobRegistry(monotonic=clock)
    jobs.register("mine", os.getpid(), 0)
    jobs.register("gone", 4343, 0)
    clock.advance(6.0)
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid == 4343:
            raise ProcessLookupError(pid)
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    assert jobs.reap(5.0) == ["gone"]


@pytest.mark.parametrize(
    ("raised", "alive"),
    [
        (None, True),
        (ProcessLookupError(), False),
        (PermissionError(), True),  # another user's process
        (OverflowError(), False),
        (ValueError(), False),
    ],
)
def test_process_alive_reads_the_signal_0_probe(
    monkeypatch: pytest.MonkeyPatch, raised: Exception | None, alive: bool
) -> None:
    sent: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        if raised is not None:
            raise raised

    monkeypatch.setattr(os, "kill", kill)
    assert process_alive(4242) is alive
    assert sent == [(4242, 0)]
