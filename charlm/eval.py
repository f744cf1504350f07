"""Bits per character of a trained run on the full val and test splits, every character scored once.

    python -m charlm.eval runs/NAME                 # newest checkpoint, windows of block_size
    python -m charlm.eval runs/NAME --stride 128    # overlapping windows: each scored char sees >= T-128 context
    torchrun --nproc_per_node 8 -m charlm.eval runs/NAME           # the windows shared among 8 GPUs

Windows of block_size tokens slide by `stride`; the first window scores all its predictions, each later
one only its last `stride` (so every character after the first is predicted exactly once, with at least
block_size - stride characters of context). Only next-character loss counts, whatever the variant.
Writes RUN/eval.json with val_bpc and test_bpc.

    python -m charlm.eval runs/NAME --category keywords/Science   # one topic subset (charlm.categorize)

With --category, each span of the subset is scored as a document of its own (every character after its
first, with context from the span only) and the result goes to RUN/eval_<method>_<category>.json.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from charlm import cli
from charlm.categorize import category_slug
from charlm.checkpoint import best_checkpoint, check_finite, check_weights_fit, latest_checkpoint, load_checkpoint
from charlm.config import Config
from charlm.console import progress
from charlm.data import DataError, category_spans, load_meta, split_tokens
from charlm.io import atomic_write_text
from charlm.loss import token_nll
from charlm.model import GPT
from charlm.runtime import SINGLE_PROCESS, DistContext, all_reduce_sum, autocast, bits_per_char, distributed, resolve_device


def load_model(run_dir: Path, device: torch.device, checkpoint: Path | None = None) -> tuple[GPT, Config, int]:
    """The run's model from its newest intact (or the given) checkpoint, in eval mode."""
    path = best_checkpoint(run_dir) if str(checkpoint) == "best" else checkpoint or latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint found (train it first with python -m charlm.train)")
    state = check_finite(load_checkpoint(path, map_location=device), path)
    cfg = Config.from_dict(state["config"], source=str(path))
    model = GPT.from_config(cfg).to(device)
    check_weights_fit(state["model"], model, f"{path}: its weights do not fit its config")
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state["step"]


def scoring_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) per window so that targets 1 .. n_tokens - 1 are each scored once.

    A window at `start` predicts tokens start+1 .. start+T; it scores offsets `first` .. T-1.
    """
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    T = min(block_size, n_tokens - 1)
    if T < 1:
        raise ValueError(f"a split of {n_tokens} tokens has nothing to score")
    windows, scored = [], 0  # targets 1..scored are done
    while scored < n_tokens - 1:
        end = min(max(scored + stride, T), n_tokens - 1)  # last target this window scores
        start = end - T
        windows.append((start, scored - start))
        scored = end
    return windows


@torch.no_grad()
def _nats(model: GPT, tokens: np.ndarray, windows: list[tuple[int, int]], T: int, batch_size: int,
          device: torch.device, amp, bar) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses in nats, float64 on the device, targets scored) of the given windows."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        rows = np.stack([tokens[s:s + T + 1] for s, _ in chunk]).astype(np.int64)
        x, y = torch.from_numpy(rows[:, :-1]).to(device), torch.from_numpy(rows[:, 1:]).to(device)
        with amp:
            nll = token_nll(model.hidden(x).flatten(0, 1), model.lm_head.weight, y.flatten()).view(y.shape)
        first = torch.tensor([f for _, f in chunk], device=device)
        mask = torch.arange(T, device=device)[None, :] >= first[:, None]
        total += (nll * mask).sum(dtype=torch.float64)
        count += sum(T - f for _, f in chunk)
        if bar is not None:
            bar.update(1)
    return total, count


def _bpc_over_ranks(nats: torch.Tensor, count: int, ctx: DistContext) -> tuple[float, int]:
    """(BPC, characters scored) from each rank's (nats, count) of its shard, summed over the ranks."""
    both = torch.stack([nats, torch.tensor(float(count), dtype=torch.float64, device=nats.device)])
    nats, count = all_reduce_sum(both, ctx).tolist()
    return (bits_per_char(nats / count) if count else math.nan), int(count)


def split_bpc(model: GPT, tokens: np.ndarray, block_size: int, stride: int, batch_size: int,
              device: torch.device, amp, desc: str = "", ctx: DistContext = SINGLE_PROCESS) -> tuple[float, int]:
    """(BPC, characters scored) of a token array; the sum of losses is accumulated in float64. Under torchrun
    each rank scores every world_size-th window and the sums are combined."""
    windows = scoring_windows(len(tokens), block_size, stride)[ctx.rank::ctx.world_size]
    with progress(total=-(-len(windows) // batch_size), desc=desc, unit="batch", leave=False,
              disable=not ctx.is_master) as bar:
        nats, count = _nats(model, tokens, windows, min(block_size, len(tokens) - 1), batch_size, device, amp, bar)
    return _bpc_over_ranks(nats, count, ctx)


def spans_bpc(model: GPT, tokens: np.ndarray, spans: np.ndarray, block_size: int, stride: int, batch_size: int,
              device: torch.device, amp, desc: str = "", ctx: DistContext = SINGLE_PROCESS) -> tuple[float, int]:
    """(BPC, characters scored) over spans (rows start, length[, ...]) of a token array, each scored as a
    document of its own (its windows as split_bpc makes them); spans of fewer than 2 tokens have nothing to
    score. Under torchrun each rank scores every world_size-th span."""
    nats, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start, length in progress(spans[ctx.rank::ctx.world_size, :2].tolist(), desc=desc, unit="span",
                                  disable=not ctx.is_master):
        if length >= 2:
            span = tokens[start:start + length]
            windows = scoring_windows(length, block_size, stride)
            span_nats, n = _nats(model, span, windows, min(block_size, length - 1), batch_size, device, amp, None)
            nats, count = nats + span_nats, count + n
    bpc, count = _bpc_over_ranks(nats, count, ctx)
    if count == 0:
        raise ValueError(f"{desc or 'spans'}: no span holds a character to score")
    return bpc, count


def eval_filename(category: str = "") -> str:
    """eval.json, or eval_<method>_<category slug>.json for a topic subset "<method>/<name>"."""
    method, _, name = category.partition("/")
    return f"eval_{method}_{category_slug(name)}.json" if category else "eval.json"


def evaluate(run_dir: Path, stride: int = 0, batch_size: int = 32, device: str = "auto",
             splits: tuple[str, ...] = ("val", "test"), checkpoint: Path | None = None, category: str = "",
             ctx: DistContext = SINGLE_PROCESS, save: bool = True) -> dict:
    """BPC of each split (or of a category's subset of it), returned and, with save, written to the run
    folder (rank 0). Under torchrun the ranks share the windows (every rank must call it) and all return
    the same numbers."""
    run_dir = Path(run_dir)
    if batch_size < 1 or stride < 0:
        raise ValueError(f"--batch-size must be at least 1 ({batch_size}) and --stride 0 (block_size) or more ({stride})")
    dev = resolve_device(device, ctx)
    model, cfg, step = load_model(run_dir, dev, checkpoint)
    data_dir = cfg.dataset_dir
    meta = load_meta(data_dir)
    if meta["vocab_size"] != cfg.model.vocab_size:
        raise DataError(f"{data_dir} has vocab {meta['vocab_size']} but the model was trained on {cfg.model.vocab_size}")
    stride = stride or cfg.model.block_size
    result = {"step": step, "stride": stride, "block_size": cfg.model.block_size, "dataset": str(data_dir)}
    if category:
        result["category"] = category
    for split in splits:
        tokens = split_tokens(data_dir, split, meta)
        args = (cfg.model.block_size, stride, batch_size, dev, autocast(cfg.dtype, dev), split, ctx)
        if category:
            bpc, count = spans_bpc(model, tokens, category_spans(data_dir, category, split), *args)
        else:
            bpc, count = split_bpc(model, tokens, *args)
        result[f"{split}_bpc"], result[f"{split}_chars"] = bpc, count
    if save and ctx.is_master:
        write_result(run_dir, result)
    return result


def write_result(run_dir: Path, result: dict) -> Path:
    """RUN/eval.json (or eval_<method>_<category>.json) with the figures of `evaluate`."""
    path = Path(run_dir) / eval_filename(result.get("category", ""))
    try:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise OSError(e.errno, f"could not write {path} ({e.strerror}); the figures printed above are complete") from e
    return path


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m charlm.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder written by charlm.train")
    parser.add_argument("--stride", type=int, default=0, help="window stride in tokens (default: block_size)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint", type=Path,
                        help="a checkpoint file, or 'best' for the one with the lowest val estimate (default: the newest)")
    parser.add_argument("--category", default="", help="only this topic subset, as METHOD/NAME (charlm.categorize)")
    args = parser.parse_args(argv)
    with distributed(args.device) as ctx:
        result = evaluate(args.run_dir, args.stride, args.batch_size, args.device, checkpoint=args.checkpoint,
                          category=args.category, ctx=ctx, save=False)
    if not ctx.is_master:
        return
    if args.category:
        print(f"on the {args.category} subset of each split:")
    for split in ("val", "test"):
        print(f"{split} bpc {result[f'{split}_bpc']:.4f}", flush=True)
    print(f"wrote {write_result(args.run_dir, result)}")


def main(argv=None) -> None:
    cli.run(lambda: _main(argv))


if __name__ == "__main__":
    main()
