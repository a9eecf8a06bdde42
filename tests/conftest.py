import importlib.util
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from collections.abc import Iterator

import pytest
from helpers import require_binary

from wattwarden.hardware.sim import ManualClock, SimFleet
from wattwarden.hardware.sim.fake_nvml import FakeNvmlLib, install_fake_nvml, uninstall_fake_nvml

#: For a test (or one parametrized case) that runs PyTorch: skipped, not failed, without it. A
#: module that imports torch at the top uses ``pytest.importorskip("torch")`` there instead.
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="needs PyTorch (pip install torch)"
)


class FakeNvml:
    """A simulated fleet on a manual clock, installed below pynvml for one test."""

    def __init__(self, fleet: SimFleet, clock: ManualClock, lib: FakeNvmlLib) -> None:
        self.fleet = fleet
        self.clock = clock
        self.lib = lib


@pytest.fixture
def fake_nvml() -> Iterator[FakeNvml]:
    clock = ManualClock()
    fleet = SimFleet(8, clock=clock)
    lib = install_fake_nvml(fleet)
    try:
        yield FakeNvml(fleet, clock, lib)
    finally:
        uninstall_fake_nvml()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    openssl = require_binary("openssl")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=wattwarden test CA")  # fmt: skip
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    return d
