"""GPU telemetry through NVML: memory, utilisation, power and temperature of the run's device.

    with GPUMonitor(device) as monitor:
        ...
        row.update(monitor.snapshot())  # gpu_mem_gb, gpu_util_pct, gpu_power_w, gpu_temp_c

A daemon thread samples every interval_s seconds; snapshot() averages the samples taken since the previous
snapshot. Without a CUDA device, without pynvml, or when NVML fails to start, the monitor does nothing and
snapshot() is {}: telemetry must never stop a training run. Readings are the whole device's (gpu_mem_gb
counts every process on the GPU, unlike torch.cuda's statistics).
"""
import os
import statistics
import threading

import torch

from charlm.memory import GB

# metrics-row key -> how to read it from NVML (pynvml module, device handle)
READINGS = {
    "gpu_mem_gb": lambda nvml, handle: nvml.nvmlDeviceGetMemoryInfo(handle).used / GB,
    "gpu_util_pct": lambda nvml, handle: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
    "gpu_power_w": lambda nvml, handle: nvml.nvmlDeviceGetPowerUsage(handle) / 1000,  # NVML reports mW
    "gpu_temp_c": lambda nvml, handle: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
}


# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, for MFU; None off CUDA or for a GPU not in the table."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def nvml_index(torch_index: int) -> int:
    """NVML's index of torch's cuda:torch_index. NVML ignores CUDA_VISIBLE_DEVICES, so where it is a list
    of integers, torch's device i is NVML's device number list[i]. (Both then count in PCI bus order, as
    they do on nodes of identical GPUs, the case this serves; other forms of the variable are left alone.)"""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and torch_index < len(visible):
        return int(visible[torch_index])
    return torch_index


class GPUMonitor:
    def __init__(self, device: torch.device | str, interval_s: float = 1.0):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self._nvml = self._handle = self._thread = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[dict] = []  # taken since the last snapshot
        self._latest: dict = {}  # the newest sample

    def start(self) -> "GPUMonitor":
        """Open NVML and start sampling; a no-op when that is not possible."""
        if self.device.type != "cuda" or self._thread is not None:
            return self
        try:
            import pynvml
            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(index))
        except Exception:  # no pynvml, no driver, no such device: run without telemetry
            return self
        self._nvml = pynvml
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="charlm-gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    def __enter__(self) -> "GPUMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval_s):
                return

    def _sample(self) -> None:
        sample = {}
        for key, read in READINGS.items():
            try:
                sample[key] = float(read(self._nvml, self._handle))
            except Exception:  # e.g. power readings unsupported on this board: leave the key out
                pass
        with self._lock:
            self._samples.append(sample)
            self._latest = sample

    def snapshot(self) -> dict:
        """The mean of each reading since the last snapshot, or the latest sample if none was taken since."""
        with self._lock:
            samples, self._samples = self._samples, []
            latest = self._latest
        if not samples:
            return dict(latest)
        return {key: statistics.fmean(s[key] for s in samples if key in s)
                for key in READINGS if any(key in s for s in samples)}
