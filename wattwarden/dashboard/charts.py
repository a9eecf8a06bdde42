"""The dashboard's charts (Altair / Vega-Lite) and the tables behind them.

One colour per GPU on every chart: :func:`gpu_colour` keys a fixed palette by the GPU's index, and
every chart that colours by GPU uses the same scale (:func:`gpu_scale`). Every chart has a title
and every axis a title with its unit.

Every chart is built once as a Vega-Lite spec without data (cached per what shapes it: the GPUs
and colours, the title) and each render hands it a fresh table of columns (``*_frame``), as Arrow
(:func:`arrow`): Altair's checks and copies of the data are not paid per render, per card and per
refresh. ``st.vega_lite_chart(charts.arrow(frame), spec)`` draws one.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import pyarrow as pa  # type: ignore[import-untyped]

from wattwarden.dashboard.sources import HISTORY_POINTS, Decision, GpuHistory

PALETTE = (
    "#4c78a8",
    "#f58518",
    "#54a24b",
    "#e45756",
    "#72b7b2",
    "#b279a2",
    "#eeca3b",
    "#9d755d",
    "#ff9da6",
    "#439894",
    "#83bcb6",
    "#d67195",
    "#bab0ac",
    "#88d27a",
    "#fcbf5f",
    "#9ecae9",
)
"""GPU ``i`` is drawn in ``PALETTE[i % 16]`` everywhere."""
MAX_GPUS = 64
LOST_GREY = "#9e9e9e"
LIMIT_GREY = "#5f6368"
MAX_POINTS = HISTORY_POINTS
"""Points per series a chart draws at most (longer windows are averaged into buckets)."""


def gpu_colour(index: int) -> str:
    """The colour of GPU ``index`` on every chart."""
    return PALETTE[index % len(PALETTE)]


def gpu_label(index: int) -> str:
    """How a GPU is named on charts and legends."""
    return f"GPU {index}"


def gpu_scale(indices: Sequence[int] | None = None) -> alt.Scale:
    """The colour scale of GPUs (labels ``GPU i``), the same colours on every chart."""
    shown = list(range(MAX_GPUS)) if indices is None else sorted(indices)
    return alt.Scale(domain=[gpu_label(i) for i in shown], range=[gpu_colour(i) for i in shown])


Columns = dict[str, list[Any]]
"""A chart's table: one list per column, of equal lengths (``time`` in epoch milliseconds, units
in the names)."""


def arrow(frame: Columns) -> Any:
    """A table as Arrow, the form a chart's data travels in (no conversion through pandas)."""
    return pa.table(frame)


_NO_DATA = {"name": "empty"}
"""What Altair gives a chart built without data: a dataset of one empty row, which the chart
would draw beside the table handed to it (an ``undefined`` category); the specs drop it."""


def _without_empty_data(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _without_empty_data(v)
            for k, v in node.items()
            if not (k == "data" and v == _NO_DATA)
            and not (k == "datasets" and v == {"empty": [{}]})
        }
    if isinstance(node, list):
        return [_without_empty_data(v) for v in node]
    return node


def _spec(chart: alt.TopLevelMixin) -> str:
    """A chart built without data as a Vega-Lite spec that draws the data handed to it."""
    return json.dumps(_without_empty_data(chart.to_dict()))


def _loads(spec: str) -> dict[str, Any]:
    """A fresh copy of a cached spec (Streamlit takes the spec it is handed apart)."""
    loaded: dict[str, Any] = json.loads(spec)
    return loaded


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return sum(known) / len(known) if known else None


def _buckets(timestamps: Sequence[float], max_points: int) -> list[tuple[float, int, int]]:
    """Buckets of whole seconds over rows sorted by time, at most ``max_points`` of them.

    Each is ``(bucket start s, first row, end row)``.
    """
    if not timestamps:
        return []
    span = timestamps[-1] - timestamps[0] + 1.0
    step = max(math.ceil(span / max(max_points, 1)), 1)
    out: list[tuple[float, int, int]] = []
    start = 0
    key = (timestamps[0] // step) * step
    for i, ts in enumerate(timestamps):
        k = (ts // step) * step
        if k != key:
            out.append((key, start, i))
            key, start = k, i
    out.append((key, start, len(timestamps)))
    return out


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _bucket_means(
    values: Sequence[float | None], buckets: Sequence[tuple[float, int, int]], factor: float = 1.0
) -> list[float | None]:
    return [_scaled(_mean(values[lo:hi]), factor) for _, lo, hi in buckets]


def _each_scaled(values: Sequence[float | None], factor: float) -> list[float | None]:
    return [None if v is None else v * factor for v in values]


def gpu_frame(
    history: GpuHistory,
    *,
    budget_share_w: float | None = None,
    slowdown_c: float | None = None,
    max_points: int = MAX_POINTS,
) -> Columns:
    """One GPU's history as the table its card's chart draws (longer windows averaged).

    A row per bucket of whole seconds, at most ``max_points`` of them; rows already that coarse
    (the agent averaged them) are taken as they are. Seconds without a reading have no row (a
    lost GPU's gap stays a gap, never a zero).
    """
    h = history
    buckets = _buckets(h.timestamp_s, max_points)
    n = len(buckets)
    if n == len(h):  # a row per bucket: no averaging
        power, limit, target = list(h.power_w), list(h.power_limit_w), list(h.power_limit_target_w)
        temperature = list(h.temperature_c)
        utilization = _each_scaled(h.utilization_ratio, 100.0)
        clock = _each_scaled(h.clock_sm_hz, 1e-6)
    else:
        power = _bucket_means(h.power_w, buckets)
        limit = _bucket_means(h.power_limit_w, buckets)
        target = _bucket_means(h.power_limit_target_w, buckets)
        temperature = _bucket_means(h.temperature_c, buckets)
        utilization = _bucket_means(h.utilization_ratio, buckets, 100.0)
        clock = _bucket_means(h.clock_sm_hz, buckets, 1e-6)
    return {
        "time": [start_s * 1000.0 for start_s, _, _ in buckets],
        "gpu": [gpu_label(h.index)] * n,
        "power_w": power,
        "limit_w": limit,
        "target_w": target,
        "budget_share_w": [budget_share_w] * n,
        "temperature_c": temperature,
        "slowdown_c": [slowdown_c] * n,
        "utilization_pct": utilization,
        "clock_sm_mhz": clock,
    }


LIMIT_SERIES = {
    "limit_w": "limit",
    "target_w": "target limit",
    "budget_share_w": "budget share",
}
LIMIT_DASHES = {"limit": [6, 3], "target limit": [2, 2], "budget share": [8, 3, 2, 3]}


@functools.lru_cache(maxsize=8)
def _gpu_card_spec(width: int, panel_height: int) -> str:
    time_axis = alt.X("time:T", title="time", axis=alt.Axis(format="%H:%M:%S", labelAngle=0))
    colour = alt.Color("gpu:N", scale=gpu_scale(), legend=None)
    base = alt.Chart().properties(width=width, height=panel_height)

    power_line = base.mark_line(strokeWidth=2).encode(
        x=time_axis,
        y=alt.Y("power_w:Q", title="power (W)"),
        color=colour,
        tooltip=[alt.Tooltip("time:T", format="%H:%M:%S"), alt.Tooltip("power_w:Q", format=".0f")],
    )
    limits = (
        base.transform_fold(list(LIMIT_SERIES), as_=["series", "watts"])
        .transform_calculate(line=_series_expr(LIMIT_SERIES))
        .transform_filter("isValid(datum.watts)")
        .mark_line(strokeWidth=1.2, color=LIMIT_GREY)
        .encode(
            x=time_axis,
            y=alt.Y("watts:Q", title="power (W)"),
            strokeDash=alt.StrokeDash(
                "line:N",
                scale=alt.Scale(
                    domain=list(LIMIT_DASHES), range=[list(d) for d in LIMIT_DASHES.values()]
                ),
                legend=alt.Legend(title=None, orient="top", direction="horizontal"),
            ),
        )
    )
    power = alt.layer(power_line, limits).properties(title="Power, limit, target limit (W)")

    temp_line = base.mark_line(strokeWidth=2).encode(
        x=time_axis, y=alt.Y("temperature_c:Q", title="temperature (°C)"), color=colour
    )
    slowdown = base.mark_line(strokeDash=[4, 3], color="#d62728", strokeWidth=1.2).encode(
        x=time_axis, y=alt.Y("slowdown_c:Q", title="temperature (°C)")
    )
    temperature = alt.layer(temp_line, slowdown).properties(
        title="Temperature (°C), dashed: slowdown threshold"
    )

    util = base.mark_area(opacity=0.35).encode(
        x=time_axis,
        y=alt.Y("utilization_pct:Q", title="utilization (%)", scale=alt.Scale(domain=[0, 100])),
        color=colour,
    )
    clock = base.mark_line(strokeWidth=1.2, color=LIMIT_GREY).encode(
        x=time_axis, y=alt.Y("clock_sm_mhz:Q", title="SM clock (MHz)")
    )
    load = (
        alt.layer(util, clock)
        .resolve_scale(y="independent")
        .properties(title="Utilization (%, area) and SM clock (MHz, line)")
    )
    chart = alt.vconcat(power, temperature, load, spacing=12)
    return _spec(chart)


def gpu_card_spec(width: int = 300, panel_height: int = 90) -> dict[str, Any]:
    """The Vega-Lite spec of a GPU card's chart (no data: hand it :func:`gpu_frame`'s table).

    Three panels: power with its limit, the target limit and its share of the budget; the
    temperature with its slowdown threshold; utilization with the SM clock.
    """
    return _loads(_gpu_card_spec(width, panel_height))


def _series_expr(names: Mapping[str, str]) -> str:
    expr = "datum.series"
    for key, label in reversed(list(names.items())):
        expr = f"datum.series === '{key}' ? '{label}' : ({expr})"
    return expr


# ----------------------------------------------------------------------------------- fleet
def power_stack_frame(
    series: Mapping[str, Sequence[GpuHistory]],
    max_points: int = MAX_POINTS,
    *,
    budget_w: float | None = None,
) -> Columns:
    """Power per series (a GPU, or a node's GPUs summed) over time: ``time series power_w``.

    Each series is averaged into buckets of whole seconds, at most ``max_points`` of them over
    the span of all series; a bucket where a series has no reading has no row for it. Every row
    carries the budget (``budget_w``, None without one) for the chart's budget line.
    """
    stamps = [ts for hists in series.values() for h in hists for ts in h.timestamp_s[:1]]
    ends = [ts for hists in series.values() for h in hists for ts in h.timestamp_s[-1:]]
    out: Columns = {"time": [], "series": [], "power_w": [], "budget_w": []}
    if not stamps:
        return out
    first, last = min(stamps), max(ends)
    step = max(math.ceil((last - first + 1.0) / max(max_points, 1)), 1)
    times, names, powers = out["time"], out["series"], out["power_w"]
    for label, hists in series.items():
        if len(hists) == 1 and _aligned(hists[0].timestamp_s, step):  # a row per bucket
            h = hists[0]
            known = [
                (ts, p) for ts, p in zip(h.timestamp_s, h.power_w, strict=True) if p is not None
            ]
            times.extend(ts * 1000.0 for ts, _ in known)
            powers.extend(p for _, p in known)
            names.extend([label] * len(known))
            continue
        per_second: dict[float, float] = {}
        for h in hists:
            for ts, p in zip(h.timestamp_s, h.power_w, strict=True):
                if p is not None:
                    per_second[ts] = per_second.get(ts, 0.0) + p
        sums: dict[float, list[float]] = {}
        for ts, p in per_second.items():
            sums.setdefault((ts // step) * step, []).append(p)
        for key, v in sorted(sums.items()):
            times.append(key * 1000.0)
            powers.append(sum(v) / len(v))
            names.append(label)
    out["budget_w"] = [budget_w] * len(times)
    return out


def _aligned(timestamps: Sequence[float], step: int) -> bool:
    """Whether each row starts its own bucket of ``step`` seconds (rows sorted by time)."""
    keys = [ts // step for ts in timestamps]
    return all(ts % step == 0 for ts in timestamps) and len(set(keys)) == len(keys)


@functools.lru_cache(maxsize=16)
def _power_stack_spec(colours: tuple[tuple[str, str], ...], title: str, height: int) -> str:
    scale = alt.Scale(domain=[c for c, _ in colours], range=[v for _, v in colours])
    area = (
        alt.Chart()
        .mark_area(opacity=0.85)
        .encode(
            x=alt.X("time:T", title="time", axis=alt.Axis(format="%H:%M:%S", labelAngle=0)),
            y=alt.Y("power_w:Q", title="power (W)", stack="zero"),
            color=alt.Color(
                "series:N",
                scale=scale,
                legend=alt.Legend(
                    title=None, orient="right", columns=1 if len(colours) <= 16 else 2
                ),
            ),
            order=alt.Order("series:N"),
            tooltip=[
                alt.Tooltip("time:T", format="%H:%M:%S"),
                "series:N",
                alt.Tooltip("power_w:Q", title="power (W)", format=".0f"),
            ],
        )
    )
    budget = (
        alt.Chart()
        .transform_aggregate(budget_w="max(budget_w)")
        .transform_filter("isValid(datum.budget_w)")
        .transform_calculate(label="'budget ' + format(datum.budget_w, ',.0f') + ' W'")
    )
    rule = budget.mark_rule(color="#d62728", strokeDash=[6, 4], size=2).encode(
        y=alt.Y("budget_w:Q", title="power (W)")
    )
    text = budget.mark_text(align="left", dx=4, dy=-6, color="#d62728").encode(
        y="budget_w:Q", x=alt.value(0), text="label:N"
    )
    return _spec(alt.layer(area, rule, text).properties(title=title, height=height))


def power_stack_spec(
    colours: Mapping[str, str], *, title: str, height: int = 320
) -> dict[str, Any]:
    """A stacked area of power per series with the budget as a dashed line (when rows have one).

    No data: hand it :func:`power_stack_frame`'s table. ``colours`` names each series' colour.
    """
    return _loads(_power_stack_spec(tuple(colours.items()), title, height))


# -------------------------------------------------------------------------------- decisions
ACTION_SHAPES = {"set": "circle", "hold": "square", "migrate": "triangle-right"}


def decisions_frame(decisions: Sequence[Decision]) -> Columns:
    """The decisions as a table (one row each, in the order given)."""
    return {
        "time": [d.time_s * 1000.0 for d in decisions],
        "gpu": [gpu_label(d.gpu) for d in decisions],
        "policy": [d.policy for d in decisions],
        "action": [d.action for d in decisions],
        "mode": [d.mode for d in decisions],
        "from_w": [d.from_w for d in decisions],
        "to_w": [d.to_w for d in decisions],
        "enforced_w": [d.enforced_w for d in decisions],
        "to_gpu": [None if d.to_gpu is None else gpu_label(d.to_gpu) for d in decisions],
        "jobs": [", ".join(d.jobs) for d in decisions],
        "reason": [d.reason for d in decisions],
        "error": [d.error or "" for d in decisions],
    }


@functools.lru_cache(maxsize=16)
def _decisions_spec(gpus: tuple[int, ...], row_px: int) -> str:
    chart = (
        alt.Chart()
        .mark_point(size=90, filled=True, opacity=0.9)
        .encode(
            x=alt.X("time:T", title="time", axis=alt.Axis(format="%H:%M:%S", labelAngle=0)),
            y=alt.Y("gpu:N", title="GPU", sort=[gpu_label(i) for i in gpus]),
            color=alt.Color("gpu:N", scale=gpu_scale(gpus), legend=None),
            shape=alt.Shape(
                "action:N",
                scale=alt.Scale(domain=list(ACTION_SHAPES), range=list(ACTION_SHAPES.values())),
                legend=alt.Legend(title="action", orient="top"),
            ),
            tooltip=[
                alt.Tooltip("time:T", format="%H:%M:%S"),
                "gpu:N",
                "policy:N",
                "action:N",
                alt.Tooltip("from_w:Q", title="from (W)", format=".0f"),
                alt.Tooltip("to_w:Q", title="to (W)", format=".0f"),
                "reason:N",
                "error:N",
            ],
        )
        # a band of row_px per GPU that has decisions, however many there are
        .properties(title="Decisions over time (hover for the reason)", height=alt.Step(row_px))
    )
    return _spec(chart)


def decisions_spec(gpus: Sequence[int], row_px: int = 22) -> dict[str, Any]:
    """The decisions on a timeline: a row of ``row_px`` per GPU, shape by action, reason on hover.

    No data: hand it :func:`decisions_frame`'s table.
    """
    return _loads(_decisions_spec(tuple(sorted(gpus)), row_px))


# ------------------------------------------------------------------------------------- jobs
def job_energy_frame(jobs: Sequence[tuple[str, float, int, str]]) -> Columns:
    """Jobs' energy as a table: ``(name, joules, GPU index, state)`` each."""
    return {
        "job": [name for name, _, _, _ in jobs],
        "energy_kj": [joules / 1000 for _, joules, _, _ in jobs],
        "gpu": [gpu_label(gpu) for _, _, gpu, _ in jobs],
        "state": [state for _, _, _, state in jobs],
    }


@functools.lru_cache(maxsize=16)
def _job_energy_spec(gpus: tuple[int, ...]) -> str:
    chart = (
        alt.Chart()
        .mark_bar()
        .encode(
            x=alt.X("energy_kj:Q", title="energy (kJ)"),
            y=alt.Y("job:N", title="job", sort="-x"),
            color=alt.Color("gpu:N", scale=gpu_scale(gpus), title="GPU"),
            opacity=alt.Opacity(
                "state:N", scale=alt.Scale(domain=["running", "finished"], range=[1.0, 0.5])
            ),
            tooltip=["job:N", "state:N", "gpu:N", alt.Tooltip("energy_kj:Q", format=".1f")],
        )
        .properties(title="Energy per job (kJ), by the GPU it runs on")
    )
    return _spec(chart)


def job_energy_spec(gpus: Sequence[int]) -> dict[str, Any]:
    """Energy per job as bars, coloured by the GPU it runs on.

    No data: hand it :func:`job_energy_frame`'s table.
    """
    return _loads(_job_energy_spec(tuple(sorted(set(gpus)))))
