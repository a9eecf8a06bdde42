"""GPUs: one card per GPU, refreshed live; a lost GPU's card is grey and says LOST.

A card has power against its limit, target limit and budget share, the temperature against its
slowdown threshold, utilization, the SM clock and the clock events.
"""

from __future__ import annotations

import math

import streamlit as st

from wattwarden.dashboard import charts, units
from wattwarden.dashboard.sources import AgentState, Down, GpuHistory, GpuState, History
from wattwarden.dashboard.ui import Context, guarded, pick_node, run_page, show_down

WINDOWS_MIN = (5, 15, 60)
PAGE_SIZES = (8, 16, 32, 64)
COLUMNS = 2
EVENT_COLOURS = {
    "idle": "gray",
    "sw_power_cap": "orange",
    "hw_slowdown": "red",
    "sw_thermal": "red",
    "hw_thermal": "red",
    "hw_power_brake": "violet",
}
STATE_COLOURS = {"ok": "green", "capped": "blue", "throttled": "orange", "hot": "red"}


def render(ctx: Context) -> None:
    """The GPUs page: a node, a window and a page of cards, the cards refreshed live."""
    url = pick_node(ctx, ctx.sources.states() if len(ctx.settings.agents) > 1 else None)
    left, middle, right = st.columns([2, 2, 3])
    with left:
        window_min = st.segmented_control(
            "Window", WINDOWS_MIN, default=5, format_func=lambda m: f"{m} min",
            key="gpus_window_min", required=True,
        )  # fmt: skip
    with middle:
        per_page = st.segmented_control(
            "GPUs per page", PAGE_SIZES, default=8, key="gpus_per_page", required=True
        )
    state = ctx.sources.state(url)
    count = len(state.gpus) if isinstance(state, AgentState) else 0
    size = int(per_page or PAGE_SIZES[0])
    pages = max(math.ceil(count / size), 1)
    with right:
        page = 1
        if pages > 1:
            page = int(
                st.number_input("Page", min_value=1, max_value=pages, value=1, key="gpus_page")
            )
            st.caption(f"{count} GPUs, {pages} pages of {size}")
    window_s = float((window_min or WINDOWS_MIN[0]) * 60)
    first = (page - 1) * size

    @st.fragment(run_every=ctx.settings.refresh_s)
    def live() -> None:
        guarded("the GPU cards", lambda: cards(ctx, url, window_s, first, size))

    live()


def cards(ctx: Context, url: str, window_s: float, first: int, size: int) -> None:
    """A page of GPU cards from one state and one history fetch."""
    state = ctx.sources.state(url)
    if isinstance(state, Down):
        show_down(state)
        return
    shown = state.gpus[first : first + size]
    history = ctx.sources.history(url, window_s)
    if isinstance(history, Down):
        show_down(history, severe=False)
    hist = history if isinstance(history, History) else None
    up = sum(g.up for g in state.gpus)
    budget = state.budget_in_force_w
    share = None if budget is None or up == 0 else budget / up
    mode = "apply" if state.policy_mode == "apply" else "dry-run"
    st.caption(
        f"{state.node}: {len(state.gpus)} GPUs, {up} up · {units.watts(state.power_w)} now · "
        f"budget {units.watts(budget)} ({mode}) · last sample {units.age(state.last_sample_s)}"
    )
    for row in range(0, len(shown), COLUMNS):
        for col, g in zip(st.columns(COLUMNS), shown[row : row + COLUMNS], strict=False):
            with col:
                card(g, None if hist is None else hist.gpus.get(g.index), share)


def card(g: GpuState, history: GpuHistory | None, share_w: float | None) -> None:
    """One GPU's card."""
    with st.container(border=True, key=f"gpu_card_{g.index}"):
        colour = charts.LOST_GREY if not g.up else charts.gpu_colour(g.index)
        st.markdown(
            f'<span style="color:{colour};font-size:1.4em">■</span> '
            f"**{charts.gpu_label(g.index)}** · {g.name}",
            unsafe_allow_html=True,
        )
        if not g.up:
            st.markdown(
                '<div style="background:#e0e0e0;color:#555;padding:1.2em;text-align:center;'
                'border-radius:0.5em;font-weight:bold;font-size:1.3em">LOST</div>',
                unsafe_allow_html=True,
            )
            st.caption(
                f"{charts.gpu_label(g.index)} fell off the bus: no readings (power unknown, "
                f"not 0). UUID {g.uuid}"
            )
            return
        state = units.gpu_state(g)
        chips = [f":{STATE_COLOURS[state]}-badge[{state}]"]
        chips += [f":{EVENT_COLOURS.get(e, 'gray')}-badge[{e}]" for e in g.clock_events]
        if g.xid_errors_total:
            chips.append(f":red-badge[XID errors {g.xid_errors_total}]")
        st.markdown(" ".join(chips))
        # two by two, so that each value has room at two cards a row (four in a row cut them)
        left, right = st.columns(2)
        left.metric("power", units.watts(g.power_w),
                    help=f"limit {units.watts(g.power_limit_w)}")  # fmt: skip
        right.metric("temperature", units.celsius(g.temperature_c),
                     help=f"slowdown at {units.celsius(g.temperature_slowdown_c)}")  # fmt: skip
        left.metric("utilization", units.percent(g.utilization_ratio))
        right.metric("SM clock", units.gigahertz(g.clock_sm_hz))
        st.caption(
            f"limit {units.watts(g.power_limit_w)} · target "
            f"{units.watts(g.power_limit_target_w)} · budget share {units.watts(share_w)} · "
            f"range {units.watts(g.power_limit_min_w)} to {units.watts(g.power_limit_max_w)}"
        )
        if history is None or not len(history):
            st.caption("No history yet.")
            return
        rows = charts.gpu_frame(
            history, budget_share_w=share_w, slowdown_c=g.temperature_slowdown_c
        )
        st.vega_lite_chart(charts.arrow(rows), charts.gpu_card_spec(), width="content")


if __name__ == "__main__":
    run_page(render, "GPUs")
