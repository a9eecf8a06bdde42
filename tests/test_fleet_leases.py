"""Lease pushes to node agents: tokens, answers mapped to results, timeouts, TLS, bounded fan-out.

The agent is a loopback fake (a threaded HTTP server) that answers as the agent's lease routes do
and records what it was sent; its error shapes are the agent's (``{"error": message}``).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import refused_port, serve_loopback
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattwarden.config import ConfigError
from wattwarden.fleet.leases import (
    JOBS_PATH,
    LEASE_PATH,
    AgentCredentials,
    AgentLink,
    AgentUnreachable,
    Lease,
    PushResult,
    push_all,
)

TOKEN = "t0ken-for-agent"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    client_port: int


Answer = Callable[[Seen], tuple[int, Any]]


def lease_record(seen: Seen) -> tuple[int, Any]:
    """The agent's 200: the lease record; ``expires_at`` echoes the budget so order shows."""
    body = seen.body
    if seen.method == "GET":
        return 200, {"lease": None, "local_power_budget_watts": 2400.0}
    if seen.method == "DELETE":
        return 200, {"lease": None, "local_power_budget_watts": 2400.0}
    return 200, {
        **body,
        "expires_at": float(body["power_budget_watts"]),
        "remaining_s": body["ttl_s"],
    }


@dataclass
class FakeAgent:
    """A loopback HTTP server answering like an agent; records requests and concurrency."""

    answer: Answer = lease_record
    gate: int = 0
    """Hold the first requests until this many are in flight at once (0: no gate)."""
    close_after_answer: bool = False
    """Close each connection after answering, without saying so (an idle timeout's effect)."""
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadingHTTPServer | None = None

    @property
    def instance(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def connections(self) -> int:
        return len({s.client_port for s in self.seen})

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        seen = Seen(
            handler.command,
            handler.path,
            {k.lower(): v for k, v in handler.headers.items()},
            json.loads(raw) if raw else None,
            handler.client_address[1],
        )
        with self.cond:
            self.seen.append(seen)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.max_in_flight >= self.gate, timeout=30)
        try:
            status, body = self.answer(seen)
            data = json.dumps(body).encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            if self.close_after_answer:
                handler.close_connection = True
        finally:
            with self.cond:
                self.in_flight -= 1


@contextmanager
def serving(agent: FakeAgent, tls: Path | None = None) -> Iterator[FakeAgent]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            agent.handle(self)

        do_POST = do_DELETE = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    # a burst of connections is queued, not dropped to a SYN retry
    with serve_loopback(Handler, tls=tls, backlog=1024) as (server, _):
        agent.server = server
        yield agent


@contextmanager
def linked(**kwargs: Any) -> Iterator[AgentLink]:
    kwargs.setdefault("timeout_s", 5.0)
    link = AgentLink(kwargs.pop("credentials", AgentCredentials(shared=TOKEN)), **kwargs)
    try:
        yield link
    finally:
        link.close()


def lease(instance: str, budget_w: float = 2400.0, **kw: Any) -> Lease:
    return Lease(instance, budget_w, kw.get("ttl_s", 30.0), kw.get("controller", "ctl-a"), 7)


# ------------------------------------------------------------------------------ answers
def test_ok_push_sends_the_lease_body_with_the_bearer_token_and_returns_expires_at() -> None:
    with serving(FakeAgent()) as agent, linked() as link:
        result = link.push(lease(agent.instance, 1234.5))
    assert result == PushResult(agent.instance, "ok", 200, "", 1234.5)
    [seen] = agent.seen
    assert (seen.method, seen.path) == ("POST", LEASE_PATH)
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.body == {
        "power_budget_watts": 1234.5,
        "ttl_s": 30,
        "holder": "ctl-a",
        "generation": 7,
    }
    assert isinstance(seen.body["ttl_s"], int)


def test_a_fractional_ttl_is_sent_as_a_number() -> None:
    assert Lease("h:1", 100.0, 2.5, "c", 0).to_json()["ttl_s"] == 2.5


HELD = "lease held by controller 'ctl-b' (generation 3) for another 12.3 s"


@pytest.mark.parametrize(
    ("status", "result", "error"),
    [
        (409, "conflict", HELD),
        (409, "conflict", "stale generation"),
        (401, "unauthorized", "missing or wrong bearer token"),
        (403, "unauthorized", "forbidden"),
        (400, "rejected", "field 'ttl_s' must be within 1..3600, got 0"),
        (404, "rejected", "no policy engine"),
        (422, "rejected", "field 'power_budget_watts' must be above 0"),
        (500, "rejected", "internal error; see agent log"),
    ],
)
def test_each_agent_status_maps_to_its_result_with_the_agents_message(
    status: int, result: str, error: str
) -> None:
    with serving(FakeAgent(lambda s: (status, {"error": error}))) as agent, linked() as link:
        got = link.push(lease(agent.instance))
    assert got == PushResult(agent.instance, result, status, error, None)


def test_a_multi_line_error_becomes_one_line() -> None:
    text = "first line\n  second\tline " + "x" * 300
    with serving(FakeAgent(lambda s: (409, {"error": text}))) as agent, linked() as link:
        got = link.push(lease(agent.instance))
    assert "\n" not in got.message and got.message.startswith("first line second line x")
    assert len(got.message) == 200 and got.message.endswith("...")


def test_ok_without_expires_at_says_so_and_has_no_expiry() -> None:
    with serving(FakeAgent(lambda s: (200, {"power_budget_watts": 1}))) as agent, linked() as link:
        got = link.push(lease(agent.instance))
    assert (got.result, got.expires_at) == ("ok", None)
    assert got.message == "answer has no numeric expires_at"


def test_a_push_without_a_token_is_unauthorized_and_never_sent(tmp_path: Path) -> None:
    (tmp_path / "10.0.0.1:9100").write_text(TOKEN)
    creds = AgentCredentials.load(str(tmp_path), None)
    with serving(FakeAgent()) as agent, linked(credentials=creds) as link:
        got = link.push(lease(agent.instance))
    assert got == PushResult(agent.instance, "unauthorized", None, "no token for this agent", None)
    assert agent.seen == []


# --------------------------------------------------------------------------- no answer
def test_a_refused_connection_is_unreachable() -> None:
    with refused_port() as port, linked() as link:
        got = link.push(lease(f"127.0.0.1:{port}"))
    assert got == PushResult(f"127.0.0.1:{port}", "unreachable", None, "connection refused", None)


def test_a_listener_that_never_answers_is_unreachable_after_the_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the handshake; nobody ever reads
        instance = f"127.0.0.1:{listener.getsockname()[1]}"
        with linked(timeout_s=0.3) as link:
            start = time.monotonic()
            got = link.push(lease(instance))
            waited = time.monotonic() - start
    assert got == PushResult(instance, "unreachable", None, "timed out", None)
    assert waited >= 0.3  # it did wait for the answer, as long as the timeout says


def test_an_agent_that_trickles_its_answer_is_cut_at_the_deadline() -> None:
    """A byte every 20 ms keeps each read alive; the whole answer still has one deadline."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"X-Pad: " + b"a" * 100
    answer += b"\r\nContent-Length: 2\r\n\r\n{}"
    stop = threading.Event()

    def trickle(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in answer:  # 2.5 s in all: longer than the 0.5 s timeout
                if stop.wait(0.02):  # pacing the fake's answer, not synchronisation
                    return
                conn.sendall(bytes([byte]))

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        thread = threading.Thread(target=trickle, args=(listener,), daemon=True)
        thread.start()
        with linked(timeout_s=0.5) as link:
            got = link.push(lease(f"127.0.0.1:{listener.getsockname()[1]}"))
        stop.set()
        thread.join(timeout=10)
    assert (got.result, got.message) == ("unreachable", "timed out")


def test_a_connection_reset_before_any_answer_is_unreachable() -> None:
    def close_at_once(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        thread = threading.Thread(target=close_at_once, args=(listener,), daemon=True)
        thread.start()
        with linked() as link:
            got = link.push(lease(f"127.0.0.1:{listener.getsockname()[1]}"))
        thread.join(timeout=10)
    assert (got.result, got.status, got.message) == ("unreachable", None, "connection reset")


@pytest.mark.parametrize(
    "instance", ["no-port-here", "h:9100\n", "h:\u0664\u0662", "h:0", "h:65536", "h :1", ":1"]
)
def test_an_instance_that_is_not_host_port_is_unreachable_and_says_why(instance: str) -> None:
    with linked() as link:
        got = link.push(lease(instance))
    assert (got.result, got.message) == ("unreachable", f"instance {instance!r} is not HOST:PORT")


# ------------------------------------------------------------------------- connections
def test_pushes_to_one_agent_reuse_one_kept_alive_connection() -> None:
    with serving(FakeAgent()) as agent, linked() as link:
        results = [link.push(lease(agent.instance, w)) for w in (100.0, 200.0, 300.0)]
    assert [r.result for r in results] == ["ok"] * 3
    assert agent.connections() == 1


def test_without_keep_alive_each_push_opens_its_own_connection() -> None:
    with serving(FakeAgent()) as agent, linked(keep_alive=False) as link:
        results = [link.push(lease(agent.instance, w)) for w in (100.0, 200.0, 300.0)]
    assert [r.result for r in results] == ["ok"] * 3
    assert agent.connections() == 3
    assert {s.headers["connection"] for s in agent.seen} == {"close"}


def test_a_kept_alive_connection_the_agent_closed_is_replaced_and_the_push_sent_once() -> None:
    with serving(FakeAgent(close_after_answer=True)) as agent, linked() as link:
        first = link.push(lease(agent.instance, 100.0))
        second = link.push(lease(agent.instance, 200.0))
    assert (first.result, second.result, second.expires_at) == ("ok", "ok", 200.0)
    assert [s.body["power_budget_watts"] for s in agent.seen] == [100.0, 200.0]
    assert agent.connections() == 2


# ------------------------------------------------------------------------ TLS and auth
def test_over_tls_with_the_ca_pushes_carry_the_token_and_reads_carry_basic_auth(
    pki: Path,
) -> None:
    basic = "Basic " + base64.b64encode(b"controller:pa55").decode()
    with (
        serving(FakeAgent(), tls=pki) as agent,
        linked(
            scheme="https", ca_file=str(pki / "ca.crt"), basic_auth=("controller", "pa55")
        ) as link,
    ):
        pushed = link.push(lease(agent.instance, 500.0))
        held = link.read_lease(agent.instance)
    assert (pushed.result, pushed.expires_at, held) == ("ok", 500.0, None)
    post, get = agent.seen
    assert post.headers["authorization"] == f"Bearer {TOKEN}"
    assert get.headers["authorization"] == basic


def test_tls_to_an_agent_whose_certificate_the_ca_does_not_sign_is_unreachable(
    pki: Path,
    tmp_path: Path,
) -> None:
    other_ca = tmp_path / "other.crt"  # the server's own certificate is no CA of the chain
    other_ca.write_bytes((pki / "server.crt").read_bytes())
    with (
        serving(FakeAgent(), tls=pki) as agent,
        linked(scheme="https", ca_file=str(other_ca)) as link,
    ):
        got = link.push(lease(agent.instance))
    assert (got.result, got.status) == ("unreachable", None)
    assert got.message.startswith("TLS: ") and "CERTIFICATE_VERIFY_FAILED" in got.message
    assert agent.seen == []


def test_a_bad_scheme_ca_file_or_timeout_is_a_config_error(tmp_path: Path) -> None:
    creds = AgentCredentials()
    with pytest.raises(ConfigError, match="scheme must be http or https, got 'ftp'"):
        AgentLink(creds, scheme="ftp")
    with pytest.raises(ConfigError, match=r"agent CA file .*missing\.crt: cannot load it"):
        AgentLink(creds, scheme="https", ca_file=str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match="CA file needs the https scheme"):
        AgentLink(creds, ca_file=str(tmp_path / "x.crt"))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--timeout-s must be above 0"):
            AgentLink(creds, timeout_s=bad)


# ------------------------------------------------------------------------------- reads
def test_read_lease_returns_the_record_the_agent_holds() -> None:
    record = {"power_budget_watts": 900.0, "holder": "ctl-a", "generation": 7}
    answer = {"lease": record, "local_power_budget_watts": None}
    with serving(FakeAgent(lambda s: (200, answer))) as agent, linked() as link:
        assert link.read_lease(agent.instance) == record
    assert (agent.seen[0].method, agent.seen[0].path) == ("GET", LEASE_PATH)
    assert "authorization" not in agent.seen[0].headers  # no basic auth configured, no token


def test_read_lease_is_none_when_the_agent_runs_no_policy_engine() -> None:
    no_engine = FakeAgent(lambda s: (404, {"error": "no policy engine"}))
    with serving(no_engine) as agent, linked() as link:
        assert link.read_lease(agent.instance) is None


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (401, {"error": "basic auth required"}, "answered 401: basic auth required"),
        (200, {"nope": 1}, 'answer has no "lease" field'),
        (200, {"lease": 5}, '"lease" is neither an object nor null'),
    ],
)
def test_read_lease_raises_agent_unreachable_on_an_unusable_answer(
    status: int, body: Any, message: str
) -> None:
    with (
        serving(FakeAgent(lambda s: (status, body))) as agent,
        linked() as link,
        pytest.raises(AgentUnreachable, match=message) as info,
    ):
        link.read_lease(agent.instance)
    assert info.value.status == status and info.value.instance == agent.instance


def test_read_lease_of_an_agent_that_is_down_raises_agent_unreachable() -> None:
    with (
        refused_port() as port,
        linked() as link,
        pytest.raises(AgentUnreachable, match="connection refused") as info,
    ):
        link.read_lease(f"127.0.0.1:{port}")
    assert info.value.status is None


def test_jobs_lists_the_agents_job_records() -> None:
    jobs = [{"name": "train", "priority": "high", "scheduler": {"kind": "slurm", "id": "42"}}]
    with serving(FakeAgent(lambda s: (200, {"jobs": jobs}))) as agent, linked() as link:
        assert link.jobs(agent.instance) == jobs
        agent.answer = lambda s: (200, {"jobs": [1]})
        with pytest.raises(AgentUnreachable, match='no "jobs" list of objects'):
            link.jobs(agent.instance)
    assert agent.seen[0].path == JOBS_PATH


def test_release_deletes_the_lease_as_its_controller() -> None:
    with serving(FakeAgent()) as agent, linked() as link:
        got = link.release(agent.instance, "ctl-a")
        agent.answer = lambda s: (409, {"error": "lease held by controller 'ctl-b'"})
        refused = link.release(agent.instance, "ctl-a")
    assert got == PushResult(agent.instance, "ok", 200, "", None)
    assert (refused.result, refused.message) == ("conflict", "lease held by controller 'ctl-b'")
    assert [(s.method, s.path, s.body) for s in agent.seen] == [
        ("DELETE", LEASE_PATH, {"holder": "ctl-a"})
    ] * 2
    assert agent.seen[0].headers["authorization"] == f"Bearer {TOKEN}"


# ------------------------------------------------------------------------------ tokens
def test_a_token_dir_gives_each_agent_its_file_stripped(tmp_path: Path) -> None:
    (tmp_path / "node-1:9100").write_text("  one\n")
    (tmp_path / "10.0.0.2:9100").write_text("two")
    (tmp_path / "[fd00::3]:9100").write_text("three\n")
    creds = AgentCredentials.load(str(tmp_path), None)
    assert creds.token_for("node-1:9100") == "one"
    assert creds.token_for("10.0.0.2:9100") == "two"
    assert creds.token_for("[fd00::3]:9100") == "three"
    assert creds.token_for("node-4:9100") is None
    assert len(creds) == 3


def test_a_kubernetes_secret_volume_works_with_host_port_keys(tmp_path: Path) -> None:
    """A Secret volume: keys are links into ``..data``, a link to a timestamped directory; a
    Secret's key cannot hold ``:``, so ``node-1_9100`` names ``node-1:9100``."""
    stamp = tmp_path / "..2024_01_01_00_00_00.000000001"
    stamp.mkdir()
    (stamp / "node-1_9100").write_text("one\n")
    (stamp / "node-2:9100").write_text("two\n")
    (tmp_path / "..data").symlink_to(stamp.name)
    for key in ("node-1_9100", "node-2:9100"):
        (tmp_path / key).symlink_to(Path("..data") / key)
    creds = AgentCredentials.load(str(tmp_path), None)
    assert (creds.token_for("node-1:9100"), creds.token_for("node-2:9100")) == ("one", "two")
    assert len(creds) == 2


def test_a_shared_token_file_serves_every_agent(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\tshared\n\n")
    creds = AgentCredentials.load(None, str(tmp_path / "token"))
    assert creds.token_for("a:1") == creds.token_for("b:2") == "shared"


def test_no_token_flags_means_no_tokens() -> None:
    assert AgentCredentials.load(None, None).token_for("a:1") is None


def test_the_repr_of_credentials_and_link_never_shows_a_token(tmp_path: Path) -> None:
    (tmp_path / "a:1").write_text("sekrit-one")
    creds = AgentCredentials.load(str(tmp_path), None)
    text = repr(creds) + repr(AgentLink(creds)) + repr(AgentCredentials(shared="sekrit-two"))
    assert "sekrit" not in text and "1 agents" in text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "a:1").write_text(" \n"), r"--token-dir: token file .*a:1 is empty"),
        (lambda d: (d / "a:1").write_bytes(b"\xff\xfe"), r"cannot read token file .*a:1"),
        (lambda d: (d / "a:1").symlink_to(d / "gone"), r"cannot read token file .*a:1: No such"),
        (lambda d: (d / "a:1").write_text("two words"), r"a:1 holds more than one printable word"),
        (lambda d: (d / "README").write_text("x"), r"file 'README' is not named HOST:PORT"),
        (lambda d: (d / "a:99999").write_text("x"), r"file 'a:99999' is not named HOST:PORT"),
        (
            lambda d: ((d / "a:1").write_text("x"), (d / "a_1").write_text("y")),
            r"files 'a:1' and 'a_1' give a:1 different tokens",
        ),
    ],
)
def test_a_bad_token_dir_is_a_config_error_naming_the_file(
    tmp_path: Path, setup: Callable[[Path], object], message: str
) -> None:
    setup(tmp_path)
    with pytest.raises(ConfigError, match=message):
        AgentCredentials.load(str(tmp_path), None)


def test_a_missing_token_dir_or_file_or_both_flags_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--token-dir .*nope: cannot list it"):
        AgentCredentials.load(str(tmp_path / "nope"), None)
    with pytest.raises(ConfigError, match=r"--token-file: cannot read token file .*nope"):
        AgentCredentials.load(None, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="--token-dir and --token-file exclude each other"):
        AgentCredentials.load(str(tmp_path), str(tmp_path / "t"))
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"--token-file: token file .*empty is empty"):
        AgentCredentials.load(None, str(empty))


# ----------------------------------------------------------------------------- fan-out
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(agents=st.integers(1, 40), concurrency=st.integers(1, 24))
def test_push_all_keeps_input_order_and_never_exceeds_its_concurrency(
    agents: int, concurrency: int
) -> None:
    """The fake holds the first requests until ``min(concurrency, agents)`` are in flight at
    once: the peak is exactly that, so the fan-out is both parallel and bounded."""
    bound = min(concurrency, agents)
    with serving(FakeAgent(gate=bound)) as agent, linked(timeout_s=60.0) as link:
        leases = [lease(agent.instance, 100.0 + i) for i in range(agents)]
        results = push_all(link, leases, concurrency=concurrency)
    assert [r.expires_at for r in results] == [x.budget_w for x in leases]
    assert {r.result for r in results} == {"ok"}
    assert agent.max_in_flight == bound


def test_push_all_returns_each_agents_failure_as_its_result() -> None:
    class Buggy(AgentLink):
        def push(self, lease: Lease) -> PushResult:
            if lease.budget_w == 2.0:
                raise KeyError("bug")
            return super().push(lease)

    def conflict_at_3(seen: Seen) -> tuple[int, Any]:
        if seen.body["power_budget_watts"] == 3.0:
            return 409, {"error": "held"}
        return lease_record(seen)

    with refused_port() as port, serving(FakeAgent(conflict_at_3)) as agent:
        link = Buggy(AgentCredentials(shared=TOKEN), timeout_s=5.0)
        leases = [
            lease(agent.instance, 1.0),
            lease(agent.instance, 2.0),
            lease(f"127.0.0.1:{port}", 3.5),
            lease(agent.instance, 3.0),
        ]
        try:
            results = push_all(link, leases, concurrency=4)
        finally:
            link.close()
    assert [(r.instance, r.result) for r in results] == [
        (agent.instance, "ok"),
        (agent.instance, "unreachable"),
        (f"127.0.0.1:{port}", "unreachable"),
        (agent.instance, "conflict"),
    ]
    assert results[1].message == "internal error: KeyError: 'bug'"
    assert results[2].message == "connection refused"


@pytest.mark.parametrize("concurrency", [0, -1, 1025])
def test_push_all_refuses_a_concurrency_outside_1_to_1024(concurrency: int) -> None:
    with linked() as link, pytest.raises(ValueError, match=r"within 1\.\.1024"):
        push_all(link, [lease("a:1")], concurrency=concurrency)


def test_push_all_of_nothing_is_nothing() -> None:
    with linked() as link:
        assert push_all(link, []) == []


def test_push_all_with_concurrency_1_runs_one_at_a_time() -> None:
    with serving(FakeAgent()) as agent, linked() as link:
        results = push_all(link, [lease(agent.instance, w) for w in (1.0, 2.0, 3.0)], concurrency=1)
    assert [r.expires_at for r in results] == [1.0, 2.0, 3.0]
    assert agent.max_in_flight == 1


def test_close_drops_the_kept_alive_connections() -> None:
    with serving(FakeAgent()) as agent, linked() as link:
        assert link.push(lease(agent.instance)).result == "ok"
        link.close()
        assert link.push(lease(agent.instance)).result == "ok"
    assert agent.connections() == 2
