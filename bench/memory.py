"""The memory planner's prediction beside what DEEP's training steps measure, one case per process.

    python bench/memory.py                      # CUDA: DEEP at widths 512 and 768, eager and compiled, 40 GB card
    python bench/memory.py --max-memory-gb 0    # planned for the whole card
    python bench/memory.py --dry-run            # CPU: a tiny DEEP, eager (predictions only: nothing to measure)

Each case is charlm's configuration (Triton attention, global batch 64), planned for a card of
--max-memory-gb (charlm.memory.plan_memory, through the Trainer, which also caps the process to emulate
that card), then WARMUP optimizer steps, the peak statistics reset, and STEPS more. Recorded beside each
other, in GB (2**30 bytes):
  predicted_*  the plan's breakdown: tensors (model state, weight casts, activations, loss chunk),
               fragmentation (the allocator's slack), context (outside the allocator), peak (their sum)
  allocated    torch.cuda.max_memory_allocated: the tensors' peak
  reserved     torch.cuda.max_memory_reserved: the allocator's segments at their peak
  outside      device memory in use (cudaMemGetInfo) less what the allocator holds, after the steps: the
               CUDA context, library workspaces, loaded kernels
  total        reserved + outside: what the card must hold; fits is total <= --max-memory-gb
The planner models eager mode (charlm.memory's docstring): allocated / predicted_tensors says how well,
and for compiled runs how much torch.compile saves. Each case runs in a fresh process, so that outside is
that case's alone; a case that runs out of memory is recorded as such.
"""
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels' PyTorch references, as bench/train.py; read at their import
    os.environ["TRITON_INTERPRET"] = "0"

from charlm.memory import GB  # noqa: E402
from common import DEEP_HEAD_DIM, DEEP_WIDTHS, History, Timing, bench_parser, card_gb, print_table, record  # noqa: E402
from train import make_trainer, model_case, synthetic_dataset  # noqa: E402

WARMUP, STEPS = 2, 3  # optimizer steps: before the peak statistics are reset, and after (a dry run: 1, 1)
TABLE_COLUMNS = ["case", "micro_batch", "checkpoint_layers", "predicted_tensors_gb", "allocated_gb",
                 "predicted_peak_gb", "reserved_gb", "outside_gb", "total_gb", "fits"]


def cases(dry_run: bool) -> list[str]:
    """Case names, '<width>-<eager|compiled>'. The CPU's dry run leaves out torch.compile (minutes of C++)."""
    modes = ("eager",) if dry_run else ("eager", "compiled")
    return [f"{width}-{mode}" for width in DEEP_WIDTHS for mode in modes]


def predicted(plan) -> dict:
    """The plan's figures in GB: tensors, fragmentation, context and peak."""
    terms = plan.breakdown
    return {"predicted_tensors_gb": plan.tensor_bytes / GB, "predicted_fragmentation_gb": terms["fragmentation"] / GB,
            "predicted_context_gb": terms["cuda_context"] / GB, "predicted_peak_gb": plan.predicted_peak_bytes / GB}


def measured(device: torch.device, max_memory_gb: float) -> dict:
    """Allocated and reserved peaks, memory outside the allocator, their total, and whether it fits."""
    if device.type != "cuda":
        return {"allocated_gb": None, "reserved_gb": None, "outside_gb": None, "total_gb": None, "fits": None}
    free, capacity = torch.cuda.mem_get_info(device)
    outside = (capacity - free - torch.cuda.memory_reserved(device)) / GB
    reserved = torch.cuda.max_memory_reserved(device) / GB
    return {"allocated_gb": torch.cuda.max_memory_allocated(device) / GB, "reserved_gb": reserved,
            "outside_gb": outside, "total_gb": reserved + outside,
            "fits": reserved + outside <= (max_memory_gb or capacity / GB)}


def run_steps(trainer, device: torch.device, warmup: int, steps: int) -> Timing:
    """warmup steps, then timed ones with the peak statistics reset between."""
    for step in range(warmup):
        trainer.train_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup, warmup + steps):
        start = time.perf_counter()
        trainer.train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return Timing.of(times)


def measure_case(name: str, args, history: History) -> None:
    """Plan, run and record one case (this process's only one)."""
    width, mode = name.split("-")
    overrides = {"n_embd": int(width), "n_head": int(width) // DEEP_HEAD_DIM}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(synthetic_dataset(Path(tmp)), Path(tmp) / "run", "deep", overrides, "charlm",
                               preset="tiny" if args.dry_run else "", batch_size=2 if args.dry_run else 64,
                               max_memory_gb=args.max_memory_gb, compile=mode == "compiled")
        device, plan = trainer.device, trainer.plan
        case = {"name": name, "variant": "deep", **model_case(trainer), "max_memory_gb": args.max_memory_gb}
        try:
            timing, error = run_steps(trainer, device, *((1, 1) if args.dry_run else (WARMUP, STEPS))), None
        except torch.cuda.OutOfMemoryError as e:
            timing, error = None, str(e).splitlines()[0]
        figures = {**predicted(plan), **measured(device, args.max_memory_gb)}
        if error:
            figures.update(fits=False, oom=error)
        history.add(record("memory", "charlm", case, timing, peak_mem_gb=figures["allocated_gb"], device=device,
                           **figures))
        del trainer
        gc.collect()


def run_each_in_its_process(names: list[str], argv: list[str]) -> list[str]:
    """This script once per case (--case NAME): the names of the cases whose process failed."""
    failed = []
    for name in names:
        done = subprocess.run([sys.executable, __file__, *argv, "--case", name])
        if done.returncode:
            print(f"bench/memory.py: case {name} failed (exit status {done.returncode})")
            failed.append(name)
    return failed


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--max-memory-gb", type=card_gb, default=40.0,
                        help="plan for and emulate a card of this many GB; 0: the whole card (default: 40)")
    parser.add_argument("--case", choices=cases(False), help="measure this case alone, in this process")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("bench/memory.py: no CUDA GPU; --dry-run plans a tiny DEEP on the CPU (a smoke test)")
        return
    history = History(args)
    if not args.case:
        sys.exit(1 if run_each_in_its_process(cases(args.dry_run), sys.argv[1:]) else 0)
    measure_case(args.case, args, history)
    print_table([{**r["case"], **r, "case": r["case"]["name"]} for r in history.rows], TABLE_COLUMNS)


if __name__ == "__main__":
    main()
