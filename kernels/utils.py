"""Helpers shared by the kernel files: where Triton can run, and input checks."""
import os

import torch


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of this device (CUDA, or CPU via the interpreter)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and is_interpreter()


def check_last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    """Kernels take any strides on the outer dims (views into a fused QKV projection), but not the last."""
    if x.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {tuple(x.stride())}")
