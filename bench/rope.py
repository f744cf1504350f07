"""RoPE: the Triton kernel against the eager and the torch.compile'd PyTorch reference, in one run.

    python bench/rope.py          # CUDA GPU: the BASE and DEEP shapes in bf16
    python bench/rope.py --cpu    # no GPU: one tiny case through Triton's interpreter (a smoke test)

Inputs are q and k viewed out of a fused (B, T, 3 * H * D) QKV projection, as the model passes them.
Bandwidth counts the bytes an ideal implementation moves: forward reads q, k and writes their
rotations; backward reads the two output gradients and writes the two input gradients. The float32
cos/sin table (L2-resident) is not counted. frac_of_copy_bw compares that with a device-to-device copy
(torch.clone) of a tensor the size of q and k together, measured in the same run.
"""
import os

import torch

if not torch.cuda.is_available():  # as in tests/conftest.py: triton.jit reads this when rope is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from charlm.kernels.rope import apply_rope, rope_reference  # noqa: E402
from common import append_history, kernel_bench_args, print_table, record, time_ms  # noqa: E402

# (name, B, T, H, D): micro-batch 16 at the BASE preset (context 256, width 512), the DEEP preset
# (context 512) and DEEP at width 768.
GPU_CASES = [("base", 16, 256, 8, 64), ("deep", 16, 512, 8, 64), ("deep-w768", 16, 512, 12, 64)]
CPU_CASES = [("tiny", 2, 16, 2, 32)]
DTYPE = torch.bfloat16
PASSES = ("fwd", "fwd+bwd")
BASELINES = ("eager", "compile")  # the reference rows
TABLE_COLUMNS = ["case", "pass", "impl", "ms", "gbps", "frac_of_copy_bw", "speedup_vs_eager", "speedup_vs_compile"]


def fused_qkv_views(B: int, T: int, H: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, T, H, D) with strides (T * 3HD, 3HD, D, 1), of a projection output that requires grad."""
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=DTYPE, requires_grad=True)
    q, k, _ = qkv.view(B, T, 3, H, D).unbind(2)
    return q, k


def step(impl, q: torch.Tensor, k: torch.Tensor, pass_: str):
    """The timed call: forward only (inputs requiring grad, as in training), or forward and backward."""
    if pass_ == "fwd":
        return lambda: impl(q, k)
    grads = (torch.randn_like(q), torch.randn_like(k))
    return lambda: torch.autograd.grad(impl(q, k), (q, k), grads)


def copy_gbps(q: torch.Tensor) -> float:
    """GB/s (bytes read + written) of torch.clone on a tensor the size of q and k together."""
    x = torch.empty(2 * q.numel(), device=q.device, dtype=q.dtype)
    return 2 * x.numel() * x.element_size() / time_ms(x.clone, device=q.device) / 1e6


def bench_case(name: str, B: int, T: int, H: int, D: int, device: torch.device, impls: dict) -> list[dict]:
    q, k = fused_qkv_views(B, T, H, D, device)
    copy = copy_gbps(q)
    rows = []
    for pass_ in PASSES:
        # Tensors of q's size moved: q, k in and 2 out forward; 2 gradients in and 2 out backward.
        gb_moved = (4 if pass_ == "fwd" else 8) * q.numel() * q.element_size() / 1e9
        case = {"name": name, "B": B, "T": T, "H": H, "D": D, "dtype": str(DTYPE).removeprefix("torch."),
                "layout": "fused_qkv", "pass": pass_}
        ms = {impl: time_ms(step(fn, q, k, pass_), device=device) for impl, fn in impls.items()}
        for impl, t in ms.items():
            gbps = gb_moved / (t / 1e3)
            rows.append(record("rope", impl, case, t, baseline=impl in BASELINES, gbps=gbps, device=device,
                               speedup_vs_eager=ms["eager"] / t, speedup_vs_compile=ms["compile"] / t,
                               frac_of_copy_bw=gbps / copy, copy_gbps=copy))
    return rows


def main() -> None:
    args, device = kernel_bench_args("bench/rope.py", __doc__)
    if device is None:
        return
    impls = {"eager": rope_reference, "compile": torch.compile(rope_reference, dynamic=False),
             "triton": apply_rope}
    rows = [row for case in (GPU_CASES if device.type == "cuda" else CPU_CASES)
            for row in bench_case(*case, device, impls)]
    print(f"rope, {rows[0]['case']['dtype']}, on {rows[0]['device']}")
    print_table([{**r, "case": r["case"]["name"], "pass": r["case"]["pass"]} for r in rows], TABLE_COLUMNS)
    if not args.no_history:
        append_history(rows)


if __name__ == "__main__":
    main()
