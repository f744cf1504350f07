"""RoPE: the Triton kernel against the eager and the torch.compile'd PyTorch reference, and Liger-Kernel's
RoPE when it is importable, in one run.

    python bench/rope.py            # CUDA GPU: the model's shapes, and DEEP shapes too large for L2, in bf16
    python bench/rope.py --dry-run  # no GPU: one tiny case through Triton's interpreter (a smoke test)

Inputs are q and k viewed out of a fused (B, T, 3 * H * D) QKV projection, as the model passes them.
Bandwidth counts the bytes an ideal implementation moves: forward reads q, k and writes their
rotations; backward reads the two output gradients and writes the two input gradients. The float32
cos/sin table (L2-resident) is not counted. The model's shapes move 16 to 24 MB forward, which an H100's
or H200's L2 (50 to 60 MB) holds: their GB/s can exceed what memory delivers, so the "beyond-l2" cases
(batch 256, 270 to 400 MB forward) are the bandwidth figures. Times: triton.testing.do_bench (L2 flushed
before each call; ms the median, ms_min and ms_p80 the spread). frac_of_copy_bw compares with a
device-to-device copy (torch.clone) of a tensor the size of q and k together, measured in the same run.

Liger-Kernel's liger_rotary_pos_emb takes (B, H, T, D) and cos, sin as (1, T, D) in the input dtype
(Hugging Face's layout); it gets transposed views of the same q and k, and its tables are built once,
outside the timed call, as a model does once per forward pass.
"""
import os

import torch

if not torch.cuda.is_available():  # as in tests/conftest.py: triton.jit reads this when rope is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from charlm.kernels.rope import apply_rope, rope_cos_sin, rope_reference  # noqa: E402
from common import History, bench_parser, kernel_device, print_table, record, time_ms  # noqa: E402

# (name, B, T, H, D): micro-batch 16 at the BASE preset (context 256, width 512), the DEEP preset
# (context 512) and DEEP at width 768; then DEEP's shapes at batch 256, several times an L2 cache.
GPU_CASES = [("base", 16, 256, 8, 64), ("deep", 16, 512, 8, 64), ("deep-w768", 16, 512, 12, 64),
             ("deep-beyond-l2", 256, 512, 8, 64), ("deep-w768-beyond-l2", 256, 512, 12, 64)]
DRY_RUN_CASES = [("tiny", 2, 16, 2, 32)]
DTYPE = torch.bfloat16
PASSES = ("fwd", "fwd+bwd")
BASELINES = ("eager", "compile", "liger")  # the rows that are not charlm's
TABLE_COLUMNS = ["case", "pass", "impl", "ms", "ms_min", "ms_p80", "gbps", "frac_of_copy_bw", "speedup_vs_eager",
                 "speedup_vs_compile"]


def fused_qkv_views(B: int, T: int, H: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, T, H, D) with strides (T * 3HD, 3HD, D, 1), of a projection output that requires grad."""
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=DTYPE, requires_grad=True)
    q, k, _ = qkv.view(B, T, 3, H, D).unbind(2)
    return q, k


def liger(T: int, D: int, device: torch.device):
    """Liger-Kernel's RoPE on (B, T, H, D) views, or None (said aloud) when it is not importable."""
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError as e:
        print(f"skipping liger: Liger-Kernel is not importable ({e})")
        return None
    cos, sin = (torch.cat((x, x), dim=-1)[None].to(DTYPE) for x in rope_cos_sin(T, D, device=device))

    def rotate(q, k):
        q_out, k_out = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return rotate


def agrees_with_reference(name: str, impl, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether an implementation runs and computes RoPE (bf16 tolerance); a baseline that does not is not
    timed, and the reason is printed. Called as the timed forward is (inputs that require grad), so that
    torch.compile compiles once per shape."""
    try:
        out = impl(q, k)
    except Exception as e:  # a third-party kernel may reject the GPU, dtype or layout: the rest still counts
        print(f"skipping {name}: {type(e).__name__}: {e}".splitlines()[0])
        return False
    ref = rope_reference(q.detach().double(), k.detach().double())
    error = max(((x.detach().double() - r).norm() / r.norm()).item() for x, r in zip(out, ref))
    if not error < 1e-2:
        print(f"skipping {name}: relative error {error:.1e} against rope_reference")
    return error < 1e-2


def step(impl, q: torch.Tensor, k: torch.Tensor, pass_: str):
    """The timed call: forward only (inputs requiring grad, as in training), or forward and backward."""
    if pass_ == "fwd":
        return lambda: impl(q, k)
    grads = (torch.randn_like(q), torch.randn_like(k))
    return lambda: torch.autograd.grad(impl(q, k), (q, k), grads)


def copy_gbps(q: torch.Tensor) -> float:
    """GB/s (bytes read + written) of torch.clone on a tensor the size of q and k together."""
    x = torch.empty(2 * q.numel(), device=q.device, dtype=q.dtype)
    return 2 * x.numel() * x.element_size() / time_ms(x.clone, device=q.device).median / 1e6


def bench_case(name: str, B: int, T: int, H: int, D: int, device: torch.device, impls: dict,
               history: History) -> None:
    q, k = fused_qkv_views(B, T, H, D, device)
    case_impls = {**impls, "liger": liger(T, D, device)}
    case_impls = {impl: fn for impl, fn in case_impls.items() if fn and agrees_with_reference(impl, fn, q, k)}
    copy = copy_gbps(q)
    for pass_ in PASSES:
        # Tensors of q's size moved: q, k in and 2 out forward; 2 gradients in and 2 out backward.
        gb_moved = (4 if pass_ == "fwd" else 8) * q.numel() * q.element_size() / 1e9
        case = {"name": name, "B": B, "T": T, "H": H, "D": D, "dtype": str(DTYPE).removeprefix("torch."),
                "layout": "fused_qkv", "pass": pass_}
        for impl, fn in case_impls.items():
            timing = time_ms(step(fn, q, k, pass_), device=device)
            gbps = gb_moved / (timing.median / 1e3)
            history.add(record("rope", impl, case, timing, baseline=impl in BASELINES, gbps=gbps, device=device,
                               frac_of_copy_bw=gbps / copy, copy_gbps=copy, gb_moved=gb_moved))


def with_speedups(rows: list[dict]) -> list[dict]:
    """Table rows with their case name, pass and speed-ups over the eager and compiled references."""
    ms = {(r["case"]["name"], r["case"]["pass"], r["impl"]): r["ms"] for r in rows}
    table = []
    for r in rows:
        name, pass_ = r["case"]["name"], r["case"]["pass"]
        speedups = {f"speedup_vs_{ref}": ms[name, pass_, ref] / r["ms"] if (name, pass_, ref) in ms else None
                    for ref in ("eager", "compile")}
        table.append({**r, "case": name, "pass": pass_, **speedups})
    return table


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    device = kernel_device("bench/rope.py", args)
    if device is None:
        return
    # On the CPU, inductor's C++ code generation would take most of the dry run: the eager backend still
    # goes through torch.compile's tracing.
    backend = "inductor" if device.type == "cuda" else "eager"
    impls = {"eager": rope_reference, "compile": torch.compile(rope_reference, dynamic=False, backend=backend),
             "triton": apply_rope}
    history = History(args)
    for case in GPU_CASES if device.type == "cuda" else DRY_RUN_CASES:
        bench_case(*case, device, impls, history)
    print(f"rope, {history.rows[0]['case']['dtype']}, on {history.rows[0]['device']}")
    print_table(with_speedups(history.rows), TABLE_COLUMNS)


if __name__ == "__main__":
    main()
