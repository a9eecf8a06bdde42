"""The agent's HTTP contract, declared once: routes, request bodies with their checks, job JSON.

The server validates each body with the ``from_json`` of its request class (a 4xx naming the
field, never a 500); :class:`wattwarden.workloads.agent_client.AgentClient` builds its bodies with
``to_json`` and reads answers with :meth:`JobRecord.from_json` and
:meth:`EnergySnapshot.from_json`. A field, a bound or a route changes here, for both sides.

Errors are ``{"error": message}`` with a status (:class:`ApiError`); a message is one line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from wattwarden.collectors.jobs import COUNT_MAX, NAME_PATTERN, PID_MAX, JobView
from wattwarden.collectors.jobs import PRIORITIES as _PRIORITIES
from wattwarden.collectors.jobs import SchedulerRef as _SchedulerRef
from wattwarden.policies.base import Decision
from wattwarden.policies.control import (
    POLICY_NAMES,
    UNCHANGED,
    Lease,
    LoopStatus,
    MoveRecord,
    Unchanged,
    check_budget,
    check_controller,
    check_lease,
    check_mode,
    parse_policies,
)

PRIORITIES = _PRIORITIES
"""A job's priority: one of these (``normal`` when not given)."""
SchedulerRef = _SchedulerRef
"""Where a scheduler runs a job (a job's ``scheduler``): ``kind`` and ``id``."""

# ----------------------------------------------------------------------------------- routes
INDEX = "/"
METRICS = "/metrics"
HEALTHZ = "/healthz"
STATE = "/api/v1/state"
HISTORY = "/api/v1/history"
ENERGY = "/api/v1/energy"
JOBS = "/api/v1/jobs"
JOB = JOBS + "/{name}"
JOB_PROGRESS = JOB + "/progress"
JOB_MIGRATE = JOB + "/migrate"
POWER_LIMITS = "/api/v1/power-limits"
SIM_FAULTS = "/api/v1/sim/faults"
SIM_LOAD = "/api/v1/sim/load"
DECISIONS = "/api/v1/decisions"
POLICY = "/api/v1/policy"
POLICY_LEASE = POLICY + "/lease"


def job_path(route: str, name: str) -> str:
    """``route`` (:data:`JOB`, :data:`JOB_PROGRESS`, :data:`JOB_MIGRATE`) for the job ``name``."""
    return route.replace("{name}", quote(name, safe=""))


# ----------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error with an HTTP status, sent as ``{"error": message}``."""

    def __init__(self, status: HTTPStatus, message: str, *, challenge: str = "Bearer") -> None:
        super().__init__(message)
        self.status = status
        self.challenge = challenge


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(message: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message)


# ------------------------------------------------------------------------------------ bodies
MAX_JSON_DEPTH = 16
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def _json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest, counted without recursion (strings skipped)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRINGS.sub(b"", raw)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


class _NonFinite:
    """``NaN``, ``Infinity`` or ``-Infinity`` in a body: kept, so the field check can name it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; ApiError (400) naming what is wrong."""
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise _bad(f"body is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        body = json.loads(raw or b"null", parse_constant=_NonFinite)
    except ValueError as e:
        raise _bad(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("body must be a JSON object")
    return body


# ------------------------------------------------------------------------------------ fields
def _required(body: dict[str, Any], key: str) -> Any:
    if key not in body:
        raise _bad(f"missing field {key!r}")
    return body[key]


def integer(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """Field ``key``: an integer (not a bool) within ``lo..hi``; else 400 naming it."""
    value = _required(body, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"field {key!r} must be an integer, got {_short(value)}")
    if not lo <= value <= hi:
        raise _bad(f"field {key!r} must be within {lo}..{hi}, got {_short(value)}")
    return value


def number(body: dict[str, Any], key: str) -> float:
    """Field ``key``: a finite number (not a bool), as a float; else 400 naming it."""
    value = _required(body, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"field {key!r} must be a number, got {_short(value)}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise _bad(f"field {key!r} must be a finite number, got {_short(value)}")
    return result


def _flag(body: dict[str, Any], key: str) -> bool:
    """Optional field ``key``: true or false (absent or null: false); else 400 naming it."""
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"field {key!r} must be true or false, got {_short(value)}")
    return value


def string(body: dict[str, Any], key: str) -> str:
    """Field ``key``: a string; else 400 naming it."""
    value = _required(body, key)
    if not isinstance(value, str):
        raise _bad(f"field {key!r} must be a string, got {_short(value)}")
    return value


def gpu_index(body: dict[str, Any], count: int) -> int:
    """Field ``gpu``: an integer index below ``count``; 400 if not an integer, 404 if no GPU."""
    value = _required(body, "gpu")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"field 'gpu' must be an integer, got {_short(value)}")
    if not 0 <= value < count:
        raise ApiError(
            HTTPStatus.NOT_FOUND, f"field 'gpu': no GPU {_short(value)} (this node has {count})"
        )
    return value


def valid_job_name(name: str) -> bool:
    """Whether ``name`` is a job name the agent takes (1-64 of A-Z a-z 0-9 _ . : -)."""
    return bool(NAME_PATTERN.fullmatch(name))


# ---------------------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class JobRegistration:
    """``POST /api/v1/jobs``: a job's process on a GPU (201 new, 200 moved, 409 name taken)."""

    name: str
    pid: int
    gpu: int
    priority: str = "normal"
    utilization: float | None = None
    """The load a simulated GPU gets from the job, in (0, 1]; None for the agent's default."""
    tune: bool = False
    """The energy tuner may choose the job's power limit (``job run --tune``)."""
    migratable: bool = False
    """A supervisor follows the job's ``target_gpu`` (``job run`` sets it): the policy engine
    moves only such jobs."""
    scheduler: SchedulerRef | None = None
    """Where a scheduler runs the job: ``{"kind": "kubernetes", "id": "NAMESPACE/POD"}`` or
    ``{"kind": "slurm", "id": "JOBID"}`` (``job run`` fills it from the environment), or null."""

    @classmethod
    def from_json(cls, body: dict[str, Any], gpu_count: int) -> JobRegistration:
        """Checked, field by field in this order; ApiError naming the first bad one."""
        name = string(body, "name")
        if not valid_job_name(name):
            raise _bad(
                f"field 'name' must be 1-64 of A-Z a-z 0-9 _ . : - starting with a letter or "
                f"digit, got {_short(name)}"
            )
        pid = integer(body, "pid", 1, PID_MAX)
        gpu = gpu_index(body, gpu_count)
        priority = body.get("priority", "normal")
        if priority not in PRIORITIES:
            raise _bad(f"field 'priority' must be one of {', '.join(PRIORITIES)}")
        utilization = None
        if body.get("utilization") is not None:
            utilization = number(body, "utilization")
            if not 0.0 < utilization <= 1.0:
                raise _bad(f"field 'utilization' must be within (0, 1], got {utilization}")
        tune = _flag(body, "tune")
        migratable = _flag(body, "migratable")
        return cls(name, pid, gpu, priority, utilization, tune, migratable, _scheduler(body))

    def to_json(self) -> dict[str, Any]:
        """The body (``utilization`` only where given)."""
        body: dict[str, Any] = {
            "name": self.name, "pid": self.pid, "gpu": self.gpu, "priority": self.priority,
        }  # fmt: skip
        if self.utilization is not None:
            body["utilization"] = self.utilization
        if self.tune:
            body["tune"] = True
        if self.migratable:
            body["migratable"] = True
        if self.scheduler is not None:
            body["scheduler"] = {"kind": self.scheduler.kind, "id": self.scheduler.id}
        return body


def _scheduler(body: dict[str, Any]) -> SchedulerRef | None:
    """Optional field ``scheduler``: null, or ``{"kind": ..., "id": ...}``; else 400 naming it."""
    value = body.get("scheduler")
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"kind", "id"}:
        raise _bad(f"field 'scheduler' must be null or {{\"kind\": ..., \"id\": ...}}, got "
                   f"{_short(value)}")  # fmt: skip
    try:
        return SchedulerRef.checked(value["kind"], value["id"])
    except ValueError as e:
        raise _bad(f"field 'scheduler': {e}") from None


@dataclass(frozen=True, slots=True)
class JobProgress:
    """``POST /api/v1/jobs/{name}/progress``: cumulative counts, each within 0..2**63-1."""

    step: int
    samples: int
    tokens: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> JobProgress:
        """Checked in the order step, samples, tokens."""
        return cls(*(integer(body, k, 0, COUNT_MAX) for k in ("step", "samples", "tokens")))

    def to_json(self) -> dict[str, Any]:
        """The body."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Migration:
    """``POST /api/v1/jobs/{name}/migrate``: the GPU the job's supervisor should move it to."""

    gpu: int

    @classmethod
    def from_json(cls, body: dict[str, Any], gpu_count: int) -> Migration:
        """Checked against this node's GPUs."""
        return cls(gpu_index(body, gpu_count))

    def to_json(self) -> dict[str, Any]:
        """The body."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class PowerLimitRequest:
    """``POST /api/v1/power-limits`` (409 in dry-run, 422 out of range, 429 too soon)."""

    gpu: int
    watts: float

    @classmethod
    def from_json(cls, body: dict[str, Any], gpu_count: int) -> PowerLimitRequest:
        """Checked in the order gpu, watts."""
        gpu = gpu_index(body, gpu_count)
        return cls(gpu, number(body, "watts"))

    def to_json(self) -> dict[str, Any]:
        """The body."""
        return asdict(self)


SIM_FAULT_PARAMS = frozenset({"delta_c", "xid", "field"})


@dataclass(frozen=True, slots=True)
class SimFault:
    """``POST /api/v1/sim/faults``: a fault on a simulated GPU, with its parameters."""

    gpu: int
    fault: str
    params: dict[str, Any] = field(default_factory=dict)
    """Any of ``delta_c``, ``xid``, ``field``; the simulated GPU checks their values (422)."""

    @classmethod
    def from_json(cls, body: dict[str, Any], gpu_count: int) -> SimFault:
        """Checked in the order gpu, fault, parameter names."""
        gpu = gpu_index(body, gpu_count)
        fault = string(body, "fault")
        params = {k: v for k, v in body.items() if k not in ("gpu", "fault")}
        unknown = sorted(set(params) - SIM_FAULT_PARAMS)
        if unknown:
            raise _bad(f"field {_short(unknown[0])} is not a fault parameter")
        return cls(gpu, fault, params)

    def to_json(self) -> dict[str, Any]:
        """The body."""
        return {"gpu": self.gpu, "fault": self.fault, **self.params}


@dataclass(frozen=True, slots=True)
class SimLoad:
    """``POST /api/v1/sim/load``: a synthetic load on one simulated GPU."""

    gpu: int
    utilization: float
    memory_bytes: int | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any], gpu_count: int) -> SimLoad:
        """Checked in the order gpu, utilization, memory_bytes (optional)."""
        gpu = gpu_index(body, gpu_count)
        utilization = number(body, "utilization")
        memory = None
        if body.get("memory_bytes") is not None:
            memory = integer(body, "memory_bytes", 0, COUNT_MAX)
        return cls(gpu, utilization, memory)

    def to_json(self) -> dict[str, Any]:
        """The body (``memory_bytes`` only where given)."""
        body: dict[str, Any] = {"gpu": self.gpu, "utilization": self.utilization}
        if self.memory_bytes is not None:
            body["memory_bytes"] = self.memory_bytes
        return body


def _unprocessable(message: str) -> ApiError:
    return ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, message)


@dataclass(frozen=True, slots=True)
class PolicyUpdate:
    """``POST /api/v1/policy``: change the budget, the mode and which policies run.

    Every field is optional (absent: unchanged); ``power_budget_watts`` null clears the budget.
    Values are checked as the agent's settings of the same meaning are (the same bounds and
    names: ``power_budget_watts``, ``--apply`` as ``mode``, ``policy`` as ``policies``); a bad
    one, or a key that is none of these, is a 422 naming the field.
    """

    power_budget_watts: float | Unchanged | None = UNCHANGED
    """Watts (1..1e6), None to clear it, or :data:`UNCHANGED`."""
    mode: str | None = None
    """``dry_run`` or ``apply``; unchanged when None. Leaving apply restores every limit."""
    policies: tuple[str, ...] | None = None
    """The policies to run (the others stop); unchanged when None."""

    FIELDS = ("power_budget_watts", "mode", "policies")

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PolicyUpdate:
        """Checked: unknown keys first, then power_budget_watts, mode, policies."""
        unknown = sorted(set(body) - set(cls.FIELDS))
        if unknown:
            raise _unprocessable(
                f"field {_short(unknown[0])} is not a policy setting "
                f"(known: {', '.join(sorted(cls.FIELDS))})"
            )
        budget: float | Unchanged | None = UNCHANGED
        if "power_budget_watts" in body:
            try:
                budget = check_budget(body["power_budget_watts"])
            except ValueError as e:
                raise _unprocessable(f"field 'power_budget_watts' {e}") from None
        mode = None
        if "mode" in body:
            try:
                mode = check_mode(body["mode"])
            except ValueError as e:
                raise _unprocessable(f"field 'mode' {e}") from None
        policies = None
        if "policies" in body:
            try:
                policies = parse_policies(body["policies"])
            except ValueError as e:
                raise _unprocessable(f"field 'policies' {e}") from None
        return cls(budget, mode, policies)

    def to_json(self) -> dict[str, Any]:
        """The body: only the fields that change something."""
        body: dict[str, Any] = {}
        if not isinstance(self.power_budget_watts, Unchanged):
            body["power_budget_watts"] = self.power_budget_watts
        if self.mode is not None:
            body["mode"] = self.mode
        if self.policies is not None:
            body["policies"] = list(self.policies)
        return body


def _unknown_keys(body: dict[str, Any], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise _unprocessable(
            f"field {_short(unknown[0])} is not {what} (known: {', '.join(sorted(known))})"
        )


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """``POST /api/v1/policy/lease``: a fleet controller's budget for this node, for a while.

    Every field is required: ``power_budget_watts`` (a finite number > 0), ``ttl_s``
    (1..3600), ``holder`` (the controller's id: 1-128 of A-Z a-z 0-9 _ . : @ / -) and
    ``generation`` (an integer 0..2**63-1). A bad one, or a key that is none of these, is a
    422 naming the field. 409 when another controller holds a live lease, or the holder sends
    a lower generation.
    """

    power_budget_watts: float
    ttl_s: float
    holder: str
    generation: int

    FIELDS = ("power_budget_watts", "ttl_s", "holder", "generation")

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> LeaseRequest:
        """Checked: unknown keys first, then each field in :attr:`FIELDS` order."""
        _unknown_keys(body, cls.FIELDS, "a lease field")
        for key in cls.FIELDS:
            if key not in body:
                raise _unprocessable(f"field {key!r} is missing")
        values = [body[key] for key in cls.FIELDS]
        try:
            check_lease(*values)
        except ValueError as e:
            key, _, problem = str(e).partition(" ")
            raise _unprocessable(f"field {key!r} {problem}") from None
        budget, ttl, holder, generation = values
        return cls(float(budget), float(ttl), holder, generation)

    def to_json(self) -> dict[str, Any]:
        """The body."""
        body = asdict(self)
        if float(self.ttl_s).is_integer():
            body["ttl_s"] = int(self.ttl_s)
        return body


@dataclass(frozen=True, slots=True)
class LeaseRelease:
    """``DELETE /api/v1/policy/lease``: the holder gives its lease up (another id: 409)."""

    holder: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> LeaseRelease:
        """Checked: unknown keys, then ``holder``; 422 naming the field."""
        _unknown_keys(body, ("holder",), "a lease release field")
        if "holder" not in body:
            raise _unprocessable("field 'holder' is missing")
        try:
            return cls(check_controller(body["holder"]))
        except ValueError as e:
            raise _unprocessable(f"field 'holder' {str(e).partition(' ')[2]}") from None

    def to_json(self) -> dict[str, Any]:
        """The body."""
        return asdict(self)


# --------------------------------------------------------------------------------- responses
class ContractError(ValueError):
    """An answer that does not have the contract's shape."""


def _typed(data: dict[str, Any], key: str, kinds: tuple[type, ...], optional: bool) -> Any:
    value: Any = data.get(key)
    if value is None and optional:
        return False if kinds == (bool,) else None
    ok = isinstance(value, kinds) and (kinds == (bool,) or not isinstance(value, bool))
    if not ok:
        raise ContractError(f"field {key!r} is {_short(value)}")
    return float(value) if float in kinds else value


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as the API answers it (its fields are the JSON keys): running, or finished.

    A finished job stays readable for a bounded retention, with its totals.
    """

    name: str
    state: str
    """``running`` or ``finished``."""
    pid: int
    gpu: int
    priority: str
    registered_at: float
    """Wall-clock time, seconds since the epoch."""
    finished_at: float | None
    duration_seconds: float
    step: int
    samples: int
    tokens: int
    target_gpu: int | None
    """The GPU the agent asks the job's supervisor to move it to."""
    tune: bool
    migratable: bool
    migrations: int
    """Moves to another GPU completed (0 from an agent that does not count them)."""
    energy_joules: float
    energy_joules_by_gpu: dict[str, float]
    power_watts: float
    mean_power_watts: float | None
    tokens_per_joule: float | None
    scheduler: dict[str, str] | None = None
    """Where a scheduler runs the job (``kind``, ``id``), as it registered; null if it did not
    say (or the agent predates the field)."""

    @classmethod
    def from_view(cls, job: JobView) -> JobRecord:
        """The record of a job the registry holds."""
        return cls(
            name=job.name,
            state=job.state,
            pid=job.pid,
            gpu=job.gpu,
            priority=job.priority,
            registered_at=job.registered_at_s,
            finished_at=job.finished_at_s,
            duration_seconds=job.duration_s,
            step=job.step,
            samples=job.samples,
            tokens=job.tokens,
            target_gpu=job.target_gpu,
            tune=job.tune,
            migratable=job.migratable,
            migrations=job.migrations,
            energy_joules=job.energy_j,
            energy_joules_by_gpu={str(k): v for k, v in sorted(job.energy_by_gpu_j.items())},
            power_watts=job.power_w,
            mean_power_watts=job.mean_power_w,
            tokens_per_joule=job.tokens_per_joule,
            scheduler=None
            if job.scheduler is None
            else {"kind": job.scheduler.kind, "id": job.scheduler.id},
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> JobRecord:
        """A record from an answer; ContractError naming the first field out of shape."""
        if not isinstance(data, dict):
            raise ContractError(f"a job is {_short(data)}, not an object")
        by_gpu = data.get("energy_joules_by_gpu")
        if not isinstance(by_gpu, dict):
            raise ContractError(f"field 'energy_joules_by_gpu' is {_short(by_gpu)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "energy_joules_by_gpu":
                values[f.name] = {str(k): _typed(by_gpu, k, (int, float), False) for k in by_gpu}
                continue
            kinds, optional = _JOB_TYPES[f.name]
            values[f.name] = _typed(data, f.name, kinds, optional)
        if values["migrations"] is None:  # an agent from before the count
            values["migrations"] = 0
        scheduler = values["scheduler"]
        if scheduler is not None and not (
            set(scheduler) == {"kind", "id"} and all(isinstance(v, str) for v in scheduler.values())
        ):
            raise ContractError(f"field 'scheduler' is {_short(scheduler)}")
        return cls(**values)


_NUMBER = (int, float)
_JOB_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), False),
    "state": ((str,), False),
    "pid": ((int,), False),
    "gpu": ((int,), False),
    "priority": ((str,), False),
    "registered_at": (_NUMBER, False),
    "finished_at": (_NUMBER, True),
    "duration_seconds": (_NUMBER, False),
    "step": ((int,), False),
    "samples": ((int,), False),
    "tokens": ((int,), False),
    "target_gpu": ((int,), True),
    "tune": ((bool,), True),
    "migratable": ((bool,), True),
    "migrations": ((int,), True),
    "energy_joules": (_NUMBER, False),
    "power_watts": (_NUMBER, False),
    "mean_power_watts": (_NUMBER, True),
    "tokens_per_joule": (_NUMBER, True),
    "scheduler": ((dict,), True),
}
"""JSON types of :class:`JobRecord`'s fields (numbers are read as floats), and which may be null."""


@dataclass(frozen=True, slots=True)
class GpuEnergy:
    """One GPU's hardware energy counter as the agent read it."""

    index: int
    uuid: str
    energy_j: float | None


@dataclass(frozen=True, slots=True)
class EnergySnapshot:
    """``GET /api/v1/energy``: counters read at request time."""

    timestamp_s: float
    gpus: tuple[GpuEnergy, ...]
    host_j: dict[str, float]

    @classmethod
    def from_json(cls, data: Any) -> EnergySnapshot:
        """The snapshot from an answer; ContractError where it is out of shape."""
        try:
            gpus = tuple(
                GpuEnergy(
                    index=int(g["index"]),
                    uuid=str(g.get("uuid", "")),
                    energy_j=None if g.get("energy_joules") is None else float(g["energy_joules"]),
                )
                for g in data["gpus"]
            )
            host = {
                str(h["domain"]): float(h["energy_joules"])
                for h in data.get("host") or []
                if h.get("energy_joules") is not None
            }
            return cls(float(data["timestamp"]), gpus, host)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ContractError(str(e)) from e


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A live lease as the API answers it (its fields are the JSON keys)."""

    power_budget_watts: float
    ttl_s: float
    holder: str
    """The id of the controller that holds it."""
    generation: int
    expires_at: float
    """Wall-clock time it runs out at, seconds since the epoch (the agent decides on its own
    monotonic clock: ``remaining_s`` is what counts)."""
    remaining_s: float
    """Seconds it had left when the answer was made."""

    @classmethod
    def from_lease(cls, lease: Lease, remaining_s: float) -> LeaseRecord:
        """The record of the loop's lease."""
        return cls(
            lease.budget_w, lease.ttl_s, lease.controller, lease.generation,
            lease.expires_at_s, round(remaining_s, 3),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> LeaseRecord:
        """A record from an answer; ContractError naming the first field out of shape."""
        if not isinstance(data, dict):
            raise ContractError(f"a lease is {_short(data)}, not an object")
        return cls(
            power_budget_watts=_typed(data, "power_budget_watts", _NUMBER, False),
            ttl_s=_typed(data, "ttl_s", _NUMBER, False),
            holder=_typed(data, "holder", (str,), False),
            generation=_typed(data, "generation", (int,), False),
            expires_at=_typed(data, "expires_at", _NUMBER, False),
            remaining_s=_typed(data, "remaining_s", _NUMBER, False),
        )


def lease_json(status: LoopStatus) -> dict[str, Any]:
    """``GET /api/v1/policy/lease`` (and the answer of ``POST``/``DELETE``)."""
    lease = status.lease
    return {
        "lease": None
        if lease is None
        else LeaseRecord.from_lease(lease, status.lease_remaining_s or 0.0).to_json(),
        "local_power_budget_watts": status.local_power_budget_w,
    }


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    """``GET /api/v1/policy`` (and the answer of ``POST``): the engine as it runs now."""

    mode: str
    """``dry_run`` or ``apply`` in force (``dry_run`` after a fallback)."""
    power_budget_watts: float | None
    """The budget in force, or null."""
    policies: dict[str, bool]
    """Every policy by name: on or off."""
    fallback: str | None
    """Why ``apply`` fell back to dry-run (the driver refused permission), else null."""
    holding: str | None
    """Why the engine holds (stale or lost readings, a failing policy), else null."""
    budget_unreachable: bool
    period_seconds: float
    periods: int
    errors_total: int
    """Periods a policy failed in (each one held)."""
    last_error: str | None
    restore_failures: list[str] = field(default_factory=list)
    """After a switch out of apply mode: limits that could not be restored (journalled)."""
    local_power_budget_watts: float | None = None
    """The node's own budget, in force while no lease is live."""
    lease: LeaseRecord | None = None
    """A fleet controller's live lease (its budget is the one in force), else null."""
    lease_expirations: int = 0
    """Leases that ran out without a renewal since the agent started."""

    @classmethod
    def from_status(cls, status: LoopStatus) -> PolicyStatus:
        """The answer for the control loop's status."""
        return cls(
            mode=status.mode,
            power_budget_watts=status.power_budget_w,
            policies=dict(status.policies),
            fallback=status.fallback,
            holding=status.holding,
            budget_unreachable=status.budget_unreachable,
            period_seconds=status.period_s,
            periods=status.periods,
            errors_total=status.errors_total,
            last_error=status.last_error,
            restore_failures=list(status.restore_failures),
            local_power_budget_watts=status.local_power_budget_w,
            lease=None
            if status.lease is None
            else LeaseRecord.from_lease(status.lease, status.lease_remaining_s or 0.0),
            lease_expirations=status.lease_expirations,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> PolicyStatus:
        """A status from an answer; ContractError naming the first field out of shape."""
        if not isinstance(data, dict):
            raise ContractError(f"a policy status is {_short(data)}, not an object")
        policies = data.get("policies")
        if not isinstance(policies, dict) or not all(
            k in POLICY_NAMES and isinstance(v, bool) for k, v in policies.items()
        ):
            raise ContractError(f"field 'policies' is {_short(policies)}")
        failures = data.get("restore_failures", [])
        if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
            raise ContractError(f"field 'restore_failures' is {_short(failures)}")
        return cls(
            mode=_typed(data, "mode", (str,), False),
            power_budget_watts=_typed(data, "power_budget_watts", _NUMBER, True),
            policies=dict(policies),
            fallback=_typed(data, "fallback", (str,), True),
            holding=_typed(data, "holding", (str,), True),
            budget_unreachable=_typed(data, "budget_unreachable", (bool,), False),
            period_seconds=_typed(data, "period_seconds", _NUMBER, False),
            periods=_typed(data, "periods", (int,), False),
            errors_total=_typed(data, "errors_total", (int,), False),
            last_error=_typed(data, "last_error", (str,), True),
            restore_failures=list(failures),
            local_power_budget_watts=_typed(data, "local_power_budget_watts", _NUMBER, True),
            lease=None if data.get("lease") is None else LeaseRecord.from_json(data["lease"]),
            lease_expirations=_typed(data, "lease_expirations", (int,), True) or 0,
        )


DECISIONS_DEFAULT = 100
DECISIONS_MAX = 2000


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One entry of ``GET /api/v1/decisions``: a limit set, a hold, or a job move.

    ``action`` is ``set`` (a new limit: made in apply mode, recorded in dry-run), ``hold`` (no
    decision: stale or lost readings) or ``migrate`` (a job moved from ``gpu`` to ``to_gpu``);
    ``policy`` is the one whose intent won (``engine`` for holds and for going back to the
    limit a GPU had before, ``migration`` for moves), and ``intents`` every policy's wish for
    the GPU with its reason, the losers' too.
    """

    time: float
    """Wall-clock time of the period, seconds since the epoch."""
    gpu: int
    policy: str
    action: str
    reason: str
    mode: str
    jobs: list[str]
    """The running jobs on the GPU (for a move: the job moved)."""
    from_watts: float | None
    """The limit before (the engine's would-be limit in dry-run)."""
    to_watts: float | None
    """The limit decided; null for a hold or a move."""
    enforced_watts: float | None
    """After a set in apply mode: the limit the driver enforces, read back."""
    error: str | None
    """Why a set (or a move) was refused."""
    to_gpu: int | None = None
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every policy's intent by policy name: ``{"watts": W, "reason": "..."}``."""

    @classmethod
    def from_decision(cls, d: Decision) -> DecisionRecord:
        """A limit decision of the engine."""
        return cls(
            time=d.timestamp_s,
            gpu=d.gpu,
            policy=d.policy,
            action=d.action,
            reason=d.reason,
            mode=d.mode,
            jobs=list(d.jobs),
            from_watts=d.from_w,
            to_watts=d.watts,
            enforced_watts=d.enforced_w,
            error=d.error,
            intents={
                name: {"watts": i.watts, "reason": i.reason}
                for name, i in sorted(d.intents.items())
            },
        )

    @classmethod
    def from_move(cls, m: MoveRecord) -> DecisionRecord:
        """A job move of the control loop."""
        return cls(
            time=m.timestamp_s,
            gpu=m.from_gpu,
            policy="migration",
            action="migrate",
            reason=m.explanation,
            mode=m.mode,
            jobs=[m.job],
            from_watts=None,
            to_watts=None,
            enforced_watts=None,
            error=m.error,
            to_gpu=m.to_gpu,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> DecisionRecord:
        """A record from an answer; ContractError naming the first field out of shape."""
        if not isinstance(data, dict):
            raise ContractError(f"a decision is {_short(data)}, not an object")
        jobs = data.get("jobs")
        if not isinstance(jobs, list) or not all(isinstance(j, str) for j in jobs):
            raise ContractError(f"field 'jobs' is {_short(jobs)}")
        intents = data.get("intents", {})
        if not isinstance(intents, dict):
            raise ContractError(f"field 'intents' is {_short(intents)}")
        return cls(
            time=_typed(data, "time", _NUMBER, False),
            gpu=_typed(data, "gpu", (int,), False),
            policy=_typed(data, "policy", (str,), False),
            action=_typed(data, "action", (str,), False),
            reason=_typed(data, "reason", (str,), False),
            mode=_typed(data, "mode", (str,), False),
            jobs=list(jobs),
            from_watts=_typed(data, "from_watts", _NUMBER, True),
            to_watts=_typed(data, "to_watts", _NUMBER, True),
            enforced_watts=_typed(data, "enforced_watts", _NUMBER, True),
            error=_typed(data, "error", (str,), True),
            to_gpu=_typed(data, "to_gpu", (int,), True),
            intents=dict(intents),
        )


def decision_record(d: Decision | MoveRecord) -> DecisionRecord:
    """The answer's record of a decision or a move."""
    return (
        DecisionRecord.from_move(d)
        if isinstance(d, MoveRecord)
        else DecisionRecord.from_decision(d)
    )
