"""Clocks for the simulator: real monotonic time, or a manual clock tests advance themselves."""

from __future__ import annotations

import threading
from collections.abc import Callable

Clock = Callable[[], float]


class ManualClock:
    """A monotonic clock that moves only when told to; thread-safe."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self._now = start_s
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The current time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward and return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back (advance by {seconds} s)")
        with self._lock:
            self._now += seconds
            return self._now
