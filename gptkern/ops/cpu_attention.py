"""Fake and autograd registrations of the C++ attention ops of gptkern._C.

The schemas live in csrc/ops.cpp and the CPU kernels in csrc/cpu/attention.cpp and decode.cpp:
``attention_fwd`` / ``attention_bwd`` (dense), ``attention_varlen_fwd`` / ``attention_varlen_bwd``
(packed sequences) and ``decode_attention`` (inference only: no autograd). The registrations
here depend on no device, so a CUDA implementation of the same schemas shares them.
"""
from __future__ import annotations

import torch

from gptkern.ops import _autograd
from gptkern.ops import attention_double_backward as double_backward


def _fake_fwd(q, k, v, mask, causal, scale, dropout_p=0.0, seed=None):
    b, h, l, _ = q.shape  # q (B, H, L, D), v (B, Hkv, S, Dv)
    return q.new_empty((b, h, l, v.shape[-1])), q.new_empty((b, h, l), dtype=torch.float32)


def _fake_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                     window_left, window_right, dropout_p=0.0, seed=None):
    total, h, _ = q.shape  # q (total_q, H, D), v (total_k, Hkv, Dv)
    return q.new_empty((total, h, v.shape[-1])), q.new_empty((h, total), dtype=torch.float32)


def _like_qkv(q, k, v):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _fake_bwd(grad_out, q, k, v, out, lse, mask, causal, scale, mask_grad=False, dropout_p=0.0, seed=None):
    b, h, l, _ = q.shape
    dmask = q.new_empty((b, h, l, k.shape[2]), dtype=mask.dtype) if mask_grad else q.new_empty((0,))
    return (*_like_qkv(q, k, v), dmask)


def _fake_decode(q, k_cache, v_cache, cache_seqlens, scale, block_table):
    b, h, lq, _ = q.shape  # q (B, H, Lq, D), v_cache (., Hkv, ., Dv)
    return q.new_empty((b, h, lq, v_cache.shape[-1]))


def _dropout_args(rest) -> tuple:
    """(dropout_p, seed) from the trailing optional arguments of a forward op."""
    return (rest[0] if len(rest) > 0 else 0.0), (rest[1] if len(rest) > 1 else None)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, *drop = inputs  # drop: dropout_p, seed (when given)
    dropout_p, seed = _dropout_args(drop)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.n_inputs = causal, scale, dropout_p, len(inputs)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])  # a float mask that requires grad
    if torch.is_grad_enabled():
        dq, dk, dv, dmask = double_backward.dense_grads(ctx, grad_out, q, k, v, mask, seed)
    else:
        dq, dk, dv, dmask = torch.ops.gptkern.attention_bwd(grad_out, q, k, v, out, lse, mask, ctx.causal,
                                                            ctx.scale, mask_grad, ctx.dropout_p, seed)
    return (dq, dk, dv, dmask if mask_grad else None) + (None,) * (ctx.n_inputs - 4)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args = inputs
    dropout_p, seed = _dropout_args(args[6:])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.args = (*args[:6], dropout_p)  # max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, p
    ctx.n_inputs = len(inputs)


def _varlen_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    if torch.is_grad_enabled():
        dq, dk, dv = double_backward.varlen_grads(ctx, grad_out, q, k, v, cu_q, cu_k, seed)
    else:
        dq, dk, dv = torch.ops.gptkern.attention_varlen_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args,
                                                            seed)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


def register_cpu_ops() -> None:
    """Register the fakes (torch.compile, meta tensors) and the autograd formulas."""
    torch.library.register_fake("gptkern::attention_fwd")(_fake_fwd)
    torch.library.register_fake("gptkern::attention_bwd")(_fake_bwd)
    torch.library.register_fake("gptkern::attention_varlen_fwd")(_fake_varlen_fwd)
    torch.library.register_fake("gptkern::attention_varlen_bwd")(
        lambda grad_out, q, k, v, out, lse, *args: _like_qkv(q, k, v))
    torch.library.register_fake("gptkern::decode_attention")(_fake_decode)
    torch.library.register_fake("gptkern::attention_dropout_factors")(
        lambda seed, dropout_p, batch_heads, rows, cols, first_batch_head=0: torch.empty((batch_heads, rows, cols)))
    _autograd.register("gptkern::attention_fwd", _backward, _setup_context)
    _autograd.register("gptkern::attention_varlen_fwd", _varlen_backward, _varlen_setup_context)
