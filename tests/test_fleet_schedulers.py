"""Moving jobs through their scheduler: a loopback fake of the Kubernetes eviction endpoint and a
fake ``scontrol`` on PATH that records how it was called."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from helpers import refused_port, serve_loopback
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattwarden.config import ConfigError
from wattwarden.fleet.schedulers import (
    JobRef,
    KubernetesScheduler,
    MoveResult,
    SlurmScheduler,
    scheduler_for,
)

PDB_MESSAGE = "Cannot evict pod as it would violate the pod's disruption budget."


def pod(pod_id: str = "training/llm-7b-0", kind: str = "kubernetes") -> JobRef:
    return JobRef("node-1:9100", "llm", "low", kind, pod_id)


def slurm(job_id: str = "4242") -> JobRef:
    return JobRef("node-1:9100", "sweep", "low", "slurm", job_id)


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class FakeApi:
    """The eviction endpoint of a Kubernetes API server; records each request."""

    answer: Callable[[], tuple[int, Any]] = lambda: (201, status_body(201, "", ""))
    seen: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    url: str = ""


@contextmanager
def api_server(api: FakeApi, tls: Path | None = None) -> Iterator[FakeApi]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            api.seen.append((self.command, self.path, headers, json.loads(raw)))
            status, body = api.answer()
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve_loopback(Handler, tls=tls) as (_, url):
        api.url = url
        yield api


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "sa-token"
    path.write_text("sa-token-1\n")
    return path


# ------------------------------------------------------------------------------ Kubernetes
@pytest.mark.parametrize("code", [200, 201])
def test_an_eviction_posts_a_policy_v1_eviction_with_the_token_and_is_requested(
    token: Path, code: int
) -> None:
    with api_server(FakeApi(lambda: (code, status_body(code, "", "")))) as api:
        k8s = KubernetesScheduler(api.url, token_file=str(token), ca_file=None)
        got = k8s.move(pod("training/llm-7b-0"))
    assert got == MoveResult("requested", "eviction of pod training/llm-7b-0 requested")
    [(method, path, headers, body)] = api.seen
    assert (method, path) == ("POST", "/api/v1/namespaces/training/pods/llm-7b-0/eviction")
    assert headers["authorization"] == "Bearer sa-token-1"
    assert headers["content-type"] == "application/json"
    assert body == {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "llm-7b-0", "namespace": "training"},
    }


def test_a_pod_disruption_budget_refusal_is_refused_with_the_apis_message(token: Path) -> None:
    refusal = status_body(429, "TooManyRequests", PDB_MESSAGE)
    with api_server(FakeApi(lambda: (429, refusal))) as api:
        got = KubernetesScheduler(api.url, token_file=str(token), ca_file=None).move(pod())
    assert got == MoveResult(
        "refused",
        f"eviction of pod training/llm-7b-0 refused (PodDisruptionBudget): {PDB_MESSAGE}",
    )


def test_an_eviction_of_a_pod_that_is_gone_failed(token: Path) -> None:
    gone = status_body(404, "NotFound", 'pods "llm-7b-0" not found')
    with api_server(FakeApi(lambda: (404, gone))) as api:
        got = KubernetesScheduler(api.url, token_file=str(token), ca_file=None).move(pod())
    assert got == MoveResult("failed", 'pod training/llm-7b-0 gone: pods "llm-7b-0" not found')


@pytest.mark.parametrize(
    ("code", "body", "said"),
    [
        (500, status_body(500, "InternalError", "This pod has more than one PodDisruptionBudget"),
         "500 This pod has more than one PodDisruptionBudget"),
        (403, status_body(403, "Forbidden", 'cannot create resource "pods/eviction"'),
         '403 cannot create resource "pods/eviction"'),
        (502, b"bad\ngateway", "502 bad gateway"),
    ],
)  # fmt: skip
def test_any_other_answer_failed_with_its_status_and_message(
    token: Path, code: int, body: Any, said: str
) -> None:
    with api_server(FakeApi(lambda: (code, body))) as api:
        got = KubernetesScheduler(api.url, token_file=str(token), ca_file=None).move(pod())
    assert got == MoveResult("failed", f"eviction of pod training/llm-7b-0: {said}")


def test_an_unreachable_api_failed_and_names_it(token: Path) -> None:
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"
        got = KubernetesScheduler(url, token_file=str(token), ca_file=None).move(pod())
    assert got.result == "failed"
    assert got.message.startswith(f"cannot reach the Kubernetes API at {url}: ")
    assert "Connection refused" in got.message


def test_the_token_is_read_again_at_each_move(token: Path) -> None:
    with api_server(FakeApi()) as api:
        k8s = KubernetesScheduler(api.url, token_file=str(token), ca_file=None)
        k8s.move(pod())
        token.write_text("sa-token-2")  # the kubelet rotated it
        k8s.move(pod())
        token.unlink()
        lost = k8s.move(pod())
    assert [s[2]["authorization"] for s in api.seen] == ["Bearer sa-token-1", "Bearer sa-token-2"]
    assert lost.result == "failed" and lost.message.startswith(f"cannot read {token}: ")


@pytest.mark.parametrize(
    ("pod_id", "message"),
    [
        ("training", "'training' is not NAMESPACE/POD"),
        ("Training/llm", "'Training/llm' is not NAMESPACE/POD"),
        ("a" * 64 + "/llm", "is not NAMESPACE/POD"),
        ("training/", "pod name '' is not valid"),
        ("training/llm_0", "pod name 'llm_0' is not valid"),
        ("training/llm/0", "pod name 'llm/0' is not valid"),
        ("training/-llm", "pod name '-llm' is not valid"),
        ("training/../../nodes", "pod name '../../nodes' is not valid"),
        ("training/" + "a" * 254, "is not valid"),
    ],
)
def test_a_malformed_pod_id_failed_without_calling_the_api(
    token: Path, pod_id: str, message: str
) -> None:
    with api_server(FakeApi()) as api:
        got = KubernetesScheduler(api.url, token_file=str(token), ca_file=None).move(pod(pod_id))
    assert got.result == "failed" and message in got.message
    assert api.seen == []


def test_a_long_dotted_pod_name_is_valid(token: Path) -> None:
    name = ".".join(["a" * 63] * 3)  # 191 characters: a DNS-1123 subdomain
    with api_server(FakeApi()) as api:
        got = KubernetesScheduler(api.url, token_file=str(token), ca_file=None).move(
            pod(f"ns-1/{name}")
        )
    assert got.result == "requested"
    assert api.seen[0][3]["metadata"] == {"name": name, "namespace": "ns-1"}


def test_a_job_of_another_scheduler_failed_without_calling_anything(token: Path) -> None:
    with api_server(FakeApi()) as api:
        got = KubernetesScheduler(api.url, token_file=str(token), ca_file=None).move(slurm())
    assert got == MoveResult("failed", "job 'sweep' is scheduled by 'slurm', not kubernetes")
    assert api.seen == []


def test_in_cluster_evicts_over_tls_with_the_service_account(
    tmp_path: Path,
    pki: Path,
) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("in-cluster-token")
    shutil.copy(pki / "ca.crt", sa / "ca.crt")
    with api_server(FakeApi(), tls=pki) as api:
        port = api.url.rsplit(":", 1)[1]
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        k8s = KubernetesScheduler.in_cluster(env, service_account_dir=str(sa))
        got = k8s.move(pod())
    assert k8s.api_url == f"https://127.0.0.1:{port}"
    assert got.result == "requested"
    assert api.seen[0][2]["authorization"] == "Bearer in-cluster-token"


def test_in_cluster_brackets_an_ipv6_service_host(
    tmp_path: Path,
    pki: Path,
) -> None:
    (tmp_path / "token").write_text("t")
    shutil.copy(pki / "ca.crt", tmp_path / "ca.crt")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    k8s = KubernetesScheduler.in_cluster(env, service_account_dir=str(tmp_path))
    assert k8s.api_url == "https://[fd00::1]:443"


@pytest.mark.parametrize(
    ("env", "files", "message"),
    [
        ({}, ("token", "ca.crt"), r"\$KUBERNETES_SERVICE_HOST is not set"),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, ("token", "ca.crt"),
         r"\$KUBERNETES_SERVICE_PORT is not set"),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}, ("ca.crt",),
         r"token is missing \(is a service account mounted\?\)"),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}, ("token",),
         r"ca\.crt is missing"),
    ],
)  # fmt: skip
def test_in_cluster_outside_a_pod_is_a_config_error_naming_what_is_missing(
    tmp_path: Path, env: dict[str, str], files: tuple[str, ...], message: str
) -> None:
    for name in files:
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match=message):
        KubernetesScheduler.in_cluster(env, service_account_dir=str(tmp_path))


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_outside_the_cluster_the_api_url_token_and_ca_given_are_used(
    tmp_path: Path, pki: Path, scheme: str
) -> None:
    # no pod, no service account: the controller on a host of its own, given the API server
    token_file = tmp_path / "kube-token"
    token_file.write_text("host-token\n")
    with api_server(FakeApi(), tls=pki if scheme == "https" else None) as api:
        k8s = scheduler_for(
            "kubernetes",
            kubernetes_api=api.url,
            kubernetes_token_file=str(token_file),
            kubernetes_ca_file=str(pki / "ca.crt") if scheme == "https" else None,
        )
        assert isinstance(k8s, KubernetesScheduler) and k8s.api_url == api.url
        got = k8s.move(pod())
    assert got.result == "requested", got
    assert api.seen[0][2]["authorization"] == "Bearer host-token"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--kubernetes-token-file .*: cannot read"),
        ("\n", "the file is empty"),
        ("\udcff", "not UTF-8 text"),
    ],
)
def test_an_unreadable_or_empty_kubernetes_token_file_is_a_config_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    token_file = tmp_path / "kube-token"
    if content is not None:
        token_file.write_bytes(content.encode("utf-8", "surrogateescape"))  # \udcff: byte 0xff
    with pytest.raises(ConfigError, match=message):
        scheduler_for(
            "kubernetes",
            kubernetes_api="https://127.0.0.1:6443",
            kubernetes_token_file=str(token_file),
        )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:6443", "must be http"),
        ("ftp://127.0.0.1", "must be http"),
        ("https://127.0.0.1:99999", "has a bad port"),
    ],
)
def test_a_bad_api_url_is_a_config_error(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KubernetesScheduler(url, token_file=None, ca_file=None)


# ----------------------------------------------------------------------------------- Slurm
@dataclass
class FakeScontrol:
    bin: Path
    record: Path

    def calls(self) -> list[list[str]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture
def scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeScontrol]:
    """A fake ``scontrol`` first on PATH: records its argv (a JSON line each call), prints
    ``stderr`` to stderr and exits ``code``."""

    def make(code: int = 0, stderr: str = "", stdout: str = "", hang: bool = False) -> FakeScontrol:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        record = tmp_path / "scontrol-calls.jsonl"
        script = bin_dir / "scontrol"
        script.write_text(
            "#!/usr/bin/env python3\n"
            "import json, sys, time\n"
            f"with open({str(record)!r}, 'a') as f:\n"
            "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
            f"sys.stdout.write({stdout!r})\n"
            f"sys.stderr.write({stderr!r})\n"
            f"if {hang!r}:\n"
            "    time.sleep(60)\n"
            f"sys.exit({code})\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        return FakeScontrol(bin_dir, record)

    return make


@pytest.mark.parametrize("job_id", ["4242", "4242_7"])
def test_a_slurm_job_is_requeued_with_scontrol(
    scontrol: Callable[..., FakeScontrol], job_id: str
) -> None:
    fake = scontrol(code=0)
    got = SlurmScheduler().move(slurm(job_id))
    assert got == MoveResult("requested", f"slurm job {job_id} requeued")
    assert fake.calls() == [["requeue", job_id]]


def test_a_failed_requeue_says_the_first_line_of_scontrols_stderr(
    scontrol: Callable[..., FakeScontrol],
) -> None:
    said = "\nslurm_requeue error: Requested operation is presently disabled\nmore detail\n"
    fake = scontrol(code=1, stderr=said)
    got = SlurmScheduler().move(slurm("4242"))
    assert got == MoveResult(
        "failed",
        "scontrol requeue 4242 exited 1: "
        "slurm_requeue error: Requested operation is presently disabled",
    )
    assert fake.calls() == [["requeue", "4242"]]


def test_a_failed_requeue_without_stderr_says_its_stdout(
    scontrol: Callable[..., FakeScontrol],
) -> None:
    scontrol(code=2, stdout="Invalid job id specified\n")
    got = SlurmScheduler().move(slurm("4242"))
    assert got.message == "scontrol requeue 4242 exited 2: Invalid job id specified"


def test_a_missing_scontrol_failed_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    got = SlurmScheduler().move(slurm())
    assert got == MoveResult("failed", "scontrol not found: is Slurm's scontrol on PATH?")
    other = SlurmScheduler(str(tmp_path / "slurm" / "bin" / "scontrol")).move(slurm())
    assert other.result == "failed" and other.message.startswith(f"{tmp_path}/slurm/bin/scontrol")


def test_a_hung_scontrol_failed_after_its_timeout(scontrol: Callable[..., FakeScontrol]) -> None:
    fake = scontrol(hang=True)
    got = SlurmScheduler(timeout_s=1.0).move(slurm("4242"))
    assert got == MoveResult("failed", "scontrol requeue 4242 timed out after 1 s")
    assert fake.calls() == [["requeue", "4242"]]


def test_a_job_of_another_scheduler_is_not_requeued(scontrol: Callable[..., FakeScontrol]) -> None:
    fake = scontrol()
    got = SlurmScheduler().move(pod())
    assert got == MoveResult("failed", "job 'llm' is scheduled by 'kubernetes', not slurm")
    assert fake.calls() == []


def is_slurm_id(text: str) -> bool:
    """The oracle: digits, or digits_digits (ASCII, at most 19 digits a part)."""
    parts = text.split("_")
    return 1 <= len(parts) <= 2 and all(p.isascii() and p.isdigit() and len(p) <= 19 for p in parts)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    job_id=st.one_of(
        st.text(max_size=12),
        st.from_regex(r"\A[0-9]{1,6}(_[0-9]{1,4})?\Z"),
        st.sampled_from(["42; rm -rf /", "$(id)", "-h", "42 43", "42\n", "٤٢", "0x2a"]),
    )
)
def test_scontrol_is_called_with_exactly_a_well_formed_job_id_and_never_otherwise(
    tmp_path: Path, job_id: str
) -> None:
    here = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example: tmp_path is shared
    record, script = here / "calls.jsonl", here / "scontrol"
    script.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)
    got = SlurmScheduler(str(script)).move(slurm(job_id))
    calls = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    if is_slurm_id(job_id):
        assert (got.result, calls) == ("requested", [["requeue", job_id]])
    else:
        assert (got.result, calls) == ("failed", [])
        assert got.message == f"job 'sweep': {job_id!r} is not a Slurm job id"


# ------------------------------------------------------------------------------- helpers
def test_a_job_record_with_a_scheduler_becomes_a_job_ref() -> None:
    record = {"name": "llm", "priority": "low", "scheduler": {"kind": "slurm", "id": "42"}}
    assert JobRef.from_record("n:1", record) == JobRef("n:1", "llm", "low", "slurm", "42")
    assert JobRef.from_record("n:1", {"name": "llm", "scheduler": None}) is None
    assert JobRef.from_record("n:1", {"name": "llm"}) is None
    assert JobRef.from_record("n:1", {"name": 5, "scheduler": {"kind": "slurm", "id": "4"}}) is None
    defaulted = JobRef.from_record("n:1", {"name": "x", "scheduler": {"kind": "slurm", "id": "4"}})
    assert defaulted is not None and defaulted.priority == "normal"


def test_scheduler_for_each_flag_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert scheduler_for("none") is None
    assert isinstance(scheduler_for("slurm"), SlurmScheduler)
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST is not set"):
        scheduler_for("kubernetes")
    with pytest.raises(ConfigError, match="--scheduler must be none, kubernetes or slurm"):
        scheduler_for("yarn")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_non_positive_timeout_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="timeout must be above 0"):
        SlurmScheduler(timeout_s=bad)
    with pytest.raises(ConfigError, match="timeout must be above 0"):
        KubernetesScheduler("http://127.0.0.1:1", token_file=None, ca_file=None, timeout_s=bad)
