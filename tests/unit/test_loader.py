"""charlm.loader: the NumPy reference against the documented definitions, then the C++ loader against the
reference element for element. Datasets are tiny folders written by the tests themselves."""
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from charlm import loader as loader_module
from charlm.loader import MAX_THREADS, BatchLoader, NumpyBatchLoader, window_index
from charlm.tipa import reverse_positions, window_positions

needs_ext = pytest.mark.skipif(loader_module._loader is None,
                               reason="charlm._loader is not built (pip install -e . --no-build-isolation)")
pytestmark = pytest.mark.filterwarnings("ignore:charlm._loader is not built")


def write_dataset(root, splits: dict, tokenization="bytes", vocab_size=256):
    """A prepared dataset folder in charlm.data's format; splits maps a name to a token array."""
    root.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if tokenization == "bytes" else np.uint16
    for name, tokens in splits.items():
        np.asarray(tokens, dtype=dtype).tofile(root / f"{name}.bin")
    meta = {"format": 1, "tokenization": tokenization, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
            "chars": None if tokenization == "bytes" else list(range(32, 32 + vocab_size)),
            "splits": {name: len(tokens) for name, tokens in splits.items()}, "source": {"name": "test"}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def text_like(n: int, seed: int) -> np.ndarray:
    """Bytes with words of varied length (some longer than tipa_max), spaces, punctuation, UTF-8 bytes."""
    alphabet = np.frombuffer(b"etaoinshrdlu0123456789 .,\n[]" + bytes(range(0xC3, 0xC6)) + b"    ", np.uint8)
    rng = np.random.default_rng(seed)
    tokens = alphabet[rng.integers(0, len(alphabet), n)]
    for start in rng.integers(0, n - 40, n // 200):  # a few long words
        tokens[start:start + rng.integers(17, 40)] = ord("x")
    return tokens


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    """Bytes dataset; the val split ends inside a word, so read-ahead must stop at the split's end."""
    val = text_like(700, 2)
    val[-5:] = ord("w")
    return write_dataset(tmp_path_factory.mktemp("bytes"), {"train": text_like(5000, 1), "val": val,
                                                            "test": text_like(300, 3)})


@pytest.fixture(scope="module")
def unicode_data(tmp_path_factory):
    """Unicode dataset whose token id at offset i is i % vocab_size, so x[i, 0] reveals a row's start."""
    vocab = 3000
    splits = {"train": np.arange(6000) % vocab, "val": np.arange(2500) % vocab, "test": np.arange(100)}
    return write_dataset(tmp_path_factory.mktemp("unicode"), splits, "unicode", vocab)


def tokens_of(data_dir, split):
    meta = json.loads((data_dir / "meta.json").read_text())
    return np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)


def as_numpy(batch):
    return tuple(None if b is None else b.numpy() for b in batch)


# ----------------------------------------------------------------------------------------------------
# The reference against the definitions

@pytest.mark.parametrize("tipa_max", [4, 16])
def test_random_batch_matches_definition(byte_data, tipa_max):
    B, T, seed = 6, 32, 7
    loader = NumpyBatchLoader(byte_data, "val", B, T, seed=seed, tipa=True, tipa_max=tipa_max)
    tokens = tokens_of(byte_data, "val")
    targets = reverse_positions(tokens, tipa_max)
    for step in (0, 1, 99):
        x, y, t = as_numpy(loader.batch(step))
        assert x.shape == y.shape == t.shape == (B, T) and x.dtype == y.dtype == t.dtype == np.int64
        for i in range(B):
            s = window_index(seed, step, i, len(tokens) - T)
            np.testing.assert_array_equal(x[i], tokens[s:s + T])
            np.testing.assert_array_equal(y[i], tokens[s + 1:s + T + 1])
            np.testing.assert_array_equal(t[i], targets[s + 1:s + T + 1])


def test_word_running_to_split_end(byte_data):
    tokens = tokens_of(byte_data, "val")
    T = len(tokens) - 1  # one window only: start 0, its last targets are the split's final word
    _, _, t = as_numpy(NumpyBatchLoader(byte_data, "val", 2, T, tipa=True).batch(0))
    assert t[0, -5:].tolist() == [5, 4, 3, 2, 1]
    np.testing.assert_array_equal(t[0], reverse_positions(tokens)[1:])


def test_window_scope(byte_data):
    _, _, t = as_numpy(NumpyBatchLoader(byte_data, "train", 3, 20, tipa=True, tipa_scope="window").batch(4))
    np.testing.assert_array_equal(t, np.broadcast_to(window_positions(20, 16), (3, 20)))


def test_pure_function_of_step(byte_data):
    def make(seed):
        return NumpyBatchLoader(byte_data, "train", 8, 16, seed=seed, tipa=True)

    a, b = make(1), make(1)
    for step in (3, 0, 3):
        a.batch(step)
    for u, v in zip(a.batch(5), b.batch(5)):
        assert torch.equal(u, v)
    x, y, _ = a.batch(5)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, a.batch(6)[0]) and not torch.equal(x, make(2).batch(5)[0])


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_make_the_global_batch(byte_data, world_size):
    args = (byte_data, "train", 8, 16)
    whole = NumpyBatchLoader(*args, seed=3, tipa=True).batch(11)
    parts = [NumpyBatchLoader(*args, seed=3, tipa=True, rank=r, world_size=world_size).batch(11)
             for r in range(world_size)]
    for k in range(3):
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])


def test_spans_respected_and_all_reachable(unicode_data):
    T = 8
    spans = np.array([[0, 20, 0], [50, 10, 1], [100, 400, 0], [600, 5, 2], [900, 9, 1]])  # span 3 too short
    loader = NumpyBatchLoader(unicode_data, "train", 16, T, spans=spans, seed=5)
    starts = np.concatenate([loader.batch(step)[0][:, 0].numpy() for step in range(200)])
    span = np.searchsorted(spans[:, 0], starts, side="right") - 1
    assert np.all(starts + T + 1 <= spans[span, 0] + spans[span, 1])
    counts = np.bincount(span, minlength=len(spans))
    windows = np.maximum(spans[:, 1] - T, 0)  # 12, 2, 392, 0, 1
    assert counts[3] == 0 and np.all(counts[windows > 0] > 0)
    expected = len(starts) * windows / windows.sum()
    assert abs(counts[2] - expected[2]) < 0.05 * expected[2]


# ----------------------------------------------------------------------------------------------------
# Bad input: each gets a ValueError naming the input, from both loaders

LOADERS = [NumpyBatchLoader, pytest.param(BatchLoader, marks=needs_ext)]


@pytest.mark.parametrize("cls", LOADERS)
@pytest.mark.parametrize("change, kwargs, match", [
    ("missing_meta", {}, r"no prepared dataset at .*/d: prepare it"),
    ("missing_bin", {}, r"val\.bin: expected 700 bytes \(700 tokens\), found no file"),
    ("truncated", {}, r"val\.bin: expected 700 bytes \(700 tokens\), found 699"),
    ("bad_meta", {}, r"meta\.json: expected format 1 with tokenization/dtype"),
    (None, {"split": "dev"}, r"no split 'dev'"),
    (None, {"block_size": 700}, r"val\.bin: split 'val' has 700 tokens, fewer than one window"),
    (None, {"block_size": 0}, r"block_size must be an int >= 1"),
    (None, {"batch_size": 6, "world_size": 4, "rank": 1}, r"batch_size 6 is not divisible by world_size 4"),
    (None, {"rank": 2, "world_size": 2}, r"rank must be an int in 0..1, got 2"),
    (None, {"spans": np.zeros((0, 3), np.int64)}, r"empty span list"),
    (None, {"spans": [[0, 8], [600, 101]]}, r"row 1 \(start 600, length 101\) is not inside the split of 700"),
    (None, {"spans": [[0, 8], [100, 16]]}, r"none holds a window of block_size \+ 1 = 17"),
    (None, {"spans": [0, 100]}, r"expected integer rows"),
    (None, {"tipa_scope": "sentence"}, r"tipa_scope must be one of"),
    (None, {"tipa": "yes"}, r"tipa must be True or False, got 'yes'"),
    ("bytes_vocab", {}, r"meta\.json: bytes tokenization has vocab_size 256, got 100"),
])
def test_bad_input(tmp_path, cls, change, kwargs, match):
    data = write_dataset(tmp_path / "d", {"train": text_like(800, 0), "val": text_like(700, 0)})
    if change == "missing_meta":
        (data / "meta.json").unlink()
    elif change == "missing_bin":
        (data / "val.bin").unlink()
    elif change == "truncated":
        (data / "val.bin").write_bytes((data / "val.bin").read_bytes()[:-1])
    elif change == "bad_meta":
        meta = json.loads((data / "meta.json").read_text())
        (data / "meta.json").write_text(json.dumps({**meta, "tokenization": "unicode"}))
    elif change == "bytes_vocab":
        meta = json.loads((data / "meta.json").read_text())
        (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100}))
    args = {"split": "val", "batch_size": 4, "block_size": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(data, args.pop("split"), args.pop("batch_size"), args.pop("block_size"), **args)


@pytest.mark.parametrize("cls", LOADERS)
def test_token_id_out_of_vocabulary(tmp_path, cls):
    tokens = np.arange(40) % 10
    tokens[33] = 12
    data = write_dataset(tmp_path / "d", {"train": tokens}, "unicode", vocab_size=10)
    with pytest.raises(ValueError, match=r"train\.bin: token id 12 >= vocab_size 10"):
        cls(data, "train", 2, 4)


# ----------------------------------------------------------------------------------------------------
# Hostile input, 6 kinds in 36 cases, each refused with an error naming what was wrong and the process
# intact: integer arguments that overflow C++ types or are not ints (17, both loaders), steps (5), thread
# counts (9), batches too large to allocate (3), a token file whose size changed before C++ mapped it (1),
# and threads that cannot start (1). A truncated token file at construction is a case of test_bad_input.

@pytest.mark.parametrize("cls", LOADERS)
@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 2**64}, r"batch_size 18446744073709551616 x block_size 16 needs"),
    ({"batch_size": 4.0}, r"batch_size must be an int >= 1, got 4\.0"),
    ({"batch_size": True}, r"batch_size must be an int >= 1, got True"),
    ({"batch_size": "4"}, r"batch_size must be an int >= 1, got '4'"),
    ({"block_size": 2**63}, r"batch_size 4 x block_size 9223372036854775808 needs"),
    ({"block_size": np.float64(16)}, r"block_size must be an int >= 1"),
    ({"seed": 2**64}, r"seed must be an int in 0..18446744073709551615, got 18446744073709551616"),
    ({"seed": -1}, r"seed must be an int in 0..18446744073709551615, got -1"),
    ({"seed": 1.5}, r"seed must be an int in 0"),
    ({"rank": 2**63}, r"rank must be an int in 0..0, got 9223372036854775808"),
    ({"rank": -1}, r"rank must be an int in 0..0, got -1"),
    ({"world_size": 2**64}, r"batch_size 4 is not divisible by world_size 18446744073709551616"),
    ({"world_size": 0.5}, r"world_size must be an int >= 1, got 0\.5"),
    ({"tipa_max": 256}, r"tipa_max must be an int in 1..255, got 256"),
    ({"tipa_max": 2**31}, r"tipa_max must be an int in 1..255, got 2147483648"),
    ({"tipa_max": 4.0}, r"tipa_max must be an int in 1..255, got 4\.0"),
    ({"pin_memory": 1}, r"pin_memory must be True or False, got 1"),
])
def test_hostile_arguments(byte_data, cls, kwargs, match):
    args = {"batch_size": 4, "block_size": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(byte_data, "train", args.pop("batch_size"), args.pop("block_size"), **args)


@pytest.mark.parametrize("step", [-1, 2**63, 1.5, True, np.float64(3)])
def test_hostile_steps(byte_data, step):
    loader = BatchLoader(byte_data, "train", 4, 16)
    with pytest.raises(ValueError, match=r"step must be an int in 0..9223372036854775807, got "):
        loader.batch(step)


@pytest.mark.parametrize("threads", [0, -1, MAX_THREADS + 1, 2000, 2**31, 2**64, 2.0, True, "4"])
def test_hostile_thread_counts(byte_data, threads):
    with pytest.raises(ValueError, match=rf"threads must be an int in 1..{MAX_THREADS}, got {threads!r}"):
        BatchLoader(byte_data, "train", 4, 16, threads=threads)


@pytest.mark.parametrize("cls", LOADERS)
def test_batches_over_the_memory_bound(unicode_data, cls):
    """MAX_BATCH_BYTES (1 GiB) bounds one rank's x and y (512 tokens x 16 bytes per row here): 2**17 rows
    are allowed, one more is refused naming both sizes, and 2 ranks may take twice as many."""
    cls(unicode_data, "train", 2**17, 512)  # builds nothing yet: construction allocates no batch
    with pytest.raises(ValueError, match=r"batch_size 131073 x block_size 512 needs 1073750016 bytes per batch "
                                         r"on each of 1 rank\(s\) \(x, y as int64\), over the limit of "
                                         r"1073741824 \(1 GiB\)"):
        cls(unicode_data, "train", 2**17 + 1, 512)
    cls(unicode_data, "train", 2**18, 512, world_size=2, rank=1)


@needs_ext
def test_token_file_changed_before_mapping(byte_data):
    """The C++ loader checks the mapped file's size itself: a file that changed after meta.json was checked
    is refused, not read past its end."""
    with pytest.raises(ValueError, match=r"train\.bin: holds 5000 tokens, expected 5001"):
        loader_module._loader.Loader(
            path=str(byte_data / "train.bin"), itemsize=1, n_tokens=5001, word=np.zeros(256, np.uint8),
            spans=np.array([[0, 5000]], np.int64), batch_size=4, block_size=16, rank=0, world_size=1, seed=0,
            tipa=0, tipa_max=16, threads=1)


THREADS_CANNOT_START = """
import json, os, resource, sys
import torch
from charlm.loader import MAX_THREADS, BatchLoader, NumpyBatchLoader

def vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

threads_now = lambda: len(os.listdir("/proc/self/task"))
warm = BatchLoader(sys.argv[1], "train", 4, 16, threads=1)  # first-time allocations (a malloc arena)
base = vm_size()
probe = BatchLoader(sys.argv[1], "train", 4, 16, threads=1)
per_thread = vm_size() - base  # the stack of one more thread
del warm, probe
before = threads_now()
limits = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + 16 * per_thread, limits[1]))  # room for 16 threads, not 64
try:
    BatchLoader(sys.argv[1], "train", 4, 16, threads=MAX_THREADS)
    error = None
except OSError as e:
    error = str(e)
resource.setrlimit(resource.RLIMIT_AS, limits)
left = threads_now() - before
fast = BatchLoader(sys.argv[1], "train", 4, 16, tipa=True, threads=2)
reference = NumpyBatchLoader(sys.argv[1], "train", 4, 16, tipa=True)
works = [torch.equal(a, b) for a, b in zip(fast.batch(5), reference.batch(5))]
print(json.dumps({"error": error, "threads_left": left, "works_after": works}))
"""


@needs_ext
def test_threads_that_cannot_start(byte_data):
    """Under an address-space limit with room for 16 thread stacks, threads=64 fails part way: OSError
    naming the thread, the threads already started joined, the interpreter alive and loaders usable."""
    done = subprocess.run([sys.executable, "-c", THREADS_CANNOT_START, str(byte_data)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    started = re.fullmatch(rf"could not start loader thread (\d+) of {MAX_THREADS} \(lower threads\): .+",
                           result["error"] or "")
    assert started and int(started[1]) >= 2, result  # some threads had started: the join path ran
    assert result["threads_left"] == 0 and result["works_after"] == [True, True, True], result


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_pin_memory_needs_cuda(byte_data):
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        NumpyBatchLoader(byte_data, "train", 2, 8, pin_memory=True)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", LOADERS)
def test_pin_memory(byte_data, cls):
    loader = cls(byte_data, "train", 4, 16, tipa=True, pin_memory=True)
    batch = loader.batch(3)
    assert all(b.is_pinned() for b in batch)
    reference = NumpyBatchLoader(byte_data, "train", 4, 16, tipa=True).batch(3)
    assert all(torch.equal(a, b) for a, b in zip(batch, reference))
    assert torch.equal(batch[0].cuda(non_blocking=True).cpu(), reference[0])


# ----------------------------------------------------------------------------------------------------
# The C++ loader against the reference

def test_falls_back_to_reference_without_extension(byte_data, monkeypatch):
    monkeypatch.setattr(loader_module, "_loader", None)
    with pytest.warns(UserWarning, match="charlm._loader is not built"):
        loader = BatchLoader(byte_data, "train", 4, 16, tipa=True)
    assert loader.backend == "numpy"
    reference = NumpyBatchLoader(byte_data, "train", 4, 16, tipa=True)
    assert all(torch.equal(a, b) for a, b in zip(loader.batch(3), reference.batch(3)))


@pytest.mark.skipif(os.environ.get("CHARLM_REQUIRE_EXT") != "1", reason="CHARLM_REQUIRE_EXT=1 not set")
def test_extension_is_built():
    from charlm import _loader  # noqa: F401  (fails loudly: CI must test the C++ loader)
    assert loader_module._loader is not None


CASES = {  # name: (dataset fixture, split, B, T, loader kwargs)
    "bytes": ("byte_data", "train", 8, 64, {}),
    "bytes-tipa": ("byte_data", "val", 6, 100, {"tipa": True, "tipa_max": 5}),
    "bytes-tipa-end": ("byte_data", "val", 4, 690, {"tipa": True}),
    "bytes-window": ("byte_data", "train", 4, 33, {"tipa": True, "tipa_scope": "window", "seed": 2**64 - 1}),
    "bytes-ranks": ("byte_data", "train", 8, 16, {"tipa": True, "rank": 3, "world_size": 4, "seed": 11}),
    "unicode": ("unicode_data", "train", 5, 31, {"seed": 4}),
    "unicode-tipa": ("unicode_data", "val", 3, 7, {"tipa": True, "tipa_max": 255}),
    "unicode-spans": ("unicode_data", "train", 8, 8,
                      {"spans": [[0, 20, 0], [50, 10, 1], [100, 400, 0], [600, 5, 2], [5990, 10, 1]],
                       "tipa": True}),
}


@needs_ext
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_cpp_matches_reference(request, case, threads):
    fixture, split, B, T, kwargs = CASES[case]
    data = request.getfixturevalue(fixture)
    fast = BatchLoader(data, split, B, T, threads=threads, **kwargs)
    reference = NumpyBatchLoader(data, split, B, T, **kwargs)
    assert fast.backend == "c++"
    for step in (0, 1, 2, 3, 1000, 2, 2**40, 2**63 - 1):  # in order, jumps, revisits, the last step
        for a, b in zip(fast.batch(step), reference.batch(step)):
            assert (a is None and b is None) or torch.equal(a, b), (case, step)


@needs_ext
def test_cpp_loaders_shut_down_cleanly(byte_data):
    """Loaders dropped mid-prefetch join their threads at once; batches outlive their loader."""
    def threads_now():
        return len(os.listdir("/proc/self/task"))  # the OS threads of this process (Linux)

    before, kept = threads_now(), []
    for threads in (1, 2, 4) * 3:
        loader = BatchLoader(byte_data, "train", 16, 128, tipa=True, threads=threads)
        assert threads_now() == before + threads
        kept.append(loader.batch(0))
        del loader
        assert threads_now() == before
    expected = NumpyBatchLoader(byte_data, "train", 16, 128, tipa=True).batch(0)
    assert all(torch.equal(a, b) for batch in kept for a, b in zip(batch, expected))


@needs_ext
def test_cpp_loaders_alive_at_exit_do_not_hang(byte_data):
    code = ("from charlm.loader import BatchLoader\n"
            f"loaders = [BatchLoader({str(byte_data)!r}, 'train', 64, 512, tipa=True, threads=4) for _ in range(4)]\n"
            "for loader in loaders: loader.batch(0)\n"
            "loaders.append(loaders)  # a reference cycle: collected, if ever, only at exit\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@needs_ext
def test_batches_are_built_without_the_gil(tmp_path):
    """Another Python thread runs while batch() builds a batch: the C++ side releases the GIL.

    With a switch interval of an hour the interpreter never takes the GIL from the main thread, and the
    counting thread yields it at every increment: the counter can move only while the main thread has
    released it, i.e. inside the C++ call. Were the GIL held there, it would not move at all."""
    data = write_dataset(tmp_path / "d", {"train": text_like(300_000, 1)})
    loader = BatchLoader(data, "train", 16, 65536, tipa=True, threads=1)  # 1M tokens: a call of many ms
    counter, done = [0], threading.Event()

    def count():
        while not done.is_set():
            counter[0] += 1
            time.sleep(0)  # hands the GIL back to the main thread whenever it waits for it

    interval = sys.getswitchinterval()
    sys.setswitchinterval(3600)
    counting = threading.Thread(target=count)
    try:
        counting.start()
        moved = []
        # Steps far apart: nothing prefetched, each built in the call. On a loaded machine the counting
        # thread may not be scheduled in time during one call; in one of twenty, it will.
        for step in range(0, 200_000, 10_000):
            before = counter[0]
            loader.batch(step)
            moved.append(counter[0] - before)
            if moved[-1] > 0:
                break
    finally:
        done.set()
        counting.join()
        sys.setswitchinterval(interval)
    assert sum(moved) > 0, moved
