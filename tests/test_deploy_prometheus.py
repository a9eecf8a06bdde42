"""The deployment kit's Prometheus, Alertmanager and Grafana files are valid and consistent.

promtool and amtool check the files as the servers would load them; the structural tests check
what the tools do not: every alert is documented, routed, unit-tested both ways, and the dashboard
is portable (datasource variable) and uses only variables it defines.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import require_binary
from promstack import (
    ALERTMANAGER_YML,
    DASHBOARD_JSON,
    PROMETHEUS_YML,
    RULE_TESTS_DIR,
    RUNBOOK_MD,
    alert_rules,
    dashboard,
    dashboard_panels,
    dashboard_targets,
    load_yaml,
    rule_files,
    rules,
)

SEVERITIES = {"critical", "warning"}
METRIC_CONTRACT_GPU_LABELS = {"gpu", "uuid"}


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


# ------------------------------------------------------------------ promtool / amtool
@pytest.mark.slow
def test_promtool_check_config_accepts_prometheus_yml() -> None:
    promtool = require_binary("promtool")
    out = _run([promtool, "check", "config", str(PROMETHEUS_YML)])
    assert "SUCCESS" in out.stdout


@pytest.mark.slow
def test_promtool_check_rules_accepts_every_rule_file() -> None:
    promtool = require_binary("promtool")
    files = rule_files()
    assert {p.name for p in files} == {"recording.yml", "alerts.yml", "controller.yml"}
    out = _run([promtool, "check", "rules", *map(str, files)])
    assert out.stdout.count("SUCCESS") == len(files)


@pytest.mark.slow
def test_promtool_rule_unit_tests_pass() -> None:
    promtool = require_binary("promtool")
    tests = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert len(tests) >= 4
    out = _run([promtool, "test", "rules", *map(str, tests)])
    assert "FAILED" not in out.stdout + out.stderr


@pytest.mark.slow
def test_amtool_check_config_accepts_alertmanager_yml() -> None:
    amtool = require_binary("amtool")
    out = _run([amtool, "check-config", str(ALERTMANAGER_YML)])
    assert "SUCCESS" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=GpuLost", "severity=critical", "instance=n1", "gpu=3"], "gpu-oncall"),
        (["alertname=GpuTemperatureHigh", "severity=warning", "instance=n1"], "gpu-team"),
        (["alertname=SomethingElse"], "gpu-team"),
    ],
)
def test_alertmanager_routes_critical_to_oncall_and_warning_to_team(
    labels: list[str], receiver: str
) -> None:
    amtool = require_binary("amtool")
    out = _run([amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels])
    assert out.stdout.strip() == receiver


# ------------------------------------------------------------------ alert rules
def test_every_alert_has_a_severity_summary_description_and_runbook_section() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOK_MD.read_text().splitlines()
        if line.startswith("## ")
    }
    alerts = alert_rules()
    assert len(alerts) >= 12
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        url = annotations.get("runbook_url", "")
        assert url.startswith("https://") and "/deploy/RUNBOOK.md#" in url, name
        anchor = url.rsplit("#", 1)[1]
        assert anchor == name.lower(), f"{name}: runbook anchor {anchor!r}"
        assert anchor in anchors, f"{name}: no section '## {name}' in {RUNBOOK_MD.name}"


def test_alert_names_are_unique_and_rule_names_follow_conventions() -> None:
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z_0-9]+:[a-z_0-9]+", rule["record"]), rule["record"]


def _gpu_temperature_threshold(expr: str) -> float:
    """The number in ``gpu_temperature_celsius{sensor="gpu"} > N``, the whole expression."""
    m = re.fullmatch(
        r'gpu_temperature_celsius\{sensor="gpu"\}\s*>\s*([0-9]+(?:\.[0-9]+)?)', expr.strip()
    )
    assert m is not None, f"not a GPU temperature threshold: {expr!r}"
    return float(m.group(1))


def test_required_alerts_exist_with_the_agreed_thresholds() -> None:
    by_name = {r["alert"]: r for r in alert_rules()}
    required = {
        "WattwardenAgentDown": "critical",
        "WattwardenSamplingStale": "warning",
        "WattwardenCollectorDown": "warning",
        "GpuLost": "critical",
        "GpuTemperatureHigh": "warning",
        "GpuTemperatureCritical": "critical",
        "GpuThermalSlowdown": "warning",
        "GpuPowerBrakeSlowdown": "critical",
        "GpuXidErrorCritical": "critical",
        "GpuXidErrorWarning": "warning",
        "NodePowerOverBudget": "warning",
        "WattwardenPolicyActuationFailing": "warning",
        "WattwardenControllerDown": "critical",
        "WattwardenControllerPrometheusUnreachable": "warning",
        "WattwardenLeasesExpiring": "warning",
        "ClusterPowerOverBudget": "critical",
    }
    for name, severity in required.items():
        assert name in by_name, f"missing alert {name}"
        assert by_name[name]["labels"]["severity"] == severity, name
    assert _gpu_temperature_threshold(by_name["GpuTemperatureHigh"]["expr"]) == 80.0
    assert by_name["GpuTemperatureHigh"]["for"] == "5m"
    assert _gpu_temperature_threshold(by_name["GpuTemperatureCritical"]["expr"]) == 85.0
    assert by_name["GpuTemperatureCritical"]["for"] == "1m"
    critical_xids = re.search(r'xid=~"([0-9|]+)"', by_name["GpuXidErrorCritical"]["expr"])
    assert critical_xids is not None
    assert sorted(map(int, critical_xids.group(1).split("|"))) == [48, 62, 64, 74, 79, 95, 119, 120]
    assert 'xid="94"' in by_name["GpuXidErrorWarning"]["expr"]


def _unit_tests() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(RULE_TESTS_DIR.glob("*.yml")):
        out.extend(load_yaml(path)["tests"])
    return out


def test_every_alert_has_unit_tests_showing_it_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _unit_tests():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


def test_every_recording_rule_used_by_the_dashboard_is_defined() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    used = {
        name
        for _, target in dashboard_targets(dashboard())
        for name in re.findall(r"\b[a-z_]+:[a-z_0-9]+:[a-z_0-9]+\b", target["expr"])
    }
    assert used, "the dashboard reads no recording rule"
    assert used <= recorded


def test_gpu_alerts_keep_the_labels_alertmanager_groups_and_inhibits_on() -> None:
    # Every GPU alert must keep instance, gpu and uuid: aggregations must not drop them.
    for rule in alert_rules():
        if not rule["alert"].startswith("Gpu"):
            continue
        expr = " ".join(rule["expr"].split())
        for agg in re.findall(r"\b(?:sum|max|min|avg|count)\s+(by|without)\s*\(([^)]*)\)", expr):
            kind, labels = agg
            names = {x.strip() for x in labels.split(",")}
            if kind == "by":
                assert {"instance", "gpu", "uuid"} <= names, rule["alert"]
            else:
                assert not names & {"instance", "gpu", "uuid"}, rule["alert"]


# ------------------------------------------------------------------ alertmanager
def test_alertmanager_groups_by_node_and_alertname_and_inhibits_as_agreed() -> None:
    config = load_yaml(ALERTMANAGER_YML)
    route = config["route"]
    assert set(route["group_by"]) == {"instance", "alertname"}
    severities = {
        m.split("=")[1].strip('"')
        for r in route["routes"]
        for m in r.get("matchers", [])
        if m.startswith("severity=")
    }
    assert severities == SEVERITIES
    names = {r["alert"] for r in alert_rules()}

    def matched(matcher: str) -> set[str]:
        m = re.fullmatch(r'alertname(=~|=)"(.+)"', matcher)
        assert m is not None, f"inhibit rules match on alertname: {matcher}"
        return {n for n in names if re.fullmatch(m.group(2), n)}

    rules_by_source = {}
    for rule in config["inhibit_rules"]:
        (source,) = rule["source_matchers"]
        sources = matched(source)
        assert len(sources) == 1, source
        targets: set[str] = set()
        for t in rule["target_matchers"]:
            found = matched(t)
            assert found, f"target matcher {t} matches no alert"
            targets |= found
        rules_by_source[sources.pop()] = (targets, set(rule["equal"]))
    lost_targets, lost_equal = rules_by_source["GpuLost"]
    assert {"GpuTemperatureHigh", "GpuTemperatureCritical"} <= lost_targets
    assert lost_equal == {"instance", "gpu"}
    down_targets, down_equal = rules_by_source["WattwardenAgentDown"]
    assert {n for n in names if n.startswith("Gpu")} <= down_targets
    assert down_equal == {"instance"}
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            assert hook["send_resolved"] is True


# ------------------------------------------------------------------ grafana
def test_dashboard_uses_a_prometheus_datasource_variable_everywhere() -> None:
    model = dashboard()
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = []
    for panel in dashboard_panels(model):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    assert len(ids) == len(set(ids))
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"
    assert "__inputs" not in model  # importable as is, no DS_ placeholders
    assert DASHBOARD_JSON.read_text().count("DS_PROMETHEUS") == 0


def test_dashboard_covers_fleet_budget_per_gpu_jobs_and_clock_events() -> None:
    exprs = " ".join(t["expr"] for _, t in dashboard_targets(dashboard()))
    for metric in (
        "wattwarden_power_budget_watts",
        "gpu_power_watts",
        "gpu_temperature_celsius",
        "gpu_utilization_ratio",
        "gpu_power_limit_watts",
        "gpu_job_energy_joules_total",
        "gpu_job_power_watts",
        "gpu_clock_event_active",
        "gpu_clock_event_seconds_total",
    ):
        assert metric in exprs, metric
    # Per-job series are stored with the workload's name in job_name (prometheus.yml relabels the
    # agent's `job`, which clashes with the scrape job label): panels must group by it.
    assert "by (job_name)" in exprs
    assert "exported_job" not in exprs


def test_prometheus_yml_keeps_the_workload_job_label_as_job_name() -> None:
    config = load_yaml(PROMETHEUS_YML)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "wattwarden"]
    relabels = job["metric_relabel_configs"]
    assert any(
        r.get("source_labels") == ["exported_job"] and r.get("target_label") == "job_name"
        for r in relabels
    )
    assert config["global"]["scrape_interval"] == "15s"
    assert config["alerting"]["alertmanagers"]


# ------------------------------------------------------------------ the fleet controller
CONTROLLER_JOB = "wattwarden-controller"
CONTROLLER_ALERTS = {
    "WattwardenControllerDown",
    "WattwardenControllerPrometheusUnreachable",
    "WattwardenLeasesExpiring",
    "ClusterPowerOverBudget",
}


def test_prometheus_yml_scrapes_the_controller_on_its_default_address_keeping_node_labels() -> None:
    config = load_yaml(PROMETHEUS_YML)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == CONTROLLER_JOB]
    # `wattwarden controller` listens on 127.0.0.1:9768 unless given --listen.
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9768"]}]
    # Its per-node series carry the node in `instance`: kept, so they join the agents' series.
    assert job["honor_labels"] is True
    assert job["scrape_interval"] == config["global"]["scrape_interval"]


def test_controller_alerts_live_in_their_own_rule_file_and_read_the_controller_job() -> None:
    path = next(p for p in rule_files() if p.name == "controller.yml")
    names = {r["alert"] for g in load_yaml(path)["groups"] for r in g["rules"] if "alert" in r}
    assert names == CONTROLLER_ALERTS
    others = {r["alert"] for r in alert_rules()} - names
    assert not others & CONTROLLER_ALERTS
    for rule in (r for g in load_yaml(path)["groups"] for r in g["rules"]):
        expr = rule["expr"]
        # Every controller series is read from its scrape job, agents' from theirs.
        for selector in re.findall(r"\b(wattwarden_controller_\w+)(\{[^}]*\})?", expr):
            assert f'job="{CONTROLLER_JOB}"' in selector[1], (rule["alert"], selector[0])


def test_controller_alerts_have_their_own_unit_tests_file() -> None:
    tests = load_yaml(RULE_TESTS_DIR / "controller_alerts.yml")
    assert "../rules/controller.yml" in tests["rule_files"]
    shown = {c["alertname"] for case in tests["tests"] for c in case.get("alert_rule_test", [])}
    assert shown == CONTROLLER_ALERTS
