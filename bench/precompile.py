"""Compile flash attention's autotune candidates ahead of the benchmarks, in parallel processes.

    python bench/precompile.py            # CUDA GPU: every config the pruner keeps for bench/'s shapes
    python bench/precompile.py --dry-run  # no GPU: the same jobs listed, one per kernel compiled for sm_90a

Triton's autotuner compiles its candidates one after another the first time it meets a shape: about 80
serial compiles for bench/attn.py's shapes alone. Compiled here first, several at a time, they are
loaded from Triton's disk cache instead: JITFunction.warmup compiles a config exactly as a launch would
(same specialisation, same options, so the same cache key) without running it.

`offline_compile` compiles one config for a GPU target on a machine without a GPU (triton.compile with
a GPUTarget and the ptxas that Triton ships) and reports the shared memory, registers and spill stores
that ptxas reports; tests/kernels/test_offline_compile.py runs it over every config the pruner keeps.

The kernels are imported in the worker processes only, with TRITON_INTERPRET=0: a process that runs
kernels through the interpreter (the tests on a CPU) can still hand out compile jobs.
"""
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from unittest import mock

import torch

from common import ATTN_CASES, DEEP_BLOCK_SIZE, DEEP_HEAD_DIM, DEEP_WIDTHS, bench_parser

KERNELS = ("fwd", "dkdv", "dq")
DTYPE = torch.bfloat16
# Shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the cards the targets stand for.
TARGETS = {"sm_90a": (9, 232448), "sm_80": (8, 166912)}  # H100 / H200; A100


@dataclass(frozen=True)
class Job:
    """One config of one kernel at one shape: (1, T, H, D) views into a fused QKV projection (the batch size
    does not reach the compiled code)."""
    kernel: str
    T: int
    H: int
    D: int
    rope: bool
    config: tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def timed_shapes() -> list[tuple]:
    """(T, H, D, fused RoPE) of every attention call bench/ times: bench/attn.py's cases and DEEP's blocks
    at each width, with and without RoPE (DEEP trains with learned positions; bench/run_all.py's GPU kernel
    test runs DEEP's shape with RoPE)."""
    attn = [(T, H, D) for _, T, H, D in ATTN_CASES]
    deep = [(DEEP_BLOCK_SIZE, width // DEEP_HEAD_DIM, DEEP_HEAD_DIM) for width in DEEP_WIDTHS]
    return [(*shape, rope) for shape in attn + deep for rope in (False, True)]


def jobs_for(shapes: list[tuple], capability_major: int, smem_budget: int) -> list[Job]:
    """The configs the autotuner would time for these shapes on such a GPU (flash_attn.kept_configs), one
    job each, without the duplicates that would compile to the same kernel."""
    from charlm.kernels import flash_attn as fa  # plain data and pruning: the interpreter's module will do

    jobs, seen = [], set()
    for T, H, D, rope in shapes:
        for kernel in KERNELS:
            configs = fa._triton_configs(fa.CANDIDATES[kernel])
            kept = fa.kept_configs(kernel, configs, fa.triton.next_power_of_2(T), D, DTYPE.itemsize, rope,
                                   smem_budget, capability_major)
            for c in kept:
                job = Job(kernel, T, H, D, rope, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                  c.num_stages))
                # Only T, D, RoPE and which integers are multiples of 16 reach the compiled code.
                key = (kernel, T, D, rope, H % 16 == 0, job.config)
                if key not in seen:
                    seen.add(key)
                    jobs.append(job)
    return jobs


def _compiled_kernels():
    """charlm.kernels.flash_attn with its kernels compiled, not interpreted (run_parallel's workers)."""
    from charlm.kernels import flash_attn as fa
    if not hasattr(fa._attn_fwd.fn, "warmup"):
        raise RuntimeError("charlm.kernels.flash_attn was imported under TRITON_INTERPRET=1 in this process")
    return fa


def _launch_args(fa, job: Job, device: torch.device) -> tuple:
    """(jit function, positional arguments, constexprs, options) of the job's kernel, as flash_attn launches
    it."""
    qkv = torch.empty(1, job.T, 3 * job.H * job.D, dtype=DTYPE, device=device)
    q, k, v = qkv.view(1, job.T, 3, job.H, job.D).unbind(2)
    grad = torch.empty(1, job.T, job.H, job.D, dtype=DTYPE, device=device)  # o, do, dq, dk, dv
    stats = torch.empty(1, job.H, job.T, dtype=torch.float32, device=device)  # lse, delta
    runtime, constexprs = fa._common_args(q, k, v, 10000.0 if job.rope else None)
    tensors = {"fwd": (q, k, v, grad, stats), "dkdv": (q, k, v, grad, grad, grad, stats, stats),
               "dq": (q, k, v, grad, grad, stats, stats)}[job.kernel]
    kernel = {"fwd": fa._attn_fwd, "dkdv": fa._attn_bwd_dkdv, "dq": fa._attn_bwd_dq}[job.kernel].fn
    m, n, warps, stages = job.config
    meta = {**constexprs, "CAUSAL": True, "BLOCK_M": m, "BLOCK_N": n}
    return kernel, (*tensors, *runtime), meta, {"num_warps": warps, "num_stages": stages}


def warm_cache(job: Job) -> float:
    """Compile the job on this GPU into Triton's disk cache, as the autotuner's launch would; seconds taken."""
    start = time.perf_counter()
    fa = _compiled_kernels()
    kernel, args, meta, options = _launch_args(fa, job, torch.device("cuda"))
    kernel.warmup(*args, grid=(1,), **meta, **options)
    return time.perf_counter() - start


def _signature(kernel, args: tuple, meta: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) for triton.compile, by the rules a launch specialises on:
    tensors (16-byte aligned, as torch allocates) and integers divisible by 16 get tt.divisibility 16,
    None is a constexpr, floats are fp32."""
    names = kernel.arg_names
    values = dict(zip(names, args)) | meta
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = values[name]
        if name in meta or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def offline_compile(job: Job, target: str) -> dict:
    """Compile the job for a GPU target ("sm_90a", "sm_80") without a GPU: shared memory (bytes), registers
    per thread and spill stores (bytes), as Triton's ptxas reports them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fa = _compiled_kernels()
    kernel, args, meta, options = _launch_args(fa, job, torch.device("meta"))
    signature, constexprs, attrs = _signature(kernel, args, meta)
    capability = TARGETS[target][0] * 10
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # printed by Triton after ptxas runs
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        os.environ["TRITON_CACHE_DIR"] = cache  # a cache hit would skip ptxas and its report
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options)
    report = log.getvalue()
    registers, spills = re.search(r"Used (\d+) registers", report), re.search(r"(\d+) bytes spill stores", report)
    if not (registers and spills):
        raise RuntimeError(f"no register or spill figures in ptxas's report for {job}:\n{report}")
    return {"shared": compiled.metadata.shared, "registers": int(registers.group(1)),
            "spill_stores": int(spills.group(1))}


def offline_compile_unavailable() -> str | None:
    """Why this machine cannot compile for CUDA targets offline, or None when it can."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        return f"Triton or its GPUTarget is not importable: {e}"
    if "nvidia" not in triton.backends.backends:
        return f"this Triton ({triton.__version__}) ships no NVIDIA backend"
    ptxas = triton.knobs.nvidia.ptxas
    if not os.path.isfile(ptxas.path):
        return f"this Triton ({triton.__version__}) has no ptxas at {ptxas.path}"
    return None


def run_parallel(worker, jobs: list, processes: int) -> list:
    """worker(job) for every job, in job order, in fresh processes: spawned (no CUDA state carried over) and
    with TRITON_INTERPRET=0, which Triton reads as it is imported."""
    if not jobs:
        return []
    with mock.patch.dict(os.environ, TRITON_INTERPRET="0"), ProcessPoolExecutor(
            max_workers=min(processes, len(jobs)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(worker, jobs))


def _dry_run_target(job: Job) -> dict:
    return offline_compile(job, "sm_90a")


def main() -> None:
    args = bench_parser(__doc__, history=False).parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/precompile.py: no CUDA GPU, nothing compiled (--dry-run compiles a few jobs for sm_90a)")
        return
    if args.dry_run:
        reason = offline_compile_unavailable()
        if reason:
            print(f"bench/precompile.py: nothing compiled, as this machine cannot compile for sm_90a: {reason}")
            return
        major, budget = TARGETS["sm_90a"]
    else:  # what flash_attn's pruner will read
        fa = _compiled_kernels()
        major, budget = fa._capability_major(0), fa._max_shared_mem(0)
    jobs = jobs_for(timed_shapes(), major, budget)
    processes = len(os.sched_getaffinity(0))
    print(f"precompile: {len(jobs)} kernel configs for {len(timed_shapes())} shapes, {processes} processes")
    start = time.perf_counter()
    if args.dry_run:  # the first config of each kernel: the machinery, not the whole list
        chosen = [next(job for job in jobs if job.kernel == kernel) for kernel in KERNELS]
        for job, report in zip(chosen, run_parallel(_dry_run_target, chosen, processes)):
            print(f"  {job.kernel} D={job.D} {job.config} for sm_90a: {report}")
    else:
        seconds = run_parallel(warm_cache, jobs, processes)
        print(f"  compile time per config: median {sorted(seconds)[len(seconds) // 2]:.1f} s")
    print(f"precompile: done in {time.perf_counter() - start:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
