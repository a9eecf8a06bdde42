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
from helpers import http_get, require_binary, run_agent, wait_for
from promstack import run_prometheus

from wattwarden.api import webconfig

PASSWORD = "s3cret-scraper"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


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
         str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--web-config", str(cfg)],
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


# ---------------------------------------------------------------- the file, parsed in-process


def load(tmp_path: Path, text: str) -> webconfig.WebConfig:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return webconfig.load_web_config(path)


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ValueError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert message.startswith(f"web config {tmp_path / 'web.yml'}: ") and "\n" not in message
    return message.removeprefix(f"web config {tmp_path / 'web.yml'}: ")


TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("- a\n", "must be a mapping"),
        ("listen: 1\nzz: 2\nbasic_auth_users: {}\n", "unknown key 'listen'"),
        ("tls_server_config: [\n", "not valid YAML: while parsing a flow node"),
        ("tls_server_config: 5\n", "tls_server_config must be a mapping"),
        ("tls_server_config:\n  key_file: k\n  cert: c\n", "tls_server_config: unknown key 'cert'"),
        ("tls_server_config:\n  key_file: k\n", "tls_server_config.cert_file is required"),
        ("tls_server_config:\n  cert_file: c\n", "tls_server_config.key_file is required"),
        ("tls_server_config:\n  cert_file: 5\n  key_file: k\n",
         "tls_server_config.cert_file is required"),
        ("tls_server_config:\n  cert_file: c\n  key_file: [k]\n",
         "tls_server_config.key_file is required"),
        ("tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS11\n",
         "tls_server_config.min_version must be TLS12 or TLS13, got 'TLS11'"),
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
         "tls_server_config: cannot load cert_file/key_file: "),
        ("basic_auth_users: [alice]\n", "basic_auth_users must map user names to hashes"),
        ("basic_auth_users:\n  alice: plaintext\n",
         "basic_auth_users.alice must be a bcrypt hash ($2y$...)"),
        ("basic_auth_users:\n  alice: 12\n",
         "basic_auth_users.alice must be a bcrypt hash ($2y$...)"),
        ("basic_auth_users:\n  alice: $2x$04$abc\n",
         "basic_auth_users.alice must be a bcrypt hash"),
    ],
)  # fmt: skip
def test_a_bad_web_config_is_one_line_naming_the_file_and_key(
    tmp_path: Path, text: str, error: str
) -> None:
    message = refused(tmp_path, text)
    assert message.startswith(error)
    if "YAML" in error:  # the parser's first line only
        assert message == error


def test_a_web_config_that_cannot_be_read_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as caught:
        webconfig.load_web_config(tmp_path / "absent.yml")
    assert str(caught.value) == (
        f"web config {tmp_path / 'absent.yml'}: cannot read: No such file or directory"
    )


@pytest.mark.parametrize("text", ["", "basic_auth_users:\n", "http_server_config: {}\n"])
def test_an_empty_web_config_is_plain_http_without_users(tmp_path: Path, text: str) -> None:
    config = load(tmp_path, text)
    assert config.ssl_context is None and config.users == {}


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_hashes_of_each_prefix_are_users(tmp_path: Path, prefix: str) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    hashed = prefix + hashed[4:]
    config = load(tmp_path, f"basic_auth_users:\n  alice: '{hashed}'\n  42: '{hashed}'\n")
    assert config.users == {"alice": hashed.encode(), "42": hashed.encode()}
    assert config.ssl_context is None
    assert config.check_basic("alice", "pw") and config.check_basic("42", "pw")


def test_tls_paths_are_relative_to_the_config_file_and_min_version_defaults_to_tls12(
    pki: Path,
) -> None:
    config = webconfig.load_web_config(web_config(pki, users=False))
    ctx = config.ssl_context
    assert ctx is not None and config.users == {}
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE


def test_tls_paths_may_be_absolute_and_tls13_may_be_required(pki: Path, tmp_path: Path) -> None:
    text = (
        f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}"
        "\n  min_version: TLS13\n"
    )
    config = load(tmp_path, text)  # a directory without the files
    assert config.ssl_context is not None
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize(
    ("auth", "mode"),
    [("VerifyClientCertIfGiven", ssl.CERT_OPTIONAL),
     ("RequireAndVerifyClientCert", ssl.CERT_REQUIRED), ("NoClientCert", ssl.CERT_NONE)],
)  # fmt: skip
def test_client_auth_types_set_the_verify_mode(pki: Path, auth: str, mode: ssl.VerifyMode) -> None:
    path = pki / "web.yml"
    path.write_text(TLS + f"  client_auth_type: {auth}\n  client_ca_file: ca.crt\n")
    ctx = webconfig.load_web_config(path).ssl_context
    assert ctx is not None and ctx.verify_mode == mode
    if mode != ssl.CERT_NONE:
        assert [c["subject"] for c in ctx.get_ca_certs()] == [
            ((("commonName", "wattwarden test CA"),),)
        ]


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("  client_auth_type: Maybe\n", "tls_server_config.client_auth_type must be one of "
         "NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
        ("  client_auth_type: RequireAndVerifyClientCert\n",
         "tls_server_config.client_ca_file is required with RequireAndVerifyClientCert"),
        ("  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: 3\n",
         "tls_server_config.client_ca_file is required with VerifyClientCertIfGiven"),
        ("  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: nope.crt\n",
         "tls_server_config: cannot load client_ca_file: "),
    ],
)  # fmt: skip
def test_client_auth_problems_name_the_key(pki: Path, extra: str, error: str) -> None:
    path = pki / "web.yml"
    path.write_text(TLS + extra)
    with pytest.raises(ValueError) as caught:
        webconfig.load_web_config(path)
    assert str(caught.value).startswith(f"web config {path}: {error}")


# ------------------------------------------------------------------------------ basic auth


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Every bcrypt check made, as (password, hash)."""
    calls: list[tuple[bytes, bytes]] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        calls.append((password, hashed))
        return real(password, hashed)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", spy)
    return calls


def test_a_good_pair_is_checked_with_bcrypt_once_then_remembered(
    checked: list[tuple[bytes, bytes]],
) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))
    web = webconfig.WebConfig(users={"alice": hashed, "bob": hashed})
    assert web.check_basic("alice", "pw") and web.check_basic("alice", "pw")
    assert checked == [(b"pw", hashed)]
    assert not web.check_basic("alice", "pw2")  # a wrong one is checked, every time
    assert not web.check_basic("alice", "pw2")
    assert web.check_basic("bob", "pw")  # remembered per user
    assert len(checked) == 4


def test_a_password_of_72_bytes_is_checked_and_73_is_refused(
    checked: list[tuple[bytes, bytes]],
) -> None:
    assert webconfig.MAX_PASSWORD_BYTES == 72
    hashed = bcrypt.hashpw(b"p" * 72, bcrypt.gensalt(rounds=4))
    web = webconfig.WebConfig(users={"alice": hashed})
    assert web.check_basic("alice", "p" * 72)
    assert not web.check_basic("alice", "p" * 73)
    assert checked[1][0] == b"x" and checked[1][1] != hashed  # a dummy check at the same cost
    assert webconfig._cost(checked[1][1]) == 4


@pytest.mark.parametrize(
    ("hashed", "cost"),
    [(b"$2y$10$abc", 10), (b"$2b$04$abc", 4), (b"$2y$03$abc", 4), (b"$2y$99$abc", 31),
     (b"$2y$xx$abc", 4), (b"$2y", 4), (b"", 4)],
)  # fmt: skip
def test_the_cost_of_a_hash_is_read_and_kept_within_4_to_31(hashed: bytes, cost: int) -> None:
    assert webconfig._cost(hashed) == cost


def test_without_users_an_unknown_user_costs_the_minimum() -> None:
    assert webconfig.WebConfig()._max_cost() == 4
    assert not webconfig.WebConfig().check_basic("nobody", "pw")


def test_the_dummy_hash_is_made_once_per_cost_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webconfig, "_dummy_hashes", {})
    made: list[int] = []
    real = bcrypt.gensalt
    monkeypatch.setattr(
        webconfig.bcrypt, "gensalt", lambda rounds: made.append(rounds) or real(rounds)
    )
    slow = bcrypt.hashpw(b"a", bcrypt.gensalt(rounds=5)).decode()
    fast = bcrypt.hashpw(b"b", bcrypt.gensalt(rounds=4)).decode()
    made.clear()
    config = load(tmp_path, f"basic_auth_users:\n  a: '{slow}'\n  b: '{fast}'\n")
    assert made == [5]
    assert not config.check_basic("nobody", "pw") and not config.check_basic("b", "x" * 80)
    assert made == [5, 4]
    assert not config.check_basic("c", "pw") and not config.check_basic("b", "y" * 80)
    assert made == [5, 4]
    assert webconfig._cost(webconfig._dummy_hashes[5]) == 5
