"""Every flash-attention config the autotune pruner keeps compiles for Hopper (sm_90a) and Ampere (sm_80)
without a GPU, fits the card's shared memory, and does not spill registers.

triton.compile with a GPUTarget runs the installed Triton's whole pipeline down to its own ptxas, whose
report gives the registers and spill stores; Triton's metadata gives the shared memory. So a new Triton
version that makes a kept config spill or overflow fails here, on the CPU, and not in a GPU's ten
minutes. Shapes: bench/attn.py's (T = 512, heads of 64 and 128, bf16), with and without fused RoPE; the
configs are the pruner's for each target's card (flash_attn.kept_configs). The compiles run in parallel
processes (about a minute on 2 cores).
"""
import os

import pytest

import precompile

pytestmark = pytest.mark.integration
SHAPES = [(T, H, D, rope) for _, T, H, D in precompile.ATTN_CASES for rope in (False, True)]


def _compile_for(job_and_target: tuple) -> dict:
    job, target = job_and_target
    return precompile.offline_compile(job, target)


@pytest.fixture(scope="module")
def reports(offline_cuda_compiler) -> dict:
    """(target, job) -> ptxas's figures, for every config kept for each target's card."""
    work = [(job, target) for target, (major, smem) in precompile.TARGETS.items()
            for job in precompile.jobs_for(SHAPES, major, smem)]
    results = precompile.run_parallel(_compile_for, work, len(os.sched_getaffinity(0)))
    return {(target, job): result for (job, target), result in zip(work, results)}


def _label(target, job) -> str:
    return f"{target} {job.kernel} D={job.D} rope={job.rope} (BLOCK_M, BLOCK_N, warps, stages)={job.config}"


def test_every_kernel_shape_and_target_keeps_configs(reports):
    for target in precompile.TARGETS:
        for _, _, D, rope in SHAPES:
            for kernel in precompile.KERNELS:
                kept = [job for (t, job) in reports
                        if t == target and (job.kernel, job.D, job.rope) == (kernel, D, rope)]
                assert kept, f"{target} {kernel} D={D} rope={rope}: no config kept"


@pytest.mark.parametrize("target", list(precompile.TARGETS))
def test_kept_configs_fit_shared_memory(reports, target):
    budget = precompile.TARGETS[target][1]
    over = [f"{_label(t, job)}: {r['shared']} B" for (t, job), r in reports.items()
            if t == target and r["shared"] > budget]
    assert not over, f"over the {budget} B of shared memory per block:\n" + "\n".join(over)
    assert all(r["shared"] > 0 for (t, _), r in reports.items() if t == target)  # the tiles are staged there


@pytest.mark.parametrize("target", list(precompile.TARGETS))
def test_kept_configs_do_not_spill(reports, target):
    spilling = [f"{_label(t, job)}: {r['spill_stores']} B of spill stores, {r['registers']} registers"
                for (t, job), r in reports.items() if t == target and r["spill_stores"]]
    assert not spilling, ("prune these in kernels/flash_attn.py's _SPILLING_CONFIGS:\n" + "\n".join(spilling))
    assert all(0 < r["registers"] <= 255 for (t, _), r in reports.items() if t == target)
