"""Test set-up: without a GPU, Triton kernels run through the interpreter on the CPU.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it at decoration
time), hence here, at collection start.
"""
import os

import pytest
import torch

from corpora import THREE_TOPICS, make_corpus, make_topic_corpus

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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared byte-level dataset (data_root, name) of about 200 kB of generated text."""
    from charlm.data import prepare

    root = tmp_path_factory.mktemp("data")
    prepare(make_corpus(200_000), root / "tiny", "bytes", {"name": "tiny"})
    return root, "tiny"


@pytest.fixture(scope="session")
def topic_dataset(tmp_path_factory):
    """(data_root, name) of a prepared corpus on the three THREE_TOPICS, with a keywords categorisation."""
    from charlm.categorize import categorize
    from charlm.data import prepare

    root = tmp_path_factory.mktemp("data")
    prepare(make_topic_corpus(90, THREE_TOPICS)[0], root / "topics", "bytes")
    categorize(root / "topics", "keywords")
    return root, "topics"


@pytest.fixture
def drawn(monkeypatch) -> dict[str, list[tuple]]:
    """The data passed to matplotlib's Axes.plot and Axes.fill_between while the test runs (each still
    draws), so that plot tests check what a figure shows rather than that a PNG exists."""
    from matplotlib.axes import Axes

    calls = {"plot": [], "fill_between": []}

    def recorded(method):
        real = getattr(Axes, method)

        def draw(self, *args, **kwargs):
            calls[method].append(args)
            return real(self, *args, **kwargs)
        return draw

    for method in calls:
        monkeypatch.setattr(Axes, method, recorded(method))
    return calls


@pytest.fixture(scope="session")
def offline_cuda_compiler() -> None:
    """Skip where Triton cannot compile kernels for CUDA targets without a GPU: a Triton build without the
    NVIDIA backend or its ptxas (wheels for other platforms). CI sets CHARLM_REQUIRE_PTXAS=1, and there
    such a machine is a failure, not a skip, so the check of the kernels' register budget always runs."""
    import precompile

    reason = precompile.offline_compile_unavailable()
    if reason and os.environ.get("CHARLM_REQUIRE_PTXAS") == "1":
        pytest.fail(f"CHARLM_REQUIRE_PTXAS=1 but Triton cannot compile for CUDA targets offline: {reason}")
    if reason:
        pytest.skip(f"cannot compile for CUDA targets offline: {reason}")

