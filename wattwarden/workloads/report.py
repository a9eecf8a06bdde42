"""What workloads print and write: a progress bar or lines, JSON reports, progress to the agent."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from wattwarden.config import ConfigError
from wattwarden.workloads.agent_client import (
    ENV_AGENT_URL,
    ENV_JOB_NAME,
    ENV_TOKEN,
    AgentClient,
    AgentError,
)

log = logging.getLogger(__name__)

BAR_WIDTH = 24


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def total(values: Sequence[float | None]) -> float | None:
    """The sum of ``values``, or None when there are none or any is unknown."""
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    """A number for a progress line, ``-`` when unknown."""
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def finite(data: Any) -> Any:
    """``data`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file in the same directory and a rename."""
    data = finite(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ProgressDisplay:
    """A progress bar on a terminal (stderr a tty), else a plain line every ``interval_s``."""

    def __init__(
        self,
        total: int,
        *,
        label: str,
        stream: TextIO,
        tty: bool | None = None,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = interval_s if not self.tty else 0.1
        self._clock = clock
        self._last = -math.inf
        self._shown = False

    def update(self, done: int, text: str, *, force: bool = False) -> None:
        """Show progress ``done`` of ``total`` with a status text, rate-limited."""
        now = self._clock()
        if not force and done < self.total and now - self._last < self.interval_s:
            return
        self._last = now
        if self.tty:
            filled = round(BAR_WIDTH * min(done / self.total, 1.0))
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stream.write(f"\r\x1b[K{self.label} [{bar}] {done}/{self.total} {text}")
            self._shown = True
        else:
            self.stream.write(f"{self.label}: {done}/{self.total} {text}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (below the bar on a terminal)."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = False
        self.stream.write(f"{self.label}: {text}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


class ProgressReporter:
    """Posts a job's progress to the agent about once a second, off the training thread.

    The training loop calls :meth:`update` (cheap: it only stores the numbers); a background
    thread posts the latest values when they changed. Failures are logged once and never stop
    the workload.
    """

    def __init__(self, client: AgentClient, job: str, *, interval_s: float = 1.0) -> None:
        self._client = client
        self._job = job
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._latest: tuple[int, int, int] | None = None
        self._sent: tuple[int, int, int] | None = None
        self._failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wattwarden-progress", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ProgressReporter | None:
        """A reporter when the job supervisor set the agent URL, job name and token."""
        env = os.environ if environ is None else environ
        url, job, token = env.get(ENV_AGENT_URL), env.get(ENV_JOB_NAME), env.get(ENV_TOKEN)
        if not (url and job and token):
            return None
        try:
            client = AgentClient(url, token=token, timeout_s=2.0)
        except ConfigError as e:
            log.warning("not reporting progress: $%s: %s", ENV_AGENT_URL, e)
            return None
        return cls(client, job)

    def update(self, step: int, samples: int, tokens: int) -> None:
        """Record the latest progress; the thread sends it."""
        with self._lock:
            self._latest = (step, samples, tokens)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.flush()

    def flush(self) -> None:
        """Send the latest progress now if it was not sent yet."""
        with self._lock:
            latest = self._latest
        if latest is None or latest == self._sent:
            return
        try:
            self._client.post_progress(self._job, *latest)
        except AgentError as e:
            if not self._failed:
                log.warning("progress not reported to the agent (will keep trying): %s", e)
                self._failed = True
            return
        if self._failed:
            log.info("progress reporting to the agent works again")
            self._failed = False
        self._sent = latest

    def close(self) -> None:
        """Stop the thread and send the final progress."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        self._client.close()
