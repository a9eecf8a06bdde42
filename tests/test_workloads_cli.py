"""`wattwarden workload` and `wattwarden job` on the command line: flags, errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_torch

from wattwarden.cli import main


def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wattwarden", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_help_does_not_import_torch():
    code = (
        "import sys; from wattwarden.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("workload", ["train", "infer"])
def test_without_torch_a_workload_says_which_extra_to_install(workload: str):
    # torch hidden as if not installed: None in sys.modules makes find_spec and import fail
    code = (
        "import sys; sys.modules['torch'] = None; from wattwarden.cli import main; "
        f"sys.exit(main(['workload', '{workload}', '--steps', '1']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"wattwarden workload {workload}: needs PyTorch, which is not installed: "
        "pip install 'wattwarden[workloads]' (the README says how to get the CPU build)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # the workload's own checks run once torch is there
        pytest.param(
            ["workload", "train", "--steps", "0"], "--steps must be at least 1", marks=needs_torch
        ),
        (["workload", "train", "--steps", "x"], "expected an integer, got 'x'"),
        (["workload", "train", "--size", "huge"], "invalid choice: 'huge'"),
        pytest.param(
            ["workload", "train", "--seq-len", "5000"],
            "--seq-len must be at most 256",
            marks=needs_torch,
        ),
        (["workload", "train", "--agent", "ftp://x"], "--agent: expected a URL"),
        pytest.param(
            ["workload", "train", "--energy-source", "nvml"],
            "--energy-source nvml reads GPU energy, but --device cpu runs on the CPU",
            marks=needs_torch,
        ),
        pytest.param(
            ["workload", "infer", "--new-tokens", "0"],
            "--new-tokens must be at least 1",
            marks=needs_torch,
        ),
        pytest.param(
            ["workload", "infer", "--batch-size", "-1"],
            "--batch-size must be at least 1",
            marks=needs_torch,
        ),
        (["job", "run", "--name", "a"], "no command to run"),
        (["job", "run", "--name", "a b", "--", "true"], "--name must be"),
        (["job", "run", "--name", "a", "--gpu", "-2", "--", "true"], "--gpu must be"),
        (["job", "run", "--", "true"], "the following arguments are required: --name"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exc:
        code = main(args)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_cuda_without_a_gpu_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["workload", "train", "--device", "cuda", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "use --device cpu" in err
    assert len(err.strip().splitlines()) == 1


def test_train_and_infer_run_from_the_command_line(tmp_path: Path):
    pytest.importorskip("torch")
    report = tmp_path / "train.json"
    # CPU runs: CPU energy from RAPL, here a tree without it; never a GPU's, even with an agent
    # (and its simulated GPUs) on the default port
    small = ["--size", "tiny", "--batch-size", "2", "--threads", "1"]
    small += ["--rapl-root", str(tmp_path / "no-powercap")]
    out = run_cli(
        "workload", "train", "--steps", "3", "--seq-len", "16", "--report", str(report),
        "--checkpoint-dir", str(tmp_path / "ck"), *small,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "train: 3/3" in out.stderr and "final loss" in out.stderr
    assert "energy: not measured (no RAPL)" in out.stderr and "GPU" not in out.stderr
    train = json.loads(report.read_text())
    assert train["summary"]["steps"] == 3
    assert (train["energy_device"], train["energy_source"], train["gpus"]) == ("cpu", "none", [])

    infer_report = tmp_path / "infer.json"
    out = run_cli(
        "workload", "infer", "--steps", "3", "--prompt-len", "8", "--new-tokens", "2",
        "--checkpoint-dir", str(tmp_path / "ck"), "--report", str(infer_report), *small,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "p99" in out.stderr
    assert "energy: not measured (no RAPL)" in out.stderr and "GPU" not in out.stderr
    assert json.loads(infer_report.read_text())["summary"]["requests"] == 3
