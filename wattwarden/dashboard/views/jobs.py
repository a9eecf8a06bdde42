"""Jobs: running and recently finished jobs with their power, energy and efficiency."""

from __future__ import annotations

from typing import Any

import streamlit as st

from wattwarden.dashboard import charts, units
from wattwarden.dashboard.sources import Down, Job
from wattwarden.dashboard.ui import Context, run_page, show_down


def job_row(node: str, j: Job) -> dict[str, Any]:
    """A job as a table row (units in the column names)."""
    return {
        "job": j.name,
        "node": node,
        "state": j.state,
        "GPU": j.gpu,
        "priority": j.priority,
        "power (W)": j.power_w if j.state == "running" else 0.0,  # a finished job draws none
        "mean power (W)": j.mean_power_w,
        "energy (kJ)": j.energy_j / 1000,
        "energy (Wh)": j.energy_j / units.JOULES_PER_WH,
        "J/step": j.joules_per_step,
        "tokens/J": j.tokens_per_joule,
        "step": j.step,
        "samples": j.samples,
        "tokens": j.tokens,
        "migrations": j.migrations,
        "moving to GPU": j.target_gpu,
        "duration": units.duration(j.duration_s),
        "finished": units.clock_time(j.finished_at_s),
    }


COLUMNS = {
    "power (W)": st.column_config.NumberColumn(format="%.0f W"),
    "mean power (W)": st.column_config.NumberColumn(format="%.0f W"),
    "energy (kJ)": st.column_config.NumberColumn(format="%.1f kJ"),
    "energy (Wh)": st.column_config.NumberColumn(format="%.2f Wh"),
    "J/step": st.column_config.NumberColumn(format="%.1f J"),
    "tokens/J": st.column_config.NumberColumn(format="%.2f"),
}


def render(ctx: Context) -> None:
    """The Jobs page: every agent's jobs in one sortable table."""
    rows: list[dict[str, Any]] = []
    jobs: list[Job] = []
    for url in ctx.settings.agents:
        got = ctx.sources.jobs(url)
        if isinstance(got, Down):
            show_down(got)
            continue
        state = ctx.sources.state(url)
        node = url if isinstance(state, Down) else state.node
        rows += [job_row(node, j) for j in got]
        jobs += got
    running = [j for j in jobs if j.state == "running"]
    finished = [j for j in jobs if j.state != "running"]
    a, b, c, d = st.columns(4)
    a.metric("Running", len(running), border=True)
    b.metric("Finished (kept 1 h)", len(finished), border=True)
    c.metric("Power of running jobs", units.watts(sum(j.power_w for j in running)), border=True)
    d.metric("Energy of finished jobs", units.energy(sum(j.energy_j for j in finished)),
             border=True)  # fmt: skip
    if not rows:
        st.info("No jobs: run one with `wattwarden job run --name NAME -- CMD`.")
        return
    rows.sort(key=lambda r: (r["state"] != "running", r["job"]))
    st.dataframe(rows, hide_index=True, column_config=COLUMNS)
    st.caption("Click a column header to sort. Finished jobs keep their totals.")
    energy = charts.job_energy_frame([(j.name, j.energy_j, j.gpu, j.state) for j in jobs])
    spec = charts.job_energy_spec([j.gpu for j in jobs])
    st.vega_lite_chart(charts.arrow(energy), spec, width="stretch")


if __name__ == "__main__":
    run_page(render, "Jobs")
