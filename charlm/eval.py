"""Bits per character of a trained run on the full val and test splits, every character scored once.

    python -m charlm.eval runs/NAME                    # newest checkpoint; windows sliding by block_size / 4
    python -m charlm.eval runs/NAME --stride 1         # Al-Rfou et al.'s protocol: block_size passes
    python -m charlm.eval runs/NAME --protocol full    # rotary models: every character with full context, ~2 passes
    torchrun --nproc_per_node 8 -m charlm.eval runs/NAME           # the work shared among 8 GPUs

`windows` (the default): windows of block_size tokens slide by `stride`; the first window scores all
its predictions, each later one only its last `stride`, so every character after the first is predicted
exactly once, and each after the first block_size of a split with at least block_size - stride + 1
characters of context. The default stride, block_size // 4, gives every such character at least 3/4 of
the context the model was trained on (mean about 7/8) for four passes over the split: non-overlapping
windows (stride = block_size) give the average character half a window, which is not comparable with
the literature's full-context numbers; --stride 1 is that protocol exactly (Al-Rfou et al. 2018: each
character predicted from the block_size characters before it) at block_size passes.

`full` (rotary models only): sliding-window attention through charlm.sliding, every layer of every
position attending to exactly the previous block_size positions (a banded causal mask with a key/value
cache), about twice the cost of one pass. Each character's last layer sees block_size characters (fewer
only in a split's first block_size); with one layer this is --stride 1 exactly, with more the cached
keys carry context from further back (up to n_layer * (block_size - 1) + 1 characters, as a
Transformer-XL memory does). Learned absolute positions end at block_size: use a small --stride there.

Only next-character loss counts, whatever the variant. Writes RUN/eval.json with val_bpc, test_bpc and
`protocol`: its name, stride, and the context per scored character (min after the first block_size
characters of a split, min over all, mean) with each split's size and characters scored.

    python -m charlm.eval runs/NAME --category keywords/Science   # one topic subset (charlm.categorize)

With --category, each span of the subset is scored as a document of its own (every character after its
first, with context from the span only; windows protocol) and the result goes to
RUN/eval_<method>_<category>.json.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from charlm import cli
from charlm.categorize import category_slug
from charlm.checkpoint import load_model
from charlm.console import progress
from charlm.data import DataError, category_spans, load_meta, split_tokens
from charlm.io import atomic_write_text
from charlm.loss import token_nll
from charlm.model import GPT
from charlm.protocol import (
    PROTOCOLS,
    Contexts,
    check_protocol,
    default_stride,
    describe_protocol,
    full_context_rows,
    scoring_windows,
    split_contexts,
)
from charlm.runtime import (
    SINGLE_PROCESS,
    DistContext,
    all_reduce_sum,
    autocast,
    bits_per_char,
    distributed,
    resolve_device,
)
from charlm.sliding import sliding_hidden


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


@torch.no_grad()
def _full_nats(model: GPT, tokens: np.ndarray, rows: list[tuple[int, int, int]], batch_size: int,
               device: torch.device, amp, bar) -> tuple[torch.Tensor, int]:
    """_nats for the full protocol: rows of full_context_rows through charlm.sliding, batch_size at a time
    (a batch's shorter rows padded at their end, which nothing before them can see)."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        length = max(end - start for start, _, end in batch)
        ids = np.zeros((len(batch), length + 1), dtype=np.int64)
        for r, (start, _, end) in enumerate(batch):
            ids[r, :end - start + 1] = tokens[start:end + 1]
        x, y = torch.from_numpy(ids[:, :-1]).to(device), torch.from_numpy(ids[:, 1:]).to(device)
        lo = torch.tensor([a - s for s, a, _ in batch], device=device)[:, None]
        hi = torch.tensor([e - s for s, _, e in batch], device=device)[:, None]
        with amp:
            for start, h in sliding_hidden(model, x):
                yc = y[:, start:start + h.shape[1]]
                nll = token_nll(h.flatten(0, 1), model.lm_head.weight, yc.flatten()).view(yc.shape)
                pos = torch.arange(start, start + h.shape[1], device=device)[None, :]
                total += (nll * ((pos >= lo) & (pos < hi))).sum(dtype=torch.float64)
                if bar is not None:
                    bar.update(1)
        count += sum(e - a for _, a, e in batch)
    return total, count


def _bpc_over_ranks(nats: torch.Tensor, count: int, ctx: DistContext) -> tuple[float, int]:
    """(BPC, characters scored) from each rank's (nats, count) of its shard, summed over the ranks."""
    both = torch.stack([nats, torch.tensor(float(count), dtype=torch.float64, device=nats.device)])
    nats, count = all_reduce_sum(both, ctx).tolist()
    return (bits_per_char(nats / count) if count else math.nan), int(count)


def split_bpc(model: GPT, tokens: np.ndarray, block_size: int, stride: int, batch_size: int,
              device: torch.device, amp, desc: str = "", ctx: DistContext = SINGLE_PROCESS,
              protocol: str = "windows") -> tuple[float, int]:
    """(BPC, characters scored) of a token array; the sum of losses is accumulated in float64. Under torchrun
    each rank scores every world_size-th window (full protocol: every world_size-th row) and the sums are
    combined."""
    if protocol == "full":
        rows = full_context_rows(len(tokens), block_size, len(model.blocks), ctx.world_size * batch_size)
        rows = rows[ctx.rank::ctx.world_size]
        chunks = sum(-(-max(e - s for s, _, e in rows[i:i + batch_size]) // block_size)
                     for i in range(0, len(rows), batch_size))
        with progress(total=chunks, desc=desc, unit="chunk", leave=False, disable=not ctx.is_master) as bar:
            nats, count = _full_nats(model, tokens, rows, batch_size, device, amp, bar)
        return _bpc_over_ranks(nats, count, ctx)
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
             ctx: DistContext = SINGLE_PROCESS, save: bool = True, protocol: str = "windows") -> dict:
    """BPC of each split (or of a category's subset of it), with its protocol, returned and, with save,
    written to the run folder (rank 0). stride 0 is default_stride. Under torchrun the ranks share the
    work (every rank must call it) and all return the same numbers."""
    run_dir = Path(run_dir)
    if batch_size < 1 or stride < 0:
        raise ValueError(f"--batch-size must be at least 1 ({batch_size}) and --stride 0 (block_size // 4) "
                         f"or more ({stride})")
    check_protocol(protocol, stride, category)
    dev = resolve_device(device, ctx)
    model, cfg, step = load_model(run_dir, dev, checkpoint)
    check_protocol(protocol, stride, category, cfg.model.pos_embedding)
    data_dir = cfg.dataset_dir
    meta = load_meta(data_dir)
    if meta["vocab_size"] != cfg.model.vocab_size:
        raise DataError(f"{data_dir} has vocab {meta['vocab_size']} but the model was trained on "
                        f"{cfg.model.vocab_size}")
    T = cfg.model.block_size
    stride = None if protocol == "full" else stride or default_stride(T)
    result = {"step": step, "stride": stride, "block_size": T, "dataset": str(data_dir)}
    if category:
        result["category"] = category
    contexts, sizes = Contexts(), {}
    for split in splits:
        tokens = split_tokens(data_dir, split, meta)
        args = (T, stride, batch_size, dev, autocast(cfg.dtype, dev), split, ctx)
        spans = category_spans(data_dir, category, split) if category else None
        if category:
            bpc, count = spans_bpc(model, tokens, spans, *args)
        else:
            bpc, count = split_bpc(model, tokens, *args, protocol=protocol)
        result[f"{split}_bpc"], result[f"{split}_chars"] = bpc, count
        split_ctx = split_contexts(len(tokens), T, stride, protocol, spans)
        contexts = contexts + split_ctx
        sizes[split] = {"tokens": len(tokens), **split_ctx.summary()}
    result["protocol"] = {"name": protocol, "block_size": T, "stride": stride, **contexts.summary(), "splits": sizes}
    if protocol == "full":
        result["protocol"]["receptive_field"] = cfg.model.n_layer * (T - 1) + 1
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
    parser.add_argument("--protocol", choices=PROTOCOLS, default="windows",
                        help="windows: block_size windows sliding by --stride; full: every character with "
                             "full context through sliding-window attention (rotary models)")
    parser.add_argument("--stride", type=int, default=0,
                        help="window stride in tokens for --protocol windows (default: block_size // 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows (--protocol full: rows) per forward pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint", type=Path,
                        help="a checkpoint file, or 'best' for the one with the lowest val estimate "
                             "(default: the newest)")
    parser.add_argument("--category", default="", help="only this topic subset, as METHOD/NAME (charlm.categorize)")
    args = parser.parse_args(argv)
    with distributed(args.device) as ctx:
        result = evaluate(args.run_dir, args.stride, args.batch_size, args.device, checkpoint=args.checkpoint,
                          category=args.category, ctx=ctx, save=False, protocol=args.protocol)
    if not ctx.is_master:
        return
    print(f"protocol: {describe_protocol(result['protocol'])}")
    if args.category:
        print(f"on the {args.category} subset of each split:")
    for split in ("val", "test"):
        print(f"{split} bpc {result[f'{split}_bpc']:.4f}", flush=True)
    print(f"wrote {write_result(args.run_dir, result)}")


def main(argv=None) -> None:
    cli.run(lambda: _main(argv))


if __name__ == "__main__":
    main()
