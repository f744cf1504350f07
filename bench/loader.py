"""Data loading: the C++ BatchLoader (1 and N threads) against nanoGPT's get_batch, in one run.

    python bench/loader.py                    # a synthetic text-like dataset in a temporary folder
    python bench/loader.py --data data/enwik8 # a prepared dataset (its train split)

Every loader produces TIPA batches of B = 64 windows of T = 512 tokens: x, y and word-scope reverse
positions t, int64 CPU tensors. The baseline is nanoGPT's approach: a fresh np.memmap per batch, one
slice per row with astype(int64) + torch.from_numpy + torch.stack, and the TIPA targets from
charlm.tipa.reverse_positions on each window plus its read-ahead. The NumPy reference loader is timed too.

ms is the median time per batch over blocks of consecutive steps, so the C++ rows measure throughput
with the caller doing nothing else (the prefetch threads cannot get ahead). "c++ prefetched" is the other
case, a training loop: the caller spends --work-ms between batches (the train step), and ms is then the
time batch() itself takes. On a CUDA machine "c++ prefetched, pinned" times the trainer's own path (pinned
tensors for asynchronous copies to the GPU) and is set against the latest DEEP step time of
bench/train.py on the same device from the history: the loader should stay under 1% of it. Text
throughput counts B * T tokens of the file's itemsize per batch.
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
from common import HISTORY, append_history, device_name, print_table, record, time_ms
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


def prefetched_call_ms(loader: BatchLoader, work_ms: float, steps: int = 50) -> float:
    """Median time of batch() when the caller works (sleeps) work_ms between calls, as a train loop does."""
    times = []
    for step in range(steps):
        start = time.perf_counter()
        loader.batch(step)
        times.append((time.perf_counter() - start) * 1e3)
        time.sleep(work_ms / 1e3)
    return float(np.median(times[5:]))  # after the first calls, which build on demand


def history_row(impl: str, threads: int | None, ms: float, nanogpt_ms: float, case: dict, itemsize: int,
                work_ms: float | None = None) -> dict:
    """One history row; the prefetched row (work_ms set) times a call, not a throughput, so has no rates."""
    per_s = None if work_ms else 1e3 / ms
    text_mb_per_s = per_s and per_s * B * T * itemsize / 1e6
    return record("loader", impl, {**case, "threads": threads, "work_ms": work_ms}, ms, baseline=impl == "nanogpt",
                  gbps=text_mb_per_s and text_mb_per_s / 1e3, tokens_per_s=per_s and per_s * B * T, device="cpu",
                  threads=threads, batches_per_s=per_s, text_mb_per_s=text_mb_per_s,
                  speedup_vs_nanogpt=nanogpt_ms / ms)


def share_of_deep_step(call_ms: float) -> str:
    """The trainer's batch() time as a share of the latest DEEP step bench/train.py measured on this GPU."""
    gpu = device_name("cuda")
    steps = [r for r in read_history(HISTORY) if r["bench"] == "train" and r["impl"] == "charlm"
             and r["device"] == gpu and r["case"].get("name") == "deep"] if HISTORY.is_file() else []
    if not steps:
        return f"no DEEP step time for {gpu} in the history yet: run bench/train.py first"
    step_ms = steps[-1]["ms"]
    return (f"the trainer's batch(): {call_ms:.3f} ms, {100 * call_ms / step_ms:.2f}% of a DEEP step "
            f"({step_ms:.1f} ms, bench/train.py, {steps[-1]['date']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a prepared dataset folder (default: synthetic)")
    parser.add_argument("--synthetic-mb", type=int, default=64, help="size of the synthetic train split")
    parser.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help="threads of the N-thread C++ row (default: min(4, cores))")
    parser.add_argument("--work-ms", type=float, default=20.0, help="train-step time for the prefetched row")
    parser.add_argument("--no-history", action="store_true", help="print only; append nothing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synthetic_dataset(Path(tmp), args.synthetic_mb)
        meta = load_meta(data)
        kwargs = {"tipa": True, "tipa_max": TIPA_MAX, "seed": 0}
        cpp = {n: BatchLoader(data, "train", B, T, threads=n, **kwargs) for n in sorted({1, args.threads})}
        if any(loader.backend != "c++" for loader in cpp.values()):
            raise SystemExit("bench/loader.py: charlm._loader is not built (pip install -e . --no-build-isolation)")
        word = word_table(meta)
        impls = {("nanogpt", None): lambda _step: nanogpt_get_batch(data / "train.bin", meta["dtype"], word),
                 ("numpy-reference", None): NumpyBatchLoader(data, "train", B, T, **kwargs).batch,
                 **{("c++", n): loader.batch for n, loader in cpp.items()}}
        ms = {key: time_ms(consecutive(fn), warmup=2, rep=10, device="cpu") / STEPS_PER_CALL
              for key, fn in impls.items()}
        prefetched_ms = prefetched_call_ms(BatchLoader(data, "train", B, T, threads=args.threads, **kwargs),
                                           args.work_ms)
        pinned_ms = torch.cuda.is_available() and prefetched_call_ms(
            BatchLoader(data, "train", B, T, threads=args.threads, pin_memory=True, **kwargs), args.work_ms)

    case = {"B": B, "T": T, "tipa": True, "tipa_max": TIPA_MAX, "dataset": str(args.data or "synthetic"),
            "tokenization": meta["tokenization"], "train_tokens": meta["splits"]["train"]}
    itemsize, nanogpt_ms = np.dtype(meta["dtype"]).itemsize, ms[("nanogpt", None)]
    rows = [history_row(impl, threads, t, nanogpt_ms, case, itemsize) for (impl, threads), t in ms.items()]
    rows.append(history_row("c++ prefetched", args.threads, prefetched_ms, nanogpt_ms, case, itemsize, args.work_ms))
    if pinned_ms:
        rows.append(history_row("c++ prefetched, pinned", args.threads, pinned_ms, nanogpt_ms, case, itemsize,
                                args.work_ms))
    print(f"loader: B={B} T={T} TIPA word scope, R={TIPA_MAX}; {case['dataset']} "
          f"({case['train_tokens']} train tokens); {rows[0]['device']}")
    print_table(rows, TABLE_COLUMNS)
    if pinned_ms:
        print(share_of_deep_step(pinned_ms))
    if not args.no_history:
        append_history(rows)


if __name__ == "__main__":
    main()
