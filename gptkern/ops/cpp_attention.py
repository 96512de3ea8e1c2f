"""The attention ops of gptkern._C: their fake and autograd registrations and what the CUDA
kernels take.

``gptkern::attention_fwd(q, k, v, mask, causal, scale) -> (out, lse)``: flash attention forward,
q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); out (B, H, L, Dv), lse (B, H, L) fp32 in the
log2 domain, as the Triton op ``gptkern::triton_attention``. Its backward is the Triton kernels'
(they read that LSE); where Triton cannot run, or for double backward, a recomputation through
``F.scaled_dot_product_attention``. The CUDA kernels have no backward of their own.

``gptkern::decode_attention(q, k_cache, v_cache, cache_seqlens, scale, block_table) -> out``:
attention of a few new queries (B, H, Lq, D) over a static (B, Hkv, S_max, D) or paged
(num_blocks, Hkv, block_size, D) KV cache; no autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from gptkern import _backend

# What the CUDA kernels of attention_fwd and decode_attention take.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)


def cuda_attention_limits(q: torch.Tensor, v: torch.Tensor, masked: bool, dropout_p: float) -> Optional[str]:
    """Why the CUDA attention kernels cannot take these inputs, or None."""
    if q.dtype not in CUDA_DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16)"
    if q.shape[-1] != v.shape[-1] or q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"head dims {q.shape[-1]} (query, key) and {v.shape[-1]} (value) (supported: 64 or 128, equal)"
    if masked:
        return "an attn_mask (is_causal is supported)"
    if dropout_p > 0:
        return "dropout"
    return None


def _fake_attention(q, k, v, mask, causal, scale):
    b, h, l, _ = q.shape
    return q.new_empty((b, h, l, v.shape[-1])), q.new_empty((b, h, l), dtype=torch.float32)


def _fake_decode(q, k_cache, v_cache, cache_seqlens, scale, block_table):
    return q.new_empty((*q.shape[:3], v_cache.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.causal, ctx.scale = causal, scale


def _recomputed_grads(grad_out, q, k, v, mask, causal, scale, create_graph):
    """dq, dk, dv through torch's SDPA (where Triton cannot run, and for double backward)."""
    with torch.enable_grad():
        leaves = [t if create_graph else t.detach().requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return torch.autograd.grad(out, leaves, grad_out, create_graph=create_graph)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if q.is_cuda and _backend._has_triton() and not torch.is_grad_enabled():
        dq, dk, dv = torch.ops.gptkern.triton_attention_backward(grad_out, q, k, v, out, lse, mask, ctx.causal,
                                                                 ctx.scale, 0.0, None)
    else:
        dq, dk, dv = _recomputed_grads(grad_out, q, k, v, mask, ctx.causal, ctx.scale, torch.is_grad_enabled())
    return dq, dk, dv, None, None, None


def register_ops() -> None:
    """Fake and autograd registrations of gptkern::attention_fwd and gptkern::decode_attention."""
    torch.library.register_fake("gptkern::attention_fwd")(_fake_attention)
    torch.library.register_autograd("gptkern::attention_fwd", _backward, setup_context=_setup_context)
    torch.library.register_fake("gptkern::decode_attention")(_fake_decode)
