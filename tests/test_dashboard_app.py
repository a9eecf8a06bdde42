"""The dashboard's pages under Streamlit's AppTest, against agents on a simulated fleet.

Most tests share one real agent process (4 simulated GPUs, a budget, so a policy engine runs); a
lost GPU is injected into an in-process SimAgent of its own. Settings reach the app through
$WATTWARDEN_DASHBOARD_ARGS, as the launcher's flags would.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import AgentProcess, http_json, refused_port, run_agent, wait_for
from streamlit.testing.v1 import AppTest

from wattwarden.api.testing import SimAgent
from wattwarden.dashboard import APP_PATH, ui
from wattwarden.dashboard.settings import ENV_ARGS
from wattwarden.dashboard.sources import Sources
from wattwarden.hardware.sim.fleet import SimFleet

PAGES = ["views/fleet.py", "views/gpus.py", "views/jobs.py", "views/policy.py"]
BUDGET_W = 1500.0


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("dashboard") / "agent"
    args = ("--sim", "4", "--power-budget-watts", f"{BUDGET_W:g}", "--policy-period-s", "0.5")
    with run_agent(state, *args) as process:
        for gpu in (0, 1, 2):  # loaded past the budget: budget capping decides (in dry-run)
            status, body = http_json(
                process.url + "/api/v1/sim/load", {"gpu": gpu, "utilization": 0.95},
                token=process.token,
            )  # fmt: skip
            assert status == 200, body
        # a second of history and one policy period, so every page has something to draw
        wait_for(
            lambda: http_json(process.url + "/api/v1/history?seconds=60")[1]["gpus"]["0"],
            what="a second of history",
        )
        yield process


@pytest.fixture(autouse=True)
def fresh_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test starts with empty caches, and finds no token unless it gives one."""
    monkeypatch.delenv("WATTWARDEN_TOKEN", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    ui.reset_sources()
    yield
    ui.reset_sources()


def app(monkeypatch: pytest.MonkeyPatch, *flags: str, page: str | None = None) -> AppTest:
    """The app run once with these flags (and switched to ``page``, run again)."""
    monkeypatch.setenv(ENV_ARGS, shlex.join(flags))
    at = AppTest.from_file(str(APP_PATH), default_timeout=60)
    at.run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """Everything the page says in markdown, captions, banners and titles."""
    parts = []
    for kind in (at.markdown, at.caption, at.error, at.warning, at.info, at.success, at.title):
        parts += [str(e.value) for e in kind]
    return "\n".join(parts)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: str(m.value) for m in at.metric}


# ------------------------------------------------------------------------------ every page
def test_no_page_has_a_bare_string_that_streamlit_would_print() -> None:
    # a page module runs as Streamlit's script: "magic" writes any bare expression, so a
    # docstring beside a module constant would show on the page
    for page in (APP_PATH.parent / "views").glob("[!_]*.py"):
        body = ast.parse(page.read_text()).body
        bare = [
            node.lineno
            for node in body[1:]
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        ]
        assert bare == [], f"{page.name}: a bare string on line {bare}"


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_against_the_agent_without_an_exception_or_a_banner(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess, page: str
) -> None:
    at = app(monkeypatch, "--agent", agent.url, page=page)
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == {"fleet": "Fleet", "gpus": "GPUs", "jobs": "Jobs",
                                 "policy": "Policy"}[Path(page).stem]  # fmt: skip


def test_fleet_shows_power_against_the_budget_and_the_gpus_by_state(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    at = app(monkeypatch, "--agent", agent.url)
    shown = metrics(at)
    assert shown["Power now"].endswith(" W")
    power_metric = next(m for m in at.metric if m.label == "Power now")
    assert f"of {BUDGET_W:,.0f} W budget" in str(power_metric.proto.delta)
    assert sum(int(shown[f"GPUs {s}"]) for s in ("ok", "capped", "throttled", "hot", "lost")) == 4
    assert shown["GPUs lost"] == "0"
    assert shown["Energy, last day"] == "—"  # the agents keep an hour; Prometheus not given
    assert len(at.get("vega_lite_chart")) == 1  # the stacked power chart
    assert "From the agents." in texts(at)


def chart_data(at: AppTest, i: int = 0) -> dict[str, list[object]]:
    """The table handed to the page's ``i``-th chart, by column."""
    raw = at.get("vega_lite_chart")[i].proto.data.data
    table: dict[str, list[object]] = pa.ipc.open_stream(raw).read_all().to_pydict()
    return table


def test_charts_over_long_windows_draw_the_agents_buckets_of_several_seconds(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    wait_for(
        lambda: len(http_json(agent.url + "/api/v1/history?seconds=60")[1]["gpus"]["0"]) >= 4,
        what="a few seconds of history",
    )
    at = app(monkeypatch, "--agent", agent.url)  # Fleet: 15 min, at most 300 rows a GPU
    stack = chart_data(at)
    assert stack["time"] and all(t % 3000 == 0 for t in stack["time"])  # 3 s buckets
    assert set(stack["budget_w"]) == {BUDGET_W}  # the budget line's value rides with the rows
    for gpu in ("GPU 0", "GPU 3"):
        times = [t for t, s in zip(stack["time"], stack["series"], strict=True) if s == gpu]
        assert times and len(times) == len(set(times))
    at.switch_page("views/gpus.py")
    at.session_state["gpus_window_min"] = 60
    at.run()
    card = chart_data(at)
    assert card["time"] and all(t % 12_000 == 0 for t in card["time"])  # 12 s buckets


def test_gpus_page_has_a_card_with_a_chart_per_gpu(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    at = app(monkeypatch, "--agent", agent.url, page="views/gpus.py")
    assert [m.label for m in at.metric].count("power") == 4
    assert all(m.value.endswith(" W") for m in at.metric if m.label == "power")
    clocks = [m.value for m in at.metric if m.label == "SM clock"]
    assert len(clocks) == 4 and all(re.fullmatch(r"\d\.\d\d GHz", c) for c in clocks), clocks
    assert len(at.get("vega_lite_chart")) == 4
    for i in range(4):
        assert f"**GPU {i}**" in texts(at)


def test_policy_page_shows_mode_budget_and_decisions(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    wait_for(lambda: http_json(agent.url + "/api/v1/decisions")[1]["decisions"], what="a decision")
    at = app(monkeypatch, "--agent", agent.url, page="views/policy.py")
    shown = metrics(at)
    assert shown["Mode"] == "dry-run"
    assert shown["Budget (node)"] == f"{BUDGET_W:,.0f} W"
    assert shown["Lease (fleet controller)"] == "—"
    assert len(at.dataframe) == 1  # the decisions table
    columns = at.dataframe[0].value.columns  # the mode is on top; the reason fits beside the rest
    assert "reason" in columns and "mode" not in columns
    assert "Decisions" in [s.value for s in at.subheader]


# ------------------------------------------------------------------------- sources down
@pytest.mark.parametrize("page", PAGES)
def test_an_agent_that_is_down_gets_a_banner_naming_it_on_every_page(
    monkeypatch: pytest.MonkeyPatch, page: str
) -> None:
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"
        at = app(monkeypatch, "--agent", url, "--timeout-s", "1", page=page)
    banners = [str(e.value) for e in at.error]
    assert any(f"agent {url}** is down: connection refused" in b for b in banners), banners
    assert not at.exception


def test_prometheus_and_alertmanager_down_get_banners_and_the_agents_numbers_still_show(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    with refused_port() as prom_port, refused_port() as am_port:
        prom, am = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}"
        at = app(monkeypatch, "--agent", agent.url, "--prometheus", prom, "--alertmanager", am)
    warnings = "\n".join(str(w.value) for w in at.warning)
    assert f"Prometheus {prom}** is down: connection refused" in warnings
    assert f"Alertmanager {am}** is down: connection refused" in warnings
    assert metrics(at)["Power now"].endswith(" W")
    assert metrics(at)["GPUs ok"] != "—"
    assert len(at.get("vega_lite_chart")) == 1
    assert not at.error


def test_one_of_two_agents_down_leaves_the_other_on_the_fleet_page(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    with refused_port() as port:
        down = f"http://127.0.0.1:{port}"
        at = app(monkeypatch, "--agent", agent.url, "--agent", down)
    assert any(f"agent {down}** is down" in str(e.value) for e in at.error)
    shown = metrics(at)
    assert sum(int(shown[f"GPUs {s}"]) for s in ("ok", "capped", "throttled", "hot", "lost")) == 4


# ------------------------------------------------------------------------------ a lost GPU
def test_a_lost_gpu_says_lost_and_never_zero_watts(monkeypatch: pytest.MonkeyPatch) -> None:
    with SimAgent(SimFleet(3)) as sim:
        status, body = http_json(
            sim.url + "/api/v1/sim/faults", {"gpu": 1, "fault": "lost"}, token=sim.token
        )
        assert status == 200, body
        sim.sample()
        at = app(monkeypatch, "--agent", sim.url, page="views/gpus.py")
        page = texts(at)
        assert "LOST" in page and "GPU 1 fell off the bus" in page
        powers = [m.value for m in at.metric if m.label == "power"]
        assert len(powers) == 2  # the two GPUs up; none for the lost one
        assert all(p not in ("0 W", "0.0 W") for p in powers)
        at.switch_page("views/fleet.py").run()
        assert not at.exception
        assert metrics(at)["GPUs lost"] == "1"


# ------------------------------------------------------------------------------- actions
def submit(at: AppTest, form: str, label: str) -> None:
    at.button(key=f"FormSubmitter:{form}-{label}").click().run()


def test_setting_the_budget_without_a_token_shows_the_401_in_words(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    at = app(monkeypatch, "--agent", agent.url, page="views/policy.py")
    at.number_input(key="budget_watts").set_value(1234.0)
    at.checkbox(key="budget_confirm").check()
    submit(at, "budget_form", "Set the budget")
    assert not at.exception
    errors = [str(e.value) for e in at.error]
    assert any("refused: no valid token (401) — pass --token-file" in e for e in errors), errors
    assert http_json(agent.url + "/api/v1/policy")[1]["power_budget_watts"] == BUDGET_W


def test_an_unconfirmed_action_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    token = str(agent.state_dir / "token")
    at = app(monkeypatch, "--agent", agent.url, "--token-file", token, page="views/policy.py")
    at.number_input(key="budget_watts").set_value(999.0)
    submit(at, "budget_form", "Set the budget")
    assert "Nothing sent: tick the confirmation first." in [str(w.value) for w in at.warning]
    assert http_json(agent.url + "/api/v1/policy")[1]["power_budget_watts"] == BUDGET_W


def test_setting_the_budget_with_the_token_changes_the_agents_policy(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    token = str(agent.state_dir / "token")
    at = app(monkeypatch, "--agent", agent.url, "--token-file", token, page="views/policy.py")
    try:
        at.number_input(key="budget_watts").set_value(1234.0)
        at.checkbox(key="budget_confirm").check()
        submit(at, "budget_form", "Set the budget")
        assert not at.exception
        assert "budget set to 1234 W" in [str(s.value) for s in at.success]
        assert http_json(agent.url + "/api/v1/policy")[1]["power_budget_watts"] == 1234.0
        assert metrics(at)["Budget (node)"] == "1,234 W"  # the page after the action is fresh
    finally:
        http_json(agent.url + "/api/v1/policy", {"power_budget_watts": BUDGET_W},
                  token=agent.token)  # fmt: skip


def test_a_gpu_limit_in_dry_run_shows_the_409_in_words(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    token = str(agent.state_dir / "token")
    at = app(monkeypatch, "--agent", agent.url, "--token-file", token, page="views/policy.py")
    at.number_input(key="limit_watts").set_value(300.0)
    at.checkbox(key="limit_confirm").check()
    submit(at, "limit_form", "Set the limit")
    errors = [str(e.value) for e in at.error]
    assert any(e.startswith("refused: conflict (409): ") for e in errors), errors


def test_jobs_page_lists_running_and_finished_jobs_with_their_energy(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    for name, gpu in (("dash-running", 1), ("dash-finished", 2)):
        body = {"name": name, "pid": os.getpid(), "gpu": gpu, "priority": "high"}
        status, answer = http_json(agent.url + "/api/v1/jobs", body, token=agent.token)
        assert status in (200, 201), answer
    try:
        # a sampler pass or two attributes energy to the loaded GPU's job, then it ends
        wait_for(
            lambda: http_json(agent.url + "/api/v1/jobs/dash-finished")[1]["energy_joules"] > 0,
            what="energy attributed to the job",
        )
        status, ended = http_json(
            agent.url + "/api/v1/jobs/dash-finished", method="DELETE", token=agent.token
        )
        assert status == 200, ended
        at = app(monkeypatch, "--agent", agent.url, page="views/jobs.py")
        table = at.dataframe[0].value
        rows = {r["job"]: r for r in table.to_dict("records")}
        assert rows["dash-running"]["state"] == "running"
        assert rows["dash-running"]["priority"] == "high"
        finished = rows["dash-finished"]
        assert finished["state"] == "finished"
        assert finished["energy (kJ)"] == pytest.approx(ended["energy_joules"] / 1000)
        assert finished["energy (kJ)"] > 0  # the total stays after the job ended
        assert metrics(at)["Finished (kept 1 h)"] == "1"
    finally:
        http_json(agent.url + "/api/v1/jobs/dash-running", method="DELETE", token=agent.token)


# --------------------------------------------------------------------------- the guard
def test_an_unexpected_error_is_one_line_on_the_page_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, agent: AgentProcess
) -> None:
    def broken(self: Sources, url: str) -> None:
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(Sources, "jobs", broken)
    at = app(monkeypatch, "--agent", agent.url, page="views/jobs.py")
    assert not at.exception
    errors = [str(e.value) for e in at.error]
    assert errors == [
        "the Jobs page failed: RuntimeError: a bug with a second line (the traceback is in the log)"
    ]


def test_bad_settings_are_one_line_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(monkeypatch, "--refresh-s", "0")
    assert [str(e.value) for e in at.error] == [
        "wattwarden dashboard: --refresh-s: must be within 1..60 seconds, got 0"
    ]
