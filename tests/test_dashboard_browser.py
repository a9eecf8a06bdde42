"""The running dashboard in a real browser: Debian's Chromium, headless, driven by Playwright.

``wattwarden demo`` (agent on 4 simulated GPUs, policy engine applying a budget, simulated jobs,
the dashboard) is started once; each page is loaded in headless Chromium, the test waits for its
charts to be drawn and for numbers with units in them, fails on any Streamlit exception block,
and saves a screenshot (under ``$WATTWARDEN_SCREENSHOTS`` when set: the README's images under
``docs/`` are made that way, with ``$WATTWARDEN_SCREENSHOTS_AFTER_S`` seconds of demo first so the
charts have history; else under the test's temporary directory).

Playwright drives the system's Chromium (``executable_path``); no browser is downloaded. The
browser is started with its background networking off, so it talks to loopback only.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from demorun import DemoRun, start_demo, stop_demo
from helpers import free_port, require_binary, wait_for

pytest.importorskip("streamlit")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 1000}
PAGE_TIMEOUT_MS = 60_000
EXCEPTION = '[data-testid="stException"]'
CHART = '[data-testid="stVegaLiteChart"]'
METRIC_VALUE = '[data-testid="stMetricValue"]'
WATTS = re.compile(r"\d[\d,.]*\s*(k?W)\b")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_binary("chromium")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    tmp = tmp_path_factory.mktemp("demo")
    run = start_demo(tmp, "--listen", f"127.0.0.1:{free_port()}", "--gpus", "4")
    try:
        # a few policy periods and job steps, so the pages have something to show
        wait_for(
            lambda: (
                all(j["step"] >= 3 for j in run.jobs().values() if j["state"] == "running")
                and len(run.jobs()) >= 3
            ),
            timeout_s=90,
            what="the demo's jobs past step 3",
        )
        after_s = float(os.environ.get("WATTWARDEN_SCREENSHOTS_AFTER_S", "0"))
        if after_s > 0:  # not synchronisation: minutes of history for the README's pictures
            time.sleep(after_s)
        yield run
    finally:
        stop_demo(run)


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("WATTWARDEN_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(browser: object, url: str) -> object:
    """A new page at ``url`` whose Streamlit script has finished its first run."""
    page = browser.new_page(viewport=VIEWPORT)  # type: ignore[attr-defined]
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector('[data-testid="stApp"]')
    # Streamlit shows a running indicator while the script runs; wait until the first run ends
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"] img')"
        " && document.querySelectorAll('[data-testid=\"stMain\"] *').length > 20"
    )
    return page


def charts_drawn(page: object, at_least: int) -> None:
    """Wait until ``at_least`` Vega-Lite charts have drawn their canvas or SVG with marks."""
    page.wait_for_function(  # type: ignore[attr-defined]
        f"""() => {{
            const charts = [...document.querySelectorAll('{CHART}')];
            const drawn = charts.filter(c => {{
                const canvas = c.querySelector('canvas');
                if (canvas && canvas.width > 0 && canvas.height > 0) return true;
                return c.querySelectorAll('svg path, svg rect').length > 3;
            }});
            return drawn.length >= {at_least};
        }}"""
    )


def no_exception(page: object) -> None:
    blocks = page.query_selector_all(EXCEPTION)  # type: ignore[attr-defined]
    texts = [b.inner_text() for b in blocks]
    assert not texts, f"Streamlit exception blocks on the page: {texts}"


def screenshot(page: object, shots: Path, name: str) -> Path:
    path = shots / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=False)  # type: ignore[attr-defined]
    assert path.stat().st_size > 10_000, path  # a blank page is a few kB
    return path


def test_the_gpu_page_draws_one_live_card_per_gpu_with_watts(
    browser: object, demo: DemoRun, shots: Path
) -> None:
    page = open_page(browser, demo.dashboard_url + "/gpus")
    charts_drawn(page, at_least=4)  # one power chart per GPU at least
    text = page.inner_text('[data-testid="stMain"]')  # type: ignore[attr-defined]
    for gpu in range(4):
        assert f"GPU {gpu}" in text, text[:2000]
    assert len(WATTS.findall(text)) >= 4, text[:2000]
    no_exception(page)
    screenshot(page, shots, "gpus")
    page.close()  # type: ignore[attr-defined]


def test_the_fleet_page_shows_power_against_the_budget(
    browser: object, demo: DemoRun, shots: Path
) -> None:
    page = open_page(browser, demo.dashboard_url + "/")
    charts_drawn(page, at_least=1)
    values = [v.inner_text() for v in page.query_selector_all(METRIC_VALUE)]  # type: ignore[attr-defined]
    assert any(WATTS.search(v) for v in values), values
    text = page.inner_text('[data-testid="stMain"]')  # type: ignore[attr-defined]
    assert "1,820 W" in text or "1820 W" in text or "1.82 kW" in text, text[:2000]
    no_exception(page)
    screenshot(page, shots, "fleet")
    page.close()  # type: ignore[attr-defined]


def test_the_jobs_page_lists_the_demo_jobs(browser: object, demo: DemoRun, shots: Path) -> None:
    page = open_page(browser, demo.dashboard_url + "/jobs")
    # the grid draws on a canvas; its accessible table below carries the cells' text
    cells = '[data-testid="stDataFrame"] td'
    page.wait_for_selector(cells, state="attached")  # type: ignore[attr-defined]
    texts = page.eval_on_selector_all(cells, "els => els.map(e => e.textContent)")  # type: ignore[attr-defined]
    running = [n for n, j in demo.jobs().items() if j["state"] == "running"]
    assert running
    for name in running:
        assert name in texts, (name, texts[:40])
    no_exception(page)
    screenshot(page, shots, "jobs")
    page.close()  # type: ignore[attr-defined]


def test_the_policy_page_shows_the_mode_budget_and_decisions(
    browser: object, demo: DemoRun, shots: Path
) -> None:
    page = open_page(browser, demo.dashboard_url + "/policy")
    charts_drawn(page, at_least=1)
    page.wait_for_selector('[data-testid="stDataFrame"]')  # type: ignore[attr-defined]
    text = page.inner_text('[data-testid="stMain"]')  # type: ignore[attr-defined]
    assert "apply" in text, text[:2000]
    no_exception(page)
    screenshot(page, shots, "policy")
    page.close()  # type: ignore[attr-defined]
