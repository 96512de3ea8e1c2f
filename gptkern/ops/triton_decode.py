"""The Triton decode-attention kernel as a custom op (fake registration for torch.compile)."""
from __future__ import annotations

from typing import Optional

import torch

from gptkern.ops._checks import device_guard


@torch.library.custom_op("gptkern::triton_decode_attention", mutates_args=())
def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, scale: float,
                            block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """q (B, H, Lq, D); caches (B, Hkv, S_max, D) or paged (num_blocks, Hkv, block_size, D) with
    block_table (B, max_blocks) int32; cache_seqlens (B,) int32. Returns (B, H, Lq, Dv)."""
    from gptkern.kernels.decode import decode_fwd

    with device_guard(q):
        return decode_fwd(q, k_cache, v_cache, cache_seqlens, scale, block_table)


@triton_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, block_table):
    return q.new_empty((*q.shape[:3], v_cache.shape[-1]))
