"""decode_attention: a few new queries per sequence against a static or paged KV cache."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from gptkern import _backend
from gptkern.ops import _autocast, _autograd, _checks, _fx, cuda_attention
from gptkern.ops._checks import check_float_arg, check_tensor, triton_dtype_support


def _check(q, k_cache, v_cache, cache_seqlens, scale, block_table) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        check_tensor(t, name)
        if t.device != q.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{q.device} (q) and {t.device} ({name})")
    if block_table is not None:
        check_tensor(block_table, "block_table")
        if block_table.device != q.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{q.device} (q) and {block_table.device} (block_table)")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise RuntimeError(f"decode_attention: {name} must have 4 dims, got shape {list(t.shape)}")
    if not q.is_floating_point() or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise RuntimeError(f"decode_attention: q, k_cache and v_cache must share one floating-point dtype, got "
                           f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    batch, heads, _, dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[-1] != dim:
        raise RuntimeError(f"decode_attention: k_cache must have q's head dim {dim}, got shape "
                           f"{list(k_cache.shape)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise RuntimeError(f"decode_attention: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} "
                           f"must match in every dim but the last")
    if kv_heads == 0 or heads % kv_heads:
        raise RuntimeError(f"decode_attention: the {heads} heads of q must be a multiple of the {kv_heads} heads "
                           f"of k_cache")
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != batch or cache_seqlens.dtype not in (torch.int32,
                                                                                                   torch.int64):
        raise RuntimeError(f"decode_attention: cache_seqlens must be a (B,) = ({batch},) int32 tensor, got "
                           f"{cache_seqlens.dtype} {list(cache_seqlens.shape)}")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise RuntimeError(f"decode_attention: k_cache must have q's batch size {batch}, got shape "
                               f"{list(k_cache.shape)} (a paged cache needs block_table)")
    elif block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype not in (torch.int32,
                                                                                              torch.int64):
        raise RuntimeError(f"decode_attention: block_table must be a (B, max_blocks) int32 tensor with B = {batch}, "
                           f"got {block_table.dtype} {list(block_table.shape)}")
    elif k_cache.shape[2] == 0:
        raise RuntimeError(f"decode_attention: a paged k_cache needs blocks of at least one token, got shape "
                           f"{list(k_cache.shape)}")
    if scale is not None:
        check_float_arg(scale, "scale", "decode_attention")
    if not _checks.checks_read_values(q):
        return  # the value checks below read the tensors: no host sync per token on a GPU
    block_size = k_cache.shape[2]
    capacity = block_size * (block_table.shape[1] if block_table is not None else 1)
    lengths = cache_seqlens.tolist()
    for b, n in enumerate(lengths):
        if not 0 <= n <= capacity:
            raise RuntimeError(f"decode_attention: cache_seqlens[{b}] = {n} is outside [0, {capacity}], the "
                               f"cache's capacity")
    if block_table is not None:
        for b, n in enumerate(lengths):
            used = block_table[b, : -(-n // block_size)]
            if used.numel() and (used.min() < 0 or used.max() >= k_cache.shape[0]):
                raise IndexError(f"decode_attention: block_table[{b}] = {used.tolist()} refers to blocks outside "
                                 f"[0, {k_cache.shape[0]}) of k_cache")


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_seqlens: torch.Tensor, scale: float,
                           block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pure-PyTorch composition (the ``torch`` backend): gather the cache, mask, SDPA."""
    batch, _, lq, _ = q.shape
    if block_table is not None and k_cache.shape[0] == 0:  # an empty pool: every sequence is empty
        return q.new_zeros((*q.shape[:-1], v_cache.shape[-1]))
    if block_table is not None:  # (num_blocks, Hkv, bs, D) -> (B, Hkv, max_blocks * bs, D)
        blocks = block_table.long().clamp(0, k_cache.shape[0] - 1)  # unused entries may hold anything

        def gather(cache):
            g = cache[blocks]  # (B, max_blocks, Hkv, bs, D)
            return g.transpose(1, 2).reshape(batch, cache.shape[1], -1, cache.shape[-1])

        k_cache, v_cache = gather(k_cache), gather(v_cache)
    positions = torch.arange(k_cache.shape[2], device=q.device)
    # slots past a sequence's length may hold anything (NaN too): a 0 weight would not hide it
    unused = (positions >= cache_seqlens.long()[:, None])[:, None, :, None]  # (B, 1, S, 1)
    k_cache, v_cache = k_cache.masked_fill(unused, 0.0), v_cache.masked_fill(unused, 0.0)
    # query i sits at position seqlen - Lq + i and sees keys up to it
    last = cache_seqlens.long()[:, None] - lq + torch.arange(lq, device=q.device)  # (B, Lq)
    visible = positions <= last[:, :, None]  # (B, Lq, S)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible[:, None], scale=scale,
                                         enable_gqa=q.shape[1] != k_cache.shape[1])
    return out.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)  # rows that see nothing: 0


def _rows_per_kv_head(q, k_cache) -> int:
    return q.shape[1] // max(k_cache.shape[1], 1) * q.shape[2]  # the GQA group x Lq


def _cuda_grid_limits(q, k_cache) -> Optional[str]:
    """Sizes the CUDA decode kernel's grid cannot take (its third axis: blocks of 32 rows per KV
    head; the combine's first: one block per row), or None."""
    rows, total = _rows_per_kv_head(q, k_cache), q.shape[0] * q.shape[1] * q.shape[2]
    if rows > 65535 * 32 or total >= 2**31:
        return f"{rows} query rows per key/value head, {total} in all (at most 2097120 and 2**31 - 1)"
    return None


def _cuda_cache_layout(k_cache, v_cache) -> Optional[str]:
    """Why the CUDA decode kernel cannot read a cache in place, or None. Its 16-byte row copies
    need a unit last stride, 16-byte aligned data and other strides multiples of 8 (2-byte)
    elements (csrc/cuda/register.cpp's rows_16b); it copies any other cache whole at every call,
    so under ``auto`` such a cache goes to the next backend. (The data's alignment is read from
    the storage offset, which torch.compile traces: torch's allocations start 16-byte aligned.)"""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        offset = t.storage_offset() * t.element_size() % 16
        if not (t.stride(-1) == 1 and offset == 0
                and all(t.stride(i) % 8 == 0 or t.shape[i] == 1 for i in range(t.dim() - 1))):
            return (f"{name} of strides {tuple(t.stride())} starting {offset} bytes past 16-byte alignment: "
                    f"not 16-byte aligned rows (it would be copied whole at every call)")
    return None


MAX_TRITON_CAPACITY = 2**31 - 1 - 64 * 128  # the CUDA kernel needs less (64 x 32: csrc/cuda/register.cpp)


def _capacity_limit(k_cache, block_table) -> Optional[str]:
    """A cache too long for the kernels' 32-bit key positions, or None."""
    capacity = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    if capacity > MAX_TRITON_CAPACITY:  # the key loop's int32 position steps past the end by up to 64 splits
        # x 128 keys (the widest autotuning candidate)
        return f"a cache of {capacity} keys per sequence (at most {MAX_TRITON_CAPACITY})"
    return None


def _triton_grid_limits(q, k_cache, v_cache, block_table) -> Optional[str]:
    """Sizes the Triton decode kernels' launch grid or 32-bit offsets cannot take, or None."""
    def span(t, dims) -> int:  # elements from a view's first to its last, over these dims
        return 1 + sum((t.shape[d] - 1) * t.stride(d) for d in dims) if all(t.shape[d] for d in dims) else 0

    rows = _rows_per_kv_head(q, k_cache)
    if rows > 65535 and q.device.type == "cuda":  # the combine's grid: a row per block on its second axis
        return f"{rows} query rows per key/value head (at most 65535)"
    if block_table is None:  # keys are offset within one head's cache in 32 bits
        keys = max(span(k_cache, (2, 3)), span(v_cache, (2, 3)))
        if keys >= 2**31:
            return f"a static cache whose keys of one head span {keys} elements (at most 2**31 - 1)"
    if why := _capacity_limit(k_cache, block_table):
        return why
    queries = max(span(q, range(4)), q.shape[0] * q.shape[1] * q.shape[2] * v_cache.shape[3])  # q, the output
    if queries >= 2**31:
        return f"queries or outputs of {queries} elements (32-bit offsets: at most 2**31 - 1)"
    return None


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with stride 1 in its last dim, as the C++ kernels need: a view when that dim has one
    element (whose stride torch ignores: a "contiguous" tensor may have any), else a copy if needed."""
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t[..., 0].unsqueeze(-1)  # the same elements, last stride 1 (traceable: no storage offset)
    return t.contiguous()


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     scale: Optional[float] = None, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the newest queries of each sequence over its KV cache.

    Args:
        q: (B, H, Lq, D), the Lq newest tokens of each sequence (Lq small: 1 for plain decoding).
        k_cache, v_cache: (B, Hkv, S_max, D) and (B, Hkv, S_max, Dv), or, with ``block_table``,
            paged: (num_blocks, Hkv, block_size, D / Dv). H must be a multiple of Hkv (GQA).
        cache_seqlens: (B,) int32, the valid tokens in each sequence's cache, the Lq new ones
            included. Query i sits at position cache_seqlens[b] - Lq + i and sees the keys up to
            it (causal). A query that sees no key (cache_seqlens 0) gives zeros.
        scale: defaults to 1 / sqrt(D).
        block_table: (B, max_blocks) int32: block i of sequence b is k_cache[block_table[b, i]].
    Returns:
        (B, H, Lq, Dv), in q's dtype (under autocast, the autocast dtype, as torch's SDPA).
    """
    proxy = _fx.proxy_in(q, k_cache, v_cache, cache_seqlens, block_table)
    if proxy is not None:  # torch.fx.symbolic_trace
        return _fx.record(decode_attention, proxy, q, k_cache, v_cache, cache_seqlens, scale, block_table)
    if isinstance(q, torch.Tensor):  # else _check names the argument
        q, k_cache, v_cache = _autocast.lower_precision(q, k_cache, v_cache)
    _check(q, k_cache, v_cache, cache_seqlens, scale, block_table)
    scale_value = _checks.attention_scale(scale, q.shape[-1])

    def cpu_support():
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
            return "gradients (the decode kernel has no backward)"
        return triton_dtype_support(q.dtype)

    def triton_support():
        return cpu_support() or _triton_grid_limits(q, k_cache, v_cache, block_table)

    def cuda_support():  # the CUDA decode kernel: fp16 / bf16, head dims 64 and 128
        return (cpu_support() or cuda_attention.cuda_attention_limits(q, v_cache)
                or _cuda_grid_limits(q, k_cache) or _capacity_limit(k_cache, block_table))

    name = _backend.choose("decode_attention", q.device,
                           {"triton": triton_support, "cpu": cpu_support, "cuda": cuda_support, "torch": lambda: None},
                           {"cuda": lambda: _cuda_cache_layout(k_cache, v_cache)}, inputs=(q, k_cache, v_cache))
    if name == "triton":
        from gptkern.ops.triton_decode import triton_decode_attention

        table = _checks.as_int32(block_table) if block_table is not None else None
        return triton_decode_attention(q, k_cache, v_cache, _checks.as_int32(cache_seqlens), scale_value, table)
    if name in ("cpu", "cuda"):
        k_c, v_c = (_unit_stride_last(t) for t in (k_cache, v_cache))
        table = _checks.as_int32(block_table) if block_table is not None else None
        return _autograd.call(torch.ops.gptkern.decode_attention, q, k_c, v_c, _checks.as_int32(cache_seqlens),
                              scale_value, table)
    return decode_attention_torch(q, k_cache, v_cache, cache_seqlens, scale_value, block_table)
