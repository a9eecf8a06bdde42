"""A fleet of simulated GPUs whose driver state outlives the process, as a real driver's does."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Sequence
from pathlib import Path

from wattwarden.hardware.sim.clock import Clock
from wattwarden.hardware.sim.gpu import SimGpu
from wattwarden.hardware.sim.models import MODELS

log = logging.getLogger(__name__)

DRIVER_VERSION = "550.127.05-sim"
CUDA_DRIVER_VERSION = 12040
STATE_FILE = "driver-state.json"
# PCI bus numbers of the eight GPUs on an HGX H100 baseboard.
_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
_UUID_NAMESPACE = uuidlib.UUID("6f1c3a52-3d1e-4c39-9a8e-7d5b2f0e4a11")


def sim_uuid(index: int, seed: int) -> str:
    """A stable, NVML-shaped UUID for simulated GPU ``index``."""
    return "GPU-" + str(uuidlib.uuid5(_UUID_NAMESPACE, f"wattwarden-sim/{seed}/{index}"))


def sim_pci_bus_id(index: int) -> str:
    """An NVML-shaped PCI bus id for simulated GPU ``index``."""
    bus = _HGX_BUSES[index] if index < len(_HGX_BUSES) else 0xE0 + index
    return f"00000000:{bus:02X}:00.0"


class SimFleet:
    """N simulated GPUs of one model, with driver state kept under ``<state_dir>/sim``."""

    def __init__(
        self,
        count: int = 8,
        *,
        model: str = "h100-sxm",
        clock: Clock = time.monotonic,
        state_dir: Path | None = None,
        seed: int = 0,
        wall_clock: Clock = time.time,
    ) -> None:
        if count < 1 or count > 64:
            raise ValueError(f"a simulated fleet has 1 to 64 GPUs, got {count}")
        if model not in MODELS:
            raise ValueError(f"unknown GPU model {model!r}; known: {', '.join(sorted(MODELS))}")
        self.clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._state_path = state_dir / "sim" / STATE_FILE if state_dir is not None else None
        saved = self._load()
        spec = MODELS[model]
        self.gpus: list[SimGpu] = []
        for i in range(count):
            uid = sim_uuid(i, seed)
            prior = saved.get(uid, {})
            same = prior.get("model") == model
            limit = prior.get("power_limit_w") if same else None
            saved_energy = prior.get("energy_j") if same else None
            energy = float(saved_energy) if isinstance(saved_energy, int | float) else 0.0
            self.gpus.append(
                SimGpu(
                    i,
                    spec,
                    uuid=uid,
                    pci_bus_id=sim_pci_bus_id(i),
                    clock=clock,
                    seed=seed * 1000 + i,
                    power_limit_w=float(limit) if isinstance(limit, int | float) else None,
                    energy_j=energy,
                    on_change=self.save,
                )
            )

    def __len__(self) -> int:
        return len(self.gpus)

    def __getitem__(self, index: int) -> SimGpu:
        return self.gpus[index]

    @property
    def devices(self) -> Sequence[SimGpu]:
        """The GPUs in index order."""
        return self.gpus

    def _load(self) -> dict[str, dict[str, object]]:
        if self._state_path is None or not self._state_path.exists():
            return {}
        try:
            data = json.loads(self._state_path.read_text())
            gpus = {str(g["uuid"]): g for g in data["gpus"]}
            idle_s = max(0.0, self._wall_clock() - float(data["saved_at"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable simulated driver state %s: %s", self._state_path, e)
            return {}
        # While no agent ran, the GPUs sat idle and the counters kept counting, as on a real host.
        for g in gpus.values():
            spec = MODELS.get(str(g.get("model")))
            if spec is not None and isinstance(g.get("energy_j"), int | float):
                g["energy_j"] = float(g["energy_j"]) + spec.idle_w * idle_s
        return gpus

    def save(self) -> None:
        """Write limits and energy counters atomically (temp file + rename)."""
        if self._state_path is None:
            return
        with self._lock:
            states = [g.state() for g in self.gpus]
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"saved_at": self._wall_clock(), "gpus": states}, indent=1))
            os.replace(tmp, self._state_path)
