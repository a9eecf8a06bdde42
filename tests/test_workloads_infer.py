"""The inference workload: latency percentiles, J per request, tokens per J, trained weights."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

from wattwarden.config import ConfigError
from wattwarden.hardware.sim import SimFleet
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml, uninstall_fake_nvml
from wattwarden.workloads.infer import InferConfig, run_infer
from wattwarden.workloads.meter import EnergyMeter
from wattwarden.workloads.report import percentile
from wattwarden.workloads.train import TrainConfig, run_train

SMALL = {"size": "tiny", "prompt_len": 8, "new_tokens": 4, "threads": 1, "warmup": 1}


@pytest.fixture
def fleet() -> Iterator[SimFleet]:
    f = SimFleet(1)
    install_fake_nvml(f)
    yield f
    uninstall_fake_nvml()


def test_infer_reports_latency_percentiles_and_energy_per_request(fleet: SimFleet, tmp_path: Path):
    fleet[0].set_load(0.6)
    report_path = tmp_path / "infer.json"
    cfg = InferConfig(requests=12, batch_size=2, report=report_path, **SMALL)  # type: ignore[arg-type]
    # No CUDA here: a meter on simulated GPU 0 stands in for the one a CUDA run opens.
    with EnergyMeter(gpus=[0], source="nvml", host=False) as meter:
        result = run_infer(cfg, stream=io.StringIO(), meter=meter)
    report = json.loads(report_path.read_text())
    assert report["energy_device"] == "gpu" and report["energy_source"] == "nvml"
    s = report["summary"]
    assert s["requests"] == 12 and len(report["requests"]) == 12
    latencies_ms = [r["latency_s"] * 1000 for r in report["requests"]]
    assert s["latency_ms_p50"] == pytest.approx(percentile(latencies_ms, 50))
    assert 0 < s["latency_ms_p50"] <= s["latency_ms_p95"] <= s["latency_ms_p99"]
    assert s["latency_ms_p99"] <= s["latency_ms_max"]
    assert s["tokens"] == 12 * 2 * 4
    assert s["energy_j"] > 0
    assert s["j_per_request"] == pytest.approx(s["energy_j"] / 12)
    assert s["tokens_per_j"] == pytest.approx(s["tokens"] / s["energy_j"])
    assert not result.interrupted


def test_percentile_interpolates_between_ranks():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None


def test_infer_loads_trained_weights_and_checks_the_size(tmp_path: Path):
    run_train(
        TrainConfig(
            steps=2, batch_size=2, seq_len=16, checkpoint_dir=tmp_path, energy_source="none",
            threads=1,
        ),
        stream=io.StringIO(),
    )  # fmt: skip
    cfg = InferConfig(requests=2, checkpoint_dir=tmp_path, energy_source="none", **SMALL)  # type: ignore[arg-type]
    result = run_infer(cfg, stream=io.StringIO())
    assert result.report["weights_from"].endswith("ckpt-000000002.pt")
    other = InferConfig(
        requests=2, checkpoint_dir=tmp_path, energy_source="none", **{**SMALL, "size": "small"}
    )  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="holds a tiny model"):
        run_infer(other, stream=io.StringIO())


def test_cpu_inference_without_rapl_reports_no_gpu_energy(fleet: SimFleet, tmp_path: Path):
    fleet[0].set_load(0.6)  # a busy simulated GPU the CPU run must not report
    out = io.StringIO()
    cfg = InferConfig(requests=3, rapl_root=tmp_path / "no-powercap", **SMALL)  # type: ignore[arg-type]
    result = run_infer(cfg, stream=out)
    report = result.report
    assert report["energy_device"] == "cpu" and report["energy_source"] == "none"
    assert report["gpus"] == [] and report["summary"]["energy_j"] is None
    last = out.getvalue().strip().splitlines()[-1]
    assert last.endswith("energy: not measured (no RAPL)") and "GPU" not in last
