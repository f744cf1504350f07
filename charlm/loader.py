"""Batches of training windows from a prepared dataset: the C++ loader and its NumPy reference.

    loader = BatchLoader("data/enwik8", "train", batch_size=64, block_size=512, seed=1337, tipa=True)
    x, y, t = loader.batch(step)   # int64 CPU tensors (B_local, T); t is None without TIPA

``NumpyBatchLoader`` is the reference: short, slow, obviously right. ``BatchLoader`` gives the same
batches element for element from the C++ extension ``charlm._loader`` (a shared mmap of the token file,
background threads that build the next batches while the caller trains, GIL released); when the
extension is not built it warns and falls back to the reference.

A window is T + 1 consecutive tokens inside one span (default: one span, the whole split):
x = window[0:T], y = window[1:T+1]. Every window start in every span is equally likely; spans shorter
than T + 1 tokens hold none and are skipped. Row i of the global batch at a step is window number
floor(u * W / 2**64) of the W windows (numbered span by span in the order given, by start within a span),
where u = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ i) in unsigned 64-bit arithmetic: a pure
function of (seed, step, i), so a batch never depends on earlier calls, resuming needs no state, and rank
r of world_size ranks taking global rows r*B/W .. (r+1)*B/W - 1 sees exactly its slice of the one-process
batch.

TIPA (``tipa=True``): t holds the reverse positions (charlm.tipa) of the targets y. Scope "word" gives
t[i, j] = reverse_positions(split)[s + 1 + j] for a window starting at s: words running past the window's
end are completed by reading ahead in the split, at most tipa_max tokens, since longer look-ahead could
not change a clipped value; the split's end ends a word. Scope "window" gives min(T - j, tipa_max).

Bad input raises ValueError naming the input, before any batch is built: missing or truncated files (a
token file whose size does not match meta.json's split length), token ids >= vocab_size, a split or spans
that hold no window, and arguments that are not ints (bools included) or are out of range; a batch over
MAX_BATCH_BYTES and threads outside 1..MAX_THREADS are refused before anything is allocated or started.
Token ids are checked when a loader opens a split, by a full scan (in C++ once per memory mapping, which
the loaders of a file share, about 20 ms for 90M uint16 tokens; skipped where the token dtype cannot hold
an id >= vocab_size, as for bytes). If the C++ loader cannot start all its threads (a process or memory
limit), the ones started are joined and OSError is raised.

Prepared files must not be modified in place while a loader has them open: the token file is memory-mapped,
so truncating it under a running loader kills the process with SIGBUS on the next read past the new end
(a check cannot prevent that). Replacing it (a new file or folder renamed into place, as charlm.data
does) is safe: a running loader keeps reading the old one.
"""
import os
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from charlm.data import load_meta, split_tokens
from charlm.tipa import SCOPES, reverse_positions, window_positions, word_table

try:
    from charlm import _loader
except ImportError:
    _loader = None

# One batch's x, y (and t) as int64 on one rank. 64 x 512 tokens with TIPA take 0.8 MB: a batch over this
# bound is a mistake in the arguments, refused before the C++ loader allocates it (and max(2, threads)
# more ahead of it).
MAX_BATCH_BYTES = 2**30
MAX_THREADS = 64  # per BatchLoader (default min(4, cores)): more would only add thread stacks
_M64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------
# The prepared dataset

def split_file(data_dir: str | Path, split: str, meta: dict) -> tuple[Path, int]:
    """(path, n_tokens) of a split's token file."""
    if split not in meta["splits"]:
        raise ValueError(f"{Path(data_dir) / 'meta.json'}: no split {split!r} (has {sorted(meta['splits'])})")
    return Path(data_dir) / f"{split}.bin", meta["splits"][split]


# ----------------------------------------------------------------------------------------------------
# Sampling: the counter-based generator, the same arithmetic as csrc/

def splitmix64(x: int) -> int:
    """Steele, Lea and Flood's SplitMix64 finaliser on unsigned 64-bit ints (here Python ints, masked)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def window_index(seed: int, step: int, row: int, num_windows: int) -> int:
    """Which of num_windows windows global row `row` of `step` takes: floor(u * num_windows / 2**64)."""
    u = splitmix64(splitmix64(splitmix64(int(seed)) ^ int(step)) ^ int(row))  # Python ints: no wrap-around
    return (u * int(num_windows)) >> 64


def windows_per_span(lengths: np.ndarray, block_size: int) -> np.ndarray:
    """How many windows (starts of T + 1 tokens) each span holds."""
    return np.maximum(lengths - block_size, 0)


# ----------------------------------------------------------------------------------------------------
# The loaders

class NumpyBatchLoader:
    """The reference loader (see the module docstring)."""

    def __init__(self, data_dir, split, batch_size, block_size, *, seed=0, rank=0, world_size=1, tipa=False,
                 tipa_max=16, tipa_scope="word", spans=None, pin_memory=False):
        _check_args(batch_size, block_size, seed, rank, world_size, tipa, tipa_max, tipa_scope, pin_memory)
        self.meta = load_meta(Path(data_dir))
        self.vocab_size = self.meta["vocab_size"]
        self.path, self.n_tokens = split_file(data_dir, split, self.meta)
        if self.n_tokens < block_size + 1:
            raise ValueError(f"{self.path}: split {split!r} has {self.n_tokens} tokens, fewer than one window "
                             f"of block_size + 1 = {block_size + 1}")
        self.dtype = np.dtype(self.meta["dtype"])
        self.batch_size, self.block_size, self.seed = int(batch_size), int(block_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.tipa, self.tipa_max, self.tipa_scope, self.pin_memory = tipa, int(tipa_max), tipa_scope, pin_memory
        self.word = word_table(self.meta)
        self.spans = _check_spans(spans, self.n_tokens, self.path)
        span_windows = windows_per_span(self.spans[:, 1], self.block_size)
        self._windows_before = np.cumsum(span_windows) - span_windows  # first window of each span
        self.num_windows = int(span_windows.sum())
        if self.num_windows == 0:
            raise ValueError(f"spans for {self.path}: none holds a window of block_size + 1 = {block_size + 1} "
                             f"tokens (longest span: {self.spans[:, 1].max()})")
        self._open()
        # A full scan, done once: skipped where the dtype cannot hold an id >= vocab_size (bytes).
        if np.iinfo(self.dtype).max >= self.vocab_size and (top := self._max_token()) >= self.vocab_size:
            raise ValueError(f"{self.path}: token id {top} >= vocab_size {self.vocab_size} (corrupt or not "
                             f"matching meta.json)")

    def batch(self, step: int):
        """(x, y, t) of a step: int64 CPU tensors (B_local, T), pinned with pin_memory; t None without TIPA."""
        _check_int("step", step, 0, 2**63 - 1)
        tensors = [None if a is None else torch.from_numpy(a) for a in self._arrays(int(step))]
        if self.pin_memory:  # a copy into page-locked memory, for asynchronous copies to the GPU
            tensors = [None if t is None else t.pin_memory() for t in tensors]
        return tuple(tensors)

    # -- the reference implementation ---------------------------------------------------------------

    def _open(self) -> None:
        self._tokens = split_tokens(self.path.parent, self.path.stem, self.meta)

    def _max_token(self) -> int:
        return int(self._tokens.max())

    def _starts(self, step: int) -> np.ndarray:
        """The window start of each of this rank's rows at a step."""
        first = self.rank * self.local_batch_size
        w = np.array([window_index(self.seed, step, r, self.num_windows)
                      for r in range(first, first + self.local_batch_size)], dtype=np.int64)
        span = np.searchsorted(self._windows_before, w, side="right") - 1
        return self.spans[span, 0] + w - self._windows_before[span]

    def _arrays(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(x, y, t or None) of a step as int64 arrays (B_local, T)."""
        shape = (self.local_batch_size, self.block_size)
        x, y = np.empty(shape, np.int64), np.empty(shape, np.int64)
        t = np.empty(shape, np.int64) if self.tipa else None
        for i, s in enumerate(self._starts(step)):
            window = self._tokens[s:s + self.block_size + 1]
            x[i], y[i] = window[:-1], window[1:]
            if t is not None:
                t[i] = self._tipa_row(s)
        return x, y, t

    def _tipa_row(self, start: int) -> np.ndarray:
        if self.tipa_scope == "window":
            return window_positions(self.block_size, self.tipa_max)
        end = min(start + self.block_size + 1 + self.tipa_max, self.n_tokens)  # read ahead to end the last word
        return reverse_positions(self._tokens[start + 1:end], self.tipa_max, self.word)[:self.block_size]


class BatchLoader(NumpyBatchLoader):
    """The C++-backed loader: the reference's batches, built ahead by ``threads`` background threads
    (1..MAX_THREADS, default min(4, available cores)); the NumPy reference when charlm._loader is not built."""

    def __init__(self, *args, threads=None, **kwargs):
        if threads is not None:
            _check_int("threads", threads, 1, MAX_THREADS)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = min(4, cores) if threads is None else int(threads)
        super().__init__(*args, **kwargs)

    def _open(self) -> None:
        super()._open()
        self._impl = None
        if _loader is None:
            warnings.warn("charlm._loader is not built (pip install -e .): using the slow NumPy reference "
                          "loader", stacklevel=4)
            return
        tipa_mode = {False: 0, True: 1 + SCOPES.index(self.tipa_scope)}[self.tipa]
        word = np.zeros(np.iinfo(self.dtype).max + 1, dtype=np.uint8)  # a table no token id can overrun
        word[:self.vocab_size] = self.word
        self._impl = _loader.Loader(
            str(self.path), self.dtype.itemsize, self.n_tokens, word, np.ascontiguousarray(self.spans[:, :2]),
            self.batch_size, self.block_size, self.rank, self.world_size, self.seed, tipa_mode, self.tipa_max,
            self.threads)
        # Join the threads when the loader is collected or at interpreter exit, whichever comes first.
        weakref.finalize(self, self._impl.close)

    @property
    def backend(self) -> str:
        return "numpy" if self._impl is None else "c++"

    def _max_token(self) -> int:
        return super()._max_token() if self._impl is None else self._impl.max_token()

    def _arrays(self, step: int):
        if self._impl is None:
            return super()._arrays(step)
        return self._impl.batch(step)  # numpy arrays owning the C++ buffers: no copy


# ----------------------------------------------------------------------------------------------------
# Argument checks: every value reaching C++ fits its type there

def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")


def _check_args(batch_size, block_size, seed, rank, world_size, tipa, tipa_max, tipa_scope, pin_memory) -> None:
    for name, value in (("tipa", tipa), ("pin_memory", pin_memory)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    _check_choice("tipa_scope", tipa_scope, SCOPES)
    for name, value in (("batch_size", batch_size), ("block_size", block_size), ("world_size", world_size)):
        _check_int(name, value, 1)
    batch_size, block_size, world_size = int(batch_size), int(block_size), int(world_size)  # no NumPy wrap-around
    _check_int("seed", seed, 0, _M64)
    _check_int("rank", rank, 0, world_size - 1)
    _check_int("tipa_max", tipa_max, 1, 255)  # targets are uint8
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    batch_bytes = (3 if tipa else 2) * 8 * (batch_size // world_size) * block_size
    if batch_bytes > MAX_BATCH_BYTES:
        raise ValueError(f"batch_size {batch_size} x block_size {block_size} needs {batch_bytes} bytes per batch "
                         f"on each of {world_size} rank(s) (x, y{', t' if tipa else ''} as int64), over the limit "
                         f"of {MAX_BATCH_BYTES} ({MAX_BATCH_BYTES / 2**30:g} GiB)")
    if pin_memory and not torch.cuda.is_available():
        raise ValueError("pin_memory=True needs CUDA (pinned memory is for host-to-GPU copies)")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_spans(spans, n_tokens: int, path: Path) -> np.ndarray:
    """spans as an int64 (N, 2+) array inside the split; None means the whole split."""
    if spans is None:
        return np.array([[0, n_tokens]], dtype=np.int64)
    spans = np.asarray(spans)
    if len(spans) == 0:
        raise ValueError(f"spans for {path}: empty span list")
    if spans.ndim != 2 or spans.shape[1] not in (2, 3) or spans.dtype.kind not in "iu":
        raise ValueError(f"spans for {path}: expected integer rows (start, length[, category]), got "
                         f"{spans.dtype} array of shape {spans.shape}")
    spans = spans.astype(np.int64)
    start, length = spans[:, 0], spans[:, 1]
    bad = np.flatnonzero((start < 0) | (length < 0) | (start > n_tokens - length))
    if len(bad):
        raise ValueError(f"spans for {path}: row {bad[0]} (start {start[bad[0]]}, length {length[bad[0]]}) "
                         f"is not inside the split of {n_tokens} tokens")
    return spans

