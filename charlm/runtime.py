"""The process a command runs in: its rank among data-parallel processes, its device, its precision.

    ctx = init_distributed(device_preference)    # DistContext: rank, local_rank, world_size
    device = resolve_device(device_preference, ctx)
    with autocast(dtype_choice, device): ...
    ctx.print(...)                                # rank 0 only
    mean = all_reduce_mean(tensor, ctx)
"""
import contextlib
import dataclasses
import gc
import math
import os

import torch
import torch.distributed as dist

LN2 = math.log(2)


def bits_per_char(nats: float) -> float:
    """A mean cross-entropy in nats per token, in bits per token (per character or byte)."""
    return nats / LN2


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place among the data-parallel processes of a torchrun launch (one process: rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        """Rank 0 writes the files and prints; the others compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def print(self, *args, **kwargs) -> None:
        if self.is_master:
            print(*args, **kwargs)


SINGLE_PROCESS = DistContext()


def init_distributed(device_preference: str) -> DistContext:
    """Data-parallel when launched by torchrun (RANK in the environment): NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return SINGLE_PROCESS
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    use_cuda = torch.cuda.is_available() and device_preference != "cpu"
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ctx


@contextlib.contextmanager
def distributed(device_preference: str):
    """init_distributed, and the process group torn down however the block ends."""
    ctx = init_distributed(device_preference)
    try:
        yield ctx
        if ctx.distributed:
            dist.barrier()  # leave together: a rank that tears down while rank 0 still writes can abort (gloo)
    finally:
        if ctx.distributed:
            destroy_process_group()


def destroy_process_group() -> None:
    """Tear the process group down with nothing left holding it. A process's first DDP model sits in a
    reference cycle (through the frames of a lazy import in its constructor) that keeps its reducer, and
    through it the group, alive past destroy_process_group: a gloo group then freed only at interpreter
    exit can abort the process ("terminate called without an active exception")."""
    gc.collect()
    dist.destroy_process_group()


def resolve_device(preference: str, ctx: DistContext = SINGLE_PROCESS) -> torch.device:
    """`auto`: this rank's GPU when there is one, else the CPU; `cpu`, `cuda` or `cuda:N` as given."""
    if preference == "auto":
        return torch.device(f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as e:
        raise ValueError(f"--device {preference!r}: expected auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {preference!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {preference}: no CUDA device is available")
    return device


def autocast(dtype: str, device: torch.device):
    """bf16 autocast for dtype `bfloat16`, or `auto` on CUDA; plain fp32 otherwise."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of `value` over the ranks (a copy; the input is left alone)."""
    if not ctx.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> float:
    """The mean of a scalar over the ranks, on the host (gloo has no AVG, so a sum divided)."""
    return all_reduce_sum(value, ctx).item() / ctx.world_size
