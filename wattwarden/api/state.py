"""JSON views of the store, shared by the HTTP API and ``wattwarden status``."""

from __future__ import annotations

from typing import Any

from wattwarden.collectors.host import HOST_METRICS, HostSample
from wattwarden.collectors.metrics import GPU_METRICS, json_values
from wattwarden.collectors.rapl import RaplSample
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import GpuView, HistoryPoint, StoreSnapshot
from wattwarden.hardware.device import CLOCK_EVENT_LABELS

HISTORY_COLUMNS = (
    "timestamp",
    "power_watts",
    "temperature_celsius",
    "utilization_ratio",
    "power_limit_watts",
    "power_limit_target_watts",
    "clock_sm_hertz",
    "clock_events",
)
"""The columns of ``GET /api/v1/history``, in row order; new ones are only ever appended."""
HISTORY_STEP_MAX_S = 3600
"""The longest bucket ``GET /api/v1/history?step=S`` averages (seconds)."""
HISTORY_STEP_COLUMNS = (*HISTORY_COLUMNS, "seconds")
"""The columns with ``step`` over 1: ``seconds`` is how many seconds of the GPU a row averages."""


def clock_event_labels(mask: int | None) -> list[str]:
    """The labels of the clock-event reasons a mask holds (none for an unknown mask)."""
    return [label for bit, label in CLOCK_EVENT_LABELS if mask is not None and mask & bit]


def gpu_json(
    sample: GpuSample,
    power_mean_w: float | None = None,
    power_peak_w: float | None = None,
    power_limit_target_w: float | None = None,
) -> dict[str, Any]:
    """One GPU as a JSON object (base units, ``null`` where unsupported or not read now).

    The readings are the GPU metric table's rows that name a JSON key. A lost GPU keeps its
    identity, ``up: false`` and its counters, like /metrics: no reading from before it was lost.
    ``power_watts`` is the store's window mean (None when this pass could not tell the power),
    else this sample's power: never a reading frozen from before. ``power_limit_target_watts``
    is the limit the policy engine wants (None without one).
    """
    i = sample.info
    r = sample.reading if sample.up else None
    events = clock_event_labels(None if r is None else r.clock_event_mask)
    if sample.up and power_mean_w is None:  # one sample, no window (``status`` without an agent)
        power_mean_w = sample.power_w
    view = GpuView(sample, power_mean_w, power_peak_w, power_limit_target_w)
    readings = {key: value for spec in GPU_METRICS for key, value in json_values(spec, view)}
    if r is None:  # the size does not change: a lost or unread GPU's comes from its identity
        readings["memory_total_bytes"] = i.memory_total_bytes
    instant = sample.power_w if sample.up and sample.power_source == "instant" else None
    return {
        "index": i.index,
        "uuid": i.uuid,
        "name": i.name,
        "pci_bus_id": i.pci_bus_id,
        "driver_version": i.driver_version,
        "up": sample.up,
        "timestamp": sample.timestamp_s,
        **readings,
        "power_instant_watts": instant,
        "power_source": sample.power_source if sample.up else None,
        "energy_source": sample.energy_source,
        "clock_events": events,
        "clock_event_seconds": sample.clock_event_seconds,
        "xid_errors": {str(k): v for k, v in sorted(sample.xid_counts.items())},
        "processes": []
        if r is None
        else [
            {
                "pid": p.pid,
                "memory_used_bytes": p.memory_used_bytes,
                "utilization_ratio": p.sm_utilization_ratio,
            }
            for p in r.processes
        ],
    }


def state_json(
    snap: StoreSnapshot,
    *,
    backend: str,
    node: str,
    mode: str,
    holding: str | None = None,
    fallback: str | None = None,
) -> dict[str, Any]:
    """The agent's whole state, for ``GET /api/v1/state``.

    ``policy_mode`` is the mode in force, ``policy_holding`` why the policy engine holds and
    ``policy_fallback`` why apply mode fell back to dry-run (null when not), each GPU's
    ``power_limit_target_watts`` the limit the engine wants on it, ``power_budget_watts`` the
    node's budget and ``power_budget_lease_watts`` the share a fleet controller leases to this
    node (the store's ``lease`` scope; null without one).
    """
    host = next(iter(snap.samples(HostSample)), None)
    return {
        "node": node,
        "backend": backend,
        "policy_mode": mode,
        "policy_holding": holding,
        "policy_fallback": fallback,
        "last_sample_timestamp": snap.last_sample_s,
        "power_budget_watts": snap.power_budgets_w.get("node"),
        "power_budget_lease_watts": snap.power_budgets_w.get("lease"),
        "gpus": [
            gpu_json(v.sample, v.power_mean_w, v.power_peak_w, v.power_limit_target_w)
            for v in snap.gpus
        ],
        "host": None
        if host is None
        else {key: value for spec in HOST_METRICS for key, value in json_values(spec, host)},
        "rapl": [
            {"domain": r.domain, "energy_joules": r.energy_j, "power_watts": r.power_w}
            for r in snap.samples(RaplSample)
        ],
        "collectors": {
            name: {
                "up": h.up,
                "errors_total": h.errors_total,
                "duration_seconds": h.duration_s,
                "last_error": h.last_error,
            }
            for name, h in sorted(snap.collectors.items())
        },
    }


def history_json(history: dict[int, list[HistoryPoint]], step: int = 1) -> dict[str, Any]:
    """History as columns per GPU (readers go by the column names).

    Per second with ``step`` 1; else a row per bucket of ``step`` seconds that holds a second
    of the GPU, with a last ``seconds`` column (how many it holds; see
    :meth:`~wattwarden.collectors.store.MetricStore.history`). ``power_limit_target_watts`` is
    the limit the policy engine wanted (null without one); ``clock_events`` the labels of the
    clock-event reasons active, as in the state's ``clock_events``. A second the GPU was lost
    has no row.
    """
    labels: dict[int | None, list[str]] = {}  # a mask's labels, shared by the rows that have it

    def events(mask: int | None) -> list[str]:
        found = labels.get(mask)
        if found is None:
            found = labels[mask] = clock_event_labels(mask)
        return found

    def row(p: HistoryPoint) -> list[Any]:
        return [
            p.timestamp_s,
            p.power_w,
            p.temperature_c,
            p.utilization_ratio,
            p.power_limit_w,
            p.power_limit_target_w,
            p.clock_sm_hz,
            events(p.clock_event_mask),
        ]

    if step == 1:
        rows = {str(i): [row(p) for p in points] for i, points in history.items()}
        return {"columns": list(HISTORY_COLUMNS), "gpus": rows}
    # a bucket of several seconds: the same columns, and how many seconds it holds
    rows = {str(i): [[*row(p), p.seconds] for p in points] for i, points in history.items()}
    return {"columns": list(HISTORY_STEP_COLUMNS), "gpus": rows}
