"""Rotary position embeddings (RoPE), half-split convention: dimension i pairs with i + D/2.

For a row at position p and pair index i < D/2, with angle a = p * theta ** (-2i / D):
    out[i]       = x[i] * cos(a) - x[i + D/2] * sin(a)
    out[i + D/2] = x[i + D/2] * cos(a) + x[i] * sin(a)

Layers, top to bottom: the pure-PyTorch reference, the Triton kernel, its launcher, the
``charlm::rope`` custom op (with fake and autograd registrations), and the public ``apply_rope``.

cos/sin come from a float32 table built by ``rope_cos_sin`` and cached per (first position, positions,
head dim, theta, device), not computed in the kernel: the table makes the kernel's cos/sin bit-identical
to the reference's, while in-kernel frequencies (exp2) and tl.cos/tl.sin would round differently from
PyTorch's, and their accuracy on angles of hundreds of radians depends on each backend's lowering.
The angles are computed in float64 and only cos and sin are rounded to float32: a float32 angle
p * theta ** (-2i / D) is off by about an ulp of the angle (0.06 rad at position 1e6), which made the
table's relative error 5e-4 at position 1e5 and 5e-3 at 1e6; rounding only cos and sin leaves 2e-8.
The table costs little: a program reads one row of D/2 cos and D/2 sin values, shared by all heads
of q and k, and the rows stay in L2 across the batch (the table for T = 512, D = 64 is 128 KiB). It
covers the positions asked for, offset .. offset + T - 1 (T rounded up to a power of 2), not every
position from 0.
"""
import functools
import numbers

import torch
import triton
import triton.language as tl

from charlm.kernels.utils import check_last_dim_contiguous, triton_runs_on


def rope_cos_sin(seq_len: int, head_dim: int, theta: float = 10000.0, offset: int = 0,
                 device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_dim // 2) for positions offset .. offset + seq_len - 1,
    from float64 angles, returned in dtype."""
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim // 2, device=device, dtype=torch.float64) * 2 / head_dim)
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)  # (T, D/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads of (B, T, H, D/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, theta: float = 10000.0,
                   offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch RoPE of q and k, each (B, T, H, D); computed in at least float32, returned in the input dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)
    cos, sin = rope_cos_sin(q.shape[1], q.shape[-1], theta, offset, device=q.device, dtype=compute)
    return (_rotate(q.to(compute), cos, sin).to(q.dtype),
            _rotate(k.to(compute), cos, sin).to(k.dtype))


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_h, cos, sin, cols,
                  HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    """Rotates the HEADS rows of one (b, t) position: x_ptr and out_ptr point at head 0, dimension 0;
    the output is contiguous (head stride 2 * HALF). cos, sin: (1, HALF_PAD) float32; cols: (HALF_PAD,)."""
    heads = tl.arange(0, HEADS_PAD)[:, None]  # (HEADS_PAD, 1)
    mask = (heads < HEADS) & (cols[None, :] < HALF)  # (HEADS_PAD, HALF_PAD)
    x1_ptrs = x_ptr + heads * stride_h + cols[None, :]
    out1_ptrs = out_ptr + heads * (2 * HALF) + cols[None, :]
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(out1_ptrs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out1_ptrs + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr,            # (B, T, Hq, D), (B, T, Hk, D): any strides, last dim contiguous
    q_out_ptr, k_out_ptr,    # (B, T, Hq, D), (B, T, Hk, D): contiguous
    cos_ptr, sin_ptr,        # (>= T, D/2) float32, contiguous; row t holds position offset + t
    seq_len,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr,  # Hq, Hk, D/2
    Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,  # powers of 2
    INVERSE: tl.constexpr,   # rotate by -angle: the backward pass
):
    """Grid (T, B): one program per position of one sequence, all heads of q and k."""
    # int64 offsets: b * stride_qb overflows int32 for tensors past 2**31 elements.
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    table_row = t * HALF + cols
    cos = tl.load(cos_ptr + table_row, mask=cols < HALF, other=0.0)[None, :]  # (1, HALF_PAD)
    sin = tl.load(sin_ptr + table_row, mask=cols < HALF, other=0.0)[None, :]
    if INVERSE:
        sin = -sin
    row = b * seq_len + t  # row of the contiguous outputs
    _rotate_heads(q_ptr + b * stride_qb + t * stride_qt, q_out_ptr + row * (Q_HEADS * 2 * HALF),
                  stride_qh, cos, sin, cols, Q_HEADS, HALF, Q_HEADS_PAD)
    _rotate_heads(k_ptr + b * stride_kb + t * stride_kt, k_out_ptr + row * (K_HEADS * 2 * HALF),
                  stride_kh, cos, sin, cols, K_HEADS, HALF, K_HEADS_PAD)


@functools.lru_cache(maxsize=16)
def cos_sin_table(n_positions: int, head_dim: int, theta: float, device: torch.device,
                  first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_cos_sin for positions first .. first + n_positions - 1 in fp32, cached: every layer asks for the
    same. Callers round n_positions up to a power of 2 so that growing lengths (generation) rebuild it
    rarely for a given first position. Shared with flash_attn's fused RoPE (first = 0)."""
    return rope_cos_sin(n_positions, head_dim, theta, first, device=device)


def _rope_launch(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
                 theta: float, offset: int, inverse: bool = False) -> None:
    """Writes RoPE of q, k (rotation by -angle if inverse) into the contiguous q_out, k_out. One launch."""
    batch, seq_len, q_heads, head_dim = q.shape
    k_heads = k.shape[2]
    if q.numel() == 0 and k.numel() == 0:  # no batch, positions, heads or head dim: nothing to rotate
        return
    cos, sin = cos_sin_table(triton.next_power_of_2(seq_len), head_dim, theta, q.device, offset)
    # At least one lane: q or k may have no heads while the other has some.
    q_heads_pad, k_heads_pad = (max(1, triton.next_power_of_2(h)) for h in (q_heads, k_heads))
    half_pad = triton.next_power_of_2(head_dim // 2)
    # About 8 elements of each half-row tile per thread: one 16-byte vector in bf16.
    num_warps = min(8, max(1, max(q_heads_pad, k_heads_pad) * half_pad // 256))
    _rope_kernel[(seq_len, batch)](
        q, k, q_out, k_out, cos, sin, seq_len,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_heads, k_heads, head_dim // 2, q_heads_pad, k_heads_pad, half_pad,
        inverse, num_warps=num_warps,
    )


@torch.library.custom_op("charlm::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, theta: float, offset: int,
             inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # apply_rope rejects a strided last dim, but the op also receives autograd's incoming gradients,
    # which may be broadcast views (of a .sum(), say) with a zero last stride.
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rope_launch(q, k, q_out, k_out, theta, offset, inverse)
    return q_out, k_out


@_rope_op.register_fake
def _(q, k, theta, offset, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    _, _, ctx.theta, ctx.offset, ctx.inverse = inputs  # angles only: the backward needs no tensors


def _backward(ctx, grad_q, grad_k):
    # The rotation is orthogonal, so its vector-Jacobian product is the opposite rotation.
    grad_q, grad_k = _rope_op(grad_q, grad_k, ctx.theta, ctx.offset, not ctx.inverse)
    return grad_q, grad_k, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, theta: float, offset: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be (B, T, H, D), got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    (bq, tq, _, dq), (bk, tk, _, dk) = q.shape, k.shape
    if (bq, tq, dq) != (bk, tk, dk):
        raise ValueError(f"rope: q and k must agree in B, T and D, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if dq % 2:
        raise ValueError(f"rope: head dim D must be even, got {dq}")
    if q.dtype != k.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"rope: q and k must share one dtype of {_DTYPES}, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"rope: q and k must be on one device, got {q.device} and {k.device}")
    if not theta > 0:  # NaN too
        raise ValueError(f"rope: theta must be positive, got {theta}")
    integral = isinstance(offset, numbers.Integral) or (isinstance(offset, float) and offset.is_integer())
    if isinstance(offset, bool) or not integral:
        raise ValueError(f"rope: offset must be a whole number of positions, got {offset!r}")
    if offset < 0:
        raise ValueError(f"rope: offset must be >= 0, got {offset}")
    check_last_dim_contiguous("rope: q", q)
    check_last_dim_contiguous("rope: k", k)


def apply_rope(q: torch.Tensor, k: torch.Tensor, theta: float = 10000.0,
               offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q (B, T, Hq, D) and k (B, T, Hk, D) at positions offset .. offset + T - 1.

    float32, bfloat16 or float16, any strides with the last dimension contiguous (views into a fused
    QKV projection are read in place); returns new contiguous tensors in the input dtype, computed in
    float32. One Triton launch forward and one backward; the pure-PyTorch reference where Triton
    cannot run.
    """
    _check_inputs(q, k, theta, offset)
    offset = int(offset)
    if not triton_runs_on(q.device):
        return rope_reference(q, k, theta, offset)
    return _rope_op(q, k, float(theta), offset, False)
