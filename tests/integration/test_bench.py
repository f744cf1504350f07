"""The benchmark scripts run end to end on the CPU (smoke tests: figures are not checked, the plumbing is)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"

pytestmark = pytest.mark.integration


def run_bench(*args):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def table(out: str, first_column: str) -> list[list[str]]:
    """The rows of a printed table (header included), from its header line on."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_column])
    return [line.split() for line in lines[start:] if line.strip()]


def history_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_bench_compares_both_configurations_on_the_cpu(tmp_path):
    history = tmp_path / "history.jsonl"
    out = run_bench(BENCH / "train.py", "--dry-run", "--cases", "rope", "--history", history, "--run-id", "r1")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("case"))
    assert header.split() == ["case", "impl", "ms", "ms_min", "ms_p80", "tokens_per_s", "mfu", "peak_mem_gb",
                              "micro_batch", "speedup"]
    rows = [line.split() for line in lines if line.startswith("rope ")]
    assert [r[1] for r in rows] == ["baseline", "charlm"] and float(rows[0][-1]) == 1.0
    assert "MFU = (6 (N - V n_embd) + 6 n_layer block_size n_embd)" in out
    assert "PyTorch references" in out  # the CPU smoke test does not go through Triton's interpreter
    recorded = history_rows(history)
    assert [(r["bench"], r["impl"], r["run"]) for r in recorded] == [("train", "baseline", "r1"),
                                                                      ("train", "charlm", "r1")]
    assert all(r["ms_min"] <= r["ms"] <= r["ms_p80"] for r in recorded)


def test_train_bench_needs_a_gpu_without_dry_run():
    out = run_bench(BENCH / "train.py", "--no-history")
    assert "no CUDA GPU" in out


def test_train_bench_rejects_an_unknown_case():
    out = subprocess.run([sys.executable, BENCH / "train.py", "--dry-run", "--cases", "deep,huge"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--cases: unknown huge" in out.stderr


def test_attn_bench_times_every_provider_on_the_cpu():
    out = run_bench(BENCH / "attn.py", "--dry-run", "--no-history")
    header, *rows = table(out, "T")
    assert header == ["T", "D", "pass", "impl", "ms", "ms_min", "ms_p80", "tflops", "peak_mem_gb",
                      "speedup_vs_best_sdpa"]
    impls = {r[3] for r in rows}
    assert {"sdpa-math", "naive", "triton", "triton+rope", "rope+triton"} <= impls
    assert impls <= {"sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "naive", "triton", "triton+rope",
                     "rope+triton"}
    assert {(r[2], r[3]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd") for i in impls}
    assert all(float(r[4]) > 0 and float(r[5]) <= float(r[4]) <= float(r[6]) for r in rows)
    for pass_ in ("fwd", "fwd+bwd"):  # the fastest SDPA backend's speed-up over itself is 1
        sdpa = [r for r in rows if r[2] == pass_ and r[3].startswith("sdpa")]
        assert float(min(sdpa, key=lambda r: float(r[4]))[-1]) == 1.0
    assert "fwd = 4 * B * H * T^2 * D / 2" in out


def test_rope_bench_compares_with_eager_and_compiled_on_the_cpu():
    out = run_bench(BENCH / "rope.py", "--dry-run", "--no-history")
    header, *rows = table(out, "case")
    assert header[:3] == ["case", "pass", "impl"] and "frac_of_copy_bw" in header
    assert {(r[1], r[2]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd") for i in ("eager", "compile", "triton")}
    assert all(float(r[header.index("speedup_vs_eager")]) == 1.0 for r in rows if r[2] == "eager")
    assert "skipping liger" in out or any(r[2] == "liger" for r in rows)  # said aloud when not importable


def test_loader_bench_measures_the_baseline_in_the_same_run(tmp_path):
    history = tmp_path / "history.jsonl"
    out = run_bench(BENCH / "loader.py", "--dry-run", "--threads", "2", "--history", history)
    header, *rows = table(out, "impl")
    assert header == ["impl", "threads", "ms", "batches_per_s", "text_mb_per_s", "speedup_vs_nanogpt"]
    impls = [" ".join(r[:-5]) for r in rows]
    assert impls[:2] == ["nanogpt", "numpy-reference"] and "c++ prefetched" in impls
    assert float(rows[0][-1]) == 1.0 and all(float(r[2]) > 0 for r in rows)
    assert [r["impl"] for r in history_rows(history)] == [" ".join(r[:-5]) for r in rows]


def test_memory_bench_records_the_plan_per_case_on_the_cpu(tmp_path):
    history = tmp_path / "history.jsonl"
    out = run_bench(BENCH / "memory.py", "--dry-run", "--history", history, "--max-memory-gb", "40")
    recorded = history_rows(history)
    assert [r["case"]["name"] for r in recorded] == ["512-eager", "768-eager"]
    for row in recorded:
        assert row["bench"] == "memory" and row["case"]["n_embd"] == int(row["case"]["name"].split("-")[0])
        assert 0 < row["predicted_tensors_gb"] < row["predicted_peak_gb"] <= 40
        assert row["allocated_gb"] is None and row["fits"] is None  # no CUDA memory statistics on the CPU
    assert "predicted_tensors_gb" in out


def test_precompile_compiles_one_config_per_kernel_for_hopper(offline_cuda_compiler):
    out = run_bench(BENCH / "precompile.py", "--dry-run")
    lines = [line.split() for line in out.splitlines() if "for sm_90a:" in line]
    assert [line[0] for line in lines] == ["fwd", "dkdv", "dq"]
    assert all("'spill_stores': 0}" in line for line in out.splitlines() if "for sm_90a:" in line)
