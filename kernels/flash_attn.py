"""Causal flash attention (FlashAttention-2) in Triton, with RoPE optionally fused into the tile loads.

    o = softmax(mask(q k^T / sqrt(D))) v        q, k, v, o: (B, T, H, D)

Forward: one program per (query tile, batch*head) streams the key/value tiles with an online softmax and
saves only O and the per-row log-sum-exp. Backward recomputes the scores tile by tile: a preprocessing
pass for delta = rowsum(dO * O), then a dK/dV pass (one program per key tile sweeps the query tiles) and a
dQ pass (one program per query tile sweeps the key tiles). No atomics, so gradients are deterministic.
Causal masking skips the key tiles wholly after a query tile (loop bounds) and masks only the tiles on the
diagonal.

With rope_theta set, q and k tiles are rotated as they are loaded (half-split convention, position of row
t is t, angle t * theta ** (-2i / D), the same tables as kernels/rope.py), so the model needs no separate
RoPE pass; backward rotates dq and dk back by minus the angle, which makes them gradients w.r.t. the
un-rotated inputs.
"""
import contextlib
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .rope import rope_cos_sin, rope_reference
from .utils import check_last_dim_contiguous, is_interpreter, triton_runs_on

_LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in base 2: exp2 is what the hardware computes
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _head_offset(bh, H, stride_b, stride_h):
    """Element offset of head bh % H of batch bh // H, in int64 so large tensors cannot overflow."""
    return (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _load_rows(base, rows, stride_t, T, HEAD_DIM: tl.constexpr):
    """Rows `rows` of one head's (T, HEAD_DIM) slice, row stride stride_t; rows past T read as 0."""
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(base + rows[:, None] * stride_t + dims[None, :], mask=(rows < T)[:, None], other=0.0)


@triton.jit
def _store_rows(base, x, rows, stride_t, T, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    tl.store(base + rows[:, None] * stride_t + dims[None, :], x.to(base.dtype.element_ty),
             mask=(rows < T)[:, None])


@triton.jit
def _rope(x1, x2, rows, T, COS, SIN, HALF: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate the half-split pairs (x1, x2) = (dims i, dims i + D/2), each (rows, HALF), in fp32 by the RoPE
    angles of positions `rows`, or by minus them if INVERSE. COS, SIN: (T, HALF) fp32 tables."""
    offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    in_seq = (rows < T)[:, None]
    cos = tl.load(COS + offs, mask=in_seq, other=0.0)
    sin = tl.load(SIN + offs, mask=in_seq, other=0.0)
    if INVERSE:
        sin = -sin
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _load_qk(base, rows, stride_t, T, COS, SIN, HALF: tl.constexpr, ROPE: tl.constexpr):
    """A q or k tile as its two halves (rows, HALF), as the scores see them: rotated if ROPE, then rounded
    to the input dtype like rope_reference. Halves keep RoPE elementwise: no register shuffles."""
    x1 = _load_rows(base, rows, stride_t, T, HALF)
    x2 = _load_rows(base + HALF, rows, stride_t, T, HALF)
    if ROPE:
        y1, y2 = _rope(x1, x2, rows, T, COS, SIN, HALF, False)
        x1 = y1.to(x1.dtype)
        x2 = y2.to(x2.dtype)
    return x1, x2


@triton.jit
def _store_qk_grad(base, g1, g2, rows, stride_t, T, COS, SIN, HALF: tl.constexpr, ROPE: tl.constexpr):
    """Store the gradient halves of a q or k tile; with ROPE the scores saw R x, so the gradient w.r.t. x is
    R^T (rotation by minus the angle) times the one w.r.t. R x."""
    if ROPE:
        g1, g2 = _rope(g1, g2, rows, T, COS, SIN, HALF, True)
    _store_rows(base, g1, rows, stride_t, T, HALF)
    _store_rows(base + HALF, g2, rows, stride_t, T, HALF)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in fp32. UPCAST (interpreter only): it reads bf16 operands from their raw bits."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _scores(a1, a2, b1, b2, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b^T from the halves of a and b: a1 @ b1^T + a2 @ b2^T."""
    return _dot(a2, tl.trans(b2), _dot(a1, tl.trans(b1), None, PRECISION, UPCAST), PRECISION, UPCAST)


@triton.jit
def _keep(rows, cols, T, CAUSAL: tl.constexpr):
    """(rows, cols) score mask of a tile that straddles the diagonal (causal) or the end of the keys."""
    if CAUSAL:
        keep = cols[None, :] <= rows[:, None]
    else:
        keep = (cols < T)[None, :]
    return keep


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, lo, hi, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over the key tiles lo .. hi of one query tile; MASKED for the tiles that need it."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_qk(k_base, cols, stride_kt, T, COS, SIN, HEAD_DIM // 2, ROPE)
        s = _scores(q1, q2, k1, k2, PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if MASKED:
            s = tl.where(_keep(rows, cols, T, CAUSAL), s, float("-inf"))
        # Every row has a finite score in the first tile it meets (key 0 is never masked), so m_new is
        # finite and no -inf - -inf can occur.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, stride_vt, T, HEAD_DIM)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, COS, SIN,
              stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
              H, T, T_BUCKET, sm_scale,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Q, K, V: (B, T, H, HEAD_DIM), any strides with a contiguous last dim (views into a fused QKV
    # projection). O: contiguous (B, T, H, HEAD_DIM). LSE: (B, H, T) fp32, natural-log row log-sum-exp.
    # COS, SIN: (T, HEAD_DIM // 2) fp32 RoPE tables, None without ROPE. T_BUCKET only keys the autotuner.
    # Grid: (cdiv(T, BLOCK_M), B * H); BLOCK_N divides BLOCK_M.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    rows = start_m + tl.arange(0, BLOCK_M)
    q1, q2 = _load_qk(Q + _head_offset(bh, H, stride_qb, stride_qh), rows, stride_qt, T, COS, SIN, HEAD_DIM // 2,
                      ROPE)
    k_base = K + _head_offset(bh, H, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, H, stride_vb, stride_vh)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    qk_scale = sm_scale * _LOG2E
    if CAUSAL:  # keys before the tile: no mask; keys on the diagonal: masked; keys after it: skipped
        n_full = start_m
        n_end = tl.minimum(start_m + BLOCK_M, T)
    else:  # only the last key tile can run past T
        n_full = (T // BLOCK_N) * BLOCK_N
        n_end = T
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, 0, n_full,
                               T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, ROPE, PRECISION, UPCAST, False)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, n_full,
                               n_end, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, ROPE, PRECISION, UPCAST, True)
    o_base = O + _head_offset(bh, H, T * H * HEAD_DIM, HEAD_DIM)
    _store_rows(o_base, acc / l_i[:, None], rows, H * HEAD_DIM, T, HEAD_DIM)
    tl.store(LSE + bh * T + rows, (m_i + tl.math.log2(l_i)) * _LN2, mask=rows < T)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # O, DO: contiguous (B, T, H, HEAD_DIM). DELTA: (B, H, T) fp32, rowsum(dO * O).
    # Grid: (cdiv(T, BLOCK_M), B * H).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    offset = _head_offset(bh, H, T * H * HEAD_DIM, HEAD_DIM)
    o = _load_rows(O + offset, rows, H * HEAD_DIM, T, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO + offset, rows, H * HEAD_DIM, T, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + bh * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def _dkdv_tiles(dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, COS, SIN,
                cols, lo, hi, T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dK (unscaled, in halves) and dV of one key tile over the query tiles lo .. hi, transposed."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q1, q2 = _load_qk(q_base, rows, stride_qt, T, COS, SIN, HEAD_DIM // 2, ROPE)
        do = _load_rows(do_base, rows, stride_dot, T, HEAD_DIM)
        in_seq = rows < T
        # Rows past T get lse = +inf, hence p = 0: they add nothing to dK or dV.
        lse = tl.load(lse_base + rows, mask=in_seq, other=float("inf")) * _LOG2E
        delta = tl.load(delta_base + rows, mask=in_seq, other=0.0)
        p_t = tl.math.exp2(_scores(k1, k2, q1, q2, PRECISION, UPCAST) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:  # causal diagonal, transposed
            p_t = tl.where(cols[:, None] <= rows[None, :], p_t, 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        dp_t = _dot(v, tl.trans(do), None, PRECISION, UPCAST)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q1.dtype)
        dk1 = _dot(ds_t, q1, dk1, PRECISION, UPCAST)
        dk2 = _dot(ds_t, q2, dk2, PRECISION, UPCAST)
    return dk1, dk2, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, COS, SIN,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   H, T, T_BUCKET, sm_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Q, K, V as in _attn_fwd. DO, DK, DV: contiguous (B, T, H, HEAD_DIM). LSE, DELTA: (B, H, T) fp32.
    # One program owns BLOCK_N keys of one head and sweeps the query tiles that attend to them.
    # Grid: (cdiv(T, BLOCK_N), B * H); BLOCK_M divides BLOCK_N.
    HALF: tl.constexpr = HEAD_DIM // 2
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    cols = start_n + tl.arange(0, BLOCK_N)
    k1, k2 = _load_qk(K + _head_offset(bh, H, stride_kb, stride_kh), cols, stride_kt, T, COS, SIN, HALF, ROPE)
    v = _load_rows(V + _head_offset(bh, H, stride_vb, stride_vh), cols, stride_vt, T, HEAD_DIM)
    q_base = Q + _head_offset(bh, H, stride_qb, stride_qh)
    grad_offset = _head_offset(bh, H, T * H * HEAD_DIM, HEAD_DIM)
    do_base = DO + grad_offset
    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * _LOG2E
    if CAUSAL:  # queries on the diagonal: masked; queries after it: no mask; queries before it: skipped
        m_full = tl.minimum(start_n + BLOCK_N, T)
        dk1, dk2, dv = _dkdv_tiles(dk1, dk2, dv, k1, k2, v, q_base, do_base, LSE + bh * T, DELTA + bh * T,
                                   stride_qt, H * HEAD_DIM, COS, SIN, cols, start_n, m_full, T, qk_scale, HEAD_DIM,
                                   BLOCK_M, ROPE, PRECISION, UPCAST, True)
    else:  # keys past T are never stored, so nothing needs a mask
        m_full = 0
    dk1, dk2, dv = _dkdv_tiles(dk1, dk2, dv, k1, k2, v, q_base, do_base, LSE + bh * T, DELTA + bh * T, stride_qt,
                               H * HEAD_DIM, COS, SIN, cols, m_full, T, T, qk_scale, HEAD_DIM, BLOCK_M, ROPE,
                               PRECISION, UPCAST, False)
    _store_qk_grad(DK + grad_offset, dk1 * sm_scale, dk2 * sm_scale, cols, H * HEAD_DIM, T, COS, SIN, HALF, ROPE)
    _store_rows(DV + grad_offset, dv, cols, H * HEAD_DIM, T, HEAD_DIM)


@triton.jit
def _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, lo, hi, T,
              qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dQ (unscaled, in halves) of one query tile over the key tiles lo .. hi."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_qk(k_base, cols, stride_kt, T, COS, SIN, HEAD_DIM // 2, ROPE)
        v = _load_rows(v_base, cols, stride_vt, T, HEAD_DIM)
        p = tl.math.exp2(_scores(q1, q2, k1, k2, PRECISION, UPCAST) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_keep(rows, cols, T, CAUSAL), p, 0.0)
        dp = _dot(do, tl.trans(v), None, PRECISION, UPCAST)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = _dot(ds, k1, dq1, PRECISION, UPCAST)
        dq2 = _dot(ds, k2, dq2, PRECISION, UPCAST)
    return dq1, dq2


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, COS, SIN,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 H, T, T_BUCKET, sm_scale,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Q, K, V as in _attn_fwd. DO, DQ: contiguous (B, T, H, HEAD_DIM). LSE, DELTA: (B, H, T) fp32.
    # One program owns BLOCK_M queries of one head and sweeps the key tiles they attend to.
    # Grid: (cdiv(T, BLOCK_M), B * H); BLOCK_N divides BLOCK_M.
    HALF: tl.constexpr = HEAD_DIM // 2
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    rows = start_m + tl.arange(0, BLOCK_M)
    q1, q2 = _load_qk(Q + _head_offset(bh, H, stride_qb, stride_qh), rows, stride_qt, T, COS, SIN, HALF, ROPE)
    grad_offset = _head_offset(bh, H, T * H * HEAD_DIM, HEAD_DIM)
    do = _load_rows(DO + grad_offset, rows, H * HEAD_DIM, T, HEAD_DIM)
    in_seq = rows < T
    lse = tl.load(LSE + bh * T + rows, mask=in_seq, other=float("inf")) * _LOG2E  # rows past T: p = 0
    delta = tl.load(DELTA + bh * T + rows, mask=in_seq, other=0.0)
    k_base = K + _head_offset(bh, H, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, H, stride_vb, stride_vh)
    dq1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    qk_scale = sm_scale * _LOG2E
    if CAUSAL:  # same tile split as the forward pass
        n_full = start_m
        n_end = tl.minimum(start_m + BLOCK_M, T)
    else:
        n_full = (T // BLOCK_N) * BLOCK_N
        n_end = T
    dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, 0,
                         n_full, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, ROPE, PRECISION, UPCAST, False)
    dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows,
                         n_full, n_end, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, ROPE, PRECISION, UPCAST, True)
    _store_qk_grad(DQ + grad_offset, dq1 * sm_scale, dq2 * sm_scale, rows, H * HEAD_DIM, T, COS, SIN, HALF, ROPE)


# ----------------------------------------------------------------------------------------------------
# Autotuning: a few candidates per kernel for the BASE (T=256) and DEEP (T=512) shapes at D=64 on Hopper
# and Ampere, pruned by sequence length and shared memory before any is compiled.
# ----------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). fwd and dq own BLOCK_M queries; dkdv owns BLOCK_N keys.
_FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)]
_DKDV_CONFIGS = [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (16, 64, 4, 4)]
_DQ_CONFIGS = [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 4)]
# The interpreter would "benchmark" every candidate on the CPU: it gets one small config, with unequal
# BLOCK_M and BLOCK_N so tests cover both unmasked and diagonal tiles at small T.
_INTERPRETER_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
_PREPROCESS_BLOCK = 64


def _configs(name: str, candidates: list[tuple]) -> list[triton.Config]:
    chosen = [_INTERPRETER_CONFIGS[name]] if is_interpreter() else candidates
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in chosen]


@functools.cache
def _max_shared_mem(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _pruner(owned: str, smem_rows):
    """early_config_prune for a kernel whose programs own BLOCK_<owned> rows of T.

    Drops configs whose owned tile is longer than T rounded up to a power of two (mostly padding, and too
    few programs), keeping the smallest tile, and configs whose tiles (smem_rows(BLOCK_M, BLOCK_N,
    stages) rows of HEAD_DIM elements: the resident tiles plus one set of streamed tiles per pipeline
    stage) overflow shared memory.
    """
    def prune(configs, named_args, **kwargs):
        q, t_bucket = named_args["Q"], named_args["T_BUCKET"]
        row_bytes = kwargs["HEAD_DIM"] * q.element_size()
        budget = _max_shared_mem(q.device.index)
        longest = max(t_bucket, min(c.kwargs[owned] for c in configs))

        def smem(c):
            return smem_rows(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) * row_bytes

        kept = [c for c in configs if c.kwargs[owned] <= longest and smem(c) <= budget]
        return kept or [min(configs, key=smem)]
    return prune


_AUTOTUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "ROPE"]  # plus the tensors' dtypes, which triton adds
_attn_fwd = triton.autotune(  # resident: Q; streamed: K, V
    _configs("fwd", _FWD_CONFIGS), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("BLOCK_M", lambda m, n, s: m + 2 * n * s)})(_attn_fwd)
_attn_bwd_dkdv = triton.autotune(  # resident: K, V; streamed: Q, dO
    _configs("dkdv", _DKDV_CONFIGS), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("BLOCK_N", lambda m, n, s: 2 * n + 2 * m * s)})(_attn_bwd_dkdv)
_attn_bwd_dq = triton.autotune(  # resident: Q, dO; streamed: K, V
    _configs("dq", _DQ_CONFIGS), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("BLOCK_M", lambda m, n, s: 2 * m + 2 * n * s)})(_attn_bwd_dq)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device):
    """fp32 (T, D/2) cos and sin tables, the ones rope_reference uses; cached, as every layer asks for the same."""
    return rope_cos_sin(seq_len, head_dim, theta, 0, device=device, dtype=torch.float32)


def _common_args(q, k, v, rope_theta):
    """Arguments shared by the three attention kernels: RoPE tables, strides, sizes, scale, constexprs."""
    B, T, H, D = q.shape
    cos, sin = _rope_tables(T, D, rope_theta, q.device) if rope_theta is not None else (None, None)
    runtime = (cos, sin, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, T, triton.next_power_of_2(T),
               1.0 / math.sqrt(D))
    # fp32 inputs get exact fp32 products (else tf32); the precision is ignored for 16-bit inputs.
    constexprs = dict(HEAD_DIM=D, ROPE=rope_theta is not None, UPCAST=is_interpreter(),
                      PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return runtime, constexprs


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, whichever is current (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _flash_fwd(q, k, v, causal: bool, rope_theta: Optional[float], out=None, lse=None):
    """(o, lse): o contiguous (B, T, H, D), lse (B, H, T) fp32. out / lse: buffers to write into (tests)."""
    B, T, H, D = q.shape
    o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32) if lse is None else lse
    runtime, constexprs = _common_args(q, k, v, rope_theta)
    with _on_device(q.device):
        _attn_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, o, lse, *runtime, CAUSAL=causal, **constexprs)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal: bool, rope_theta: Optional[float], dq=None, dk=None, dv=None):
    """(dq, dk, dv), each contiguous (B, T, H, D); dq / dk / dv: buffers to write into (tests)."""
    B, T, H, D = q.shape
    do, o = do.contiguous(), o.contiguous()  # no-ops for what autograd hands over
    dq, dk, dv = (torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) if g is None else g for g in (dq, dk, dv))
    delta = torch.empty_like(lse)
    runtime, constexprs = _common_args(q, k, v, rope_theta)
    with _on_device(q.device):
        _attn_bwd_preprocess[(triton.cdiv(T, _PREPROCESS_BLOCK), B * H)](
            o, do, delta, H, T, HEAD_DIM=D, BLOCK_M=_PREPROCESS_BLOCK)
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)](
            q, k, v, do, dk, dv, lse, delta, *runtime, CAUSAL=causal, **constexprs)
        _attn_bwd_dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, do, dq, lse, delta, *runtime, CAUSAL=causal, **constexprs)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), with autograd
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("charlm::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       rope_theta: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd(q, k, v, causal, rope_theta)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, causal, rope_theta):
    B, T, H, D = q.shape
    return q.new_empty((B, T, H, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("charlm::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool,
                       rope_theta: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_bwd(do, q, k, v, o, lse, causal, rope_theta)


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, rope_theta):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.rope_theta = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.rope_theta)
    return dq, dk, dv, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public function and reference
# ----------------------------------------------------------------------------------------------------

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k, v, rope_theta) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"flash_attn: {name} must be 4-D (B, T, H, D), got shape {tuple(x.shape)}")
        check_last_dim_contiguous(f"flash_attn: {name}", x)
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"flash_attn: q, k, v must have the same shape (B, T, H, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise ValueError(f"flash_attn: q, k, v must share one dtype among {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"flash_attn: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"flash_attn: head dim D={q.shape[-1]} is unsupported, expected one of {HEAD_DIMS}")
    if rope_theta is not None and not rope_theta > 0:
        raise ValueError(f"flash_attn: rope_theta must be positive (or None for no RoPE), got {rope_theta}")


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
               rope_theta: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention with scale 1/sqrt(D): q, k, v (B, T, H, D) -> o, contiguous (B, T, H, D).

    q, k, v may be any views with a contiguous last dim (e.g. unbound from a fused QKV projection viewed
    as (B, T, 3, H, D)); they are not copied. With rope_theta set, RoPE (half-split, positions 0 .. T-1)
    is applied to q and k inside the kernel: the result equals rope_reference then attention. Runs the
    Triton kernel wherever Triton runs (CUDA; the CPU under TRITON_INTERPRET=1), else attention_reference.
    """
    _check_inputs(q, k, v, rope_theta)
    if triton_runs_on(q.device):
        return _flash_attn_fwd_op(q, k, v, causal, rope_theta)[0]
    return attention_reference(q, k, v, causal, rope_theta)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        rope_theta: Optional[float] = None) -> torch.Tensor:
    """Pure-PyTorch attention, (B, T, H, D) in and out: explicit scores and masked softmax, computed in at
    least float32 and returned in the input dtype. Materialises the (B, H, T, T) scores."""
    if rope_theta is not None:
        q, k = rope_reference(q, k, rope_theta)
    compute = torch.promote_types(q.dtype, torch.float32)
    T, D = q.shape[1], q.shape[-1]
    scores = torch.einsum("bthd,bshd->bhts", q.to(compute), k.to(compute)) / math.sqrt(D)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.to(compute)).to(q.dtype)
