"""Power-limit changes an operator asks for by hand (the API's ``POST /api/v1/power-limits``).

The decision lives here, not in the HTTP handler: dry-run refuses, the actuator (journal, bounds,
rate limit, read-back) acts, and every outcome that reached the driver is counted as a policy
action of the ``api`` policy. A refusal names its kind; the API maps kinds to statuses.
"""

from __future__ import annotations

import enum

from wattwarden.collectors.store import MetricStore
from wattwarden.hardware.errors import HardwareError, InvalidArgument
from wattwarden.policies.actuator import LimitActuator, LimitChange, RateLimited

POLICY = "api"
DRY_RUN_MESSAGE = "the agent runs in dry-run mode; start it with --apply to change power limits"


class Refusal(enum.Enum):
    """Why a manual change was not made."""

    DRY_RUN = "dry_run"
    """The agent only reports (no ``--apply``), or has no actuator."""
    OUT_OF_RANGE = "out_of_range"
    """Outside the GPU's [min, max] limits."""
    TOO_SOON = "too_soon"
    """The actuator's rate limit."""
    DRIVER = "driver"
    """The driver refused the set call."""


class Refused(Exception):
    """A manual change refused; ``str()`` is its one-line reason."""

    def __init__(self, kind: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def set_power_limit(
    actuator: LimitActuator | None, mode: str, store: MetricStore, gpu: int, watts: float
) -> LimitChange:
    """Set ``gpu``'s limit to ``watts`` in apply mode; the change, or :class:`Refused`."""
    if mode != "apply" or actuator is None:
        raise Refused(Refusal.DRY_RUN, DRY_RUN_MESSAGE)
    try:
        change = actuator.set_limit(gpu, watts, reason=POLICY)
    except InvalidArgument as e:
        raise Refused(Refusal.OUT_OF_RANGE, str(e)) from None
    except RateLimited as e:
        raise Refused(Refusal.TOO_SOON, str(e)) from None
    except HardwareError as e:
        store.count_policy_action(POLICY, "set_power_limit_failed", "apply")
        raise Refused(Refusal.DRIVER, str(e)) from None
    store.count_policy_action(POLICY, "set_power_limit", "apply")
    return change
