"""Training throughput: nanoGPT's configuration against charlm's fastest, per variant, in one run.

    python bench/train.py                              # CUDA: BASE, ROPE, TIPA, DEEP, DEEP at width 768
    python bench/train.py --cases deep                 # DEEP alone (bench/run_all.sh)
    python bench/train.py --max-memory-gb 40           # the same under an A100-40GB memory cap
    python bench/train.py --dry-run                    # CPU smoke test: tiny model, 2 steps, seconds
    python bench/train.py --data data/enwik8           # a prepared dataset instead of a synthetic one

Both configurations run the same model, global batch (64 sequences) and memory plan, and both compile it
block by block as charlm.train does (nanoGPT compiles the whole model as one graph), so
the ratio measures the kernels and the loader:
  baseline  nanoGPT: PyTorch RoPE, SDPA attention, torch.compile, fused AdamW, np.memmap batches
  charlm    Triton flash attention with RoPE fused in, torch.compile (--compile-mode), fused AdamW, the C++
            loader
Step time: CUDA events around each timed optimizer step after warm-up and compilation; ms is the median,
ms_min and ms_p80 the spread; tokens/s = tokens per step / median step time. MFU = flops_per_token *
tokens/s / peak bf16 dense FLOP/s of the device, with flops_per_token = 6 * (N - V * n_embd) + 6 * n_layer *
block_size * n_embd (N = parameters without position embeddings, less the token embedding, a lookup; the
second term is causal attention's score and value matmuls, forward and backward). Peak memory is
torch.cuda.max_memory_allocated over the timed steps (peak_reserved_gb: the caching allocator's).

On the CPU (--dry-run) the kernels run their PyTorch references, not Triton's interpreter (which would
take many minutes): the smoke test checks this script, tests/kernels checks the kernels. Each row is
appended to the history as soon as its configuration is measured.
"""
import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():  # the kernels' PyTorch references (see the docstring); read at their import
    os.environ["TRITON_INTERPRET"] = "0"

from charlm.config import COMPILE_MODES, resolve  # noqa: E402
from charlm.data import prepare  # noqa: E402
from charlm.gpu import peak_bf16_flops  # noqa: E402
from charlm.loader import NumpyBatchLoader  # noqa: E402
from charlm.model import flops_per_token  # noqa: E402
from charlm.trainer import Trainer  # noqa: E402
from common import History, Timing, bench_parser, card_gb, print_table, record  # noqa: E402

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
TABLE_COLUMNS = ["case", "impl", "ms", "ms_min", "ms_p80", "tokens_per_s", "mfu", "peak_mem_gb", "micro_batch",
                 "speedup"]
DRY_RUN = {"preset": "tiny", "steps": 2, "warmup": 1, "batch_size": 4}


def synthetic_dataset(root: Path) -> Path:
    """About 4 MB of bytes with word-like structure, prepared as a dataset folder."""
    rng = np.random.default_rng(0)
    letters = rng.integers(97, 123, size=4_000_000, dtype=np.uint8)
    letters[rng.random(letters.size) < 0.18] = 32  # spaces: words for TIPA's targets
    prepare(letters.tobytes(), root / "synthetic", "bytes", {"name": "synthetic"})
    return root / "synthetic"


# --- what this script reads of charlm's Trainer and Config: kept here, in one place --------------------------

def make_trainer(data_dir: Path, out_dir: Path, variant: str, overrides: dict, impl: str, *, preset: str = "",
                 batch_size: int = 64, max_memory_gb: float = 0.0, compile: bool | None = None,
                 compile_mode: str = "default") -> Trainer:
    """A Trainer of `variant` in configuration `impl` (CONFIGS) on a prepared dataset; compile defaults to on
    with CUDA."""
    impl_fields = CONFIGS[impl] | ({"compile_mode": compile_mode} if impl == "charlm" else {})
    compile = torch.cuda.is_available() if compile is None else compile
    cfg = resolve(variant, preset, dataset=data_dir.name, data_root=str(data_dir.parent), out_dir=str(out_dir),
                  max_iters=10**9, compile=compile, max_memory_gb=max_memory_gb, batch_size=batch_size,
                  **overrides, **impl_fields)
    trainer = Trainer(cfg, quiet=True)
    if impl == "baseline":  # nanoGPT's data path: np.memmap and fancy indexing on the main thread
        loader = trainer.train_loader
        trainer.train_loader = NumpyBatchLoader(data_dir, "train", cfg.batch_size, cfg.model.block_size, seed=cfg.seed,
                                                tipa=cfg.model.tipa, tipa_max=cfg.model.tipa_max,
                                                pin_memory=loader.pin_memory)
    return trainer


def model_case(trainer: Trainer) -> dict:
    """The model's shape, batch and memory plan, as recorded with each row."""
    cfg, plan = trainer.cfg, trainer.plan
    return {"n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size,
            "batch_size": cfg.batch_size, "micro_batch": plan.micro_batch_size,
            "checkpoint_layers": plan.checkpoint_layers, "compile": bool(cfg.compile),
            "compile_mode": cfg.compile_mode if cfg.compile else None}


def tokens_per_step(trainer: Trainer) -> int:
    return trainer.cfg.batch_size * trainer.cfg.model.block_size


# ----------------------------------------------------------------------------------------------------------

def time_steps(trainer: Trainer, warmup: int, steps: int) -> Timing:
    """Times of `steps` optimizer steps after `warmup` untimed ones (compilation, autotuning).

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
        return Timing.of(times)
    torch.cuda.synchronize(trainer.device)
    torch.cuda.reset_peak_memory_stats(trainer.device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i, step in enumerate(timed):
        trainer.train_step(step)
        events[i + 1].record()
    torch.cuda.synchronize(trainer.device)
    return Timing.of([a.elapsed_time(b) for a, b in zip(events, events[1:])])


def peak_gb(device: torch.device) -> tuple[float | None, float | None]:
    """(allocated, reserved) peaks in GB since the last reset; None off CUDA."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def bench_case(data_dir, tmp, name, variant, overrides, args, history: History) -> None:
    ms = {}
    for impl in CONFIGS:
        trainer = make_trainer(data_dir, Path(tmp) / f"{name}-{impl}", variant, overrides, impl, preset=args.preset,
                               batch_size=args.batch_size, max_memory_gb=args.max_memory_gb,
                               compile_mode=args.compile_mode)
        timing = time_steps(trainer, args.warmup, args.steps)
        ms[impl] = timing.median
        device = trainer.device
        tokens_per_s = tokens_per_step(trainer) / (timing.median / 1e3)
        peak, reserved = peak_gb(device)
        flops = peak_bf16_flops(device)
        case = {"name": name, "variant": variant, **model_case(trainer), "max_memory_gb": args.max_memory_gb}
        history.add(record("train", impl, case, timing, baseline=impl == "baseline", tokens_per_s=tokens_per_s,
                           peak_mem_gb=peak, peak_reserved_gb=reserved, device=device,
                           mfu=flops_per_token(trainer.cfg.model) * tokens_per_s / flops if flops else None,
                           micro_batch=case["micro_batch"], speedup=ms["baseline"] / ms[impl]))
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", default="", help="a size preset (tiny: the CPU smoke test's)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma-separated case names")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch in sequences")
    parser.add_argument("--max-memory-gb", type=card_gb, default=0.0,
                        help="emulate a card of this many GB (what is outside the allocator counts against it)")
    parser.add_argument("--data", type=Path, help="a prepared dataset folder (default: a synthetic one)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="charlm's torch.compile mode (the baseline keeps nanoGPT's default)")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - {c[0] for c in CASES}
    if unknown:
        parser.error(f"--cases: unknown {', '.join(sorted(unknown))}; choose from {', '.join(c[0] for c in CASES)}")
    if args.dry_run:
        vars(args).update(DRY_RUN)
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("bench/train.py: no CUDA GPU; --dry-run runs a tiny model on the CPU (a smoke test)")
        return
    if not torch.cuda.is_available():
        print("bench/train.py: on the CPU the kernels run their PyTorch references")
    wanted = args.cases.split(",")
    history = History(args)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or synthetic_dataset(Path(tmp) / "data")
        for name, variant, overrides in CASES:
            if name in wanted:
                bench_case(data_dir, tmp, name, variant, overrides, args, history)
    print_table([{**r, "case": r["case"]["name"]} for r in history.rows], TABLE_COLUMNS)
    print("MFU = (6 (N - V n_embd) + 6 n_layer block_size n_embd) * tokens/s / peak bf16 FLOP/s; "
          "N excludes position embeddings")


if __name__ == "__main__":
    main()
