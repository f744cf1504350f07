"""The benchmark scripts run end to end on the CPU (smoke tests: figures are not checked, the plumbing is)."""
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
    assert "MFU = (6 (N - V n_embd) + 6 n_layer block_size n_embd)" in out


def test_train_bench_needs_a_gpu_without_tiny(monkeypatch):
    out = run_bench(BENCH / "train.py", "--no-history")
    assert "no CUDA GPU" in out


def table(out: str, first_column: str) -> list[list[str]]:
    """The rows of a printed table (header included), from its header line on."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_column])
    return [line.split() for line in lines[start:] if line.strip()]


def test_attn_bench_times_every_provider_on_the_cpu():
    out = run_bench(BENCH / "attn.py", "--cpu", "--no-history")
    header, *rows = table(out, "T")
    assert header == ["T", "D", "pass", "impl", "ms", "tflops", "peak_mem_gb", "speedup_vs_best_sdpa"]
    assert {(r[2], r[3]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd")
                                            for i in ("naive", "triton", "triton+rope", "rope+triton")}
    assert all(float(r[4]) > 0 for r in rows)
    assert "fwd = 4 * B * H * T^2 * D / 2" in out


def test_rope_bench_compares_with_eager_and_compiled_on_the_cpu():
    out = run_bench(BENCH / "rope.py", "--cpu", "--no-history")
    header, *rows = table(out, "case")
    assert header[:3] == ["case", "pass", "impl"] and "frac_of_copy_bw" in header
    assert {(r[1], r[2]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd") for i in ("eager", "compile", "triton")}
    assert all(float(r[header.index("speedup_vs_eager")]) == 1.0 for r in rows if r[2] == "eager")


def test_loader_bench_measures_the_baseline_in_the_same_run():
    out = run_bench(BENCH / "loader.py", "--synthetic-mb", "2", "--threads", "2", "--no-history")
    header, *rows = table(out, "impl")
    assert header == ["impl", "threads", "ms", "batches_per_s", "text_mb_per_s", "speedup_vs_nanogpt"]
    impls = [" ".join(r[:-5]) for r in rows]
    assert impls[:2] == ["nanogpt", "numpy-reference"] and "c++ prefetched" in impls
    assert float(rows[0][-1]) == 1.0 and all(float(r[2]) > 0 for r in rows)
