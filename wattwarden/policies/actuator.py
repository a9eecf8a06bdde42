"""Power-limit actuation with a journal, so no GPU is ever left capped.

Every intended change is written to a SQLite journal (WAL) before it is made. The first change to
a GPU also records the limit found on it; :meth:`LimitActuator.restore_all` puts those back on
exit, and :meth:`LimitActuator.recover` does so on the next start after a crash.

A damaged journal (truncated, overwritten, or with a write-ahead log that fails its checksums)
would silently forget the limits to restore, so it is checked at start. If it is damaged, it is
moved aside (kept, timestamped), a fresh one is started, and :meth:`LimitActuator.recover`
restores every GPU to its default limit instead of forgetting.
"""

from __future__ import annotations

import datetime
import logging
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wattwarden.hardware.device import GpuDevice, GpuInfo
from wattwarden.hardware.errors import HardwareError, InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_MIN_INTERVAL_S = 1.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS originals (
    uuid TEXT PRIMARY KEY, gpu INTEGER NOT NULL, watts REAL NOT NULL, recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, gpu INTEGER NOT NULL,
    uuid TEXT NOT NULL, requested_watts REAL NOT NULL, enforced_watts REAL,
    reason TEXT NOT NULL, status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, gpu INTEGER NOT NULL,
    policy TEXT NOT NULL, action TEXT NOT NULL, mode TEXT NOT NULL, from_watts REAL,
    to_watts REAL, reason TEXT NOT NULL, jobs TEXT NOT NULL, error TEXT
);
CREATE INDEX IF NOT EXISTS changes_at ON changes (at);
CREATE INDEX IF NOT EXISTS decisions_at ON decisions (at);
"""


class JournalError(Exception):
    """The journal cannot be opened at all (not damage: e.g. the directory is not writable)."""


class RateLimited(Exception):
    """A change came sooner than the minimum interval after the previous one on that GPU."""


@dataclass(frozen=True, slots=True)
class JournalledDecision:
    """A policy decision as the journal keeps it (one row of ``decisions``)."""

    at: float
    """Wall-clock time, seconds since the epoch."""
    gpu: int
    policy: str
    action: str
    """``set``, ``hold`` or ``migrate``."""
    mode: str
    from_watts: float | None
    to_watts: float | None
    reason: str
    jobs: str
    """The names of the jobs concerned, comma-separated."""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LimitChange:
    """The outcome of one change."""

    gpu: int
    requested_w: float
    enforced_w: float


class LimitActuator:
    """Sets power limits within [min, max], journalled, rate-limited, read back, and restorable.

    Called from HTTP threads (manual requests), the policy engine and the main thread (recover,
    restore); ``_lock`` serialises its journal and rate-limit state. On a GPU it calls only
    ``info``, ``read_power_limit_w`` and ``set_power_limit``, each of which the device runs
    under its own lock, so it never races the sampler's reads of the same GPU.
    """

    def __init__(
        self,
        devices: Sequence[GpuDevice],
        journal_path: Path,
        *,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._devices = {d.index: d for d in devices}
        self._min_interval_s = min_interval_s
        self._monotonic = monotonic
        self._wall = wall
        self._last_change: dict[int, float] = {}
        self._lock = threading.Lock()
        self.damaged: str | None = None
        """Why the journal found at start was unusable (then recover restores defaults)."""
        journal_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db: sqlite3.Connection | None = None
            self.damaged = journal_damage(journal_path)
            if self.damaged is None:
                db, self.damaged = _open_checked(journal_path)
            if db is None:
                aside = _move_aside(journal_path)
                log.error(
                    "power-limit journal %s is damaged (%s); kept it as %s and will restore "
                    "every GPU to its default limit",
                    journal_path,
                    self.damaged,
                    aside,
                )
                db = _open_journal(journal_path)
        except (sqlite3.Error, OSError) as e:
            raise JournalError(f"power-limit journal {journal_path}: {e}") from e
        self._db = db

    def set_limit(self, gpu: int, watts: float, *, reason: str) -> LimitChange:
        """Set one GPU's limit. Raises KeyError, InvalidArgument, RateLimited or HardwareError."""
        device = self._devices[gpu]
        info = device.info()
        lo, hi = info.power_limit_min_w, info.power_limit_max_w
        if lo is None or hi is None:
            raise InvalidArgument(f"GPU {gpu} does not report its power-limit range")
        if not lo <= watts <= hi:
            raise InvalidArgument(
                f"power limit {watts:g} W for GPU {gpu} is outside its range [{lo:g}, {hi:g}] W"
            )
        with self._lock:
            now = self._monotonic()
            last = self._last_change.get(gpu)
            if last is not None and now - last < self._min_interval_s:
                raise RateLimited(
                    f"GPU {gpu}: limit changed {now - last:.2f} s ago; "
                    f"at most one change per {self._min_interval_s:g} s"
                )
            if not self._has_original(info.uuid):
                found = self._limit_to_restore(gpu, device, info)
                self._db.execute(
                    "INSERT INTO originals VALUES (?, ?, ?, ?)",
                    (info.uuid, gpu, found, self._wall()),
                )
            cur = self._db.execute(
                "INSERT INTO changes (at, gpu, uuid, requested_watts, reason, status) "
                "VALUES (?, ?, ?, ?, ?, 'intended')",
                (self._wall(), gpu, info.uuid, watts, reason),
            )
            row = cur.lastrowid
            self._checkpoint()
            try:
                enforced = device.set_power_limit(watts)
            except HardwareError as e:
                self._db.execute(
                    "UPDATE changes SET status = ? WHERE id = ?", (f"failed: {e}", row)
                )
                self._checkpoint()
                raise
            self._last_change[gpu] = now
            self._db.execute(
                "UPDATE changes SET status = 'done', enforced_watts = ? WHERE id = ?",
                (enforced, row),
            )
            self._checkpoint()
        if abs(enforced - watts) > 1.0:
            log.warning("GPU %d: requested %.0f W, driver enforces %.0f W", gpu, watts, enforced)
        return LimitChange(gpu, watts, enforced)

    def _checkpoint(self) -> None:
        """Move what the WAL holds into the database file, and empty the WAL.

        At rest, nothing then lives only in the write-ahead log, where damage could drop it
        unseen (SQLite ignores WAL frames that fail their checksums).
        """
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _has_original(self, uuid: str) -> bool:
        row = self._db.execute("SELECT 1 FROM originals WHERE uuid = ?", (uuid,)).fetchone()
        return row is not None

    @staticmethod
    def _limit_to_restore(gpu: int, device: GpuDevice, info: GpuInfo) -> float:
        """The limit found on the GPU, else the board's default: never a change without one.

        Reads only the enforced limit (one driver call, under the GPU's own lock), never the
        whole device: full reads belong to the sampler, which owns them.
        """
        try:
            return device.read_power_limit_w()
        except HardwareError as e:
            if info.power_limit_default_w is None:
                raise InvalidArgument(
                    f"GPU {gpu}: its current power limit cannot be read ({e}) and it reports "
                    "no default limit; refusing a change that could not be undone"
                ) from e
            log.warning(
                "GPU %d: current power limit unreadable (%s); journalling its default "
                "limit %.0f W as the one to restore",
                gpu,
                e,
                info.power_limit_default_w,
            )
            return info.power_limit_default_w

    def journal_decisions(self, decisions: Iterable[JournalledDecision]) -> None:
        """Add policy decisions to the journal (dry-run ones too: what would have been done)."""
        rows = [
            (d.at, d.gpu, d.policy, d.action, d.mode, d.from_watts, d.to_watts, d.reason,
             d.jobs, d.error)
            for d in decisions
        ]  # fmt: skip
        if not rows:
            return
        with self._lock:
            self._db.executemany(
                "INSERT INTO decisions (at, gpu, policy, action, mode, from_watts, to_watts, "
                "reason, jobs, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def journalled_decisions(self) -> list[JournalledDecision]:
        """Every journalled decision, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, gpu, policy, action, mode, from_watts, to_watts, reason, jobs, error "
                "FROM decisions ORDER BY id"
            ).fetchall()
        return [JournalledDecision(*row) for row in rows]

    def prune(self, older_than_s: float) -> int:
        """Delete changes and decisions older than ``older_than_s``; returns how many.

        The limits to restore (``originals``) are never pruned, however old: a GPU capped a
        year ago still goes back to the limit found before.
        """
        if not older_than_s >= 0:
            raise ValueError(f"older_than_s must be 0 or more, got {older_than_s!r}")
        cutoff = self._wall() - older_than_s
        with self._lock:
            pruned = 0
            for table in ("changes", "decisions"):
                cur = self._db.execute(f"DELETE FROM {table} WHERE at < ?", (cutoff,))
                pruned += max(cur.rowcount, 0)
            if pruned:
                self._checkpoint()
        return pruned

    def originals(self) -> dict[str, tuple[int, float]]:
        """Limits found before our first change, by UUID: (gpu index, watts)."""
        rows = self._db.execute("SELECT uuid, gpu, watts FROM originals").fetchall()
        return {str(u): (int(g), float(w)) for u, g, w in rows}

    def restore_all(self) -> list[str]:
        """Put back every limit we changed; returns the failures (which stay journalled)."""
        failures = []
        by_uuid = {}
        for d in self._devices.values():
            try:
                by_uuid[d.info().uuid] = d
            except HardwareError:
                continue
        with self._lock:
            for uuid, (gpu, watts) in self.originals().items():
                device = by_uuid.get(uuid)
                if device is None:
                    failures.append(f"GPU {gpu} ({uuid}) not present; its limit stays journalled")
                    continue
                try:
                    enforced = device.set_power_limit(watts)
                except HardwareError as e:
                    failures.append(f"GPU {gpu}: restoring {watts:g} W failed: {e}")
                    continue
                self._db.execute("DELETE FROM originals WHERE uuid = ?", (uuid,))
                self._checkpoint()
                log.info("GPU %d: power limit restored to %.0f W", gpu, enforced)
        for f in failures:
            log.error("%s", f)
        return failures

    def recover(self) -> list[str]:
        """After a crash: restore limits a previous run left journalled.

        If the journal was damaged, what it held is unknown: every GPU goes back to its default.
        """
        if self.damaged is not None:
            return self._restore_defaults()
        pending = self.originals()
        if not pending:
            return []
        log.warning(
            "restoring %d power limit(s) left by a previous run that did not exit cleanly",
            len(pending),
        )
        return self.restore_all()

    def _restore_defaults(self) -> list[str]:
        failures = []
        with self._lock:
            for gpu, device in sorted(self._devices.items()):
                try:
                    default = device.info().power_limit_default_w
                    if default is None:
                        failures.append(f"GPU {gpu}: no default limit known; left as it is")
                        continue
                    try:
                        if device.read_power_limit_w() == default:
                            continue
                    except HardwareError:
                        pass  # unreadable: set it anyway
                    enforced = device.set_power_limit(default)
                except HardwareError as e:
                    failures.append(f"GPU {gpu}: restoring its default limit failed: {e}")
                    continue
                log.warning("GPU %d: power limit restored to its default %.0f W", gpu, enforced)
        for f in failures:
            log.error("%s", f)
        return failures

    def close(self) -> None:
        """Close the journal."""
        self._db.close()


def _open_journal(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
    except sqlite3.Error:
        db.close()
        raise
    return db


def _open_checked(path: Path) -> tuple[sqlite3.Connection | None, str | None]:
    """Open the journal and run SQLite's integrity check: the connection, or what is wrong.

    Corruption (``file is not a database``, ``database disk image is malformed``) is damage;
    operational errors (cannot open, disk I/O) are raised.
    """
    try:
        db = _open_journal(path)
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as e:
        return None, str(e)
    try:
        rows = [str(r[0]) for r in db.execute("PRAGMA integrity_check(5)").fetchall()]
    except sqlite3.OperationalError:
        db.close()
        raise
    except sqlite3.DatabaseError as e:
        rows = [str(e)]
    if rows == ["ok"]:
        return db, None
    db.close()
    return None, "integrity check: " + "; ".join(rows)


_SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksum words little- or big-endian


def journal_damage(path: Path) -> str | None:
    """What is wrong with a journal file and its WAL, read before SQLite opens them; or None.

    SQLite itself takes a truncated file, or one cut to zero bytes, for a smaller or empty
    database, and skips WAL frames that fail their checksums: both silently lose rows.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(100)
            size = f.seek(0, 2)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if size == 0:
        return "the file is empty (it was cut to zero bytes)"
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "not an SQLite database"
    (page_size,) = struct.unpack(">H", header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    changes, pages = struct.unpack(">II", header[24:32])
    (valid_for,) = struct.unpack(">I", header[92:96])
    if valid_for == changes and pages * page_size > size:
        return f"truncated: {size} bytes where its header says {pages} pages of {page_size}"
    return _wal_damage(Path(f"{path}-wal"))


def _wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _wal_damage(wal: Path) -> str | None:
    """Check a write-ahead log's header and frames as SQLite's recovery would, but say so."""
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"its WAL is unreadable: {e.strerror or e}"
    if not data:
        return None
    if len(data) < 32:
        return "its WAL is cut inside its header"
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    big = magic == _WAL_MAGIC[1]
    if magic not in _WAL_MAGIC or _wal_checksum(data[:24], big, 0, 0) != (c1, c2):
        return "its WAL header is not valid"
    frame = 24 + page_size
    s = (c1, c2)
    offset, last_commit = 32, True
    while offset < len(data):
        if offset + 24 > len(data):
            return "its WAL is cut inside a frame header"
        _page, commit, fs1, fs2, fc1, fc2 = struct.unpack(">6I", data[offset : offset + 24])
        if (fs1, fs2) != (salt1, salt2):
            break  # a frame left from an earlier, already checkpointed log: SQLite ignores it
        if offset + frame > len(data):
            return "its WAL is cut inside a frame"
        s = _wal_checksum(data[offset : offset + 8] + data[offset + 24 : offset + frame], big, *s)
        if s != (fc1, fc2):
            return f"its WAL frame at byte {offset} fails its checksum"
        last_commit = commit != 0
        offset += frame
    if not last_commit:
        return "its WAL ends in the middle of a transaction"
    return None


def _move_aside(path: Path) -> Path:
    """Rename a damaged journal (and its WAL) to ``<name>.damaged-<time>``; drop its shm."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    if path.exists():
        path.rename(aside)
    wal = Path(f"{path}-wal")
    if wal.exists():
        wal.rename(Path(f"{aside}-wal"))
    Path(f"{path}-shm").unlink(missing_ok=True)
    return aside
