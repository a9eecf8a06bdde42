import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from collections.abc import Iterator

import pytest

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
