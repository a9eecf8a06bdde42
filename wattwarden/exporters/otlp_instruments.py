"""OpenTelemetry instruments over the store: one observable instrument per GPU table row with one.

Each row of :data:`~wattwarden.collectors.metrics.GPU_METRICS` that names an OpenTelemetry
instrument becomes one; its callback reads one store snapshot and observes the row's series for
every GPU, with the GPU's identity attributes, the row's label values under their attribute
names, and the row's constant attributes. An export never touches NVML.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from wattwarden.collectors.metrics import GPU_METRICS, OtelSpec, Series, values
from wattwarden.collectors.samples import GpuSample
from wattwarden.collectors.store import GpuView, MetricStore
from wattwarden.exporters.otlp_config import AttributeValue

Callback = Callable[[CallbackOptions], Iterable[Observation]]


def gpu_attributes(s: GpuSample) -> dict[str, AttributeValue]:
    """The identity every point of a GPU carries (hw.id, hw.type, hw.name, gpu.index)."""
    return {
        "hw.id": s.info.uuid,
        "hw.type": "gpu",
        "hw.name": s.info.name,
        "gpu.index": s.info.index,
    }


class Instruments:
    """Observable instruments whose callbacks read one store snapshot each."""

    def __init__(self, store: MetricStore) -> None:
        self._store = store

    def register(self, meter: Meter) -> None:
        """Create one instrument per table row that has an OpenTelemetry name."""
        create = {
            "gauge": meter.create_observable_gauge,
            "counter": meter.create_observable_counter,
            "updowncounter": meter.create_observable_up_down_counter,
        }
        for spec in GPU_METRICS:
            otel = spec.otel
            if otel is not None:
                callback = self._callback(otel, otel.read or spec.read)
                create[otel.kind](
                    otel.name, [callback], unit=otel.unit, description=otel.description
                )

    def _callback(self, otel: OtelSpec[GpuView], read: Callable[[GpuView], Series]) -> Callback:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for view in self._store.snapshot().gpus:
                base = gpu_attributes(view.sample)
                for labels, value in values(read, view):
                    attrs = {
                        **base,
                        **dict(zip(otel.attrs, labels, strict=True)),
                        **dict(otel.const),
                    }
                    out.append(Observation(value, attrs))
            return out

        return callback
