"""Flash attention in Triton: forward (online softmax, exp2, saves the log-sum-exp) and
backward (dK/dV per key block, dQ per query block: no atomics, so deterministic).

Layouts are 4-D with arbitrary strides: Q (B, H, L, D), K (B, Hkv, S, D), V (B, Hkv, S, Dv),
O (B, H, L, Dv); query head h reads key/value head h // (H // Hkv) (GQA / MQA). Head dims D
and Dv are compile-time constants, so the padding masks vanish when they are powers of 2. An optional
mask is read through strides broadcast to (B, H, L, S) (stride 0 on broadcast dims), so a
key-padding mask (B, 1, 1, S) is never expanded. Key j is visible to query i when
j <= i + DIAG under CAUSAL (DIAG = 0: PyTorch's top-left alignment). Scores are kept in
the log2 domain: s = q.k * scale * log2(e) (+ float mask * log2(e)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # written out in _scores too: a jit function can't read globals

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@triton.jit
def _scores(q, k, offs_m, offs_n, L, S, diag, qk_scale, mask_ptrs,
            CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores in the log2 domain, -inf where a key is not visible."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs, mask=visible, other=0)
        visible = visible & (keep != 0)
    if MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=visible, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(visible, s, -float("inf"))


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O,            # (B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, Dv), (B, H, L, Dv)
    LSE,                   # (B, H, L) fp32, contiguous: log2-domain log-sum-exp of each row
    MASK,                  # mask broadcast to (B, H, L, S) through strides, or unused
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    smb, smh, smm, smn,
    H, L, S, GROUP, diag, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Tile bases are int64 (pointer increments); offsets inside a tile are int32.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m.to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rows
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + m0 * sqm + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    MASK += b * smb + h * smh + m0 * smm
    k_offs = cols[:, None] * skn + offs_d[None, :] * skd
    v_offs = cols[:, None] * svn + offs_dv[None, :] * svd
    mask_offs = rows[:, None] * smm + cols[None, :] * smn

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = S
    if CAUSAL:  # causal block skipping: keys past the block's last visible one
        hi = tl.minimum(S, tl.maximum((pid_m + 1) * BLOCK_M + diag, 0))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + cols
        k = tl.load(K + k_offs, mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        s = _scores(q, k, offs_m, offs_n, L, S, diag, qk_scale, MASK + mask_offs, CAUSAL, MASK_KIND, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_offs, mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        K += BLOCK_N * skn
        V += BLOCK_N * svn
        MASK += BLOCK_N * smn
    # A row that sees no key gets 0, as torch's SDPA gives; its LSE is -inf.
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h * soh + m0 * som + rows[:, None] * som + offs_dv[None, :] * sod,
             o.to(O.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_dv[None, :] < DV))
    tl.store(LSE + (b * H + h) * L + offs_m, m_i + tl.log2(l_i), mask=offs_m < L)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,                 # (B, H, L, Dv) each, strides s*o / s*do
    DELTA,                 # (B, H, L) fp32, contiguous: rowsum(dO * O)
    sob, soh, som, sod, sdb, sdh, sdm, sdd,
    H, L,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rows
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < L) & (offs_dv[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + m0 * som + rows[:, None] * som + offs_dv[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + m0 * sdm + rows[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + (b * H + h) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_,  # Q, dO as in the forward (DO strides sdo*); DK (B, Hkv, S, D), DV_ (B, Hkv, S, Dv)
    LSE, DELTA,            # (B, H, L) fp32, contiguous
    MASK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    smb, smh, smm, smn,
    H, L, S, GROUP, diag, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: a block of keys of one KV head, summed over the GROUP query heads."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    hkv = H // GROUP
    b = (bhk // hkv).to(tl.int64)
    hk = (bhk % hkv).to(tl.int64)
    n0 = pid_n.to(tl.int64) * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + cols
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * skb + hk * skh + n0 * skn + cols[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hk * svh + n0 * svn + cols[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    q_offs = rows[:, None] * sqm + offs_d[None, :] * sqd
    do_offs = rows[:, None] * sdom + offs_dv[None, :] * sdod
    mask_offs = rows[:, None] * smm + cols[None, :] * smn
    lo = 0
    if CAUSAL:  # queries before the first one that sees this block see none of it
        lo = tl.maximum(pid_n * BLOCK_N - diag, 0) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        mask_base = MASK + b * smb + h * smh + n0 * smn
        if CAUSAL:
            lo64 = lo.to(tl.int64)
            q_base += lo64 * sqm
            do_base += lo64 * sdom
            mask_base += lo64 * smm
        row_base = (b * H + h) * L
        for start_m in range(lo, L, BLOCK_M):
            offs_m = start_m + rows
            q = tl.load(q_base + q_offs, mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
            s = _scores(q, k, offs_m, offs_n, L, S, diag, qk_scale, mask_base + mask_offs, CAUSAL, MASK_KIND,
                        PRECISION)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < L, other=0.0)
            lse = tl.where(lse == -float("inf"), float("inf"), lse)  # rows that saw nothing: p = 0
            p = tl.exp2(s - lse[:, None])
            do = tl.load(do_base + do_offs, mask=(offs_m[:, None] < L) & (offs_dv[None, :] < DV), other=0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < L, other=0.0)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
            q_base += BLOCK_M * sqm
            do_base += BLOCK_M * sdom
            mask_base += BLOCK_M * smm
    dk *= sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + n0 * sdkn + cols[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_d[None, :] < D))
    tl.store(DV_ + b * sdvb + hk * sdvh + n0 * sdvn + cols[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ,       # DQ (B, H, L, D)
    LSE, DELTA, MASK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    smb, smh, smm, smn,
    H, L, S, GROUP, diag, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: a block of queries of one head, looping over the visible keys."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m.to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rows
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_mask = offs_m < L
    q = tl.load(Q + b * sqb + h * sqh + m0 * sqm + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + m0 * sdom + rows[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=row_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + (b * H + h) * L + offs_m, mask=row_mask, other=0.0)
    lse = tl.where(lse == -float("inf"), float("inf"), lse)
    delta = tl.load(DELTA + (b * H + h) * L + offs_m, mask=row_mask, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    MASK += b * smb + h * smh + m0 * smm
    k_offs = cols[:, None] * skn + offs_d[None, :] * skd
    v_offs = cols[:, None] * svn + offs_dv[None, :] * svd
    mask_offs = rows[:, None] * smm + cols[None, :] * smn
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, tl.maximum((pid_m + 1) * BLOCK_M + diag, 0))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + cols
        k = tl.load(K + k_offs, mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + v_offs, mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
        s = _scores(q, k, offs_m, offs_n, L, S, diag, qk_scale, MASK + mask_offs, CAUSAL, MASK_KIND, PRECISION)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        K += BLOCK_N * skn
        V += BLOCK_N * svn
        MASK += BLOCK_N * smn
    dq *= sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + m0 * sdqm + rows[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < D))


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def fwd_config(d: int, dv: int, device: torch.device) -> AttnConfig:
    """Block sizes of the forward for head dims (d, dv)."""
    if device.type != "cuda":  # interpreter: few, wide tiles
        return AttnConfig(64, 64, 4, 1)
    width = max(head_block(d), head_block(dv))
    if width <= 64:
        return AttnConfig(128, 64, 4, 3)
    if width <= 128:
        return AttnConfig(128, 64, 8, 3)
    return AttnConfig(64, 32, 8, 2)


def bwd_config(d: int, dv: int, device: torch.device) -> AttnConfig:
    if device.type != "cuda":
        return AttnConfig(64, 64, 4, 1)
    width = max(head_block(d), head_block(dv))
    if width <= 64:
        return AttnConfig(64, 64, 4, 2)
    if width <= 128:
        return AttnConfig(64, 64, 8, 2)
    return AttnConfig(32, 32, 8, 1)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(mask: Optional[torch.Tensor], q: torch.Tensor):
    """(pointer, 4 strides, kind) of a mask broadcast to (B, H, L, S) by the caller."""
    if mask is None:
        return q, (0, 0, 0, 0), MASK_NONE
    kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
    return mask, tuple(mask.stride()), kind


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
             causal: bool, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Write attention of q (B, H, L, D) over k (B, Hkv, S, D), v (B, Hkv, S, Dv) into
    ``out`` (B, H, L, Dv) and the log2-domain log-sum-exp into ``lse`` (B, H, L) fp32.

    ``mask`` is None or a bool / float tensor expanded (as a view) to (B, H, L, S).
    """
    b, h, l, d = q.shape
    _, hkv, s, dv = v.shape
    if out.numel() == 0:
        return
    cfg = fwd_config(d, dv, q.device)
    mask_ptr, mask_strides, kind = _mask_args(mask, q)
    grid = (triton.cdiv(l, cfg.block_m), b * h)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, mask_ptr, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *mask_strides, h, l, s, h // hkv, 0, scale * LOG2E,
        D=d, DV=dv, CAUSAL=causal, MASK_KIND=kind, PRECISION=_precision(q.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=head_block(d), BLOCK_DV=head_block(dv),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, mask: Optional[torch.Tensor], causal: bool, scale: float,
             dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Write the gradients of :func:`attn_fwd` into dq, dk, dv (shapes of q, k, v)."""
    b, h, l, d = q.shape
    _, hkv, s, dvh = v.shape
    if dq.numel() + dk.numel() + dv.numel() == 0:
        return
    if l == 0 or b * h == 0:  # nothing attends: every gradient is zero
        for t in (dq, dk, dv):
            t.zero_()
        return
    cfg = bwd_config(d, dvh, q.device)
    delta = torch.empty((b, h, l), device=q.device, dtype=torch.float32)
    block_dv = head_block(dvh)
    _attn_bwd_delta_kernel[(triton.cdiv(l, cfg.block_m), b * h)](
        out, do, delta, *out.stride(), *do.stride(), h, l,
        DV=dvh, BLOCK_M=cfg.block_m, BLOCK_DV=block_dv, num_warps=4)
    mask_ptr, mask_strides, kind = _mask_args(mask, q)
    common = dict(D=d, DV=dvh, CAUSAL=causal, MASK_KIND=kind, PRECISION=_precision(q.dtype), BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, BLOCK_D=head_block(d), BLOCK_DV=block_dv,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    scalars = (h, l, s, h // hkv, 0, scale * LOG2E, scale)
    if s > 0:
        _attn_bwd_dkdv_kernel[(triton.cdiv(s, cfg.block_n), b * hkv)](
            q, k, v, do, dk, dv, lse, delta, mask_ptr, *q.stride(), *k.stride(), *v.stride(),
            *do.stride(), *dk.stride(), *dv.stride(), *mask_strides, *scalars, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(l, cfg.block_m), b * h)](
        q, k, v, do, dq, lse, delta, mask_ptr, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dq.stride(), *mask_strides, *scalars, **common)
