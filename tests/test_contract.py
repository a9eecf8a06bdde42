"""The HTTP contract on its own: request bodies both ways, their checks, and the answers (jobs,
energy, the policy status, decisions)."""

from __future__ import annotations

import json
import string
from dataclasses import fields
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattwarden.api.contract import (
    JOB,
    JOB_MIGRATE,
    JOB_PROGRESS,
    JOBS,
    ApiError,
    ContractError,
    DecisionRecord,
    EnergySnapshot,
    GpuEnergy,
    JobProgress,
    JobRecord,
    JobRegistration,
    Migration,
    PolicyStatus,
    PowerLimitRequest,
    SchedulerRef,
    SimFault,
    SimLoad,
    decision_record,
    job_path,
    parse_body,
    valid_job_name,
)
from wattwarden.api.server import energy_json
from wattwarden.collectors.jobs import COUNT_MAX, PID_MAX
from wattwarden.hardware.errors import NotSupported
from wattwarden.policies.base import Decision, Intent
from wattwarden.policies.control import LoopStatus, MoveRecord

GPUS = 8
COUNTS = st.integers(0, COUNT_MAX)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True)


def wire(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as the other side reads it: through JSON text and :func:`parse_body`."""
    return parse_body(json.dumps(body).encode())


# ------------------------------------------------------------------- a body the client builds
SLURM_REFS = st.builds(SchedulerRef, st.just("slurm"), st.integers(0, 10**12).map(str))
POD_REFS = st.builds(
    SchedulerRef,
    st.just("kubernetes"),
    st.from_regex(r"[a-z0-9]{1,20}/[a-z0-9][a-z0-9.-]{0,40}[a-z0-9]", fullmatch=True),
)


@settings(deadline=None)
@given(name=NAMES, pid=st.integers(1, PID_MAX), gpu=st.integers(0, GPUS - 1),
       priority=st.sampled_from(["high", "normal", "low"]),
       utilization=st.none() | st.floats(0.0, 1.0, exclude_min=True),
       tune=st.booleans(), migratable=st.booleans(),
       scheduler=st.none() | SLURM_REFS | POD_REFS)  # fmt: skip
def test_a_registration_reads_back_as_sent(
    name: str, pid: int, gpu: int, priority: str, utilization: float | None, tune: bool,
    migratable: bool, scheduler: SchedulerRef | None,
) -> None:  # fmt: skip
    sent = JobRegistration(name, pid, gpu, priority, utilization, tune, migratable, scheduler)
    assert JobRegistration.from_json(wire(sent.to_json()), GPUS) == sent


@settings(deadline=None)
@given(step=COUNTS, samples=COUNTS, tokens=COUNTS)
def test_progress_reads_back_as_sent(step: int, samples: int, tokens: int) -> None:
    sent = JobProgress(step, samples, tokens)
    assert JobProgress.from_json(wire(sent.to_json())) == sent


@given(gpu=st.integers(0, GPUS - 1))
def test_a_migration_reads_back_as_sent(gpu: int) -> None:
    sent = Migration(gpu)
    assert sent.to_json() == {"gpu": gpu}
    assert Migration.from_json(wire(sent.to_json()), GPUS) == sent


@settings(deadline=None)
@given(gpu=st.integers(0, GPUS - 1), watts=FINITE)
def test_a_power_limit_request_reads_back_as_sent(gpu: int, watts: float) -> None:
    sent = PowerLimitRequest(gpu, watts)
    assert sent.to_json() == {"gpu": gpu, "watts": watts}
    assert PowerLimitRequest.from_json(wire(sent.to_json()), GPUS) == sent


@settings(deadline=None)
@given(gpu=st.integers(0, GPUS - 1), fault=st.text(max_size=20),
       params=st.dictionaries(st.sampled_from(["delta_c", "xid", "field"]),
                              st.integers() | FINITE | st.text(max_size=8)))  # fmt: skip
def test_a_sim_fault_reads_back_as_sent_with_its_parameters_at_the_top_level(
    gpu: int, fault: str, params: dict[str, Any]
) -> None:
    sent = SimFault(gpu, fault, params)
    assert sent.to_json() == {"gpu": gpu, "fault": fault, **params}
    assert SimFault.from_json(wire(sent.to_json()), GPUS) == sent


@settings(deadline=None)
@given(gpu=st.integers(0, GPUS - 1), utilization=FINITE, memory=st.none() | COUNTS)
def test_a_sim_load_reads_back_as_sent(gpu: int, utilization: float, memory: int | None) -> None:
    sent = SimLoad(gpu, utilization, memory)
    assert SimLoad.from_json(wire(sent.to_json()), GPUS) == sent


def test_optional_fields_are_in_a_body_only_where_given() -> None:
    assert JobRegistration("j", 1, 0).to_json() == {
        "name": "j", "pid": 1, "gpu": 0, "priority": "normal",
    }  # fmt: skip
    assert JobRegistration("j", 1, 0, "low", 0.5).to_json()["utilization"] == 0.5
    assert JobRegistration("j", 1, 0, tune=True).to_json()["tune"] is True
    assert JobRegistration("j", 1, 0, migratable=True).to_json()["migratable"] is True
    assert SimLoad(2, 0.5).to_json() == {"gpu": 2, "utilization": 0.5}
    assert SimLoad(2, 0.5, 1024).to_json() == {"gpu": 2, "utilization": 0.5, "memory_bytes": 1024}
    assert JobProgress(1, 2, 3).to_json() == {"step": 1, "samples": 2, "tokens": 3}


# ------------------------------------------------------------- each field's bounds, each message
def _registration(**over: Any) -> dict[str, Any]:
    return {"name": "train", "pid": 10, "gpu": 0, **over}


_WITHIN_PID = f"within 1..{PID_MAX}"
_WITHIN_COUNT = f"within 0..{COUNT_MAX}"
_NAME_RULE = "1-64 of A-Z a-z 0-9 _ . : - starting with a letter or digit"
REFUSED: list[tuple[str, Any, dict[str, Any], HTTPStatus, str]] = [
    # (case, request class, body, status, the whole message)
    ("name missing", JobRegistration, {"pid": 1, "gpu": 0}, HTTPStatus.BAD_REQUEST,
     "missing field 'name'"),
    ("name a number", JobRegistration, _registration(name=5), HTTPStatus.BAD_REQUEST,
     "field 'name' must be a string, got 5"),
    ("name starts with -", JobRegistration, _registration(name="-x"), HTTPStatus.BAD_REQUEST,
     f"field 'name' must be {_NAME_RULE}, got '-x'"),
    ("name 65 long", JobRegistration, _registration(name="a" * 65), HTTPStatus.BAD_REQUEST,
     f"field 'name' must be {_NAME_RULE}, got '{'a' * 36}..."),
    ("pid missing", JobRegistration, {"name": "j", "gpu": 0}, HTTPStatus.BAD_REQUEST,
     "missing field 'pid'"),
    ("pid 0", JobRegistration, _registration(pid=0), HTTPStatus.BAD_REQUEST,
     f"field 'pid' must be {_WITHIN_PID}, got 0"),
    ("pid 2**31", JobRegistration, _registration(pid=PID_MAX + 1), HTTPStatus.BAD_REQUEST,
     f"field 'pid' must be {_WITHIN_PID}, got {PID_MAX + 1}"),
    ("pid a bool", JobRegistration, _registration(pid=True), HTTPStatus.BAD_REQUEST,
     "field 'pid' must be an integer, got True"),
    ("pid a float", JobRegistration, _registration(pid=1.0), HTTPStatus.BAD_REQUEST,
     "field 'pid' must be an integer, got 1.0"),
    ("gpu missing", JobRegistration, {"name": "j", "pid": 1}, HTTPStatus.BAD_REQUEST,
     "missing field 'gpu'"),
    ("gpu a string", JobRegistration, _registration(gpu="0"), HTTPStatus.BAD_REQUEST,
     "field 'gpu' must be an integer, got '0'"),
    ("gpu past the last", JobRegistration, _registration(gpu=GPUS), HTTPStatus.NOT_FOUND,
     f"field 'gpu': no GPU {GPUS} (this node has {GPUS})"),
    ("gpu negative", JobRegistration, _registration(gpu=-1), HTTPStatus.NOT_FOUND,
     f"field 'gpu': no GPU -1 (this node has {GPUS})"),
    ("priority unknown", JobRegistration, _registration(priority="urgent"),
     HTTPStatus.BAD_REQUEST, "field 'priority' must be one of high, normal, low"),
    ("utilization 0", JobRegistration, _registration(utilization=0), HTTPStatus.BAD_REQUEST,
     "field 'utilization' must be within (0, 1], got 0.0"),
    ("utilization over 1", JobRegistration, _registration(utilization=1.5),
     HTTPStatus.BAD_REQUEST, "field 'utilization' must be within (0, 1], got 1.5"),
    ("utilization a string", JobRegistration, _registration(utilization="1"),
     HTTPStatus.BAD_REQUEST, "field 'utilization' must be a number, got '1'"),
    ("utilization too big a float", JobRegistration, _registration(utilization=10**400),
     HTTPStatus.BAD_REQUEST,
     f"field 'utilization' must be a finite number, got {'1' + '0' * 36}..."),
    ("tune a number", JobRegistration, _registration(tune=1), HTTPStatus.BAD_REQUEST,
     "field 'tune' must be true or false, got 1"),
    ("migratable a string", JobRegistration, _registration(migratable="yes"),
     HTTPStatus.BAD_REQUEST, "field 'migratable' must be true or false, got 'yes'"),
    ("scheduler a string", JobRegistration, _registration(scheduler="slurm"),
     HTTPStatus.BAD_REQUEST,
     'field \'scheduler\' must be null or {"kind": ..., "id": ...}, got \'slurm\''),
    ("scheduler without id", JobRegistration, _registration(scheduler={"kind": "slurm"}),
     HTTPStatus.BAD_REQUEST,
     'field \'scheduler\' must be null or {"kind": ..., "id": ...}, got {\'kind\': \'slurm\'}'),
    ("scheduler of an unknown kind", JobRegistration,
     _registration(scheduler={"kind": "nomad", "id": "1"}), HTTPStatus.BAD_REQUEST,
     "field 'scheduler': kind must be one of kubernetes, slurm, got 'nomad'"),
    ("scheduler slurm id not a number", JobRegistration,
     _registration(scheduler={"kind": "slurm", "id": "12a"}), HTTPStatus.BAD_REQUEST,
     "field 'scheduler': id of a slurm job must be a numeric job id, got '12a'"),
    ("scheduler pod without namespace", JobRegistration,
     _registration(scheduler={"kind": "kubernetes", "id": "train-0"}), HTTPStatus.BAD_REQUEST,
     "field 'scheduler': id of a kubernetes job must be NAMESPACE/POD, got 'train-0'"),
    ("step negative", JobProgress, {"step": -1, "samples": 0, "tokens": 0},
     HTTPStatus.BAD_REQUEST, f"field 'step' must be {_WITHIN_COUNT}, got -1"),
    ("samples 2**63", JobProgress, {"step": 0, "samples": COUNT_MAX + 1, "tokens": 0},
     HTTPStatus.BAD_REQUEST, f"field 'samples' must be {_WITHIN_COUNT}, got {COUNT_MAX + 1}"),
    ("tokens a string", JobProgress, {"step": 0, "samples": 0, "tokens": "1"},
     HTTPStatus.BAD_REQUEST, "field 'tokens' must be an integer, got '1'"),
    ("tokens missing", JobProgress, {"step": 0, "samples": 0}, HTTPStatus.BAD_REQUEST,
     "missing field 'tokens'"),
    ("migration gpu missing", Migration, {}, HTTPStatus.BAD_REQUEST, "missing field 'gpu'"),
    ("migration to no GPU", Migration, {"gpu": GPUS}, HTTPStatus.NOT_FOUND,
     f"field 'gpu': no GPU {GPUS} (this node has {GPUS})"),
    ("watts missing", PowerLimitRequest, {"gpu": 0}, HTTPStatus.BAD_REQUEST,
     "missing field 'watts'"),
    ("watts a bool", PowerLimitRequest, {"gpu": 0, "watts": False}, HTTPStatus.BAD_REQUEST,
     "field 'watts' must be a number, got False"),
    ("fault missing", SimFault, {"gpu": 0}, HTTPStatus.BAD_REQUEST, "missing field 'fault'"),
    ("fault a number", SimFault, {"gpu": 0, "fault": 3}, HTTPStatus.BAD_REQUEST,
     "field 'fault' must be a string, got 3"),
    ("fault parameter unknown", SimFault, {"gpu": 0, "fault": "xid", "zz": 1, "bogus": 2},
     HTTPStatus.BAD_REQUEST, "field 'bogus' is not a fault parameter"),
    ("load utilization missing", SimLoad, {"gpu": 0}, HTTPStatus.BAD_REQUEST,
     "missing field 'utilization'"),
    ("memory negative", SimLoad, {"gpu": 0, "utilization": 0.5, "memory_bytes": -1},
     HTTPStatus.BAD_REQUEST, f"field 'memory_bytes' must be {_WITHIN_COUNT}, got -1"),
    ("memory a float", SimLoad, {"gpu": 0, "utilization": 0.5, "memory_bytes": 1.5},
     HTTPStatus.BAD_REQUEST, "field 'memory_bytes' must be an integer, got 1.5"),
]  # fmt: skip


def _read(cls: Any, body: dict[str, Any]) -> Any:
    return cls.from_json(body) if cls is JobProgress else cls.from_json(body, GPUS)


@pytest.mark.parametrize(
    ("cls", "body", "status", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_a_field_out_of_bounds_is_refused_with_one_line_naming_it(
    cls: Any, body: dict[str, Any], status: HTTPStatus, message: str
) -> None:
    with pytest.raises(ApiError) as refused:
        _read(cls, body)
    assert (refused.value.status, str(refused.value)) == (status, message)
    assert "\n" not in message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_number_is_refused_by_its_field(constant: str) -> None:
    body = parse_body(f'{{"gpu": 0, "watts": {constant}}}'.encode())
    with pytest.raises(ApiError, match=f"^field 'watts' must be a number, got {constant}$"):
        PowerLimitRequest.from_json(body, GPUS)


def test_each_bound_itself_is_accepted() -> None:
    low = JobRegistration.from_json(_registration(pid=1, gpu=GPUS - 1, utilization=1), GPUS)
    assert (low.pid, low.gpu, low.utilization, low.priority) == (1, GPUS - 1, 1.0, "normal")
    assert type(low.utilization) is float
    assert JobRegistration.from_json(_registration(pid=PID_MAX, utilization=None), GPUS) == (
        JobRegistration("train", PID_MAX, 0)
    )
    assert JobRegistration.from_json(_registration(name="a" * 64), GPUS).name == "a" * 64
    top = {"step": COUNT_MAX, "samples": 0, "tokens": COUNT_MAX}
    assert JobProgress.from_json(top) == JobProgress(COUNT_MAX, 0, COUNT_MAX)
    load = SimLoad.from_json({"gpu": 0, "utilization": 2, "memory_bytes": COUNT_MAX}, GPUS)
    assert load == SimLoad(0, 2.0, COUNT_MAX) and type(load.utilization) is float
    assert SimLoad.from_json({"gpu": 0, "utilization": 0, "memory_bytes": None}, GPUS) == SimLoad(
        0, 0.0
    )


# ------------------------------------------------------------------------------- job names, paths
@settings(max_examples=300, deadline=None)
@given(
    name=st.text(alphabet=st.sampled_from([*string.ascii_letters[:3], *"09_.:-", "\n", "/", "é"]))
)
def test_a_job_name_is_valid_only_when_it_is_1_to_64_allowed_characters_after_an_alnum(
    name: str,
) -> None:
    allowed = set(string.ascii_letters + string.digits + "_.:-")
    whole = 1 <= len(name) <= 64 and set(name) <= allowed and name[0].isalnum()
    assert valid_job_name(name) is whole


@pytest.mark.parametrize("name", ["", "a\n", "-a", ".a", "a" * 65, "a/b", "a b"])
def test_names_the_agent_refuses_are_not_valid(name: str) -> None:
    assert valid_job_name(name) is False


def test_a_job_path_fills_in_the_name() -> None:
    assert job_path(JOB, "train-1") == JOBS + "/train-1"
    assert job_path(JOB_PROGRESS, "train-1") == "/api/v1/jobs/train-1/progress"
    assert job_path(JOB_MIGRATE, "x:y.z") == "/api/v1/jobs/x%3Ay.z/migrate"


def test_a_job_path_quotes_a_slash_so_a_name_cannot_reach_another_route() -> None:
    assert job_path(JOB, "a/progress") == "/api/v1/jobs/a%2Fprogress"
    assert job_path(JOB, "../jobs?x#y %") == "/api/v1/jobs/..%2Fjobs%3Fx%23y%20%25"


@given(name=st.text(min_size=1))
def test_a_job_path_holds_any_name_as_one_segment_that_unquotes_to_it(name: str) -> None:
    path = job_path(JOB_PROGRESS, name)
    segment = path.removeprefix(JOBS + "/").removesuffix("/progress")
    assert path == f"{JOBS}/{segment}/progress"
    assert not set(segment) & set("/?# ") and unquote(segment) == name


# --------------------------------------------------------------------------------- job records
RECORD = JobRecord(
    name="train", state="finished", pid=42, gpu=1, priority="high", registered_at=1000.5,
    finished_at=1060.5, duration_seconds=60.0, step=7, samples=56, tokens=4096, target_gpu=3,
    tune=True, migratable=True, migrations=2, energy_joules=1500.0,
    energy_joules_by_gpu={"0": 500.0, "1": 1000.0}, power_watts=0.0, mean_power_watts=25.0,
    tokens_per_joule=2.7, scheduler={"kind": "kubernetes", "id": "ml/train-0"},
)  # fmt: skip
_NULLABLE = {"finished_at", "target_gpu", "mean_power_watts", "tokens_per_joule", "scheduler"}
_INTEGERS = {"pid", "gpu", "step", "samples", "tokens", "target_gpu", "migrations"}
_STRINGS = {"name", "state", "priority"}
_FLAGS = {"tune", "migratable"}
_NEWER = {"migrations", "scheduler"}
"""Fields an older agent leaves out or sends null: read as none (0)."""
_FIELDS = [f.name for f in fields(JobRecord) if f.name != "energy_joules_by_gpu"]


def test_a_job_record_reads_back_as_written() -> None:
    assert JobRecord.from_json(json.loads(json.dumps(RECORD.to_json()))) == RECORD


def test_a_running_job_record_may_have_nulls_where_the_contract_allows() -> None:
    body = {**RECORD.to_json(), **dict.fromkeys(_NULLABLE)}
    record = JobRecord.from_json(body)
    assert [getattr(record, k) for k in sorted(_NULLABLE)] == [None] * len(_NULLABLE)


def test_whole_numbers_in_a_job_record_are_read_as_floats_where_the_field_is_a_number() -> None:
    body = {**RECORD.to_json(), "registered_at": 1000, "energy_joules_by_gpu": {"0": 5, "1": 7}}
    record = JobRecord.from_json(body)
    assert type(record.registered_at) is float and record.registered_at == 1000.0
    assert record.energy_joules_by_gpu == {"0": 5.0, "1": 7.0}
    assert {type(v) for v in record.energy_joules_by_gpu.values()} == {float}
    assert type(record.pid) is int


def _wrong_values(key: str) -> list[Any]:
    if key in _FLAGS:
        return [1, "true", [1]]
    wrong: list[Any] = [True, [1]]
    wrong += [] if key in _NULLABLE | _NEWER else [None]
    wrong += [1] if key in _STRINGS else ["1"]
    wrong += [1.5] if key in _INTEGERS else []
    return wrong


@pytest.mark.parametrize(
    ("key", "bad"), [(k, v) for k in _FIELDS for v in _wrong_values(k)], ids=repr
)
def test_a_job_record_with_a_field_of_the_wrong_type_is_refused_naming_it(
    key: str, bad: Any
) -> None:
    with pytest.raises(ContractError) as refused:
        JobRecord.from_json({**RECORD.to_json(), key: bad})
    assert str(refused.value) == f"field {key!r} is {bad!r}"


def test_a_job_record_missing_a_field_is_refused_naming_it() -> None:
    body = RECORD.to_json()
    del body["tokens"]
    with pytest.raises(ContractError, match=r"^field 'tokens' is None$"):
        JobRecord.from_json(body)


@pytest.mark.parametrize(("by_gpu", "message"), [
    (None, "field 'energy_joules_by_gpu' is None"),
    ([500.0], "field 'energy_joules_by_gpu' is [500.0]"),
    ({"0": 1.0, "1": None}, "field '1' is None"),
    ({"0": "1"}, "field '0' is '1'"),
    ({"0": False}, "field '0' is False"),
])  # fmt: skip
def test_a_job_record_with_energy_by_gpu_out_of_shape_is_refused_naming_it(
    by_gpu: Any, message: str
) -> None:
    with pytest.raises(ContractError) as refused:
        JobRecord.from_json({**RECORD.to_json(), "energy_joules_by_gpu": by_gpu})
    assert str(refused.value) == message


@pytest.mark.parametrize("answer", [["train"], "x" * 50, None])
def test_an_answer_that_is_not_an_object_is_refused_as_not_a_job(answer: Any) -> None:
    with pytest.raises(ContractError) as refused:
        JobRecord.from_json(answer)
    shown = repr(answer) if len(repr(answer)) <= 40 else repr(answer)[:37] + "..."
    assert str(refused.value) == f"a job is {shown}, not an object"


# -------------------------------------------------------------------------------- energy answers
def test_an_energy_answer_the_server_writes_is_the_snapshot_the_client_reads() -> None:
    def device(index: int, energy: float | Exception) -> SimpleNamespace:
        def read() -> float:
            if isinstance(energy, Exception):
                raise energy
            return energy

        info = SimpleNamespace(uuid=f"GPU-{index}")
        return SimpleNamespace(index=index, info=lambda: info, read_energy_j=read)

    answer = energy_json(
        [device(0, 12.5), device(1, NotSupported("no counter"))],
        [SimpleNamespace(domain="package-0", energy_j=30.0)],
    )
    snapshot = EnergySnapshot.from_json(json.loads(json.dumps(answer)))
    assert snapshot.timestamp_s == answer["timestamp"]
    assert snapshot.gpus == (GpuEnergy(0, "GPU-0", 12.5), GpuEnergy(1, "GPU-1", None))
    assert snapshot.host_j == {"package-0": 30.0}


def test_an_energy_answer_reads_numbers_as_floats_and_leaves_out_host_domains_without_energy() -> (
    None
):
    snapshot = EnergySnapshot.from_json({
        "timestamp": 100,
        "gpus": [{"index": 0, "energy_joules": 7}, {"index": 1, "uuid": "GPU-b"}],
        "host": [{"domain": "dram", "energy_joules": 3}, {"domain": "psys", "energy_joules": None}],
    })  # fmt: skip
    assert snapshot == EnergySnapshot(
        100.0, (GpuEnergy(0, "", 7.0), GpuEnergy(1, "GPU-b", None)), {"dram": 3.0}
    )
    assert type(snapshot.timestamp_s) is float and type(snapshot.gpus[0].energy_j) is float
    assert type(snapshot.host_j["dram"]) is float


@pytest.mark.parametrize("host", [None, []])
def test_an_energy_answer_without_host_counters_has_none(host: Any) -> None:
    body = {"timestamp": 1.0, "gpus": [], **({} if host is None else {"host": host})}
    assert EnergySnapshot.from_json(body) == EnergySnapshot(1.0, (), {})
    assert EnergySnapshot.from_json({**body, "host": None}).host_j == {}


@pytest.mark.parametrize(("answer", "names"), [
    ({"timestamp": 1.0}, "'gpus'"),
    ({"gpus": []}, "'timestamp'"),
    ({"timestamp": 1.0, "gpus": [{"uuid": "GPU-a"}]}, "'index'"),
    ({"timestamp": 1.0, "gpus": [], "host": [{"energy_joules": 1.0}]}, "'domain'"),
    ({"timestamp": "soon", "gpus": []}, "'soon'"),
    ({"timestamp": 1.0, "gpus": [{"index": 0, "energy_joules": "lots"}]}, "'lots'"),
    (["gpus"], "list indices"),
])  # fmt: skip
def test_an_energy_answer_out_of_shape_is_a_contract_error_naming_what(
    answer: Any, names: str
) -> None:
    with pytest.raises(ContractError) as refused:
        EnergySnapshot.from_json(answer)
    assert names in str(refused.value)


# --------------------------------------------------------------- job records of older agents
def test_a_job_record_without_tune_or_migratable_reads_them_as_off() -> None:
    # an agent from before these flags sends null or leaves them out: the job was never tuned
    for body in ({**RECORD.to_json(), "tune": None, "migratable": None},
                 {k: v for k, v in RECORD.to_json().items() if k not in _FLAGS}):  # fmt: skip
        record = JobRecord.from_json(body)
        assert (record.tune, record.migratable) == (False, False)


def test_a_job_record_without_migrations_reads_them_as_none_done() -> None:
    # an agent from before the count sends null or leaves it out
    for body in ({**RECORD.to_json(), "migrations": None},
                 {k: v for k, v in RECORD.to_json().items() if k != "migrations"}):  # fmt: skip
        assert JobRecord.from_json(body).migrations == 0


# ------------------------------------------------------------------ answers' fields, by type
def _wrong_for(kind: str, nullable: bool) -> list[Any]:
    """Values a field of this JSON kind refuses: a bool is no number, a number no bool."""
    if kind == "bool":
        wrong: list[Any] = [1, "true", [1]]
    else:
        wrong = [True, [1], 1 if kind == "str" else "1"]
        wrong += [1.5] if kind == "int" else []
    return wrong if nullable else [*wrong, None]


def _refused_as(read: Any, body: Any) -> str:
    with pytest.raises(ContractError) as refused:
        read(body)
    return str(refused.value)


# --------------------------------------------------------------------------------- policy status
STATUS = PolicyStatus(
    mode="apply", power_budget_watts=2400.0,
    policies={"thermal": True, "budget": True, "idle": False, "tuner": False},
    fallback="GPU 1: no permission", holding="GPU 2 is lost", budget_unreachable=True,
    period_seconds=1.0, periods=12, errors_total=3, last_error="idle: boom",
    restore_failures=["GPU 0: driver refused 700 W"],
)  # fmt: skip
_STATUS_TYPES: dict[str, tuple[str, bool]] = {
    "mode": ("str", False), "power_budget_watts": ("number", True), "fallback": ("str", True),
    "holding": ("str", True), "budget_unreachable": ("bool", False),
    "period_seconds": ("number", False), "periods": ("int", False),
    "errors_total": ("int", False), "last_error": ("str", True),
}  # fmt: skip
"""The JSON kind of each plain field of a policy status, and whether it may be null."""


def test_a_policy_status_reads_back_as_written() -> None:
    assert PolicyStatus.from_json(json.loads(json.dumps(STATUS.to_json()))) == STATUS
    calm = PolicyStatus(
        mode="dry_run", power_budget_watts=None, policies=dict.fromkeys(STATUS.policies, False),
        fallback=None, holding=None, budget_unreachable=False, period_seconds=0.5, periods=0,
        errors_total=0, last_error=None,
    )  # fmt: skip
    assert PolicyStatus.from_json(json.loads(json.dumps(calm.to_json()))) == calm


def test_a_policy_status_is_the_loops_status_field_for_field() -> None:
    loop = LoopStatus(
        mode="apply", power_budget_w=2400.0, policies=dict(STATUS.policies),
        fallback="GPU 1: no permission", holding="GPU 2 is lost", budget_unreachable=True,
        period_s=1.0, periods=12, errors_total=3, last_error="idle: boom",
        restore_failures=("GPU 0: driver refused 700 W",),
    )  # fmt: skip
    assert PolicyStatus.from_status(loop) == STATUS


def test_a_policy_status_may_have_nulls_where_the_contract_allows() -> None:
    nullable = [k for k, (_, ok) in _STATUS_TYPES.items() if ok]
    status = PolicyStatus.from_json({**STATUS.to_json(), **dict.fromkeys(nullable)})
    assert [getattr(status, k) for k in nullable] == [None] * len(nullable)


def test_a_policy_status_without_restore_failures_has_none() -> None:
    body = STATUS.to_json()
    del body["restore_failures"]
    assert PolicyStatus.from_json(body).restore_failures == []


@pytest.mark.parametrize(
    ("key", "bad"),
    [(k, v) for k, (kind, ok) in _STATUS_TYPES.items() for v in _wrong_for(kind, ok)],
    ids=repr,
)
def test_a_policy_status_with_a_field_of_the_wrong_type_is_refused_naming_it(
    key: str, bad: Any
) -> None:
    refused = _refused_as(PolicyStatus.from_json, {**STATUS.to_json(), key: bad})
    assert refused == f"field {key!r} is {bad!r}"


@pytest.mark.parametrize(("key", "bad"), [
    ("policies", None), ("policies", ["thermal"]), ("policies", {"cooling": True}),
    ("policies", {"idle": 1}), ("policies", {"idle": None}),
    ("restore_failures", None), ("restore_failures", "GPU 0"), ("restore_failures", ["a", 1]),
], ids=repr)  # fmt: skip
def test_a_policy_status_with_policies_or_restore_failures_out_of_shape_is_refused_naming_it(
    key: str, bad: Any
) -> None:
    refused = _refused_as(PolicyStatus.from_json, {**STATUS.to_json(), key: bad})
    assert refused == f"field {key!r} is {bad!r}"


@pytest.mark.parametrize("answer", [["apply"], "x" * 50, None])
def test_an_answer_that_is_not_an_object_is_refused_as_not_a_policy_status(answer: Any) -> None:
    shown = repr(answer) if len(repr(answer)) <= 40 else repr(answer)[:37] + "..."
    assert (
        _refused_as(PolicyStatus.from_json, answer) == f"a policy status is {shown}, not an object"
    )


# -------------------------------------------------------------------------------- decisions
SET = Decision(
    1, "set", "budget", "over budget", 420.0, "apply", 1000.5,
    {"budget": Intent(1, 420.0, "over budget"), "thermal": Intent(1, 500.0, "warm")},
    enforced_w=419.0, error="rate limited", from_w=700.0, jobs=("a", "b"),
)  # fmt: skip
MOVE = MoveRecord("train", 1, 3, "thermal", "apply", 1001.5, error="job ended", detail="hot")
_DECISION_TYPES: dict[str, tuple[str, bool]] = {
    "time": ("number", False), "gpu": ("int", False), "policy": ("str", False),
    "action": ("str", False), "reason": ("str", False), "mode": ("str", False),
    "from_watts": ("number", True), "to_watts": ("number", True),
    "enforced_watts": ("number", True), "error": ("str", True), "to_gpu": ("int", True),
}  # fmt: skip
"""The JSON kind of each plain field of a decision record, and whether it may be null."""


def test_a_limit_decision_is_recorded_field_for_field() -> None:
    assert decision_record(SET) == DecisionRecord(
        time=1000.5, gpu=1, policy="budget", action="set", reason="over budget", mode="apply",
        jobs=["a", "b"], from_watts=700.0, to_watts=420.0, enforced_watts=419.0,
        error="rate limited", to_gpu=None,
        intents={"budget": {"watts": 420.0, "reason": "over budget"},
                 "thermal": {"watts": 500.0, "reason": "warm"}},
    )  # fmt: skip


def test_a_move_is_recorded_as_a_migration_to_its_gpu() -> None:
    assert decision_record(MOVE) == DecisionRecord(
        time=1001.5, gpu=1, policy="migration", action="migrate",
        reason="move job train from GPU 1 to GPU 3 (thermal): hot", mode="apply", jobs=["train"],
        from_watts=None, to_watts=None, enforced_watts=None, error="job ended", to_gpu=3,
    )  # fmt: skip


@pytest.mark.parametrize("made", [SET, MOVE], ids=["set", "move"])
def test_a_decision_record_reads_back_as_written(made: Decision | MoveRecord) -> None:
    record = decision_record(made)
    assert DecisionRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_a_decision_record_may_have_nulls_where_the_contract_allows() -> None:
    nullable = [k for k, (_, ok) in _DECISION_TYPES.items() if ok]
    body = {**decision_record(SET).to_json(), **dict.fromkeys(nullable)}
    record = DecisionRecord.from_json(body)
    assert [getattr(record, k) for k in nullable] == [None] * len(nullable)


def test_a_decision_record_without_intents_has_none() -> None:
    body = decision_record(SET).to_json()
    del body["intents"]
    assert DecisionRecord.from_json(body).intents == {}


@pytest.mark.parametrize(
    ("key", "bad"),
    [(k, v) for k, (kind, ok) in _DECISION_TYPES.items() for v in _wrong_for(kind, ok)],
    ids=repr,
)
def test_a_decision_record_with_a_field_of_the_wrong_type_is_refused_naming_it(
    key: str, bad: Any
) -> None:
    refused = _refused_as(DecisionRecord.from_json, {**decision_record(SET).to_json(), key: bad})
    assert refused == f"field {key!r} is {bad!r}"


@pytest.mark.parametrize(("key", "bad"), [
    ("jobs", None), ("jobs", "a"), ("jobs", ["a", 1]),
    ("intents", None), ("intents", ["budget"]),
], ids=repr)  # fmt: skip
def test_a_decision_record_with_jobs_or_intents_out_of_shape_is_refused_naming_it(
    key: str, bad: Any
) -> None:
    refused = _refused_as(DecisionRecord.from_json, {**decision_record(SET).to_json(), key: bad})
    assert refused == f"field {key!r} is {bad!r}"


@pytest.mark.parametrize("answer", [["set"], "x" * 50, None])
def test_an_answer_that_is_not_an_object_is_refused_as_not_a_decision(answer: Any) -> None:
    shown = repr(answer) if len(repr(answer)) <= 40 else repr(answer)[:37] + "..."
    assert _refused_as(DecisionRecord.from_json, answer) == f"a decision is {shown}, not an object"


def test_a_job_record_with_a_scheduler_out_of_shape_is_refused_naming_it() -> None:
    for bad in ({"kind": "slurm"}, {"kind": "slurm", "id": 42}, {"kind": 1, "id": "1", "x": 2}):
        with pytest.raises(ContractError) as refused:
            JobRecord.from_json({**RECORD.to_json(), "scheduler": bad})
        assert str(refused.value).startswith("field 'scheduler' is")
