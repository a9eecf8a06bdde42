"""``wattwarden controller``: --help, bad input (one line naming it, exit 2), a dry-run process
against a Prometheus stub with its /metrics and /healthz, and (slow) a real agent and Prometheus
with the controller in apply mode."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest
from helpers import http_get, require_binary, run_agent, run_controller, wait_for
from test_fleet_prom import PromStub, fleet_series, target, vector

from wattwarden.cli import main


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(["controller", *argv])
    except SystemExit as e:  # argparse's own usage errors, and --help
        code = int(e.code or 0)
    got = capsys.readouterr()
    return code, got.out, got.err


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for flag in ("--prometheus", "--budget-watts", "--apply", "--lease-s", "--token-dir",
                 "--scheduler", "--release-on-exit", "--config"):  # fmt: skip
        assert flag in out


BASE = ["--prometheus", "http://127.0.0.1:9", "--budget-watts", "5000"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "--prometheus is required"),
        (["--prometheus", "http://127.0.0.1:9"], "--budget-watts is required"),
        (["--prometheus", "ftp://x", "--budget-watts", "5"], "--prometheus must be an http://"),
        ([*BASE, "--budget-watts", "-5"], "--budget-watts must be within 1..1e+09, got -5"),
        ([*BASE, "--period-s", "abc"], "argument --period-s: expected a number, got 'abc'"),
        ([*BASE, "--id", "bad id"], "--id must be 1 to 128 of the characters"),
        ([*BASE, "--scheduler", "yarn"], "--scheduler must be one of none, kubernetes, slurm"),
        ([*BASE, "--lease-s", "5"], "--lease-s 5.0 must be at least twice --period-s"),
        ([*BASE, "--token-dir", "d", "--token-file", "f"], "exclude each other"),
        ([*BASE, "--apply"], "--apply needs --token-dir or --token-file"),
        ([*BASE, "--agent-ca-file", "ca.pem"], "needs --agent-scheme https"),
        ([*BASE, "--prometheus-basic-auth-user", "u"],
         "--prometheus-basic-auth-user u needs --prometheus-basic-auth-password-file too"),
        ([*BASE, "--token-file", "/nonexistent/token"], "--token-file"),
        ([*BASE, "--listen", "127.0.0.1:99999"], "--listen"),
        ([*BASE, "--kubernetes-api", "https://k8s:6443"], "needs --scheduler kubernetes"),
        ([*BASE, "--scheduler", "kubernetes", "--kubernetes-token-file", "t"],
         "--kubernetes-token-file t needs --kubernetes-api"),
        ([*BASE, "--scheduler", "kubernetes", "--kubernetes-api", "http://k8s:6443",
          "--kubernetes-ca-file", "ca.pem"], "needs an https:// --kubernetes-api URL"),
        ([*BASE, "--scheduler", "kubernetes", "--kubernetes-api", "https://k8s:6443",
          "--kubernetes-token-file", "/nonexistent/token"],
         "--kubernetes-token-file /nonexistent/token: cannot read"),
        ([*BASE, "--scheduler", "kubernetes", "--kubernetes-api", "k8s:6443"],
         "--kubernetes-api must be an http:// or https:// URL"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_it_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert says in err
    assert err.count("\n") == 1, err


def test_config_file_keys_are_checked_and_flags_override_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('prometheus = "http://127.0.0.1:9"\nbudget_watts = "lots"\n')
    code, _, err = run_main(["--config", str(bad)], capsys)
    assert code == 2 and f"config {bad}: key 'budget_watts' must be a number" in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("budget = 5\n")
    code, _, err = run_main(["--config", str(unknown)], capsys)
    assert code == 2 and "unknown key 'budget'" in err
    ok = tmp_path / "ok.toml"
    ok.write_text('prometheus = "http://127.0.0.1:9"\nbudget_watts = 5000\nlease_s = 4.0\n')
    code, _, err = run_main(["--config", str(ok), "--period-s", "3"], capsys)
    assert code == 2 and f"lease_s = 4.0 in config {ok} must be at least twice --period-s" in err


def test_a_taken_listen_port_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = run_main([*BASE, "--listen", f"127.0.0.1:{port}"], capsys)
    assert code == 2 and f"--listen 127.0.0.1:{port}: cannot listen" in err


def metric(body: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
    return float(m[1]) if m else None


def test_a_dry_run_controller_serves_metrics_and_health_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    def query(params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        at = float(params["time"])
        return 200, vector(fleet_series(at).get(params["query"], []), at)

    def no_lease(params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        return 200, b'{"lease": null, "local_power_budget_watts": null}'

    stub = PromStub(handlers={"/api/v1/query": query, "/api/v1/policy/lease": no_lease})
    with stub.running() as prom:
        # the stub plays the agent too: its lease is read at the address the targets give
        stub.targets = [target("n1", prom.url.removeprefix("http://"))]
        args = ["--prometheus", prom.url, "--budget-watts", "3000", "--period-s", "0.5",
                "--lease-s", "2"]  # fmt: skip
        with run_controller(*args, log_path=tmp_path / "controller.log") as (proc, url):

            def exported() -> str | None:
                body = http_get(url + "/metrics")[1].decode()
                node = 'wattwarden_controller_node_budget_watts{instance="n1"}'
                return body if node in body else None

            body = wait_for(exported, timeout_s=30, what="a node budget in /metrics")
            assert metric(body, 'wattwarden_controller_mode{mode="dry_run"}') == 1.0
            assert metric(body, "wattwarden_controller_prometheus_up") == 1.0
            assert metric(body, "wattwarden_controller_budget_watts") == 3000.0
            assert metric(body, 'wattwarden_controller_nodes{state="ok"}') == 1.0
            assert metric(body, 'wattwarden_controller_lease_pushes_total{result="ok"}') == 0.0
            status, health = http_get(url + "/healthz")
            assert status == 200 and json.loads(health)["mode"] == "dry_run"
            reads = [h for path, _, h in prom.requests if path == "/api/v1/policy/lease"]
            assert reads and all("Authorization" not in h for h in reads)  # reads, no push
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


# ------------------------------------------------------------------ a real fleet of one
@pytest.mark.slow
def test_apply_leases_an_agent_through_a_real_prometheus_and_a_second_id_gets_409(
    tmp_path: Path,
) -> None:
    from promstack import prometheus_test_config, run_prometheus

    prometheus = require_binary("prometheus")
    with (
        run_agent(tmp_path / "agent", "--sim", "2", "--power-budget-watts", "1200") as agent,
        run_prometheus(
            prometheus,
            prometheus_test_config(
                agent_target=f"127.0.0.1:{agent.port}", alertmanager_target=None
            ),
            tmp_path / "prometheus",
        ) as prom,
    ):
        token = str(tmp_path / "agent" / "token")
        common = ["--prometheus", prom.url, "--budget-watts", "1000", "--period-s", "1",
                  "--lease-s", "4", "--token-file", token, "--apply"]  # fmt: skip

        def lease() -> dict | None:
            status, body = http_get(agent.url + "/api/v1/policy/lease")
            assert status == 200
            got: dict | None = json.loads(body)["lease"]
            return got

        with run_controller(*common, "--id", "ctl-a", log_path=tmp_path / "a.log") as (proc, _):
            held = wait_for(
                lambda: (got := lease()) and got["holder"] == "ctl-a" and got,
                timeout_s=90,
                what="the controller's lease on the agent",
            )
            assert 400.0 <= held["power_budget_watts"] <= 1000.0  # within its floor..budget
            with run_controller(*common, "--id", "ctl-b", log_path=tmp_path / "b.log") as (p2, u2):

                def conflicts() -> float | None:
                    body = http_get(u2 + "/metrics")[1].decode()
                    return metric(
                        body, 'wattwarden_controller_lease_pushes_total{result="conflict"}'
                    )

                wait_for(conflicts, timeout_s=60, what="the second controller's 409s")
                p2.send_signal(signal.SIGTERM)
                assert p2.wait(30) == 0
            assert lease()["holder"] == "ctl-a"  # never taken over while renewed
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert lease() is not None  # left to expire, not released
            wait_for(lambda: lease() is None, timeout_s=30, what="the lease to expire")
