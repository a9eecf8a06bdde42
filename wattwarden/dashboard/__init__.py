"""The Streamlit operator dashboard: fleet, GPUs, jobs and policy, over HTTP only.

The Streamlit script is :data:`APP_PATH` (``streamlit run APP_PATH -- FLAGS``); its settings are
:mod:`wattwarden.dashboard.settings`' flags. Importing this package does not import Streamlit.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["APP_PATH"]

APP_PATH = Path(__file__).with_name("app.py")
