"""Attention gradients as a differentiable graph: double backward (``create_graph=True``).

The kernels' backward ops (C++, CUDA and Triton) have no derivative of their own. When an
attention op's backward runs with grad mode on, its autograd formula computes the gradients here
instead: through the explicit composition of ``reference.attention_ref``, with the kernels' own
dropout factors, so that a second backward goes through torch's ops. This path stores the L x S
weights, as torch's math SDPA does (torch's flash and CPU SDPA have no double backward).
"""
from __future__ import annotations

from typing import Optional

import torch

from gptkern import _backend
from gptkern.ops._checks import device_guard, kernel_seed
from gptkern.ops.reference import attention_ref


def dropout_factors(seed: Optional[torch.Tensor], dropout_p: float, batch_heads: int, rows: int, cols: int,
                    device: torch.device, first_batch_head: int = 0) -> Optional[torch.Tensor]:
    """The kernels' dropout factors (batch_heads, rows, cols) of batch-heads first_batch_head on,
    on ``device`` (one Philox stream for every backend), or None without dropout."""
    if dropout_p == 0:
        return None
    if device.type == "cpu" and _backend._extension() is not None:
        return torch.ops.gptkern.attention_dropout_factors(seed, dropout_p, batch_heads, rows, cols, first_batch_head)
    from gptkern.kernels.attention import dropout_factors as triton_factors

    with device_guard(device):  # Triton launches on the current device
        return triton_factors(kernel_seed(seed, dropout_p, device, "attention (double backward)"), dropout_p,
                              batch_heads, rows, cols, device, first_batch_head)


def dense_grads(ctx, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor], seed: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Differentiable gradients of q (B, H, L, D), k, v (B, Hkv, S, .) and the mask, for a dense
    op's context (causal, scale, dropout_p); None for the inputs that need none."""
    needs, causal, scale, dropout_p = ctx.needs_input_grad[:4], ctx.causal, ctx.scale, ctx.dropout_p
    wanted = [t for t, need in zip((q, k, v, mask), needs) if need]
    b, h, l, _ = q.shape
    z = dropout_factors(seed, dropout_p, b * h, l, k.shape[2], q.device)
    with torch.enable_grad():
        out = attention_ref(q, k, v, mask=mask, causal=causal, scale=scale, upcast=False,
                            dropout_factors=None if z is None else z.view(b, h, l, k.shape[2]))
    found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return [next(found) if need else None for need in needs]


def varlen_grads(ctx, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cu_q: torch.Tensor, cu_k: torch.Tensor, seed: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Differentiable gradients of packed q (total_q, H, D), k, v (total_k, Hkv, .) for a varlen
    op's context (args: max_q, max_k, causal, scale, window left, right, dropout_p), one sequence
    at a time with the varlen visibility (bottom-right causal, windows); None where not needed."""
    from gptkern.ops.attention import varlen_visibility

    causal, scale, left, right, dropout_p = ctx.args[2:]
    needs = ctx.needs_input_grad[:3]
    wanted = [t for t, need in zip((q, k, v), needs) if need]
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    heads = q.shape[1]
    with torch.enable_grad():
        outs = []
        for b, (q0, q1, k0, k1) in enumerate(zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])):
            seq = [t[a:e].transpose(0, 1)[None] for t, a, e in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
            visible = varlen_visibility(q1 - q0, k1 - k0, causal, (left, right), q.device)  # (Lq, Lk) or None
            zb = dropout_factors(seed, dropout_p, heads, q1 - q0, k1 - k0, q.device, b * heads)  # (H, Lq, Lk)
            outs.append(attention_ref(*seq, mask=visible, scale=scale, upcast=False,
                                      dropout_factors=None if zb is None else zb[None])[0].transpose(0, 1))
    if not outs:  # no sequences: nothing to differentiate
        return [torch.zeros_like(t) if need else None for t, need in zip((q, k, v), needs)]
    with torch.enable_grad():
        out = torch.cat(outs)
    found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    grads = [next(found) if need else None for need in needs]
    return [torch.zeros_like(t) if need and g is None else g for t, need, g in zip((q, k, v), needs, grads)]
