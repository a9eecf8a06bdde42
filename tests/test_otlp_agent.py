"""The agent with OTLP export configured: a dead endpoint is counted and changes nothing else."""

from __future__ import annotations

from pathlib import Path

from helpers import http_get, parse_metrics, refused_port, run_agent, wait_for


def test_agent_with_an_unreachable_otlp_endpoint_keeps_serving_and_counts_failures(
    tmp_path: Path,
) -> None:
    with (
        refused_port() as port,
        run_agent(
            tmp_path / "state",
            "--sim",
            "2",
            "--otlp-endpoint",
            (dead := f"http://127.0.0.1:{port}"),
            "--otlp-interval-s",
            "1",
        ) as agent,
    ):

        def failures() -> float | None:
            m = parse_metrics(http_get(agent.url + "/metrics")[1].decode())
            counted = m.get("wattwarden_otlp_export_failures_total", [({}, 0.0)])[0][1]
            return counted if counted >= 2 else None

        wait_for(failures, timeout_s=30, what="two failed OTLP exports counted")
        assert http_get(agent.url + "/healthz")[0] == 200
        assert "exporting OTLP metrics to " + dead in agent.log_path.read_text()


def test_bad_otlp_headers_are_a_one_line_usage_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "wattwarden", "agent", "--sim", "1", "--state-dir", str(tmp_path),
         "--listen", "127.0.0.1:0", "--otlp-endpoint", "http://127.0.0.1:1",
         "--otlp-headers", "novalue"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "OTLP" in result.stderr.strip().splitlines()[-1]
