"""Idle capping: a GPU that has done nothing for a while waits at its minimum power limit.

A GPU whose utilization reads idle (at or under ``collectors.jobs.IDLE_UTILIZATION``, the same
test the job registry uses to learn idle power) in every period for ``idle_after_s``,
with no running job on it and none on its way to it (a job whose ``target_gpu`` it is), gets its
minimum limit as the capper's intent. The moment a period sees load on it (utilization above
idle) or such a job, the capper has no intent for it, and the engine gives the GPU back the limit
it had before (no intent means back to the original limit) in that same period.

Why the minimum: at idle a board draws far less than its minimum limit (an H100 SXM about 70 W
against 200 W), so the cap costs nothing while the GPU idles; what it buys is that a burst of work
started outside any job the node knows of (a stray process, a job not registered yet) cannot draw
full power before the next period gives the limit back.

The idle timer runs on the period clock (:attr:`PolicyInputs.now_mono_s`): it starts in the first
period that sees the GPU idle and is reset by any period that sees it busy, lost, unread or
without a utilization reading. State is kept per GPU by UUID (and index), so a replaced or
renumbered GPU starts afresh.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wattwarden.collectors.jobs import IDLE_UTILIZATION, JobView
from wattwarden.collectors.store import GpuView
from wattwarden.policies.base import Intent, PolicyInputs

DEFAULT_IDLE_AFTER_S = 300.0


@dataclass(slots=True)
class _Idle:
    index: int
    since_s: float
    """When the first period of the current idle stretch saw it (period clock)."""


class IdleCapper:
    """Cap a GPU idle for ``idle_after_s`` seconds, with no job on it, to its minimum limit.

    ``idle_utilization``: the utilization at or under which a GPU reads idle (0..1).
    """

    def __init__(
        self,
        *,
        idle_after_s: float = DEFAULT_IDLE_AFTER_S,
        idle_utilization: float = IDLE_UTILIZATION,
    ) -> None:
        if not idle_after_s >= 0:
            raise ValueError(f"idle_after_s must be 0 or more, got {idle_after_s!r}")
        if not 0 <= idle_utilization < 1:
            raise ValueError(f"idle_utilization must be in [0, 1), got {idle_utilization!r}")
        self.idle_after_s = idle_after_s
        self.idle_utilization = idle_utilization
        self._idle: dict[str, _Idle] = {}

    @property
    def name(self) -> str:
        """``idle``."""
        return "idle"

    def idle_since(self) -> dict[int, float]:
        """Per GPU index idle now: when its idle stretch started (period clock)."""
        return {t.index: t.since_s for t in self._idle.values()}

    def intents(self, inputs: PolicyInputs) -> Iterable[Intent]:
        """The minimum limit for each GPU idle long enough; nothing for the others."""
        claimed = _claimed_gpus(inputs.jobs)
        now = inputs.now_mono_s
        seen: set[str] = set()
        out: list[Intent] = []
        for view in inputs.snapshot.gpus:
            info = view.sample.info
            seen.add(info.uuid)
            if not self._reads_idle(view) or info.index in claimed:
                self._idle.pop(info.uuid, None)
                continue
            track = self._idle.get(info.uuid)
            if track is None or track.index != info.index:
                track = self._idle[info.uuid] = _Idle(info.index, now)
            idle_s = now - track.since_s
            lo = info.power_limit_min_w
            if idle_s >= self.idle_after_s and lo is not None:
                out.append(
                    Intent(
                        info.index,
                        lo,
                        f"GPU {info.index} idle for {idle_s:.0f} s: capped to its {lo:.0f} W "
                        "minimum",
                    )
                )
        for gone in set(self._idle) - seen:
            del self._idle[gone]
        return out

    def _reads_idle(self, view: GpuView) -> bool:
        """Up, read, and its utilization at or under idle."""
        sample = view.sample
        reading = sample.reading
        if not sample.up or reading is None or sample.slow_read_mono_s is None:
            return False
        util = reading.utilization_gpu_ratio
        return util is not None and util <= self.idle_utilization


def _claimed_gpus(jobs: Iterable[JobView]) -> set[int]:
    """GPUs a running job is on, or is being moved to."""
    out: set[int] = set()
    for job in jobs:
        if job.state != "running":
            continue
        out.add(job.gpu)
        if job.target_gpu is not None:
            out.add(job.target_gpu)
    return out
