"""Job reaping and saving the simulated driver state run on monotonic deadlines, not pass counts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wattwarden.agent import REAP_EVERY_S, SIM_SAVE_EVERY_S, Agent
from wattwarden.collectors.sampler import Cadence
from wattwarden.config import AgentConfig
from wattwarden.hardware.sim import ManualClock
from wattwarden.hardware.sim.fake_nvml import uninstall_fake_nvml


def run_passes(every_s: float, gaps_s: list[float]) -> list[tuple[float, bool]]:
    """Each pass (one after each gap): its time, and whether it found the task due."""
    clock = ManualClock(start_s=0.0)
    cadence = Cadence(every_s, monotonic=clock)
    return [(clock.advance(gap), cadence.due()) for gap in gaps_s]


def fired(passes: list[tuple[float, bool]]) -> list[float]:
    return [now for now, due in passes if due]


gaps = st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=200)
periods = st.floats(min_value=0.05, max_value=10.0)


@given(every_s=periods, gaps_s=gaps)
def test_a_pass_a_period_or_more_after_the_last_run_always_runs_the_task(
    every_s: float, gaps_s: list[float]
) -> None:
    # slow passes do not stretch the cadence: what counts is time since the last run, not passes
    last = 0.0
    for now, due in run_passes(every_s, gaps_s):
        if now >= last + every_s:
            assert due, (now, last)
        if due:
            last = now


@given(every_s=periods, gaps_s=gaps)
def test_the_task_never_runs_more_often_than_once_a_period_on_average(
    every_s: float, gaps_s: list[float]
) -> None:
    # nor does a burst of quick passes (or catching up after a stall) run it more often
    runs = fired(run_passes(every_s, gaps_s))
    assert not runs or runs[0] >= every_s
    for k, now in enumerate(runs, start=1):
        assert k <= math.floor(now / every_s + 1e-9), (k, now)


def test_a_stall_of_several_periods_runs_the_task_once_then_the_cadence_resumes() -> None:
    runs = fired(run_passes(1.0, [0.5, 0.5, 3.75, 0.25, 0.5, 0.5, 0.5]))
    assert runs == [1.0, 4.75, 6.0]  # due again at 5.75, a period after the late run


def test_a_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every_s"):
        Cadence(0.0)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(AgentConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state", sim=1))
    try:
        yield a
    finally:
        a.close()
        uninstall_fake_nvml()


def test_agent_reaps_and_saves_on_time_when_passes_run_slower_than_the_interval(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(start_s=0.0)
    agent._reap_cadence = Cadence(REAP_EVERY_S, monotonic=clock)
    agent._save_cadence = Cadence(SIM_SAVE_EVERY_S, monotonic=clock)
    fleet = agent.opened.fleet
    assert fleet is not None
    reaped: list[float] = []
    saved: list[float] = []
    monkeypatch.setattr(agent.jobs, "reap", lambda silence_s: reaped.append(clock()))
    monkeypatch.setattr(fleet, "save", lambda: saved.append(clock()))
    assert agent.sampler.interval_s == 0.1
    for _ in range(48):  # each pass takes 0.25 s, two and a half sampler intervals
        clock.advance(0.25)
        agent._on_pass()
    assert reaped == [float(s) for s in range(1, 13)]
    assert saved == [10.0]
