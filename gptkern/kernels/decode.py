"""Decode attention in Triton: a few new query tokens against a long KV cache (flash-decoding).

The cache's key blocks are dealt round-robin to the splits, up to each sequence's filled length;
one program handles one (batch, kv head, split) and the query heads of that kv head's GQA group
together, so each key/value block is loaded once per group (once per row block when a group has
more rows than a tile). Its rows are (group head g, query i) pairs: M = G * Lq, padded to a
tensor-core tile. Each split writes a partial output normalised by its own sum plus its
log-sum-exp (log2 domain); a combine kernel merges the splits.

Layouts: Q (B, H, Lq, D); a static cache K (B, Hkv, S_max, D), V (B, Hkv, S_max, Dv); a paged
cache K (num_blocks, Hkv, PAGE, D) with a block table (B, max_blocks) int32. SEQLENS (B,) int32
counts the valid cache tokens of each sequence, the Lq new ones included: query i sees keys
j <= seqlen - Lq + i. A sequence with seqlen 0 gets zeros.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from gptkern.kernels import autotune
from gptkern.kernels.attention import LOG2E, _precision, head_block
from gptkern.kernels.launch import sm_count


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, TABLE, O_PART, LSE_PART,
    sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd, stb, stn,
    qk_scale, HKV, capacity,
    G: tl.constexpr, LQ: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PAGE: tl.constexpr,
    SPLITS: tl.constexpr, M_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV
    seqlen = tl.minimum(tl.load(SEQLENS + b), capacity)  # the GPU trusts SEQLENS: never read past the cache
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    g = offs_m // LQ
    i = offs_m % LQ
    row_ok = offs_m < G * LQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    head = hk * G + g
    q = tl.load(Q + b * sqb + head[:, None] * sqh + i[:, None] * sql + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    last_visible = seqlen - LQ + i  # (BLOCK_M,) the last key each row sees

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if PAGE == 0:  # this sequence's cache: 32-bit offsets from here
        K += b.to(tl.int64) * skb
        V += b.to(tl.int64) * svb
    K += hk.to(tl.int64) * skh  # a head's cache may pass 2**31 elements (say 1M keys x 8 heads x 256)
    V += hk.to(tl.int64) * svh
    # Split s takes key blocks s, s + SPLITS, s + 2 * SPLITS, ... of the filled length: every split
    # gets a share however full the cache is (contiguous ranges of the capacity left a mostly empty
    # cache to one split).
    for n0 in range(split * BLOCK_N, seqlen, SPLITS * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < seqlen
        if PAGE > 0:
            block = tl.load(TABLE + b * stb + (offs_n // PAGE) * stn, mask=in_range, other=0).to(tl.int64)
            k_rows = block * skb + (offs_n % PAGE) * sks
            v_rows = block * svb + (offs_n % PAGE) * svs
        else:  # int32: a row offset within one head's cache (capacity x its row stride < 2**31, checked)
            k_rows = offs_n * sks
            v_rows = offs_n * svs
        k = tl.load(K + k_rows[:, None] + offs_d[None, :] * skd,
                    mask=in_range[:, None] & (offs_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        visible = in_range[None, :] & (offs_n[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_rows[:, None] + offs_dv[None, :] * svd,
                    mask=in_range[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), -float("inf"))
    part = (bh * SPLITS + split).to(tl.int64) * M_PAD  # partials: (B * Hkv, SPLITS, M_PAD[, BLOCK_DV])
    tl.store(O_PART + (part + offs_m)[:, None] * BLOCK_DV + offs_dv[None, :], out)
    tl.store(LSE_PART + part + offs_m, lse)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, OUT, sob, soh, sol, sod, HKV,
    G: tl.constexpr, LQ: tl.constexpr, DV: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (batch, kv head, row): the splits' outputs weighted by exp2(lse)."""
    bh = tl.program_id(0)
    m = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (bh * SPLITS + offs_s).to(tl.int64) * M_PAD + m  # (BLOCK_S,)
    lse = tl.load(LSE_PART + rows, mask=offs_s < SPLITS, other=-float("inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == -float("inf"), 0.0, top)
    w = tl.exp2(lse - top)  # 0 for empty splits
    parts = tl.load(O_PART + rows[:, None] * BLOCK_DV + offs_dv[None, :], mask=(offs_s < SPLITS)[:, None],
                    other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    g = m // LQ
    i = m % LQ
    tl.store(OUT + b * sob + (hk * G + g) * soh + i * sol + offs_dv * sod, out.to(OUT.dtype.element_ty),
             mask=offs_dv < DV)


@dataclass(frozen=True)
class DecodeConfig:
    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=self.block_d, BLOCK_DV=self.block_dv)


def launch_config(g: int, lq: int, d: int, dv: int, page: int, fp32: bool) -> DecodeConfig:
    """Rows: the GQA group's (head, query) pairs, padded to a tensor-core tile of 16 to 64 (16 for
    fp32, whose dot runs on FMA units, 32 at head dim 256); a larger group takes several row
    blocks. Keys per step: as many as keep a K tile (and its per-element addresses, gathered row
    by row for a paged cache) near 32 elements a thread, 16 to 64. ``page`` does not change the
    tiles: block ids are looked up per key row."""
    block_d, block_dv = head_block(d), head_block(dv)
    cap = 16 if fp32 else 32 if max(block_d, block_dv) >= 256 else 64
    block_m = min(cap, max(16, triton.next_power_of_2(g * lq)))
    num_warps = 8 if block_m >= 64 or max(block_d, block_dv) >= 256 else 4
    budget = 32 * 32 * num_warps // (2 if fp32 else 1)  # tile elements
    block_n = max(16, min(64, budget // max(block_d, block_dv)))
    return DecodeConfig(block_m, block_n, block_d, block_dv, num_warps=num_warps, num_stages=1)


def combine_warps(block_s: int, block_dv: int) -> int:
    """Warps of the combine kernel: its (BLOCK_S, BLOCK_DV) fp32 tile at about 32 values a thread
    (one warp held 64 x 128 in 256 registers a thread and spilled)."""
    return max(1, min(8, block_s * block_dv // 1024))


def _num_splits(batch_heads: int, capacity: int, block_n: int, device: torch.device, fill: int = 2) -> int:
    """Enough programs to fill the GPU about ``fill`` times, no more splits than key blocks."""
    if device.type == "cuda":
        target = fill * sm_count(device)
    else:
        target = 4  # the interpreter: few programs
    return max(1, min(triton.cdiv(target, batch_heads), triton.cdiv(capacity, block_n), 64))


@functools.lru_cache(maxsize=None)
def launch_candidates(cfg: DecodeConfig, fp32: bool = False) -> tuple[tuple[DecodeConfig, int], ...]:
    """(config, fill) recipes autotuning times on a GPU, the default first (the splits follow from
    the fill and the problem: _num_splits): for 16-bit caches the key loop software-pipelined over
    2 or 3 stages, the GPU filled four times rather than twice, and, for 4-warp tiles, twice the
    keys per step on twice the warps over 3 stages, so that more bytes are in flight per program
    (the first H200 run read a 16K-32K cache at 57-58% of copy bandwidth with one stage of 32 keys
    on 4 warps, filled twice; twice the keys on 4 warps spill). float32 keeps one stage (its tiles
    spill with more) and tries the fuller grid."""
    if fp32:
        return ((cfg, 2), (cfg, 4))
    found = ((cfg, 2), (replace(cfg, num_stages=2), 2), (replace(cfg, num_stages=3), 2),
             (replace(cfg, num_stages=2), 4))
    if cfg.num_warps > 4:
        return found
    wide = replace(cfg, block_n=2 * cfg.block_n, num_warps=2 * cfg.num_warps, num_stages=3)
    return found + ((wide, 2), (wide, 4))


def decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               scale: float, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, H, Lq, Dv) attention of q over the cache; see the module docstring for layouts."""
    b, h, lq, d = q.shape
    hkv, dv = k_cache.shape[1], v_cache.shape[-1]
    out = torch.empty((b, h, lq, dv), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    g = h // hkv
    cache_seqlens = cache_seqlens.contiguous()  # read as a (B,) array
    page = k_cache.shape[2] if block_table is not None else 0
    capacity = block_table.shape[1] * page if block_table is not None else k_cache.shape[2]
    cfg = launch_config(g, lq, d, dv, page, q.dtype == torch.float32)
    table = block_table if block_table is not None else cache_seqlens

    def run(candidate: tuple[DecodeConfig, int], seqlens: torch.Tensor = cache_seqlens,
            table: torch.Tensor = table) -> None:
        cfg, fill = candidate
        table_strides = table.stride() if block_table is not None else (0, 0)
        splits = _num_splits(b * hkv, max(capacity, 1), cfg.block_n, q.device, fill)
        row_blocks = triton.cdiv(g * lq, cfg.block_m)
        m_pad = row_blocks * cfg.block_m
        o_part = torch.empty((b * hkv * splits * m_pad, cfg.block_dv), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((b * hkv * splits * m_pad,), device=q.device, dtype=torch.float32)
        _decode_split_kernel[(b * hkv, splits, row_blocks)](
            q, k_cache, v_cache, seqlens, table, o_part, lse_part, *q.stride(), *k_cache.stride(),
            *v_cache.stride(), *table_strides, scale * LOG2E, hkv, capacity,
            G=g, LQ=lq, D=d, DV=dv, PAGE=page, SPLITS=splits, M_PAD=m_pad, PRECISION=_precision(q.dtype),
            **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        block_s = triton.next_power_of_2(splits)
        _decode_combine_kernel[(b * hkv, g * lq)](
            o_part, lse_part, out, *out.stride(), hkv, G=g, LQ=lq, DV=dv, SPLITS=splits,
            BLOCK_S=block_s, M_PAD=m_pad, BLOCK_DV=cfg.block_dv, num_warps=combine_warps(block_s, cfg.block_dv))

    candidates = launch_candidates(cfg, q.dtype == torch.float32)
    key = ("decode", q.dtype, g, lq, d, dv, page, triton.next_power_of_2(b * hkv),
           triton.next_power_of_2(max(capacity, 1)))
    full: list[tuple[torch.Tensor, torch.Tensor]] = []

    def run_full(candidate: tuple[DecodeConfig, int]) -> None:
        """Timing reads the whole capacity, so that the choice (kept for this key, typically made
        on the first decode step, when the cache holds about the prompt) still holds as the cache
        fills; the chosen candidate then runs on the real lengths."""
        if not full:
            full.append(_full_cache_view(cache_seqlens, block_table, k_cache.shape[0], capacity))
        run(candidate, *full[0])

    run(autotune.pick(key, candidates, run_full, q.device))
    return out


def _full_cache_view(cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor], pool_blocks: int,
                     capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seqlens, table) of every sequence filled to ``capacity``: for a paged cache, a table of
    distinct pool blocks in turn (the real table may hold unallocated entries past each length)."""
    if block_table is not None and pool_blocks == 0:  # an empty pool: every length is 0
        return cache_seqlens, block_table
    seqlens = torch.full_like(cache_seqlens, capacity)
    if block_table is None:
        return seqlens, seqlens
    table = torch.arange(block_table.numel(), device=block_table.device, dtype=torch.int64) % max(pool_blocks, 1)
    return seqlens, table.to(block_table.dtype).view(block_table.shape)
