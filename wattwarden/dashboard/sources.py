"""The dashboard's data sources: node agents, Prometheus and Alertmanager, over HTTP only.

Every read returns a typed, frozen result or a :class:`Down` (which source, and why, in one line):
it never raises into a page. Reads go through a small thread-safe TTL cache (one render asks each
thing once; sessions share it; a key is fetched by one thread while the others wait for its
answer), and each source counts the requests it was sent, so the dashboard's load on an agent can
be measured. An agent's per-second history is kept per window and topped up with the seconds since
the last fetch, so a live refresh asks for a few seconds rather than the whole window.
Writes (budget, mode, a GPU's limit, a job's move) send the bearer token and answer an
:class:`ActionResult` that says the agent's refusal in words.
"""

from __future__ import annotations

import base64
import bisect
import http.client
import json
import logging
import math
import os
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote, urlencode, urlsplit

from wattwarden.config import default_state_dir
from wattwarden.dashboard.settings import DashboardSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_TOKEN = "WATTWARDEN_TOKEN"
TOKEN_FILE = "token"
HISTORY_MAX_S = 3600.0
"""The agent keeps an hour of per-second history."""
HISTORY_POINTS = 300
"""Rows per GPU a chart needs at most: longer windows are fetched in steps of several seconds."""
DECISIONS_LIMIT = 200
MAX_BODY_BYTES = 64 * 1024 * 1024

# agent routes (the agent's contract: wattwarden.api.contract; repeated here because the dashboard
# talks HTTP only and imports nothing of the agent)
STATE = "/api/v1/state"
HISTORY = "/api/v1/history"
JOBS = "/api/v1/jobs"
DECISIONS = "/api/v1/decisions"
POLICY = "/api/v1/policy"
POWER_LIMITS = "/api/v1/power-limits"


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True, slots=True)
class Down:
    """A source that did not answer as it should: which one, and why (one line)."""

    source: str
    reason: str
    status: int | None = None
    """The HTTP status, when the source answered with an error."""

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True, slots=True)
class GpuState:
    """One GPU as the agent's state says it now (None: unsupported, or lost)."""

    index: int
    uuid: str
    name: str
    up: bool
    power_w: float | None
    power_peak_w: float | None
    energy_j: float | None
    power_limit_w: float | None
    power_limit_target_w: float | None
    power_limit_default_w: float | None
    power_limit_min_w: float | None
    power_limit_max_w: float | None
    temperature_c: float | None
    memory_temperature_c: float | None
    temperature_slowdown_c: float | None
    temperature_max_operating_c: float | None
    utilization_ratio: float | None
    memory_utilization_ratio: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    clock_sm_hz: float | None
    clock_memory_hz: float | None
    clock_events: tuple[str, ...]
    xid_errors_total: int


@dataclass(frozen=True, slots=True)
class AgentState:
    """``GET /api/v1/state`` of one agent."""

    url: str
    node: str
    backend: str
    policy_mode: str
    policy_holding: str | None
    policy_fallback: str | None
    last_sample_s: float | None
    power_budget_w: float | None
    power_budget_lease_w: float | None
    gpus: tuple[GpuState, ...]

    @property
    def budget_in_force_w(self) -> float | None:
        """A fleet controller's live lease, which overrides the node budget (as the agent does)."""
        if self.power_budget_lease_w is not None:
            return self.power_budget_lease_w
        return self.power_budget_w

    @property
    def power_w(self) -> float:
        """The power of the GPUs that are up (a lost GPU adds nothing: it is unknown)."""
        return sum(g.power_w for g in self.gpus if g.up and g.power_w is not None)


@dataclass(frozen=True, slots=True)
class GpuHistory:
    """One GPU's history, column by column (equal lengths, oldest first).

    A row is a second, or with ``step_s`` over 1 a bucket of that many seconds (stamped with its
    first second; the readings the means of its seconds, the clock events their union) that
    holds ``seconds`` of them: a second the GPU was lost is in no row.
    """

    index: int
    timestamp_s: tuple[float, ...]
    power_w: tuple[float | None, ...]
    temperature_c: tuple[float | None, ...]
    utilization_ratio: tuple[float | None, ...]
    power_limit_w: tuple[float | None, ...]
    power_limit_target_w: tuple[float | None, ...]
    """All None where the agent does not report it."""
    clock_sm_hz: tuple[float | None, ...]
    clock_events: tuple[tuple[str, ...], ...]
    seconds: tuple[float, ...] = ()
    """How many seconds each row holds (empty: one each)."""
    step_s: int = 1
    """Seconds per row asked of the agent."""

    def energy_j(self) -> float:
        """The energy of these rows: each row's mean power times the seconds it holds."""
        weights = self.seconds or (1.0,) * len(self.timestamp_s)
        return math.fsum(p * s for p, s in zip(self.power_w, weights, strict=True) if p is not None)

    @property
    def end_s(self) -> float | None:
        """Just after the newest second of the rows (None without rows)."""
        if not self.timestamp_s:
            return None
        last = self.seconds[-1] if self.seconds else 1.0
        return self.timestamp_s[-1] + min(last, self.step_s)

    def __len__(self) -> int:
        return len(self.timestamp_s)


@dataclass(frozen=True, slots=True)
class History:
    """An agent's history over a window: per GPU, and the seconds it covers."""

    window_s: float
    gpus: Mapping[int, GpuHistory]

    @property
    def covered_s(self) -> float:
        """Seconds from the oldest row to just after the newest second (0 without rows)."""
        starts = [g.timestamp_s[0] for g in self.gpus.values() if len(g)]
        ends = [g.end_s for g in self.gpus.values() if g.end_s is not None]
        return max(ends) - min(starts) if starts else 0.0

    def energy_j(self) -> float:
        """The GPUs' energy over the rows."""
        return sum(g.energy_j() for g in self.gpus.values())


@dataclass(frozen=True, slots=True)
class Job:
    """A job as ``GET /api/v1/jobs`` answers it, running or finished."""

    name: str
    state: str
    pid: int
    gpu: int
    priority: str
    registered_at_s: float
    finished_at_s: float | None
    duration_s: float
    step: int
    samples: int
    tokens: int
    target_gpu: int | None
    migratable: bool
    energy_j: float
    power_w: float
    mean_power_w: float | None
    tokens_per_joule: float | None
    migrations: int | None
    """Moves done; None where the agent does not say."""

    @property
    def joules_per_step(self) -> float | None:
        """Energy per training step, when the job reports steps."""
        return self.energy_j / self.step if self.step > 0 else None


@dataclass(frozen=True, slots=True)
class Decision:
    """One entry of ``GET /api/v1/decisions``: a limit set, a hold, or a job move."""

    time_s: float
    gpu: int
    policy: str
    action: str
    reason: str
    mode: str
    jobs: tuple[str, ...]
    from_w: float | None
    to_w: float | None
    enforced_w: float | None
    error: str | None
    to_gpu: int | None


@dataclass(frozen=True, slots=True)
class Policy:
    """``GET /api/v1/policy``: the policy engine as it runs."""

    mode: str
    power_budget_w: float | None
    policies: Mapping[str, bool]
    fallback: str | None
    holding: str | None
    budget_unreachable: bool
    period_s: float
    periods: int
    errors_total: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Sample:
    """One series of a Prometheus instant vector."""

    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class NodeSummary:
    """One node as Prometheus sees it (None: no such series)."""

    instance: str
    power_w: float | None
    gpus_up: int | None
    gpus_total: int | None
    budget_w: float | None
    energy_1h_j: float | None
    energy_1d_j: float | None


@dataclass(frozen=True, slots=True)
class FleetFromPrometheus:
    """The fleet's nodes and totals from Prometheus."""

    nodes: tuple[NodeSummary, ...]

    @property
    def power_w(self) -> float:
        """Total GPU power."""
        return sum(n.power_w or 0.0 for n in self.nodes)

    @property
    def budget_w(self) -> float | None:
        """Sum of the nodes' budgets (None when no node has one)."""
        budgets = [n.budget_w for n in self.nodes if n.budget_w is not None]
        return sum(budgets) if budgets else None

    @property
    def energy_1h_j(self) -> float | None:
        """GPU energy over the last hour."""
        values = [n.energy_1h_j for n in self.nodes if n.energy_1h_j is not None]
        return sum(values) if values else None

    @property
    def energy_1d_j(self) -> float | None:
        """GPU energy over the last day."""
        values = [n.energy_1d_j for n in self.nodes if n.energy_1d_j is not None]
        return sum(values) if values else None


@dataclass(frozen=True, slots=True)
class Alert:
    """A firing alert from Alertmanager."""

    name: str
    severity: str
    summary: str
    runbook_url: str | None
    starts_at: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What the agent said to a write: done, or refused (in words)."""

    ok: bool
    status: int | None
    message: str
    body: Any = None


# ------------------------------------------------------------------------------- the cache
@dataclass
class _Entry:
    expires_s: float = 0.0
    value: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class TtlCache:
    """Values for a short time, fetched by one thread per key (the others wait for its answer)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[Any, _Entry] = {}
        self._lock = threading.Lock()  # guards _entries; each entry's lock guards its value
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, ttl_s: float, fetch: Callable[[], T]) -> T:
        """The cached value of ``key``, or ``fetch()``'s (kept ``ttl_s`` seconds)."""
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
        with entry.lock:
            if self._clock() < entry.expires_s:
                self.hits += 1
                value: T = entry.value
                return value
            self.misses += 1
            value = fetch()
            entry.value, entry.expires_s = value, self._clock() + ttl_s
            return value

    def invalidate(self, prefix: Any = None) -> None:
        """Forget every key (or every tuple key whose first item is ``prefix``)."""
        with self._lock:
            for key, entry in self._entries.items():
                if prefix is None or (isinstance(key, tuple) and key[:1] == (prefix,)):
                    entry.expires_s = 0.0


# ------------------------------------------------------------------------------ HTTP
@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: Any


class _Http:
    """JSON over HTTP(S) to one base URL, a connection per request, counting requests."""

    def __init__(self, name: str, url: str, timeout_s: float, counter: Counter[str]) -> None:
        parts = urlsplit(url)
        self.name = name
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._basic: str | None = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._basic = "Basic " + base64.b64encode(pair.encode()).decode()
        self.timeout_s = timeout_s
        self._counter = counter
        self._counter_lock = threading.Lock()

    def request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> _Answer | Down:
        """One request; a Down when no answer came (refused, timed out, not JSON)."""
        with self._counter_lock:
            self._counter[self.name] += 1
        headers = {"Accept": "application/json", "Connection": "close"}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        elif self._basic is not None:
            headers["Authorization"] = self._basic
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout_s, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_BODY_BYTES + 1)
            content_type = resp.getheader("Content-Type", "")
        except TimeoutError:
            return Down(self.name, f"no answer within {self.timeout_s:g} s")
        except ConnectionRefusedError:
            return Down(self.name, "connection refused")
        except (OSError, http.client.HTTPException) as e:
            return Down(self.name, _one_line(str(e) or type(e).__name__))
        finally:
            conn.close()
        if len(raw) > MAX_BODY_BYTES:
            return Down(self.name, f"answer over {MAX_BODY_BYTES} bytes", resp.status)
        decoded: Any = None
        if raw and "json" in content_type:
            try:
                decoded = json.loads(raw)
            except ValueError:
                return Down(self.name, f"{method} {path} answered bad JSON", resp.status)
        elif raw:
            decoded = raw.decode(errors="replace")
        return _Answer(resp.status, decoded)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _error_of(answer: _Answer) -> str:
    body = answer.body
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return _one_line(body["error"])
    if isinstance(body, str) and body.strip():
        return _one_line(body)
    return http.client.responses.get(answer.status, "error")


# ------------------------------------------------------------------------------- parsing
class _Shape(ValueError):
    """An answer out of the expected shape."""


def _num(data: Mapping[str, Any], key: str, optional: bool = True) -> float | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Shape(f"field {key!r} is {value!r:.40}")
    return float(value)


def _int(data: Mapping[str, Any], key: str, optional: bool = False) -> int | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Shape(f"field {key!r} is {value!r:.40}")
    return value


def _str(data: Mapping[str, Any], key: str, optional: bool = False) -> str | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Shape(f"field {key!r} is {value!r:.40}")
    return value


def _req_num(data: Mapping[str, Any], key: str) -> float:
    value = _num(data, key, optional=False)
    assert value is not None
    return value


def _req_int(data: Mapping[str, Any], key: str) -> int:
    value = _int(data, key)
    assert value is not None
    return value


def _req_str(data: Mapping[str, Any], key: str) -> str:
    value = _str(data, key)
    assert value is not None
    return value


def _obj(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise _Shape(f"{what} is not a JSON object")
    return data


def _labels(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(str(v) for v in value)


def parse_gpu(data: Any) -> GpuState:
    """A GPU of the state answer."""
    g = _obj(data, "a GPU")
    xids = g.get("xid_errors")
    xid_total = sum(int(v) for v in xids.values()) if isinstance(xids, dict) else 0
    up = g.get("up")
    if not isinstance(up, bool):
        raise _Shape(f"field 'up' is {up!r:.40}")
    return GpuState(
        index=_req_int(g, "index"),
        uuid=_str(g, "uuid", True) or "",
        name=_str(g, "name", True) or "",
        up=up,
        power_w=_num(g, "power_watts"),
        power_peak_w=_num(g, "power_peak_watts"),
        energy_j=_num(g, "energy_joules"),
        power_limit_w=_num(g, "power_limit_watts"),
        power_limit_target_w=_num(g, "power_limit_target_watts"),
        power_limit_default_w=_num(g, "power_limit_default_watts"),
        power_limit_min_w=_num(g, "power_limit_min_watts"),
        power_limit_max_w=_num(g, "power_limit_max_watts"),
        temperature_c=_num(g, "temperature_celsius"),
        memory_temperature_c=_num(g, "memory_temperature_celsius"),
        temperature_slowdown_c=_num(g, "temperature_slowdown_celsius"),
        temperature_max_operating_c=_num(g, "temperature_max_operating_celsius"),
        utilization_ratio=_num(g, "utilization_ratio"),
        memory_utilization_ratio=_num(g, "memory_utilization_ratio"),
        memory_used_bytes=_num(g, "memory_used_bytes"),
        memory_total_bytes=_num(g, "memory_total_bytes"),
        clock_sm_hz=_num(g, "clock_sm_hertz"),
        clock_memory_hz=_num(g, "clock_memory_hertz"),
        clock_events=_labels(g.get("clock_events")),
        xid_errors_total=xid_total,
    )


def parse_state(url: str, data: Any) -> AgentState:
    """The state answer."""
    s = _obj(data, "the state")
    gpus = s.get("gpus")
    if not isinstance(gpus, list):
        raise _Shape("field 'gpus' is not a list")
    return AgentState(
        url=url,
        node=_str(s, "node", True) or url,
        backend=_str(s, "backend", True) or "",
        policy_mode=_str(s, "policy_mode", True) or "dry_run",
        policy_holding=_str(s, "policy_holding", True),
        policy_fallback=_str(s, "policy_fallback", True),
        last_sample_s=_num(s, "last_sample_timestamp"),
        power_budget_w=_num(s, "power_budget_watts"),
        power_budget_lease_w=_num(s, "power_budget_lease_watts"),
        gpus=tuple(sorted((parse_gpu(g) for g in gpus), key=lambda g: g.index)),
    )


_HISTORY_NUMBERS = {
    "power_watts": "power_w",
    "temperature_celsius": "temperature_c",
    "utilization_ratio": "utilization_ratio",
    "power_limit_watts": "power_limit_w",
    "power_limit_target_watts": "power_limit_target_w",
    "clock_sm_hertz": "clock_sm_hz",
}
"""The history's number columns, by the agent's name, and the field each goes to."""
_FLOATS = frozenset({float, type(None)})
_NUMBERS = frozenset({float, int, type(None)})


def _float_or_none(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


@dataclass(slots=True)
class HistoryColumns:
    """One GPU's history rows as columns (lists of equal length, oldest first)."""

    timestamp_s: list[float] = field(default_factory=list)
    power_w: list[float | None] = field(default_factory=list)
    temperature_c: list[float | None] = field(default_factory=list)
    utilization_ratio: list[float | None] = field(default_factory=list)
    power_limit_w: list[float | None] = field(default_factory=list)
    power_limit_target_w: list[float | None] = field(default_factory=list)
    clock_sm_hz: list[float | None] = field(default_factory=list)
    clock_events: list[tuple[str, ...]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    """How many seconds each row holds (1 for a per-second row)."""

    def columns(self) -> tuple[list[Any], ...]:
        """Every column, in field order."""
        return tuple(getattr(self, name) for name in self.__slots__)

    def cut(self, lo: int, hi: int | None = None) -> HistoryColumns:
        """Rows ``lo`` up to ``hi`` (a copy)."""
        return HistoryColumns(*(c[lo:hi] for c in self.columns()))

    def __len__(self) -> int:
        return len(self.timestamp_s)


def _number_column(values: Sequence[Any]) -> list[float | None]:
    kinds = set(map(type, values))
    if kinds <= _FLOATS:
        return list(values)
    if kinds <= _NUMBERS:
        return [None if v is None else float(v) for v in values]
    return [_float_or_none(v) for v in values]


def _events_column(values: Sequence[Any]) -> list[tuple[str, ...]]:
    known: dict[tuple[Any, ...], tuple[str, ...]] = {}  # one tuple per set of labels
    out = []
    for v in values:
        key = tuple(v) if type(v) is list else ()
        labels = known.get(key)
        if labels is None:
            labels = known[key] = tuple(str(x) for x in key)
        out.append(labels)
    return out


def parse_history_rows(data: Any) -> dict[int, HistoryColumns]:
    """The history answer as columns per GPU, by the answer's column names.

    A column the agent does not send is all None (``seconds``: 1 a row); a row without a
    timestamp is left out.
    """
    h = _obj(data, "the history")
    columns = h.get("columns")
    gpus = h.get("gpus")
    if not isinstance(columns, list) or not isinstance(gpus, dict):
        raise _Shape("the history has no 'columns' list or 'gpus' object")
    if "timestamp" not in columns:
        raise _Shape("the history has no 'timestamp' column")
    at = {name: i for i, name in enumerate(columns)}
    width = len(columns)
    out: dict[int, HistoryColumns] = {}
    for key, rows in gpus.items():
        try:
            index = int(key)
        except ValueError:
            raise _Shape(f"history GPU key {key!r:.20} is not an index") from None
        if not isinstance(rows, list):
            raise _Shape(f"history of GPU {index} is not a list")
        if not rows:
            out[index] = HistoryColumns()
            continue
        if set(map(type, rows)) != {list} or set(map(len, rows)) != {width}:
            raise _Shape(f"a history row of GPU {index} does not match the columns")
        by_column = list(zip(*rows, strict=True))
        stamps = _number_column(by_column[at["timestamp"]])
        keep: list[int] | None = None
        if None in stamps:
            keep = [i for i, ts in enumerate(stamps) if ts is not None]
            by_column = [tuple(c[i] for i in keep) for c in by_column]
            stamps = [stamps[i] for i in keep]
        n = len(stamps)

        def numbers(column: str, n: int = n, by_column: list[Any] = by_column) -> list[Any]:
            return _number_column(by_column[at[column]]) if column in at else [None] * n

        readings = {name: numbers(column) for column, name in _HISTORY_NUMBERS.items()}
        events: list[tuple[str, ...]] = [()] * n
        if "clock_events" in at:
            try:
                events = _events_column(by_column[at["clock_events"]])
            except TypeError:
                raise _Shape(f"a history row of GPU {index} has odd clock events") from None
        out[index] = HistoryColumns(
            timestamp_s=cast(list[float], stamps),
            **readings,
            clock_events=events,
            seconds=[1.0 if s is None else s for s in numbers("seconds")],
        )
    return out


def _gpu_history(index: int, rows: HistoryColumns, step_s: int) -> GpuHistory:
    return GpuHistory(
        index,
        tuple(rows.timestamp_s),
        tuple(rows.power_w),
        tuple(rows.temperature_c),
        tuple(rows.utilization_ratio),
        tuple(rows.power_limit_w),
        tuple(rows.power_limit_target_w),
        tuple(rows.clock_sm_hz),
        tuple(rows.clock_events),
        tuple(rows.seconds),
        step_s,
    )


def parse_job(data: Any) -> Job:
    """A job of the jobs answer."""
    j = _obj(data, "a job")
    migratable = j.get("migratable")
    return Job(
        name=_req_str(j, "name"),
        state=_req_str(j, "state"),
        pid=_req_int(j, "pid"),
        gpu=_req_int(j, "gpu"),
        priority=_req_str(j, "priority"),
        registered_at_s=_req_num(j, "registered_at"),
        finished_at_s=_num(j, "finished_at"),
        duration_s=_req_num(j, "duration_seconds"),
        step=_req_int(j, "step"),
        samples=_req_int(j, "samples"),
        tokens=_req_int(j, "tokens"),
        target_gpu=_int(j, "target_gpu", True),
        migratable=bool(migratable) if isinstance(migratable, bool) else False,
        energy_j=_req_num(j, "energy_joules"),
        power_w=_req_num(j, "power_watts"),
        mean_power_w=_num(j, "mean_power_watts"),
        tokens_per_joule=_num(j, "tokens_per_joule"),
        migrations=_int(j, "migrations", True),
    )


def parse_decision(data: Any) -> Decision:
    """A decision of the decisions answer."""
    d = _obj(data, "a decision")
    jobs = d.get("jobs")
    return Decision(
        time_s=_req_num(d, "time"),
        gpu=_req_int(d, "gpu"),
        policy=_req_str(d, "policy"),
        action=_req_str(d, "action"),
        reason=_req_str(d, "reason"),
        mode=_req_str(d, "mode"),
        jobs=tuple(str(x) for x in jobs) if isinstance(jobs, list) else (),
        from_w=_num(d, "from_watts"),
        to_w=_num(d, "to_watts"),
        enforced_w=_num(d, "enforced_watts"),
        error=_str(d, "error", True),
        to_gpu=_int(d, "to_gpu", True),
    )


def parse_policy(data: Any) -> Policy:
    """The policy answer."""
    p = _obj(data, "the policy")
    policies = p.get("policies")
    if not isinstance(policies, dict):
        raise _Shape("field 'policies' is not an object")
    return Policy(
        mode=_req_str(p, "mode"),
        power_budget_w=_num(p, "power_budget_watts"),
        policies={str(k): bool(v) for k, v in policies.items()},
        fallback=_str(p, "fallback", True),
        holding=_str(p, "holding", True),
        budget_unreachable=bool(p.get("budget_unreachable")),
        period_s=_req_num(p, "period_seconds"),
        periods=_req_int(p, "periods"),
        errors_total=_req_int(p, "errors_total"),
        last_error=_str(p, "last_error", True),
    )


def parse_vector(data: Any) -> list[Sample]:
    """A Prometheus instant query's answer (vector or scalar); NaN and infinities are left out."""
    body = _obj(data, "the answer")
    if body.get("status") != "success":
        raise _Shape(_one_line(str(body.get("error") or "query failed")))
    d = _obj(body.get("data"), "field 'data'")
    kind, result = d.get("resultType"), d.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        value = float(result[1])
        return [] if not math.isfinite(value) else [Sample({}, value)]
    if kind != "vector" or not isinstance(result, list):
        raise _Shape(f"expected a vector, got {kind!r:.20}")
    out = []
    for item in result:
        series = _obj(item, "a series")
        metric, pair = series.get("metric"), series.get("value")
        if not isinstance(metric, dict) or not isinstance(pair, list) or len(pair) != 2:
            raise _Shape("a series has no 'metric' and 'value'")
        try:
            value = float(pair[1])
        except (TypeError, ValueError):
            raise _Shape(f"a sample value is {pair[1]!r:.20}") from None
        if math.isfinite(value):
            out.append(Sample({str(k): str(v) for k, v in metric.items()}, value))
    return out


def parse_alerts(data: Any) -> list[Alert]:
    """Alertmanager's ``GET /api/v2/alerts``: the active alerts, most severe first."""
    if not isinstance(data, list):
        raise _Shape("the alerts are not a JSON list")
    out = []
    for item in data:
        a = _obj(item, "an alert")
        labels = a.get("labels") if isinstance(a.get("labels"), dict) else {}
        notes = a.get("annotations") if isinstance(a.get("annotations"), dict) else {}
        assert isinstance(labels, dict) and isinstance(notes, dict)
        status = a.get("status")
        if isinstance(status, dict) and status.get("state") not in (None, "active"):
            continue
        out.append(
            Alert(
                name=str(labels.get("alertname", "unnamed")),
                severity=str(labels.get("severity", "none")),
                summary=str(notes.get("summary") or notes.get("description") or ""),
                runbook_url=str(notes["runbook_url"]) if notes.get("runbook_url") else None,
                starts_at=str(a.get("startsAt", "")),
                labels={str(k): str(v) for k, v in labels.items()},
            )
        )
    return sorted(out, key=lambda x: (SEVERITY_ORDER.get(x.severity, 9), x.name, x.starts_at))


SEVERITY_ORDER = {"critical": 0, "page": 0, "error": 1, "warning": 2, "info": 3}


# ------------------------------------------------------------------------------ refusals
_REFUSAL_WORDS = {
    400: "bad request",
    404: "not found",
    409: "conflict",
    413: "request too large",
    422: "value refused",
    429: "too soon after the last change",
    502: "the driver refused",
    503: "unavailable",
}


def refusal_in_words(status: int, error: str) -> str:
    """The agent's refusal of a write, as an operator reads it."""
    if status == 401:
        return (
            "refused: no valid token (401) — pass --token-file, or set WATTWARDEN_TOKEN to "
            "the agent's token"
        )
    if status == 403:
        return f"refused: not allowed (403): {error}"
    words = _REFUSAL_WORDS.get(status, http.client.responses.get(status, "error").lower())
    return f"refused: {words} ({status}): {error}"


# ------------------------------------------------------------------------- history buffer
@dataclass
class _HistoryBuffer:
    """An agent's history per GPU at one step, topped up by the seconds since the last fetch."""

    rows: dict[int, HistoryColumns]
    span_s: float
    """Seconds before the last fetch that the rows cover (what the agent had, at most)."""
    fetched_at_s: float
    """When (monotonic) they were last fetched."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def history_step(window_s: float, max_points: int = HISTORY_POINTS) -> int:
    """Seconds per row so that ``window_s`` takes at most ``max_points`` rows (at least 1)."""
    return max(math.ceil(window_s / max(max_points, 1)), 1)


# --------------------------------------------------------------------------------- sources
class Sources:
    """The agents, Prometheus and Alertmanager of one set of settings. Thread-safe."""

    def __init__(
        self,
        settings: DashboardSettings,
        *,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ttl_s = ttl_s if ttl_s is not None else min(1.0, settings.refresh_s / 2)
        """How long an answer is reused: shorter than a live refresh, longer than a render."""
        self.cache = TtlCache(clock)
        self._clock = clock
        self._counts: Counter[str] = Counter()
        self._agents = {
            url: _Http(f"agent {url}", url, settings.timeout_s, self._counts)
            for url in settings.agents
        }
        self._prometheus = (
            None
            if settings.prometheus is None
            else _Http(
                f"Prometheus {settings.prometheus}",
                settings.prometheus,
                settings.timeout_s,
                self._counts,
            )
        )
        self._alertmanager = (
            None
            if settings.alertmanager is None
            else _Http(
                f"Alertmanager {settings.alertmanager}",
                settings.alertmanager,
                settings.timeout_s,
                self._counts,
            )
        )
        self._history: dict[tuple[str, int], _HistoryBuffer] = {}
        self._history_lock = threading.Lock()

    # ----------------------------------------------------------------- bookkeeping
    def request_counts(self) -> dict[str, int]:
        """Requests sent so far, by source name (``agent URL``, ``Prometheus URL``, ...)."""
        return dict(self._counts)

    def source_name(self, url: str) -> str:
        """The name a source goes by in banners and counts."""
        client = self._agents.get(url)
        return client.name if client is not None else url

    def invalidate(self, url: str | None = None) -> None:
        """Forget cached answers (of one agent, or all), e.g. after a write."""
        self.cache.invalidate(url)

    # ----------------------------------------------------------------- agent reads
    def _agent_get(
        self, url: str, path: str, parse: Callable[[Any], T], *, ttl_s: float | None = None
    ) -> T | Down:
        client = self._agents.get(url)
        if client is None:
            return Down(f"agent {url}", "not one of the dashboard's agents (--agent)")

        def fetch() -> T | Down:
            answer = client.request("GET", path)
            if isinstance(answer, Down):
                return answer
            if answer.status >= 400:
                return Down(client.name, f"{_error_of(answer)} ({answer.status})", answer.status)
            try:
                return parse(answer.body)
            except (_Shape, ValueError, TypeError, KeyError) as e:
                return Down(client.name, f"unexpected answer to GET {path}: {_one_line(str(e))}")

        return self.cache.get((url, path), self.ttl_s if ttl_s is None else ttl_s, fetch)

    def state(self, url: str) -> AgentState | Down:
        """The agent's state now."""
        return self._agent_get(url, STATE, lambda d: parse_state(url, d))

    def states(self) -> dict[str, AgentState | Down]:
        """Every agent's state, fetched in parallel (one thread per agent)."""
        urls = list(self.settings.agents)
        if len(urls) == 1:
            return {urls[0]: self.state(urls[0])}
        out: dict[str, AgentState | Down] = {}

        def one(u: str) -> None:
            out[u] = self.state(u)

        threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {u: out[u] for u in urls}

    def jobs(self, url: str) -> tuple[Job, ...] | Down:
        """The agent's jobs, running and recently finished."""

        def parse(data: Any) -> tuple[Job, ...]:
            jobs = _obj(data, "the jobs").get("jobs")
            if not isinstance(jobs, list):
                raise _Shape("field 'jobs' is not a list")
            return tuple(parse_job(j) for j in jobs)

        return self._agent_get(url, JOBS, parse)

    def decisions(self, url: str, limit: int = DECISIONS_LIMIT) -> tuple[Decision, ...] | Down:
        """The policy engine's latest decisions, oldest first."""

        def parse(data: Any) -> tuple[Decision, ...]:
            items = _obj(data, "the decisions").get("decisions")
            if not isinstance(items, list):
                raise _Shape("field 'decisions' is not a list")
            return tuple(sorted((parse_decision(d) for d in items), key=lambda d: d.time_s))

        return self._agent_get(url, f"{DECISIONS}?{urlencode({'limit': limit})}", parse)

    def policy(self, url: str) -> Policy | Down:
        """The policy engine's status (Down, status 404, when the agent runs none)."""
        return self._agent_get(url, POLICY, parse_policy)

    def history(
        self, url: str, window_s: float, *, max_points: int = HISTORY_POINTS
    ) -> History | Down:
        """The agent's history over the last ``window_s`` seconds (1..3600).

        At most ``max_points`` rows per GPU: a longer window is asked in steps of several
        seconds (:func:`history_step`), which the agent averages. The first call fetches the
        window; later ones the seconds since the last fetch (at the same step, the buckets
        aligned, so the newest bucket, still filling at the last fetch, is replaced whole), which
        are added to the rows kept (a longer window than kept fetches the whole window again).
        """
        window_s = min(max(float(window_s), 1.0), HISTORY_MAX_S)
        step = history_step(window_s, max_points)
        client = self._agents.get(url)
        if client is None:
            return Down(f"agent {url}", "not one of the dashboard's agents (--agent)")

        def fetch() -> History | Down:
            with self._history_lock:
                buffer = self._history.get((url, step))
            now = self._clock()
            if buffer is not None:
                with buffer.lock:
                    since = now - buffer.fetched_at_s
                    covered = buffer.span_s + since
                    if covered >= window_s - 1.0 or buffer.span_s >= HISTORY_MAX_S - 1.0:
                        seconds = min(max(math.ceil(since) + 1.0 + step, 2.0), HISTORY_MAX_S)
                        if seconds < window_s:
                            got = self._fetch_rows(client, seconds, step)
                            if isinstance(got, Down):
                                return got
                            self._merge(buffer, got, now, since)
                            return self._window(buffer, window_s, step)
            got = self._fetch_rows(client, window_s, step)
            if isinstance(got, Down):
                return got
            fresh = _HistoryBuffer(got, window_s, now)
            with self._history_lock:
                self._history[(url, step)] = fresh
            with fresh.lock:
                return self._window(fresh, window_s, step)

        return self.cache.get((url, HISTORY, window_s, step), self.ttl_s, fetch)

    def _fetch_rows(
        self, client: _Http, seconds: float, step: int
    ) -> dict[int, HistoryColumns] | Down:
        query = {"seconds": f"{seconds:g}"} | ({"step": str(step)} if step > 1 else {})
        path = f"{HISTORY}?{urlencode(query)}"
        answer = client.request("GET", path)
        if isinstance(answer, Down):
            return answer
        if answer.status >= 400:
            return Down(client.name, f"{_error_of(answer)} ({answer.status})", answer.status)
        try:
            return parse_history_rows(answer.body)
        except _Shape as e:
            return Down(client.name, f"unexpected answer to GET {path}: {e}")

    @staticmethod
    def _merge(
        buffer: _HistoryBuffer, new: dict[int, HistoryColumns], now: float, since: float
    ) -> None:
        """Add the rows fetched: from a GPU's first new row on, they replace the rows kept."""
        for index, rows in new.items():
            kept = buffer.rows.get(index)
            if kept is None:
                buffer.rows[index] = rows
                continue
            if not len(rows):
                continue
            cut = bisect.bisect_left(kept.timestamp_s, rows.timestamp_s[0])
            for old, added in zip(kept.columns(), rows.columns(), strict=True):
                del old[cut:]
                old.extend(added)
        newest = max((r.timestamp_s[-1] for r in buffer.rows.values() if len(r)), default=None)
        if newest is not None:
            horizon = newest - HISTORY_MAX_S
            for index, kept in buffer.rows.items():
                if len(kept) and kept.timestamp_s[0] <= horizon:
                    buffer.rows[index] = kept.cut(bisect.bisect_right(kept.timestamp_s, horizon))
        buffer.span_s = min(buffer.span_s + since, HISTORY_MAX_S)
        buffer.fetched_at_s = now

    @staticmethod
    def _window(buffer: _HistoryBuffer, window_s: float, step: int) -> History:
        newest = max((r.timestamp_s[-1] for r in buffer.rows.values() if len(r)), default=None)
        gpus: dict[int, GpuHistory] = {}
        for index, rows in sorted(buffer.rows.items()):
            lo = len(rows) if newest is None else bisect.bisect_right(
                rows.timestamp_s, newest - window_s
            )  # fmt: skip
            gpus[index] = _gpu_history(index, rows.cut(lo), step)
        return History(window_s, gpus)

    # ----------------------------------------------------------------- Prometheus
    def prometheus_query(self, expr: str) -> list[Sample] | Down | None:
        """An instant query (None: no Prometheus given)."""
        client = self._prometheus
        if client is None:
            return None

        def fetch() -> list[Sample] | Down:
            path = f"/api/v1/query?{urlencode({'query': expr})}"
            answer = client.request("GET", path)
            if isinstance(answer, Down):
                return answer
            if not isinstance(answer.body, dict):
                return Down(client.name, f"answered {answer.status} without JSON", answer.status)
            try:
                return parse_vector(answer.body)
            except _Shape as e:
                return Down(client.name, f"query {expr!r} failed: {e}", answer.status)

        return self.cache.get(("prometheus", expr), self.ttl_s, fetch)

    def fleet(self) -> FleetFromPrometheus | Down | None:
        """Nodes, power, budgets and energy from Prometheus (None: no Prometheus given)."""
        if self._prometheus is None:
            return None
        queries = {
            "power": "sum by (instance) (gpu_power_watts)",
            "up": "sum by (instance) (gpu_up)",
            "total": "count by (instance) (gpu_up)",
            # the budget in force: a live lease, else the node's (raw series: no rule needed)
            "budget": 'max by (instance) (wattwarden_power_budget_watts{scope="lease"}) or '
            'max by (instance) (wattwarden_power_budget_watts{scope="node"})',
            "1h": "sum by (instance) (increase(gpu_energy_joules_total[1h]))",
            "1d": "sum by (instance) (increase(gpu_energy_joules_total[1d]))",
        }
        values: dict[str, dict[str, float]] = {}
        for key, expr in queries.items():
            got = self.prometheus_query(expr)
            if isinstance(got, Down):
                return got
            assert got is not None
            values[key] = {s.labels.get("instance", ""): s.value for s in got}
        instances = sorted(set().union(*(v.keys() for v in values.values())))

        def count(key: str, inst: str) -> int | None:
            v = values[key].get(inst)
            return None if v is None else round(v)

        return FleetFromPrometheus(
            tuple(
                NodeSummary(
                    instance=inst,
                    power_w=values["power"].get(inst),
                    gpus_up=count("up", inst),
                    gpus_total=count("total", inst),
                    budget_w=values["budget"].get(inst),
                    energy_1h_j=values["1h"].get(inst),
                    energy_1d_j=values["1d"].get(inst),
                )
                for inst in instances
            )
        )

    # ----------------------------------------------------------------- Alertmanager
    def alerts(self) -> list[Alert] | Down | None:
        """Firing alerts (not silenced or inhibited); None: no Alertmanager given."""
        client = self._alertmanager
        if client is None:
            return None

        def fetch() -> list[Alert] | Down:
            query = urlencode({"active": "true", "silenced": "false", "inhibited": "false"})
            answer = client.request("GET", f"/api/v2/alerts?{query}")
            if isinstance(answer, Down):
                return answer
            if answer.status >= 400:
                return Down(client.name, f"{_error_of(answer)} ({answer.status})", answer.status)
            try:
                return parse_alerts(answer.body)
            except _Shape as e:
                return Down(client.name, f"unexpected answer to GET /api/v2/alerts: {e}")

        return self.cache.get(("alertmanager",), self.ttl_s, fetch)

    # ----------------------------------------------------------------- writes
    def token(self) -> str | None:
        """The write token: --token-file, else $WATTWARDEN_TOKEN, else the state dir's file.

        Raises OSError (with the file named) when --token-file cannot be read.
        """
        if self.settings.token_file is not None:
            path = Path(self.settings.token_file)
            token = path.read_text().strip()
            return token or None
        env = os.environ.get(ENV_TOKEN, "").strip()
        if env:
            return env
        try:
            return (default_state_dir() / TOKEN_FILE).read_text().strip() or None
        except OSError:
            return None

    def _write(self, url: str, path: str, body: Mapping[str, Any], done: str) -> ActionResult:
        client = self._agents.get(url)
        if client is None:
            return ActionResult(False, None, f"not one of the dashboard's agents: {url}")
        try:
            token = self.token()
        except OSError as e:
            return ActionResult(
                False, None, f"--token-file: cannot read {self.settings.token_file}: "
                f"{e.strerror or e}"
            )  # fmt: skip
        answer = client.request("POST", path, dict(body), token=token)
        self.invalidate(url)
        if isinstance(answer, Down):
            return ActionResult(False, None, f"no answer: {answer}")
        if answer.status >= 400:
            return ActionResult(
                False, answer.status, refusal_in_words(answer.status, _error_of(answer))
            )
        log.info("dashboard: %s on %s: %s", path, url, json.dumps(body))
        return ActionResult(True, answer.status, done, answer.body)

    def set_budget(self, url: str, watts: float | None) -> ActionResult:
        """``POST /api/v1/policy {"power_budget_watts": W}`` (None clears it)."""
        shown = "cleared" if watts is None else f"set to {watts:g} W"
        return self._write(url, POLICY, {"power_budget_watts": watts}, f"budget {shown}")

    def set_mode(self, url: str, mode: str) -> ActionResult:
        """``POST /api/v1/policy {"mode": "dry_run"|"apply"}``."""
        return self._write(url, POLICY, {"mode": mode}, f"mode set to {mode}")

    def set_power_limit(self, url: str, gpu: int, watts: float) -> ActionResult:
        """``POST /api/v1/power-limits {"gpu": i, "watts": W}``."""
        result = self._write(
            url, POWER_LIMITS, {"gpu": gpu, "watts": watts}, f"GPU {gpu} limit set"
        )
        if result.ok and isinstance(result.body, dict):
            enforced = result.body.get("enforced_watts")
            if isinstance(enforced, int | float):
                return ActionResult(
                    True, result.status, f"GPU {gpu} limit set: {enforced:g} W enforced",
                    result.body,
                )  # fmt: skip
        return result

    def migrate_job(self, url: str, name: str, gpu: int) -> ActionResult:
        """``POST /api/v1/jobs/{name}/migrate {"gpu": i}``."""
        path = f"{JOBS}/{quote(name, safe='')}/migrate"
        return self._write(url, path, {"gpu": gpu}, f"job {name} asked to move to GPU {gpu}")


def first_down(results: Iterable[object]) -> Down | None:
    """The first Down among results, if any."""
    return next((r for r in results if isinstance(r, Down)), None)
