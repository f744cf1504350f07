"""Flash attention (FlashAttention-2) in Triton, causal by default, with RoPE optionally fused into the loads.

    o = softmax(mask(q k^T / sqrt(D))) v        q, k, v, o: (B, T, H, D), D in 16, 32, 64, 128

Forward: one program per (query tile, batch * head) streams the key/value tiles with an online softmax in
base 2 and saves only O and the per-row log-sum-exp. Backward recomputes the scores tile by tile: a
preprocessing pass for delta = rowsum(dO * O), then a dK/dV pass (one program per key tile sweeps the
query tiles) and a dQ pass (one program per query tile sweeps the key tiles): no atomics, so gradients are
deterministic. Causal masking: tiles wholly after the diagonal are skipped by the loop bounds, tiles wholly
before it run without a mask, and only the diagonal tiles are masked (each loop is compiled with its own
MASKED constant). Any T: rows past T read as zero, are never stored, and get lse = +inf in backward so
they contribute nothing.

RoPE (rope_theta set; half-split convention, row t at position t; D >= 32): q and k tiles are rotated as
they are loaded, from the fp32 cos/sin tables (rope.cos_sin_table) that rope_reference uses, and rounded to
the input dtype as rope_reference rounds them; so the result is rope_reference then attention, without a
separate RoPE pass over memory. The tiles are kept as their two halves (dims i and i + D/2, which the
rotation pairs): each element and table entry is read once, no register shuffle is needed, and a score is
one dot per half. Compiled with Triton 3.6 for sm_90a at D=64, this takes a third less shared memory than
rotating whole tiles (each with its half-swapped partner) did, at the same registers in the forward pass
and more in the backward. Backward rotates dq and dk back by minus the angle, half by half.

Under TRITON_INTERPRET=1 (CPU) the kernels run with one fixed small config, and dot operands are upcast
to fp32 because the interpreter reads bf16 dot operands from their raw bits.
"""
import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from .rope import cos_sin_table, rope_reference
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
def _load_rows(base, rows, stride_t, T, WIDTH: tl.constexpr):
    """Columns 0 .. WIDTH of rows `rows` of one head's (T, D) slice, row stride stride_t; rows past T read as 0."""
    cols = tl.arange(0, WIDTH)
    return tl.load(base + rows[:, None] * stride_t + cols[None, :], mask=(rows < T)[:, None], other=0.0)


@triton.jit
def _store_rows(base, x, rows, stride_t, T, WIDTH: tl.constexpr):
    """x (rows, WIDTH) into columns 0 .. WIDTH of those rows, in the buffer's dtype; rows past T are skipped."""
    cols = tl.arange(0, WIDTH)
    tl.store(base + rows[:, None] * stride_t + cols[None, :], x.to(base.dtype.element_ty),
             mask=(rows < T)[:, None])


@triton.jit
def _rope_cos_sin(COS, SIN, rows, T, pairs, HALF: tl.constexpr):
    """cos and sin (rows, pairs) of the RoPE angles of positions `rows`, pair indices `pairs` (< HALF), in fp32,
    from the (>= T, HALF) tables."""
    offs = rows[:, None] * HALF + pairs[None, :]
    in_seq = (rows < T)[:, None]
    return tl.load(COS + offs, mask=in_seq, other=0.0), tl.load(SIN + offs, mask=in_seq, other=0.0)


@triton.jit
def _load_qk(base, rows, stride_t, T, COS, SIN, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """A q or k tile as the scores see it, as two parts: with ROPE its halves (dims < D/2 and >= D/2), each
    (rows, D/2), rotated (x1 cos - x2 sin, x2 cos + x1 sin) and rounded to the input dtype like
    rope_reference; without, the whole tile, twice. Halves need no register shuffle and read each table
    entry and each element once; the scores then sum one dot per half (_scores)."""
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        x1 = _load_rows(base, rows, stride_t, T, HALF)
        x2 = _load_rows(base + HALF, rows, stride_t, T, HALF)
        cos, sin = _rope_cos_sin(COS, SIN, rows, T, tl.arange(0, HALF), HALF)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        part1, part2 = (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype)
    else:
        part1 = _load_rows(base, rows, stride_t, T, HEAD_DIM)
        part2 = part1
    return part1, part2


@triton.jit
def _qk_zeros(BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """fp32 accumulators for the gradient of a q or k tile, in the parts _load_qk gives."""
    if ROPE:
        part1 = tl.zeros([BLOCK, HEAD_DIM // 2], tl.float32)
        part2 = tl.zeros([BLOCK, HEAD_DIM // 2], tl.float32)
    else:
        part1 = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        part2 = tl.zeros([1, 1], tl.float32)  # unused
    return part1, part2


@triton.jit
def _store_qk_grad(base, g1, g2, rows, stride_t, T, COS, SIN, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """Store the gradient (parts g1, g2 as _qk_zeros makes them) of a q or k tile. With ROPE the scores saw
    R x, so the gradient w.r.t. x is R^T g, the rotation by minus the angle, done half by half."""
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        cos, sin = _rope_cos_sin(COS, SIN, rows, T, tl.arange(0, HALF), HALF)
        _store_rows(base, g1 * cos + g2 * sin, rows, stride_t, T, HALF)
        _store_rows(base + HALF, g2 * cos - g1 * sin, rows, stride_t, T, HALF)
    else:
        _store_rows(base, g1, rows, stride_t, T, HEAD_DIM)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in fp32. UPCAST (interpreter only): it reads bf16 operands from their raw bits."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _scores(a1, a2, b1, b2, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROPE: tl.constexpr):
    """a b^T for tiles in _load_qk's parts: one dot per half with ROPE, one dot of the whole without."""
    s = _dot(a1, tl.trans(b1), None, PRECISION, UPCAST)
    if ROPE:
        s = _dot(a2, tl.trans(b2), s, PRECISION, UPCAST)
    return s


@triton.jit
def _accumulate(g1, g2, ds, b1, b2, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROPE: tl.constexpr):
    """(g1, g2) + ds b, for b in _load_qk's parts and g in _qk_zeros's."""
    g1 = _dot(ds, b1, g1, PRECISION, UPCAST)
    if ROPE:
        g2 = _dot(ds, b2, g2, PRECISION, UPCAST)
    return g1, g2


@triton.jit
def _keep(rows, cols, T, CAUSAL: tl.constexpr):
    """(rows, cols) score mask of a tile that straddles the diagonal (causal) or the end of the keys."""
    if CAUSAL:
        keep = cols[None, :] <= rows[:, None]
    else:
        keep = (cols < T)[None, :]
    return keep


@triton.jit
def _query_tile(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first query row, batch * head) of a program that owns a query tile (fwd, dq). Under a causal mask
    the last tiles see the most keys: they are launched first, which shortens the tail."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the masked diagonal must be whole key tiles")
    return (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M, tl.program_id(1)


@triton.jit
def _key_bounds(start_m, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(n_full, n_end) for the query tile at start_m: key tiles before n_full need no mask, those from
    n_full to n_end do (the causal diagonal, or the last tile running past T), later ones are skipped."""
    if CAUSAL:
        n_full = start_m
        n_end = tl.minimum(start_m + BLOCK_M, T)
    else:
        n_full = (T // BLOCK_N) * BLOCK_N
        n_end = T
    return n_full, n_end


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, lo, hi, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over the key tiles lo .. hi of one query tile; MASKED for the tiles that need it."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_qk(k_base, cols, stride_kt, T, COS, SIN, HEAD_DIM, ROPE)
        s = _scores(q1, q2, k1, k2, PRECISION, UPCAST, ROPE) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
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
    # COS, SIN: (>= T, HEAD_DIM // 2) fp32 RoPE tables, None without ROPE. T_BUCKET only keys the autotuner.
    # Grid: (cdiv(T, BLOCK_M), B * H); BLOCK_N divides BLOCK_M.
    start_m, bh = _query_tile(BLOCK_M, BLOCK_N)
    rows = start_m + tl.arange(0, BLOCK_M)
    q1, q2 = _load_qk(Q + _head_offset(bh, H, stride_qb, stride_qh), rows, stride_qt, T, COS, SIN, HEAD_DIM, ROPE)
    k_base = K + _head_offset(bh, H, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, H, stride_vb, stride_vh)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    qk_scale = sm_scale * _LOG2E
    n_full, n_end = _key_bounds(start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
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
def _dkdv_tiles(dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, COS, SIN, cols,
                lo, hi, T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key tile over the query tiles lo .. hi, in transposed form."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q1, q2 = _load_qk(q_base, rows, stride_qt, T, COS, SIN, HEAD_DIM, ROPE)
        do = _load_rows(do_base, rows, stride_dot, T, HEAD_DIM)
        in_seq = rows < T
        # Rows past T get lse = +inf, hence p = 0: they add nothing to dK or dV.
        lse = tl.load(lse_base + rows, mask=in_seq, other=float("inf")) * _LOG2E
        delta = tl.load(delta_base + rows, mask=in_seq, other=0.0)
        s_t = _scores(k1, k2, q1, q2, PRECISION, UPCAST, ROPE) * qk_scale  # (BLOCK_N, BLOCK_M): scores, transposed
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:  # causal diagonal, transposed
            p_t = tl.where(cols[:, None] <= rows[None, :], p_t, 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        dp_t = _dot(v, tl.trans(do), None, PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk1, dk2 = _accumulate(dk1, dk2, ds_t.to(q1.dtype), q1, q2, PRECISION, UPCAST, ROPE)
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
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "the masked diagonal must be whole query tiles")
    start_n = tl.program_id(0) * BLOCK_N  # causal: the first key tiles, the most queries, go first
    bh = tl.program_id(1)
    cols = start_n + tl.arange(0, BLOCK_N)
    k1, k2 = _load_qk(K + _head_offset(bh, H, stride_kb, stride_kh), cols, stride_kt, T, COS, SIN, HEAD_DIM, ROPE)
    v = _load_rows(V + _head_offset(bh, H, stride_vb, stride_vh), cols, stride_vt, T, HEAD_DIM)
    q_base = Q + _head_offset(bh, H, stride_qb, stride_qh)
    grad_offset = _head_offset(bh, H, T * H * HEAD_DIM, HEAD_DIM)
    do_base = DO + grad_offset
    dk1, dk2 = _qk_zeros(BLOCK_N, HEAD_DIM, ROPE)
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
                               H * HEAD_DIM, COS, SIN, cols, m_full, T, T, qk_scale, HEAD_DIM, BLOCK_M, ROPE, PRECISION,
                               UPCAST, False)
    _store_qk_grad(DK + grad_offset, dk1 * sm_scale, dk2 * sm_scale, cols, H * HEAD_DIM, T, COS, SIN, HEAD_DIM, ROPE)
    _store_rows(DV + grad_offset, dv, cols, H * HEAD_DIM, T, HEAD_DIM)


@triton.jit
def _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, lo, hi, T,
              qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dQ (unscaled) of one query tile over the key tiles lo .. hi."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_qk(k_base, cols, stride_kt, T, COS, SIN, HEAD_DIM, ROPE)
        v = _load_rows(v_base, cols, stride_vt, T, HEAD_DIM)
        p = tl.math.exp2(_scores(q1, q2, k1, k2, PRECISION, UPCAST, ROPE) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_keep(rows, cols, T, CAUSAL), p, 0.0)
        dp = _dot(do, tl.trans(v), None, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq1, dq2 = _accumulate(dq1, dq2, ds.to(k1.dtype), k1, k2, PRECISION, UPCAST, ROPE)
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
    start_m, bh = _query_tile(BLOCK_M, BLOCK_N)
    rows = start_m + tl.arange(0, BLOCK_M)
    q1, q2 = _load_qk(Q + _head_offset(bh, H, stride_qb, stride_qh), rows, stride_qt, T, COS, SIN, HEAD_DIM, ROPE)
    grad_offset = _head_offset(bh, H, T * H * HEAD_DIM, HEAD_DIM)
    do = _load_rows(DO + grad_offset, rows, H * HEAD_DIM, T, HEAD_DIM)
    in_seq = rows < T
    lse = tl.load(LSE + bh * T + rows, mask=in_seq, other=float("inf")) * _LOG2E  # rows past T: p = 0
    delta = tl.load(DELTA + bh * T + rows, mask=in_seq, other=0.0)
    k_base = K + _head_offset(bh, H, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, H, stride_vb, stride_vh)
    dq1, dq2 = _qk_zeros(BLOCK_M, HEAD_DIM, ROPE)
    qk_scale = sm_scale * _LOG2E
    n_full, n_end = _key_bounds(start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
    dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, 0,
                         n_full, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, ROPE, PRECISION, UPCAST, False)
    dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, stride_kt, stride_vt, COS, SIN, rows, n_full,
                         n_end, T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, ROPE, PRECISION, UPCAST, True)
    _store_qk_grad(DQ + grad_offset, dq1 * sm_scale, dq2 * sm_scale, rows, H * HEAD_DIM, T, COS, SIN, HEAD_DIM, ROPE)


# ----------------------------------------------------------------------------------------------------
# Autotuning: a few candidates per kernel, chosen for the BASE (T=256) and DEEP (T=512) shapes at D=64 on
# Hopper and Ampere, pruned before any is compiled by length, shared memory, the register pressure of
# D=128, and the configs that ptxas spills registers for on the GPU's architecture. Key: T rounded up to a
# power of two, D, causal, RoPE, and the dtypes (triton adds them). tests/kernels/test_offline_compile.py
# compiles every kept config for sm_90a and sm_80 without a GPU and fails if one spills or overflows
# shared memory; the spill figures below are what it measures.
# ----------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). fwd and dq own BLOCK_M queries; dkdv owns BLOCK_N keys.
# The last of each list fits an A100's shared memory even at D=128 with RoPE in fp32.
_FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
                (64, 32, 4, 2)]
_DKDV_CONFIGS = [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 2), (16, 64, 4, 4), (16, 32, 4, 3)]
_DQ_CONFIGS = [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 4),
               (32, 16, 4, 2)]
# Configs (of those the accumulator rule keeps) that ptxas spills registers for, by compute capability
# major and (kernel, D, fused RoPE), bf16, causal: the largest spill stores of Triton 3.6 and 3.9 in
# bytes. Ampere spills where Hopper does not: its mma instructions take both operands from registers,
# Hopper's wgmma reads at least one from shared memory.
_SPILLING_CONFIGS = {
    9: {("dkdv", 128, True): [(64, 64, 8, 2)],  # 88 B
        ("dq", 64, True): [(128, 32, 4, 3)],  # 4 B
        ("dq", 128, True): [(128, 64, 8, 2), (64, 64, 4, 2)]},  # 32 B, 204 B
    8: {("fwd", 64, False): [(128, 64, 4, 3)],  # 4 B
        ("fwd", 64, True): [(128, 128, 8, 3)],  # 556 B
        ("fwd", 128, False): [(128, 64, 8, 3), (128, 128, 8, 3)],  # 16 B, 80 B
        ("fwd", 128, True): [(128, 64, 8, 3)],  # 756 B
        ("dkdv", 64, False): [(64, 128, 8, 2), (64, 64, 8, 2)],  # 8 B, 20 B
        ("dkdv", 64, True): [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 2)],  # 92 B to 1.3 KB
        ("dkdv", 128, True): [(64, 64, 8, 2)],  # 29 KB
        ("dq", 64, False): [(128, 32, 4, 3), (64, 16, 4, 4)],  # 20 B, 8 B
        ("dq", 64, True): [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2)],  # 280 B to 540 B
        ("dq", 128, False): [(128, 64, 8, 2)],  # 96 B
        ("dq", 128, True): [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2),
                            (64, 16, 4, 4)]},  # 248 B to 23 KB
}
# The interpreter would "benchmark" every candidate on the CPU: it gets one small config, with unequal
# BLOCK_M and BLOCK_N so that tests at small T cover unmasked and diagonal tiles alike.
_INTERPRETER_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
_AUTOTUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "ROPE"]
_PREPROCESS_BLOCK = 64
CANDIDATES = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}


def _triton_configs(candidates: list[tuple]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]


def _smem_bytes(kernel: str, m: int, n: int, stages: int, head_dim: int, elem: int, rope: bool) -> int:
    """Shared memory a config needs at least: the tiles a program loads once plus, for each of stages - 1
    pipelined iterations in flight, the streamed tiles and, with RoPE, the streamed q or k tile's fp32 cos
    and sin rows (D/2 each). Checked against Triton 3.6's compiler (sm_80): exact for 16-bit inputs without
    RoPE, a lower bound with it; Hopper adds one more stage of K/V (or Q/dO). A config that does not fit
    after all fails to launch and the autotuner skips it."""
    once, streamed, streamed_qk = {"fwd": (m, 2 * n, n), "dkdv": (2 * n, 2 * m, m), "dq": (2 * m, 2 * n, n)}[kernel]
    per_stage = elem * streamed + (4 * streamed_qk if rope else 0)
    return head_dim * (elem * once + (stages - 1) * per_stage)


@functools.cache
def _max_shared_mem(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


@functools.cache
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def _accumulator_regs(kernel: str, config: triton.Config, head_dim: int) -> int:
    """fp32 accumulator elements per thread: the rows a program owns times D (twice in dkdv: dK and dV) over
    its threads. Above 64 (only at D=128), ptxas (Triton 3.6 and 3.9, sm_90a and sm_80) spills registers
    for most configs, with RoPE by up to kilobytes: they are not worth compiling."""
    owned = config.kwargs["BLOCK_N"] * 2 if kernel == "dkdv" else config.kwargs["BLOCK_M"]
    return owned * head_dim // (32 * config.num_warps)


MAX_ACCUMULATOR_REGS = 64


def _spills(kernel: str, config: triton.Config, head_dim: int, rope: bool, capability_major: int) -> bool:
    spilling = _SPILLING_CONFIGS.get(capability_major, {}).get((kernel, head_dim, rope), [])
    shape = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    return shape in spilling


def kept_configs(kernel: str, configs: list[triton.Config], t_bucket: int, head_dim: int, elem_size: int,
                 rope: bool, smem_budget: int, capability_major: int) -> list[triton.Config]:
    """The configs the autotuner times: drop those whose own tile (the rows a program owns) is longer than
    T rounded up to a power of two (mostly padding, and too few programs), always keeping the shortest
    tile; those that overflow shared memory; those whose accumulators crowd the registers; those that
    spill registers on this architecture. fp32 inputs (tests: exact fp32 dots run on CUDA cores, not
    tensor cores) get the smallest config alone, compiled in seconds."""
    owned = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"

    def smem(c):
        return _smem_bytes(kernel, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, head_dim, elem_size, rope)

    if elem_size == 4:
        return [min(configs, key=smem)]
    longest = max(t_bucket, min(c.kwargs[owned] for c in configs))
    kept = [c for c in configs if c.kwargs[owned] <= longest and smem(c) <= smem_budget
            and _accumulator_regs(kernel, c, head_dim) <= MAX_ACCUMULATOR_REGS
            and not _spills(kernel, c, head_dim, rope, capability_major)]
    return kept or [min(configs, key=smem)]


def _pruner(kernel: str):
    """early_config_prune: kept_configs for the tensors' GPU."""
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        return kept_configs(kernel, configs, named_args["T_BUCKET"], kwargs["HEAD_DIM"], q.element_size(),
                            kwargs["ROPE"], _max_shared_mem(q.device.index), _capability_major(q.device.index))
    return prune


def _autotune(kernel: str, candidates: list[tuple]):
    configs = _triton_configs([_INTERPRETER_CONFIGS[kernel]] if is_interpreter() else candidates)
    return triton.autotune(configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner(kernel)})


_attn_fwd = _autotune("fwd", CANDIDATES["fwd"])(_attn_fwd)
_attn_bwd_dkdv = _autotune("dkdv", CANDIDATES["dkdv"])(_attn_bwd_dkdv)
_attn_bwd_dq = _autotune("dq", CANDIDATES["dq"])(_attn_bwd_dq)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

def _common_args(q, k, v, rope_theta):
    """Arguments shared by the three attention kernels: RoPE tables, strides, sizes, scale, constexprs."""
    _, T, H, D = q.shape
    t_bucket = triton.next_power_of_2(T)
    cos, sin = cos_sin_table(t_bucket, D, rope_theta, q.device) if rope_theta is not None else (None, None)
    runtime = (cos, sin, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, T, t_bucket, 1.0 / math.sqrt(D))
    # fp32 inputs get exact fp32 products (else tf32); the precision is ignored for 16-bit inputs.
    constexprs = {"HEAD_DIM": D, "ROPE": rope_theta is not None, "UPCAST": is_interpreter(),
                  "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}
    return runtime, constexprs


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, whichever is current (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _flash_fwd(q, k, v, causal: bool, rope_theta: float | None, out=None, lse=None):
    """(o, lse): o contiguous (B, T, H, D), lse (B, H, T) fp32. out / lse: buffers to write into (tests)."""
    B, T, H, D = q.shape
    o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32) if lse is None else lse
    runtime, constexprs = _common_args(q, k, v, rope_theta)
    with _on_device(q.device):
        _attn_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, o, lse, *runtime, CAUSAL=causal, **constexprs)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal: bool, rope_theta: float | None, dq=None, dk=None, dv=None):
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
                       rope_theta: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd(q, k, v, causal, rope_theta)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, causal, rope_theta):
    B, T, H, D = q.shape
    return q.new_empty((B, T, H, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("charlm::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool,
                       rope_theta: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        raise ValueError(f"flash_attn: q, k, v must share one dtype among {DTYPES}, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"flash_attn: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"flash_attn: head dim D={q.shape[-1]} is unsupported, expected one of {HEAD_DIMS}")
    if rope_theta is not None and not rope_theta > 0:
        raise ValueError(f"flash_attn: rope_theta must be positive (or None for no RoPE), got {rope_theta}")
    if rope_theta is not None and q.shape[-1] < 32:  # a dot per half needs halves of 16 or more
        raise ValueError(f"flash_attn: fused RoPE needs head dim D >= 32, got D={q.shape[-1]}")


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
               rope_theta: float | None = None) -> torch.Tensor:
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
                        rope_theta: float | None = None) -> torch.Tensor:
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
