"""Policy: the engine's mode, budget and lease, its decisions with their reasons, and actions.

Every action needs the agents' token (``--token-file``, ``$WATTWARDEN_TOKEN`` or the state dir's)
and a ticked confirmation; the agent's refusal is shown in words.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from wattwarden.dashboard import charts, units
from wattwarden.dashboard.sources import ActionResult, AgentState, Decision, Down, Policy
from wattwarden.dashboard.ui import Context, flash, pick_node, run_page, show_down

NO_ENGINE = 404


def render(ctx: Context) -> None:
    """The Policy page for one node."""
    url = pick_node(ctx, ctx.sources.states() if len(ctx.settings.agents) > 1 else None)
    state = ctx.sources.state(url)
    if isinstance(state, Down):
        show_down(state)
        return
    policy = ctx.sources.policy(url)
    if isinstance(policy, Down) and policy.status == NO_ENGINE:
        st.info(f"{state.node} runs no policy engine ({policy.reason}): start the agent with "
                "--power-budget-watts or --policy to see decisions.")  # fmt: skip
    elif isinstance(policy, Down):
        show_down(policy)
    engine = policy if isinstance(policy, Policy) else None
    top(state, engine)
    if engine is not None:
        decisions(ctx, url, state)
    actions(ctx, url, state)


def top(state: AgentState, policy: Policy | None) -> None:
    """Mode, budget and lease, and the banners: holding, fallback, budget unreachable."""
    mode = policy.mode if policy is not None else state.policy_mode
    budget = policy.power_budget_w if policy is not None else state.power_budget_w
    a, b, c, d = st.columns(4)
    a.metric("Mode", "apply" if mode == "apply" else "dry-run", border=True,
             help="dry-run decides and records; apply sets the limits")  # fmt: skip
    b.metric("Budget (node)", units.watts(budget), border=True)
    c.metric("Lease (fleet controller)", units.watts(state.power_budget_lease_w), border=True,
             help="a fleet controller's budget; overrides the node's while it lasts")  # fmt: skip
    d.metric("GPU power now", units.watts(state.power_w), border=True,
             delta=None if state.budget_in_force_w is None
             else f"{units.watts(state.budget_in_force_w - state.power_w)} headroom",
             delta_arrow="off")  # fmt: skip
    holding = (policy.holding if policy is not None else None) or state.policy_holding
    fallback = (policy.fallback if policy is not None else None) or state.policy_fallback
    if holding:
        st.warning(f"Holding: no new decisions — {holding}", icon=":material/pause_circle:")
    if fallback:
        st.error(f"Fell back to dry-run: {fallback}", icon=":material/warning:")
    if policy is not None:
        if policy.budget_unreachable:
            st.warning("The budget is unreachable: every GPU is at its minimum limit.")
        on = ", ".join(name for name, enabled in policy.policies.items() if enabled) or "none"
        st.caption(
            f"Policies on: {on} · period {policy.period_s:g} s · {policy.periods} periods · "
            f"{policy.errors_total} failed"
            + (f" (last: {policy.last_error})" if policy.last_error else "")
        )


def decisions(ctx: Context, url: str, state: AgentState) -> None:
    """The decisions on a timeline, and as a table (newest first)."""
    st.subheader("Decisions")
    got = ctx.sources.decisions(url)
    if isinstance(got, Down):
        show_down(got)
        return
    if not got:
        st.info("No decisions yet.")
        return
    spec = charts.decisions_spec([g.index for g in state.gpus], row_px=TIMELINE_ROW_PX)
    st.vega_lite_chart(charts.arrow(charts.decisions_frame(got)), spec, width="stretch")
    table = decisions_table(got)
    st.dataframe(
        table,
        hide_index=True,
        height=TABLE_ROW_PX * (min(len(table), TABLE_ROWS) + 1) + 3,
        column_config={
            **{
                k: st.column_config.NumberColumn(format="%.0f W")
                for k in ("from (W)", "to (W)", "enforced (W)")
            },
            "reason": st.column_config.TextColumn(width="large"),
        },
    )


# (comments, not docstrings, beside names here: Streamlit's magic would print a bare string)
TABLE_ROWS = 10  # rows the decisions table shows before it scrolls
TABLE_ROW_PX = 35  # Streamlit's row height in a dataframe (the header is one more)
TIMELINE_ROW_PX = 22  # the decisions timeline: a row per GPU that has decisions


def decisions_table(decisions: Sequence[Decision]) -> list[dict[str, object]]:
    """The decisions, newest first, as table rows.

    A column that would be empty for every row (the move's target GPU, the jobs, an error) or
    the same for every row (the mode, shown on top) is left out, so the reason fits: the
    table is short and sized (an explicit height), and draws at once.
    """
    moves = any(d.to_gpu is not None for d in decisions)
    jobs = any(d.jobs for d in decisions)
    errors = any(d.error for d in decisions)
    modes = len({d.mode for d in decisions}) > 1
    rows: list[dict[str, object]] = []
    for d in reversed(decisions):
        row: dict[str, object] = {
            "time": units.clock_time(d.time_s),
            "GPU": d.gpu,
            "policy": d.policy,
            "action": d.action,
            "from (W)": d.from_w,
            "to (W)": d.to_w,
            "enforced (W)": d.enforced_w,
        }
        if moves:
            row["to GPU"] = d.to_gpu
        row["reason"] = d.reason
        if modes:
            row["mode"] = d.mode
        if errors:
            row["error"] = d.error
        if jobs:
            row["jobs"] = ", ".join(d.jobs)
        rows.append(row)
    return rows


def _done(result: ActionResult) -> None:
    flash(result.ok, result.message)
    st.rerun()


def _confirmed(ticked: bool) -> bool:
    if not ticked:
        st.warning("Nothing sent: tick the confirmation first.")
    return ticked


def actions(ctx: Context, url: str, state: AgentState) -> None:
    """The four actions, each in a form that asks for confirmation."""
    st.subheader("Actions")
    st.caption(
        "Each action sends the agents' token (--token-file, else $WATTWARDEN_TOKEN, else the "
        "state dir's token file)."
    )
    sources = ctx.sources
    budget_tab, mode_tab, limit_tab, migrate_tab = st.tabs(
        ["Set the budget", "Switch mode", "Set a GPU's limit", "Migrate a job"]
    )
    with budget_tab, st.form("budget_form"):
        watts = st.number_input(
            "Node power budget (W)", min_value=1.0, max_value=1e6, step=50.0,
            value=float(state.power_budget_w or 300.0 * max(len(state.gpus), 1)),
            key="budget_watts",
        )  # fmt: skip
        clear = st.checkbox("Clear the budget instead (no budget capping)", key="budget_clear")
        ok = st.checkbox(f"I confirm: change the budget of {state.node}", key="budget_confirm")
        if st.form_submit_button("Set the budget") and _confirmed(ok):
            _done(sources.set_budget(url, None if clear else float(watts)))
    with mode_tab, st.form("mode_form"):
        mode = st.radio(
            "Mode", ["dry_run", "apply"], horizontal=True, key="mode_choice",
            index=1 if state.policy_mode == "apply" else 0,
            format_func=lambda m: "dry-run (decide and record)" if m == "dry_run"
            else "apply (set the limits)",
        )  # fmt: skip
        ok = st.checkbox(f"I confirm: switch {state.node}'s mode", key="mode_confirm")
        if st.form_submit_button("Switch mode") and _confirmed(ok):
            _done(sources.set_mode(url, str(mode)))
    with limit_tab, st.form("limit_form"):
        gpus = [g for g in state.gpus if g.up]
        gpu = st.selectbox(
            "GPU", [g.index for g in gpus], key="limit_gpu",
            format_func=lambda i: f"{charts.gpu_label(i)} (limit "
            f"{units.watts(next(g.power_limit_w for g in gpus if g.index == i))})",
        )  # fmt: skip
        watts = st.number_input("Power limit (W)", min_value=1.0, max_value=1e5, step=10.0,
                                value=300.0, key="limit_watts")  # fmt: skip
        st.caption("Only in apply mode; within the GPU's range (the agent refuses otherwise).")
        ok = st.checkbox("I confirm: set this GPU's power limit", key="limit_confirm")
        if st.form_submit_button("Set the limit") and _confirmed(ok) and gpu is not None:
            _done(sources.set_power_limit(url, int(gpu), float(watts)))
    with migrate_tab, st.form("migrate_form"):
        jobs = sources.jobs(url)
        running = [] if isinstance(jobs, Down) else [j for j in jobs if j.state == "running"]
        name = st.selectbox("Job", [j.name for j in running], key="migrate_job",
                            placeholder="no running job")  # fmt: skip
        target = st.selectbox("To GPU", [g.index for g in state.gpus if g.up],
                              key="migrate_gpu", format_func=charts.gpu_label)  # fmt: skip
        ok = st.checkbox("I confirm: move this job", key="migrate_confirm")
        if st.form_submit_button("Migrate") and _confirmed(ok):
            if name is None or target is None:
                st.warning("Nothing sent: choose a running job and a GPU.")
            else:
                _done(sources.migrate_job(url, str(name), int(target)))


if __name__ == "__main__":
    run_page(render, "Policy")
