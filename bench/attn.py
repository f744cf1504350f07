"""Causal attention: charlm's Triton flash attention against torch's SDPA backends, in one run.

    python bench/attn.py            # CUDA GPU: T = 512, D in {64, 128}, bf16, forward and forward + backward
    python bench/attn.py --full     # also FlexAttention (compiled, minutes) and naive attention
    python bench/attn.py --dry-run  # no GPU: one tiny fp32 case through Triton's interpreter (a smoke test)

Shapes follow FlashAttention's benchmark: B * T = 16384 tokens and H = 2048 / D heads (width 2048).
q, k, v are views into one fused (B, T, 3 * H * D) QKV projection output that requires grad, as the
model passes them; providers that take (B, H, T, D) get transposed views of them (no copies).

FLOPs: forward = 4 * B * H * T^2 * D / 2 (QK^T and PV, 2 * T^2 * D each per head, half of the causal
scores skipped); forward + backward = 3.5 x forward (the backward's five matmuls, one of them QK^T
recomputed, make 2.5 x forward). Times: triton.testing.do_bench (L2 flushed before each call); ms is the
median, ms_min and ms_p80 the spread. Peak memory: torch.cuda.max_memory_allocated during one call,
inputs included.

Providers: sdpa-flash, sdpa-cudnn, sdpa-efficient (torch.nn.attention.sdpa_kernel; a backend that raises
is skipped, and sdpa-math stands in on the CPU), with --full flex (compiled flex_attention with a causal
block mask) and naive (nanoGPT's fallback: masked softmax of the materialised scores), then triton
(charlm's kernel), triton+rope (RoPE fused into the kernel) and rope+triton (apply_rope, then the kernel:
the unfused comparison). Each row is appended to the history as soon as it is measured;
speedup_vs_best_sdpa, printed at the end, is the fastest SDPA backend's ms over the provider's.
"""
import math
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # as in tests/conftest.py: triton.jit reads this when the kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = None

from charlm.kernels.flash_attn import flash_attn  # noqa: E402
from charlm.kernels.rope import apply_rope  # noqa: E402
from common import ATTN_CASES, History, bench_parser, kernel_device, print_table, record, time_ms  # noqa: E402

THETA = 10000.0
DRY_RUN_CASES = [(1, 32, 2, 32)]  # (B, T, H, D)
PASSES = ("fwd", "fwd+bwd")
CHARLM = ("triton", "triton+rope", "rope+triton")  # every other provider is a baseline
TABLE_COLUMNS = ["T", "D", "pass", "impl", "ms", "ms_min", "ms_p80", "tflops", "peak_mem_gb", "speedup_vs_best_sdpa"]


def _bhtd(q, k, v):
    """(B, T, H, D) views -> (B, H, T, D) views, the layout of SDPA and FlexAttention."""
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def sdpa(backend):
    def attend(q, k, v):
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*_bhtd(q, k, v), is_causal=True).transpose(1, 2)
    return attend


def flex(T: int, device: torch.device):
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(*_bhtd(q, k, v), block_mask=block_mask).transpose(1, 2)


def naive(T: int, device: torch.device):
    """nanoGPT's attention without flash: materialised scores, masked, softmax, in the input dtype."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()

    def attend(q, k, v):
        q, k, v = _bhtd(q, k, v)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        return (att.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v).transpose(1, 2)
    return attend


def providers(T: int, device: torch.device, full: bool) -> dict:
    backends = torch.nn.attention.SDPBackend
    baselines = {"sdpa-flash": sdpa(backends.FLASH_ATTENTION), "sdpa-cudnn": sdpa(backends.CUDNN_ATTENTION),
                 "sdpa-efficient": sdpa(backends.EFFICIENT_ATTENTION)}
    if device.type != "cuda":  # the GPU backends raise here: the math backend keeps a baseline in the dry run
        baselines["sdpa-math"] = sdpa(backends.MATH)
    if full and flex_attention is not None and device.type == "cuda":
        baselines["flex"] = flex(T, device)
    if full or device.type != "cuda":
        baselines["naive"] = naive(T, device)
    charlm = {"triton": flash_attn,
              "triton+rope": lambda q, k, v: flash_attn(q, k, v, rope_theta=THETA),
              "rope+triton": lambda q, k, v: flash_attn(*apply_rope(q, k, THETA), v)}
    return {**baselines, **charlm}


def step(attend, q, k, v, do, pass_: str):
    """The timed call: forward only (inputs requiring grad, as in training), or forward and backward."""
    if pass_ == "fwd":
        return lambda: attend(q, k, v)
    return lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), do)


def runs(name: str, attend, q, k, v, do) -> bool:
    """Whether a provider runs here (an SDPA backend may not support the GPU, dtype or shape)."""
    try:
        step(attend, q, k, v, do, "fwd+bwd")()
        return True
    except Exception as e:  # whatever a backend raises, the others are still worth measuring
        print(f"skipping {name}: {type(e).__name__}: {e}".splitlines()[0])
        return False


def peak_gb(fn, device: torch.device) -> float | None:
    """Peak allocated memory during one call, in GB; None off CUDA. Measured apart from the timing, whose
    L2-flush buffer would count."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def bench_case(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: torch.device, full: bool,
               history: History) -> None:
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    impls = {name: fn for name, fn in providers(T, device, full).items() if runs(name, fn, q, k, v, do)}
    for pass_ in PASSES:
        flops = 4 * B * H * T * T * D / 2 * (1 if pass_ == "fwd" else 3.5)
        case = {"B": B, "T": T, "H": H, "D": D, "dtype": str(dtype).removeprefix("torch."), "causal": True,
                "layout": "fused_qkv", "pass": pass_}
        for name, attend in impls.items():
            call = step(attend, q, k, v, do, pass_)
            peak = peak_gb(call, device)
            timing = time_ms(call, device=device)
            history.add(record("attn", name, case, timing, baseline=name not in CHARLM,
                               tflops=flops / timing.median / 1e9, peak_mem_gb=peak, device=device))


def case_key(row: dict) -> tuple:
    return tuple(sorted(row["case"].items()))


def with_speedups(rows: list[dict]) -> list[dict]:
    """Table rows: each row's T, D, pass and its speed-up over the fastest SDPA backend of its case."""
    best = {}
    for row in rows:
        if row["impl"].startswith("sdpa"):
            best[case_key(row)] = min(best.get(case_key(row), math.inf), row["ms"])
    return [{**row, **{name: row["case"][name] for name in ("T", "D", "pass")},
             "speedup_vs_best_sdpa": best[case_key(row)] / row["ms"] if case_key(row) in best else None}
            for row in rows]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--full", action="store_true", help="also FlexAttention (compiles for minutes) and naive")
    args = parser.parse_args()
    device = kernel_device("bench/attn.py", args)
    if device is None:
        return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    history = History(args)
    for case in ATTN_CASES if device.type == "cuda" else DRY_RUN_CASES:
        bench_case(*case, dtype, device, args.full, history)
    rows = history.rows
    print(f"causal attention, {rows[0]['case']['dtype']}, on {rows[0]['device']}; "
          "TFLOP/s from fwd = 4 * B * H * T^2 * D / 2, fwd+bwd = 3.5 x fwd")
    print_table(with_speedups(rows), TABLE_COLUMNS)


if __name__ == "__main__":
    main()
