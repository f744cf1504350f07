"""Data loading: the C++ BatchLoader (1 and N threads) against nanoGPT's get_batch, in one run.

    python bench/loader.py                    # a synthetic text-like dataset in a temporary folder
    python bench/loader.py --data data/enwik8 # a prepared dataset (its train split)

Every loader produces TIPA batches of B = 64 windows of T = 512 tokens: x, y and word-scope reverse
positions t, int64 CPU tensors. The baseline is nanoGPT's approach: a fresh np.memmap per batch, one
slice per row with astype(int64) + torch.from_numpy + torch.stack, and the TIPA targets from
charlm.tipa.reverse_positions on each window plus its read-ahead. The NumPy reference loader is timed too.

ms is the median time per batch over blocks of consecutive steps (ms_min and ms_p80 the spread), so the
C++ rows measure throughput with the caller doing nothing else (the prefetch threads cannot get ahead).
"c++ prefetched" is the other case, a training loop: the caller spends --work-ms between batches (the
train step), and ms is then the time batch() itself takes. On a CUDA machine "c++ prefetched, pinned"
times the trainer's own path (pinned tensors for asynchronous copies to the GPU) and is set against the
latest DEEP step time of bench/train.py on the same device in the (first) history file:
share_of_deep_step, which should stay under 1%. Text throughput counts B * T tokens of the file's itemsize
per batch. Without the C++ extension (charlm._loader not built) only the NumPy rows are measured, and the
script says so. Each row is appended to the history as soon as it is measured.

    python bench/loader.py --dry-run          # a 2 MB dataset, shorter loops: a smoke test
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from charlm.data import load_meta
from charlm.loader import BatchLoader, NumpyBatchLoader
from charlm.tipa import reverse_positions, word_table
from common import HISTORY, History, Timing, bench_parser, device_name, print_table, record, time_ms
from report import read_history

B, T, TIPA_MAX = 64, 512, 16
STEPS_PER_CALL = 16  # batches per timed call: the medians are per block of consecutive steps
TABLE_COLUMNS = ["impl", "threads", "ms", "batches_per_s", "text_mb_per_s", "speedup_vs_nanogpt"]


def synthetic_dataset(folder: Path, megabytes: int) -> Path:
    """A bytes dataset of English-like text: words of 1-12 letters (some UTF-8), spaces and punctuation."""
    rng = np.random.default_rng(0)
    n = megabytes * 2**20
    tokens = rng.choice(np.frombuffer(b"etaoinshrdlucmfwyp", np.uint8), n)
    gaps = np.cumsum(rng.integers(2, 13, n // 2))  # word boundaries
    tokens[gaps[gaps < n]] = rng.choice(np.frombuffer(b"     ,.\n", np.uint8), (gaps < n).sum())
    tokens[rng.integers(0, n, n // 100)] = 0xC3  # lead bytes of UTF-8 letters, word bytes
    splits = {"train": tokens, "val": tokens[: n // 20], "test": tokens[: n // 20]}
    for name, part in splits.items():
        part.tofile(folder / f"{name}.bin")
    meta = {"format": 1, "tokenization": "bytes", "dtype": "uint8", "vocab_size": 256, "chars": None,
            "splits": {name: len(part) for name, part in splits.items()}, "source": {"name": "synthetic"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def nanogpt_get_batch(path: Path, dtype: str, word: np.ndarray):
    """nanoGPT's train.py get_batch, with TIPA targets added the straightforward NumPy way."""
    data = np.memmap(path, dtype=dtype, mode="r")  # re-created every batch, as nanoGPT does
    ix = torch.randint(len(data) - T, (B,))
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
    t = torch.stack([torch.from_numpy(reverse_positions(data[i + 1:i + 1 + T + TIPA_MAX], TIPA_MAX, word)[:T]
                                      .astype(np.int64)) for i in ix])
    return x, y, t


def consecutive(get_batch):
    """A callable that fetches the next STEPS_PER_CALL steps, continuing where the last call stopped."""
    step = iter(range(10**9))
    return lambda: [get_batch(next(step)) for _ in range(STEPS_PER_CALL)]


def prefetched_call_ms(loader: BatchLoader, work_ms: float, steps: int) -> Timing:
    """Times of batch() when the caller works (sleeps) work_ms between calls, as a train loop does."""
    times = []
    for step in range(steps):
        start = time.perf_counter()
        loader.batch(step)
        times.append((time.perf_counter() - start) * 1e3)
        time.sleep(work_ms / 1e3)
    return Timing.of(times[5:])  # after the first calls, which build on demand


def history_row(impl: str, threads: int | None, timing: Timing, nanogpt_ms: float, case: dict, itemsize: int,
                work_ms: float | None = None, **extra) -> dict:
    """One history row; the prefetched row (work_ms set) times a call, not a throughput, so has no rates."""
    per_s = None if work_ms else 1e3 / timing.median
    text_mb_per_s = per_s and per_s * B * T * itemsize / 1e6
    return record("loader", impl, case, timing, work_ms=work_ms,
                  baseline=impl == "nanogpt", gbps=text_mb_per_s and text_mb_per_s / 1e3,
                  tokens_per_s=per_s and per_s * B * T, device="cpu", threads=threads, batches_per_s=per_s,
                  text_mb_per_s=text_mb_per_s, speedup_vs_nanogpt=nanogpt_ms / timing.median, **extra)


def latest_deep_step(history: Path) -> dict | None:
    """The latest DEEP training row of charlm's configuration that bench/train.py recorded on this GPU."""
    gpu = device_name("cuda")
    steps = [r for r in read_history(history) if r["bench"] == "train" and r["impl"] == "charlm"
             and r["device"] == gpu and r["case"].get("name") == "deep"] if history.is_file() else []
    return steps[-1] if steps else None


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--data", type=Path, help="a prepared dataset folder (default: synthetic)")
    parser.add_argument("--synthetic-mb", type=int, default=64, help="size of the synthetic train split")
    parser.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help="threads of the N-thread C++ row (default: min(4, cores))")
    parser.add_argument("--work-ms", type=float, default=20.0, help="train-step time for the prefetched row")
    args = parser.parse_args()
    if args.dry_run:
        args.synthetic_mb, args.work_ms = 2, 2.0
    return args


def measure(data: Path, meta: dict, args, history: History) -> None:
    """Time every loader on the dataset and append a row for each as soon as it is measured."""
    kwargs = {"tipa": True, "tipa_max": TIPA_MAX, "seed": 0}
    case = {"B": B, "T": T, "tipa": True, "tipa_max": TIPA_MAX, "dataset": str(args.data or "synthetic"),
            "tokenization": meta["tokenization"], "train_tokens": meta["splits"]["train"]}
    itemsize, word = np.dtype(meta["dtype"]).itemsize, word_table(meta)
    cpp = {n: BatchLoader(data, "train", B, T, threads=n, **kwargs) for n in sorted({1, args.threads})}
    built = all(loader.backend == "c++" for loader in cpp.values())
    if not built:
        print("bench/loader.py: charlm._loader is not built (pip install -e . --no-build-isolation): "
              "only the NumPy loaders are measured")
    impls = {("nanogpt", None): lambda _step: nanogpt_get_batch(data / "train.bin", meta["dtype"], word),
             ("numpy-reference", None): NumpyBatchLoader(data, "train", B, T, **kwargs).batch,
             **({("c++", n): loader.batch for n, loader in cpp.items()} if built else {})}
    rep = 3 if args.dry_run else 10
    nanogpt_ms = None
    for (impl, threads), fn in impls.items():
        timing = time_ms(consecutive(fn), warmup=1, rep=rep, device="cpu")
        timing = Timing(*(x / STEPS_PER_CALL for x in (timing.min, timing.median, timing.p80)))
        nanogpt_ms = nanogpt_ms or timing.median
        history.add(history_row(impl, threads, timing, nanogpt_ms, case, itemsize))
    if not built:
        return
    steps = 15 if args.dry_run else 50
    timing = prefetched_call_ms(BatchLoader(data, "train", B, T, threads=args.threads, **kwargs), args.work_ms, steps)
    history.add(history_row("c++ prefetched", args.threads, timing, nanogpt_ms, case, itemsize, args.work_ms))
    if torch.cuda.is_available():
        pinned = BatchLoader(data, "train", B, T, threads=args.threads, pin_memory=True, **kwargs)
        timing = prefetched_call_ms(pinned, args.work_ms, steps)
        deep = latest_deep_step((args.history or [HISTORY])[0])
        history.add(history_row("c++ prefetched, pinned", args.threads, timing, nanogpt_ms, case, itemsize,
                                args.work_ms, deep_step_ms=deep and deep["ms"],
                                share_of_deep_step=deep and timing.median / deep["ms"]))


def main() -> None:
    args = parse_args()
    history = History(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synthetic_dataset(Path(tmp), args.synthetic_mb)
        meta = load_meta(data)
        measure(data, meta, args, history)
    rows = history.rows
    print(f"loader: B={B} T={T} TIPA word scope, R={TIPA_MAX}; {rows[0]['case']['dataset']} "
          f"({rows[0]['case']['train_tokens']} train tokens); {rows[0]['device']}")
    print_table(rows, TABLE_COLUMNS)
    pinned = [r for r in rows if r["impl"] == "c++ prefetched, pinned"]
    if pinned and pinned[0]["share_of_deep_step"] is not None:
        print(f"the trainer's batch(): {pinned[0]['ms']:.3f} ms, {100 * pinned[0]['share_of_deep_step']:.2f}% of a "
              f"DEEP step ({pinned[0]['deep_step_ms']:.1f} ms, bench/train.py)")
    elif pinned:
        print("no DEEP step time for this GPU in the history yet: run bench/train.py first")


if __name__ == "__main__":
    main()
