"""Test set-up: without a GPU, Triton kernels run through the interpreter on the CPU.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it at decoration
time), hence here, at collection start.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where kernel tests run: the GPU when present, else the CPU through Triton's interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_corpus(n_bytes: int, seed: int = 0) -> bytes:
    """Wiki-like text with real structure (so a model can learn it) from a small vocabulary of words."""
    import random

    rng = random.Random(seed)
    words = ["the", "of", "and", "history", "science", "river", "city", "war", "music", "théâtre", "1984",
             "language", "king", "film", "school", "church", "[[link]]", "{{cite}}", "&amp;", "naïve"]
    out, size = [], 0
    while size < n_bytes:
        title = " ".join(rng.choice(words) for _ in range(2)).title()
        body = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        page = f"<page>\n<title>{title}</title>\n<text>{body}.\n</text>\n</page>\n"
        out.append(page)
        size += len(page.encode())
    return "".join(out).encode()[:n_bytes]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared byte-level dataset (data_root, name) of about 200 kB of generated text."""
    from charlm.data import prepare

    root = tmp_path_factory.mktemp("data")
    prepare(make_corpus(200_000), root / "tiny", "bytes", {"name": "tiny"})
    return root, "tiny"
