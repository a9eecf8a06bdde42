"""Fleet: power against the budget, energy, GPUs by state, firing alerts, and the nodes."""

from __future__ import annotations

from typing import Any

import streamlit as st

from wattwarden.dashboard import charts, units
from wattwarden.dashboard.sources import (
    AgentState,
    Alert,
    Down,
    FleetFromPrometheus,
    GpuHistory,
    History,
)
from wattwarden.dashboard.ui import Context, guarded, run_page, show_down

WINDOWS_MIN = (5, 15, 60)
STATE_HELP = {
    "ok": "up, at its default limit, clocks not held back",
    "capped": "power limit under its default",
    "throttled": "clocks held back by power (power cap, slowdown, power brake)",
    "hot": "at its max operating temperature, or thermal clock events",
    "lost": "fell off the bus: no readings",
}


def render(ctx: Context) -> None:
    """The Fleet page; its numbers and chart refresh live."""
    window_min = st.segmented_control(
        "Chart window",
        WINDOWS_MIN,
        default=15,
        format_func=lambda m: f"{m} min",
        key="fleet_window_min",
        required=True,
    )
    window_s = float((window_min or 15) * 60)

    @st.fragment(run_every=ctx.settings.refresh_s)
    def live() -> None:
        guarded("the fleet view", lambda: fleet(ctx, window_s))

    live()


def fleet(ctx: Context, window_s: float) -> None:
    """Everything on the page, from one fetch of each source."""
    sources = ctx.sources
    states = sources.states()
    up = {u: s for u, s in states.items() if isinstance(s, AgentState)}
    for s in states.values():
        if isinstance(s, Down):
            show_down(s)
    prom = sources.fleet()
    if isinstance(prom, Down):
        show_down(prom, severe=False)
    alerts = sources.alerts()
    if isinstance(alerts, Down):
        show_down(alerts, severe=False)
    histories: dict[str, History] = {}
    # as many series as the stacked chart draws: a node each when several are up, else a GPU each
    points = chart_points(len(up) if len(up) > 1 else sum(len(s.gpus) for s in up.values()))
    for url in up:
        h = sources.history(url, window_s, max_points=points)
        if isinstance(h, Down):
            show_down(h, severe=False)
        else:
            histories[url] = h
    prom_ok = prom if isinstance(prom, FleetFromPrometheus) else None

    numbers(up, prom_ok, histories, alerts)
    power_chart(up, histories, window_s)
    alert_list(alerts)
    nodes_table(states, prom_ok)


# (comments, not docstrings, beside names here: Streamlit's magic would print a bare string)
STACK_ROWS = 6000  # rows the stacked power chart draws at most, all series together


def chart_points(series: int) -> int:
    """Points per series of the stacked chart: at most 300, fewer with many series."""
    return max(30, min(charts.MAX_POINTS, STACK_ROWS // max(series, 1)))


def _budget(up: dict[str, AgentState], prom: FleetFromPrometheus | None) -> float | None:
    budgets = [s.budget_in_force_w for s in up.values() if s.budget_in_force_w is not None]
    if budgets:
        return sum(budgets)
    return None if prom is None else prom.budget_w


def numbers(
    up: dict[str, AgentState],
    prom: FleetFromPrometheus | None,
    histories: dict[str, History],
    alerts: list[Alert] | Down | None,
) -> None:
    """The top rows of big numbers."""
    power_w: float | None = sum(s.power_w for s in up.values()) if up else None
    if power_w is None and prom is not None:
        power_w = prom.power_w
    budget_w = _budget(up, prom)
    power_col, hour_col, day_col, alerts_col = st.columns(4)
    if budget_w is None:
        power_col.metric("Power now", units.watts(power_w), help="no budget set", border=True)
    else:
        headroom = None if power_w is None else budget_w - power_w
        power_col.metric(
            "Power now",
            units.watts(power_w),
            delta=f"{units.watts(headroom)} headroom of {units.watts(budget_w)} budget",
            delta_color="normal" if headroom is None or headroom >= 0 else "inverse",
            delta_arrow="off",
            border=True,
        )
    if prom is not None:
        hour_col.metric(
            "Energy, last hour",
            units.energy(prom.energy_1h_j),
            border=True,
            help="increase(gpu_energy_joules_total[1h]) in Prometheus",
        )
        day_col.metric("Energy, last day", units.energy(prom.energy_1d_j), border=True,
                       help="increase(gpu_energy_joules_total[1d]) in Prometheus")  # fmt: skip
    else:
        covered = max((h.covered_s for h in histories.values()), default=0.0)
        energy = sum(h.energy_j() for h in histories.values()) if histories else None
        hour_col.metric(
            f"Energy, last {units.duration(covered) if covered else 'window'}",
            units.energy(energy),
            help="from the agents' per-second history (they keep 1 h); "
            "pass --prometheus for the last hour and day",
            border=True,
        )
        day_col.metric(
            "Energy, last day",
            "—",
            help="the agents keep one hour: pass --prometheus for the last day",
            border=True,
        )
    if alerts is None:
        alerts_col.metric("Alerts firing", "—", help="pass --alertmanager", border=True)
    elif isinstance(alerts, Down):
        alerts_col.metric("Alerts firing", "—", help="Alertmanager is down", border=True)
    else:
        critical = sum(a.severity in ("critical", "page") for a in alerts)
        alerts_col.metric(
            "Alerts firing",
            len(alerts),
            delta=f"{critical} critical" if critical else None,
            delta_color="inverse",
            delta_arrow="off",
            border=True,
        )
    counts = units.count_states(g for s in up.values() for g in s.gpus)
    for col, (state, n) in zip(st.columns(len(counts)), counts.items(), strict=True):
        col.metric(f"GPUs {state}", n, help=STATE_HELP[state], border=True)


def power_chart(up: dict[str, AgentState], histories: dict[str, History], window_s: float) -> None:
    """Power per GPU (per node with several nodes), stacked, with the budget as a line."""
    budget = _budget(up, None)
    window = units.duration(window_s)
    if len(histories) > 1 or len(up) > 1:
        series: dict[str, list[GpuHistory]] = {
            up[u].node if u in up else u: list(h.gpus.values()) for u, h in histories.items()
        }
        colours = {name: charts.PALETTE[i % len(charts.PALETTE)] for i, name in enumerate(series)}
        title = f"GPU power per node, last {window} (W)"
    else:
        hist = next(iter(histories.values()), None)
        gpus = {} if hist is None else hist.gpus
        series = {charts.gpu_label(i): [h] for i, h in sorted(gpus.items())}
        colours = {charts.gpu_label(i): charts.gpu_colour(i) for i in sorted(gpus)}
        title = f"GPU power per GPU, last {window} (W)"
    rows = charts.power_stack_frame(series, chart_points(len(series)), budget_w=budget)
    if not rows["time"]:
        st.info("No power history yet: the agents have not kept a full second of readings.")
        return
    spec = charts.power_stack_spec(colours, title=title)
    st.vega_lite_chart(charts.arrow(rows), spec, width="stretch")


def alert_list(alerts: list[Alert] | Down | None) -> None:
    """Firing alerts with their severity and runbook."""
    st.subheader("Alerts firing")
    if alerts is None:
        st.caption("No Alertmanager given (--alertmanager URL).")
        return
    if isinstance(alerts, Down):
        st.caption("Alertmanager is down: see the banner above.")
        return
    if not alerts:
        st.success("No alerts firing.", icon=":material/check_circle:")
        return
    st.dataframe(
        [
            {
                "severity": a.severity,
                "alert": a.name,
                "summary": a.summary,
                "where": ", ".join(
                    f"{k}={a.labels[k]}" for k in ("instance", "gpu") if k in a.labels
                ),
                "runbook": a.runbook_url,
                "since": a.starts_at,
            }
            for a in alerts
        ],
        hide_index=True,
        column_config={"runbook": st.column_config.LinkColumn("runbook", display_text="runbook")},
    )


def nodes_table(states: dict[str, AgentState | Down], prom: FleetFromPrometheus | None) -> None:
    """One row per node: from Prometheus when given, else from the agents."""
    st.subheader("Nodes")
    if prom is not None:
        st.dataframe(
            [
                {
                    "node": n.instance,
                    "GPUs up": n.gpus_up,
                    "GPUs": n.gpus_total,
                    "power (W)": n.power_w,
                    "budget (W)": n.budget_w,
                    "energy 1 h (kWh)": None
                    if n.energy_1h_j is None
                    else n.energy_1h_j / units.JOULES_PER_KWH,
                    "energy 1 d (kWh)": None
                    if n.energy_1d_j is None
                    else n.energy_1d_j / units.JOULES_PER_KWH,
                }
                for n in prom.nodes
            ],
            hide_index=True,
            column_config=_number_columns(),
        )
        st.caption("From Prometheus.")
        return
    rows: list[dict[str, object]] = []
    for url, s in states.items():
        if isinstance(s, Down):
            rows.append({"node": url, "agent": url, "status": f"down: {s.reason}"})
            continue
        budget = s.budget_in_force_w
        rows.append(
            {
                "node": s.node,
                "agent": url,
                "status": "up",
                "GPUs up": sum(g.up for g in s.gpus),
                "GPUs": len(s.gpus),
                "power (W)": s.power_w,
                "budget (W)": budget,
                "headroom (W)": None if budget is None else budget - s.power_w,
                "mode": s.policy_mode,
                "last sample": units.age(s.last_sample_s),
            }
        )
    st.dataframe(rows, hide_index=True, column_config=_number_columns())
    st.caption("From the agents.")


def _number_columns() -> dict[str, Any]:
    return {
        "power (W)": st.column_config.NumberColumn(format="%.0f W"),
        "budget (W)": st.column_config.NumberColumn(format="%.0f W"),
        "headroom (W)": st.column_config.NumberColumn(format="%.0f W"),
        "energy 1 h (kWh)": st.column_config.NumberColumn(format="%.3f kWh"),
        "energy 1 d (kWh)": st.column_config.NumberColumn(format="%.3f kWh"),
    }


if __name__ == "__main__":
    run_page(render, "Fleet")
