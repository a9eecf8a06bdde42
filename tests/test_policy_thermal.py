"""Thermal guard: cut before the throttle point, hold in the hysteresis band, give back slowly."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FakeNvml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wattwarden.collectors.gpu import GpuCollector
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import GpuView, StoreSnapshot
from wattwarden.hardware.device import ClockEvent, GpuInfo, GpuReading
from wattwarden.hardware.nvml import NvmlBackend
from wattwarden.hardware.sim.gpu import DEFAULT_AMBIENT_C, SimGpu
from wattwarden.hardware.sim.models import MODELS
from wattwarden.nodesim import SimNode
from wattwarden.policies.base import Intent, PolicyInputs
from wattwarden.policies.thermal import ThermalGuard, ceiling_c

MAX_OPERATING_C = 87.0
SLOWDOWN_C = 90.0


def info(
    gpu: int = 3,
    uuid: str | None = None,
    *,
    lo: float | None = 200.0,
    hi: float | None = 700.0,
    slowdown: float | None = SLOWDOWN_C,
    max_operating: float | None = MAX_OPERATING_C,
) -> GpuInfo:
    return GpuInfo(
        gpu,
        uuid or f"GPU-{gpu}",
        "NVIDIA H100 80GB HBM3",
        f"00000000:{gpu:02x}:00.0",
        "550",
        2**36,
        lo,
        hi,
        hi,
        slowdown,
        max_operating,
    )


def reading(temp: float | None, limit: float | None = 700.0) -> GpuReading:
    return GpuReading(
        power_w=None,
        power_instant_w=None,
        energy_j=None,
        power_limit_w=limit,
        temperature_gpu_c=temp,
        temperature_memory_c=None,
        utilization_gpu_ratio=1.0,
        utilization_memory_ratio=None,
        memory_used_bytes=None,
        memory_total_bytes=None,
        clock_sm_hz=None,
        clock_memory_hz=None,
        clock_event_mask=None,
    )


def view(
    temp: float | None,
    read_s: float,
    *,
    limit: float | None = 700.0,
    draw: float | None = None,
    up: bool = True,
    identity: GpuInfo | None = None,
) -> GpuView:
    sample = GpuSample(
        identity or info(),
        up,
        1_700_000_000.0 + read_s,
        reading(temp, limit),
        0.0,
        "counter",
        power_w=draw,
        read_mono_s=read_s,
        slow_read_mono_s=read_s,
    )
    return GpuView(sample, draw, draw)


def inputs(now_s: float, *views: GpuView) -> PolicyInputs:
    return PolicyInputs(StoreSnapshot(tuple(views), {}, None), (), now_s)


@dataclass
class Loop:
    """One GPU fed to a guard period by period (one new reading a period)."""

    guard: ThermalGuard = field(default_factory=ThermalGuard)
    now_s: float = 0.0
    limit: float = 700.0

    def period(
        self, temp: float | None, *, draw: float | None = None, **kw: object
    ) -> Intent | None:
        """One period a second later, the limit enforced being the guard's last intent."""
        self.now_s += 1.0
        v = view(temp, self.now_s, limit=self.limit, draw=draw, **kw)  # type: ignore[arg-type]
        out = list(self.guard.intents(inputs(self.now_s, v)))
        assert len(out) <= 1
        if out:
            self.limit = out[0].watts
        return out[0] if out else None


# ------------------------------------------------------------------------------------ ceiling
@pytest.mark.parametrize(
    ("slowdown", "max_operating", "ceiling"),
    [
        (90.0, 87.0, 87.0),
        (85.0, 87.0, 85.0),
        (None, 87.0, 87.0),
        (90.0, None, 90.0),
        (None, None, None),
        (0.0, 87.0, 87.0),  # a board that answers 0 has no such threshold
    ],
)
def test_the_ceiling_is_the_lower_of_the_thresholds_the_gpu_reports(
    slowdown: float | None, max_operating: float | None, ceiling: float | None
) -> None:
    identity = info(slowdown=slowdown, max_operating=max_operating)
    assert ceiling_c(identity) == ceiling


def test_a_gpu_without_thresholds_or_limit_bounds_gets_no_intent_however_hot() -> None:
    guard = ThermalGuard()
    for identity in (info(slowdown=None, max_operating=None), info(lo=None), info(hi=None)):
        assert list(guard.intents(inputs(1.0, view(99.0, 1.0, identity=identity)))) == []


def test_a_cool_gpu_the_guard_never_cut_gets_no_intent() -> None:
    loop = Loop()
    assert [loop.period(t) for t in (40.0, 70.0, 81.0)] == [None, None, None]


# --------------------------------------------------------------------------------------- cuts
@pytest.mark.parametrize(
    ("temp", "fraction"),
    [(82.0, 0.10), (84.5, 0.20), (87.0, 0.30), (95.0, 0.30)],
    ids=["margin-edge", "halfway", "at-ceiling", "over"],
)
def test_the_cut_grows_from_10_percent_at_the_margin_edge_to_30_at_the_ceiling(
    temp: float, fraction: float
) -> None:
    intent = Loop().period(temp)
    assert intent is not None and intent.watts == pytest.approx(700.0 * (1 - fraction))


def test_a_cut_starts_from_the_draw_where_the_gpu_draws_less_than_its_limit() -> None:
    intent = Loop().period(82.0, draw=400.0)
    assert intent is not None and intent.watts == pytest.approx(360.0)


def test_a_cut_says_where_the_gpu_stands_against_its_throttle_point() -> None:
    under = Loop().period(84.0)
    assert under == Intent(
        3, 574.0, "GPU 3 at 84 C, 3 C under its 87 C throttle point: cut to 574 W"
    )
    over = Loop().period(89.0)
    assert over is not None
    assert over.reason == "GPU 3 at 89 C, 2 C over its 87 C throttle point: cut to 490 W"


def test_cuts_never_go_below_the_minimum_limit_and_say_so() -> None:
    loop = Loop()
    intents = [loop.period(88.0 + i) for i in range(10)]  # over the ceiling: a cut every reading
    assert [i.watts for i in intents if i is not None][-1] == 200.0
    last = intents[-1]
    assert last is not None and last.reason.endswith("cut to 200 W (its minimum)")


def test_after_a_cut_a_rising_reading_cuts_again_and_a_steady_one_waits_settle_s() -> None:
    loop = Loop(ThermalGuard(settle_s=5.0))
    first = loop.period(83.0)
    rising = loop.period(84.0)
    assert first is not None and rising is not None and rising.watts < first.watts
    held = [loop.period(84.0) for _ in range(4)]  # 1..4 s after the last cut
    assert {i.watts for i in held if i is not None} == {rising.watts}
    assert held[0] is not None and "holding" in held[0].reason
    steady = loop.period(84.0)  # 5 s after it, no cooler: the cut was not enough
    assert steady is not None and steady.watts < rising.watts


def test_while_the_temperature_falls_inside_the_margin_the_guard_lets_the_cut_act() -> None:
    loop = Loop(ThermalGuard(settle_s=5.0))
    cut = loop.period(85.0)
    assert cut is not None
    # one degree cooler every 5 s: the cut is working, however long it stays in the margin
    falling = [loop.period(85.0 - (i + 1) // 5) for i in range(10)]  # 85 C x4, 84 C x5, 83 C
    assert [i.watts for i in falling if i is not None] == [cut.watts] * 10
    stalled = [loop.period(83.0) for _ in range(5)]  # 83 C for a whole settle_s: cut again
    assert [i.watts for i in stalled if i is not None][:4] == [cut.watts] * 4
    assert stalled[4] is not None and stalled[4].watts < cut.watts


def test_the_same_reading_seen_twice_is_one_step() -> None:
    guard = ThermalGuard()
    v = view(85.0, 1.0)
    first = list(guard.intents(inputs(1.0, v)))
    again = list(guard.intents(inputs(2.0, v)))  # the engine ran before the next full read
    assert again == first


# ---------------------------------------------------------------------------- hold and raise
def test_the_hysteresis_band_holds_the_cut_and_below_it_the_limit_comes_back_in_steps() -> None:
    loop = Loop(ThermalGuard(margin_c=5.0, hysteresis_c=3.0, raise_fraction=0.05, settle_s=5.0))
    cut = loop.period(86.0)
    assert cut is not None
    band = [loop.period(t) for t in (81.9, 80.0, 79.0)]  # 5 to 8 C under the 87 C ceiling
    assert [i.watts for i in band if i is not None] == [cut.watts] * 3
    assert band[0] is not None
    assert band[0].reason.endswith(f"holding {cut.watts:.0f} W until it cools below 79 C")
    up = loop.period(78.0)
    assert up is not None and up.watts == pytest.approx(cut.watts + 25.0)
    assert (
        up.reason
        == f"GPU 3 at 78 C, 9 C under its 87 C throttle point: limit back up to {up.watts:.0f} W"
    )
    waits = [loop.period(70.0) for _ in range(4)]
    assert {i.watts for i in waits if i is not None} == {up.watts}
    nxt = loop.period(70.0)
    assert nxt is not None and nxt.watts == pytest.approx(up.watts + 25.0)


def test_the_guard_stops_proposing_once_the_limit_is_back_at_its_maximum() -> None:
    loop = Loop(ThermalGuard(settle_s=0.0))
    loop.period(82.0)  # a 10 % cut: 630 W
    steps = []
    while (intent := loop.period(60.0)) is not None:
        steps.append(intent.watts)
        assert len(steps) < 100
    assert steps == pytest.approx([655.0, 680.0])  # the next step would reach 700 W: no intent
    assert loop.period(60.0) is None and loop.guard.targets() == {}


@pytest.mark.parametrize("how", ["no-sensor", "lost"])
def test_an_unreadable_temperature_holds_the_cut_and_never_raises_it(how: str) -> None:
    loop = Loop()
    cut = loop.period(85.0)
    assert cut is not None
    for _ in range(20):
        intent = loop.period(None) if how == "no-sensor" else loop.period(60.0, up=False)
        assert intent is not None and intent.watts == cut.watts
    why = "temperature unreadable" if how == "no-sensor" else "is lost"
    assert intent.reason == f"GPU 3 {why}: holding {cut.watts:.0f} W"


# --------------------------------------------------------------------------------- identity
def test_a_replaced_or_renumbered_gpu_starts_afresh_and_a_removed_one_is_forgotten() -> None:
    guard = ThermalGuard()
    hot = list(guard.intents(inputs(1.0, view(85.0, 1.0))))
    assert [i.gpu for i in hot] == [3]
    # the band would hold the cut of GPU-3, but a new board in slot 3 has no cut to hold
    replaced = view(80.0, 2.0, identity=info(3, "GPU-new"))
    assert list(guard.intents(inputs(2.0, replaced))) == []
    assert guard.targets() == {}
    list(guard.intents(inputs(3.0, view(85.0, 3.0))))
    renumbered = view(80.0, 4.0, identity=info(5, "GPU-3"))
    assert list(guard.intents(inputs(4.0, renumbered))) == []
    assert list(guard.intents(inputs(5.0))) == [] and guard.targets() == {}


def test_settings_out_of_range_are_refused_with_the_name_of_the_setting() -> None:
    for kwargs, name in (
        ({"margin_c": 0.0}, "margin_c"),
        ({"hysteresis_c": -1.0}, "hysteresis_c"),
        ({"cut_fraction": 0.5, "max_cut_fraction": 0.3}, "cut fractions"),
        ({"max_cut_fraction": 1.0}, "cut fractions"),
        ({"raise_fraction": 0.0}, "raise_fraction"),
        ({"settle_s": -1.0}, "settle_s"),
    ):
        with pytest.raises(ValueError, match=name):
            ThermalGuard(**kwargs)  # type: ignore[arg-type]
    assert ThermalGuard().name == "thermal"


# ------------------------------------------------------------------------------- properties
periods = st.lists(
    st.tuples(
        st.one_of(st.none(), st.floats(20.0, 110.0)),  # temperature
        st.one_of(st.none(), st.floats(0.0, 800.0)),  # draw
        st.booleans(),  # a new reading this period
        # the enforced limit: the guard's last intent (apply mode, the guard winning), or
        # anywhere in range (dry-run, another policy's lower limit, the engine restoring it)
        st.one_of(st.none(), st.floats(0.0, 1.0)),
    ),
    min_size=1,
    max_size=60,
)
bounds = st.tuples(st.floats(50.0, 400.0), st.floats(0.0, 600.0)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=100, deadline=None)
@given(
    seq=periods,
    bounds=bounds,
    margin=st.floats(1.0, 10.0),
    settle=st.floats(0.0, 10.0),
)
def test_every_intent_is_within_the_gpus_limit_range_and_never_rises_inside_the_margin(
    seq: list[tuple[float | None, float | None, bool, float | None]],
    bounds: tuple[float, float],
    margin: float,
    settle: float,
) -> None:
    lo, hi = bounds
    guard = ThermalGuard(margin_c=margin, settle_s=settle)
    identity = info(lo=lo, hi=hi)
    limit, read_s, previous = hi, 0.0, None
    for i, (temp, draw, fresh, elsewhere) in enumerate(seq, start=1):
        read_s = float(i) if fresh else read_s
        if elsewhere is not None:
            limit = lo + elsewhere * (hi - lo)
        v = view(temp, read_s, limit=limit, draw=draw, identity=identity)
        out = list(guard.intents(inputs(float(i), v)))
        assert len(out) <= 1
        intent = out[0] if out else None
        if intent is not None:
            assert lo <= intent.watts <= hi
            limit = intent.watts
        inside = temp is not None and MAX_OPERATING_C - temp <= margin
        if inside and previous is not None:
            assert intent is not None and intent.watts <= previous.watts
        previous = intent


# ------------------------------------------------------------------- thresholds through NVML
@pytest.fixture
def no_thresholds(fake_nvml: FakeNvml) -> Iterator[FakeNvml]:
    """A driver that answers NotSupported for the slowdown and InvalidArgument for GPU max (an
    older NVML than that threshold kind)."""

    def threshold(handle: object, kind: object, ref: object) -> int:
        return 3 if getattr(kind, "value", kind) == 1 else 2  # NOT_SUPPORTED, INVALID_ARGUMENT

    fake_nvml.lib.nvmlDeviceGetTemperatureThreshold = threshold  # type: ignore[method-assign]
    yield fake_nvml


def test_thresholds_read_through_nvml_feed_the_guard(fake_nvml: FakeNvml) -> None:
    fleet = fake_nvml.fleet
    fleet[0].set_load(1.0)
    fleet[0].inject("overheat", delta_c=15.0)  # 90.5 C at full load, over the 87 C ceiling
    collector = GpuCollector(NvmlBackend(), monotonic=fake_nvml.clock)
    first = collector.infos()[0]
    assert (first.temperature_slowdown_c, first.temperature_max_operating_c) == (90.0, 87.0)
    fake_nvml.clock.advance(120.0)
    samples = collector.collect()
    views = tuple(GpuView(s, s.power_w, s.power_w) for s in samples)
    intents = list(ThermalGuard().intents(PolicyInputs(StoreSnapshot(views, {}, None), (), 1.0)))
    assert [i.gpu for i in intents] == [0]
    collector.backend.close()


def test_a_driver_without_thresholds_gives_none_and_the_guard_leaves_its_gpus_alone(
    no_thresholds: FakeNvml,
) -> None:
    fleet = no_thresholds.fleet
    fleet[0].set_load(1.0)
    fleet[0].inject("overheat", delta_c=15.0)
    collector = GpuCollector(NvmlBackend(), monotonic=no_thresholds.clock)
    identity = collector.infos()[0]
    assert identity.uuid == fleet[0].uuid  # the rest of the identity was read
    assert (identity.temperature_slowdown_c, identity.temperature_max_operating_c) == (None, None)
    no_thresholds.clock.advance(120.0)
    samples = collector.collect()
    views = tuple(GpuView(s, s.power_w, s.power_w) for s in samples)
    assert views[0].sample.reading is not None
    assert (views[0].sample.reading.temperature_gpu_c or 0) >= 82  # where the guard would cut
    guard = ThermalGuard()
    assert list(guard.intents(PolicyInputs(StoreSnapshot(views, {}, None), (), 1.0))) == []
    collector.backend.close()


# ------------------------------------------------------------- closed loop on the simulated node
THROTTLED = ClockEvent.SW_THERMAL | ClockEvent.HW_SLOWDOWN | ClockEvent.HW_THERMAL


@dataclass
class Watch:
    """What a GPU went through, checked on every sampler pass."""

    hottest_c: float = 0.0
    throttled_passes: int = 0

    def __call__(self, gpu: SimGpu) -> None:
        self.hottest_c = max(self.hottest_c, gpu.true_temperature_c())
        if gpu.clock_event_reasons() & THROTTLED:
            self.throttled_passes += 1


def overheat(
    state_dir: Path,
    *,
    guard: bool,
    model: str,
    load: float,
    delta_c: float,
    heat_first: bool,
    warm_s: float = 100.0,
) -> tuple[Watch, SimNode]:
    """One GPU under load whose surroundings get ``delta_c`` hotter; every pass watched.

    ``heat_first``: the heat comes while the GPU idles and the load after it (the steepest
    climb, from a cool die), else the load runs to its steady state and the heat comes then
    (the climb starts closest to the margin).
    """
    node = SimNode(
        1,
        state_dir=state_dir,
        policies=[ThermalGuard()] if guard else [],
        mode="apply",
        model=model,
    )
    gpu = node.fleet[0]
    watch = Watch()
    first, second = (
        (lambda: gpu.inject("overheat", delta_c=delta_c), lambda: gpu.set_load(load))
        if heat_first
        else (lambda: gpu.set_load(load), lambda: gpu.inject("overheat", delta_c=delta_c))
    )
    first()
    node.run(warm_s, on_pass=lambda _n: watch(gpu))
    second()
    node.run(300.0, on_pass=lambda _n: watch(gpu))
    return watch, node


def guard_of(node: SimNode) -> ThermalGuard:
    (guard,) = node.engine.policies
    assert isinstance(guard, ThermalGuard)
    return guard


def steady_c(model: str, watts: float, delta_c: float) -> float:
    """Where the die settles at ``watts`` with surroundings ``delta_c`` hotter than usual."""
    spec = MODELS[model]
    return DEFAULT_AMBIENT_C + delta_c + watts * spec.thermal_resistance_c_per_w


def load_w(model: str, load: float) -> float:
    """What the GPU draws at this load, uncapped."""
    spec = MODELS[model]
    return spec.idle_w + spec.dynamic_w * load


def delta_for(model: str, load: float, excess_c: float) -> float:
    """The heat that puts this load's steady state ``excess_c`` over the GPU's throttle point."""
    return MODELS[model].sw_thermal_c + excess_c - steady_c(model, load_w(model, load), 0.0)


def test_an_overheating_gpu_is_cooled_before_it_throttles_and_without_the_guard_it_throttles(
    tmp_path: Path,
) -> None:
    delta = delta_for("h100-sxm", 1.0, 15.0)  # a 102 C steady state at full load
    guarded, node = overheat(
        tmp_path / "on", guard=True, model="h100-sxm", load=1.0, delta_c=delta, heat_first=False
    )
    try:
        assert guarded.throttled_passes == 0
        assert guarded.hottest_c < MAX_OPERATING_C
        sets = [d for d in node.decisions if d.action == "set"]
        assert sets and {d.policy for d in sets} == {"thermal"}
        assert min(d.watts or 0 for d in sets) >= 200.0 and node.limits_w()[0] < 700.0
        # it settles: over the last 100 s the limit moved one way at most (no oscillation)
        late = [d.watts or 0 for d in sets if d.timestamp_s >= node.wall() - 100.0]
        moves = [b - a for a, b in itertools.pairwise(late)]
        assert all(m > 0 for m in moves) or all(m < 0 for m in moves)
    finally:
        node.close()
    control, node = overheat(
        tmp_path / "off", guard=False, model="h100-sxm", load=1.0, delta_c=delta, heat_first=False
    )
    node.close()
    assert control.throttled_passes > 0 and control.hottest_c >= MAX_OPERATING_C


def test_a_cooled_gpu_gets_its_full_limit_back_and_the_guard_lets_go(tmp_path: Path) -> None:
    _, node = overheat(
        tmp_path, guard=True, model="h100-sxm", load=1.0, delta_c=25.0, heat_first=False
    )
    try:
        assert node.limits_w()[0] < 700.0
        node.fleet[0].inject("clear")
        cleared = len(node.decisions)
        node.run(400.0)
        assert node.limits_w()[0] == 700.0
        sets = [(d.policy, d.watts) for d in node.decisions[cleared:] if d.action == "set"]
        ups = [w for policy, w in sets[:-1] if policy == "thermal"]
        assert ups == sorted(ups) and len(ups) >= 2  # back up in steps
        assert sets[-1] == ("engine", 700.0)  # no intent left: the engine gave the limit back
        assert guard_of(node).targets() == {}
    finally:
        node.close()


ROOM_C = 10.0
"""The heats the property draws leave the guard this much room: at its minimum limit the GPU
would settle at least 10 C (two margins) under its throttle point. With less, the minimum limit
(all the guard may set) cannot keep the GPU away from its throttle point for long, and the
driver's own slowdown is what protects it."""


@settings(max_examples=30, deadline=None)
@given(
    model=st.sampled_from(["h100-sxm", "a100-sxm"]),
    load=st.floats(0.5, 1.0),
    where=st.floats(0.0, 1.0),
    warm_s=st.floats(0.0, 120.0),
    heat_first=st.booleans(),
)
def test_over_loads_and_heat_steps_the_guard_keeps_every_pass_under_the_throttle_point(
    model: str, load: float, where: float, warm_s: float, heat_first: bool
) -> None:
    spec = MODELS[model]
    # from a heat that just throttles the unguarded GPU (1 C over) to the guard's full room
    least = delta_for(model, load, 1.0)
    most = (
        spec.sw_thermal_c
        - ROOM_C
        - steady_c(model, min(spec.power_min_w, load_w(model, load)), 0.0)
    )
    assume(least <= most)
    delta = least + where * (most - least)
    with tempfile.TemporaryDirectory() as d:
        guarded, node = overheat(
            Path(d) / "on",
            guard=True,
            model=model,
            load=load,
            delta_c=delta,
            heat_first=heat_first,
            warm_s=warm_s,
        )
        node.close()
        control, node = overheat(
            Path(d) / "off",
            guard=False,
            model=model,
            load=load,
            delta_c=delta,
            heat_first=heat_first,
            warm_s=warm_s,
        )
        node.close()
    assert guarded.throttled_passes == 0 and guarded.hottest_c < spec.sw_thermal_c
    assert control.throttled_passes > 0  # the same heat, unguarded, does throttle
