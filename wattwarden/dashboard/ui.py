"""What every page shares: settings and sources, banners, the node selector, the error guard.

The guard turns a page's unexpected error into one line on the page and a traceback in the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import streamlit as st

from wattwarden.dashboard.settings import DashboardSettings
from wattwarden.dashboard.sources import AgentState, Down, Sources

log = logging.getLogger("wattwarden.dashboard")

SETTINGS_KEY = "wattwarden_settings"
NODE_KEY = "wattwarden_node"
FLASH_KEY = "wattwarden_flash"

_sources: dict[DashboardSettings, Sources] = {}
_sources_lock = threading.Lock()  # guards _sources (sessions run in threads of their own)


def sources_for(settings: DashboardSettings) -> Sources:
    """The sources of these settings, shared by every session (one cache, one count)."""
    with _sources_lock:
        found = _sources.get(settings)
        if found is None:
            found = _sources[settings] = Sources(settings)
        return found


def reset_sources() -> None:
    """Forget every session's sources (their caches and counts)."""
    with _sources_lock:
        _sources.clear()


@dataclass(frozen=True, slots=True)
class Context:
    """What a page renders from."""

    settings: DashboardSettings
    sources: Sources


def set_settings(settings: DashboardSettings) -> None:
    """Hand the app's settings to the pages of this session."""
    st.session_state[SETTINGS_KEY] = settings


def context() -> Context:
    """The session's settings, and the sources shared with every session."""
    settings = st.session_state.get(SETTINGS_KEY)
    if not isinstance(settings, DashboardSettings):
        settings = DashboardSettings()
    return Context(settings, sources_for(settings))


def guarded(what: str, body: Callable[[], None]) -> None:
    """Run ``body``; an unexpected error is one line on the page and a traceback in the log."""
    try:
        body()
    except Exception as e:
        log.exception("dashboard: %s failed", what)
        text = " ".join(str(e).split())[:300]
        st.error(f"{what} failed: {type(e).__name__}: {text} (the traceback is in the log)")


def run_page(render: Callable[[Context], None], title: str) -> None:
    """A page's body, guarded; the title on top."""
    st.title(title)
    flash = st.session_state.pop(FLASH_KEY, None)
    if isinstance(flash, tuple) and len(flash) == 2:
        ok, message = flash
        (st.success if ok else st.error)(str(message))
    guarded(f"the {title} page", lambda: render(context()))


def flash(ok: bool, message: str) -> None:
    """A message shown once on top of the page's next run (after an action)."""
    st.session_state[FLASH_KEY] = (ok, message)


def show_down(down: Down, *, severe: bool = True) -> None:
    """A banner naming the source that is down and why."""
    text = f"**{down.source}** is down: {down.reason}"
    if severe:
        st.error(text, icon=":material/cloud_off:")
    else:
        st.warning(text, icon=":material/cloud_off:")


def node_label(ctx: Context, url: str, state: AgentState | Down | None = None) -> str:
    """An agent as the node selector names it: its node name and URL."""
    if isinstance(state, AgentState) and state.node != url:
        return f"{state.node} ({url})"
    return url


def pick_node(ctx: Context, states: dict[str, AgentState | Down] | None = None) -> str:
    """The agent this page shows: a selector when there are several (kept across pages)."""
    agents: Sequence[str] = ctx.settings.agents
    if len(agents) == 1:
        return agents[0]
    if st.session_state.get(NODE_KEY) not in agents:
        st.session_state[NODE_KEY] = agents[0]
    labels = {u: node_label(ctx, u, (states or {}).get(u)) for u in agents}
    chosen = st.selectbox("Node", agents, format_func=labels.__getitem__, key=NODE_KEY)
    return str(chosen)


def sidebar(ctx: Context) -> None:
    """The sources in the sidebar, each with whether it answers, and the refresh cadence."""
    with st.sidebar:
        st.caption("Sources")
        for url, state in ctx.sources.states().items():
            if isinstance(state, Down):
                st.markdown(f":red[:material/cloud_off:] agent {url} — down")
            else:
                st.markdown(f":green[:material/check_circle:] {node_label(ctx, url, state)}")
        optional: tuple[tuple[str, str | None], ...] = (
            ("Prometheus", ctx.settings.prometheus),
            ("Alertmanager", ctx.settings.alertmanager),
        )
        for name, given in optional:
            if given is not None:
                st.markdown(f":gray[:material/link:] {name} {given}")
            else:
                st.markdown(f":gray[:material/remove:] {name}: not given")
        st.caption(
            f"live charts refresh every {ctx.settings.refresh_s:g} s; "
            f"requests time out after {ctx.settings.timeout_s:g} s"
        )
