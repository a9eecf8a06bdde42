"""The dashboard's Prometheus and Alertmanager reads against the real servers (slow: skipped
locally without the binaries, as the other deployment tests are)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from helpers import require_binary, run_agent, wait_for
from promstack import (
    alertmanager_binary,
    alertmanager_test_config,
    prometheus_test_config,
    run_alertmanager,
    run_prometheus,
)

from wattwarden.dashboard.settings import DashboardSettings
from wattwarden.dashboard.sources import Alert, FleetFromPrometheus, Sources

pytestmark = pytest.mark.slow


def test_fleet_numbers_from_prometheus_and_alerts_from_alertmanager(tmp_path: Path) -> None:
    prometheus = require_binary("prometheus")
    alertmanager = alertmanager_binary()
    with (
        run_agent(tmp_path / "agent", "--sim", "2", "--power-budget-watts", "900") as agent,
        run_alertmanager(
            alertmanager, alertmanager_test_config("http://127.0.0.1:9"), tmp_path / "am"
        ) as am,
        run_prometheus(
            prometheus,
            prometheus_test_config(agent_target=f"127.0.0.1:{agent.port}",
                                   alertmanager_target=None),
            tmp_path / "prometheus",
        ) as prom,
    ):  # fmt: skip
        s = Sources(
            DashboardSettings(agents=(agent.url,), prometheus=prom.url, alertmanager=am.url),
            ttl_s=0.0,
        )

        def scraped() -> FleetFromPrometheus | None:
            got = s.fleet()
            ok = isinstance(got, FleetFromPrometheus) and got.nodes and got.nodes[0].power_w
            return got if ok else None

        fleet = wait_for(scraped, timeout_s=60, what="the agent's power in Prometheus")
        (node,) = fleet.nodes
        assert node.instance == "127.0.0.1"  # the port stripped by the deploy relabelling
        assert (node.gpus_up, node.gpus_total, node.budget_w) == (2, 2, 900.0)
        assert node.power_w is not None and node.power_w > 0

        alert = [{"labels": {"alertname": "GpuLost", "severity": "critical", "gpu": "1"},
                  "annotations": {"summary": "GPU 1 is lost",
                                  "runbook_url": "https://example.invalid/#gpulost"}}]  # fmt: skip
        req = urllib.request.Request(
            f"{am.url}/api/v2/alerts", data=json.dumps(alert).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        alerts = wait_for(s.alerts, timeout_s=30, what="the alert in Alertmanager")
        assert isinstance(alerts, list)
        (got,) = alerts
        assert isinstance(got, Alert)
        assert (got.name, got.severity, got.summary, got.runbook_url) == (
            "GpuLost", "critical", "GPU 1 is lost", "https://example.invalid/#gpulost"
        )  # fmt: skip
