"""What bench/ measures with: --max-memory-gb's emulated card (charlm.memory.cap_process_memory), the timing
statistics, and history rows written the moment they are measured."""
import argparse
import json

import pytest
import torch

import common
from charlm import memory
from charlm.memory import GB


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of 80 GB with `used` bytes in use and `reserved` of them held by PyTorch's allocator; records the
    fraction the allocator is capped at."""
    state = {"used": 0, "reserved": 0, "fraction": None}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * GB - state["used"], 80 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: state.update(fraction=fraction))
    return state


def test_memory_outside_the_allocator_counts_against_the_emulated_card(fake_gpu):
    fake_gpu.update(used=int(1.8 * GB) + 2 * GB, reserved=2 * GB)  # 1.8 GB of context and loaded kernels
    memory.cap_process_memory("cuda:0", 40)
    assert fake_gpu["fraction"] * 80 * GB == pytest.approx(40 * GB - 1.8 * GB)


def test_outside_counts_at_least_the_plans_context(fake_gpu):
    fake_gpu.update(used=int(0.4 * GB), reserved=0)  # a fresh context: more is loaded as kernels run
    memory.cap_process_memory("cuda:0", 40)
    assert fake_gpu["fraction"] * 80 * GB == pytest.approx(40 * GB - memory.CUDA_CONTEXT_BYTES)


def test_a_card_smaller_than_what_is_outside_is_refused(fake_gpu):
    fake_gpu.update(used=3 * GB)
    with pytest.raises(ValueError, match="max_memory_gb 2 leaves no memory for tensors: 3.0 GB"):
        memory.cap_process_memory("cuda:0", 2)
    memory.cap_process_memory("cuda:0", 0)  # 0: the whole card, no cap
    assert fake_gpu["fraction"] is None


def test_timing_statistics():
    timing = common.Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.min, timing.median, timing.p80) == (1.0, 3.0, pytest.approx(4.2))
    assert common.record("x", "y", {}, timing)["ms_p80"] == pytest.approx(4.2)
    cpu = common.time_ms(lambda: sum(range(1000)), device="cpu")
    assert 0 < cpu.min <= cpu.median <= cpu.p80


def test_rows_reach_every_history_file_as_they_are_added(tmp_path):
    paths = [tmp_path / "run.jsonl", tmp_path / "history.jsonl"]
    history = common.History(argparse.Namespace(history=paths, no_history=False, run_id="r7"))
    history.add({"bench": "attn", "ms": 1.0})
    assert [json.loads(path.read_text()) for path in paths] == [{"bench": "attn", "ms": 1.0, "run": "r7"}] * 2
    history.add({"bench": "attn", "ms": 2.0})
    assert all(len(path.read_text().splitlines()) == 2 for path in paths)
    silent = common.History(argparse.Namespace(history=None, no_history=True, run_id=None))
    silent.add({"bench": "attn"})
    assert silent.paths == [] and silent.rows == [{"bench": "attn"}]
