"""Plain PyTorch compositions of each op, written out step by step.

They are the yardstick of the tests: with ``upcast=True`` they compute in float64
and return float64, independent of torch's own fused kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from gptkern.ops.norms import default_rms_eps


def _prepare(x: torch.Tensor, upcast: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if dtype is not None:
        x = x.to(dtype)
    return x.double() if upcast else x.float()


def softmax_ref(x: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None,
                upcast: bool = True, log: bool = False) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)) along ``dim`` (or its log)."""
    out_dtype = dtype if dtype is not None else x.dtype
    x = _prepare(x, upcast, dtype)
    if x.dim() == 0:
        x = x.reshape(1)
        squeeze = True
    else:
        squeeze = False
    z = x - x.amax(dim, keepdim=True)
    s = z.exp().sum(dim, keepdim=True)
    y = z - s.log() if log else z.exp() / s
    y = y.reshape(()) if squeeze else y
    return y if upcast else y.to(out_dtype)


def layer_norm_ref(x: torch.Tensor, normalized_shape: Sequence[int],
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5, upcast: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) * weight + bias over the trailing dims."""
    dims = tuple(range(-len(normalized_shape), 0))
    xf = _prepare(x, upcast)
    mean = xf.mean(dims, keepdim=True)
    var = ((xf - mean) ** 2).mean(dims, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _prepare(weight, upcast)
    if bias is not None:
        y = y + _prepare(bias, upcast)
    return y if upcast else y.to(x.dtype)


def rms_norm_ref(x: torch.Tensor, normalized_shape: Sequence[int],
                 weight: Optional[torch.Tensor] = None, eps: Optional[float] = None,
                 upcast: bool = True) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight over the trailing dims; eps=None: the machine
    epsilon of the compute type (fp32 for fp16/bf16), as F.rms_norm."""
    if eps is None:
        eps = default_rms_eps(x.dtype)
    dims = tuple(range(-len(normalized_shape), 0))
    xf = _prepare(x, upcast)
    y = xf / torch.sqrt((xf * xf).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * _prepare(weight, upcast)
    return y if upcast else y.to(x.dtype)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  causal: bool = False, scale: Optional[float] = None, upcast: bool = True,
                  dropout_factors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v for q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); with
    ``dropout_factors`` Z (broadcast to (B, H, L, S)), (softmax(...) * Z) v.

    Query head h uses KV head h // (H / Hkv); ``mask`` is bool (True = attend) or additive and
    broadcasts to (B, H, L, S); ``causal`` is top-left aligned (key j visible to query i iff
    j <= i). A row that sees no key gives 0, as torch's SDPA.
    """
    out_dtype = q.dtype
    q, k, v = (_prepare(t, upcast) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, L, S)
    visible = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device)
    if causal:
        visible = visible.tril()
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        s = s + _prepare(mask, upcast)
    s = s.masked_fill(~visible, float("-inf"))
    seen = (s > float("-inf")).any(-1, keepdim=True)  # rows of -inf only give 0 (and zero gradients)
    p = torch.softmax(s.masked_fill(~seen, 0.0), -1).masked_fill(~seen, 0.0)
    if dropout_factors is not None:
        p = p * _prepare(dropout_factors, upcast)
    out = p @ v
    return out if upcast else out.to(out_dtype)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, scale: Optional[float] = None,
                         block_table: Optional[torch.Tensor] = None, upcast: bool = True) -> torch.Tensor:
    """One sequence at a time: query i of the Lq new ones sees cache keys j <= seqlen - Lq + i."""
    outs = []
    lq = q.shape[2]
    for b, n in enumerate(cache_seqlens.tolist()):
        if block_table is None:
            k, v = k_cache[b, :, :n], v_cache[b, :, :n]  # (Hkv, n, D)
        else:
            bs = k_cache.shape[2]
            ids = block_table[b, : -(-n // bs)].long()
            k = k_cache[ids].transpose(0, 1).reshape(k_cache.shape[1], -1, k_cache.shape[-1])[:, :n]
            v = v_cache[ids].transpose(0, 1).reshape(v_cache.shape[1], -1, v_cache.shape[-1])[:, :n]
        if n == 0:  # nothing to attend: zeros
            outs.append(torch.zeros(q.shape[1], lq, v_cache.shape[-1], dtype=torch.float64 if upcast else q.dtype,
                                    device=q.device))
            continue
        visible = torch.arange(n, device=q.device) <= (n - lq + torch.arange(lq, device=q.device))[:, None]
        outs.append(attention_ref(q[b:b + 1], k[None], v[None], mask=visible, scale=scale, upcast=upcast)[0])
    return torch.stack(outs)
