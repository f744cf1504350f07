"""Training throughput: nanoGPT's configuration against charlm's fastest, per variant, in one run.

    python bench/train.py                              # CUDA: BASE, ROPE, TIPA, DEEP, DEEP at width 768
    python bench/train.py --max-memory-gb 40           # the same under an A100-40GB memory cap
    python bench/train.py --preset tiny --steps 5      # CPU smoke test (labelled with the CPU's name)
    python bench/train.py --data data/enwik8           # a prepared dataset instead of a synthetic one

Both configurations run the same model, global batch (64 sequences) and memory plan, and both compile it
block by block as charlm.train does (nanoGPT compiles the whole model as one graph), so
the ratio measures the kernels and the loader:
  baseline  nanoGPT: PyTorch RoPE, SDPA attention, torch.compile, fused AdamW, np.memmap batches
  charlm    Triton flash attention with RoPE fused in, torch.compile (--compile-mode), fused AdamW, the C++
            loader
Step time is the median over timed optimizer steps after warm-up and compilation; tokens/s = tokens per
step / step time. MFU = flops_per_token * tokens/s / peak bf16 dense FLOP/s of the device, with flops_per_token =
6 * (N - V * n_embd) + 6 * n_layer * block_size * n_embd (N = parameters without position embeddings, less
the token embedding, a lookup; the second term is causal attention's score and value matmuls, forward and
backward). Peak memory is
torch.cuda.max_memory_allocated over the timed steps.
"""
import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():  # as in tests/conftest.py: triton.jit reads this when kernels import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from charlm.config import COMPILE_MODES, resolve  # noqa: E402
from charlm.data import prepare  # noqa: E402
from charlm.loader import NumpyBatchLoader  # noqa: E402
from charlm.model import flops_per_token  # noqa: E402
from charlm.trainer import Trainer  # noqa: E402
from common import append_history, peak_memory_gb, print_table, record  # noqa: E402

# (name, variant, overrides) of the measured models.
CASES = [
    ("base", "base", {}),
    ("rope", "rope", {}),
    ("tipa", "tipa", {}),
    ("deep", "deep", {}),
    ("deep-w768", "deep", {"n_embd": 768, "n_head": 12}),
]
CONFIGS = {
    "baseline": {"attn": "sdpa", "rope_impl": "torch"},
    "charlm": {"attn": "triton", "rope_impl": "fused"},
}
# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TABLE_COLUMNS = ["case", "impl", "ms", "tokens_per_s", "mfu", "peak_mem_gb", "micro_batch", "speedup"]


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def synthetic_dataset(root: Path) -> Path:
    """About 4 MB of bytes with word-like structure, prepared as a dataset folder."""
    rng = np.random.default_rng(0)
    letters = rng.integers(97, 123, size=4_000_000, dtype=np.uint8)
    letters[rng.random(letters.size) < 0.18] = 32  # spaces: words for TIPA's targets
    prepare(letters.tobytes(), root / "synthetic", "bytes", {"name": "synthetic"})
    return root / "synthetic"


def make_trainer(data_dir: Path, out_dir: Path, variant: str, overrides: dict, impl: str,
                 args: argparse.Namespace) -> Trainer:
    impl_fields = CONFIGS[impl] | ({"compile_mode": args.compile_mode} if impl == "charlm" else {})
    cfg = resolve(variant, args.preset, dataset=data_dir.name, data_root=str(data_dir.parent), out_dir=str(out_dir),
                  max_iters=10**9, compile=torch.cuda.is_available(), max_memory_gb=args.max_memory_gb,
                  batch_size=args.batch_size, **overrides, **impl_fields)
    trainer = Trainer(cfg, quiet=True)
    if impl == "baseline":  # nanoGPT's data path: np.memmap and fancy indexing on the main thread
        loader = trainer.train_loader
        trainer.train_loader = NumpyBatchLoader(data_dir, "train", cfg.batch_size, cfg.model.block_size, seed=cfg.seed,
                                                tipa=cfg.model.tipa, tipa_max=cfg.model.tipa_max, pin_memory=loader.pin_memory)
    return trainer


def time_steps(trainer: Trainer, warmup: int, steps: int) -> float:
    """Median milliseconds of `steps` optimizer steps after `warmup` untimed ones (compilation, autotuning).

    On a GPU each step is bracketed by CUDA events with no host sync in between, so the pipeline stays full.
    """
    for step in range(warmup):
        trainer.train_step(step)
    timed = range(warmup, warmup + steps)
    if trainer.device.type != "cuda":
        times = []
        for step in timed:
            t0 = time.perf_counter()
            trainer.train_step(step)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(trainer.device)
    torch.cuda.reset_peak_memory_stats(trainer.device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i, step in enumerate(timed):
        trainer.train_step(step)
        events[i + 1].record()
    torch.cuda.synchronize(trainer.device)
    return statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:]))


def bench_case(data_dir, tmp, name, variant, overrides, args) -> list[dict]:
    rows, ms = [], {}
    for impl in CONFIGS:
        trainer = make_trainer(data_dir, Path(tmp) / f"{name}-{impl}", variant, overrides, impl, args)
        ms[impl] = time_steps(trainer, args.warmup, args.steps)
        cfg, device = trainer.cfg, trainer.device
        tokens_per_s = cfg.batch_size * cfg.model.block_size / (ms[impl] / 1e3)
        peak = peak_flops(device)
        case = {"name": name, "variant": variant, "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
                "block_size": cfg.model.block_size, "batch_size": cfg.batch_size, "max_memory_gb": args.max_memory_gb}
        rows.append(record("train", impl, case, ms[impl], baseline=impl == "baseline", tokens_per_s=tokens_per_s,
                           peak_mem_gb=peak_memory_gb(device), device=device,
                           mfu=flops_per_token(trainer.cfg.model) * tokens_per_s / peak if peak else None,
                           micro_batch=trainer.plan.micro_batch_size, checkpoint_layers=trainer.plan.checkpoint_layers,
                           compile_mode=cfg.compile_mode if cfg.compile else None,
                           speedup=ms["baseline"] / ms[impl]))
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="", help="a size preset (tiny for a CPU smoke test)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma-separated case names")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch in sequences")
    parser.add_argument("--max-memory-gb", type=float, default=0.0, help="cap GPU memory (emulate a smaller card)")
    parser.add_argument("--data", type=Path, help="a prepared dataset folder (default: a synthetic one)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="charlm's torch.compile mode (the baseline keeps nanoGPT's default)")
    parser.add_argument("--no-history", action="store_true", help="print only; do not append to the history")
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.preset != "tiny":
        print("bench/train.py: no CUDA GPU; use --preset tiny for a CPU smoke test")
        return
    wanted = args.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or synthetic_dataset(Path(tmp) / "data")
        rows = [row for name, variant, overrides in CASES if name in wanted
                for row in bench_case(data_dir, tmp, name, variant, overrides, args)]
    print_table([{**r, "case": r["case"]["name"]} for r in rows], TABLE_COLUMNS)
    print("MFU = (6 (N - V n_embd) + 6 n_layer block_size n_embd) * tokens/s / peak bf16 FLOP/s; "
          "N excludes position embeddings")
    if not args.no_history:
        append_history(rows)


if __name__ == "__main__":
    main()
