"""The in-memory store: export windows, per-second history, collector health, budgets, actions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.collectors.host import HostSample
from wattwarden.collectors.rapl import RaplSample
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import CollectorHealth, HistoryPoint, MetricStore, PolicyState
from wattwarden.hardware.device import ClockEvent, GpuInfo, GpuReading
from wattwarden.hardware.sim import ManualClock


def info(index: int = 0) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index:04d}",
        name="Sim H100",
        pci_bus_id=f"00000000:{index:02X}:00.0",
        driver_version="550.54",
        memory_total_bytes=80 * 2**30,
        power_limit_min_w=200.0,
        power_limit_max_w=700.0,
        power_limit_default_w=700.0,
    )


def reading(
    power_w: float | None = 100.0,
    *,
    temperature_c: float | None = 60.0,
    utilization: float | None = 0.5,
    limit_w: float | None = 300.0,
    clock_sm_hz: float | None = 1.4e9,
    clock_events: int | None = 0,
) -> GpuReading:
    return GpuReading(
        power_w=power_w,
        power_instant_w=power_w,
        energy_j=1000.0,
        power_limit_w=limit_w,
        temperature_gpu_c=temperature_c,
        temperature_memory_c=temperature_c,
        utilization_gpu_ratio=utilization,
        utilization_memory_ratio=utilization,
        memory_used_bytes=2**30,
        memory_total_bytes=80 * 2**30,
        clock_sm_hz=clock_sm_hz,
        clock_memory_hz=2.6e9,
        clock_event_mask=clock_events,
    )


def sample(
    timestamp_s: float,
    power_w: float | None,
    *,
    index: int = 0,
    up: bool = True,
    read: GpuReading | None = None,
) -> GpuSample:
    r = reading(power_w) if read is None else read
    return GpuSample(
        info=info(index),
        up=up,
        timestamp_s=timestamp_s,
        reading=r,
        energy_j=10.0,
        energy_source="counter",
        power_w=power_w if up else None,
        power_source="instant" if power_w is not None and up else None,
    )


def store_on(clock: ManualClock, **kw: float) -> MetricStore:
    return MetricStore(monotonic=clock, **kw)  # type: ignore[arg-type]


def view_power(store: MetricStore, index: int = 0) -> tuple[float | None, float | None]:
    view = next(v for v in store.snapshot().gpus if v.sample.info.index == index)
    return view.power_mean_w, view.power_peak_w


# ------------------------------------------------------------------ window


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(1, 3), st.floats(0.0, 1000.0, allow_nan=False)),
        min_size=1,
        max_size=40,
    ),
    window_s=st.integers(2, 20),
    idle_s=st.integers(0, 4),
)
def test_window_power_is_the_mean_and_the_max_over_exactly_the_window(
    steps: list[tuple[int, float]], window_s: int, idle_s: int
) -> None:
    clock = ManualClock()
    store = store_on(clock, window_s=float(window_s), interval_s=1.0)
    times: list[float] = []
    for i, (gap_s, watts) in enumerate(steps):
        clock.advance(gap_s)
        times.append(clock())
        store.put([sample(1_700_000_000.0 + i, watts)])
    clock.advance(idle_s)
    horizon = clock() - window_s  # the boundary itself is inside the window
    inside = [w for t, (_, w) in zip(times, steps, strict=True) if t >= horizon]
    mean, peak = view_power(store)
    if not inside:
        assert (mean, peak) == (None, None)
    else:
        assert mean == pytest.approx(math.fsum(inside) / len(inside), rel=1e-9, abs=1e-9)
        assert peak == max(inside)


def test_a_sample_exactly_one_window_old_counts_and_one_just_older_does_not() -> None:
    clock = ManualClock()
    store = store_on(clock, window_s=15.0, interval_s=0.1)
    store.put([sample(1.0, 500.0)])
    clock.advance(1.0)
    store.put([sample(2.0, 100.0)])
    clock.advance(14.0)  # the first sample is exactly 15 s old
    assert view_power(store) == (300.0, 500.0)
    clock.advance(0.5)
    assert view_power(store) == (100.0, 100.0)
    clock.advance(1.0)
    assert view_power(store) == (None, None)


def test_sampling_slower_than_the_window_still_shows_the_last_samples_for_two_intervals() -> None:
    # with a 20 s sampling interval and a 15 s window, the window would often hold no sample:
    # the store looks back two intervals instead (40 s), never less than the window
    clock = ManualClock()
    store = store_on(clock, window_s=15.0, interval_s=20.0)
    store.put([sample(1.0, 100.0)])
    clock.advance(20.0)
    store.put([sample(21.0, 300.0)])
    clock.advance(20.0)  # now 40 s after the first sample: both still count
    assert view_power(store) == (200.0, 300.0)
    clock.advance(1.0)  # 41 s: the first is past two intervals
    assert view_power(store) == (300.0, 300.0)
    clock.advance(19.5)  # 40.5 s after the last
    assert view_power(store) == (None, None)


def test_the_default_store_holds_every_sample_of_a_15_s_window_at_10_hz() -> None:
    clock = ManualClock()
    store = MetricStore(monotonic=clock)  # the defaults: a 15 s window sampled every 0.1 s
    for i in range(150):  # a spike in the first sample, 14.9 s old at the end
        clock.advance(0.1)
        store.put([sample(1000.0 + i / 10, 1000.0 if i == 0 else 100.0)])
    mean, peak = view_power(store)
    assert peak == 1000.0
    assert mean == pytest.approx((1000.0 + 149 * 100.0) / 150)


def test_the_window_memory_stays_bounded_by_the_window_over_the_interval() -> None:
    clock = ManualClock()
    store = store_on(clock, window_s=15.0, interval_s=0.1)
    for i in range(2000):
        clock.advance(0.1)
        store.put([sample(1000.0 + i / 10, 100.0)])
    # the series keeps one window of samples plus some slack for jitter, never all of them
    assert len(store._gpus[0].window) <= 2 * 150


# ------------------------------------------------------- repeated and lost


def test_a_repeated_reading_is_not_counted_twice_in_the_window_or_the_history() -> None:
    # a collector that could not read again hands back its last sample (same timestamp)
    clock = ManualClock()
    store = store_on(clock, window_s=15.0, interval_s=0.1)
    first, second = sample(100.0, 100.0), sample(100.5, 400.0)
    for s in (first, second, second, second):
        clock.advance(0.1)
        store.put([s])
    assert view_power(store) == (250.0, 400.0)
    clock.advance(0.1)
    store.put([sample(101.0, 700.0)])
    assert [p.power_w for p in store.history(60)[0]] == [250.0]


def test_a_new_reading_with_the_same_power_counts_again() -> None:
    clock = ManualClock()
    store = store_on(clock, window_s=15.0, interval_s=0.1)
    for ts, watts in ((100.0, 100.0), (100.2, 400.0), (100.4, 400.0), (101.0, 100.0)):
        clock.advance(0.1)
        store.put([sample(ts, watts)])
    assert view_power(store) == (250.0, 400.0)
    assert store.history(60)[0][0].power_w == 300.0


def test_a_lost_gpu_keeps_its_last_sample_but_no_power_and_no_history() -> None:
    clock = ManualClock()
    store = store_on(clock, window_s=15.0, interval_s=0.1)
    store.put([sample(100.0, 300.0)])
    clock.advance(0.1)
    lost = sample(100.5, None, up=False)
    store.put([lost])
    view = store.snapshot().gpus[0]
    assert view.sample is lost
    assert (view.power_mean_w, view.power_peak_w) == (None, None)
    clock.advance(0.1)
    store.put([sample(101.5, 500.0)])  # back: the window still holds what it read before
    assert view_power(store) == (400.0, 500.0)
    assert [(p.timestamp_s, p.power_w) for p in store.history(60)[0]] == [(100.0, 300.0)]


def test_a_pass_without_power_drops_the_power_gauges_and_adds_nothing() -> None:
    clock = ManualClock()
    store = store_on(clock, window_s=15.0, interval_s=0.1)
    store.put([sample(100.0, 300.0)])
    clock.advance(0.1)
    store.put([sample(100.5, None)])
    assert view_power(store) == (None, None)
    clock.advance(0.1)
    store.put([sample(101.0, 500.0)])
    assert view_power(store) == (400.0, 500.0)
    assert [p.power_w for p in store.history(60)[0]] == [300.0]


def test_a_sample_with_no_reading_yet_is_shown_without_power() -> None:
    clock = ManualClock()
    store = store_on(clock)
    never_read = GpuSample(
        info=info(), up=True, timestamp_s=0.0, reading=None, energy_j=0.0,
        energy_source="counter", power_w=250.0,
    )  # fmt: skip
    store.put([never_read])
    assert store.snapshot().gpus[0].sample is never_read
    assert view_power(store) == (None, None)
    assert store.history(60) == {0: []}


# ----------------------------------------------------------------- history


@settings(max_examples=100, deadline=None)
@given(
    passes=st.lists(
        st.tuples(
            st.integers(1, 10),  # tenths of a second since the previous read
            st.integers(0, 700),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_history_holds_the_mean_power_of_each_completed_second(
    passes: list[tuple[int, int]],
) -> None:
    clock = ManualClock()
    store = store_on(clock, window_s=15.0, interval_s=0.1, history_s=3600)
    tenths = 1000 * 10
    by_second: dict[int, list[float]] = {}
    for gap, watts in passes:
        tenths += gap
        clock.advance(gap / 10)
        store.put([sample(tenths / 10, float(watts))])
        by_second.setdefault(tenths // 10, []).append(float(watts))
    completed = sorted(by_second)[:-1]  # the current second is still being filled
    points = store.history(10**6)[0]
    assert [p.timestamp_s for p in points] == [float(s) for s in completed]
    for point, second in zip(points, completed, strict=True):
        assert point.power_w == pytest.approx(math.fsum(by_second[second]) / len(by_second[second]))


def test_a_history_point_carries_the_readings_beside_the_mean_power() -> None:
    clock = ManualClock()
    store = store_on(clock)
    read = reading(200.0, temperature_c=71.0, utilization=0.25, limit_w=350.0)
    for ts, watts in ((50.0, 100.0), (50.5, 300.0), (51.0, 200.0)):
        clock.advance(0.5)
        store.put([sample(ts, watts, read=read)])
    assert store.history(60) == {0: [HistoryPoint(50.0, 200.0, 71.0, 0.25, 350.0, None, 1.4e9, 0)]}


def test_a_history_point_holds_the_target_clock_and_clock_events_of_its_seconds_last_sample() -> (
    None
):
    clock = ManualClock()
    store = store_on(clock)
    store.set_power_limit_targets({0: 250.0, 1: 400.0})
    capped = ClockEvent.SW_POWER_CAP | ClockEvent.SW_THERMAL
    passes = [
        (50.0, reading(300.0, temperature_c=60.0, clock_sm_hz=1.98e9, clock_events=0), None),
        (50.5, reading(300.0, temperature_c=64.0, clock_sm_hz=1.5e9, clock_events=capped), None),
        (51.0, reading(300.0, temperature_c=66.0, clock_sm_hz=1.2e9, clock_events=0), 220.0),
        (52.0, reading(300.0, temperature_c=67.0, clock_sm_hz=1.1e9, clock_events=None), None),
    ]
    for ts, read, new_target in passes:
        clock.advance(0.5)
        if new_target is not None:  # the engine's next period, before this pass
            store.set_power_limit_targets({0: new_target})
        store.put([sample(ts, 300.0, read=read)])
    assert store.history(60)[0] == [
        HistoryPoint(50.0, 300.0, 64.0, 0.5, 300.0, 250.0, 1.5e9, int(capped)),
        HistoryPoint(51.0, 300.0, 66.0, 0.5, 300.0, 220.0, 1.2e9, 0),
    ]


def test_a_history_point_has_no_target_without_a_policy_engine() -> None:
    clock = ManualClock()
    store = store_on(clock)
    for ts in (50.0, 51.0):
        clock.advance(1.0)
        store.put([sample(ts, 300.0)])
    assert [p.power_limit_target_w for p in store.history(60)[0]] == [None]


def test_the_seconds_a_gpu_was_lost_have_no_history_point() -> None:
    clock = ManualClock()
    store = store_on(clock)
    store.set_power_limit_targets({0: 250.0})
    for tenths in range(1000, 1060, 5):  # 100.0 .. 105.5 s, lost from 101.0 to 103.5
        clock.advance(0.5)
        up = not 1010 <= tenths <= 1035
        store.put([sample(tenths / 10, 300.0 if up else None, up=up)])
    assert [p.timestamp_s for p in store.history(60)[0]] == [100.0, 104.0]


def history_of(seconds: int, *, history_s: int = 3600) -> MetricStore:
    """A store whose GPU 0 read once a second for ``seconds`` + 1 s (100 W, 101 W ...)."""
    clock = ManualClock()
    store = store_on(clock, history_s=history_s)  # type: ignore[arg-type]
    for i in range(seconds + 1):
        clock.advance(1.0)
        store.put([sample(500.0 + i, 100.0 + i)])
    return store


@pytest.mark.parametrize("seconds", [1, 3, 9])
def test_history_of_n_seconds_returns_exactly_the_last_n_seconds(seconds: int) -> None:
    store = history_of(10)  # completed seconds 500 .. 509
    points = store.history(seconds)[0]
    assert [p.timestamp_s for p in points] == [509.0 - k for k in reversed(range(seconds))]
    assert [p.power_w for p in points] == [109.0 - k for k in reversed(range(seconds))]


def test_history_longer_than_kept_returns_all_and_zero_seconds_returns_none() -> None:
    store = history_of(10)
    assert len(store.history(3600)[0]) == 10
    assert store.history(0)[0] == []


def test_history_keeps_only_the_last_history_s_seconds() -> None:
    store = history_of(10, history_s=4)
    assert [p.timestamp_s for p in store.history(3600)[0]] == [506.0, 507.0, 508.0, 509.0]


def test_history_lists_every_gpu_in_index_order_even_one_without_history_yet() -> None:
    clock = ManualClock()
    store = store_on(clock)
    for i in range(3):
        clock.advance(1.0)
        store.put([sample(700.0 + i, 100.0, index=2), sample(700.0, 50.0, index=0)])
    out = store.history(60)
    assert list(out) == [0, 2]
    assert out[0] == []
    assert [p.timestamp_s for p in out[2]] == [700.0, 701.0]


# ------------------------------------------- collector health, budgets, actions


def test_collector_errors_are_cumulative_and_each_pass_replaces_up_duration_and_error() -> None:
    store = MetricStore()
    store.record_collector("gpu", up=False, duration_s=0.5, error="GPU 3: lost", failed=True)
    store.record_collector("gpu", up=True, duration_s=0.25, failed=False)
    store.record_collector("gpu", up=False, duration_s=0.75, error="timeout", failed=True)
    store.record_collector("host", up=True, duration_s=0.125, failed=False)
    store.record_collector("gpu", up=True, duration_s=0.0625, error="XID events: x", failed=True)
    assert store.snapshot().collectors == {
        "gpu": CollectorHealth(
            up=True, errors_total=3, duration_s=0.0625, last_error="XID events: x"
        ),
        "host": CollectorHealth(up=True, errors_total=0, duration_s=0.125, last_error=None),
    }
    store.record_collector("gpu", up=True, duration_s=0.01, failed=False)
    assert store.snapshot().collectors["gpu"] == CollectorHealth(True, 3, 0.01, None)


def test_power_budgets_are_set_replaced_and_cleared_per_scope() -> None:
    store = MetricStore()
    store.set_power_budget("rack", None)  # clearing an unset budget is fine
    store.set_power_budget("node", 2400.0)
    store.set_power_budget("lease", 1800.0)
    store.set_power_budget("node", 2000.0)
    assert store.snapshot().power_budgets_w == {"node": 2000.0, "lease": 1800.0}
    store.set_power_budget("lease", None)
    assert store.snapshot().power_budgets_w == {"node": 2000.0}


def test_policy_actions_are_counted_per_policy_action_and_mode() -> None:
    store = MetricStore()
    for policy, action, mode in [
        ("budget", "cap", "dry_run"),
        ("budget", "cap", "dry_run"),
        ("budget", "cap", "apply"),
        ("thermal", "cap", "dry_run"),
        ("budget", "restore", "dry_run"),
        ("budget", "cap", "dry_run"),
    ]:
        store.count_policy_action(policy, action, mode)
    assert store.snapshot().policy_actions == {
        ("budget", "cap", "dry_run"): 3,
        ("budget", "cap", "apply"): 1,
        ("thermal", "cap", "dry_run"): 1,
        ("budget", "restore", "dry_run"): 1,
    }


def test_a_snapshot_is_a_copy_later_writes_do_not_change() -> None:
    store = MetricStore()
    store.set_power_budget("node", 2400.0)
    store.count_policy_action("budget", "cap", "apply")
    store.record_collector("gpu", up=True, duration_s=0.1, failed=False)
    snap = store.snapshot()
    store.set_power_budget("node", 100.0)
    store.count_policy_action("budget", "cap", "apply")
    store.record_collector("host", up=True, duration_s=0.1, failed=False)
    assert snap.power_budgets_w == {"node": 2400.0}
    assert snap.policy_actions == {("budget", "cap", "apply"): 1}
    assert list(snap.collectors) == ["gpu"]


def test_snapshot_holds_gpus_in_index_order_host_rapl_by_domain_and_the_last_pass() -> None:
    clock = ManualClock()
    store = store_on(clock)
    host = HostSample(5.0, 0.5, 2**33, 2**35)
    dram = RaplSample(5.0, "dram", 10.0, 5.0)
    package_old, package = (
        RaplSample(4.0, "package", 90.0, 40.0),
        RaplSample(5.0, "package", 100.0, 50.0),
    )
    empty = store.snapshot()
    assert (empty.gpus, empty.samples(HostSample), empty.samples(RaplSample)) == ((), (), ())
    assert empty.last_sample_s is None
    store.put([sample(5.0, 1.0, index=3), package_old, host, sample(5.0, 1.0, index=1)])
    store.put([package, dram, sample(5.0, 1.0, index=0)])
    store.mark_pass(1_700_000_005.5)
    snap = store.snapshot()
    assert [v.sample.info.index for v in snap.gpus] == [0, 1, 3]
    assert snap.samples(HostSample) == (host,)
    assert snap.samples(RaplSample) == (dram, package)
    assert snap.last_sample_s == 1_700_000_005.5


@dataclass(frozen=True, slots=True)
class FanSample:
    """A sample type the store has never heard of, as a new collector would bring."""

    fan: str
    rpm: float

    @property
    def key(self) -> str:
        return self.fan


def test_a_new_collectors_samples_are_kept_latest_per_key_in_key_order() -> None:
    store = store_on(ManualClock())
    old_a, b, a = FanSample("a", 900.0), FanSample("b", 1200.0), FanSample("a", 950.0)
    store.put([old_a, b, sample(5.0, 1.0)])
    before = store.snapshot()
    store.put([a, RaplSample(5.0, "package", 100.0, 50.0)])
    snap = store.snapshot()
    assert snap.samples(FanSample) == (a, b)
    assert snap.samples(RaplSample) == (RaplSample(5.0, "package", 100.0, 50.0),)
    assert snap.samples(HostSample) == ()
    assert [v.sample.info.index for v in snap.gpus] == [0]
    assert before.samples(FanSample) == (old_a, b)  # a snapshot is a copy


def test_each_gpu_view_carries_the_engines_target_for_it_and_none_where_it_has_none() -> None:
    store = MetricStore()
    store.put([sample(1.0, 100.0, index=0), sample(1.0, 100.0, index=1)])
    assert [v.power_limit_target_w for v in store.snapshot().gpus] == [None, None]
    store.set_power_limit_targets({1: 420.0, 7: 300.0})  # GPU 7 is not in the store
    snap = store.snapshot()
    assert [v.power_limit_target_w for v in snap.gpus] == [None, 420.0]
    assert snap.power_limit_targets_w == {1: 420.0, 7: 300.0}


def test_migrations_are_counted_per_reason_and_a_zero_count_makes_the_reason_appear() -> None:
    store = MetricStore()
    store.count_migration("lost", 0)
    store.count_migration("budget")
    store.count_migration("budget")
    store.count_migration("thermal", 3)
    assert store.snapshot().migrations == {"lost": 0, "budget": 2, "thermal": 3}


def test_the_policy_state_is_replaced_whole_and_cleared() -> None:
    store = MetricStore()
    assert store.snapshot().policy_state is None
    first = PolicyState("apply", {"thermal": True}, True, False, False)
    second = PolicyState("dry_run", {"thermal": False}, False, True, True)
    store.set_policy_state(first)
    snap = store.snapshot()
    store.set_policy_state(second)
    assert (snap.policy_state, store.snapshot().policy_state) == (first, second)
    store.set_policy_state(None)
    assert store.snapshot().policy_state is None


# --------------------------------------------------------------- history in steps
def per_second(
    store: MetricStore, clock: ManualClock, seconds: dict[int, GpuReading | None]
) -> None:
    """One sample a second at each given second (None: the GPU lost), then one more second."""
    for second, read in sorted(seconds.items()):
        clock.advance(1.0)
        power = None if read is None else read.power_w
        store.put([sample(float(second), power, up=read is not None, read=read)])
    clock.advance(1.0)
    store.put([sample(float(max(seconds) + 1), 1.0)])  # completes the last second


def test_history_in_steps_averages_each_aligned_bucket_exactly() -> None:
    clock = ManualClock()
    store = store_on(clock)
    store.set_power_limit_targets({0: 250.0})
    cap, thermal = int(ClockEvent.SW_POWER_CAP), int(ClockEvent.SW_THERMAL)
    reads = {  # seconds 301..306: buckets of 3 s start at 300, 303 and 306
        301: reading(100.0, temperature_c=60.0, utilization=0.2, limit_w=300.0,
                     clock_sm_hz=1.2e9, clock_events=cap),
        302: reading(200.0, temperature_c=64.0, utilization=0.4, limit_w=350.0,
                     clock_sm_hz=1.8e9, clock_events=thermal),
        303: reading(300.0, temperature_c=70.0, utilization=None, limit_w=300.0,
                     clock_sm_hz=1.5e9, clock_events=None),
        304: reading(330.0, temperature_c=71.0, utilization=0.9, limit_w=300.0,
                     clock_sm_hz=1.6e9, clock_events=0),
        305: reading(360.0, temperature_c=72.0, utilization=0.7, limit_w=300.0,
                     clock_sm_hz=1.7e9, clock_events=cap),
        306: reading(50.0, temperature_c=40.0, utilization=0.0, limit_w=300.0,
                     clock_sm_hz=None, clock_events=None),
    }  # fmt: skip
    per_second(store, clock, reads)
    assert store.history(60, step=3)[0] == [
        HistoryPoint(300.0, 150.0, 62.0, pytest.approx(0.3), 325.0, 250.0, 1.5e9, cap | thermal,
                     seconds=2),
        HistoryPoint(303.0, 330.0, 71.0, 0.8, 300.0, 250.0, 1.6e9, cap, seconds=3),
        HistoryPoint(306.0, 50.0, 40.0, 0.0, 300.0, 250.0, None, None, seconds=1),
    ]  # fmt: skip


def test_a_bucket_without_a_second_of_the_gpu_has_no_point() -> None:
    clock = ManualClock()
    store = store_on(clock)
    up = reading(300.0)
    # lost from 402 to 407: bucket 400 keeps its 2 seconds, 404 has none, 408 has its last
    reads: dict[int, GpuReading | None] = {s: up for s in range(400, 412)}
    reads.update(dict.fromkeys(range(402, 408)))
    per_second(store, clock, reads)
    points = store.history(60, step=4)[0]
    assert [(p.timestamp_s, p.power_w, p.seconds) for p in points] == [
        (400.0, 300.0, 2),
        (408.0, 300.0, 4),
    ]


def test_history_in_steps_holds_whole_buckets_of_every_second_in_the_window() -> None:
    store = history_of(20)  # completed seconds 500 .. 519, 100 W .. 119 W
    points = store.history(5, step=4)[0]  # the window: 515 .. 519
    assert [(p.timestamp_s, p.seconds) for p in points] == [(512.0, 4), (516.0, 4)]
    assert [p.power_w for p in points] == [113.5, 117.5]


def test_history_with_step_1_is_the_per_second_history() -> None:
    store = history_of(10)
    assert store.history(4, step=1) == store.history(4)
    assert [(p.timestamp_s, p.power_w, p.seconds) for p in store.history(4)[0]] == [
        (506.0, 106.0, 1), (507.0, 107.0, 1), (508.0, 108.0, 1), (509.0, 109.0, 1),
    ]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    powers=st.lists(st.one_of(st.none(), st.integers(0, 700)), min_size=1, max_size=80),
    step=st.integers(1, 30),
)
def test_energy_of_the_buckets_is_the_energy_of_their_seconds(
    powers: list[int | None], step: int
) -> None:
    clock = ManualClock()
    store = store_on(clock)
    reads = {
        1000 + i: None if p is None else reading(float(p)) for i, p in enumerate(powers)
    }  # None: lost that second
    per_second(store, clock, reads)
    seconds = store.history(3600)[0]
    buckets = store.history(3600, step=step)[0]
    assert sum(p.seconds for p in buckets) == len(seconds)
    assert math.fsum((p.power_w or 0.0) * p.seconds for p in buckets) == pytest.approx(
        math.fsum(p.power_w or 0.0 for p in seconds)
    )
    assert all(p.timestamp_s % step == 0 for p in buckets)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), window_s=st.integers(1, 70), step=st.integers(2, 12))
def test_the_buckets_are_those_of_the_seconds_in_the_window_each_whole(
    n: int, window_s: int, step: int
) -> None:
    # whatever the window's phase against the buckets: a bucket is there exactly when one of
    # its seconds is in the window, and then with every second of it that is kept
    store = history_of(n)
    every = [p.timestamp_s for p in store.history(3600)[0]]
    inside = {int(p.timestamp_s) // step * step for p in store.history(window_s)[0]}
    buckets = store.history(window_s, step=step)[0]
    assert [p.timestamp_s for p in buckets] == sorted(float(b) for b in inside)
    for p in buckets:
        assert p.seconds == sum(1 for t in every if int(t) // step * step == p.timestamp_s)


def test_a_step_under_1_is_refused() -> None:
    with pytest.raises(ValueError, match="step must be at least 1, got 0"):
        history_of(3).history(60, step=0)
