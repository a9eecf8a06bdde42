"""The agent's HTTP server under hostile clients: strict parsing, deadlines, a connection cap.

Runs the real agent in-process on a simulated fleet, plus a second server over the same agent with
small limits (a tight deadline and connection cap) so the limits are reached in a test's time.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import http_get, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattwarden.agent import Agent
from wattwarden.api.http import HttpLimits
from wattwarden.api.server import ApiServer
from wattwarden.config import AgentConfig
from wattwarden.hardware.sim.fake_nvml import uninstall_fake_nvml

DEADLINE_S = 1.0
CAP = 8


class Served:
    """The agent, its token, and the ports of its own server and of the tight one."""

    def __init__(self, agent: Agent, tight: ApiServer) -> None:
        self.agent = agent
        self.token = agent.context.token
        self.port = agent.server.address[1]
        self.tight_port = tight.address[1]
        self.url = f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("http") / "state"
    agent = Agent(AgentConfig(listen="127.0.0.1:0", state_dir=state, sim=2))
    limits = HttpLimits(max_connections=CAP, request_deadline_s=DEADLINE_S, keep_alive_s=30.0)
    tight = ApiServer("127.0.0.1", 0, limits=limits)
    try:
        agent.start()
        tight.start(agent.context)
        yield Served(agent, tight)
    finally:
        tight.close()
        agent.close()
        uninstall_fake_nvml()


def connect(port: int, timeout_s: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout_s)


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks), time.monotonic() - start


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def request(
    port: int, method: str, path: str, body: Any = None, *, token: str | None = None,
    raw_body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw_body if raw_body is not None else (None if body is None else json.dumps(body))
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(s: Served, path: str, raw_body: bytes) -> tuple[int, Any]:
    status, _, body = request(s.port, "POST", path, token=s.token, raw_body=raw_body)
    return status, json.loads(body)


def job_names(s: Served) -> list[str]:
    status, _, body = request(s.port, "GET", "/api/v1/jobs")
    assert status == 200
    return [j["name"] for j in json.loads(body)["jobs"]]


# ------------------------------------------------------------------ parsing


def test_smuggled_request_in_the_unread_body_of_a_401_is_not_executed(served: Served) -> None:
    smuggled = json.dumps({"name": "smuggled", "pid": 4242, "gpu": 0}).encode()
    inner = (
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + served.token.encode() + b"\r\n"
        b"Content-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled
    )
    outer = (
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(inner)).encode() + b"\r\n\r\n" + inner
    )
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with connect(served.port) as sock:
        sock.sendall(outer + last)
        raw, _ = read_until_closed(sock, 10)
    assert statuses(raw) == [401, 200]
    assert "smuggled" not in job_names(served)


def test_duplicate_content_length_is_refused_with_400(served: Served) -> None:
    with connect(served.port) as sock:
        sock.sendall(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Content-Length: 40\r\n\r\n{}"
        )
        raw, _ = read_until_closed(sock, 10)
    assert statuses(raw) == [400]


def test_content_length_longer_than_the_body_is_closed_within_the_deadline(
    served: Served,
) -> None:
    with connect(served.tight_port) as sock:
        sock.sendall(
            b"POST /api/v1/sim/load HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + served.token.encode() + b"\r\n\r\n" + b'{"gpu": 0}'
        )
        raw, took = read_until_closed(sock, 30)
    assert took < DEADLINE_S + 2.0
    assert statuses(raw) in ([], [408])


def test_slowloris_header_trickle_is_closed_within_the_deadline(served: Served) -> None:
    with connect(served.tight_port) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 10 and not closed:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.settimeout(DEADLINE_S / 4)
                closed = sock.recv(65536) == b""  # a 408 first, then EOF
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        took = time.monotonic() - start
    assert closed and took < DEADLINE_S + 2.0


def test_default_request_deadline_is_a_few_seconds() -> None:
    assert HttpLimits().request_deadline_s <= 10.0
    assert HttpLimits().backlog >= 1024


def test_server_header_names_no_software_or_version(served: Served) -> None:
    status, headers, _ = request(served.port, "GET", "/healthz")
    assert status == 200
    assert "server" not in headers


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("PUT", "/metrics", 405), ("PATCH", "/api/v1/jobs", 405)],
)
def test_unknown_paths_and_methods_answer_json_errors(
    served: Served, method: str, path: str, status: int
) -> None:
    got, headers, body = request(served.port, method, path)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]


def test_body_over_the_limit_is_413_json(served: Served) -> None:
    status, headers, body = request(
        served.port, "POST", "/api/v1/jobs", token=served.token, raw_body=b" " * (1 << 20)
    )
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert "body" in json.loads(body)["error"]


def test_client_disconnects_are_not_logged_as_errors(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for payload in (
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nAuthorization: Bearer "
        + served.token.encode() + b"\r\n\r\n{",
    ):  # fmt: skip
        sock = connect(served.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(payload)
        sock.close()  # a reset, mid-request
    wait_for(lambda: http_get(served.url + "/healthz")[0] == 200, timeout_s=10)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []


# ---------------------------------------------------------- connection cap


def test_idle_connections_beyond_the_cap_do_not_starve_healthz_or_metrics(
    served: Served,
) -> None:
    idle = [connect(served.tight_port) for _ in range(CAP * 3)]
    try:
        url = f"http://127.0.0.1:{served.tight_port}"
        assert http_get(url + "/healthz", timeout_s=3)[0] == 200
        assert http_get(url + "/metrics", timeout_s=3)[0] == 200
    finally:
        for s in idle:
            s.close()


def test_slow_requests_filling_the_cap_get_new_clients_a_quick_503_then_room(
    served: Served,
) -> None:
    slow = [connect(served.tight_port) for _ in range(CAP * 2)]
    try:
        for s in slow:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
        url = f"http://127.0.0.1:{served.tight_port}"
        start = time.monotonic()
        try:
            first = http_get(url + "/healthz", timeout_s=3)[0]
        except OSError:
            first = 0  # refused or reset: also quick
        assert first in (0, 200, 503) and time.monotonic() - start < 2.0
        # the slow ones reach their deadline; then there is room again
        wait_for(lambda: http_get(url + "/healthz", timeout_s=3)[0] == 200, timeout_s=10)
    finally:
        for s in slow:
            s.close()


# ------------------------------------------------------------ field checks


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/api/v1/sim/load", b'{"gpu": 0, "utilization": 1' + b"0" * 400 + b"}", "utilization"),
        ("/api/v1/power-limits", b'{"gpu": 0, "watts": 1' + b"0" * 400 + b"}", "watts"),
        ("/api/v1/power-limits", b'{"gpu": 0, "watts": NaN}', "NaN"),
        ("/api/v1/sim/load", b'{"gpu": 0, "utilization": Infinity}', "Infinity"),
        ("/api/v1/jobs", b'{"name": "a", "pid": 1' + b"0" * 30 + b', "gpu": 0}', "pid"),
        ("/api/v1/jobs", b'{"name": "a\\n", "pid": 10, "gpu": 0}', "name"),
        ("/api/v1/jobs", b'{"name": ' + b"[" * 30000 + b"]" * 30000 + b"}", "nested"),
    ],
)
def test_bad_numbers_and_shapes_are_4xx_naming_the_field(
    served: Served, path: str, raw: bytes, field: str
) -> None:
    status, body = post(served, path, raw)
    assert 400 <= status < 500, body
    assert field in body["error"]


def test_huge_progress_counts_are_refused_and_reads_stay_200(served: Served) -> None:
    body = {"name": "counts", "pid": 1, "gpu": 0}
    assert request(served.port, "POST", "/api/v1/jobs", body, token=served.token)[0] == 201
    try:
        progress = {"step": 1, "samples": 1, "tokens": 10**400}
        status, _, err = request(
            served.port, "POST", "/api/v1/jobs/counts/progress", progress, token=served.token
        )
        assert status == 400 and "tokens" in json.loads(err)["error"]
        assert request(served.port, "GET", "/metrics")[0] == 200
        assert request(served.port, "GET", "/api/v1/jobs")[0] == 200
    finally:
        request(served.port, "DELETE", "/api/v1/jobs/counts", token=served.token)


WRONG_TYPES = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
HUGE_INTS = st.one_of(st.integers(min_value=2**63), st.integers(max_value=-1))
FAULTS = ("lost", "overheat", "xid", "not_supported", "no_permission", "stuck_sensor",
          "power_brake", "clear")  # fmt: skip
NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])

# (path, field, a valid body, strategy of values that must be refused)
CASES: list[tuple[str, str, dict[str, Any], st.SearchStrategy[Any]]] = [
    ("/api/v1/jobs", "name", {"pid": 7, "gpu": 0},
     WRONG_TYPES.filter(lambda v: not isinstance(v, str))
     | st.text().filter(lambda s: not re.fullmatch(r"[A-Za-z0-9][\w.:-]{0,63}", s, re.ASCII))),
    ("/api/v1/jobs", "pid", {"name": "p", "gpu": 0},
     WRONG_TYPES | st.floats() | st.integers(min_value=2**31) | st.integers(max_value=0)),
    ("/api/v1/jobs", "gpu", {"name": "p", "pid": 7},
     WRONG_TYPES | st.floats() | st.integers(min_value=2) | st.integers(max_value=-1)),
    ("/api/v1/jobs", "priority", {"name": "p", "pid": 7, "gpu": 0},
     WRONG_TYPES.filter(lambda v: v is not None) | st.text().filter(lambda s: s not in
                                                                     ("high", "normal", "low"))),
    ("/api/v1/jobs", "utilization", {"name": "p", "pid": 7, "gpu": 0},
     WRONG_TYPES.filter(lambda v: v is not None) | NON_FINITE | st.integers(min_value=2)
     | st.floats(max_value=0.0) | st.integers(min_value=10**300)),
    ("/api/v1/jobs/prop/progress", "tokens", {"step": 1, "samples": 1},
     WRONG_TYPES | st.floats() | HUGE_INTS),
    ("/api/v1/jobs/prop/progress", "step", {"tokens": 1, "samples": 1},
     WRONG_TYPES | st.floats() | HUGE_INTS),
    ("/api/v1/jobs/prop/migrate", "gpu", {}, WRONG_TYPES | st.integers(min_value=2)),
    ("/api/v1/sim/load", "utilization", {"gpu": 0},
     WRONG_TYPES | NON_FINITE | st.floats(min_value=1.0, exclude_min=True)
     | st.integers(min_value=2)),
    ("/api/v1/sim/load", "memory_bytes", {"gpu": 0, "utilization": 0.1},
     WRONG_TYPES.filter(lambda v: v is not None) | st.floats() | HUGE_INTS),
    ("/api/v1/power-limits", "watts", {"gpu": 0},
     WRONG_TYPES | NON_FINITE | st.integers(min_value=10**309)),
    ("/api/v1/sim/faults", "fault", {"gpu": 0},
     WRONG_TYPES | st.text().filter(lambda s: s not in FAULTS)),
]  # fmt: skip


def _raw_json(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@pytest.mark.parametrize(
    ("path", "field", "valid", "bad"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES]
)
def test_any_wrong_type_or_out_of_range_field_is_4xx_never_5xx(
    served: Served, path: str, field: str, valid: dict[str, Any], bad: st.SearchStrategy[Any]
) -> None:
    if "/prop/" in path:
        job = {"name": "prop", "pid": 1, "gpu": 0}
        status = request(served.port, "POST", "/api/v1/jobs", job, token=served.token)[0]
        assert status in (200, 201)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(value=bad)
    def check(value: Any) -> None:
        body = _raw_json({**valid, field: value})
        status, err = post(served, path, body)
        assert 400 <= status < 500, (value, status, err)
        assert field in err["error"], (value, err)

    try:
        check()
    finally:
        request(served.port, "DELETE", "/api/v1/jobs/prop", token=served.token)
    assert request(served.port, "GET", "/metrics")[0] == 200
    assert request(served.port, "GET", "/api/v1/jobs")[0] == 200


def test_keep_alive_connections_have_nagle_off(served: Served) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        server = served.agent.server._server
        assert server is not None
        sockets = [p.transport.get_extra_info("socket") for p in server.server_state.connections]
        assert sockets
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
    finally:
        conn.close()


def test_an_app_behind_a_wrapper_taking_any_arguments_is_served_not_taken_for_a_factory(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn guesses a factory by calling the app with no arguments; a wrapper's __call__ (as
    # a coverage or mutation tool puts around every function) accepts that and returns a coroutine
    from wattwarden.api import server as server_module

    real_build_app = server_module.build_app

    class Wrapped:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, *args: Any) -> None:
            await self.app(*args)

    monkeypatch.setattr(server_module, "build_app", lambda *a: Wrapped(real_build_app(*a)))
    caplog.set_level(logging.WARNING)
    wrapped = ApiServer("127.0.0.1", 0)
    try:
        wrapped.start(served.agent.context)
        status, _ = http_get(f"http://127.0.0.1:{wrapped.address[1]}/healthz")
    finally:
        wrapped.close()
    assert status == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
