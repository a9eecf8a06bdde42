"""Every PromQL expression we ship runs on a real Prometheus scraping a real agent.

One Prometheus (1 s scrape and evaluation) loads our rule files unchanged and scrapes the agent on
the simulated fleet, given a node budget, a fake RAPL tree, an XID, a power-limit change and a
registered job, so that every series the dashboard reads exists. Then every rule expression and
every dashboard query (variables substituted) must execute through /api/v1/query without error,
and every dashboard query and recording rule must return data.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    free_port,
    http_get,
    http_json,
    require_binary,
    run_agent,
    run_controller,
    wait_for,
)
from promstack import (
    PROMETHEUS_YML,
    RULES_DIR,
    dashboard,
    dashboard_targets,
    load_yaml,
    prom_query,
    prometheus_test_config,
    rules,
    run_prometheus,
    substitute,
)

pytestmark = pytest.mark.slow

#: What the dashboard variables stand for in these queries: this node, every simulated GPU
#: (Grafana writes a multi-value selection as a regex alternation), and short ranges.
VARIABLES = {
    "instance": "127.0.0.1",
    "gpu": "(0|1|2|3|4|5|6|7)",
    "__range": "1h",
    "__rate_interval": "1m",
    "__interval": "1s",
    "datasource": "prometheus",
}


@dataclass
class Stack:
    prometheus: str
    agent_port: int


def _fake_rapl(root: Path) -> Path:
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("123456789\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("queries")
    rapl = _fake_rapl(tmp / "powercap")
    args = ["--sim", "8", "--power-budget-watts", "3000", "--apply", "--rapl-root", str(rapl)]
    with run_agent(tmp / "agent", *args) as agent:
        for path, body in (
            ("/api/v1/sim/faults", {"gpu": 1, "fault": "xid", "xid": 79}),
            ("/api/v1/power-limits", {"gpu": 0, "watts": 500}),
            # A job (this test's process stands in for it) loads GPU 2 and is attributed energy.
            ("/api/v1/jobs", {"name": "train-a", "pid": os.getpid(), "gpu": 2, "utilization": 0.8}),
        ):
            status, answer = http_json(agent.url + path, body, token=agent.token)
            assert status in (200, 201), (path, answer)
        config = prometheus_test_config(
            agent_target=f"127.0.0.1:{agent.port}", alertmanager_target=None
        )
        with run_prometheus(prometheus, config, tmp / "prometheus") as server:

            def scraped() -> bool:
                result = prom_query(server.url, 'up{job="wattwarden"} == 1')["data"]["result"]
                return len(result) == 1

            wait_for(scraped, timeout_s=60, what="the agent up in Prometheus")
            yield Stack(server.url, agent.port)


def _expressions() -> list[tuple[str, str]]:
    out = [(f"rule {r.get('alert') or r['record']}", r["expr"]) for r in rules()]
    for title, target in dashboard_targets(dashboard()):
        out.append((f"panel {title!r} {target['refId']}", substitute(target["expr"], VARIABLES)))
    return out


CONTROLLER_ROW = "Fleet controller"


def _controller_panel_titles() -> set[str]:
    """Titles of the panels under the dashboard's "Fleet controller" row (they read the fleet
    controller's series, which a lone agent does not serve)."""
    titles: set[str] = set()
    current = ""
    for panel in dashboard()["panels"]:  # top-level panels follow their (expanded) row
        if panel["type"] == "row":
            current = panel["title"]
            titles.update(p["title"] for p in panel.get("panels", []) if current == CONTROLLER_ROW)
        elif current == CONTROLLER_ROW:
            titles.add(panel["title"])
    return titles


def test_the_controller_row_holds_the_controller_panels_and_only_they_read_its_series() -> None:
    titles = _controller_panel_titles()
    assert len(titles) >= 4
    for title, target in dashboard_targets(dashboard()):
        if "wattwarden_controller_" in target["expr"]:
            assert title in titles, title


def _executes(base: str, expr: str) -> dict[str, Any]:
    answer = prom_query(base, expr)
    error = f"{answer.get('errorType')}: {answer.get('error')}"
    assert answer["status"] == "success", f"{expr}: {error}"
    assert not answer.get("warnings"), f"{expr}: {answer['warnings']}"
    return answer


def test_prometheus_loads_every_rule_of_our_files_and_evaluates_each_without_error(
    stack: Stack,
) -> None:
    expected = {r.get("alert") or r["record"] for r in rules()}

    def evaluated() -> list[dict[str, Any]] | None:
        _, body = http_get(f"{stack.prometheus}/api/v1/rules", timeout_s=5)
        loaded = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        done = [r for r in loaded if not r["lastEvaluation"].startswith("0001-")]
        return loaded if len(done) == len(loaded) == len(expected) else None

    loaded = wait_for(evaluated, timeout_s=30, what="every rule evaluated once")
    assert {r["name"] for r in loaded} == expected
    bad = {r["name"]: r.get("lastError") for r in loaded if r["health"] != "ok"}
    assert bad == {}


def test_every_rule_expression_executes_through_the_query_api(stack: Stack) -> None:
    exprs = [e for w, e in _expressions() if w.startswith("rule ")]
    # one per "- alert:" or "- record:" line of every rule file we ship
    declared = sum(
        len(re.findall(r"^\s*- (?:alert|record):", path.read_text(), re.MULTILINE))
        for path in RULES_DIR.glob("*.yml")
    )
    assert declared > 0 and len(exprs) == declared
    for expr in exprs:
        _executes(stack.prometheus, expr)


def test_every_dashboard_query_executes_through_the_query_api(stack: Stack) -> None:
    queries = [(w, e) for w, e in _expressions() if w.startswith("panel ")]
    assert len(queries) >= 20
    for _, expr in queries:
        assert "$" not in expr
        _executes(stack.prometheus, expr)


def test_dashboard_variable_queries_find_the_node_and_its_eight_gpus(stack: Stack) -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"] if v["type"] == "query"}
    found: dict[str, set[str]] = {}
    for name, var in variables.items():
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m is not None, f"variable {name}: {query}"
        selector = substitute(m.group(1), {"instance": VARIABLES["instance"]})
        answer = _executes(stack.prometheus, selector)
        found[name] = {s["metric"][m.group(2)] for s in answer["data"]["result"]}
    assert found["instance"] == {"127.0.0.1"}
    assert found["gpu"] == {str(i) for i in range(8)}


def test_every_query_returns_data_from_the_live_agent(stack: Stack) -> None:
    # The agent serves every series these read except alerts' conditions (quiet here): rule
    # expressions are checked for recording rules, every dashboard query outside the fleet
    # controller's row is checked (those read the controller's series).
    recording = {r["record"] for r in rules() if "record" in r}
    controller_panels = {f"panel {title!r} " for title in _controller_panel_titles()}
    checks = [
        (w, e)
        for w, e in _expressions()
        if (w.startswith("panel ") and not w.startswith(tuple(controller_panels)))
        or w.removeprefix("rule ") in recording
    ]
    empty: list[str] = []

    def all_have_data() -> bool:
        empty.clear()
        for where, expr in checks:
            if not _executes(stack.prometheus, expr)["data"]["result"]:
                empty.append(where)
        return not empty

    try:
        wait_for(all_have_data, timeout_s=60, interval_s=1.0, what="data for every query")
    except AssertionError:
        pytest.fail(f"queries without data: {empty}")


def test_per_job_series_are_stored_under_job_name_not_exported_job(stack: Stack) -> None:
    def stored() -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = _executes(stack.prometheus, "gpu_job_power_watts")["data"][
            "result"
        ]
        return result

    (series,) = wait_for(stored, timeout_s=30, what="gpu_job_power_watts in Prometheus")
    labels = series["metric"]
    assert labels["job_name"] == "train-a"
    assert labels["gpu"] == "2"
    assert labels["job"] == "wattwarden"
    assert "exported_job" not in labels


# ------------------------------------------------------------------ with a fleet controller
CONTROLLER_JOB = "wattwarden-controller"


def _controller_scrape_job(port: int) -> dict[str, Any]:
    """prometheus.yml's controller job, as shipped but for its target and 1 s intervals."""
    jobs = load_yaml(PROMETHEUS_YML)["scrape_configs"]
    (job,) = [j for j in jobs if j["job_name"] == CONTROLLER_JOB]
    job = copy.deepcopy(job)
    job.update(
        scrape_interval="1s",
        scrape_timeout="1s",
        static_configs=[{"targets": [f"127.0.0.1:{port}"]}],
    )
    return dict(job)


def test_controller_panels_return_data_from_a_live_controller(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The dashboard's controller row against a real controller leasing a real agent's budget
    # through a real Prometheus that scrapes both with the shipped scrape jobs.
    prometheus = require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("controller")
    port = free_port()
    titles = _controller_panel_titles()
    checks = [
        (f"panel {title!r} {target['refId']}", substitute(target["expr"], VARIABLES))
        for title, target in dashboard_targets(dashboard())
        if title in titles
    ]
    with run_agent(tmp / "agent", "--sim", "4", "--power-budget-watts", "2000", "--apply") as agent:
        config = prometheus_test_config(
            agent_target=f"127.0.0.1:{agent.port}", alertmanager_target=None
        )
        config["scrape_configs"].append(_controller_scrape_job(port))
        token_file = tmp / "agent-token"
        token_file.write_text(agent.token + "\n")
        token_file.chmod(0o600)
        with run_prometheus(prometheus, config, tmp / "prometheus") as server:
            args = [
                f"--prometheus={server.url}",
                "--budget-watts=1500",
                "--period-s=1",
                "--lease-s=10",
                f"--listen=127.0.0.1:{port}",
                f"--token-file={token_file}",
                "--id=queries-test",
                "--apply",
            ]
            log_path = tmp / "controller.log"
            # --listen given last: the controller serves where the scrape job looks
            with run_controller(*args, log_path=log_path) as (proc, _):
                empty: list[str] = []

                def all_have_data() -> bool:
                    if proc.poll() is not None:
                        log = log_path.read_text()
                        raise AssertionError(f"controller exited {proc.returncode}: {log}")
                    empty[:] = [
                        where
                        for where, expr in checks
                        if not _executes(server.url, expr)["data"]["result"]
                    ]
                    return not empty

                try:
                    wait_for(all_have_data, timeout_s=90, interval_s=1.0, what="data")
                except AssertionError:
                    pytest.fail(f"queries without data: {empty}\n{log_path.read_text()}")
                # The controller's per-node series name the node as the agent's series do.
                shares = _executes(server.url, "wattwarden_controller_node_budget_watts")
                nodes = {s["metric"]["instance"] for s in shares["data"]["result"]}
                assert nodes == {VARIABLES["instance"]}
