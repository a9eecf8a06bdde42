"""The dashboard's charts (Altair / Vega-Lite) and the tables behind them.

One colour per GPU on every chart: :func:`gpu_colour` keys a fixed palette by the GPU's index, and
every chart that colours by GPU uses the same scale (:func:`gpu_scale`). Every chart has a title
and every axis a title with its unit.

The GPU cards are redrawn every refresh, so their chart is built once as a spec without data
(:func:`gpu_card_spec`, cached) and each refresh hands it a fresh table (:func:`gpu_frame`): the
spec's checks and building are not paid per card and per refresh.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt

from wattwarden.dashboard.sources import Decision, GpuHistory

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
MAX_POINTS = 300
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


Records = list[dict[str, Any]]
"""A chart's table: one dict per row (``time`` in epoch milliseconds, units in the names)."""


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


def gpu_frame(
    history: GpuHistory,
    *,
    budget_share_w: float | None = None,
    slowdown_c: float | None = None,
    max_points: int = MAX_POINTS,
) -> Records:
    """One GPU's history as the table its card's chart draws (longer windows averaged).

    Seconds without a reading have no row (a lost GPU's gap stays a gap, never a zero).
    """
    h = history
    label = gpu_label(h.index)
    rows: Records = []
    for start_s, lo, hi in _buckets(h.timestamp_s, max_points):
        rows.append(
            {
                "time": start_s * 1000.0,
                "gpu": label,
                "power_w": _mean(h.power_w[lo:hi]),
                "limit_w": _mean(h.power_limit_w[lo:hi]),
                "target_w": _mean(h.power_limit_target_w[lo:hi]),
                "budget_share_w": budget_share_w,
                "temperature_c": _mean(h.temperature_c[lo:hi]),
                "slowdown_c": slowdown_c,
                "utilization_pct": _scaled(_mean(h.utilization_ratio[lo:hi]), 100.0),
                "clock_sm_mhz": _scaled(_mean(h.clock_sm_hz[lo:hi]), 1e-6),
            }
        )
    return rows


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
    return json.dumps(chart.to_dict())


def gpu_card_spec(width: int = 300, panel_height: int = 90) -> dict[str, Any]:
    """The Vega-Lite spec of a GPU card's chart (no data: hand it :func:`gpu_frame`'s table).

    Three panels: power with its limit, the target limit and its share of the budget; the
    temperature with its slowdown threshold; utilization with the SM clock.
    """
    spec: dict[str, Any] = json.loads(_gpu_card_spec(width, panel_height))
    return spec


def _series_expr(names: Mapping[str, str]) -> str:
    expr = "datum.series"
    for key, label in reversed(list(names.items())):
        expr = f"datum.series === '{key}' ? '{label}' : ({expr})"
    return expr


# ----------------------------------------------------------------------------------- fleet
def power_stack_frame(
    series: Mapping[str, Sequence[GpuHistory]], max_points: int = MAX_POINTS
) -> Records:
    """Power per series (a GPU, or a node's GPUs summed) over time: ``time series power_w``.

    Each series is averaged into buckets of whole seconds, at most ``max_points`` of them over
    the span of all series; a bucket where a series has no reading has no row for it.
    """
    stamps = [ts for hists in series.values() for h in hists for ts in h.timestamp_s[:1]]
    ends = [ts for hists in series.values() for h in hists for ts in h.timestamp_s[-1:]]
    if not stamps:
        return []
    first, last = min(stamps), max(ends)
    step = max(math.ceil((last - first + 1.0) / max(max_points, 1)), 1)
    rows: Records = []
    for label, hists in series.items():
        per_second: dict[float, float] = {}
        for h in hists:
            for ts, p in zip(h.timestamp_s, h.power_w, strict=True):
                if p is not None:
                    per_second[ts] = per_second.get(ts, 0.0) + p
        sums: dict[float, list[float]] = {}
        for ts, p in per_second.items():
            sums.setdefault((ts // step) * step, []).append(p)
        rows.extend(
            {"time": key * 1000.0, "series": label, "power_w": sum(v) / len(v)}
            for key, v in sorted(sums.items())
        )
    return rows


def power_stack_chart(
    frame: Records,
    *,
    budget_w: float | None,
    colours: Mapping[str, str],
    title: str,
    height: int = 320,
) -> alt.LayerChart:
    """A stacked area of power per series with the budget as a rule line."""
    scale = alt.Scale(domain=list(colours), range=list(colours.values()))
    area = (
        alt.Chart(alt.InlineData(values=frame))
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
    layers: list[alt.Chart] = [area]
    if budget_w is not None:
        budget = alt.InlineData(
            values=[{"budget_w": budget_w, "label": f"budget {budget_w:,.0f} W"}]
        )
        rule = alt.Chart(budget).mark_rule(color="#d62728", strokeDash=[6, 4], size=2)
        layers.append(rule.encode(y=alt.Y("budget_w:Q", title="power (W)")))
        layers.append(
            alt.Chart(budget)
            .mark_text(align="left", dx=4, dy=-6, color="#d62728")
            .encode(y="budget_w:Q", x=alt.value(0), text="label:N")
        )
    return alt.LayerChart(layer=layers).properties(title=title, height=height)


# -------------------------------------------------------------------------------- decisions
ACTION_SHAPES = {"set": "circle", "hold": "square", "migrate": "triangle-right"}


def decisions_frame(decisions: Sequence[Decision]) -> Records:
    """The decisions as a table (one row each, in the order given)."""
    return [
        {
            "time": d.time_s * 1000.0,
            "gpu": gpu_label(d.gpu),
            "policy": d.policy,
            "action": d.action,
            "mode": d.mode,
            "from_w": d.from_w,
            "to_w": d.to_w,
            "enforced_w": d.enforced_w,
            "to_gpu": None if d.to_gpu is None else gpu_label(d.to_gpu),
            "jobs": ", ".join(d.jobs),
            "reason": d.reason,
            "error": d.error or "",
        }
        for d in decisions
    ]


def decisions_chart(frame: Records, gpus: Sequence[int], height: int = 260) -> alt.Chart:
    """The decisions on a timeline: a row per GPU, shape by action, the reason on hover."""
    chart: alt.Chart = (
        alt.Chart(alt.InlineData(values=frame))
        .mark_point(size=90, filled=True, opacity=0.9)
        .encode(
            x=alt.X("time:T", title="time", axis=alt.Axis(format="%H:%M:%S", labelAngle=0)),
            y=alt.Y("gpu:N", title="GPU", sort=[gpu_label(i) for i in sorted(gpus)]),
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
        .properties(title="Decisions over time (hover for the reason)", height=height)
    )
    return chart
