"""Batches of training windows from a prepared dataset: the C++ loader and its NumPy reference.

    loader = BatchLoader("data/enwik8", "train", batch_size=64, block_size=512, seed=1337, tipa=True)
    x, y, t = loader.batch(step)   # int64 CPU tensors (B_local, T); t is None without TIPA

``NumpyBatchLoader`` is the reference: short, slow, obviously right. ``BatchLoader`` gives the same
batches element for element from the C++ extension ``charlm._loader`` (a shared mmap of the token file,
background threads that build the next batches while the caller trains, GIL released); when the
extension is not built it warns and falls back to the reference.

Random order (training). A window is T + 1 consecutive tokens inside one span (default: one span, the
whole split): x = window[0:T], y = window[1:T+1]. Every window start in every span is equally likely;
spans shorter than T + 1 tokens hold none and are skipped. Row i of the global batch at a step is
window number floor(u * W / 2**64) of the W windows (numbered span by span in the order given, by start
within a span), where
u = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ i) in unsigned 64-bit arithmetic: a pure function
of (seed, step, i), so a batch never depends on earlier calls, resuming needs no state, and rank r of
world_size ranks taking global rows r*B/W .. (r+1)*B/W - 1 sees exactly its slice of the one-process batch.

Sequential order (evaluation). Each span is cut into consecutive windows starting at offsets 0, T, 2T, ...
within it, so every target in it (every token but its first) is predicted exactly once; row i of step s
is window s*B + i. Where a window runs past its span's end, and in the rows after the last window,
x is padded with 0 and y and t with IGNORE_INDEX (-100, F.cross_entropy's default ignore_index), so
shapes stay fixed and padding drops out of any loss. ``num_batches`` = ceil(windows / B). Here spans of
any length >= 2 take part, so a per-category evaluation covers all of its text.

TIPA (``tipa=True``): t holds the reverse positions (charlm.tipa) of the targets y. Scope "word" gives
t[i, j] = reverse_positions(split)[s + 1 + j] for a window starting at s: words running past the window's
end are completed by reading ahead in the split, at most tipa_max tokens, since longer look-ahead could
not change a clipped value; the split's end ends a word. Scope "window" gives min(T - j, tipa_max).

Bad input (missing or truncated files, token ids >= vocab_size, a split or spans that hold no window,
bad sizes) raises ValueError naming the input, before any batch is built. Token ids are checked when a
loader opens a split, by a full scan (in C++ once per memory mapping, which the loaders of a file share,
about 20 ms for 90M uint16 tokens; skipped where the token dtype cannot hold an id >= vocab_size, as for bytes).
"""
import os
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from charlm.data import load_meta
from charlm.loss import IGNORE_INDEX
from charlm.tipa import SCOPES, reverse_positions, window_positions, word_table

try:
    from charlm import _loader
except ImportError:
    _loader = None

ORDERS = ("random", "sequential")
MAX_BATCH_TOKENS = 2**40  # per batch: far beyond any memory, and 3x it still fits int64 (csrc/loader.cpp)
DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
_M64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------
# The prepared dataset

def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared dataset (charlm.data.load_meta checks it against the token files), checked
    for what the loader relies on: the token dtype and a vocabulary that fits it."""
    meta = load_meta(Path(data_dir))
    path = Path(data_dir) / "meta.json"
    expected = {"bytes": "uint8", "unicode": "uint16"}
    if meta.get("format") != 1 or expected.get(meta.get("tokenization")) != meta.get("dtype"):
        raise ValueError(f"{path}: expected format 1 with tokenization/dtype bytes/uint8 or unicode/uint16, "
                         f"got format={meta.get('format')!r}, tokenization={meta.get('tokenization')!r}, "
                         f"dtype={meta.get('dtype')!r}")
    limit = np.iinfo(DTYPES[meta["dtype"]]).max + 1
    if not isinstance(meta.get("vocab_size"), int) or not 1 <= meta["vocab_size"] <= limit:
        raise ValueError(f"{path}: vocab_size must be an int in 1..{limit}, got {meta.get('vocab_size')!r}")
    if meta["tokenization"] == "bytes" and meta["vocab_size"] != 256:
        raise ValueError(f"{path}: bytes tokenization has vocab_size 256, got {meta['vocab_size']}")
    if meta["tokenization"] == "unicode" and len(meta.get("chars") or ()) != meta["vocab_size"]:
        raise ValueError(f"{path}: chars must list vocab_size = {meta['vocab_size']} code points")
    return meta


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


def windows_per_span(lengths: np.ndarray, block_size: int, order: str) -> np.ndarray:
    """How many windows each span holds: starts of T + 1 tokens (random), or cuts every T (sequential)."""
    if order == "random":
        return np.maximum(lengths - block_size, 0)
    return (np.maximum(lengths - 1, 0) + block_size - 1) // block_size


# ----------------------------------------------------------------------------------------------------
# The loaders

class NumpyBatchLoader:
    """The reference loader (see the module docstring); ``threads`` is accepted and ignored."""

    def __init__(self, data_dir, split, batch_size, block_size, *, seed=0, rank=0, world_size=1, tipa=False,
                 tipa_max=16, tipa_scope="word", spans=None, threads=None, order="random", pin_memory=False):
        _check_sizes(batch_size, block_size, rank, world_size, seed, threads)
        _check_choice("order", order, ORDERS)
        _check_choice("tipa_scope", tipa_scope, SCOPES)
        if not isinstance(tipa, bool):
            raise ValueError(f"tipa must be True or False, got {tipa!r}")
        if not isinstance(tipa_max, (int, np.integer)) or not 1 <= tipa_max <= 255:
            raise ValueError(f"tipa_max must be in 1..255 (targets are uint8), got {tipa_max}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (pinned memory is for host-to-GPU copies)")
        self.meta = read_meta(data_dir)
        self.vocab_size = self.meta["vocab_size"]
        self.path, self.n_tokens = split_file(data_dir, split, self.meta)
        if self.n_tokens < block_size + 1:
            raise ValueError(f"{self.path}: split {split!r} has {self.n_tokens} tokens, fewer than one window "
                             f"of block_size + 1 = {block_size + 1}")
        self.dtype = np.dtype(DTYPES[self.meta["dtype"]])
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size, self.local_batch_size = rank, world_size, batch_size // world_size
        self.tipa, self.tipa_max, self.tipa_scope = tipa, tipa_max, tipa_scope
        self.order, self.pin_memory = order, pin_memory
        self.word = word_table(self.meta)
        self.spans = _check_spans(spans, self.n_tokens, self.path)
        self.span_windows = windows_per_span(self.spans[:, 1], block_size, order)
        self._windows_before = np.cumsum(self.span_windows) - self.span_windows  # first window of each span
        self.num_windows = int(self.span_windows.sum())
        if self.num_windows == 0:
            raise ValueError(f"spans for {self.path}: none holds a window of block_size + 1 = {block_size + 1} "
                             f"tokens (longest span: {self.spans[:, 1].max()})")
        self._open()
        # A full scan, done once: skipped where the dtype cannot hold an id >= vocab_size (bytes).
        if np.iinfo(self.dtype).max >= self.vocab_size and (top := self._max_token()) >= self.vocab_size:
            raise ValueError(f"{self.path}: token id {top} >= vocab_size {self.vocab_size} (corrupt or not "
                             f"matching meta.json)")

    @property
    def num_batches(self) -> int | None:
        """Batches in one pass (sequential order); None in random order, which has no end."""
        if self.order == "random":
            return None
        return -(-self.num_windows // self.batch_size)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a random-order loader has no length (batches are drawn without end)")
        return self.num_batches

    def batch(self, step: int):
        """(x, y, t) of a step: int64 CPU tensors (B_local, T), pinned with pin_memory; t None without TIPA."""
        shape = (self.local_batch_size, self.block_size)
        x, y, t = (torch.empty(shape, dtype=torch.int64, pin_memory=self.pin_memory) for _ in range(3))
        t = t if self.tipa else None
        self.batch_into(step, x, y, t)
        return x, y, t

    def batch_into(self, step: int, x, y, t=None) -> None:
        """Write a step's batch into caller-provided buffers: CPU tensors or arrays (B_local, T),
        int32 or int64, C-contiguous; t is required with TIPA and must be None without."""
        self._check_step(step)
        if (t is not None) != self.tipa:
            raise ValueError(f"batch_into: t must be {'a buffer' if self.tipa else 'None'} with tipa={self.tipa}")
        buffers = [self._check_buffer(name, b) for name, b in (("x", x), ("y", y), ("t", t)) if b is not None]
        self._fill(step, *buffers)

    # -- the reference implementation ---------------------------------------------------------------

    def _open(self) -> None:
        self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def _max_token(self) -> int:
        return int(self._tokens.max())

    def _rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(start, number of valid targets) of each of this rank's rows at a step."""
        first = self.rank * self.local_batch_size
        rows = np.arange(first, first + self.local_batch_size)
        if self.order == "random":
            w = np.array([window_index(self.seed, step, r, self.num_windows) for r in rows], dtype=np.int64)
        else:
            w = step * self.batch_size + rows
        past_end = w >= self.num_windows
        w = np.minimum(w, self.num_windows - 1)
        span = np.searchsorted(self._windows_before, w, side="right") - 1
        j = w - self._windows_before[span]  # window number within the span
        span_start, span_length = self.spans[span, 0], self.spans[span, 1]
        if self.order == "random":
            return span_start + j, np.full_like(j, self.block_size)
        start = span_start + j * self.block_size
        valid = np.minimum(self.block_size, span_length - 1 - j * self.block_size)
        return start, np.where(past_end, 0, valid)

    def _fill(self, step: int, x: np.ndarray, y: np.ndarray, t: np.ndarray | None = None) -> None:
        for i, (s, v) in enumerate(zip(*self._rows(step))):
            window = self._tokens[s:s + v + 1]
            x[i, :v], y[i, :v] = window[:-1], window[1:]
            x[i, v:], y[i, v:] = 0, IGNORE_INDEX
            if t is not None:
                t[i, :v] = self._tipa_row(s, v)
                t[i, v:] = IGNORE_INDEX

    def _tipa_row(self, start: int, valid: int) -> np.ndarray:
        if self.tipa_scope == "window":
            return window_positions(self.block_size, self.tipa_max)[:valid]
        end = min(start + valid + 1 + self.tipa_max, self.n_tokens)  # read ahead to complete the last word
        return reverse_positions(self._tokens[start + 1:end], self.tipa_max, self.word)[:valid]

    # -- argument checks ----------------------------------------------------------------------------

    def _check_step(self, step: int) -> None:
        if not isinstance(step, (int, np.integer)) or not 0 <= step < 2**63:
            raise ValueError(f"step must be an int in 0..2**63-1, got {step!r}")
        if self.num_batches is not None and step >= self.num_batches:
            raise IndexError(f"step {step} out of range: sequential order over {self.path} has "
                             f"{self.num_batches} batches of {self.batch_size}")

    def _check_buffer(self, name: str, buf) -> np.ndarray:
        if isinstance(buf, torch.Tensor):
            if buf.device.type != "cpu":
                raise ValueError(f"batch_into: {name} must be a CPU tensor, got device {buf.device}")
            buf = buf.numpy()
        shape = (self.local_batch_size, self.block_size)
        if not isinstance(buf, np.ndarray) or buf.shape != shape or buf.dtype not in (np.int32, np.int64) \
                or not buf.flags.c_contiguous or not buf.flags.writeable:
            raise ValueError(f"batch_into: {name} must be a writeable C-contiguous int32 or int64 buffer of "
                             f"shape {shape}, got {type(buf).__name__} {getattr(buf, 'dtype', '')} "
                             f"{getattr(buf, 'shape', '')}")
        return buf


class BatchLoader(NumpyBatchLoader):
    """The C++-backed loader: the reference's batches, built ahead by ``threads`` background threads
    (default min(4, available cores)); the NumPy reference when charlm._loader is not built."""

    def __init__(self, *args, threads=None, **kwargs):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = threads or min(4, cores)
        super().__init__(*args, threads=threads, **kwargs)

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
            self.order == "sequential", self.batch_size, self.block_size, self.rank, self.world_size,
            self.seed, tipa_mode, self.tipa_max, self.threads)
        # Join the threads when the loader is collected or at interpreter exit, whichever comes first.
        weakref.finalize(self, self._impl.close)

    @property
    def backend(self) -> str:
        return "numpy" if self._impl is None else "c++"

    def batch(self, step: int):
        if self._impl is None or self.pin_memory:
            return super().batch(step)
        self._check_step(step)
        x, y, t = self._impl.batch(step)  # numpy arrays owning the C++ buffers: no copy
        return torch.from_numpy(x), torch.from_numpy(y), None if t is None else torch.from_numpy(t)

    def _max_token(self) -> int:
        return super()._max_token() if self._impl is None else self._impl.max_token()

    def _fill(self, step, x, y, t=None) -> None:
        if self._impl is None:
            return super()._fill(step, x, y, t)
        self._impl.batch_into(step, x, y, t)


def _check_sizes(batch_size, block_size, rank, world_size, seed, threads) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("block_size", block_size, 1),
                             ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if seed >= 2**64:
        raise ValueError(f"seed must be below 2**64, got {seed}")
    if rank >= world_size:
        raise ValueError(f"rank must be in 0..world_size-1 = {world_size - 1}, got {rank}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    if batch_size * block_size > MAX_BATCH_TOKENS:
        raise ValueError(f"batch_size * block_size = {batch_size * block_size} tokens exceeds 2**40 per batch")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")


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

