"""Flash attention in Triton: forward (online softmax, exp2, saves the log-sum-exp; the key
blocks that every query of a block sees whole are read without visibility checks) and backward
(dK/dV per key block on key-major tiles, dQ per query block: no atomics, so deterministic; or,
where autotuning finds it faster and determinism is not asked for, dQ added up atomically in
fp32 by the dK/dV kernel, which then recomputes no scores for it).

Dense layouts are 4-D with arbitrary strides: Q (B, H, L, D), K (B, Hkv, S, D),
V (B, Hkv, S, Dv), O (B, H, L, Dv). Varlen (VARLEN) layouts are packed (total, heads, dim)
with sequence b at rows cu_seqlens[b]:cu_seqlens[b + 1]; the batch stride is then 0 and
the sequence lengths are read per program. Query head h reads key/value head
h // (H // Hkv) (GQA / MQA). Head dims D and Dv are compile-time constants, so the
padding masks vanish when they are powers of 2.

Visibility of key j to query i: CAUSAL: j <= i + diag; WINDOW: i + diag - left <= j <=
i + diag + right. diag is 0 for dense calls (PyTorch's top-left alignment) and S - L
per sequence for varlen calls (flash-attn's bottom-right alignment). An optional mask is
read through strides broadcast to (B, H, L, S) (stride 0 on broadcast dims), so a
key-padding mask (B, 1, 1, S) is never expanded. Scores are kept in the log2 domain:
s = q.k * scale * log2(e) (+ float mask * log2(e)). LSE and the backward's delta live
at LSE[b * slb + h * slh + row].
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from gptkern.kernels import autotune

LOG2E = 1.4426950408889634  # written out in _visible too: a jit function can't read globals

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@triton.jit
def _visible(s, qi, kj, L, S, diag, win_left, win_right, mask_ptrs,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scores ``s`` (log2 domain) plus the float mask, -inf where key kj is not visible to
    query qi. qi, kj and mask_ptrs broadcast to s: (BLOCK_M, 1), (1, BLOCK_N) for query-major
    tiles, (1, BLOCK_M), (BLOCK_N, 1) for the backward's key-major ones."""
    visible = (qi < L) & (kj < S)
    if CAUSAL:
        visible = visible & (kj <= qi + diag)
    if WINDOW:
        visible = visible & (kj >= qi + (diag - win_left)) & (kj <= qi + (diag + win_right))
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs, mask=visible, other=0)
        visible = visible & (keep != 0)
    if MASK_KIND == 2:
        # finfo.min-style masks must stay finite after the log2(e) scaling, as in torch.
        bias = tl.load(mask_ptrs, mask=visible, other=0.0).to(tl.float32)
        bias = tl.where(bias == -float("inf"), bias, tl.maximum(bias, -2.0e38, propagate_nan=tl.PropagateNan.ALL))
        s += bias * 1.4426950408889634
    return tl.where(visible, s, -float("inf"))


@triton.jit
def _dropout_scale(seed, bh, qi, kj, threshold, inv_keep):
    """Factor per score: 0 for a dropped weight, 1 / (1 - p) for a kept one; qi, kj broadcast
    as in _visible. Philox counters (key j, query i, batch-head, 0) make it reproducible from
    the seed alone, whichever way a tile is laid out."""
    zero = qi * 0 + kj * 0
    r, _, _, _ = tl.philox(seed, kj + zero, qi + zero, bh + zero, zero)
    keep = (r >> 1).to(tl.int32, bitcast=True) >= threshold
    return tl.where(keep, inv_keep, 0.0)


@triton.jit
def _load_seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed: the low 32 bits of the (1,) int64 tensor SEED on the kernel's device (read
    there: no host sync, and a CUDA graph replay reads the seed drawn anew into it), or 0 without
    dropout. As uint32, Philox's high key word is the constant 0: one register held across the key
    loop, not two (a 64-bit seed pushed 255-register backward tiles into spills)."""
    if DROPOUT:
        return tl.load(SEED).to(tl.uint32)
    else:
        return 0


@triton.jit
def _sequence(CU_Q, CU_K, b, L, S, diag, VARLEN: tl.constexpr):
    """(first query row, first key row, L, S, diag) of sequence b."""
    if VARLEN:
        q0 = tl.load(CU_Q + b).to(tl.int64)
        k0 = tl.load(CU_K + b).to(tl.int64)
        L = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        S = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
        diag = S - L
        return q0, k0, L, S, diag
    return b * 0, b * 0, L, S, diag


@triton.jit
def _query_block(CU_Q, CU_K, H, GROUP, L, S, diag, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
                 CAUSAL: tl.constexpr):
    """A query-block program's (batch-head, batch, head, KV head, first query row, first key
    row, L, S, diag, first query of the block); grid (B * H, query blocks). Dense causal query
    blocks go last first: the GPU starts programs in grid order, and a later block sees more
    keys, so the longest programs start first and the last to start are the shortest. (Varlen
    keeps the order: its grid counts the longest sequence's blocks, and reversed, its dropout dQ
    kernel at head dim 64 spilled with Triton 3.6.)"""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q0, k0, L, S, diag = _sequence(CU_Q, CU_K, b, L, S, diag, VARLEN)
    block = tl.program_id(1)
    if CAUSAL and not VARLEN:
        block = tl.num_programs(1) - 1 - block
    return bh, b, h, h // GROUP, q0, k0, L, S, diag, block * BLOCK_M


@triton.jit
def _key_range(start_m, L, S, diag, win_left, win_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[lo, hi): the key blocks that queries start_m .. start_m + BLOCK_M - 1 may see."""
    lo = start_m * 0
    hi = S + start_m * 0
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + diag, 0))
    if WINDOW:
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + diag + win_right, 0))
        lo = tl.maximum(start_m + diag - win_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.where(start_m < L, hi, lo)  # a block past the sequence's end sees nothing
    return lo, hi


@triton.jit
def _unchecked_range(lo, hi, start_m, S, diag, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """[lo, inner_hi) within [lo, hi), on lo's grid of key blocks: the blocks whose every key is
    visible to every query from start_m on (in bounds and, if CAUSAL, not after the first query's
    diagonal), so no check is needed."""
    right = S + start_m * 0
    if CAUSAL:
        right = tl.minimum(right, start_m + diag + 1)
    return tl.minimum(lo + tl.maximum(right - lo, 0) // BLOCK_N * BLOCK_N, hi)  # (no negative division)


@triton.jit
def _tile(ptrs, offs_r, offs_c, R, C: tl.constexpr, BLOCK_C: tl.constexpr, CHECKED: tl.constexpr):
    """A (rows, BLOCK_C) tile of Q, K, V or dO: zeros past column C and, if CHECKED, past row R
    (unchecked tiles lie within the sequence)."""
    if CHECKED:
        tile = tl.load(ptrs, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)
    elif C == BLOCK_C:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=offs_c[None, :] < C, other=0.0)
    return tile


@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, K, V, MASK, start, end, b32, hk32, bh, offs_m, cols, offs_d, offs_dv,
                    k_offs, v_offs, mask_offs, skn, svn, smn, L, S, diag, win_left, win_right, qk_scale,
                    seed, threshold, inv_keep,
                    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DESC: tl.constexpr,
                    CHECKED: tl.constexpr):
    """The forward's online softmax over key blocks [start, end); K, V and MASK point at start and
    are returned past end. CHECKED: hide the keys a query may not see (bounds, causal, window,
    mask); else every key of these blocks is visible to every query row."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + cols
        if DESC:
            k = K.load([b32, hk32, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k = _tile(K + k_offs, offs_n, offs_d, S, D, BLOCK_D, CHECKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if CHECKED:
            s = _visible(s, offs_m[:, None], offs_n[None, :], L, S, diag, win_left, win_right, MASK + mask_offs,
                         CAUSAL, WINDOW, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the normalizer counts every weight; only the weighted sum is dropped
            p = p * _dropout_scale(seed, bh, offs_m[:, None], offs_n[None, :], threshold, inv_keep)
        if DESC:
            v = V.load([b32, hk32, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v = _tile(V + v_offs, offs_n, offs_dv, S, DV, BLOCK_DV, CHECKED)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        if not DESC:
            K += BLOCK_N * skn
            V += BLOCK_N * svn
        MASK += BLOCK_N * smn
    return acc, l_i, m_i, K, V, MASK


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O,            # (B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, Dv), (B, H, L, Dv) or packed
    LSE,                   # fp32 log2-domain log-sum-exp of each query row, at b * slb + h * slh + row
    MASK,                  # mask broadcast to (B, H, L, S) through strides, or unused
    CU_Q, CU_K,            # (B + 1,) int32 sequence starts (VARLEN), or unused
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    smb, smh, smm, smn, slb, slh,
    H, L, S, GROUP, diag, win_left, win_right, qk_scale, SEED, threshold, inv_keep,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DESC: tl.constexpr = False,  # Q, K, V, O are (B, H, seq, dim) tensor descriptors (TMA), dense only
):
    # Tile bases are int64; offsets inside a tile are int32.
    seed = _load_seed(SEED, DROPOUT)
    bh, b, h, hk, q0, k0, L, S, diag, start_m = _query_block(
        CU_Q, CU_K, H, GROUP, L, S, diag, BLOCK_M, VARLEN, CAUSAL)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m0 = q0 + start_m
    if DESC:  # rows past the sequence and columns past D come back as zeros
        q = Q.load([b.to(tl.int32), h.to(tl.int32), start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = tl.load(Q + b * sqb + h * sqh + m0 * sqm + rows[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    lo, hi = _key_range(start_m, L, S, diag, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    n_base = k0 + lo
    if not DESC:
        K += b * skb + hk * skh + n_base * skn
        V += b * svb + hk * svh + n_base * svn
    MASK += b * smb + h * smh + start_m.to(tl.int64) * smm + lo.to(tl.int64) * smn
    k_offs = cols[:, None] * skn + offs_d[None, :] * skd
    v_offs = cols[:, None] * svn + offs_dv[None, :] * svd
    mask_offs = rows[:, None] * smm + cols[None, :] * smn

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    b32, hk32 = b.to(tl.int32), hk.to(tl.int32)
    # Key blocks [lo, mid) unchecked (every query sees every key), [mid, hi) checked; with a mask
    # or a window, all checked.
    SPLIT: tl.constexpr = MASK_KIND == 0 and not WINDOW
    mid = _unchecked_range(lo, hi, start_m, S, diag, BLOCK_N, CAUSAL) if SPLIT else lo
    for run in tl.static_range(0 if SPLIT else 1, 2):
        acc, l_i, m_i, K, V, MASK = _fwd_key_blocks(
            acc, l_i, m_i, q, K, V, MASK, lo if run == 0 else mid, mid if run == 0 else hi, b32, hk32, bh, offs_m,
            cols, offs_d, offs_dv, k_offs, v_offs, mask_offs, skn, svn, smn, L, S, diag, win_left, win_right,
            qk_scale, seed, threshold, inv_keep, D, DV, CAUSAL, WINDOW, MASK_KIND, DROPOUT, PRECISION, BLOCK_N,
            BLOCK_D, BLOCK_DV, DESC, run == 1)
    # A row that sees no key gets 0, as torch's SDPA gives; its LSE is -inf.
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if DESC:  # the store drops rows past L and columns past DV
        O.store([b.to(tl.int32), h.to(tl.int32), start_m, 0], o.to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_DV))
    else:
        tl.store(O + b * sob + h * soh + m0 * som + rows[:, None] * som + offs_dv[None, :] * sod,
                 o.to(O.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_dv[None, :] < DV))
    seen = l_i != 0.0  # a NaN sum (a NaN score) gives a NaN LSE, as the CUDA kernel
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), -float("inf"))
    tl.store(LSE + b * slb + h * slh + q0 + offs_m, lse, mask=offs_m < L)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,                 # as O of the forward, strides s*o / s*do
    DELTA,                 # fp32 rowsum(dO * O), laid out as the forward's LSE
    CU_Q,
    sob, soh, som, sod, sdb, sdh, sdm, sdd, slb, slh,
    H, L,
    DV: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q0, _, L, _, _ = _sequence(CU_Q, CU_Q, b, L, L, 0, VARLEN)
    start_m = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_dv = tl.arange(0, BLOCK_DV)
    m0 = q0 + start_m
    mask = (offs_m[:, None] < L) & (offs_dv[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + m0 * som + rows[:, None] * som + offs_dv[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + m0 * sdm + rows[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b * slb + h * slh + q0 + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _unchecked_queries(lo, hi, start_n, S, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    """The first query block on lo's grid (at most hi) from which on every query sees every key
    start_n .. start_n + BLOCK_N - 1: past the diagonal if CAUSAL; hi (none) for a key block that
    passes S. (Queries past L need no check: they load as zeros and weigh 0 through their LSE.)"""
    first = lo
    if CAUSAL:
        first = tl.minimum(lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - lo, 0), BLOCK_M) * BLOCK_M, hi)
    return tl.where(start_n + BLOCK_N <= S, first, hi)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_src, do_src, mask_base, dq_acc, start, end, b32, h32, bh32, LSE, DELTA,
                       row_base, offs_n, rows, offs_d, offs_dv, q_offs, do_offs, mask_offs, sqm, sdom, smm, L, S,
                       diag, win_left, win_right, qk_scale, seed, threshold, inv_keep,
                       D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                       MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DESC: tl.constexpr,
                       CHECKED: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK and dV of one key block (k, v) summed over query blocks [start, end) of one head, on
    key-major (BLOCK_N, BLOCK_M) tiles. q_src and do_src are descriptors or pointers at start,
    returned past end as mask_base is. CHECKED: hide the keys a query may not see; else every
    query sees every key (queries past L get weight 0 through their LSE). ATOMIC_DQ: also add
    each block's dS K into dq_acc (this head's fp32 (L, D) rows, row stride D)."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + rows
        if DESC:
            q = q_src.load([b32, h32, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = _tile(q_src + q_offs, offs_m, offs_d, L, D, BLOCK_D, True)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if CHECKED:
            st = _visible(st, offs_m[None, :], offs_n[:, None], L, S, diag, win_left, win_right,
                          mask_base + mask_offs, CAUSAL, WINDOW, MASK_KIND)
        lse = tl.load(LSE + row_base + offs_m, mask=offs_m < L, other=float("inf"))
        lse = tl.where(lse == -float("inf"), float("inf"), lse)  # rows that saw nothing: p = 0
        pt = tl.exp2(st - lse[None, :])
        if DESC:
            do = do_src.load([b32, h32, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
        else:
            do = _tile(do_src + do_offs, offs_m, offs_dv, L, DV, BLOCK_DV, True)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            z = _dropout_scale(seed, bh32, offs_m[None, :], offs_n[:, None], threshold, inv_keep)
            dv += tl.dot((pt * z).to(do.dtype), do, input_precision=PRECISION)
            dpt = dpt * z
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < L, other=0.0)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        if ATOMIC_DQ:  # (BLOCK_M, BLOCK_D): this key block's share of dQ, unscaled
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PRECISION)
            tl.atomic_add(dq_acc + offs_m[:, None] * D + offs_d[None, :], dq,
                          mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), sem="relaxed")
        if not DESC:
            q_src += BLOCK_M * sqm
            do_src += BLOCK_M * sdom
        mask_base += BLOCK_M * smm
    return dk, dv, q_src, do_src, mask_base


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_,  # Q, dO as in the forward (DO strides sdo*); DK, DV_ as K, V
    DQ_ACC,                # ATOMIC_DQ: contiguous fp32 (B, H, L, D), zeroed, gets unscaled dQ; else unused
    LSE, DELTA,            # fp32, laid out as the forward's LSE
    MASK, CU_Q, CU_K,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    smb, smh, smm, smn, slb, slh,
    H, L, S, GROUP, diag, win_left, win_right, qk_scale, SEED, threshold, inv_keep, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DESC: tl.constexpr = False,  # Q, K, V, DO, DK, DV_ are tensor descriptors (TMA), as in the forward
    ATOMIC_DQ: tl.constexpr = False,  # also dQ, added up atomically (dense only): no dQ kernel to run
):
    """One program: a block of keys of one KV head, summed over the GROUP query heads. Tiles are
    key-major, (BLOCK_N, BLOCK_M): every product then has BLOCK_N rows, which Hopper's warpgroup
    MMA wants (64 per 4 warps) while the query block stays small."""
    seed = _load_seed(SEED, DROPOUT)
    pid_n = tl.program_id(1)
    bhk = tl.program_id(0)
    hkv = H // GROUP
    b = (bhk // hkv).to(tl.int64)
    hk = (bhk % hkv).to(tl.int64)
    q0, k0, L, S, diag = _sequence(CU_Q, CU_K, b, L, S, diag, VARLEN)
    start_n = pid_n * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n0 = k0 + start_n
    b32, hk32 = b.to(tl.int32), hk.to(tl.int32)
    if DESC:
        k = K.load([b32, hk32, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = V.load([b32, hk32, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        k = tl.load(K + b * skb + hk * skh + n0 * skn + cols[:, None] * skn + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + b * svb + hk * svh + n0 * svn + cols[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # [lo, hi): the query blocks that may see this key block.
    lo = start_n * 0
    hi = L + start_n * 0
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
    if WINDOW:
        lo = tl.maximum(lo, tl.maximum(start_n - diag - win_right, 0) // BLOCK_M * BLOCK_M)
        hi = tl.minimum(hi, tl.maximum(start_n + BLOCK_N - diag + win_left, 0))
    hi = tl.where(start_n < S, hi, lo)
    q_offs = rows[:, None] * sqm + offs_d[None, :] * sqd
    do_offs = rows[:, None] * sdom + offs_dv[None, :] * sdod
    mask_offs = rows[None, :] * smm + cols[:, None] * smn  # (BLOCK_N, BLOCK_M)
    lo64 = lo.to(tl.int64)
    # Query blocks [lo, mid) checked, [mid, hi) unchecked (every query sees every key); with a mask
    # or a window, all checked, and without descriptors too (two loops of pointer loads spill).
    SPLIT: tl.constexpr = MASK_KIND == 0 and not WINDOW and DESC
    mid = _unchecked_queries(lo, hi, start_n, S, diag, BLOCK_M, BLOCK_N, CAUSAL) if SPLIT else hi
    for g in range(0, GROUP):
        h = hk * GROUP + g
        if DESC:
            q_src, do_src = Q, DO
        else:
            q_src = Q + b * sqb + h * sqh + (q0 + lo64) * sqm
            do_src = DO + b * sdob + h * sdoh + (q0 + lo64) * sdom
        mask_base = MASK + b * smb + h * smh + start_n.to(tl.int64) * smn + lo64 * smm
        row_base = b * slb + h * slh + q0
        bh32 = (b * H + h).to(tl.int32)
        dq_acc = DQ_ACC + (b * H + h) * L * D  # (only read when ATOMIC_DQ, dense)
        for run in tl.static_range(2 if SPLIT else 1):
            dk, dv, q_src, do_src, mask_base = _dkdv_query_blocks(
                dk, dv, k, v, q_src, do_src, mask_base, dq_acc, lo if run == 0 else mid, mid if run == 0 else hi,
                b32, h.to(tl.int32), bh32, LSE, DELTA, row_base, offs_n, rows, offs_d, offs_dv, q_offs, do_offs,
                mask_offs, sqm, sdom, smm, L, S, diag, win_left, win_right, qk_scale, seed, threshold, inv_keep, D, DV,
                CAUSAL, WINDOW, MASK_KIND, DROPOUT, PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV, DESC, run == 0, ATOMIC_DQ)
    dk *= sm_scale
    if DESC:  # the stores drop rows past S and columns past the head dims
        DK.store([b32, hk32, start_n, 0], dk.to(k.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))
        DV_.store([b32, hk32, start_n, 0], dv.to(v.dtype).reshape(1, 1, BLOCK_N, BLOCK_DV))
    else:
        tl.store(DK + b * sdkb + hk * sdkh + n0 * sdkn + cols[:, None] * sdkn + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_d[None, :] < D))
        tl.store(DV_ + b * sdvb + hk * sdvh + n0 * sdvn + cols[:, None] * sdvn + offs_dv[None, :] * sdvd,
                 dv.to(DV_.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV))


@triton.jit
def _dq_key_blocks(dq, q, do, lse, delta, K, V, MASK, DMASK, lo, start, end, b32, hk32, bh, offs_m, rows, cols,
                   offs_d, offs_dv, k_offs, v_offs, mask_offs, row_mask, skn, svn, smn, L, S, diag, win_left,
                   win_right, qk_scale, seed, threshold, inv_keep,
                   D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DESC: tl.constexpr,
                   CHECKED: tl.constexpr):
    """dQ of one query block over key blocks [start, end); K, V and MASK as in _fwd_key_blocks,
    DMASK (or None) at key lo. CHECKED as in _fwd_key_blocks (rows past L are not stored)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + cols
        if DESC:
            k = K.load([b32, hk32, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b32, hk32, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k = _tile(K + k_offs, offs_n, offs_d, S, D, BLOCK_D, CHECKED)
            v = _tile(V + v_offs, offs_n, offs_dv, S, DV, BLOCK_DV, CHECKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if CHECKED:
            s = _visible(s, offs_m[:, None], offs_n[None, :], L, S, diag, win_left, win_right, MASK + mask_offs,
                         CAUSAL, WINDOW, MASK_KIND)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = dp * _dropout_scale(seed, bh, offs_m[:, None], offs_n[None, :], threshold, inv_keep)
        ds = p * (dp - delta[:, None])
        if DMASK is not None:  # the tiles skipped by causal are left as the caller zeroed them
            tl.store(DMASK + (start_n - lo) + rows[:, None] * S + cols[None, :], ds,
                     mask=row_mask[:, None] & (offs_n[None, :] < S))
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if not DESC:
            K += BLOCK_N * skn
            V += BLOCK_N * svn
        MASK += BLOCK_N * smn
    return dq, K, V, MASK


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ,       # DQ as Q
    LSE, DELTA, MASK,
    DMASK,                 # contiguous (B, H, L, S): dS, the gradient of a float mask, or None
    CU_Q, CU_K,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    smb, smh, smm, smn, slb, slh,
    H, L, S, GROUP, diag, win_left, win_right, qk_scale, SEED, threshold, inv_keep, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DESC: tl.constexpr = False,  # Q, K, V, DO, DQ are tensor descriptors (TMA), as in the forward
):
    """One program: a block of queries of one head, looping over the visible keys."""
    seed = _load_seed(SEED, DROPOUT)
    bh, b, h, hk, q0, k0, L, S, diag, start_m = _query_block(
        CU_Q, CU_K, H, GROUP, L, S, diag, BLOCK_M, VARLEN, CAUSAL)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_mask = offs_m < L
    m0 = q0 + start_m
    b32, h32, hk32 = b.to(tl.int32), h.to(tl.int32), hk.to(tl.int32)
    if DESC:
        q = Q.load([b32, h32, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = DO.load([b32, h32, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
    else:
        q = tl.load(Q + b * sqb + h * sqh + m0 * sqm + rows[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + m0 * sdom + rows[:, None] * sdom + offs_dv[None, :] * sdod,
                     mask=row_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + q0 + offs_m, mask=row_mask, other=0.0)
    lse = tl.where(lse == -float("inf"), float("inf"), lse)
    delta = tl.load(DELTA + b * slb + h * slh + q0 + offs_m, mask=row_mask, other=0.0)
    lo, hi = _key_range(start_m, L, S, diag, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    n_base = k0 + lo
    if not DESC:
        K += b * skb + hk * skh + n_base * skn
        V += b * svb + hk * svh + n_base * svn
    MASK += b * smb + h * smh + start_m.to(tl.int64) * smm + lo.to(tl.int64) * smn
    k_offs = cols[:, None] * skn + offs_d[None, :] * skd
    v_offs = cols[:, None] * svn + offs_dv[None, :] * svd
    mask_offs = rows[:, None] * smm + cols[None, :] * smn
    if DMASK is not None:
        DMASK += ((b * H + h) * L + start_m) * S + lo
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key blocks [lo, mid) unchecked (every query sees every key), [mid, hi) checked; with a mask
    # or a window, all checked.
    SPLIT: tl.constexpr = MASK_KIND == 0 and not WINDOW
    mid = _unchecked_range(lo, hi, start_m, S, diag, BLOCK_N, CAUSAL) if SPLIT else lo
    for run in tl.static_range(0 if SPLIT else 1, 2):
        dq, K, V, MASK = _dq_key_blocks(
            dq, q, do, lse, delta, K, V, MASK, DMASK, lo, lo if run == 0 else mid, mid if run == 0 else hi, b32,
            hk32, bh, offs_m, rows, cols, offs_d, offs_dv, k_offs, v_offs, mask_offs, row_mask, skn, svn, smn, L, S,
            diag, win_left, win_right, qk_scale, seed, threshold, inv_keep, D, DV, CAUSAL, WINDOW, MASK_KIND, DROPOUT,
            PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV, DESC, run == 1)
    dq *= sm_scale
    if DESC:  # the store drops rows past L and columns past D
        DQ.store([b32, h32, start_m, 0], dq.to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        tl.store(DQ + b * sdqb + h * sdqh + m0 * sdqm + rows[:, None] * sdqm + offs_d[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < D))


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # the tensors through TMA tensor descriptors (dense, unmasked 16-bit inputs)
    atomic_dq: bool = False  # dK/dV only: dQ added up atomically there, no dQ kernel (not deterministic)

    def launch(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


def delta_block_m(dv: int) -> int:
    """Rows per program of the backward's delta kernel: about 2048 elements of O and of dO."""
    return max(16, min(64, 2048 // head_block(dv)))


def head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# Hopper (sm_90) configurations per kernel, by padded head dim (<= 64, <= 128, 256), for
# 16-bit and fp32 inputs and three weights of work per score: plain, with a mask, with
# dropout (Philox draws keep the most registers live), causal or not. Every entry compiles
# without spills with Triton 3.6 and 3.7 (their code generation differs: tests/test_hopper_compile.py
# checks both; the alternatives below, timed before use, with 3.7); None: no configuration found
# that does not spill, so the Triton path does not take that case (see ``unsupported``).
PLAIN, MASKED, DROPOUT = 0, 1, 2
_CONFIGS = {
    # kernel: {(fp32, weight): (config for d <= 64, d <= 128, d <= 256)}
    "fwd": {(False, PLAIN): ((128, 64, 8, 3), (128, 64, 8, 3), (32, 32, 8, 1)),
            (False, MASKED): ((128, 32, 8, 3), (32, 32, 4, 2), None),
            (False, DROPOUT): ((128, 32, 8, 3), (32, 32, 4, 2), None),
            (True, PLAIN): ((32, 16, 4, 2), (16, 16, 4, 2), None),
            (True, MASKED): ((16, 32, 4, 1), (16, 32, 4, 1), None),
            (True, DROPOUT): (None, None, None)},
    "dq": {(False, PLAIN): ((64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 1)),
           (False, MASKED): ((64, 64, 8, 2), (32, 32, 8, 2), None),
           (False, DROPOUT): ((32, 32, 8, 1), (32, 32, 4, 2), None),
           (True, PLAIN): ((32, 16, 4, 2), (16, 16, 8, 1), None),
           (True, MASKED): ((16, 32, 4, 1), (16, 16, 4, 1), None),
           (True, DROPOUT): (None, None, None)},
    "dkdv": {(False, PLAIN): ((32, 128, 8, 2), (16, 64, 8, 2), (16, 16, 4, 1)),
             (False, MASKED): ((32, 64, 8, 2), (16, 64, 8, 2), None),
             (False, DROPOUT): ((16, 64, 8, 2), (16, 32, 8, 1), None),  # 32 x 64 spills with the seed read on the GPU
             (True, PLAIN): ((16, 32, 8, 1), (16, 16, 8, 1), None),
             (True, MASKED): ((16, 32, 8, 1), (16, 16, 8, 1), None),
             (True, DROPOUT): (None, None, None)},
}
# More spill-free candidates for the common 16-bit cases, timed against the default above on the
# first call for each problem size on a GPU (gptkern/kernels/autotune.py). dK/dV at head dim 128:
# the H200 run (2026-11-30) chose 16 x 128 and ran the backward at 0.4x cuDNN's; the wider query
# blocks after it (32 or 64 rows per step) compile without spills too, as do three-stage dQ tiles.
_ALTERNATIVES = {
    # kernel: {(fp32, weight): (alternatives for d <= 64, for d <= 128)}
    # (True: through TMA tensor descriptors, where the inputs allow)
    "fwd": {(False, PLAIN): (((64, 64, 4, 3), (128, 64, 8, 4), (64, 32, 4, 4), (128, 64, 8, 3, True),
                              (64, 64, 4, 3, True), (128, 128, 8, 3, True), (128, 64, 4, 3, True)),
                             ((128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3, True), (128, 32, 8, 3, True),
                              (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 64, 8, 4, True),
                              (64, 128, 4, 3, True)))},
    "dq": {(False, PLAIN): (((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2, True),
                             (128, 64, 8, 2, True)),
                            ((128, 32, 8, 2), (32, 64, 8, 2), (128, 64, 8, 2, True), (64, 64, 8, 2, True),
                             (64, 64, 4, 2, True), (128, 32, 8, 2, True), (128, 64, 8, 3, True),
                             (64, 64, 8, 3, True)))},
    "dkdv": {(False, PLAIN): (((32, 64, 4, 2), (16, 64, 4, 2),
                               (64, 128, 8, 2, True), (32, 128, 8, 2, True), (64, 64, 8, 2, True),
                               (64, 128, 8, 2, True, True), (32, 128, 8, 2, True, True), (64, 64, 8, 2, True, True)),
                              ((32, 64, 8, 2, True), (16, 128, 8, 2, True), (32, 128, 8, 2, True),
                               (64, 64, 8, 2, True), (64, 64, 8, 3, True), (32, 64, 4, 2, True),
                               (16, 128, 8, 2, True, True)))},
}
# (the sixth flag: dQ added up atomically in the dK/dV kernel, 5 products a tile rather than 7, timed
# as a whole backward against dK/dV plus the dQ kernel; wider atomic tiles spill at head dim 128)
# The dQ kernel writing a float mask's gradient (dS) under dropout: the DROPOUT entries spill there
# with Triton 3.7 (head dims 16 and 80) and 32x32 tiles with 3.6 (causal, head dim 16); this one
# does not, at any head dim up to 128.
DQ_MASK_GRAD_DROPOUT = AttnConfig(32, 16, 4, 1)
INTERPRETER_CONFIG = AttnConfig(64, 64, 4, 1)  # few, wide tiles: the interpreter runs programs in turn


def _width_index(d: int, dv: int) -> int:
    width = max(head_block(d), head_block(dv))
    return 0 if width <= 64 else 1 if width <= 128 else 2


def unsupported(d: int, dv: int, fp32: bool, weight: int) -> Optional[str]:
    """Why the Triton kernels do not take this case on a GPU, or None."""
    index = _width_index(d, dv)
    if any(_CONFIGS[k][(fp32, weight)][index] is None for k in _CONFIGS):
        what = {MASKED: "an attention mask", DROPOUT: "dropout"}.get(weight, "attention")
        where = "float32 inputs" + (" and head dims above 128" if index == 2 and weight != DROPOUT else "") \
            if fp32 else "head dims above 128"
        return f"{what} with {where} (no spill-free Hopper configuration)"
    return None


def configs(kernel: str, d: int, dv: int, fp32: bool, weight: int,
            capability: Optional[tuple[int, int]]) -> tuple[AttnConfig, ...]:
    """Blocks, warps and stages of ``kernel`` ("fwd", "dq" or "dkdv") for head dims (d, dv), the
    work per score (PLAIN, MASKED or DROPOUT) and the GPU's compute capability (None: the
    interpreter): the default first, then the alternatives autotuning may choose."""
    if capability is None:
        return (INTERPRETER_CONFIG,)
    width = _width_index(d, dv)
    alternatives = _ALTERNATIVES[kernel].get((fp32, weight), ((), ()))
    found = (_CONFIGS[kernel][(fp32, weight)][width], *(alternatives[width] if width < 2 else ()))
    if capability[0] not in (9, 10):  # less shared memory than Hopper's (and B200's) 228 KB (Ampere, Ada,
        # consumer Blackwell sm_120): smaller tiles, no alternatives
        m, n, warps, stages = found[0]
        return (AttnConfig(min(m, 64), min(n, 32), min(warps, 4), min(stages, 2)),)
    return tuple(AttnConfig(*c) for c in found)


def _tune_key(kernel: str, p: "Problem", q: torch.Tensor, kind: int, descriptors: bool = False) -> tuple:
    """What the best configuration depends on: the kernel and its flags, the problem's size in
    powers of two (heads launched, query and key rows, the GQA group: dK/dV's work per program
    grows with it) and whether descriptors can be used."""
    heads = p.kv_heads if kernel == "dkdv" else p.heads
    size = tuple(triton.next_power_of_2(max(n, 1)) for n in (p.batch * heads, p.l, p.s, p.heads // max(p.kv_heads, 1)))
    return (kernel, q.dtype, p.d, p.dv, p.causal, p.window != (-1, -1), p.varlen, kind, p.dropout_p > 0, size,
            descriptors)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(mask: Optional[torch.Tensor], q: torch.Tensor):
    """(pointer, 4 strides, kind) of a mask broadcast to (B, H, L, S) by the caller."""
    if mask is None:
        return q, (0, 0, 0, 0), MASK_NONE
    kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
    return mask, tuple(mask.stride()), kind


UNBOUNDED = 1 << 30  # a window side of -1


def _dropout_scalars(dropout_p: float) -> tuple[int, float]:
    """(threshold, inv_keep): a weight is dropped when its 31-bit Philox draw is below
    threshold = p * 2**31, and a kept one is scaled by inv_keep = 1 / (1 - p)."""
    return min(int(dropout_p * 2**31), 2**31 - 1), 1.0 / (1.0 - dropout_p)


@dataclass(frozen=True)
class Problem:
    """What the kernels need besides the tensors: sizes, layout and visibility rules.

    Dense: tensors (B, H, seq, dim). Varlen: packed (total, H, dim), ``cu_q`` / ``cu_k`` the
    (B + 1,) int32 sequence starts, ``l`` / ``s`` the longest query / key sequence.
    """
    batch: int
    heads: int
    kv_heads: int
    l: int
    s: int
    d: int
    dv: int
    causal: bool
    scale: float
    window: tuple[int, int] = (-1, -1)
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    seed: Optional[torch.Tensor] = None  # (1,) int64 on the inputs' device when dropout_p > 0

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None

    def strides(self, t: torch.Tensor) -> tuple[int, int, int, int]:
        """(batch, head, row, dim) strides of q, k, v, o or their gradients."""
        if self.varlen:
            return (0, t.stride(1), t.stride(0), t.stride(2))
        return tuple(t.stride())

    def row_stat_strides(self, stat: torch.Tensor) -> tuple[int, int]:
        """(batch, head) strides of the LSE / delta: (B, H, L) dense, (H, total) varlen."""
        return (0, stat.stride(0)) if self.varlen else (stat.stride(0), stat.stride(1))

    def scalars(self, q: torch.Tensor) -> tuple:
        """The kernels' scalar arguments, H to inv_keep (the seed's tensor, or q as an unread stand-in)."""
        left, right = (UNBOUNDED if w < 0 else min(w, UNBOUNDED) for w in self.window)  # (int32 sums)
        seed = self.seed if self.dropout_p > 0.0 else q
        return (self.heads, self.l, self.s, self.heads // self.kv_heads, 0, left, right, self.scale * LOG2E,
                seed, *_dropout_scalars(self.dropout_p))

    def flags(self, q: torch.Tensor, mask_kind: int) -> dict:
        return dict(D=self.d, DV=self.dv, CAUSAL=self.causal, WINDOW=self.window != (-1, -1),
                    VARLEN=self.varlen, MASK_KIND=mask_kind, DROPOUT=self.dropout_p > 0.0,
                    PRECISION=_precision(q.dtype),
                    BLOCK_D=head_block(self.d), BLOCK_DV=head_block(self.dv))

    def weight(self, mask_kind: int) -> int:
        """The work per score, which sets the block sizes: PLAIN, MASKED or DROPOUT."""
        return DROPOUT if self.dropout_p > 0.0 else MASKED if mask_kind != MASK_NONE else PLAIN

    def cu(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.cu_q, self.cu_k) if self.varlen else (q, q)


def _descriptors_fit(p: Problem, kind: int, *tensors: torch.Tensor) -> bool:
    """Whether a kernel can read and write ``tensors`` through TMA descriptors: dense, with no
    mask, window or dropout, 16-bit, (B, H, seq, dim) with unit last stride and other strides and
    base addresses 16-byte aligned (the descriptors' rules)."""
    if p.varlen or kind != MASK_NONE or p.window != (-1, -1) or p.dropout_p > 0:
        return False
    for t in tensors:
        size = t.element_size()
        if t.dtype not in (torch.float16, torch.bfloat16) or t.dim() != 4 or t.stride(-1) != 1 or not t.numel():
            return False
        if t.data_ptr() % 16 or any(st <= 0 or st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


# Each kernel's descriptor tensors, in argument order, by their tiles' rows (a block of queries,
# "m", or of keys, "n") and head dim ("d" of q and k, "dv" of v).
_DESCRIPTOR_TILES = {
    "fwd": (("m", "d"), ("n", "d"), ("n", "dv"), ("m", "dv")),                          # q, k, v, out
    "dq": (("m", "d"), ("n", "d"), ("n", "dv"), ("m", "dv"), ("m", "d")),               # q, k, v, do, dq
    "dkdv": (("m", "d"), ("n", "d"), ("n", "dv"), ("m", "dv"), ("n", "d"), ("n", "dv")),  # ..., dk, dv
}


def _descriptors(cfg: AttnConfig, p: Problem, kernel: str, *tensors: torch.Tensor) -> tuple:
    """Host tensor descriptors of ``kernel``'s (B, H, seq, dim) tensors, tiles (1, 1, rows, padded dim)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    tiles = _DESCRIPTOR_TILES[kernel]
    assert len(tensors) == len(tiles)
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()),
                                  [1, 1, cfg.block_m if rows == "m" else cfg.block_n,
                                   head_block(p.d if dim == "d" else p.dv)])
                 for t, (rows, dim) in zip(tensors, tiles))


def _candidates(kernel: str, p: Problem, kind: int, *tensors: torch.Tensor) -> tuple[tuple[AttnConfig, ...], bool]:
    """(``kernel``'s candidates for this problem, whether descriptors fit): less the descriptor ones
    and the atomic dQ ones (dense and unmasked only: a dense fp32 dQ, no dmask written) when
    ``tensors``, q first, cannot take descriptors, and the atomic dQ ones when results must be
    deterministic."""
    q = tensors[0]
    candidates = configs(kernel, p.d, p.dv, q.dtype == torch.float32, p.weight(kind), device_capability(q.device))
    descriptors = _descriptors_fit(p, kind, *tensors)
    if not descriptors:
        candidates = tuple(c for c in candidates if not c.tma and not c.atomic_dq)
    if torch.are_deterministic_algorithms_enabled():
        candidates = tuple(c for c in candidates if not c.atomic_dq)
    return candidates, descriptors


def _tuned(kernel: str, p: Problem, kind: int, run: Callable[[AttnConfig], None],
           *tensors: torch.Tensor) -> AttnConfig:
    """The configuration of ``kernel`` for this problem (:func:`_candidates`), autotuned on a GPU."""
    candidates, descriptors = _candidates(kernel, p, kind, *tensors)
    return autotune.pick(_tune_key(kernel, p, tensors[0], kind, descriptors), candidates, run, tensors[0].device)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
             problem: Problem, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Write attention of q over k, v into ``out`` and the log2-domain log-sum-exp of each
    query row into ``lse`` ((B, H, L) dense, (H, total_q) varlen; fp32).

    ``mask`` is None or a bool / float tensor expanded (as a view) to (B, H, L, S); dense only.
    """
    p = problem
    if out.numel() == 0 or p.l == 0:
        lse.fill_(-float("inf"))  # nothing attended (or nothing to write): the backward gives zeros
        return
    mask_ptr, mask_strides, kind = _mask_args(mask, q)

    def run(cfg: AttnConfig) -> None:
        tensors = _descriptors(cfg, p, "fwd", q, k, v, out) if cfg.tma else (q, k, v, out)
        _attn_fwd_kernel[(p.batch * p.heads, triton.cdiv(p.l, cfg.block_m))](
            *tensors, lse, mask_ptr, *p.cu(q), *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(out),
            *mask_strides, *p.row_stat_strides(lse), *p.scalars(q), **p.flags(q, kind), **cfg.launch(),
            DESC=cfg.tma)

    run(_tuned("fwd", p, kind, run, q, k, v, out))


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, mask: Optional[torch.Tensor], problem: Problem,
             dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dmask: Optional[torch.Tensor] = None) -> None:
    """Write the gradients of :func:`attn_fwd` into dq, dk, dv (shapes of q, k, v) and, for a
    float mask, into ``dmask`` if given ((B, H, L, S), dense only; causal: zeroed by the caller,
    as the tiles above the diagonal are skipped)."""
    p = problem
    grads = (dq, dk, dv) if dmask is None else (dq, dk, dv, dmask)
    if sum(t.numel() for t in grads) == 0:
        return
    if p.l == 0 or p.batch * p.heads == 0 or p.dv == 0:  # nothing attends: every gradient is zero
        for t in grads:
            t.zero_()
        return
    if dmask is not None and not (mask is not None and mask.is_floating_point() and dmask.is_contiguous()
                                  and not p.varlen and p.window == (-1, -1)):
        raise RuntimeError("attn_bwd: dmask needs a dense float mask, no window and a contiguous buffer")
    mask_ptr, mask_strides, kind = _mask_args(mask, q)
    delta = torch.empty_like(lse)
    delta_rows = delta_block_m(p.dv)
    _attn_bwd_delta_kernel[(p.batch * p.heads, triton.cdiv(p.l, delta_rows))](
        out, do, delta, p.cu(q)[0], *p.strides(out), *p.strides(do), *p.row_stat_strides(lse), p.heads, p.l,
        DV=p.dv, VARLEN=p.varlen, BLOCK_M=delta_rows, BLOCK_DV=head_block(p.dv), num_warps=4)
    scalars = (*p.row_stat_strides(lse), *p.scalars(q), p.scale)

    def run_dkdv(cfg: AttnConfig) -> None:
        tensors = (q, k, v, do, dk, dv)
        dq_acc = torch.zeros((p.batch, p.heads, p.l, p.d), device=q.device, dtype=torch.float32) \
            if cfg.atomic_dq else lse  # (unused)
        _attn_bwd_dkdv_kernel[(p.batch * p.kv_heads, triton.cdiv(p.s, cfg.block_n))](
            *(_descriptors(cfg, p, "dkdv", *tensors) if cfg.tma else tensors), dq_acc, lse, delta, mask_ptr,
            *p.cu(q), *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do), *p.strides(dk), *p.strides(dv),
            *mask_strides, *scalars, **p.flags(q, kind), **cfg.launch(), DESC=cfg.tma, ATOMIC_DQ=cfg.atomic_dq)
        if cfg.atomic_dq:
            torch.mul(dq_acc, p.scale, out=dq)  # the dQ kernel's scaling, and its cast

    def run_dq(cfg: AttnConfig) -> None:
        tensors = (q, k, v, do, dq)
        _attn_bwd_dq_kernel[(p.batch * p.heads, triton.cdiv(p.l, cfg.block_m))](
            *(_descriptors(cfg, p, "dq", *tensors) if cfg.tma else tensors), lse, delta, mask_ptr, dmask,
            *p.cu(q), *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do), *p.strides(dq),
            *mask_strides, *scalars, **p.flags(q, kind), **cfg.launch(), DESC=cfg.tma)

    dkdv_tensors = (q, k, v, do, dk, dv)
    if p.s > 0 and any(c.atomic_dq for c in _candidates("dkdv", p, kind, *dkdv_tensors)[0]):
        # dQ atomically inside dK/dV, or by its own kernel: timed as whole backwards (dQ's tiles first)
        dq_cfg = _tuned("dq", p, kind, run_dq, q, k, v, do, dq)

        def run_backward(cfg: AttnConfig) -> None:
            run_dkdv(cfg)
            if not cfg.atomic_dq:
                run_dq(dq_cfg)

        run_backward(_tuned("dkdv", p, kind, run_backward, *dkdv_tensors))
        return
    if p.s > 0:
        run_dkdv(_tuned("dkdv", p, kind, run_dkdv, *dkdv_tensors))
    else:
        dk.zero_()
        dv.zero_()
    if dmask is not None and p.dropout_p > 0 and device_capability(q.device) is not None:
        run_dq(DQ_MASK_GRAD_DROPOUT)
    else:
        run_dq(_tuned("dq", p, kind, run_dq, q, k, v, do, dq))


FACTOR_BLOCKS = dict(BLOCK_M=32, BLOCK_N=64)


@triton.jit
def _dropout_factors_kernel(Z, SEED, first_bh, rows, cols, threshold, inv_keep,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Z (batch-heads, rows, cols) fp32: the factor _dropout_scale gives each score of batch-head
    first_bh + z under the seed in SEED ((1,) int64); grid (batch-heads, row blocks, column blocks)."""
    seed = _load_seed(SEED, True)
    z_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    z = _dropout_scale(seed, first_bh + z_bh, offs_m[:, None], offs_n[None, :], threshold, inv_keep)
    Z += z_bh.to(tl.int64) * rows * cols
    tl.store(Z + offs_m[:, None].to(tl.int64) * cols + offs_n[None, :], z,
             mask=(offs_m[:, None] < rows) & (offs_n[None, :] < cols))


def dropout_factors(seed: torch.Tensor, dropout_p: float, batch_heads: int, rows: int, cols: int,
                    device: torch.device, first_batch_head: int = 0) -> torch.Tensor:
    """The dropout factors (0 or 1 / (1 - p)) the attention kernels apply under ``seed``, a (1,)
    int64 tensor on ``device``: (batch_heads, rows, cols) fp32, for batch-head first_batch_head + bh,
    query row i and key j (counted inside their sequence when varlen)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the kernel launches on the current device
        device = torch.device("cuda", torch.cuda.current_device())
    if seed.device != device or seed.dtype != torch.int64 or seed.numel() != 1:
        raise RuntimeError(f"dropout_factors: seed must be a (1,) int64 tensor on {device} (the kernel reads it "
                         f"there), got {seed.dtype} {tuple(seed.shape)} on {seed.device}")
    z = torch.empty((batch_heads, rows, cols), device=device, dtype=torch.float32)
    if z.numel():
        grid = (batch_heads, triton.cdiv(rows, FACTOR_BLOCKS["BLOCK_M"]), triton.cdiv(cols, FACTOR_BLOCKS["BLOCK_N"]))
        _dropout_factors_kernel[grid](z, seed, first_batch_head, rows, cols, *_dropout_scalars(dropout_p),
                                      **FACTOR_BLOCKS, num_warps=4)
    return z
