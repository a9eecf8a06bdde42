"""TLS and basic auth for reads, configured like Prometheus exporters (exporter-toolkit format)."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import urllib.parse
from pathlib import Path

import bcrypt
import pytest
from helpers import free_port, http_get, require_binary, run_agent, wait_for
from promstack import run_prometheus

PASSWORD = "s3cret-scraper"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    openssl = require_binary("openssl")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=wattwarden test CA")  # fmt: skip
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    return d


def web_config(pki: Path, users: bool = True) -> Path:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    text = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
    if users:
        text += f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    path = pki / "web.yml"
    path.write_text(text)
    return path


def client_context(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.crt"))


def test_reads_need_basic_auth_over_tls_and_healthz_stays_open(tmp_path: Path, pki: Path) -> None:
    tls = client_context(pki)
    cfg = str(web_config(pki))
    with run_agent(tmp_path / "state", "--sim", "2", "--web-config", cfg, tls=tls) as agent:
        assert agent.url.startswith("https://")
        assert http_get(agent.url + "/healthz", context=tls)[0] == 200
        status, _ = http_get(agent.url + "/metrics", context=tls)
        assert status == 401
        wrong = basic("prometheus", "guess")
        assert http_get(agent.url + "/metrics", context=tls, headers=wrong)[0] == 401
        good = basic("prometheus", PASSWORD)
        status, body = http_get(agent.url + "/metrics", context=tls, headers=good)
        assert status == 200 and b"gpu_power_watts" in body
        status, body = http_get(agent.url + "/api/v1/state", context=tls, headers=good)
        assert status == 200 and len(json.loads(body)["gpus"]) == 2
        # plain HTTP on the TLS port gets no metrics
        with pytest.raises(OSError):
            http_get(agent.url.replace("https://", "http://") + "/metrics", timeout_s=3)


def test_writes_still_need_the_bearer_token_under_basic_auth(tmp_path: Path, pki: Path) -> None:
    import urllib.request

    tls = client_context(pki)
    cfg = str(web_config(pki))
    with run_agent(tmp_path / "state", "--sim", "2", "--web-config", cfg, tls=tls) as agent:
        req = urllib.request.Request(
            agent.url + "/api/v1/sim/load",
            data=json.dumps({"gpu": 0, "utilization": 0.5}).encode(),
            headers={"Authorization": f"Bearer {agent.token}"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5, context=tls) as resp:
            assert resp.status == 200


@pytest.mark.slow
def test_real_prometheus_scrapes_the_agent_over_tls_with_basic_auth(
    tmp_path: Path, pki: Path
) -> None:
    prometheus = require_binary("prometheus")
    tls = client_context(pki)
    cfg = str(web_config(pki))
    with run_agent(tmp_path / "state", "--sim", "8", "--web-config", cfg, tls=tls) as agent:
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "wattwarden",
                    "scheme": "https",
                    "tls_config": {"ca_file": str(pki / "ca.crt")},
                    "basic_auth": {"username": "prometheus", "password": PASSWORD},
                    "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}],
                }
            ],
        }
        with run_prometheus(prometheus, config, tmp_path / "prom") as prom:
            expr = urllib.parse.quote("count(gpu_power_watts)")
            url = f"{prom.url}/api/v1/query?query={expr}"

            def eight() -> bool:
                status, body = http_get(url, timeout_s=2)
                result = json.loads(body)["data"]["result"] if status == 200 else []
                return bool(result) and result[0]["value"][1] == "8"

            wait_for(eight, timeout_s=60, what="Prometheus to scrape 8 GPUs over TLS")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "cannot load"),
        ("tls_server_config:\n  cert_file: a\n", "tls_server_config.key_file is required"),
        ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice must be a bcrypt"),
        ("listen: 1\n", "unknown key 'listen'"),
        ("tls_server_config: [\n", "not valid YAML"),
    ],
)
def test_bad_web_config_is_a_one_line_usage_error(tmp_path: Path, text: str, expected: str) -> None:
    cfg = tmp_path / "web.yml"
    cfg.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "wattwarden", "agent", "--sim", "1", "--state-dir",
         str(tmp_path / "s"), "--listen", f"127.0.0.1:{free_port()}", "--web-config", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and str(cfg) in lines[0]


def test_workload_client_reads_through_basic_auth_over_tls(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wattwarden.workloads.agent_client import AgentClient

    tls = client_context(pki)
    cfg = str(web_config(pki))
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.crt"))
    with run_agent(tmp_path / "state", "--sim", "2", "--web-config", cfg, tls=tls) as agent:
        host = agent.url.removeprefix("https://")
        client = AgentClient(f"https://prometheus:{PASSWORD}@{host}", token=agent.token)
        try:
            assert client.url == agent.url  # the password is not kept in the URL
            status, energy = client.request("GET", "/api/v1/energy")
            assert status == 200 and len(energy["gpus"]) == 2
            body = {"gpu": 1, "utilization": 0.3}
            assert client.request("POST", "/api/v1/sim/load", body, auth=True)[0] == 200
        finally:
            client.close()


def test_password_over_72_bytes_is_refused_with_401_not_500(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    cfg = tmp_path / "web.yml"
    cfg.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    with run_agent(tmp_path / "state", "--sim", "1", "--web-config", str(cfg)) as agent:
        for password in ("p" * 73, PASSWORD + "x" * 72):
            status, body = http_get(agent.url + "/metrics", headers=basic("prometheus", password))
            assert status == 401, body
        good = basic("prometheus", PASSWORD)
        assert http_get(agent.url + "/metrics", headers=good)[0] == 200


def test_unknown_users_cost_as_much_as_known_users_with_a_wrong_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wattwarden.api import webconfig

    checked: list[bytes] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", spy)
    users = {
        "fast": bcrypt.hashpw(b"a", bcrypt.gensalt(rounds=4)),
        "slow": bcrypt.hashpw(b"b", bcrypt.gensalt(rounds=6)),
    }
    web = webconfig.WebConfig(users=users)
    assert not web.check_basic("slow", "wrong")
    assert not web.check_basic("nobody", "wrong")
    assert not web.check_basic("nobody", "p" * 100)
    costs = [int(h.split(b"$")[2]) for h in checked]
    assert costs == [6, 6, 6]
