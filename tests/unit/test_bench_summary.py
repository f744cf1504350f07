"""bench/summary.py on a synthetic GPU run's rows: each claim's figure, its same-run baseline, the ratio and
the verdict; a claim whose stage left no rows reads "no data"."""

import pytest

import common
import summary

DEVICE = "NVIDIA H200"


def row(bench, impl, case, ms, **fields):
    return common.record(bench, impl, case, ms, baseline=fields.pop("baseline", False), **fields) | {"device": DEVICE}


def train_rows(charlm_tokens_per_s: float) -> list[dict]:
    case = {"name": "deep", "micro_batch": 64, "checkpoint_layers": 0}
    return [row("train", "baseline", case, 100.0, baseline=True, tokens_per_s=300_000.0, peak_mem_gb=30.0),
            row("train", "charlm", case, 90.0, tokens_per_s=charlm_tokens_per_s, peak_mem_gb=24.0)]


def memory_row(name: str, allocated: float, total: float) -> dict:
    case = {"name": name, "micro_batch": 64, "checkpoint_layers": 0, "max_memory_gb": 40.0}
    return row("memory", "charlm", case, 100.0, predicted_tensors_gb=20.0, predicted_peak_gb=23.0,
               predicted_context_gb=1.0, allocated_gb=allocated, reserved_gb=total - 1.5, outside_gb=1.5,
               total_gb=total, fits=total <= 40)


def attn_rows() -> list[dict]:
    rows = []
    for T in (256, 512):  # the claim reads the longest sequence
        case = {"T": T, "D": 64, "pass": "fwd+bwd"}
        times = {"sdpa-flash": 2.0, "sdpa-cudnn": 1.6, "triton": 2.0 if T == 512 else 0.1, "triton+rope": 2.2,
                 "rope+triton": 2.75}
        rows += [row("attn", impl, case, ms, baseline=impl.startswith("sdpa"), tflops=100.0)
                 for impl, ms in times.items()]
    return rows


def rope_rows() -> list[dict]:
    rows = []
    for name, gb in (("deep", 0.1), ("deep-beyond-l2", 1.6)):
        case = {"name": name, "pass": "fwd+bwd"}
        for impl, gbps in (("compile", 2000.0), ("liger", 4000.0), ("triton", 3000.0 if gb > 1 else 9000.0)):
            rows.append(row("rope", impl, case, 1.0, baseline=impl != "triton", gbps=gbps, gb_moved=gb,
                            frac_of_copy_bw=gbps / 4000.0))
    return rows


def loader_rows() -> list[dict]:
    case = {"threads": 1}
    return [row("loader", "nanogpt", case, 5.0, baseline=True, threads=None),
            row("loader", "c++", case, 0.1, threads=1),
            row("loader", "c++ prefetched, pinned", {"threads": 4}, 0.2, threads=4, deep_step_ms=100.0,
                share_of_deep_step=0.002)]


def by_claim(rows: list[dict]) -> dict[str, summary.Line]:
    return {line.claim: line for line in summary.claims(rows)}


def test_every_claim_against_its_same_run_baseline():
    rows = [*train_rows(330_000.0), memory_row("512-eager", 18.0, 25.0), memory_row("768-compiled", 21.0, 41.0),
            *attn_rows(), *rope_rows(), *loader_rows()]
    lines = by_claim(rows)
    speed = lines["DEEP training tokens/s, charlm vs nanoGPT-style"]
    assert speed.ratio == pytest.approx(1.1) and speed.verdict == "PASS"
    assert lines["DEEP training peak memory, charlm vs nanoGPT-style"].ratio == pytest.approx(0.8)
    safe = lines["memory planner, DEEP 512-eager: allocated / predicted"]
    unsafe = lines["memory planner, DEEP 768-compiled: allocated / predicted"]
    assert (safe.ratio, safe.verdict, unsafe.ratio, unsafe.verdict) == (0.9, "PASS", 1.05, "FAIL")
    fits = lines["DEEP fits a 40 GB card (reserved + outside)"]
    assert fits.ratio == pytest.approx(41 / 40) and fits.verdict == "FAIL" and "768-compiled" in fits.note
    attention = lines["attention fwd+bwd T=512 D=64, triton vs fastest SDPA"]
    assert attention.ratio == pytest.approx(0.8) and "sdpa-cudnn" in attention.baseline and attention.verdict == "FAIL"
    assert lines["attention fwd+bwd T=512 D=64, RoPE fused vs apply_rope + triton"].ratio == pytest.approx(1.25)
    assert lines["RoPE fwd+bwd deep-beyond-l2, triton vs compile"].ratio == pytest.approx(1.5)
    assert lines["RoPE fwd+bwd deep-beyond-l2, triton vs liger"].verdict == "FAIL"
    assert lines["loader batch, C++ (1 thread) vs nanoGPT get_batch"].ratio == pytest.approx(50)
    share = lines["loader: trainer's batch() / DEEP step"]
    assert share.ratio == 0.002 and share.verdict == "PASS"


def test_a_slower_charlm_fails_its_claim():
    line = by_claim(train_rows(270_000.0))["DEEP training tokens/s, charlm vs nanoGPT-style"]
    assert line.ratio == pytest.approx(0.9) and line.verdict == "FAIL"


def test_claims_without_rows_read_no_data():
    lines = summary.claims(train_rows(330_000.0))  # only the train stage ran
    missing = [line for line in lines if line.verdict == "no data"]
    assert {line.note for line in missing} == {"no rows: see the memory stage", "no rows: see the attn stage",
                                               "no rows: see the rope stage", "no rows: see the loader stage"}
    text = summary.screen("title", lines, [["train", "ok", "12", ""], ["memory", "skipped", "0", "needs 60 s"]])
    assert "2 PASS, 0 FAIL, 4 no data" in text and "needs 60 s" in text
