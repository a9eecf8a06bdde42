"""The training workload: energy per step, exact resume, atomic checkpoints, SIGTERM, progress."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

torch = pytest.importorskip("torch")

from wattwarden.api.testing import SimAgent  # noqa: E402
from wattwarden.config import ConfigError  # noqa: E402
from wattwarden.hardware.sim import ManualClock, SimFleet  # noqa: E402
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml, uninstall_fake_nvml  # noqa: E402
from wattwarden.workloads import checkpoint as ckpt  # noqa: E402
from wattwarden.workloads.meter import EnergyMeter, Measurement  # noqa: E402
from wattwarden.workloads.train import StepRecord, TrainConfig, run_train  # noqa: E402

# Small enough for a 2-core machine: a few ms per step.
SMALL = {"size": "tiny", "batch_size": 2, "seq_len": 16, "threads": 1, "energy_source": "none"}
SMALL_FLAGS = ["--size", "tiny", "--batch-size", "2", "--seq-len", "16", "--threads", "1"]


def config(**overrides: object) -> TrainConfig:
    return TrainConfig(**{**SMALL, **overrides})  # type: ignore[arg-type]


def quiet() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def fake_nvml() -> Iterator[SimFleet]:
    fleet = SimFleet(2)
    install_fake_nvml(fleet)
    yield fleet
    uninstall_fake_nvml()


def test_resume_reproduces_the_uninterrupted_loss_trajectory_exactly(tmp_path: Path):
    full = run_train(config(steps=8), stream=quiet())
    assert len(full.losses) == 8 and not full.interrupted

    stop = threading.Event()

    def stop_after_3(rec: StepRecord) -> None:
        if rec.step == 3:
            stop.set()

    first = run_train(
        config(steps=8, checkpoint_dir=tmp_path), stop=stop, stream=quiet(), on_step=stop_after_3
    )
    assert first.interrupted and first.final_step == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000003.pt"]

    second = run_train(config(steps=8, checkpoint_dir=tmp_path), stream=quiet())
    assert second.start_step == 3 and second.final_step == 8
    assert first.losses + second.losses == full.losses  # bit for bit
    assert [r.lr for r in first.records + second.records] == [r.lr for r in full.records]
    assert second.report["resumed_from"].endswith("ckpt-000000003.pt")


def test_extending_a_finished_run_continues_the_same_trajectory(tmp_path: Path):
    full = run_train(config(steps=6), stream=quiet())
    a = run_train(config(steps=4, checkpoint_dir=tmp_path), stream=quiet())
    b = run_train(config(steps=6, checkpoint_dir=tmp_path), stream=quiet())
    assert a.losses + b.losses == full.losses
    nothing = run_train(config(steps=6, checkpoint_dir=tmp_path), stream=quiet())
    assert nothing.records == [] and nothing.start_step == 6


def test_periodic_checkpoints_keep_the_newest(tmp_path: Path):
    run_train(
        config(steps=7, checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=2),
        stream=quiet(),
    )
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 7]


def test_resume_with_other_flags_is_refused_naming_the_flag(tmp_path: Path):
    run_train(config(steps=2, checkpoint_dir=tmp_path), stream=quiet())
    with pytest.raises(ConfigError, match="--batch-size 2, not 4"):
        run_train(config(steps=4, checkpoint_dir=tmp_path, batch_size=4), stream=quiet())


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    good = ckpt.save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})

    def torn_save(obj: object, f: io.BufferedWriter) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 2, {"x": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
    latest = ckpt.load_latest(tmp_path)
    assert latest is not None and latest[1]["step"] == 1
    assert torch.equal(latest[1]["x"], torch.ones(3))


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path: Path):
    run_train(config(steps=1, checkpoint_dir=tmp_path), stream=quiet())
    (tmp_path / ".ckpt-abc123.tmp").write_bytes(b"partial")
    result = run_train(config(steps=2, checkpoint_dir=tmp_path), stream=quiet())
    assert result.start_step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt", "ckpt-000000002.pt"]


class SteppedMeter(EnergyMeter):
    """A meter on a simulated clock where each training step lasts a set time.

    The clock stands still while a step computes; the lap that ends a step first moves it on by
    that step's duration, so the GPU's true energy over each step is known exactly.
    """

    def __init__(self, clock: ManualClock, step_s: list[float], **kwargs: Any) -> None:
        super().__init__(clock=clock, **kwargs)
        self._sim_clock = clock
        self._step_s = iter(step_s)

    def lap(self, name: str) -> Measurement:
        self._sim_clock.advance(next(self._step_s))
        return super().lap(name)


def test_train_reports_energy_per_step_from_the_gpu_counter(tmp_path: Path):
    clock = ManualClock()
    fleet = SimFleet(2, clock=clock)
    fleet[1].set_load(0.8)
    step_s = [0.5, 1.0, 1.5, 2.0]  # unequal, so a step reported with another's energy shows
    report_path = tmp_path / "report.json"
    true_j = [fleet[1].true_energy_j()]  # the clock stands still until the first step ends

    def ground_truth(rec: StepRecord) -> None:
        true_j.append(fleet[1].true_energy_j())

    install_fake_nvml(fleet)
    try:
        # No CUDA here: a meter on simulated GPU 1 stands in for the one a CUDA run opens.
        with SteppedMeter(clock, step_s, gpus=[1], source="nvml", host=False) as meter:
            result = run_train(
                config(steps=4, report=report_path),
                stream=quiet(),
                meter=meter,
                on_step=ground_truth,
            )
    finally:
        uninstall_fake_nvml()
    report = json.loads(report_path.read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["energy_device"] == "gpu"
    assert report["energy_source"] == "nvml" and report["gpus"] == [1]
    steps = report["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    truth = [after - before for before, after in itertools.pairwise(true_j)]
    assert len(truth) == 4 and min(truth) > 0
    for s, seconds, joules in zip(steps, step_s, truth, strict=True):
        assert s["time_s"] == seconds
        # NVML counts whole millijoules of the simulator's exact integral
        assert abs(s["energy_j"] - joules) <= 1e-3, (s["step"], s["energy_j"], joules)
        assert s["tokens_per_j"] == pytest.approx(2 * 16 / s["energy_j"])
        assert s["tokens_per_s"] == pytest.approx(2 * 16 / seconds)
    summary = report["summary"]
    assert abs(summary["energy_j"] - sum(truth)) <= 1e-3
    assert summary["tokens"] == 4 * 2 * 16
    assert summary["j_per_step"] == pytest.approx(summary["energy_j"] / 4)


def test_plain_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    run_train(config(steps=3, log_interval_s=0.0), stream=out, tty=False)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("train: 3/3 loss") for line in lines)
    assert "\r" not in out.getvalue()


def test_progress_bar_on_a_terminal():
    out = io.StringIO()
    run_train(config(steps=3), stream=out, tty=True)
    text = out.getvalue()
    assert "\r" in text and "[" + "#" * 24 + "] 3/3" in text


def test_progress_is_posted_to_the_agent_with_the_token(monkeypatch: pytest.MonkeyPatch):
    fleet = SimFleet(2)
    fleet[0].set_load(0.5)
    with SimAgent(fleet, token="s3cret") as agent:
        agent.jobs.register("lm", os.getpid(), 0)
        monkeypatch.setenv("WATTWARDEN_AGENT_URL", agent.url)
        monkeypatch.setenv("WATTWARDEN_JOB_NAME", "lm")
        monkeypatch.setenv("WATTWARDEN_TOKEN", "s3cret")
        with EnergyMeter(gpus=[0], source="agent", agent_url=agent.url) as meter:
            result = run_train(config(steps=3), stream=quiet(), meter=meter)
        posts = agent.matching("POST", "/api/v1/jobs/lm/progress")
        job = agent.jobs.get("lm")
    assert posts, "no progress posted"
    assert (job.step, job.samples, job.tokens) == (3, 6, 96)
    assert all(p.status == 200 for p in posts)  # the token held
    assert result.report["energy_source"] == "agent"
    assert result.report["summary"]["energy_j"] > 0


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wattwarden", "workload", "train", *SMALL_FLAGS, *args]


def test_sigterm_mid_run_checkpoints_atomically_and_the_run_resumes(tmp_path: Path):
    ckdir = tmp_path / "ck"
    report = tmp_path / "r.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = _train_cmd(
        "--steps", "100000", "--checkpoint-dir", str(ckdir), "--checkpoint-every", "2",
        "--energy-source", "none", "--report", str(report),
    )  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ckpt.list_checkpoints(ckdir), timeout_s=60, what="a first checkpoint")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint written" in err
    assert not list(ckdir.glob("*.tmp"))  # no torn or stray files
    saved = ckpt.list_checkpoints(ckdir)
    for _, path in saved:
        ckpt.load_checkpoint(path)  # every file there is complete
    stopped_at = saved[-1][0]
    interrupted = json.loads(report.read_text())
    assert interrupted["interrupted"] and interrupted["final_step"] == stopped_at

    resumed = run_train(config(steps=stopped_at + 2, checkpoint_dir=ckdir), stream=quiet())
    assert resumed.start_step == stopped_at
    full = run_train(config(steps=stopped_at + 2), stream=quiet())
    first_losses = [s["loss"] for s in interrupted["steps"]]
    assert first_losses + resumed.losses == full.losses


def make_rapl(root: Path, package_uj: int = 10_000_000) -> Path:
    """A powercap tree with package-0 and its dram zone; returns package-0's energy file."""
    for zone, name, uj in (("0", "package-0", package_uj), ("0:0", "dram", 1_000_000)):
        path = root / f"intel-rapl:{zone}"
        path.mkdir(parents=True)
        (path / "name").write_text(name + "\n")
        (path / "energy_uj").write_text(f"{uj}\n")
        (path / "max_energy_range_uj").write_text(f"{2**40}\n")
    return root / "intel-rapl:0" / "energy_uj"


def test_cpu_run_reports_cpu_energy_from_rapl_and_no_gpu_energy(
    fake_nvml: SimFleet, tmp_path: Path
):
    fake_nvml[0].set_load(0.9)  # a busy GPU that the CPU run must not report
    package = make_rapl(tmp_path / "powercap")
    uj = [10_000_000]

    def burn_1_joule(rec: StepRecord) -> None:  # the package counter moves 1 J per step
        uj[0] += 1_000_000
        package.write_text(f"{uj[0]}\n")

    out = io.StringIO()
    result = run_train(
        config(steps=4, energy_source="auto", rapl_root=tmp_path / "powercap"),
        stream=out,
        on_step=burn_1_joule,
    )
    report = result.report
    assert report["energy_device"] == "cpu" and report["energy_source"] == "rapl"
    assert report["gpus"] == []
    # each step's window ends before its own callback: 0 J, then 1 J per step
    assert [s["energy_j"] for s in report["steps"]] == pytest.approx([0.0, 1.0, 1.0, 1.0])
    assert report["summary"]["energy_j"] == pytest.approx(3.0)
    assert report["summary"]["tokens_per_j"] == pytest.approx(4 * 2 * 16 / 3.0)
    last = out.getvalue().strip().splitlines()[-1]
    assert "3.0 J CPU (RAPL) energy" in last and "GPU" not in last


def test_cpu_run_without_rapl_says_energy_not_measured(fake_nvml: SimFleet, tmp_path: Path):
    fake_nvml[0].set_load(0.9)
    out = io.StringIO()
    result = run_train(
        config(steps=2, energy_source="auto", rapl_root=tmp_path / "no-powercap"), stream=out
    )
    report = result.report
    assert report["energy_device"] == "cpu" and report["energy_source"] == "none"
    assert report["gpus"] == []
    assert report["summary"]["energy_j"] is None and report["summary"]["tokens_per_j"] is None
    assert all(s["energy_j"] is None for s in report["steps"])
    last = out.getvalue().strip().splitlines()[-1]
    assert "energy: not measured (no RAPL)" in last and "GPU" not in last


@pytest.mark.parametrize("source", ["nvml", "agent"])
def test_a_gpu_energy_source_for_a_cpu_run_is_refused(source: str):
    with pytest.raises(ConfigError, match=f"--energy-source {source} .*--device cpu"):
        config(steps=1, energy_source=source).validate()
