"""Power-limit actuation with a journal, so no GPU is ever left capped.

Every intended change is written to a SQLite journal (WAL) before it is made. The first change to
a GPU also records the limit found on it; :meth:`LimitActuator.restore_all` puts those back on
exit, and :meth:`LimitActuator.recover` does so on the next start after a crash.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
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
"""


class RateLimited(Exception):
    """A change came sooner than the minimum interval after the previous one on that GPU."""


@dataclass(frozen=True, slots=True)
class LimitChange:
    """The outcome of one change."""

    gpu: int
    requested_w: float
    enforced_w: float


class LimitActuator:
    """Sets power limits within [min, max], journalled, rate-limited, read back, and restorable."""

    def __init__(
        self,
        devices: Sequence[GpuDevice],
        journal_path: Path,
        *,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._devices = {d.index: d for d in devices}
        self._min_interval_s = min_interval_s
        self._monotonic = monotonic
        self._last_change: dict[int, float] = {}
        self._lock = threading.Lock()
        journal_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(journal_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

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
                    (info.uuid, gpu, found, time.time()),
                )
            cur = self._db.execute(
                "INSERT INTO changes (at, gpu, uuid, requested_watts, reason, status) "
                "VALUES (?, ?, ?, ?, ?, 'intended')",
                (time.time(), gpu, info.uuid, watts, reason),
            )
            row = cur.lastrowid
            try:
                enforced = device.set_power_limit(watts)
            except HardwareError as e:
                self._db.execute(
                    "UPDATE changes SET status = ? WHERE id = ?", (f"failed: {e}", row)
                )
                raise
            self._last_change[gpu] = now
            self._db.execute(
                "UPDATE changes SET status = 'done', enforced_watts = ? WHERE id = ?",
                (enforced, row),
            )
        if abs(enforced - watts) > 1.0:
            log.warning("GPU %d: requested %.0f W, driver enforces %.0f W", gpu, watts, enforced)
        return LimitChange(gpu, watts, enforced)

    def _has_original(self, uuid: str) -> bool:
        row = self._db.execute("SELECT 1 FROM originals WHERE uuid = ?", (uuid,)).fetchone()
        return row is not None

    @staticmethod
    def _limit_to_restore(gpu: int, device: GpuDevice, info: GpuInfo) -> float:
        """The limit found on the GPU, else the board's default: never a change without one.

        Reads only the enforced limit (one driver call), not the whole device, so it does not
        race the sampler's batched read of the same GPU.
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
                log.info("GPU %d: power limit restored to %.0f W", gpu, enforced)
        for f in failures:
            log.error("%s", f)
        return failures

    def recover(self) -> list[str]:
        """After a crash: restore limits a previous run left journalled."""
        pending = self.originals()
        if not pending:
            return []
        log.warning(
            "restoring %d power limit(s) left by a previous run that did not exit cleanly",
            len(pending),
        )
        return self.restore_all()

    def close(self) -> None:
        """Close the journal."""
        self._db.close()
