"""Simulator controls (``/api/v1/sim/*``): thin wrappers over the simulated fleet.

A body is checked by the contract, then handed to the simulated GPU, which checks its values
(422 with its reason). On real GPUs these endpoints are 404.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Protocol

from wattwarden.api.contract import ApiError, SimFault, SimLoad
from wattwarden.hardware.errors import InvalidArgument

log = logging.getLogger("wattwarden.api.server")


class SimulatedGpu(Protocol):
    """What the API drives on a simulated GPU."""

    def inject(self, fault: str, **params: Any) -> None:
        """Inject (or clear) a fault."""

    def set_load(self, utilization: float, memory_bytes: int | None = None) -> None:
        """Set a synthetic load."""


class SimulatedGpus(Protocol):
    """A simulated fleet, by GPU index."""

    def __len__(self) -> int:
        """How many GPUs."""

    def __getitem__(self, index: int) -> SimulatedGpu:
        """One GPU."""


def _fleet(fleet: SimulatedGpus | None) -> SimulatedGpus:
    if fleet is None:
        raise ApiError(HTTPStatus.NOT_FOUND, "this agent reads real GPUs; sim endpoints are off")
    return fleet


def inject_fault(fleet: SimulatedGpus | None, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/v1/sim/faults``; the answer's body."""
    gpus = _fleet(fleet)
    req = SimFault.from_json(body, len(gpus))
    try:
        gpus[req.gpu].inject(req.fault, **req.params)
    except InvalidArgument as e:
        raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
    log.warning("sim: injected %s on GPU %d %s", req.fault, req.gpu, req.params or "")
    return {"gpu": req.gpu, "fault": req.fault}


def set_load(fleet: SimulatedGpus | None, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/v1/sim/load``; the answer's body."""
    gpus = _fleet(fleet)
    req = SimLoad.from_json(body, len(gpus))
    try:
        gpus[req.gpu].set_load(req.utilization, req.memory_bytes)
    except InvalidArgument as e:
        raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
    return {"gpu": req.gpu, "utilization": req.utilization}
