"""Alerts end to end: simulated GPU fault -> agent -> Prometheus (our rules) -> Alertmanager (our
routing and inhibition) -> webhook.

Prometheus runs a test copy of deploy/prometheus/prometheus.yml (1 s scrape and evaluation, the
agent and the test's Alertmanager as targets, our rule files unchanged); Alertmanager runs
deploy/alertmanager/alertmanager.yml with its webhook URLs pointed at a receiver in this test and
1 s group waits. Nothing sleeps: every wait is on the receiver's condition or a polled deadline.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import http_get, http_json, parse_metrics, require_binary, run_agent, wait_for
from promstack import (
    Notification,
    WebhookReceiver,
    alertmanager_binary,
    alertmanager_test_config,
    prom_query,
    prometheus_test_config,
    run_alertmanager,
    run_prometheus,
)

pytestmark = pytest.mark.slow

RUNBOOK = "https://github.com/wattwarden/wattwarden/blob/main/deploy/RUNBOOK.md#"


def _is(alertname: str, status: str, **labels: str) -> Callable[[Notification], bool]:
    def match(n: Notification) -> bool:
        return (
            n.status == status
            and n.labels.get("alertname") == alertname
            and all(n.labels.get(k) == v for k, v in labels.items())
        )

    return match


def _fault(agent: Any, gpu: int, fault: str, **params: Any) -> None:
    status, body = http_json(
        f"{agent.url}/api/v1/sim/faults", {"gpu": gpu, "fault": fault, **params}, token=agent.token
    )
    assert status == 200, body


def test_lost_and_overheating_gpus_page_through_prometheus_and_alertmanager_then_resolve(
    tmp_path: Path,
) -> None:
    prometheus = require_binary("prometheus")
    alertmanager = alertmanager_binary()
    with (
        WebhookReceiver().running() as receiver,
        run_agent(tmp_path / "agent", "--sim", "8") as agent,
        run_alertmanager(
            alertmanager, alertmanager_test_config(receiver.url), tmp_path / "alertmanager"
        ) as am,
        run_prometheus(
            prometheus,
            prometheus_test_config(
                agent_target=f"127.0.0.1:{agent.port}",
                alertmanager_target=am.url.removeprefix("http://"),
            ),
            tmp_path / "prometheus",
        ) as prom,
    ):
        _, body = http_get(f"{agent.url}/metrics")
        uuids = {s[0]["gpu"]: s[0]["uuid"] for s in parse_metrics(body.decode())["gpu_up"]}

        def scraped() -> bool:
            result = prom_query(prom.url, 'up{job="wattwarden"} == 1')["data"]["result"]
            return len(result) == 1

        wait_for(scraped, timeout_s=60, what="the agent up in Prometheus")

        # 1. GPU 3 falls off the bus: GpuLost pages on-call, naming the GPU and its UUID.
        assert not [n for n in receiver.notifications if n.labels.get("alertname") == "GpuLost"]
        _fault(agent, 3, "lost")
        lost = receiver.wait_for(_is("GpuLost", "firing"), timeout_s=60, what="GpuLost firing")
        assert lost.labels["gpu"] == "3"
        assert lost.labels["uuid"] == uuids["3"]
        assert lost.labels["severity"] == "critical"
        assert lost.labels["instance"] == "127.0.0.1"  # the node, port stripped by relabelling
        assert lost.receiver == "gpu-oncall"
        assert lost.annotations["runbook_url"] == RUNBOOK + "gpulost"
        assert uuids["3"] in lost.annotations["description"]

        # 2. GPU 5 overheats (ambient +60 C: past 85 C after ~40 s), and GPU 6 reports its first
        #    XID 48 (a counter series that appears at 1).
        _fault(agent, 5, "overheat")
        _fault(agent, 6, "xid", xid=48)
        xid = receiver.wait_for(
            _is("GpuXidErrorCritical", "firing", gpu="6", xid="48"),
            timeout_s=60,
            what="GpuXidErrorCritical firing for XID 48 on GPU 6",
        )
        assert xid.labels["uuid"] == uuids["6"]
        assert xid.receiver == "gpu-oncall"
        hot = receiver.wait_for(
            _is("GpuTemperatureCritical", "firing"),
            timeout_s=200,
            what="GpuTemperatureCritical firing",
        )
        assert hot.labels["gpu"] == "5"
        assert hot.labels["uuid"] == uuids["5"]
        assert hot.labels["severity"] == "critical"
        assert hot.labels["sensor"] == "gpu"
        assert hot.receiver == "gpu-oncall"
        assert hot.annotations["runbook_url"] == RUNBOOK + "gputemperaturecritical"
        firing_hot = {
            n.labels["gpu"]
            for n in receiver.notifications
            if n.labels.get("alertname") == "GpuTemperatureCritical"
        }
        assert firing_hot == {"5"}

        # 3. Both faults cleared: resolved notifications for both alerts.
        _fault(agent, 3, "clear")
        _fault(agent, 5, "clear")
        receiver.wait_for(
            _is("GpuLost", "resolved", gpu="3", uuid=uuids["3"]),
            timeout_s=60,
            what="GpuLost resolved",
        )
        receiver.wait_for(
            _is("GpuTemperatureCritical", "resolved", gpu="5", uuid=uuids["5"]),
            timeout_s=60,
            what="GpuTemperatureCritical resolved",
        )


def _post_alerts(base: str, alerts: list[dict[str, str]]) -> None:
    body = json.dumps([{"labels": a, "annotations": {"summary": "test"}} for a in alerts]).encode()
    req = urllib.request.Request(
        f"{base}/api/v2/alerts",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def test_alertmanager_inhibits_lost_gpu_temperature_warning_under_critical_and_down_node_gpus(
    tmp_path: Path,
) -> None:
    alertmanager = alertmanager_binary()
    with (
        WebhookReceiver().running() as receiver,
        run_alertmanager(
            alertmanager, alertmanager_test_config(receiver.url), tmp_path / "alertmanager"
        ) as am,
    ):
        node1 = {"job": "wattwarden", "instance": "node-1"}
        node2 = {"job": "wattwarden", "instance": "node-2"}
        inhibited = [
            # GPU 3 of node-1 is lost: its (stale) temperature alerts are noise.
            {**node1, "alertname": "GpuTemperatureCritical", "severity": "critical", "gpu": "3"},
            {**node1, "alertname": "GpuTemperatureHigh", "severity": "warning", "gpu": "3"},
            # GPU 5 is critical: its warning for the same cause is redundant.
            {**node1, "alertname": "GpuTemperatureHigh", "severity": "warning", "gpu": "5"},
            # node-2's agent is down: nothing about its GPUs is current.
            {**node2, "alertname": "GpuLost", "severity": "critical", "gpu": "0"},
            {**node2, "alertname": "GpuTemperatureHigh", "severity": "warning", "gpu": "1"},
        ]
        active = [
            {**node1, "alertname": "GpuLost", "severity": "critical", "gpu": "3"},
            # Another GPU of the same node still pages.
            {**node1, "alertname": "GpuTemperatureCritical", "severity": "critical", "gpu": "5"},
            {**node2, "alertname": "WattwardenAgentDown", "severity": "critical"},
        ]
        # Sources first, so the inhibitor knows them before the targets' groups flush.
        _post_alerts(am.url, active)
        _post_alerts(am.url, inhibited)

        def key(labels: dict[str, str]) -> tuple[str, str, str]:
            return labels["instance"], labels["alertname"], labels.get("gpu", "")

        def states() -> dict[tuple[str, str, str], str] | None:
            _, body = http_get(f"{am.url}/api/v2/alerts", timeout_s=5)
            got = {key(a["labels"]): a["status"]["state"] for a in json.loads(body)}
            return got if len(got) == len(inhibited) + len(active) else None

        def settled() -> dict[tuple[str, str, str], str] | None:
            got = states()
            want = {key(a): "suppressed" for a in inhibited} | {key(a): "active" for a in active}
            return got if got == want else None

        wait_for(settled, timeout_s=30, what="inhibited alerts suppressed, others active")

        # What reached the receivers: the active alerts only.
        for alert in active:
            where = {k: alert[k] for k in ("instance", "gpu") if k in alert}
            receiver.wait_for(
                _is(alert["alertname"], "firing", **where),
                timeout_s=30,
                what=f"{key(alert)} delivered",
            )
        delivered = {key(n.labels) for n in receiver.notifications}
        assert delivered == {key(a) for a in active}
