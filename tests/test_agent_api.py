"""The agent as operators run it: HTTP API, token auth, dry-run, limits restored."""

from __future__ import annotations

import json
import signal
import socket
import stat
from pathlib import Path
from typing import Any

from helpers import http_get, http_json, parse_metrics, run_agent, wait_for


def gauge(url: str, name: str, gpu: str) -> float | None:
    metrics = parse_metrics(http_get(url + "/metrics")[1].decode())
    values = [v for labels, v in metrics.get(name, []) if labels.get("gpu") == gpu]
    return values[0] if values else None


def test_agent_serves_health_state_history_and_metrics(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "8") as agent:
        assert http_get(agent.url + "/healthz") == (200, b"ok\n")
        status, state = http_json(agent.url + "/api/v1/state")
        assert status == 200
        assert state["backend"] == "sim" and state["policy_mode"] == "dry_run"
        assert [g["index"] for g in state["gpus"]] == list(range(8))
        assert all(g["up"] and g["power_watts"] > 0 for g in state["gpus"])

        def history_point() -> dict[str, Any] | None:
            status, body = http_json(agent.url + "/api/v1/history?seconds=60")
            return body if status == 200 and body["gpus"]["0"] else None

        history = wait_for(history_point, timeout_s=10, what="one second of history")
        assert history["columns"][0] == "timestamp"
        assert http_json(agent.url + "/api/v1/history?seconds=abc")[0] == 400
        assert http_get(agent.url + "/nope")[0] == 404


def test_token_is_created_0600_and_writes_without_it_are_refused(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        mode = stat.S_IMODE((agent.state_dir / "token").stat().st_mode)
        assert mode == 0o600
        body = {"gpu": 0, "utilization": 0.5}
        assert http_json(agent.url + "/api/v1/sim/load", body)[0] == 401
        assert http_json(agent.url + "/api/v1/sim/load", body, token="wrong")[0] == 401
        assert http_json(agent.url + "/api/v1/sim/load", body, token=agent.token)[0] == 200


def test_bad_bodies_get_clear_errors(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        url, tok = agent.url, agent.token
        status, _ = http_json(url + "/api/v1/sim/load", {"gpu": 9, "utilization": 0.5}, token=tok)
        assert status == 404
        status, err = http_json(url + "/api/v1/sim/load", {"gpu": 0}, token=tok)
        assert (status, err["error"]) == (400, "missing field 'utilization'")
        status, err = http_json(url + "/api/v1/sim/load", {"gpu": 0, "utilization": 2}, token=tok)
        assert status == 422 and "within [0, 1]" in err["error"]
        status, err = http_json(url + "/api/v1/sim/faults", {"gpu": 0, "fault": "melt"}, token=tok)
        assert status == 422 and "melt" in err["error"]


def test_synthetic_load_shows_up_as_power_in_metrics(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "4", "--window-s", "1") as agent:
        http_json(agent.url + "/api/v1/sim/load", {"gpu": 2, "utilization": 1.0}, token=agent.token)
        wait_for(
            lambda: (gauge(agent.url, "gpu_power_watts", "2") or 0) > 650,
            timeout_s=15,
            what="GPU 2 near 700 W",
        )
        assert (gauge(agent.url, "gpu_power_watts", "1") or 0) < 80


def test_power_limit_changes_are_refused_in_dry_run(tmp_path: Path) -> None:
    with run_agent(tmp_path / "state", "--sim", "2") as agent:
        status, err = http_json(
            agent.url + "/api/v1/power-limits", {"gpu": 0, "watts": 300}, token=agent.token
        )
        assert status == 409 and "dry-run" in err["error"]


def sim_limits(state_dir: Path) -> list[float]:
    data = json.loads((state_dir / "sim" / "driver-state.json").read_text())
    return [g["power_limit_w"] for g in data["gpus"]]


def test_apply_sets_limits_in_range_and_restores_them_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with run_agent(state, "--sim", "2", "--apply") as agent:
        url, tok = agent.url + "/api/v1/power-limits", agent.token
        status, err = http_json(url, {"gpu": 0, "watts": 900}, token=tok)
        assert status == 422 and "outside its range [200, 700]" in err["error"]
        status, body = http_json(url, {"gpu": 0, "watts": 350}, token=tok)
        assert (status, body["enforced_watts"]) == (200, 350.0)
        assert http_json(url, {"gpu": 0, "watts": 360}, token=tok)[0] == 429  # rate-limited
        wait_for(lambda: gauge(agent.url, "gpu_power_limit_watts", "0") == 350.0, timeout_s=10)
        assert sim_limits(state)[0] == 350.0  # the (simulated) driver holds it
        assert agent.stop(signal.SIGTERM) == 0
    assert sim_limits(state) == [700.0, 700.0]


def test_limits_left_by_a_crashed_agent_are_restored_at_the_next_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with run_agent(state, "--sim", "2", "--apply") as agent:
        status, _ = http_json(
            agent.url + "/api/v1/power-limits", {"gpu": 1, "watts": 250}, token=agent.token
        )
        assert status == 200
        agent.stop(signal.SIGKILL)
    assert sim_limits(state)[1] == 250.0  # crashed with the GPU capped
    with run_agent(state, "--sim", "2") as agent:
        assert gauge(agent.url, "gpu_power_limit_watts", "1") == 700.0
        assert (
            "previous run that did not exit cleanly"
            in (tmp_path / f"agent-{agent.port}.log").read_text()
        )


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "wattwarden", "agent", "--sim", "1", "--listen",
             f"127.0.0.1:{port}", "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]
