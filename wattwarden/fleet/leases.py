"""Leases out to node agents: who may push (tokens), how (HTTP(S)), and many at once.

A lease is a node's share of the fleet budget with a time to live: the agent enforces it until it
expires and then falls back to its local budget on its own, so a controller that goes silent
leaves a safe fleet behind. The agent's side is ``POST /api/v1/policy/lease`` (bearer token):

- 200 with the lease record (``expires_at`` on the agent's wall clock): ``ok``;
- 409 (a live lease held by another controller id, or a stale generation): ``conflict``;
- 401/403: ``unauthorized`` (also, without sending, when no token is known for the agent);
- any other answer: ``rejected`` with its status and the agent's one-line error;
- no answer (refused, reset, timed out, TLS failed): ``unreachable``, status None.

One connection per agent is kept alive between periods (the agent keeps idle connections for
30 s, a period is a few seconds): a renewal then costs one request, not a TCP and TLS handshake
(see ``benchmarks/fleet_pushes.py`` for the figures). A connection the agent closed meanwhile is
replaced and the request sent once more; a renewal is idempotent (same controller, same
generation), so a repeat is harmless.

Writes carry ``Authorization: Bearer <token>``; reads carry basic auth where the agents' web
config asks for it (one Authorization header cannot carry both, and the agent asks reads for basic
auth and writes for the token).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import re
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattwarden.api.contract import JOBS, POLICY_LEASE
from wattwarden.config import ConfigError

log = logging.getLogger(__name__)

LEASE_PATH = POLICY_LEASE
"""The agent's lease route, as its contract declares it (the fleet imports nothing else of the
agent's API: it talks HTTP)."""
JOBS_PATH = JOBS
"""The agent's job list: ``{"jobs": [record, ...]}``."""

RESULTS = ("ok", "conflict", "unauthorized", "unreachable", "rejected")
"""Every value of :attr:`PushResult.result`, in the order metrics list them."""
CONCURRENCY_MAX = 1024
"""The most pushes :func:`push_all` runs at once."""
IDLE_PER_AGENT = 2
"""Idle kept-alive connections kept per agent at most (a period needs one)."""
MESSAGE_MAX = 200
"""A result's message is one line of at most this many characters."""

_INSTANCE = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>[0-9]{1,5})"
)  # used with fullmatch, as every pattern here: "$" would let a trailing newline through
_UNDERSCORE_NAME = re.compile(r"(?P<host>[A-Za-z0-9.-]+)_(?P<port>[0-9]{1,5})")


# ------------------------------------------------------------------------------------- values
@dataclass(frozen=True, slots=True)
class Lease:
    """What the controller wants one agent to hold."""

    instance: str
    """``HOST:PORT`` as Prometheus's ``instance`` label has it."""
    budget_w: float
    ttl_s: float
    controller: str
    generation: int

    def to_json(self) -> dict[str, Any]:
        """The agent's request body (``ttl_s`` an integer where the TTL is whole)."""
        ttl: float = int(self.ttl_s) if float(self.ttl_s).is_integer() else self.ttl_s
        return {
            "power_budget_watts": self.budget_w,
            "ttl_s": ttl,
            "holder": self.controller,
            "generation": self.generation,
        }


@dataclass(frozen=True, slots=True)
class PushResult:
    """How one push (or release) went."""

    instance: str
    result: str
    """One of :data:`RESULTS`."""
    status: int | None
    """The agent's HTTP status; None when it did not answer (or was not asked)."""
    message: str
    """One line: the agent's error or why there was no answer; ``""`` when ok."""
    expires_at: float | None
    """When the lease ends on the agent's wall clock (its answer), when ok."""


class AgentUnreachable(Exception):
    """A read from an agent got no usable answer: no connection, or an error status."""

    def __init__(self, instance: str, message: str, status: int | None = None) -> None:
        super().__init__(f"agent {instance}: {message}")
        self.instance = instance
        self.status = status


def one_line(text: str) -> str:
    """``text`` as one line of at most :data:`MESSAGE_MAX` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MESSAGE_MAX else flat[: MESSAGE_MAX - 3] + "..."


def split_instance(instance: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); ValueError naming it otherwise."""
    m = _INSTANCE.fullmatch(instance)
    port = int(m["port"]) if m else 0
    if m is None or not 0 < port < 65536:
        raise ValueError(f"instance {instance!r} is not HOST:PORT")
    return (m["v6"] or m["host"]), port


# -------------------------------------------------------------------------------- credentials
class AgentCredentials:
    """Bearer tokens for agents: one file per agent in a directory, or one shared file.

    A token directory holds one file per agent named ``HOST:PORT`` (a Kubernetes Secret mounted
    as files; since a Secret's keys cannot hold ``:``, ``HOST_PORT`` names the same agent).
    Names starting with ``.`` (the Secret volume's ``..data`` links among them) and directories
    are skipped. Tokens are stripped of surrounding whitespace. The repr never shows a token.
    """

    def __init__(self, tokens: dict[str, str] | None = None, shared: str | None = None) -> None:
        self._tokens = dict(tokens or {})
        self._shared = shared

    @classmethod
    def load(cls, token_dir: str | None, token_file: str | None) -> AgentCredentials:
        """Read ``--token-dir`` or ``--token-file`` (neither: no tokens).

        ConfigError naming the flag and the file that is wrong (missing, unreadable, empty,
        misnamed, or two names of one agent with different tokens).
        """
        if token_dir is not None and token_file is not None:
            raise ConfigError("--token-dir and --token-file exclude each other: give one")
        if token_file is not None:
            return cls(shared=_read_token(Path(token_file), "--token-file"))
        if token_dir is None:
            return cls()
        root = Path(token_dir)
        try:
            entries = sorted(root.iterdir())
        except OSError as e:
            raise ConfigError(f"--token-dir {root}: cannot list it: {e.strerror or e}") from None
        tokens: dict[str, str] = {}
        origin: dict[str, str] = {}
        for path in entries:
            if path.name.startswith(".") or path.is_dir():
                continue
            instance = _instance_of_file(path.name)
            if instance is None:
                raise ConfigError(
                    f"--token-dir {root}: file {path.name!r} is not named HOST:PORT (or HOST_PORT)"
                )
            token = _read_token(path, "--token-dir")
            if instance in tokens and tokens[instance] != token:
                raise ConfigError(
                    f"--token-dir {root}: files {origin[instance]!r} and {path.name!r} give "
                    f"{instance} different tokens"
                )
            tokens[instance] = token
            origin[instance] = path.name
        return cls(tokens)

    def token_for(self, instance: str) -> str | None:
        """The token to push to ``instance`` with; None when none is known."""
        return self._tokens.get(instance, self._shared)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        shared = ", shared token" if self._shared is not None else ""
        return f"AgentCredentials({len(self._tokens)} agents{shared})"


def _instance_of_file(name: str) -> str | None:
    m = _UNDERSCORE_NAME.fullmatch(name)
    instance = f"{m['host']}:{m['port']}" if m else name
    try:
        split_instance(instance)
    except ValueError:
        return None
    return instance


def _read_token(path: Path, flag: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{flag}: cannot read token file {path}: {reason}") from None
    if not token:
        raise ConfigError(f"{flag}: token file {path} is empty")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ConfigError(f"{flag}: token file {path} holds more than one printable word")
    return token


# ------------------------------------------------------------------------------------ the link
class _NoAnswer(Exception):
    """No HTTP answer from an agent; the message is one line."""


_deadline = threading.local()
"""The monotonic time by which the answer being read on this thread must be in (``at``)."""


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, each read given only the time left until the thread's deadline.

    A socket timeout alone bounds each read, so an agent that trickles its answer a byte at a
    time would hold a push forever; this bounds the whole answer.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._at: float = getattr(_deadline, "at", math.inf)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        if math.isfinite(left):
            self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _DeadlineResponse(http.client.HTTPResponse):
    """An answer read under the thread's deadline (see :class:`_DeadlineReader`)."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the socket's own reader: replaced before anything was read
        self.fp = io.BufferedReader(_DeadlineReader(sock))


class _Connection(http.client.HTTPConnection):
    response_class = _DeadlineResponse


class _TlsConnection(http.client.HTTPSConnection):
    response_class = _DeadlineResponse


class AgentLink:
    """HTTP(S) to node agents: scheme, CA file, basic auth for reads, a timeout. Thread-safe.

    ``timeout_s`` bounds connecting and then the whole wait for the answer (each once), so a
    push to an agent that accepts and never answers returns ``unreachable`` after about
    ``timeout_s`` (twice that at most, if connecting itself was slow). ``keep_alive=False``
    opens one connection per request (for the benchmark's comparison).
    """

    def __init__(
        self,
        credentials: AgentCredentials,
        *,
        scheme: str = "http",
        ca_file: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        timeout_s: float = 2.0,
        keep_alive: bool = True,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ConfigError(f"agent scheme must be http or https, got {scheme!r}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"--timeout-s must be above 0, got {timeout_s}")
        self.credentials = credentials
        self.scheme = scheme
        self.timeout_s = timeout_s
        self.keep_alive = keep_alive
        self._context: ssl.SSLContext | None = None
        if scheme == "https":
            try:
                self._context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"agent CA file {ca_file}: cannot load it: {e}") from None
        elif ca_file is not None:
            raise ConfigError("an agent CA file needs the https scheme")
        self._basic: str | None = None
        if basic_auth is not None:
            pair = f"{basic_auth[0]}:{basic_auth[1]}".encode()
            self._basic = "Basic " + base64.b64encode(pair).decode()
        self._idle: dict[str, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()  # guards _idle; held only to take or give a connection

    def __repr__(self) -> str:
        return f"AgentLink({self.scheme}, timeout {self.timeout_s} s, {self.credentials!r})"

    # ---------------------------------------------------------------- writes
    def push(self, lease: Lease) -> PushResult:
        """Give ``lease.instance`` its lease: a result, never an exception for its failure."""
        return self._write("POST", lease.instance, lease.to_json())

    def release(self, instance: str, controller: str) -> PushResult:
        """Hand back ``controller``'s lease on ``instance``: the agent uses its local budget."""
        return self._write("DELETE", instance, {"holder": controller})

    def _write(self, method: str, instance: str, body: dict[str, Any]) -> PushResult:
        token = self.credentials.token_for(instance)
        if token is None:
            return PushResult(instance, "unauthorized", None, "no token for this agent", None)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            status, raw = self._request(method, instance, LEASE_PATH, json.dumps(body), headers)
        except _NoAnswer as e:
            return PushResult(instance, "unreachable", None, str(e), None)
        if 200 <= status < 300:
            return _ok(instance, status, raw)
        message = _error_text(status, raw)
        if status == http.client.CONFLICT:
            return PushResult(instance, "conflict", status, message, None)
        if status in (http.client.UNAUTHORIZED, http.client.FORBIDDEN):
            return PushResult(instance, "unauthorized", status, message, None)
        return PushResult(instance, "rejected", status, message, None)

    # ----------------------------------------------------------------- reads
    def read_lease(self, instance: str) -> dict[str, Any] | None:
        """The lease record ``instance`` holds now, or None.

        None also when the agent runs no policy engine (404). Raises :class:`AgentUnreachable`
        when there is no usable answer.
        """
        status, data = self._read(instance, LEASE_PATH, allow_404=True)
        if status == http.client.NOT_FOUND:
            return None
        if not isinstance(data, dict) or "lease" not in data:
            raise AgentUnreachable(instance, 'answer has no "lease" field', status)
        lease = data["lease"]
        if lease is not None and not isinstance(lease, dict):
            raise AgentUnreachable(instance, '"lease" is neither an object nor null', status)
        return lease

    def jobs(self, instance: str) -> list[dict[str, Any]]:
        """The jobs ``instance`` knows (``GET /api/v1/jobs``); AgentUnreachable without them."""
        status, data = self._read(instance, JOBS_PATH)
        jobs = data.get("jobs") if isinstance(data, dict) else None
        if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
            raise AgentUnreachable(instance, 'answer has no "jobs" list of objects', status)
        return jobs

    def _read(self, instance: str, path: str, *, allow_404: bool = False) -> tuple[int, Any]:
        headers = {"Authorization": self._basic} if self._basic else {}
        try:
            status, raw = self._request("GET", instance, path, None, headers)
        except _NoAnswer as e:
            raise AgentUnreachable(instance, str(e)) from None
        if status == http.client.NOT_FOUND and allow_404:
            return status, None
        if status != http.client.OK:
            raise AgentUnreachable(
                instance, f"GET {path} answered {status}: {_error_text(status, raw)}", status
            )
        try:
            return status, json.loads(raw)
        except ValueError:
            raise AgentUnreachable(instance, f"GET {path} answered non-JSON", status) from None

    # ------------------------------------------------------------ connections
    def close(self) -> None:
        """Close the idle connections (the link stays usable)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _take(self, instance: str) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to ``instance``: an idle one (True) or a new, unconnected one."""
        if self.keep_alive:
            with self._lock:
                conns = self._idle.get(instance)
                if conns:
                    return conns.pop(), True
        try:
            host, port = split_instance(instance)
        except ValueError as e:
            raise _NoAnswer(str(e)) from None
        if self._context is not None:
            return _TlsConnection(host, port, timeout=self.timeout_s, context=self._context), False
        return _Connection(host, port, timeout=self.timeout_s), False

    def _give(self, instance: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            conns = self._idle.setdefault(instance, [])
            if len(conns) < IDLE_PER_AGENT:
                conns.append(conn)
                return
        conn.close()

    def _request(
        self, method: str, instance: str, path: str, body: str | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """Send one request; (status, body), or :class:`_NoAnswer`."""
        headers = {"Accept": "application/json", **headers}
        if not self.keep_alive:
            headers["Connection"] = "close"
        data = body.encode() if body is not None else None
        _deadline.at = time.monotonic() + self.timeout_s  # for connecting, sending, the answer
        for attempt in (0, 1):
            conn, reused = self._take(instance)
            try:
                if conn.sock is None:
                    conn.connect()  # within timeout_s (the connection's socket timeout)
                left = _deadline.at - time.monotonic()
                if left <= 0 or conn.sock is None:
                    raise TimeoutError("timed out")
                conn.sock.settimeout(left)
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, OSError) as e:
                conn.close()
                # a kept-alive connection the agent closed meanwhile fails on first use
                stale = isinstance(
                    e,
                    http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError,
                )
                if reused and stale and attempt == 0:
                    continue
                raise _NoAnswer(_reason(e)) from None
            if self.keep_alive and not resp.will_close:
                if conn.sock is not None:
                    conn.sock.settimeout(self.timeout_s)
                self._give(instance, conn)
            else:
                conn.close()
            return resp.status, raw
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError | http.client.RemoteDisconnected | BrokenPipeError):
        return "connection reset"
    if isinstance(e, ssl.SSLError):
        return one_line(f"TLS: {e.reason or e}")
    if isinstance(e, OSError) and e.strerror:
        return one_line(e.strerror)
    return one_line(f"{type(e).__name__}: {e}")


def _error_text(status: int, raw: bytes) -> str:
    """The agent's ``{"error": ...}`` as one line, else the body's first line, else the reason."""
    try:
        data = json.loads(raw or b"null")
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return one_line(data["error"])
    text = raw.decode(errors="replace").strip()
    return one_line(text) if text else http.client.responses.get(status, "error")


def _ok(instance: str, status: int, raw: bytes) -> PushResult:
    """A 2xx answer: ok, with ``expires_at`` from the record (a message says when it lacks it)."""
    try:
        data = json.loads(raw or b"null")
    except ValueError:
        data = None
    expires = data.get("expires_at") if isinstance(data, dict) else None
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        return PushResult(instance, "ok", status, "", float(expires))
    if isinstance(data, dict) and "expires_at" not in data and "lease" in data:
        return PushResult(instance, "ok", status, "", None)  # a release: no lease left
    return PushResult(instance, "ok", status, "answer has no numeric expires_at", None)


# ---------------------------------------------------------------------------------- fan-out
def push_all(
    link: AgentLink, leases: Sequence[Lease], *, concurrency: int = 64
) -> list[PushResult]:
    """Push every lease, at most ``concurrency`` (1..1024) at once; results in input order.

    One agent's failure is its result, never an exception (a bug in the push itself is logged
    and reported as ``unreachable`` for that agent, so the others' results still come back).
    """
    if not 1 <= concurrency <= CONCURRENCY_MAX:
        raise ValueError(f"concurrency must be within 1..{CONCURRENCY_MAX}, got {concurrency}")
    if not leases:
        return []

    def one(lease: Lease) -> PushResult:
        try:
            return link.push(lease)
        except Exception as e:
            log.exception("pushing a lease to %s failed", lease.instance)
            message = one_line(f"internal error: {type(e).__name__}: {e}")
            return PushResult(lease.instance, "unreachable", None, message, None)

    if concurrency == 1 or len(leases) == 1:
        return [one(lease) for lease in leases]
    workers = min(concurrency, len(leases))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lease-push") as pool:
        return list(pool.map(one, leases))
