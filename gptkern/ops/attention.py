"""scaled_dot_product_attention: the functional API, its Triton custom ops and autograd."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from gptkern import _backend
from gptkern.ops._checks import check_tensor, device_guard

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@torch.library.custom_op("gptkern::triton_attention", mutates_args=())
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), mask None or (B, H, L, S) (a
    broadcast view). Returns out (B, H, L, Dv) and the log2-domain LSE (B, H, L) fp32."""
    from gptkern.kernels.attention import attn_fwd

    b, h, l, _ = q.shape
    out = torch.empty((b, h, l, v.shape[-1]), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, l), device=q.device, dtype=torch.float32)
    with device_guard(q):
        attn_fwd(q, k, v, mask, causal, scale, out, lse)
    return out, lse


@triton_attention.register_fake
def _(q, k, v, mask, causal, scale):
    b, h, l, _ = q.shape
    return q.new_empty((b, h, l, v.shape[-1])), q.new_empty((b, h, l), dtype=torch.float32)


@torch.library.custom_op("gptkern::triton_attention_backward", mutates_args=())
def triton_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                              causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkern.kernels.attention import attn_bwd

    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    with device_guard(q):
        attn_bwd(grad_out, q, k, v, out, lse, mask, causal, scale, dq, dk, dv)
    return dq, dk, dv


@triton_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, causal, scale):
    return tuple(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.gptkern.triton_attention_backward(
        grad_out, q, k, v, out, lse, mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


triton_attention.register_autograd(_backward, setup_context=_setup_context)


def _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name)
        if t.dim() < 2:
            raise RuntimeError(f"scaled_dot_product_attention: {name} must have at least 2 dimensions "
                               f"(..., seq, dim), got shape {list(t.shape)}")
    if not query.is_floating_point():
        raise RuntimeError(f"scaled_dot_product_attention: query must be a floating-point tensor, "
                           f"got {query.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    for name, t in (("key", key), ("value", value), ("attn_mask", attn_mask)):
        if t is not None and t.device != query.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                               f"devices, {query.device} (query) and {t.device} ({name})")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"scaled_dot_product_attention: query and key must have the same head dim, "
                           f"got query {list(query.shape)} and key {list(key.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"scaled_dot_product_attention: key and value must have the same sequence "
                           f"length, got key {list(key.shape)} and value {list(value.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise RuntimeError(f"dropout probability has to be in [0, 1), but got dropout_p={dropout_p}")
    if attn_mask is not None:
        check_tensor(attn_mask, "attn_mask")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise RuntimeError(f"Expected attn_mask dtype to be bool or to match query dtype, but got "
                               f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3:
        hq, hk = query.shape[-3], key.shape[-3]
        if hk == 0 or hq % hk or value.shape[-3] != hk:
            raise RuntimeError(f"Number of heads in key and value must divide the number of heads in "
                               f"query: query has {hq}, key {hk}, value {value.shape[-3]} (enable_gqa=True)")


def _broadcast(what: str, *shapes) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as err:
        raise RuntimeError(f"scaled_dot_product_attention: the {what} of query, key and value "
                           f"({', '.join(str(list(s)) for s in shapes)}) do not broadcast: {err}") from None


def _sdpa_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                 enable_gqa: bool):
    """(batch dims, query heads, key heads, output shape), checking that everything broadcasts."""
    l, s, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    if enable_gqa and q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        hq, hk = q.shape[-3], k.shape[-3]
        batch = _broadcast("batch dims", q.shape[:-3], k.shape[:-3], v.shape[:-3])
        out_shape = (*batch, hq, l, dv)
    else:
        lead = _broadcast("batch and head dims (pass enable_gqa=True for fewer key heads)",
                          q.shape[:-2], k.shape[:-2], v.shape[:-2])
        batch, hq = (lead[:-1], lead[-1]) if lead else ((), 1)
        hk = hq
        out_shape = (*lead, l, dv)
    if mask is not None:
        target = (*batch, hq, l, s)
        try:
            ok = torch.broadcast_shapes(mask.shape, target) == torch.Size(target)
        except RuntimeError:
            ok = False
        if not ok:
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape {list(mask.shape)} does "
                               f"not broadcast to {list(target)}")
    return tuple(batch), hq, hk, out_shape


def _as_4d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           batch: tuple, hq: int, hk: int):
    """View q, k, v (and the mask) as (B, H, seq, dim) with the batch dims broadcast.

    Broadcasting uses stride-0 views; only more than one batch dim (flattened into B) can
    make a copy.
    """
    nb = math.prod(batch)

    def four_d(t: torch.Tensor, heads: int) -> torch.Tensor:
        seq, dim = t.shape[-2:]
        return t.expand(*batch, heads, seq, dim).reshape(nb, heads, seq, dim)

    m4 = None
    if mask is not None:
        l, s = q.shape[-2], k.shape[-2]
        m4 = mask.expand(*batch, hq, l, s).reshape(nb, hq, l, s)
    return four_d(q, hq), four_d(k, hk), four_d(v, hk), m4


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``: softmax(q kᵀ · scale + mask) v, in O(L) memory.

    Args:
        query: (..., Hq, L, E); key: (..., H, S, E); value: (..., H, S, Ev).
        attn_mask: bool (True = attend) or additive float mask broadcastable to (..., Hq, L, S).
        dropout_p: dropout on the attention weights (served by the torch backend for now).
        is_causal: PyTorch's top-left-aligned causal mask (query i sees keys j <= i).
        scale: defaults to 1 / sqrt(E).
        enable_gqa: allow Hq to be a multiple of H (grouped-query attention).
    Returns:
        (..., Hq, L, Ev), in query's dtype.
    """
    _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    batch, hq, hk, out_shape = _sdpa_shapes(query, key, value, attn_mask, enable_gqa)
    scale_value = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

    def triton_support():
        if query.dtype not in TRITON_DTYPES:
            return f"dtype {query.dtype} (supported: float16, bfloat16, float32)"
        if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
            return f"head dims above {MAX_HEAD_DIM}"
        if dropout_p > 0.0:
            return "dropout_p > 0"
        if attn_mask is not None and is_causal:
            return "attn_mask together with is_causal"
        if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
            return "a gradient for attn_mask"
        return None

    name = _backend.choose("scaled_dot_product_attention", query.device,
                           {"triton": triton_support, "torch": lambda: None})
    if name == "triton":
        q4, k4, v4, m4 = _as_4d(query, key, value, attn_mask, batch, hq, hk)
        out, _ = torch.ops.gptkern.triton_attention(q4, k4, v4, m4, bool(is_causal), scale_value)
        return out.reshape(out_shape)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
