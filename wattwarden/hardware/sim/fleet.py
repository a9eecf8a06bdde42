"""A fleet of simulated GPUs whose driver state outlives the process, as a real driver's does.

The state file holds one entry per GPU ever simulated in that state dir, keyed by UUID and model:
a run with fewer GPUs (``--sim 3`` after ``--sim 8``) or another model updates its own entries and
keeps the others as they were. A file that is not valid (not JSON, NaN or Infinity, a limit out of
range, a negative or absurd energy counter) is set aside as ``driver-state.json.bad-<time>`` and
the fleet starts fresh, so one bad value never reaches a reading.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wattwarden.hardware.sim.clock import Clock
from wattwarden.hardware.sim.gpu import SimGpu
from wattwarden.hardware.sim.models import MODELS

log = logging.getLogger(__name__)

DRIVER_VERSION = "550.127.05-sim"
CUDA_DRIVER_VERSION = 12040
STATE_FILE = "driver-state.json"
#: Energy counters above this are absurd (about 45,000 years of an H100 at full power).
MAX_ENERGY_J = 1e15
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
            prior = saved.pop((uid, model), None)
            limit = None if prior is None else prior["power_limit_w"]
            energy = 0.0 if prior is None else self._energy_now(prior)
            self.gpus.append(
                SimGpu(
                    i,
                    spec,
                    uuid=uid,
                    pci_bus_id=sim_pci_bus_id(i),
                    clock=clock,
                    seed=seed * 1000 + i,
                    power_limit_w=limit,
                    energy_j=energy,
                    on_change=self.save,
                )
            )
        # GPUs of other runs in this state dir (more GPUs, another model): kept as they were
        self._others = list(saved.values())

    def __len__(self) -> int:
        return len(self.gpus)

    def __getitem__(self, index: int) -> SimGpu:
        return self.gpus[index]

    @property
    def devices(self) -> Sequence[SimGpu]:
        """The GPUs in index order."""
        return self.gpus

    def _load(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The saved entries by (uuid, model); a bad file is set aside and nothing is loaded."""
        path = self._state_path
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(), parse_constant=_reject_constant)
            return _valid_entries(data)
        except OSError as e:
            log.warning("ignoring unreadable simulated driver state %s: %s", path, e)
            return {}
        except (ValueError, KeyError, TypeError) as e:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = path.with_name(f"{path.name}.bad-{stamp}")
            try:
                path.rename(aside)
            except OSError as move_error:
                aside = Path(f"(not kept: {move_error})")
            log.error(
                "simulated driver state %s is invalid (%s); kept it as %s and starting fresh",
                path,
                e,
                aside,
            )
            return {}

    def _energy_now(self, entry: Mapping[str, Any]) -> float:
        """A saved counter, plus what an idle GPU drew while no agent ran, as on a real host."""
        idle_s = max(0.0, self._wall_clock() - float(entry["saved_at"]))
        return float(entry["energy_j"]) + float(MODELS[entry["model"]].idle_w * idle_s)

    def save(self) -> None:
        """Write limits and energy counters atomically (temp file + rename)."""
        if self._state_path is None:
            return
        with self._lock:
            now = self._wall_clock()
            states: list[dict[str, Any]] = [{**g.state(), "saved_at": now} for g in self.gpus]
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_path.with_suffix(".tmp")
            body = {"saved_at": now, "gpus": states + self._others}
            tmp.write_text(json.dumps(body, indent=1, allow_nan=False))
            os.replace(tmp, self._state_path)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a driver can hold")


def _number(entry: Mapping[str, Any], key: str, lo: float, hi: float) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be within [{lo:g}, {hi:g}], got {value:g}")
    return float(value)


def _valid_entries(data: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Check every saved value; raise ValueError naming the first bad one."""
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise ValueError("expected an object with a 'gpus' list")
    file_saved_at = _number(data, "saved_at", 0.0, 1e11)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for g in data["gpus"]:
        if not isinstance(g, dict) or not isinstance(g.get("uuid"), str):
            raise ValueError(f"GPU entry without a uuid: {g!r}")
        spec = MODELS.get(str(g.get("model")))
        if spec is None:
            raise ValueError(f"GPU {g['uuid']}: unknown model {g.get('model')!r}")
        entry = {
            "uuid": g["uuid"],
            "model": spec.key,
            "power_limit_w": _number(g, "power_limit_w", spec.power_min_w, spec.power_max_w),
            "energy_j": _number(g, "energy_j", 0.0, MAX_ENERGY_J),
            "saved_at": _number(g, "saved_at", 0.0, 1e11) if "saved_at" in g else file_saved_at,
        }
        out[(g["uuid"], spec.key)] = entry
    return out
