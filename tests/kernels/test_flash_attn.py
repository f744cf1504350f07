"""flash_attn (kernels/flash_attn.py) against a float64 reference of the same math.

On the CPU the kernels run through Triton's interpreter (slow), so the shapes there are small; the GPU
adds longer sequences and bf16. Errors are relative Frobenius norms: < 1e-5 in fp32, < 1e-2 in fp16/bf16.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from charlm.kernels import flash_attn as fa
from charlm.kernels import rope
from charlm.kernels.flash_attn import attention_reference, flash_attn

THETA = 10000.0
ON_GPU = torch.cuda.is_available()
# The interpreter casts fp32 to bf16 by truncation, not rounding, which roughly doubles bf16 errors there.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2 if ON_GPU else 3e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error; absolute where the reference is about 0 (dq and dk when T = 1)."""
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1.0)).item()


def make_qkv(B, T, H, D, dtype, device, layout="contiguous", seed=0):
    """q, k, v of shape (B, T, H, D) requiring grad: contiguous, views into one fused QKV projection output
    as the model makes them (strides (T*3C, 3C, D, 1)), or transposed from (B, H, T, D)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "fused_qkv":
        qkv = torch.randn(B, T, 3 * H * D, generator=g).to(device, dtype).requires_grad_()
        return qkv.view(B, T, 3, H, D).unbind(2)
    shape = (B, H, T, D) if layout == "bhtd" else (B, T, H, D)
    qkv = [torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]
    return [x.transpose(1, 2) for x in qkv] if layout == "bhtd" else qkv


def reference_lse(q, k, causal, rope_theta):
    """(B, H, T) log-sum-exp of the scaled, masked scores, in float64."""
    q, k = q.double(), k.double()
    if rope_theta is not None:
        q, k = rope.rope_reference(q, k, rope_theta)
    T = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.logsumexp(-1)


def check_against_reference(q, k, v, causal=True, rope_theta=None):
    """o and dq, dk, dv of flash_attn vs attention_reference (RoPE by rope_reference) in float64."""
    o = flash_attn(q, k, v, causal, rope_theta)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.device, o.dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*leaves, causal, rope_theta)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    assert o.is_contiguous()
    for name, x, r in zip(("o", "dq", "dk", "dv"), (o, *grads), (ref, *ref_grads)):
        assert x.shape == q.shape and x.dtype == q.dtype, name
        assert torch.isfinite(x).all(), name
        assert rel_err(x, r) < TOL[q.dtype], f"{name}: rel err {rel_err(x, r):.2e}"


# --- CPU (interpreter) and GPU: small shapes --------------------------------------------------------------

@pytest.mark.parametrize("T, D, dtype", [
    (1, 32, torch.float32), (17, 32, torch.float32), (100, 32, torch.float32), (64, 64, torch.float32),
    (33, 128, torch.float32), (20, 16, torch.float32), (37, 32, torch.float16), (50, 64, torch.float16),
    (29, 32, torch.bfloat16),
])
def test_matches_reference(kernel_device, T, D, dtype):
    check_against_reference(*make_qkv(2, T, 3, D, dtype, kernel_device))


@pytest.mark.parametrize("T, D, dtype", [(40, 32, torch.float32), (23, 64, torch.float16)])
def test_non_causal(kernel_device, T, D, dtype):
    check_against_reference(*make_qkv(2, T, 2, D, dtype, kernel_device), causal=False)


@pytest.mark.parametrize("T, D, dtype, causal", [
    (1, 32, torch.float32, True), (45, 32, torch.float32, True), (100, 64, torch.float32, True),
    (26, 128, torch.float16, True), (31, 32, torch.float32, False),
])
def test_fused_rope(kernel_device, T, D, dtype, causal):
    check_against_reference(*make_qkv(2, T, 2, D, dtype, kernel_device), causal, rope_theta=THETA)


def test_fused_rope_equals_apply_rope_then_attention(kernel_device):
    q, k, v = make_qkv(2, 37, 2, 32, torch.float32, kernel_device)
    fused = flash_attn(q, k, v, rope_theta=THETA)
    unfused = flash_attn(*rope.apply_rope(q, k, THETA), v)
    assert rel_err(fused, unfused.double()) < TOL[torch.float32]


@pytest.mark.parametrize("layout, rope_theta", [("fused_qkv", None), ("fused_qkv", THETA), ("bhtd", THETA)])
def test_strided_views(kernel_device, layout, rope_theta):
    q, k, v = make_qkv(2, 37, 2, 32, torch.float32, kernel_device, layout)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, rope_theta=rope_theta)


@pytest.mark.parametrize("causal, rope_theta", [(True, None), (True, THETA), (False, None)])
def test_every_output_written_and_lse(kernel_device, causal, rope_theta):
    """NaN-filled output buffers must come back fully overwritten, with the same values as fresh ones."""
    q, k, v = (x.detach() for x in make_qkv(2, 37, 3, 32, torch.float32, kernel_device))
    o, lse = fa._flash_fwd(q, k, v, causal, rope_theta)
    poisoned_o, poisoned_lse = fa._flash_fwd(q, k, v, causal, rope_theta, out=torch.full_like(o, math.nan),
                                             lse=torch.full_like(lse, math.nan))
    assert torch.equal(poisoned_o, o) and torch.equal(poisoned_lse, lse)
    assert rel_err(lse, reference_lse(q, k, causal, rope_theta)) < TOL[torch.float32]

    do = torch.randn_like(o)
    grads = fa._flash_bwd(do, q, k, v, o, lse, causal, rope_theta)
    poisoned = fa._flash_bwd(do, q, k, v, o, lse, causal, rope_theta,
                             *(torch.full_like(q, math.nan, memory_format=torch.contiguous_format) for _ in range(3)))
    for name, x, ref in zip(("dq", "dk", "dv"), poisoned, grads):
        assert torch.isfinite(x).all() and torch.equal(x, ref), name


def test_torch_compile_fullgraph_matches_eager(kernel_device):
    class Attention(torch.nn.Module):  # the model's use: q, k, v unbound from one fused projection
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(64, 3 * 64)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, 2, C // 2).unbind(2)
            return flash_attn(q, k, v, rope_theta=THETA).view(B, T, C)

    torch.manual_seed(0)
    model = Attention().to(kernel_device)
    x = torch.randn(2, 20, 64, device=kernel_device)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled_grads = torch.autograd.grad(compiled.sum(), list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)


def test_custom_ops_pass_opcheck(kernel_device):
    q, k, v = make_qkv(1, 20, 2, 32, torch.float32, kernel_device)
    torch.library.opcheck(fa._flash_attn_fwd_op, (q, k, v, True, THETA))
    q, k, v = q.detach(), k.detach(), v.detach()  # the backward op has no backward of its own
    o, lse = fa._flash_fwd(q, k, v, True, THETA)
    torch.library.opcheck(fa._flash_attn_bwd_op, (torch.randn_like(o), q, k, v, o, lse, True, THETA))


def test_falls_back_to_reference_where_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(fa, "triton_runs_on", lambda device: False)
    q, k, v = (x.detach() for x in make_qkv(2, 9, 2, 32, torch.float32, "cpu"))
    assert torch.equal(flash_attn(q, k, v, rope_theta=THETA), attention_reference(q, k, v, rope_theta=THETA))


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_sdpa(causal):
    q, k, v = (torch.randn(2, 3, 11, 16, dtype=torch.float64) for _ in range(3))  # (B, H, T, D)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    got = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal).transpose(1, 2)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kernel, candidates", [("fwd", fa._FWD_CONFIGS), ("dkdv", fa._DKDV_CONFIGS),
                                                ("dq", fa._DQ_CONFIGS)])
def test_autotune_pruning(monkeypatch, kernel, candidates):
    """The GPU's autotune pruning, run here on its own: every candidate for the model's shapes, only the
    shortest own tile for short sequences, nothing over shared memory, never an empty list."""
    budget = 232448  # an H100's shared memory per block
    monkeypatch.setattr(fa, "_max_shared_mem", lambda device_index: budget)
    monkeypatch.setattr(fa, "_capability_major", lambda device_index: 9)
    configs, prune = fa._triton_configs(candidates), fa._pruner(kernel)
    owned = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"

    def kept(t_bucket, head_dim=64, rope=False, dtype=torch.bfloat16):
        q = torch.empty(0, dtype=dtype)
        return prune(configs, {"Q": q, "T_BUCKET": t_bucket}, HEAD_DIM=head_dim, CAUSAL=True, ROPE=rope)

    assert kept(256) == configs and kept(512) == configs
    shortest = min(c.kwargs[owned] for c in configs)
    assert {c.kwargs[owned] for c in kept(16)} == {shortest}
    for fused_rope in (False, True):  # D = 128: the largest tiles, and no config that spills registers
        survivors = kept(512, 128, fused_rope)
        fits = [fa._smem_bytes(kernel, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, 128, 2,
                               fused_rope) <= budget
                for c in survivors]
        assert survivors and (all(fits) or len(survivors) == 1)
        assert all(fa._accumulator_regs(kernel, c, 128) <= fa.MAX_ACCUMULATOR_REGS for c in survivors)
    smallest = min(configs, key=lambda c: fa._smem_bytes(kernel, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                         c.num_stages, 64, 4, False))
    assert kept(512, dtype=torch.float32) == [smallest]  # fp32 (tests): one config, compiled in seconds
    for major, spilling in fa._SPILLING_CONFIGS.items():  # configs that spill on an architecture are not timed
        monkeypatch.setattr(fa, "_capability_major", lambda device_index, major=major: major)
        for (name, head_dim, fused_rope), shapes in spilling.items():
            if name == kernel:
                survivors = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                             for c in kept(512, head_dim, fused_rope)}
                assert survivors and not survivors & set(shapes)


def _bad_inputs():
    x = torch.randn(2, 8, 2, 32)
    return {
        "3-D": ((x[0], x, x), {}, "q must be 4-D"),
        "shapes": ((x, x[:, :4], x), {}, "same shape"),
        "dtypes": ((x, x.half(), x), {}, "one dtype"),
        "float64": ((x.double(),) * 3, {}, "one dtype"),
        "devices": ((x, x.to("meta"), x), {}, "one device"),
        "head dim": ((torch.randn(2, 8, 2, 48),) * 3, {}, "head dim D=48"),
        "last dim strided": ((x, torch.randn(2, 8, 2, 64)[..., ::2], x), {}, "k: the last dimension"),
        "rope theta": ((x, x, x), {"rope_theta": 0.0}, "rope_theta must be positive"),
        "rope head dim": ((torch.randn(2, 8, 2, 16),) * 3, {"rope_theta": 1e4}, "fused RoPE needs head dim D >= 32"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_clear_error(case):
    args, kwargs, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        flash_attn(*args, **kwargs)


# --- GPU only: longer sequences, every head dim, bf16 -----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 17, 100, 257, 1000])
@pytest.mark.parametrize("rope_theta", [None, THETA])
def test_gpu_bf16_lengths(T, rope_theta):
    check_against_reference(*make_qkv(4, T, 4, 64, torch.bfloat16, "cuda"), rope_theta=rope_theta)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_head_dims_and_dtypes(D, dtype):
    check_against_reference(*make_qkv(2, 257, 4, D, dtype, "cuda", "fused_qkv"))


@pytest.mark.gpu
@pytest.mark.parametrize("causal, rope_theta", [(False, None), (True, THETA), (False, THETA)])
def test_gpu_masking_and_rope_at_length(causal, rope_theta):
    check_against_reference(*make_qkv(2, 513, 4, 64, torch.bfloat16, "cuda", "fused_qkv"), causal, rope_theta)


@pytest.mark.gpu
def test_gpu_deep_shape_with_fused_rope():
    # DEEP's attention (T = 512, 8 heads of 64) as the model calls it: bench/run_all.sh's GPU kernel test,
    # whose autotune candidates bench/precompile.py compiles ahead.
    check_against_reference(*make_qkv(4, 512, 8, 64, torch.bfloat16, "cuda", "fused_qkv"), rope_theta=THETA)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    q, k, v = make_qkv(4, 512, 8, 64, torch.bfloat16, "cuda", "fused_qkv")
    do = torch.randn_like(q)
    first, second = (torch.autograd.grad(flash_attn(q, k, v, rope_theta=THETA), (q, k, v), do) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
