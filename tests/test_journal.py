"""A damaged power-limit journal is said out loud, kept aside, and never forgets a cap."""

from __future__ import annotations

import datetime
import logging
import re
import shutil
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from helpers import crash_with_a_cap, gauge, run_agent, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.backend import SimBackend
from wattwarden.policies import actuator as actuator_module
from wattwarden.policies.actuator import JournalError, LimitActuator, journal_damage

H100_DEFAULT_W = 700.0
JOURNAL = "journal.sqlite3"


def true_limits(fleet: SimFleet) -> list[float]:
    return [float(g.state()["power_limit_w"]) for g in fleet.gpus]


def crashed_with_caps(directory: Path) -> SimFleet:
    """A fleet whose GPUs 0 and 1 a crashed run left capped, their originals journalled."""
    fleet = SimFleet(3, clock=ManualClock())
    actuator = LimitActuator(SimBackend(fleet).devices(), directory / JOURNAL, min_interval_s=0)
    actuator.set_limit(0, 300, reason="test")
    actuator.set_limit(1, 250, reason="test")
    actuator.close()  # no restore: the process died here
    assert true_limits(fleet) == [300.0, 250.0, H100_DEFAULT_W]
    return fleet


def restart(directory: Path, fleet: SimFleet) -> LimitActuator:
    actuator = LimitActuator(SimBackend(fleet).devices(), directory / JOURNAL, min_interval_s=0)
    assert actuator.recover() == []
    return actuator


def assert_damage_said_and_defaults_restored(
    directory: Path, fleet: SimFleet, actuator: LimitActuator, logs: list[logging.LogRecord]
) -> None:
    assert true_limits(fleet) == [H100_DEFAULT_W] * 3
    errors = [r for r in logs if r.levelno == logging.ERROR and "is damaged" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in logs]
    assert actuator.damaged is not None
    assert list(directory.glob(f"{JOURNAL}.damaged-*"))  # kept for a post-mortem
    assert actuator.originals() == {}  # a fresh journal, ready for new changes
    actuator.set_limit(2, 400, reason="after recovery")
    assert actuator.restore_all() == []
    assert true_limits(fleet)[2] == H100_DEFAULT_W


class Logs(logging.Handler):
    """Collects the actuator's records (Hypothesis cannot use the function-scoped caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> list[logging.LogRecord]:
        logging.getLogger("wattwarden.policies.actuator").addHandler(self)
        return self.records

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("wattwarden.policies.actuator").removeHandler(self)


def test_an_intact_journal_restores_the_journalled_originals(tmp_path: Path) -> None:
    fleet = crashed_with_caps(tmp_path)
    actuator = restart(tmp_path, fleet)
    assert actuator.damaged is None
    assert true_limits(fleet) == [H100_DEFAULT_W] * 3
    assert not list(tmp_path.glob("*.damaged-*"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_a_journal_truncated_anywhere_restores_every_gpu_to_its_default(cut: float) -> None:
    with tempfile.TemporaryDirectory() as tmp, Logs() as logs:
        directory = Path(tmp)
        fleet = crashed_with_caps(directory)
        journal = directory / JOURNAL
        data = journal.read_bytes()
        journal.write_bytes(data[: int(len(data) * cut)])
        actuator = restart(directory, fleet)
        assert_damage_said_and_defaults_restored(directory, fleet, actuator, logs)
        actuator.close()


@settings(max_examples=30, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=20_000))
def test_a_garbage_journal_restores_every_gpu_to_its_default(garbage: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, Logs() as logs:
        directory = Path(tmp)
        fleet = crashed_with_caps(directory)
        (directory / JOURNAL).write_bytes(garbage)
        actuator = restart(directory, fleet)
        assert_damage_said_and_defaults_restored(directory, fleet, actuator, logs)
        actuator.close()


@pytest.mark.parametrize("page", [0, 1, 2])
def test_a_journal_page_overwritten_with_garbage_restores_defaults(
    tmp_path: Path, page: int, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = crashed_with_caps(tmp_path)
    journal = tmp_path / JOURNAL
    data = bytearray(journal.read_bytes())
    data[page * 4096 : (page + 1) * 4096] = bytes(range(256)) * 16
    journal.write_bytes(bytes(data))
    actuator = restart(tmp_path, fleet)
    assert_damage_said_and_defaults_restored(tmp_path, fleet, actuator, caplog.records)


def crash_with_originals_only_in_the_wal(directory: Path) -> tuple[SimFleet, Path]:
    """A copy of the journal and its WAL taken at a crash, the originals not yet checkpointed."""
    fleet = crashed_with_caps(directory)
    live = directory / "live"
    live.mkdir()
    shutil.copy(directory / JOURNAL, live / JOURNAL)
    db = sqlite3.connect(live / JOURNAL, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("DELETE FROM originals")  # the checkpointed file forgets them ...
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for uuid, (gpu, watts) in {fleet[0].uuid: (0, 700.0), fleet[1].uuid: (1, 700.0)}.items():
        db.execute("INSERT INTO originals VALUES (?, ?, ?, 0)", (uuid, gpu, watts))  # ... the WAL
    crashed = directory / "crashed"
    crashed.mkdir()
    for name in (JOURNAL, f"{JOURNAL}-wal"):
        shutil.copy(live / name, crashed / name)  # what the disk held when the process died
    db.close()
    return fleet, crashed


def test_originals_held_only_in_an_intact_wal_are_restored(tmp_path: Path) -> None:
    fleet, crashed = crash_with_originals_only_in_the_wal(tmp_path)
    actuator = LimitActuator(SimBackend(fleet).devices(), crashed / JOURNAL)
    assert actuator.damaged is None
    assert set(actuator.originals()) == {fleet[0].uuid, fleet[1].uuid}
    assert actuator.recover() == []
    assert true_limits(fleet) == [H100_DEFAULT_W] * 3


def _flip_byte_in_last_frame(data: bytes) -> bytes:
    out = bytearray(data)
    out[-100] ^= 0xFF
    return bytes(out)


WAL_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "flipped byte": _flip_byte_in_last_frame,
    "cut inside a frame": lambda d: d[:-1000],
    "cut at a frame boundary before the commit": lambda d: d[: -(24 + 4096)],
    "garbage": lambda d: bytes(range(256)) * (len(d) // 256),
    "cut inside the header": lambda d: d[:20],
}


@pytest.mark.parametrize("damage", WAL_DAMAGE)
def test_a_damaged_wal_restores_every_gpu_to_its_default(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    fleet, crashed = crash_with_originals_only_in_the_wal(tmp_path)
    wal = crashed / f"{JOURNAL}-wal"
    wal.write_bytes(WAL_DAMAGE[damage](wal.read_bytes()))
    actuator = LimitActuator(SimBackend(fleet).devices(), crashed / JOURNAL, min_interval_s=0)
    assert actuator.recover() == []
    assert_damage_said_and_defaults_restored(crashed, fleet, actuator, caplog.records)
    assert list(crashed.glob(f"{JOURNAL}.damaged-*-wal"))


def test_agent_with_a_garbage_journal_starts_says_so_and_uncaps_every_gpu(tmp_path: Path) -> None:
    state = tmp_path / "state"
    crash_with_a_cap(state)
    (state / JOURNAL).write_bytes(b"this is not a database\n" * 100)
    with run_agent(state, "--sim", "2") as agent:
        wait_for(lambda: gauge(agent.url, "gpu_power_limit_watts", "1") == 700.0, timeout_s=10)
        log = agent.log_path.read_text()
        damaged = [line for line in log.splitlines() if "is damaged" in line]
        assert len(damaged) == 1 and " ERROR " in damaged[0]
        assert "Traceback" not in log
    kept = [p for p in state.glob(f"{JOURNAL}.damaged-*") if not p.name.endswith("-wal")]
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not a database")


# ------------------------------------------------- what the damage checks say, case by case
def journal_of_a_crash(directory: Path, *, page_size: int = 4096) -> tuple[SimFleet, Path]:
    """A journal a crashed run left with GPUs 0 and 1 capped, in pages of ``page_size``."""
    journal = directory / JOURNAL
    if page_size != 4096:
        db = sqlite3.connect(journal)
        db.execute(f"PRAGMA page_size={page_size}")
        db.execute("VACUUM")
        db.close()
    return crashed_with_caps(directory), journal


def test_an_empty_journal_is_said_to_be_cut_to_zero_bytes(tmp_path: Path) -> None:
    (tmp_path / JOURNAL).write_bytes(b"")
    assert journal_damage(tmp_path / JOURNAL) == "the file is empty (it was cut to zero bytes)"


@pytest.mark.parametrize(
    "data", [b"SQLite format 3\x00" + bytes(83), b"SQLite format 2\x00" + bytes(84), b"x"]
)
def test_a_short_or_foreign_header_is_not_an_sqlite_database(tmp_path: Path, data: bytes) -> None:
    (tmp_path / JOURNAL).write_bytes(data)
    assert journal_damage(tmp_path / JOURNAL) == "not an SQLite database"


def test_no_journal_yet_is_no_damage(tmp_path: Path) -> None:
    assert journal_damage(tmp_path / JOURNAL) is None


def test_an_unreadable_journal_says_why(tmp_path: Path) -> None:
    (tmp_path / JOURNAL).mkdir()
    assert journal_damage(tmp_path / JOURNAL) == "unreadable: Is a directory"


@pytest.mark.parametrize("page_size", [4096, 32768, 65536])
def test_a_journal_cut_at_a_page_boundary_is_said_to_be_truncated(
    tmp_path: Path, page_size: int
) -> None:
    _, journal = journal_of_a_crash(tmp_path, page_size=page_size)
    data = journal.read_bytes()
    pages = len(data) // page_size
    assert journal_damage(journal) is None  # whole: exactly the pages its header counts
    journal.write_bytes(data[: (pages - 1) * page_size])
    assert journal_damage(journal) == (
        f"truncated: {(pages - 1) * page_size} bytes where its header says {pages} pages "
        f"of {page_size}"
    )


def test_a_truncated_journal_with_a_change_counter_past_2_31_is_still_caught(
    tmp_path: Path,
) -> None:
    _, journal = journal_of_a_crash(tmp_path)
    data = bytearray(journal.read_bytes())
    counter = (0x8000_0001).to_bytes(4, "big")  # the counter is unsigned: it wraps at 2**32
    data[24:28] = data[92:96] = counter
    journal.write_bytes(bytes(data[:-4096]))
    assert (journal_damage(journal) or "").startswith("truncated:")


def test_a_page_count_from_an_old_writer_is_not_trusted(tmp_path: Path) -> None:
    # The header's page count is valid only if its version-valid-for field equals the change
    # counter; a file written by a legacy SQLite is sized by its length instead.
    _, journal = journal_of_a_crash(tmp_path)
    data = bytearray(journal.read_bytes())
    data[92:96] = (int.from_bytes(data[24:28], "big") + 1).to_bytes(4, "big")
    journal.write_bytes(bytes(data[:-4096]))
    assert journal_damage(journal) is None


def test_a_journal_with_an_impossible_page_size_is_damage_named_by_sqlite(tmp_path: Path) -> None:
    fleet, journal = journal_of_a_crash(tmp_path)
    data = bytearray(journal.read_bytes())
    data[16:18] = (1000).to_bytes(2, "big")  # not a power of two
    journal.write_bytes(bytes(data))
    actuator = LimitActuator(SimBackend(fleet).devices(), journal, min_interval_s=0)
    assert actuator.damaged == "file is not a database"
    assert actuator.recover() == []
    assert true_limits(fleet) == [H100_DEFAULT_W] * 3
    actuator.close()


def test_a_journal_sqlite_cannot_read_through_says_the_integrity_check_failed(
    tmp_path: Path,
) -> None:
    fleet, journal = journal_of_a_crash(tmp_path)
    data = bytearray(journal.read_bytes())
    data[4096:8192] = bytes(4096)
    journal.write_bytes(bytes(data))
    actuator = LimitActuator(SimBackend(fleet).devices(), journal, min_interval_s=0)
    assert actuator.damaged == "integrity check: database disk image is malformed"
    actuator.close()


def test_every_problem_the_integrity_check_finds_is_said(tmp_path: Path) -> None:
    fleet, journal = journal_of_a_crash(tmp_path)
    data = journal.read_bytes()
    # change the last character of both journalled UUIDs where the table holds them, so the
    # rows no longer match their index entries
    table_page = data.index(fleet[0].uuid.encode()) // 4096
    page = bytearray(data[table_page * 4096 : (table_page + 1) * 4096])
    for gpu in (0, 1):
        end = page.index(fleet[gpu].uuid.encode()) + len(fleet[gpu].uuid) - 1
        page[end] ^= 0x01
    journal.write_bytes(data[: table_page * 4096] + page + data[(table_page + 1) * 4096 :])
    actuator = LimitActuator(SimBackend(fleet).devices(), journal, min_interval_s=0)
    assert actuator.damaged is not None
    problems = actuator.damaged.removeprefix("integrity check: ").split("; ")
    assert actuator.damaged.startswith("integrity check: ") and len(problems) >= 2, problems
    index = "sqlite_autoindex_originals_1"
    for problem in problems:
        assert re.fullmatch(
            rf"row \d+ missing from index {index}|wrong # of entries in index {index}", problem
        ), problem
    actuator.close()


def test_a_journal_that_cannot_be_opened_is_an_error_naming_it_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet, journal = journal_of_a_crash(tmp_path)

    def disk_fails(path: Path) -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(actuator_module, "_open_journal", disk_fails)
    with pytest.raises(JournalError) as failed:
        LimitActuator(SimBackend(fleet).devices(), journal, min_interval_s=0)
    assert str(failed.value) == f"power-limit journal {journal}: disk I/O error"
    assert not list(tmp_path.glob("*.damaged-*"))  # an I/O error is not damage: nothing moved


def test_a_journal_in_a_directory_not_yet_made_is_created_with_its_parents(
    tmp_path: Path,
) -> None:
    fleet = SimFleet(1, clock=ManualClock())
    journal = tmp_path / "state" / "policies" / JOURNAL
    actuator = LimitActuator(SimBackend(fleet).devices(), journal, min_interval_s=0)
    assert actuator.damaged is None
    actuator.set_limit(0, 300, reason="test")
    actuator.close()
    assert journal.exists()


def test_a_damaged_journal_is_kept_under_a_utc_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")  # the stamp must not follow local time
    time.tzset()
    try:
        fleet = SimFleet(1, clock=ManualClock())
        (tmp_path / JOURNAL).write_bytes(b"garbage" * 100)
        (tmp_path / f"{JOURNAL}-shm").write_bytes(b"shared memory")
        before = datetime.datetime.now(datetime.UTC)
        actuator = LimitActuator(SimBackend(fleet).devices(), tmp_path / JOURNAL)
        after = datetime.datetime.now(datetime.UTC)
        actuator.close()
    finally:
        monkeypatch.undo()
        time.tzset()
    (kept,) = tmp_path.glob(f"{JOURNAL}.damaged-*")
    stamp = kept.name.removeprefix(f"{JOURNAL}.damaged-")
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z", stamp), stamp
    at = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=datetime.UTC)
    assert before <= at <= after
    assert kept.read_bytes() == b"garbage" * 100
    assert (
        not (tmp_path / f"{JOURNAL}-shm").exists()
        or (tmp_path / f"{JOURNAL}-shm").read_bytes() != b"shared memory"
    )


# A write-ahead log built by hand, so every field SQLite's recovery checks can be set.
WAL_MAGIC = {"little": 0x377F0682, "big": 0x377F0683}


def wal_checksum(data: bytes, order: str, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum (wal.c, walChecksumBytes), in the byte order the magic names."""
    words = struct.unpack(f"{'>' if order == 'big' else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) % 2**32
        s1 = (s1 + words[i + 1] + s0) % 2**32
    return s0, s1


def wal_frames(wal: bytes) -> tuple[int, list[tuple[int, int, bytes]]]:
    """A real WAL's page size and its frames as (page number, commit size, page)."""
    page_size = struct.unpack(">I", wal[8:12])[0]
    frames, offset = [], 32
    while offset + 24 + page_size <= len(wal):
        page, commit = struct.unpack(">II", wal[offset : offset + 8])
        frames.append((page, commit, wal[offset + 24 : offset + 24 + page_size]))
        offset += 24 + page_size
    return page_size, frames


def build_wal(
    page_size: int,
    frames: list[tuple[int, int, bytes]],
    *,
    order: str = "little",
    salts: tuple[int, int] = (0x1234_5678, 0x9ABC_DEF0),
    magic: int | None = None,
    stale: Sequence[tuple[int, int, bytes]] = (),
) -> bytes:
    """A WAL with these frames, checksummed in ``order``; ``stale`` frames carry old salts."""
    head = struct.pack(">6I", magic or WAL_MAGIC[order], 3007000, page_size, 0, *salts)
    s = wal_checksum(head, order, 0, 0)
    out = head + struct.pack(">2I", *s)
    for page, commit, data in frames:
        fh = struct.pack(">4I", page, commit, *salts)
        s = wal_checksum(fh[:8] + data, order, *s)
        out += fh + struct.pack(">2I", *s) + data
    for page, commit, data in stale:
        old = ((salts[0] - 1) % 2**32, salts[1])
        out += struct.pack(">6I", page, commit, *old, 0, 0) + data
    return out


@pytest.fixture
def crashed_wal(tmp_path: Path) -> tuple[SimFleet, Path, int, list[tuple[int, int, bytes]]]:
    """A crash whose journalled originals live only in the WAL, and that WAL's frames."""
    fleet, crashed = crash_with_originals_only_in_the_wal(tmp_path)
    wal = crashed / f"{JOURNAL}-wal"
    page_size, frames = wal_frames(wal.read_bytes())
    assert frames and frames[-1][1] != 0  # ends with a commit
    return fleet, crashed / JOURNAL, page_size, frames


WalCase = tuple[SimFleet, Path, int, list[tuple[int, int, bytes]]]


@pytest.mark.parametrize("order", ["little", "big"])
@pytest.mark.parametrize("salts", [(0x1234_5678, 0x0BAD_F00D), (0xF000_0001, 0xFFFF_FFF0)])
def test_an_intact_wal_in_either_byte_order_is_read_and_restored(
    crashed_wal: WalCase, order: str, salts: tuple[int, int]
) -> None:
    fleet, journal, page_size, frames = crashed_wal
    Path(f"{journal}-wal").write_bytes(build_wal(page_size, frames, order=order, salts=salts))
    assert journal_damage(journal) is None
    actuator = LimitActuator(SimBackend(fleet).devices(), journal, min_interval_s=0)
    assert set(actuator.originals()) == {fleet[0].uuid, fleet[1].uuid}
    assert actuator.recover() == []
    assert true_limits(fleet) == [H100_DEFAULT_W] * 3
    actuator.close()


@pytest.mark.parametrize("order", ["little", "big"])
@pytest.mark.parametrize("salts", [(0x1234_5678, 0x0BAD_F00D), (0xF000_0001, 0xFFFF_FFF0)])
def test_a_wal_frame_that_fails_its_checksum_is_named_by_its_offset(
    crashed_wal: WalCase, order: str, salts: tuple[int, int]
) -> None:
    _, journal, page_size, frames = crashed_wal
    wal = bytearray(build_wal(page_size, frames, order=order, salts=salts))
    last = 32 + (len(frames) - 1) * (24 + page_size)
    wal[last + 24 + 10] ^= 0xFF
    Path(f"{journal}-wal").write_bytes(bytes(wal))
    assert journal_damage(journal) == f"its WAL frame at byte {last} fails its checksum"


def test_an_empty_or_header_only_wal_is_no_damage(crashed_wal: WalCase) -> None:
    _, journal, page_size, _ = crashed_wal
    wal = Path(f"{journal}-wal")
    wal.write_bytes(b"")
    assert journal_damage(journal) is None
    wal.write_bytes(build_wal(page_size, []))
    assert len(wal.read_bytes()) == 32
    assert journal_damage(journal) is None


def test_wal_damage_is_said_in_words(crashed_wal: WalCase) -> None:
    _, journal, page_size, frames = crashed_wal
    wal = Path(f"{journal}-wal")
    good = build_wal(page_size, frames)
    frame = 24 + page_size
    cases = {
        good[:31]: "its WAL is cut inside its header",
        build_wal(page_size, frames, magic=0x377F0684): "its WAL header is not valid",
        good[:8] + b"\x00\x00\x00\x01" + good[12:]: "its WAL header is not valid",
        good + good[32:42]: "its WAL is cut inside a frame header",
        good[: len(good) - frame + 24]: "its WAL is cut inside a frame",
        good[: len(good) - 1]: "its WAL is cut inside a frame",
        build_wal(page_size, [(p, 0, d) for p, _, d in frames]): (
            "its WAL ends in the middle of a transaction"
        ),
    }
    for data, said in cases.items():
        wal.write_bytes(data)
        assert journal_damage(journal) == said, (len(data), said)


def test_a_header_with_a_foreign_magic_is_invalid_even_if_its_checksum_matches(
    crashed_wal: WalCase,
) -> None:
    _, journal, page_size, _ = crashed_wal
    head = struct.pack(">6I", 0x1234_5678, 3007000, page_size, 0, 1, 2)
    Path(f"{journal}-wal").write_bytes(
        head + struct.pack(">2I", *wal_checksum(head, "little", 0, 0))
    )
    assert journal_damage(journal) == "its WAL header is not valid"


def test_frames_left_from_an_earlier_log_are_ignored_as_sqlite_ignores_them(
    crashed_wal: WalCase,
) -> None:
    _, journal, page_size, frames = crashed_wal
    wal = Path(f"{journal}-wal")
    wal.write_bytes(build_wal(page_size, frames, stale=frames))
    assert journal_damage(journal) is None
    # ... but the live frames before them must still end in a commit
    uncommitted = [(p, 0, d) for p, _, d in frames]
    wal.write_bytes(build_wal(page_size, uncommitted, stale=frames))
    assert journal_damage(journal) == "its WAL ends in the middle of a transaction"


def test_an_unreadable_wal_says_why(crashed_wal: WalCase) -> None:
    _, journal, _, _ = crashed_wal
    wal = Path(f"{journal}-wal")
    wal.unlink()
    wal.mkdir()
    assert journal_damage(journal) == "its WAL is unreadable: Is a directory"
