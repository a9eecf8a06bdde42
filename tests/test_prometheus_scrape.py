"""A real Prometheus server scrapes the agent on loopback."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest
from helpers import http_get, require_binary, run_agent, wait_for
from promstack import run_prometheus


@pytest.mark.slow
def test_real_prometheus_scrapes_eight_gpus_power_from_the_agent(tmp_path: Path) -> None:
    prometheus = require_binary("prometheus")
    with run_agent(tmp_path / "state", "--sim", "8") as agent:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "wattwarden",
                    "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}],
                }
            ],
        }
        with run_prometheus(prometheus, config, tmp_path / "prom") as prom:

            def query(expr: str) -> list[dict[str, object]] | None:
                url = f"{prom.url}/api/v1/query?query={urllib.parse.quote(expr)}"
                status, body = http_get(url, timeout_s=2)
                if status != 200:
                    return None
                result: list[dict[str, object]] = json.loads(body)["data"]["result"]
                return result

            def eight_series() -> list[dict[str, object]] | None:
                result = query("gpu_power_watts")
                return result if result and len(result) == 8 else None

            result = wait_for(eight_series, timeout_s=60, what="8 gpu_power_watts in Prometheus")
            assert sorted(int(s["metric"]["gpu"]) for s in result) == list(range(8))  # type: ignore[index]
            assert all(60 < float(s["value"][1]) < 80 for s in result)  # type: ignore[index]
            up = query('up{job="wattwarden"}')
            assert up and up[0]["value"][1] == "1"  # type: ignore[index]
