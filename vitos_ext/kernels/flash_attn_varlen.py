"""Variable-length FlashAttention in Triton: forward (online softmax, saves the log-sum-exp) and backward.

Layout (the FlashAttention varlen layout): sequences are packed along the token axis, with no padding.
    q [Tq, Hq, D], k/v [Tk, Hk, D], cu_seqlens_q/k int32 [B+1], out [Tq, Hq, D], lse float32 [Hq, Tq].
Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and key rows cu_seqlens_k[b]:cu_seqlens_k[b+1].

Kernels (one program = one tile of one sequence and one head; grid = (heads x sequences, tiles of the longest
sequence); programs past the end of a shorter sequence exit at once, so no host sync is needed; the heads of a
GQA group are adjacent in launch order, so their shared K/V tiles are reused from L2; causal grids launch the
heaviest tile of every (sequence, head) first, so the ragged tail of the schedule is made of light tiles):
- forward: a query tile streams over key tiles with an online softmax in base 2 (the scale is pre-multiplied by
  log2(e)); key tiles fully visible to every row run without masks, only the causal diagonal / ragged tail is
  masked, tiles past the diagonal are never visited. Causal programs start with the heaviest (last) tile.
- backward: a preprocess (delta = rowsum(dO * O)), a dK/dV pass (one program per key tile and KV head, looping
  over the query heads of its GQA group, so K/V are never repeated and dK/dV need no atomics) and a dQ pass.
  Deterministic: every output element is written by exactly one program.
Causal masking is aligned bottom-right: query i of a sequence with lq queries and lk keys sees keys
j <= i + lk - lq. A query row that sees no key gets out = 0, dq = 0 and lse = +inf (as FlashAttention), so
exp(s - lse) = 0 in backward without extra masking.
Head dims up to 128; a head dim that is not a power of 2 (80, 96) is padded to the next power of 2 in registers
with masked loads/stores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vitos_ext.kernels._launch import INTERPRET, traceable

__all__ = [
    "MAX_HEAD_DIM",
    "MAX_SEQLEN",
    "head_dim_is_supported",
    "flash_attn_varlen_forward",
    "flash_attn_varlen_backward",
]

MAX_HEAD_DIM = 128
# grid axis 1 enumerates the tiles of the longest sequence; CUDA allows at most 65535 there (32-row tiles at least)
MAX_SEQLEN = 65535 * 32
# VITOS_ATTN_AUTOTUNE=0 keeps only the first (default) tile per kernel: no tuning runs, fewer compiles (quick CI)
AUTOTUNE = os.environ.get("VITOS_ATTN_AUTOTUNE", "1") != "0"

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
LOG2E = 1.4426950408889634


def head_dim_is_supported(head_dim: int) -> bool:
    """Head dims the kernels handle: 16..128 in steps of 8 (64, 80, 96, 128 are the tuned ones)."""
    return 16 <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _seqlen_bucket(max_seqlen: int) -> int:
    """Autotuning key: short (vision windows, decode) and long (LM prefill) batches want different tiles."""
    return min(triton.next_power_of_2(max(int(max_seqlen), 16)), 8192)


# ----------------------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, row_stride, row_limit, cols,
               HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, HEAD_DIM_PAD] tile; rows >= row_limit and padded head-dim columns read as 0."""
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == HEAD_DIM_PAD:
            mask = rows[:, None] < row_limit
        else:
            mask = (rows[:, None] < row_limit) & (cols[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    else:
        if HEAD_DIM == HEAD_DIM_PAD:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(base, value, rows, row_stride, row_limit, cols,
                HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if HEAD_DIM == HEAD_DIM_PAD:
        mask = rows[:, None] < row_limit
    else:
        mask = (rows[:, None] < row_limit) & (cols[None, :] < HEAD_DIM)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _query_tile_key_range(block_m, seqlen_q, seqlen_k,
                          CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of a query tile: [0, full_end) is visible to every row (no mask), [full_end, end) is masked."""
    if CAUSAL:
        diag = seqlen_k - seqlen_q
        end = tl.minimum(seqlen_k, (block_m + 1) * BLOCK_M + diag)
        full_end = tl.minimum(seqlen_k, block_m * BLOCK_M + diag + 1)
    else:
        end = seqlen_k
        full_end = seqlen_k
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def _query_tile(cu_seqlens_q, cu_seqlens_k, num_heads_q, group_size,
                CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query tile: program axis 0 is (sequence, query head), axis 1 the tile. Returns head, kv_head,
    q_start, seqlen_q, k_start, seqlen_k, block_m and whether the tile exists (the grid covers the longest sequence;
    shorter ones exit). Causal tiles run last-first: the last tiles see the most keys, so they launch first."""
    head = tl.program_id(0) % num_heads_q
    seq = tl.program_id(0) // num_heads_q
    pid_m = tl.program_id(1)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    num_m_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    if CAUSAL:
        block_m = num_m_blocks - 1 - pid_m
    else:
        block_m = pid_m
    return head, head // group_size, q_start, seqlen_q, k_start, seqlen_k, block_m, pid_m < num_m_blocks


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n_base, offs_d,
              seqlen_k, diag, stride_kt, stride_vt, qk_scale_log2,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    offs_n = start_n + offs_n_base
    k = _load_tile(k_base, offs_n, stride_kt, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    if MASKED:
        visible = offs_n[None, :] < seqlen_k
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # a row with no visible key so far keeps m = -inf; shift by 0 instead so that no inf - inf appears
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_base, offs_n, stride_vt, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    num_heads_q, qk_scale_log2, max_seqlen_bucket,
    group_size, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    head, kv_head, q_start, seqlen_q, k_start, seqlen_k, block_m, exists = _query_tile(
        cu_seqlens_q, cu_seqlens_k, num_heads_q, group_size, CAUSAL, BLOCK_M)
    if not exists:
        return

    q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    q = _load_tile(q_base, offs_m, stride_qt, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    diag = seqlen_k - seqlen_q
    full_end, end = _query_tile_key_range(block_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n_base, offs_d,
                                  seqlen_k, diag, stride_kt, stride_vt, qk_scale_log2,
                                  CAUSAL, False, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n_base, offs_d,
                                  seqlen_k, diag, stride_kt, stride_vt, qk_scale_log2,
                                  CAUSAL, True, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)

    sees_nothing = l_i == 0.0
    l_safe = tl.where(sees_nothing, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(sees_nothing, float("inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    o_base = Out + q_start.to(tl.int64) * stride_ot + head * stride_oh
    _store_tile(o_base, out, offs_m, stride_ot, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    lse_base = Lse + head.to(tl.int64) * stride_lse_h + q_start
    tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, Delta, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (float32), over all packed rows at once."""
    head = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o = _load_tile(Out + head * stride_oh, rows, stride_ot, total_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    do = _load_tile(DOut + head * stride_doh, rows, stride_dot, total_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head.to(tl.int64) * stride_delta_h + rows, delta, mask=rows < total_q)


@triton.jit
def _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m_base, offs_n, offs_d,
                   seqlen_q, diag, stride_qt, stride_dot, qk_scale_log2,
                   CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    offs_m = start_m + offs_m_base
    in_seq = offs_m < seqlen_q
    q = _load_tile(q_base, offs_m, stride_qt, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    do = _load_tile(do_base, offs_m, stride_dot, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    # rows past the sequence read lse = +inf, so their probabilities are exactly 0
    lse_log2 = tl.load(lse_base + offs_m, mask=in_seq, other=float("inf")) * _LOG2E
    delta = tl.load(delta_base + offs_m, mask=in_seq, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(s_t * qk_scale_log2 - lse_log2[None, :])
    if MASKED and CAUSAL:
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    num_heads_k, qk_scale_log2, sm_scale, max_seqlen_bucket,
    group_size, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    kv_head = tl.program_id(0) % num_heads_k
    seq = tl.program_id(0) // num_heads_k
    pid_n = tl.program_id(1)
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m_base = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k = _load_tile(K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh, offs_n, stride_kt, seqlen_k,
                   offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    v = _load_tile(V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh, offs_n, stride_vt, seqlen_k,
                   offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)

    diag = seqlen_k - seqlen_q
    if CAUSAL:
        # query i sees key j iff i >= j - diag: tiles before `first` see none of this key tile, tiles from
        # `full` on see all of it, the ones between straddle the diagonal and need the mask
        first = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        full = (tl.maximum(start_n + BLOCK_N - 1 - diag, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        first = 0
        full = 0
    masked_end = tl.minimum(full, seqlen_q)

    for group_offset in range(group_size):
        head = kv_head * group_size + group_offset
        q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        do_base = DOut + q_start.to(tl.int64) * stride_dot + head * stride_doh
        lse_base = Lse + head.to(tl.int64) * stride_lse_h + q_start
        delta_base = Delta + head.to(tl.int64) * stride_lse_h + q_start
        for start_m in range(first, masked_end, BLOCK_M):
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m_base,
                                    offs_n, offs_d, seqlen_q, diag, stride_qt, stride_dot, qk_scale_log2,
                                    CAUSAL, True, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
        for start_m in range(full, seqlen_q, BLOCK_M):
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m_base,
                                    offs_n, offs_d, seqlen_q, diag, stride_qt, stride_dot, qk_scale_log2,
                                    CAUSAL, False, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)

    dk = dk * sm_scale
    _store_tile(DK + k_start.to(tl.int64) * stride_dkt + kv_head * stride_dkh, dk, offs_n, stride_dkt, seqlen_k,
                offs_d, HEAD_DIM, HEAD_DIM_PAD)
    _store_tile(DV + k_start.to(tl.int64) * stride_dvt + kv_head * stride_dvh, dv, offs_n, stride_dvt, seqlen_k,
                offs_d, HEAD_DIM, HEAD_DIM_PAD)


@triton.jit
def _bwd_dq_step(dq, q, do, lse_log2, delta, k_base, v_base, start_n, offs_m, offs_n_base, offs_d,
                 seqlen_k, diag, stride_kt, stride_vt, qk_scale_log2,
                 CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    offs_n = start_n + offs_n_base
    k = _load_tile(k_base, offs_n, stride_kt, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
    v = _load_tile(v_base, offs_n, stride_vt, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.math.exp2(s * qk_scale_log2 - lse_log2[:, None])
    if MASKED:
        visible = offs_n[None, :] < seqlen_k
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    num_heads_q, qk_scale_log2, sm_scale, max_seqlen_bucket,
    group_size, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    head, kv_head, q_start, seqlen_q, k_start, seqlen_k, block_m, exists = _query_tile(
        cu_seqlens_q, cu_seqlens_k, num_heads_q, group_size, CAUSAL, BLOCK_M)
    if not exists:
        return

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    in_seq = offs_m < seqlen_q
    q = _load_tile(Q + q_start.to(tl.int64) * stride_qt + head * stride_qh, offs_m, stride_qt, seqlen_q,
                   offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    do = _load_tile(DOut + q_start.to(tl.int64) * stride_dot + head * stride_doh, offs_m, stride_dot, seqlen_q,
                    offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    row_base = head.to(tl.int64) * stride_lse_h + q_start
    lse_log2 = tl.load(Lse + row_base + offs_m, mask=in_seq, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + row_base + offs_m, mask=in_seq, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    diag = seqlen_k - seqlen_q
    full_end, end = _query_tile_key_range(block_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _bwd_dq_step(dq, q, do, lse_log2, delta, k_base, v_base, start_n, offs_m, offs_n_base, offs_d,
                          seqlen_k, diag, stride_kt, stride_vt, qk_scale_log2,
                          CAUSAL, False, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        dq = _bwd_dq_step(dq, q, do, lse_log2, delta, k_base, v_base, start_n, offs_m, offs_n_base, offs_d,
                          seqlen_k, diag, stride_kt, stride_vt, qk_scale_log2,
                          CAUSAL, True, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION)
    dq = dq * sm_scale
    _store_tile(DQ + q_start.to(tl.int64) * stride_dqt + head * stride_dqh, dq, offs_m, stride_dqt, seqlen_q,
                offs_d, HEAD_DIM, HEAD_DIM_PAD)


# ----------------------------------------------------------------------------------------------------------
# autotuning: a handful of H100-oriented tiles for d <= 128 on GPU, one small tile under the interpreter
# ----------------------------------------------------------------------------------------------------------


def _configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Few configs on purpose: every one is compiled per head dim / causal /
# dtype variant, which dominates the first call. Chosen with ptxas -v for sm_90a at d=128 (bf16): the forward and
# dQ tiles below do not spill (185-255 registers), the dK/dV tiles spill at most a few hundred bytes (it keeps
# dK, dV in float32 registers); tiles with 4 warps and 128-row accumulators spill and are left out. 64x64 tiles
# serve short sequences (vision windows). float32 (the accuracy path, not a speed target) gets one small tile.
# A sweep of every dK/dV tile (BLOCK_M 16/32/64 x BLOCK_N 64/128 x 4/8 warps x 2/3 stages) found three that do not
# spill at all; the 16 x 128 one (241 registers) is a candidate too: it trades a thinner query tile for no spills.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)])
_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (16, 128, 8, 3)])
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3)])
_FP32_FWD_CONFIGS = _configs([(64, 32, 4, 2)])
_FP32_BWD_CONFIGS = _configs([(32, 32, 4, 2)])
_INTERPRET_CONFIGS = _configs([(16, 16, 4, 1)])
_TUNING_KEY = ["HEAD_DIM_PAD", "CAUSAL", "group_size", "max_seqlen_bucket"]


def _autotuned(kernel, configs):
    if INTERPRET:
        configs = _INTERPRET_CONFIGS
    elif not AUTOTUNE:
        configs = configs[:1]
    return triton.autotune(configs, key=_TUNING_KEY)(kernel)


# {is_float32: kernel}
_FWD_KERNELS = {False: _autotuned(_attn_fwd_kernel, _FWD_CONFIGS),
                True: _autotuned(_attn_fwd_kernel, _FP32_FWD_CONFIGS)}
_DKDV_KERNELS = {False: _autotuned(_attn_bwd_dkdv_kernel, _DKDV_CONFIGS),
                 True: _autotuned(_attn_bwd_dkdv_kernel, _FP32_BWD_CONFIGS)}
_DQ_KERNELS = {False: _autotuned(_attn_bwd_dq_kernel, _DQ_CONFIGS),
               True: _autotuned(_attn_bwd_dq_kernel, _FP32_BWD_CONFIGS)}
_PREPROCESS_BLOCK_M = 16 if INTERPRET else 64


# ----------------------------------------------------------------------------------------------------------
# launchers (called from the torch.library ops in vitos_ext.ops.attention; no host syncs, no data-dependent
# shapes, so they also run under FakeTensorMode / torch.compile tracing)
# ----------------------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 must not silently drop to TF32 on GPU: the fp32 path is the accurate one
    return "ieee" if dtype == torch.float32 else "tf32"


def _static_args(q: torch.Tensor, k: torch.Tensor, causal: bool) -> dict:
    head_dim = q.shape[2]
    return {
        "group_size": q.shape[1] // k.shape[1],
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": _padded_head_dim(head_dim),
        "CAUSAL": bool(causal),
        "DOT_PRECISION": _dot_precision(q.dtype),
    }


def _pick(tuned, plain, block_sizes: dict | None):
    """The autotuned kernel, or the plain one with explicit tiles (tests sweep tile shapes this way)."""
    if block_sizes is None:
        return traceable(tuned), {}
    return plain, {"BLOCK_M": int(block_sizes["BLOCK_M"]), "BLOCK_N": int(block_sizes["BLOCK_N"])}


def flash_attn_varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float, block_sizes: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs must already be validated (see vitos_ext.ops.attention).

    q [Tq, Hq, D], k/v [Tk, Hk, D] (last dim contiguous, same dtype), cu_seqlens int32 [B+1].
    Returns out [Tq, Hq, D] (q.dtype) and lse float32 [Hq, Tq] (natural log; +inf for rows that see no key).
    """
    total_q, num_heads_q, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, num_heads_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads_q, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    kernel, tiles = _pick(_FWD_KERNELS[q.dtype == torch.float32], _attn_fwd_kernel, block_sizes)

    def grid(meta):
        return (num_heads_q * batch, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))

    kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        num_heads_q, softmax_scale * LOG2E, _seqlen_bucket(max_seqlen_q),
        **_static_args(q, k, causal), **tiles,
    )
    return out, lse


def flash_attn_varlen_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
    softmax_scale: float, block_sizes: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch preprocess, dK/dV and dQ kernels. dout/out [Tq, Hq, D], lse float32 [Hq, Tq] from the forward.

    Returns dq [Tq, Hq, D], dk/dv [Tk, Hk, D] in the input dtype (accumulated in float32 in registers).
    """
    total_q, num_heads_q, head_dim = q.shape
    total_k, num_heads_k, _ = k.shape
    batch = cu_seqlens_q.shape[0] - 1
    dq = torch.empty((total_q, num_heads_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((total_k, num_heads_k, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((total_k, num_heads_k, head_dim), dtype=v.dtype, device=v.device)
    if total_k > 0 and (total_q == 0 or batch == 0 or max_seqlen_k == 0):
        dk.zero_()
        dv.zero_()
    if total_q == 0 or total_k == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        dq.zero_()
        return dq, dk, dv
    static = _static_args(q, k, causal)
    qk_scale_log2 = softmax_scale * LOG2E
    bucket = _seqlen_bucket(max(max_seqlen_q, max_seqlen_k))

    delta = torch.empty((num_heads_q, total_q), dtype=torch.float32, device=q.device)
    traceable(_bwd_preprocess_kernel)[(triton.cdiv(total_q, _PREPROCESS_BLOCK_M), num_heads_q)](
        out, dout, delta, total_q, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=static["HEAD_DIM_PAD"], BLOCK_M=_PREPROCESS_BLOCK_M,
    )

    kernel, tiles = _pick(_DKDV_KERNELS[q.dtype == torch.float32], _attn_bwd_dkdv_kernel, block_sizes)

    def grid_dkdv(meta):
        return (num_heads_k * batch, triton.cdiv(max_seqlen_k, meta["BLOCK_N"]))

    kernel[grid_dkdv](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        num_heads_k, qk_scale_log2, softmax_scale, bucket, **static, **tiles,
    )

    kernel, tiles = _pick(_DQ_KERNELS[q.dtype == torch.float32], _attn_bwd_dq_kernel, block_sizes)

    def grid_dq(meta):
        return (num_heads_q * batch, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))

    kernel[grid_dq](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1), lse.stride(0),
        num_heads_q, qk_scale_log2, softmax_scale, bucket, **static, **tiles,
    )
    return dq, dk, dv
