"""How an evaluation scores a split: which windows, how much context each character gets, and how a table
says so. charlm.eval runs these protocols; the study's and the expert scheme's tables describe them.

`windows`: windows of block_size tokens slide by `stride`; the first scores all its predictions, each
later one its last `stride`. `full` (rotary models): every layer attends to exactly the previous
block_size positions (charlm.sliding), in rows that each start after a warm-up of n_layer * (block_size - 1).
"""
from dataclasses import dataclass

import numpy as np


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


PROTOCOLS = ("windows", "full")


def default_stride(block_size: int) -> int:
    """Every character after a split's first block sees at least 3/4 of block_size, for 4 passes."""
    return max(1, block_size // 4)


@dataclass(frozen=True)
class Contexts:
    """Context lengths (tokens the prediction is conditioned on) of a set of scored characters."""
    chars: int = 0
    total: int = 0  # sum of the context lengths
    min_all: int | None = None
    min_later: int | None = None  # over characters after the first block_size of their split (or span)

    def __add__(self, other: "Contexts") -> "Contexts":
        def low(a, b):
            return b if a is None else a if b is None else min(a, b)
        return Contexts(self.chars + other.chars, self.total + other.total, low(self.min_all, other.min_all),
                        low(self.min_later, other.min_later))

    def summary(self) -> dict:
        return {"chars": self.chars, "min_context": self.min_later, "min_context_all": self.min_all,
                "mean_context": self.total / self.chars if self.chars else None}


def window_contexts(windows: list[tuple[int, int]], T: int) -> Contexts:
    """The contexts of scoring_windows' characters: offset o of a window is predicted from o + 1 tokens."""
    first = np.array([f for _, f in windows], dtype=np.int64)  # contexts first + 1 .. T per window
    total = (T * (T + 1) - first * (first + 1)) // 2
    later = int(first[1:].min()) + 1 if len(first) > 1 else None
    return Contexts(int((T - first).sum()), int(total.sum()), int(first.min()) + 1, later)


def full_contexts(n_tokens: int, block_size: int) -> Contexts:
    """The contexts under the full protocol: target t is predicted from min(t, block_size) tokens."""
    n, T = n_tokens - 1, block_size
    head = min(n, T)
    return Contexts(n, head * (head + 1) // 2 + max(n - T, 0) * T, 1 if n else None, T if n > T else None)


def full_context_rows(n_tokens: int, block_size: int, n_layer: int, parts: int) -> list[tuple[int, int, int]]:
    """(first input, first scored input, end) per row: the inputs 0 .. n_tokens - 2 cut into up to `parts`
    runs scored independently, each after a warm-up of n_layer * (block_size - 1) inputs (what its first
    position can see through the layers), so the result is the same however the split is cut."""
    n, warm = n_tokens - 1, n_layer * (block_size - 1)
    parts = max(1, min(parts, n // max(warm, block_size, 1)))
    bounds = [n * k // parts for k in range(parts + 1)]
    return [(max(0, a - warm), a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def split_contexts(n_tokens: int, block_size: int, stride: int, protocol: str,
                   spans: np.ndarray | None = None) -> Contexts:
    """The contexts of every character a split (or its spans) has scored under a protocol."""
    if protocol == "full":
        return full_contexts(n_tokens, block_size)
    if spans is None:
        return window_contexts(scoring_windows(n_tokens, block_size, stride), min(block_size, n_tokens - 1))
    out = Contexts()
    for _, length in spans[:, :2].tolist():
        if length >= 2:
            out = out + window_contexts(scoring_windows(length, block_size, stride), min(block_size, length - 1))
    return out


def protocol_cell(protocol: dict | None) -> str:
    """A table cell: the protocol, its least context after a split's first block and its mean context."""
    if protocol is None:
        return "not recorded"
    how = f"full T={protocol['block_size']}" if protocol["name"] == "full" else \
        f"windows T={protocol['block_size']} stride {protocol['stride']}"
    low = "" if protocol["min_context"] is None else f", ctx ≥ {protocol['min_context']}"
    return f"{how}{low}, mean {protocol['mean_context']:.1f}"


def describe_protocol(protocol: dict) -> str:
    """One line for a table's notes: how the characters were scored, with how much context, on which splits."""
    T = protocol["block_size"]
    how = (f"full context (sliding-window attention over the previous {T} positions in every layer, "
           f"charlm.sliding; receptive field {protocol['receptive_field']})" if protocol["name"] == "full"
           else f"windows of {T} characters sliding by {protocol['stride']}")
    later = protocol["min_context"]
    low = f"at least {later} characters of context after each split's first {T}" if later else "short splits"
    sizes = ", ".join(f"{split} {s['tokens']:,} characters ({s['chars']:,} scored)"
                      for split, s in protocol["splits"].items())
    return f"{how}: {low}, {protocol['mean_context']:.1f} on average; {sizes}"


def protocol_notes(named: list[tuple[str, dict | None]]) -> list[str]:
    """"NAMES: description" per distinct protocol of (name, protocol or None) pairs, for a report's notes."""
    groups: dict[str, list[str]] = {}
    for name, protocol in named:
        names = groups.setdefault(describe_protocol(protocol) if protocol else "not recorded", [])
        if name not in names:
            names.append(name)
    return [f"{', '.join(names)}: {text}" for text, names in groups.items()]


def check_protocol(protocol: str, stride: int, category: str, pos_embedding: str | None = None) -> None:
    """One line naming the flag for a protocol that cannot run as asked (the model's positions, once known)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol != "full":
        return
    if stride:
        raise ValueError("--stride applies to --protocol windows only (full scores every character with full context)")
    if category:
        raise ValueError("--category is scored with --protocol windows only; pass a small --stride instead")
    if pos_embedding not in (None, "rope"):
        raise ValueError("--protocol full needs rotary positions (learned absolute positions end at block_size); "
                         "use --protocol windows with a small --stride instead: --stride S costs about "
                         "block_size / S passes over each split, and --stride 1 scores every character with "
                         "block_size characters of context at block_size passes")
