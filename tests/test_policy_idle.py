"""Idle capping: a GPU idle for idle_after_s with no job waits at its minimum, no period more."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.collectors.jobs import IDLE_UTILIZATION, JobView
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import GpuView, StoreSnapshot
from wattwarden.hardware.device import GpuInfo, GpuReading
from wattwarden.nodesim import SimJob, SimNode
from wattwarden.policies.base import Intent, PolicyInputs
from wattwarden.policies.idle import IdleCapper

IDLE_AFTER_S = 300.0


def info(gpu: int = 2, uuid: str | None = None, *, lo: float | None = 200.0) -> GpuInfo:
    return GpuInfo(
        gpu, uuid or f"GPU-{gpu}", "NVIDIA H100", f"0:{gpu}", "550", None, lo, 700.0, 700.0
    )


def view(
    util: float | None,
    now_s: float,
    *,
    up: bool = True,
    read: bool = True,
    identity: GpuInfo | None = None,
) -> GpuView:
    reading = GpuReading(
        power_w=70.0,
        power_instant_w=None,
        energy_j=None,
        power_limit_w=700.0,
        temperature_gpu_c=35.0,
        temperature_memory_c=None,
        utilization_gpu_ratio=util,
        utilization_memory_ratio=None,
        memory_used_bytes=None,
        memory_total_bytes=None,
        clock_sm_hz=None,
        clock_memory_hz=None,
        clock_event_mask=None,
    )
    sample = GpuSample(
        identity or info(),
        up,
        1_700_000_000.0 + now_s,
        reading if read else None,
        0.0,
        "counter",
        power_w=70.0,
        read_mono_s=now_s if read else None,
        slow_read_mono_s=now_s if read else None,
    )
    return GpuView(sample, 70.0, 70.0)


def job(gpu: int, *, state: str = "running", target: int | None = None) -> JobView:
    return JobView("train", 4242, gpu, "normal", 0.0, 0, 0, 0, target, {}, 0.0, state=state)


@dataclass
class Loop:
    """One GPU fed to a capper, one period a second."""

    capper: IdleCapper = field(default_factory=lambda: IdleCapper(idle_after_s=IDLE_AFTER_S))
    now_s: float = 0.0

    def period(
        self, util: float | None, jobs: tuple[JobView, ...] = (), **kw: object
    ) -> Intent | None:
        self.now_s += 1.0
        v = view(util, self.now_s, **kw)  # type: ignore[arg-type]
        snap = StoreSnapshot((v,), {}, None)
        out = list(self.capper.intents(PolicyInputs(snap, jobs, self.now_s)))
        assert len(out) <= 1
        return out[0] if out else None

    def idle_for(self, seconds: int, **kw: object) -> list[Intent | None]:
        return [self.period(0.0, **kw) for _ in range(seconds)]  # type: ignore[arg-type]


def test_an_idle_gpu_is_capped_to_its_minimum_once_idle_after_s_has_passed_and_not_before() -> None:
    loop = Loop()
    first = loop.idle_for(301)  # the first idle period starts the timer: 300 s after it, a cap
    assert first[:300] == [None] * 300
    assert first[300] == Intent(2, 200.0, "GPU 2 idle for 300 s: capped to its 200 W minimum")
    later = loop.idle_for(12)[-1]
    assert later == Intent(2, 200.0, "GPU 2 idle for 312 s: capped to its 200 W minimum")


def test_utilization_at_the_idle_threshold_counts_as_idle_and_above_it_as_load() -> None:
    at = Loop(IdleCapper(idle_after_s=0.0))
    above = Loop(IdleCapper(idle_after_s=0.0))
    assert at.period(IDLE_UTILIZATION) is not None
    assert above.period(IDLE_UTILIZATION + 0.005) is None


def test_load_lifts_the_cap_in_the_same_period_and_restarts_the_idle_timer() -> None:
    loop = Loop()
    assert loop.idle_for(301)[-1] is not None
    assert loop.period(0.3) is None  # load: no intent, the engine gives the limit back
    again = loop.idle_for(301)
    assert again[:300] == [None] * 300 and again[300] is not None


@pytest.mark.parametrize(
    "jobs",
    [(job(2),), (job(0, target=2),)],
    ids=["a-job-on-it", "a-job-moving-to-it"],
)
def test_a_gpu_with_a_running_job_or_one_on_its_way_is_never_capped(
    jobs: tuple[JobView, ...],
) -> None:
    loop = Loop()
    assert loop.idle_for(301, jobs=jobs) == [None] * 301
    assert loop.idle_for(1)[0] is None  # the job's time did not count as idle time
    capped = loop.idle_for(300)
    assert capped[-2] is None and capped[-1] is not None


def test_a_job_arriving_lifts_the_cap_in_the_same_period() -> None:
    loop = Loop()
    assert loop.idle_for(301)[-1] is not None
    assert loop.period(0.0, jobs=(job(2),)) is None


def test_finished_jobs_and_jobs_on_other_gpus_do_not_keep_a_gpu_uncapped() -> None:
    loop = Loop()
    others = (job(2, state="finished"), job(0), job(1, target=3))
    assert loop.idle_for(301, jobs=others)[-1] is not None


@pytest.mark.parametrize(
    "kw",
    [{"up": False}, {"read": False}, {"util": None}],
    ids=["lost", "unread", "no-utilization"],
)
def test_a_lost_or_unread_gpu_gets_no_cap_and_its_idle_timer_restarts(
    kw: dict[str, object],
) -> None:
    loop = Loop()
    loop.idle_for(200)
    rest = {k: v for k, v in kw.items() if k != "util"}
    assert loop.period(kw.get("util", 0.0), **rest) is None  # type: ignore[arg-type]
    resumed = loop.idle_for(301)
    assert resumed[:300] == [None] * 300 and resumed[300] is not None


def test_a_replaced_or_renumbered_gpu_starts_its_idle_timer_afresh() -> None:
    loop = Loop()
    loop.idle_for(299)
    assert loop.period(0.0, identity=info(2, "GPU-new")) is None  # a new board in slot 2
    loop = Loop()
    loop.idle_for(299)
    assert loop.period(0.0, identity=info(5, "GPU-2")) is None  # the same board, renumbered


def test_a_gpu_without_a_known_minimum_limit_is_left_alone() -> None:
    loop = Loop()
    assert loop.idle_for(400, identity=info(lo=None)) == [None] * 400


def test_settings_out_of_range_are_refused_with_the_name_of_the_setting() -> None:
    with pytest.raises(ValueError, match="idle_after_s"):
        IdleCapper(idle_after_s=-1.0)
    with pytest.raises(ValueError, match="idle_utilization"):
        IdleCapper(idle_utilization=1.0)
    capper = IdleCapper()
    assert (capper.name, capper.idle_after_s, capper.idle_utilization) == (
        "idle",
        300.0,
        IDLE_UTILIZATION,
    )


# ------------------------------------------------------------------------------- properties
# one period: seconds since the last, utilization, a job on the GPU, the GPU readable
steps = st.lists(
    st.tuples(
        st.floats(0.1, 120.0),
        st.sampled_from([0.0, 0.005, IDLE_UTILIZATION, 0.02, 0.5, 1.0]),
        st.booleans(),
        st.booleans(),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=100, deadline=None)
@given(seq=steps, idle_after_s=st.floats(0.0, 600.0))
def test_the_cap_appears_exactly_once_a_gpu_has_read_idle_for_idle_after_s_with_no_job(
    seq: list[tuple[float, float, bool, bool]], idle_after_s: float
) -> None:
    capper = IdleCapper(idle_after_s=idle_after_s)
    now, since = 0.0, None  # the reference: when the current idle stretch began
    for dt, util, has_job, readable in seq:
        now += dt
        v = view(util, now, read=readable)
        jobs = (job(2),) if has_job else ()
        out = list(capper.intents(PolicyInputs(StoreSnapshot((v,), {}, None), jobs, now)))
        idle = readable and util <= IDLE_UTILIZATION and not has_job
        since = (since if since is not None else now) if idle else None
        if has_job or util > IDLE_UTILIZATION:
            assert out == []  # never a cap on a GPU with a job or with load
        want = since is not None and now - since >= idle_after_s
        assert [i.watts for i in out] == ([200.0] if want else [])


# ------------------------------------------------------------- closed loop on the simulated node
@dataclass
class Passes:
    """Every sampler pass: seconds since the node started, each GPU's limit, GPU 0's load as
    the store shows it (what the policies see)."""

    start_s: float
    seen: list[tuple[float, list[float], float | None]] = field(default_factory=list)

    def __call__(self, node: SimNode) -> None:
        reading = node.store.snapshot().gpus[0].sample.reading
        util = None if reading is None else reading.utilization_gpu_ratio
        self.seen.append((node.clock() - self.start_s, node.limits_w(), util))

    @property
    def now_s(self) -> float:
        return self.seen[-1][0]

    def first_limit(self, gpu: int, watts: float, after_s: float = 0.0) -> float:
        """When GPU ``gpu`` first had ``watts`` at or after ``after_s``."""
        return next(t for t, lim, _ in self.seen if t >= after_s and lim[gpu] == watts)

    def first_load_shown(self, after_s: float) -> float:
        """When the store first showed load on GPU 0 at or after ``after_s``."""
        return next(t for t, _, u in self.seen if t >= after_s and (u or 0) > IDLE_UTILIZATION)

    def limits(self, gpu: int, since_s: float = 0.0, until_s: float = 1e9) -> set[float]:
        return {lim[gpu] for t, lim, _ in self.seen if since_s <= t < until_s}


def idle_node(state_dir: Path, idle_after_s: float) -> tuple[SimNode, Passes]:
    """GPU 0 idle from the start, GPU 1 busy throughout; the idle capper on, in apply mode."""
    node = SimNode(
        2, state_dir=state_dir, policies=[IdleCapper(idle_after_s=idle_after_s)], mode="apply"
    )
    node.fleet[1].set_load(0.8)
    return node, Passes(node.clock())


def capped_in_time(passes: Passes, idle_after_s: float, period_s: float) -> float:
    """GPU 0 (idle from the start) is capped no sooner than idle_after_s, and at most two
    periods later: the first period starts the timer one period in, and the period clock's
    float steps can put the crossing one period further."""
    capped = passes.first_limit(0, 200.0)
    assert idle_after_s <= capped <= idle_after_s + 2 * period_s + 1e-6
    assert passes.limits(0, 0.0, capped) == {700.0}
    return capped


def test_an_idle_gpu_is_capped_after_idle_after_s_and_load_or_a_job_lifts_the_cap_within_a_period(
    tmp_path: Path,
) -> None:
    node, passes = idle_node(tmp_path, 60.0)
    try:
        node.run(90.0, on_pass=passes)
        capped_in_time(passes, 60.0, node.period_s)
        load_at = passes.now_s
        node.fleet[0].set_load(0.5)
        node.run(10.35, on_pass=passes)
        shown = passes.first_load_shown(load_at)
        back = passes.first_limit(0, 700.0, load_at)
        assert back - shown <= node.period_s + 1e-6  # the first period that sees the load
        decision = next(d for d in reversed(node.decisions) if d.gpu == 0 and d.action == "set")
        assert (decision.policy, decision.watts) == ("engine", 700.0)
        # idle again: capped again; then a job arrives that puts no load on it yet
        node.fleet[0].set_load(0.0)
        node.run(70.0, on_pass=passes)
        assert passes.seen[-1][1][0] == 200.0
        job_at = passes.now_s
        node.add_job(SimJob("warming-up", gpu=0, utilization=0.004))  # reads 0 %
        node.run(5.0, on_pass=passes)
        assert passes.first_limit(0, 700.0, job_at) - job_at <= node.period_s + 1e-6
        assert {(u or 0) <= IDLE_UTILIZATION for t, _, u in passes.seen if t >= job_at} == {True}
        assert passes.limits(1) == {700.0}  # the busy GPU was never capped
    finally:
        node.close()


@settings(max_examples=30, deadline=None)
@given(
    idle_after_s=st.floats(5.0, 60.0),
    load=st.floats(0.02, 1.0),
    arrives_s=st.floats(0.0, 30.0),
)
def test_over_idle_times_and_loads_the_cap_comes_after_idle_after_s_and_goes_within_a_period(
    idle_after_s: float, load: float, arrives_s: float
) -> None:
    with tempfile.TemporaryDirectory() as d:
        node, passes = idle_node(Path(d), idle_after_s)
        try:
            node.run(idle_after_s + 3.0, on_pass=passes)
            capped_in_time(passes, idle_after_s, node.period_s)
            node.run(arrives_s, on_pass=passes)
            load_at = passes.now_s
            node.fleet[0].set_load(load)
            node.run(3.0, on_pass=passes)
            back = passes.first_limit(0, 700.0, load_at)
            assert back - passes.first_load_shown(load_at) <= node.period_s + 1e-6
            assert passes.limits(1) == {700.0}
        finally:
            node.close()
