"""kernels/rope.py: the Triton RoPE kernel against the float64 reference, forward and backward.

Runs on the GPU when present, else through Triton's interpreter (tests/conftest.py), so shapes are
small. On the interpreter bf16 loads are exact but stores truncate instead of rounding to nearest: an
error of at most one bf16 ulp, which the bf16 tolerance covers.
"""
import pytest
import torch

from charlm.kernels import rope
from charlm.kernels.rope import _rope_launch, _rope_op, apply_rope, rope_reference

# (B, T, Hq, Hk, D): lengths 1, odd and not a power of 2; every model head dim; batch and heads > 1.
SHAPES = [
    (1, 1, 2, 2, 32),
    (2, 7, 4, 4, 64),
    (1, 33, 3, 3, 128),
    (1, 100, 2, 2, 64),
    (2, 7, 4, 2, 32),  # fewer k heads than q heads, as in grouped-query attention
]
# (layout, dtype, tolerance on the norm-wise relative error). Addressing does not depend on the dtype
# nor the casts on the layout, so every layout runs in fp32 and the half types in the model's layout.
LAYOUT_DTYPES = [
    pytest.param("contiguous", torch.float32, 1e-5, id="contiguous-fp32"),
    pytest.param("heads_major", torch.float32, 1e-5, id="heads_major-fp32"),
    pytest.param("fused_qkv", torch.float32, 1e-5, id="fused_qkv-fp32"),
    pytest.param("fused_qkv", torch.bfloat16, 1e-2, id="fused_qkv-bf16"),
    pytest.param("fused_qkv", torch.float16, 1e-2, id="fused_qkv-fp16"),
]


def _make_qk(shape, layout, dtype, device):
    """q (B, T, Hq, D) and k (B, T, Hk, D) requiring grad, laid out as the model may pass them."""
    torch.manual_seed(0)
    B, T, Hq, Hk, D = shape
    if layout == "fused_qkv":  # the (B, T, (Hq + 2 Hk) * D) output of one QKV projection
        qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=device, dtype=dtype, requires_grad=True)
        return qkv[..., :Hq * D].view(B, T, Hq, D), qkv[..., Hq * D:(Hq + Hk) * D].view(B, T, Hk, D)
    if layout == "heads_major":  # (B, H, T, D) memory, seen as (B, T, H, D)
        qk = torch.randn(B, Hq + Hk, T, D, device=device, dtype=dtype, requires_grad=True)
        return qk[:, :Hq].transpose(1, 2), qk[:, Hq:].transpose(1, 2)
    return (torch.randn(B, T, Hq, D, device=device, dtype=dtype, requires_grad=True),
            torch.randn(B, T, Hk, D, device=device, dtype=dtype, requires_grad=True))


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||x - ref|| / ||ref||, in float64."""
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("layout, dtype, tol", LAYOUT_DTYPES)
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, offset, layout, dtype, tol, kernel_device):
    q, k = _make_qk(shape, layout, dtype, kernel_device)
    out = apply_rope(q, k, offset=offset)
    grads = [torch.randn_like(o) for o in out]
    grads_in = torch.autograd.grad(out, (q, k), grads)

    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    ref = rope_reference(q64, k64, offset=offset)
    ref_grads_in = torch.autograd.grad(ref, (q64, k64), [g.double() for g in grads])

    assert all(o.is_contiguous() and o.dtype == dtype for o in out)
    for name, x, x_ref in zip(["q_out", "k_out", "dq", "dk"], (*out, *grads_in), (*ref, *ref_grads_in)):
        assert not x.isnan().any(), name
        assert _rel_err(x, x_ref) < tol, name


# Head counts and D/2 that are not powers of 2, so the kernel's padded lanes are masked; and the model's
# head dims, in fp32 and bf16.
@pytest.mark.parametrize("shape, dtype", [
    ((2, 7, 3, 5, 6), torch.float32), ((1, 33, 2, 2, 48), torch.float32), ((2, 9, 2, 2, 32), torch.bfloat16),
    ((1, 17, 3, 3, 64), torch.bfloat16), ((1, 5, 2, 2, 128), torch.float16),
], ids=str)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_writes_every_output_element(shape, dtype, inverse, kernel_device):
    q, k = (x.detach() for x in _make_qk(shape, "fused_qkv", dtype, kernel_device))
    q_out, k_out = (torch.full(x.shape, float("nan"), device=kernel_device, dtype=dtype) for x in (q, k))
    _rope_launch(q, k, q_out, k_out, theta=10000.0, offset=3, inverse=inverse)

    assert not q_out.isnan().any() and not k_out.isnan().any()
    if inverse:  # rotating the result forward again must give back the input
        actual, expected = rope_reference(q_out.double(), k_out.double(), offset=3), (q, k)
    else:
        actual, expected = (q_out, k_out), rope_reference(q.double(), k.double(), offset=3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, e in zip(actual, expected):
        assert _rel_err(a, e.double()) < tol


def test_backward_accepts_broadcast_gradients(kernel_device):
    # .sum() sends expanded gradients with stride 0 in every dimension, the last one included.
    q, k = _make_qk((1, 7, 2, 2, 32), "fused_qkv", torch.float32, kernel_device)
    grads_in = torch.autograd.grad([o.sum() for o in apply_rope(q, k, offset=2)], (q, k))
    ref_grads_in = torch.autograd.grad([o.sum() for o in rope_reference(q, k, offset=2)], (q, k))
    torch.testing.assert_close(grads_in, ref_grads_in)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_op_registration(inverse, kernel_device):
    # Schema, fake (meta) implementation and autograd registration agree with the real op.
    q, k = _make_qk((2, 5, 2, 2, 32), "fused_qkv", torch.float32, kernel_device)
    torch.library.opcheck(_rope_op, (q, k, 10000.0, 3, inverse))


class _RopeAttentionInputs(torch.nn.Module):
    """The model's pattern: one QKV projection, its output viewed as q, k, v and RoPE applied in place."""

    def __init__(self, width: int, n_head: int):
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)
        q, k = apply_rope(q, k, offset=3)
        return (q * k).sum(-1) + v.sum(-1)


def test_compiles_without_graph_break(kernel_device):
    torch.manual_seed(0)
    model = _RopeAttentionInputs(width=64, n_head=2).to(kernel_device)
    x = torch.randn(2, 5, 64, device=kernel_device)
    compiled = torch.compile(model, fullgraph=True)

    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled_out = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_grads, eager_grads)


def test_falls_back_to_reference_where_triton_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter
    q, k = (x.detach() for x in _make_qk((2, 7, 2, 2, 32), "fused_qkv", torch.float32, "cpu"))
    for x, x_ref in zip(apply_rope(q, k, offset=4), rope_reference(q, k, offset=4)):
        assert torch.equal(x, x_ref)


@pytest.mark.parametrize("offset", [10**5, 10**6])
def test_far_positions_keep_float32_accuracy(offset, kernel_device):
    # Angles of up to 1e6 radians: a float32 angle would already be off by 0.06 rad (relative error 5e-3).
    q, k = (x.detach() for x in _make_qk((1, 4, 2, 2, 64), "contiguous", torch.float32, kernel_device))
    out = apply_rope(q, k, offset=offset)
    ref = rope_reference(q.double(), k.double(), offset=offset)
    for x, x_ref in zip(out, ref):
        assert _rel_err(x, x_ref) < 1e-6


def test_table_covers_only_the_positions_asked_for(monkeypatch, kernel_device):
    asked = []
    real = rope.rope_cos_sin

    def recording(seq_len, head_dim, theta, offset, **kwargs):
        asked.append((seq_len, offset))
        return real(seq_len, head_dim, theta, offset, **kwargs)

    monkeypatch.setattr(rope, "rope_cos_sin", recording)
    rope.cos_sin_table.cache_clear()
    q, k = (x.detach() for x in _make_qk((1, 3, 2, 2, 32), "contiguous", torch.float32, kernel_device))
    out = apply_rope(q, k, offset=10**6)
    assert asked == [(4, 10**6)]  # 3 positions rounded up to 4 rows, not 2**20 from position 0
    for x, x_ref in zip(out, rope_reference(q.double(), k.double(), offset=10**6)):
        assert _rel_err(x, x_ref) < 1e-6


@pytest.mark.parametrize("q_shape, k_shape", [
    ((2, 3, 0, 8), (2, 3, 0, 8)),  # no heads
    ((2, 3, 4, 0), (2, 3, 4, 0)),  # D = 0
    ((2, 0, 4, 8), (2, 0, 4, 8)),  # no positions
    ((0, 3, 4, 8), (0, 3, 4, 8)),  # no batch
    ((2, 3, 4, 8), (2, 3, 0, 8)),  # q has heads, k none
], ids=str)
def test_empty_inputs_give_empty_outputs(q_shape, k_shape, kernel_device):
    q = torch.randn(q_shape, device=kernel_device, requires_grad=True)
    k = torch.randn(k_shape, device=kernel_device, requires_grad=True)
    out = apply_rope(q, k, offset=2)
    assert [tuple(x.shape) for x in out] == [q_shape, k_shape]
    for x, x_ref in zip(out, rope_reference(q.detach().double(), k.detach().double(), offset=2)):
        assert torch.allclose(x.double(), x_ref, atol=1e-6)
    grads = torch.autograd.grad(out, (q, k), [torch.ones_like(x) for x in out])
    assert [tuple(g.shape) for g in grads] == [q_shape, k_shape]


_X = torch.zeros(2, 3, 4, 8)


@pytest.mark.parametrize("q, k, offset, message", [
    pytest.param(_X[0], _X[0], 0, r"must be \(B, T, H, D\)", id="not-4d"),
    pytest.param(_X, _X[:, :2], 0, "agree in B, T and D", id="shape-mismatch"),
    pytest.param(_X[..., :7], _X[..., :7], 0, "must be even, got 7", id="odd-head-dim"),
    pytest.param(_X, _X.half(), 0, "share one dtype", id="dtype-mismatch"),
    pytest.param(_X.double(), _X.double(), 0, "share one dtype", id="float64"),
    pytest.param(_X, _X.to("meta"), 0, "on one device", id="device-mismatch"),
    pytest.param(_X[..., ::2], _X[..., ::2], 0, "q: the last dimension must be contiguous", id="strided-last-dim"),
    pytest.param(_X, _X, -1, "offset must be >= 0", id="negative-offset"),
])
def test_rejects_bad_input(q, k, offset, message):
    with pytest.raises(ValueError, match=message):
        apply_rope(q, k, offset=offset)


@pytest.mark.parametrize("theta, offset, message", [
    pytest.param(0.0, 0, "theta must be positive, got 0.0", id="zero-theta"),
    pytest.param(-1.0, 0, "theta must be positive", id="negative-theta"),
    pytest.param(float("nan"), 0, "theta must be positive, got nan", id="nan-theta"),
    pytest.param(1e4, 2.5, "offset must be a whole number of positions, got 2.5", id="fractional-offset"),
    pytest.param(1e4, float("nan"), "offset must be a whole number", id="nan-offset"),
    pytest.param(1e4, True, "offset must be a whole number", id="bool-offset"),
])
def test_rejects_bad_theta_and_offset(theta, offset, message):
    with pytest.raises(ValueError, match=message):
        apply_rope(_X, _X, theta, offset)


def test_integral_float_offset_is_that_offset(kernel_device):
    q, k = (x.detach() for x in _make_qk((1, 3, 2, 2, 32), "contiguous", torch.float32, kernel_device))
    for x, y in zip(apply_rope(q, k, offset=7.0), apply_rope(q, k, offset=7)):
        assert torch.equal(x, y)
