"""The benchmark scripts run end to end on the CPU (smoke tests: figures are not checked, the plumbing is)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
pytestmark = pytest.mark.integration


def run_bench(*args):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_train_bench_compares_both_configurations_on_the_cpu():
    out = run_bench(BENCH / "train.py", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                    "--cases", "rope", "--no-history")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("case"))
    assert header.split() == ["case", "impl", "ms", "tokens_per_s", "mfu", "peak_mem_gb", "micro_batch", "speedup"]
    rows = [line.split() for line in lines if line.startswith("rope ")]
    assert [r[1] for r in rows] == ["baseline", "charlm"] and float(rows[0][-1]) == 1.0
    assert "MFU = (6 N + 6 n_layer block_size n_embd)" in out


def test_train_bench_needs_a_gpu_without_tiny(monkeypatch):
    out = run_bench(BENCH / "train.py", "--no-history")
    assert "no CUDA GPU" in out
