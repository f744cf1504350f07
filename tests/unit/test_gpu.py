"""charlm.gpu.GPUMonitor: a silent no-op without NVML; with a fake pynvml, correct averages and a clean stop."""
import sys
import time
import types

import pytest

from charlm.gpu import READINGS, GPUMonitor, nvml_index
from charlm.memory import GB


class FakeNVML(types.ModuleType):
    """pynvml's calls used by GPUMonitor; reading n (counting from 1) returns n times a per-metric unit."""
    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        super().__init__("pynvml")
        self.reads = 0
        self.handle_index = None
        self.shut_down = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handle_index = index
        return "handle"

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.reads += 1  # memory is read first in each sample
        return types.SimpleNamespace(used=self.reads * GB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=10 * self.reads)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 100_000 * self.reads  # mW

    def nvmlDeviceGetTemperature(self, handle, sensor):
        raise RuntimeError("not supported on this board")


@pytest.fixture
def fake_nvml(monkeypatch) -> FakeNVML:
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def wait_for(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_without_nvml_is_a_silent_noop(device):
    """This machine has no NVIDIA driver: NVML's init fails, and the monitor must shrug."""
    with GPUMonitor(device, interval_s=0.01) as monitor:
        assert monitor.snapshot() == {}
    monitor.stop()


def test_missing_pynvml_is_a_noop(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with GPUMonitor("cuda:0") as monitor:
        assert monitor.snapshot() == {}


def test_snapshot_averages_samples_since_the_last_one(fake_nvml):
    monitor = GPUMonitor("cuda:0", interval_s=0.001).start()
    wait_for(lambda: fake_nvml.reads >= 3)
    monitor.stop()
    assert monitor._thread is None and fake_nvml.shut_down
    n = fake_nvml.reads
    mean_read = (n + 1) / 2  # the mean of 1..n
    snapshot = monitor.snapshot()
    assert snapshot == pytest.approx({"gpu_mem_gb": mean_read, "gpu_util_pct": 10 * mean_read,
                                      "gpu_power_w": 100 * mean_read})
    assert list(snapshot) == [key for key in READINGS if key != "gpu_temp_c"]  # unsupported: left out
    # Nothing sampled since: the latest sample. And a stopped thread samples no more.
    assert monitor.snapshot() == pytest.approx({"gpu_mem_gb": n, "gpu_util_pct": 10 * n, "gpu_power_w": 100 * n})
    time.sleep(0.02)
    assert fake_nvml.reads == n


def test_cuda_visible_devices_maps_torch_index_to_nvml(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert nvml_index(1) == 3
    with GPUMonitor("cuda:1", interval_s=10):
        assert fake_nvml.handle_index == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2e0a4c")
    assert nvml_index(0) == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml_index(1) == 1
