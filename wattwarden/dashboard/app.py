"""The Streamlit script of the operator dashboard: ``streamlit run app.py -- FLAGS``.

Reads its settings from ``$WATTWARDEN_DASHBOARD_ARGS`` when set, else from its arguments (the
flags of :mod:`wattwarden.dashboard.settings`), and serves four pages: Fleet, GPUs, Jobs, Policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

from wattwarden.config import ConfigError
from wattwarden.dashboard import ui
from wattwarden.dashboard.settings import from_environ_or_argv

VIEWS = Path(__file__).with_name("views")
PAGES = (
    ("fleet.py", "Fleet", ":material/dashboard:"),
    ("gpus.py", "GPUs", ":material/memory:"),
    ("jobs.py", "Jobs", ":material/work:"),
    ("policy.py", "Policy", ":material/tune:"),
)


def main() -> None:
    """Configure the page, read the settings, and run the page chosen."""
    st.set_page_config(page_title="wattwarden", page_icon=":material/bolt:", layout="wide")
    try:
        settings = from_environ_or_argv(sys.argv[1:])
    except ConfigError as e:
        st.error(f"wattwarden dashboard: {e}")
        st.stop()
    ui.set_settings(settings)
    pages = [
        st.Page(VIEWS / name, title=title, icon=icon, default=i == 0)
        for i, (name, title, icon) in enumerate(PAGES)
    ]
    page = st.navigation(pages)
    ui.sidebar(ui.context())
    page.run()


main()
