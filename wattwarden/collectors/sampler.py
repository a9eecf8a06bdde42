"""The sampler thread: runs each collector on its schedule and fills the store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from wattwarden.collectors.base import Collector
from wattwarden.collectors.errors import CollectorUnavailable
from wattwarden.collectors.gpu import PartialCollectionError
from wattwarden.collectors.store import MetricStore

log = logging.getLogger(__name__)


class Cadence:
    """Says when a task run after sampler passes (job reaping, saving state) is due.

    Due every ``every_s`` seconds of monotonic time, however long the passes take and whatever the
    wall clock does.

    Due times sit on a grid from the creation time; a pass that finds it fell behind by more than
    one period runs the task once and starts the grid again from then (no burst of catch-ups).
    """

    def __init__(self, every_s: float, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        if every_s <= 0:
            raise ValueError("every_s must be positive")
        self.every_s = every_s
        self._monotonic = monotonic
        self._due_s = monotonic() + every_s

    def due(self) -> bool:
        """Whether the task is due now; if so, the next due time is set."""
        now = self._monotonic()
        if now < self._due_s:
            return False
        self._due_s += self.every_s
        if self._due_s <= now:
            self._due_s = now + self.every_s
        return True


class Sampler:
    """Calls collectors every ``interval_s`` (or their own, longer interval) on one thread.

    A failing collector is logged (each distinct message once until it recovers), counted, and
    reported down; it never stops the others.
    """

    def __init__(
        self,
        store: MetricStore,
        collectors: Sequence[Collector],
        *,
        interval_s: float = 0.1,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_pass: Callable[[], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.store = store
        self.collectors = list(collectors)
        self.interval_s = interval_s
        self._monotonic = monotonic
        self._wall = wall
        self._on_pass = on_pass
        self._due: dict[str, float] = {}
        self._last_error: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0

    def run_once(self) -> None:
        """One pass over the collectors that are due."""
        now = self._monotonic()
        for c in self.collectors:
            if c.interval_s is not None and now < self._due.get(c.name, 0.0):
                continue
            self._due[c.name] = now + (c.interval_s or 0.0)
            self._collect(c)
        self.store.mark_pass(self._wall())
        self.passes += 1
        if self._on_pass is not None:
            try:
                self._on_pass()
            except Exception as e:  # a failing hook must not stop sampling
                message = f"{type(e).__name__}: {e}"
                if self._last_error.get("on_pass") != message:
                    self._last_error["on_pass"] = message
                    log.exception("after-pass hook failed")

    def _collect(self, c: Collector) -> None:
        start = time.perf_counter()
        error: str | None = None
        failed = False
        up = True
        try:
            self.store.put(c.collect())
        except PartialCollectionError as e:
            self.store.put(e.samples)
            error, failed = str(e), True
        except CollectorUnavailable as e:
            error, up = str(e), False
        except Exception as e:  # a collector bug must not stop the others
            error, failed, up = f"{type(e).__name__}: {e}", True, False
        duration = time.perf_counter() - start
        self.store.record_collector(c.name, up=up, duration_s=duration, error=error, failed=failed)
        if error is None:
            if c.name in self._last_error:
                log.info("collector %s recovered", c.name)
                del self._last_error[c.name]
        elif self._last_error.get(c.name) != error:
            self._last_error[c.name] = error
            log.warning("collector %s: %s", c.name, error)

    def start(self) -> None:
        """Run passes on a daemon thread until :meth:`close`."""
        self._thread = threading.Thread(target=self._loop, name="wattwarden-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_at = self._monotonic()
        while True:
            self.run_once()
            next_at += self.interval_s
            now = self._monotonic()
            # fell behind (a slow read): skip missed ticks rather than burst
            next_at = max(next_at, now)
            if self._stop.wait(next_at - now):
                return

    def close(self) -> None:
        """Stop the thread and close the collectors."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for c in self.collectors:
            try:
                c.close()
            except Exception as e:
                log.warning("closing collector %s: %s", c.name, e)
