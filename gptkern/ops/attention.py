"""scaled_dot_product_attention: the functional API, its Triton custom ops and autograd (the C++ ops
of gptkern._C: cpu_attention.py, cuda_attention.py)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from gptkern import _backend
from gptkern.ops import _autocast, _autograd, _checks, _fx, cuda_attention
from gptkern.ops import attention_double_backward as double_backward
from gptkern.ops._checks import (check_bool_arg, check_float_arg, check_tensor, device_guard, kernel_seed,
                                 triton_dtype_support)

MAX_HEAD_DIM = 256
# A CUDA grid's second axis holds at most 65535 blocks; the kernels' smallest block of rows is 16.
MAX_TRITON_ROWS = 65535 * 16


def draw_seed(dropout_p: float, device: torch.device) -> Optional[torch.Tensor]:
    """A (1,) int64 dropout seed in [0, 2**32) (the kernels key Philox with its low 32 bits) on the
    inputs' ``device`` (whatever the default device), from torch's generator for it (reproducible
    under torch.manual_seed); None without dropout. Drawn outside the custom op so that the op
    stays a pure function of its inputs. The kernels read it on the device: no host sync, and a
    step captured into a CUDA graph draws a new seed at each replay (torch's CUDA generator is
    graph-safe), so each replay drops other weights."""
    return torch.randint(0, 2**32, (1,), dtype=torch.int64, device=device) if dropout_p > 0 else None


@torch.library.custom_op("gptkern::triton_attention", mutates_args=())
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     causal: bool, scale: float, dropout_p: float, seed: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), mask None or (B, H, L, S) (a broadcast
    view), seed the (1,) int64 dropout seed (None without dropout). Returns out (B, H, L, Dv) and
    the log2-domain LSE (B, H, L) fp32."""
    from gptkern.kernels.attention import attn_fwd

    b, h, l, _ = q.shape
    out = torch.empty((b, h, l, v.shape[-1]), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, l), device=q.device, dtype=torch.float32)
    with device_guard(q):
        attn_fwd(q, k, v, mask, _dense_problem(q, k, v, causal, scale, dropout_p, seed), out, lse)
    return out, lse


def _dense_problem(q, k, v, causal, scale, dropout_p, seed):
    from gptkern.kernels.attention import Problem

    b, h, l, d = q.shape
    return Problem(batch=b, heads=h, kv_heads=k.shape[1], l=l, s=k.shape[2], d=d, dv=v.shape[-1],
                   causal=causal, scale=scale, dropout_p=dropout_p,
                   seed=kernel_seed(seed, dropout_p, q.device, "triton_attention"))


@triton_attention.register_fake
def _(q, k, v, mask, causal, scale, dropout_p, seed):
    b, h, l, _ = q.shape
    return q.new_empty((b, h, l, v.shape[-1])), q.new_empty((b, h, l), dtype=torch.float32)


@torch.library.custom_op("gptkern::triton_attention_backward", mutates_args=())
def triton_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                              causal: bool, scale: float, dropout_p: float, seed: Optional[torch.Tensor],
                              mask_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and, with ``mask_grad``, the (B, H, L, S) gradient of the float mask in its
    dtype (else an empty tensor)."""
    from gptkern.kernels.attention import attn_bwd

    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    dmask = _empty_mask_grad(q, k, mask, causal, mask_grad)
    problem = _dense_problem(q, k, v, causal, scale, dropout_p, seed)
    with device_guard(q):
        attn_bwd(_fit_tile_offsets(grad_out, -2), q, k, v, out, lse, mask, problem, dq, dk, dv,
                 dmask if mask_grad else None)
    return dq, dk, dv, dmask


def _empty_mask_grad(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                     mask_grad: bool) -> torch.Tensor:
    """The (B, H, L, S) dS buffer the dQ kernel fills: all of it without causal; with causal the
    tiles it skips (above the diagonal) stay zero."""
    if not mask_grad:
        return q.new_empty((0,))
    if mask is None or not mask.is_floating_point():
        raise RuntimeError("triton_attention_backward: mask_grad needs a float mask")
    b, h, l, _ = q.shape
    return (torch.zeros if causal else torch.empty)((b, h, l, k.shape[2]), device=q.device, dtype=mask.dtype)


@triton_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed, mask_grad=False):
    return (*(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v)),
            _empty_mask_grad(q, k, mask, causal, mask_grad))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])
    if torch.is_grad_enabled():  # create_graph=True
        dq, dk, dv, dmask = double_backward.dense_grads(ctx, grad_out, q, k, v, mask, seed)
    else:
        dq, dk, dv, dmask = _autograd.call(torch.ops.gptkern.triton_attention_backward, grad_out, q, k, v, out,
                                           lse, mask, ctx.causal, ctx.scale, ctx.dropout_p, seed, mask_grad)
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None


_autograd.register("gptkern::triton_attention", _backward, _setup_context)


def _tile_offsets_problem(tile_strides: Sequence[tuple[int, int]]) -> Optional[str]:
    """The Triton kernels address a tile in 32 bits from its first element: row index (below 128)
    times the row stride plus column index (below 256, the widest head block) times the column
    stride. None if every (row stride, column stride) pair keeps that below 2**31."""
    for row, col in tile_strides:
        if 127 * abs(row) + 255 * abs(col) >= 2**31:
            return (f"strides ({row}, {col}) (32-bit offsets inside a tile: 127 x the row stride + 255 x the "
                    f"column stride must stay below 2**31)")
    return None


def _fit_tile_offsets(t: torch.Tensor, row_dim: int) -> torch.Tensor:
    """``t`` (a gradient handed to a backward), or a contiguous copy where its strides overflow
    the kernels' tile offsets."""
    if _tile_offsets_problem([(t.stride(row_dim), t.stride(-1))]) is None:
        return t
    return t.contiguous()


def _triton_limits(q: torch.Tensor, v: torch.Tensor, masked: bool, dropout_p: float,
                   lengths: Optional[tuple[int, int]] = None, grad: bool = True,
                   tile_strides: Sequence[tuple[int, int]] = ()) -> Optional[str]:
    """Why the Triton attention kernels cannot take these inputs, or None. ``lengths``: the query
    and key rows of the launch grids (default: q's and v's second-to-last dims); the keys' only
    count with ``grad`` (the dK/dV kernel's grid; the forward loops over keys). ``tile_strides``:
    the (row, column) strides of q, k, v and the mask (see _tile_offsets_problem)."""
    why = triton_dtype_support(q.dtype)
    if why is None and max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        why = f"head dims above {MAX_HEAD_DIM}"
    if why is not None or q.device.type != "cuda":
        return why
    rows = lengths if lengths is not None else (q.shape[-2], v.shape[-2])
    longest = max(rows) if grad else rows[0]
    if longest > MAX_TRITON_ROWS:
        return f"sequences of {longest} rows (at most {MAX_TRITON_ROWS}: 65535 blocks of 16 in the launch grid)"
    why = _tile_offsets_problem(tile_strides)
    if why is not None:
        return why
    # Cases without a spill-free Hopper configuration (the interpreter takes all).
    from gptkern.kernels import attention

    weight = attention.DROPOUT if dropout_p > 0 else attention.MASKED if masked else attention.PLAIN
    return attention.unsupported(q.shape[-1], v.shape[-1], q.dtype == torch.float32, weight)


def _cpu_limits(q: torch.Tensor) -> Optional[str]:
    """Why the C++ CPU attention kernels cannot take these inputs, or None (they take dropout: the
    Triton kernels' Philox stream, so both backends drop the same weights for one seed)."""
    return triton_dtype_support(q.dtype)  # fp16, bf16, fp32 as the Triton kernels


def _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name)
        if t.dim() < 2:
            raise RuntimeError(f"scaled_dot_product_attention: {name} must have at least 2 dimensions "
                               f"(..., seq, dim), got shape {list(t.shape)}")
    if not query.is_floating_point() and not query.is_complex():  # complex: after the other checks, as torch
        raise RuntimeError(f"scaled_dot_product_attention: query must be a floating-point tensor, got {query.dtype}")
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
    if not 0.0 <= dropout_p < 1.0:  # the rule: torch's SDPA would return zeros for 1
        raise RuntimeError(f"dropout probability has to be in [0, 1), but got dropout_p={dropout_p}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
        # (S,): as torch, every query row; torch's fused 4-D paths read the mask's dim -2 (IndexError)
        if attn_mask.dim() == 0 or (attn_mask.dim() == 1 and query.dim() == 4):
            raise IndexError(f"scaled_dot_product_attention: attn_mask must have at least 2 dimensions "
                             f"(..., L, S), or be (S,) when the query is not 4-D, got shape {list(attn_mask.shape)}")
    if enable_gqa and min(query.dim(), key.dim(), value.dim()) < 3:  # (as torch, which reads dim -3)
        raise IndexError(f"scaled_dot_product_attention: enable_gqa=True needs a head dim (-3): query, key and "
                         f"value have {query.dim()}, {key.dim()} and {value.dim()} dims")
    if enable_gqa:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise RuntimeError(f"Number of heads in key and value must divide the number of heads in "
                               f"query: query has {hq}, key {hk}, value {value.shape[-3]} (enable_gqa=True)")
    if query.is_complex():  # torch gets this far, then its softmax has no complex kernel
        raise NotImplementedError(f"scaled_dot_product_attention: query must be a floating-point tensor, got "
                                  f"{query.dtype}")


def _broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes``; in eager code (sizes are ints) its rule in plain Python, which
    costs a tenth as much, and torch's own call for its error message."""
    if torch.compiler.is_compiling():  # symbolic sizes: torch's guards
        return torch.broadcast_shapes(*shapes)
    out = [1] * max(map(len, shapes), default=0)
    for shape in shapes:
        for i, n in enumerate(shape, len(out) - len(shape)):
            if n != 1:
                if out[i] != 1 and out[i] != n:
                    return torch.broadcast_shapes(*shapes)  # raises
                out[i] = n
    return torch.Size(out)


def _broadcast(what: str, *shapes) -> torch.Size:
    try:
        return _broadcast_shapes(*shapes)
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
        target = (*out_shape[:-2], l, s)  # (L, S) for 2-D inputs, which have no head dim
        try:
            ok = _broadcast_shapes(mask.shape, target) == torch.Size(target)
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
        if len(batch) == 1 and not torch.compiler.is_compiling() and t.shape == (nb, heads, seq, dim):
            return t  # already (B, H, seq, dim) (eager: no guards on the sizes)
        return t.expand(*batch, heads, seq, dim).reshape(nb, heads, seq, dim)

    m4 = None
    if mask is not None:
        l, s = q.shape[-2], k.shape[-2]
        m4 = mask.expand(*batch, hq, l, s).reshape(nb, hq, l, s)
    return four_d(q, hq), four_d(k, hk), four_d(v, hk), m4


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``: softmax(q kᵀ · scale + mask) v, in O(L) memory.

    Args:
        query: (..., Hq, L, E); key: (..., H, S, E); value: (..., H, S, Ev).
        attn_mask: bool (True = attend) or additive float mask broadcastable to (..., Hq, L, S).
        dropout_p: dropout on the attention weights, inside the kernel (Philox, seeded from torch's
            generator: reproducible under torch.manual_seed; the backward regenerates the mask).
            The random stream differs from torch's own, so outputs agree in distribution only.
        is_causal: PyTorch's top-left-aligned causal mask (query i sees keys j <= i); together with
            attn_mask both apply, as in torch's fused kernels (its math backend raises), and the
            kernels skip the tiles above the diagonal.
        scale: defaults to 1 / sqrt(E).
        enable_gqa: allow Hq to be a multiple of H (grouped-query attention).
    Returns:
        (..., Hq, L, Ev), in query's dtype.
    """
    proxy = _fx.proxy_in(query, key, value, attn_mask)
    if proxy is not None:  # torch.fx.symbolic_trace
        return _fx.record(scaled_dot_product_attention, proxy, query, key, value, attn_mask, dropout_p, is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name)
    if attn_mask is not None:
        check_tensor(attn_mask, "attn_mask")
    check_float_arg(dropout_p, "dropout_p", "scaled_dot_product_attention")
    check_bool_arg(is_causal, "is_causal", "scaled_dot_product_attention")
    if scale is not None:
        check_float_arg(scale, "scale", "scaled_dot_product_attention")
    check_bool_arg(enable_gqa, "enable_gqa", "scaled_dot_product_attention")
    query, key, value, attn_mask = _autocast.lower_precision(query, key, value, attn_mask)
    _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if attn_mask is not None and attn_mask.dim() == 1:  # (S,): every query row
        attn_mask = attn_mask[None]
    if enable_gqa and key.dim() >= 3 and value.dim() >= 3 and key.shape[-3] != value.shape[-3]:
        # torch repeats key and value heads separately; the kernels share one count: repeat both to Hq
        hq = query.shape[-3]
        key = key.repeat_interleave(hq // key.shape[-3], dim=-3)
        value = value.repeat_interleave(hq // value.shape[-3], dim=-3)
    batch, hq, hk, out_shape = _sdpa_shapes(query, key, value, attn_mask, enable_gqa)
    scale_value = _checks.attention_scale(scale, query.shape[-1])

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (query, key, value, attn_mask))

    def triton_support():
        return _triton_limits(query, value, attn_mask is not None, dropout_p, grad=needs_grad,
                              tile_strides=[t.stride()[-2:] for t in (query, key, value, attn_mask) if t is not None])

    def cpu_support():
        return _cpu_limits(query)

    def cuda_support():  # the CUDA forward; its backward is Triton's
        why = cuda_attention.cuda_attention_limits(query, value, attn_mask is not None, dropout_p)
        if why is None and query.shape[-2] > 65535 * 64:  # its grid: blocks of 64 query rows on the second axis
            why = f"query length {query.shape[-2]} (at most 4194240)"
        if why is None and needs_grad:
            why = (_triton_limits(query, value, False, 0.0,
                                  tile_strides=[t.stride()[-2:] for t in (query, key, value)]) if _backend._has_triton()
                   else "gradients without triton (the CUDA backward is Triton's)")
        return why

    name = _backend.choose("scaled_dot_product_attention", query.device,
                           {"triton": triton_support, "cpu": cpu_support, "cuda": cuda_support,
                            "torch": lambda: None}, inputs=(query, key, value, attn_mask))
    if hq == 0 or hk == 0:  # no heads, no work: torch's empty result (the kernels group heads by Hq / Hk)
        name = "torch"
    if name in ("triton", "cpu", "cuda"):
        q4, k4, v4, m4 = _as_4d(query, key, value, attn_mask, batch, hq, hk)
        if name in ("cpu", "cuda"):  # (B, H, L, Dv), with the LSE (cuda: m4 is None, no dropout)
            op = torch.ops.gptkern.attention_fwd
        else:
            op = torch.ops.gptkern.triton_attention
        out, _ = _autograd.call(op, q4, k4, v4, m4, bool(is_causal), scale_value, float(dropout_p),
                                draw_seed(dropout_p, q4.device))
        return out.reshape(out_shape)
    if attn_mask is not None and is_causal:  # both apply, whichever backend torch picks (its math one raises)
        attn_mask, is_causal = _with_causal(attn_mask, query.shape[-2], key.shape[-2]), False
    elif is_causal and scale_value < 0:  # torch's fused kernels return NaN there; its masked path does not
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        is_causal = False
    if hq == 0 or hk == 0:  # torch's math kernel: torch 2.11's CPU flash kernel dies of SIGFPE on zero heads
        return torch.ops.aten._scaled_dot_product_attention_math(  # (key heads repeated to 0: no grouping)
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
            enable_gqa=enable_gqa and key.shape[-3] > 0)[0]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _with_causal(mask: torch.Tensor, l: int, s: int) -> torch.Tensor:
    """``mask`` (bool: True = attend, or additive) with keys j > i hidden from query i."""
    causal = torch.ones(l, s, dtype=torch.bool, device=mask.device).tril()  # (L, S)
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Varlen: packed (total, heads, dim) sequences, flash-attn's interface and alignment.


def _varlen_problem(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, dropout_p, seed):
    from gptkern.kernels.attention import Problem

    # no sequence is longer than the packed tensor: an over-generous max_seqlen only sizes the grid
    return Problem(batch=cu_q.numel() - 1, heads=q.shape[1], kv_heads=k.shape[1], l=min(max_q, q.shape[0]),
                   s=min(max_k, k.shape[0]),
                   d=q.shape[2], dv=v.shape[2], causal=causal, scale=scale, window=window,
                   cu_q=cu_q.contiguous(), cu_k=cu_k.contiguous(),  # the kernels read them as (B + 1,) arrays
                   dropout_p=dropout_p, seed=kernel_seed(seed, dropout_p, q.device, "triton_attention_varlen"))


@torch.library.custom_op("gptkern::triton_attention_varlen", mutates_args=())
def triton_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                            scale: float, window_left: int, window_right: int, dropout_p: float,
                            seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv). Returns out (total_q, H, Dv)
    and the log2-domain LSE (H, total_q) fp32."""
    from gptkern.kernels.attention import attn_fwd

    out = torch.empty((q.shape[0], q.shape[1], v.shape[2]), device=q.device, dtype=q.dtype)
    lse = torch.empty((q.shape[1], q.shape[0]), device=q.device, dtype=torch.float32)
    problem = _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                              (window_left, window_right), dropout_p, seed)
    with device_guard(q):
        attn_fwd(q, k, v, None, problem, out, lse)
    return out, lse


@triton_attention_varlen.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
      window_right, dropout_p, seed):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("gptkern::triton_attention_varlen_backward", mutates_args=())
def triton_attention_varlen_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                     causal: bool, scale: float, window_left: int, window_right: int,
                                     dropout_p: float, seed: Optional[torch.Tensor]
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkern.kernels.attention import attn_bwd

    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    problem = _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                              (window_left, window_right), dropout_p, seed)
    with device_guard(q):
        attn_bwd(_fit_tile_offsets(grad_out, 0), q, k, v, out, lse, None, problem, dq, dk, dv)
    return dq, dk, dv


@triton_attention_varlen_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      window_left, window_right, dropout_p, seed):
    return tuple(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.args = args  # max_q, max_k, causal, scale, window_left, window_right, dropout_p


def _varlen_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        dq, dk, dv = double_backward.varlen_grads(ctx, grad_out, q, k, v, cu_q, cu_k, seed)
    else:
        dq, dk, dv = _autograd.call(torch.ops.gptkern.triton_attention_varlen_backward, grad_out, q, k, v, out,
                                    lse, cu_q, cu_k, *ctx.args, seed)
    return (dq, dk, dv) + (None,) * (len(ctx.args) + 3)


_autograd.register("gptkern::triton_attention_varlen", _varlen_backward, _varlen_setup_context)


def window_within(window: tuple[int, int], max_l: int, max_s: int) -> tuple[int, int]:
    """``window`` (left, right) with a side that reaches past every key of sequences of at most
    ``max_l`` queries and ``max_s`` keys made -1 (unbounded), so that no kernel adds it to a
    position (int32 in Triton's, int64 elsewhere) and overflows: query i (bottom-right aligned)
    sees every earlier key once left >= s - 1, every later one once right >= l - 1."""
    left, right = window
    return (-1 if left >= max_s else left, -1 if right >= max_l else right)


def varlen_visibility(l: int, s: int, causal: bool, window: tuple[int, int], device) -> Optional[torch.Tensor]:
    """(l, s) bool mask, True = key visible, with flash-attn's bottom-right alignment; None if all visible."""
    left, right = window_within(window, l, s)
    if not causal and (left, right) == (-1, -1):
        return None
    i = torch.arange(l, device=device)[:, None] + (s - l)
    j = torch.arange(s, device=device)[None, :]
    visible = torch.ones(l, s, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= i
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def _varlen_torch(q, k, v, bounds_q, bounds_k, dropout_p, causal, scale, window):
    """The reference: F.scaled_dot_product_attention on each sequence (rows that see nothing give 0)."""
    outs = []
    for (q0, q1), (k0, k1) in zip(bounds_q, bounds_k):
        qb, kb, vb = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        mask = varlen_visibility(q1 - q0, k1 - k0, causal, window, q.device)
        if k1 == k0:  # zeros, (H, Lq, Dv), that stay in the autograd graph (zero gradients), NaN or not
            out = _empty_sum(qb) + vb.sum((0, 1)) + kb.sum()
        else:
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                                 enable_gqa=qb.shape[0] != kb.shape[0])
        outs.append(out.transpose(0, 1))
    return torch.cat(outs) if outs else _empty_sum(q) + v.sum((0, 1)) + k[:0].sum()  # no sequence: (0, H, Dv)


def _empty_sum(t: torch.Tensor) -> torch.Tensor:
    """Zeros of t's shape with a last dim of 1, computed from t (a sum over no columns)."""
    return t[..., :0].sum(-1, keepdim=True)


def _check_offsets_tensor(cu: torch.Tensor, name: str, device: torch.device) -> None:
    check_tensor(cu, name)
    if cu.dim() != 1 or cu.numel() < 1 or cu.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"{name} must be a 1-D int32 tensor of batch + 1 offsets, got {cu.dtype} "
                           f"{list(cu.shape)}")
    if cu.device != device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{device} (q) and {cu.device} ({name})")


def _offset_bounds(cu: torch.Tensor, name: str, total: int, max_seqlen: int, tensor_name: str) -> list[tuple[int, int]]:
    """The (start, end) rows of each sequence, after checking the offsets' values (reads them: a host sync
    for a GPU tensor)."""
    values = cu.tolist()
    if values[0] != 0:
        raise RuntimeError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise RuntimeError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise RuntimeError(f"{name} ends at {values[-1]} but {tensor_name} has {total} rows")
    longest = max((b - a for a, b in zip(values, values[1:])), default=0)
    if longest > max_seqlen:
        raise RuntimeError(f"max_seqlen for {name} is {max_seqlen} but a sequence has {longest} rows")
    return list(zip(values, values[1:]))


def _varlen_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                    lengths: tuple[int, int]) -> str:
    """lengths: the longest query and key sequences (the launch grid's rows)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _backend.choose("flash_attn_varlen", q.device,
                           {"triton": lambda: _triton_limits(q, v, False, dropout_p, lengths, grad, [
                               (t.stride(0), t.stride(-1)) for t in (q, k, v)]),
                            "cpu": lambda: _cpu_limits(q), "torch": lambda: None}, inputs=(q, k, v))


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: tuple[int, int],
                             causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Self-attention in a band, for gptkern's modules: (B, H, L, D) q over (B, Hkv, L, D) k and
    (B, Hkv, L, Dv) v (Hkv dividing H), query i seeing key j when i - left <= j <= i + right
    (``window_size`` (left, right), -1 unbounded) and, if ``causal``, j <= i; -> (B, H, L, Dv).

    Where the triton or cpu backend serves :func:`flash_attn_varlen`, it runs there with each
    batch row as one sequence: the kernels skip the key tiles outside the band and no L x L mask
    is made. Otherwise SDPA with an (L, L) band mask.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not q.shape[2] == k.shape[2] == v.shape[2]:
        raise RuntimeError(f"sliding_window_attention: q, k, v must be (B, heads, L, dim) with one L, got "
                           f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    q, k, v = _autocast.lower_precision(q, k, v)  # the backend is chosen for the dtype the kernels will see
    b, h, l, _ = q.shape
    if _varlen_backend(q, k, v, dropout_p, (l, l)) == "torch":
        mask = varlen_visibility(l, l, causal, tuple(window_size), q.device)  # (L, L) or None
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                            enable_gqa=k.shape[1] != h)
    packed = [t.transpose(1, 2).reshape(b * l, t.shape[1], t.shape[3]) for t in (q, k, v)]  # (B*L, heads, dim)
    cu = torch.arange(b + 1, dtype=torch.int32, device=q.device) * l  # one sequence per batch row
    out = flash_attn_varlen(*packed, cu, cu, l, l, dropout_p=dropout_p, causal=causal,
                            window_size=tuple(window_size))
    return out.view(b, l, h, v.shape[3]).transpose(1, 2)


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                      causal: bool = False, scale: Optional[float] = None,
                      window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Attention over packed variable-length sequences; no attention crosses a sequence boundary.

    Args:
        q: (total_q, H, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv), H a multiple of Hkv.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 offsets of each sequence, starting at 0.
            Their values are checked for CPU tensors; on a GPU the kernels trust them, as
            flash-attn's do (reading them would sync the host on every call).
        max_seqlen_q, max_seqlen_k: the longest sequence of each.
        dropout_p: dropout on the attention weights (in the kernel, as in
            :func:`scaled_dot_product_attention`).
        causal: query i of a sequence sees key j when j <= i + S - L (bottom-right aligned, as
            flash-attn).
        scale: defaults to 1 / sqrt(D).
        window_size: (left, right) sliding window, -1 for unbounded: key j is visible when
            i + S - L - left <= j <= i + S - L + right.
    Returns:
        (total_q, H, Dv) in q's dtype.
    """
    proxy = _fx.proxy_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if proxy is not None:  # torch.fx.symbolic_trace
        return _fx.record(flash_attn_varlen, proxy, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          dropout_p, causal, scale, window_size)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
    q, k, v = _autocast.lower_precision(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise RuntimeError(f"flash_attn_varlen: {name} must be (total, heads, dim), got {list(t.shape)}")
        if t.device != q.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{q.device} (q) and {t.device} ({name})")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError(f"flash_attn_varlen: q, k and v must share one floating-point dtype, got {q.dtype}, "
                           f"{k.dtype}, {v.dtype}")
    if k.shape[2] != q.shape[2] or k.shape[:2] != v.shape[:2]:
        raise RuntimeError(f"flash_attn_varlen: shapes do not match: q {list(q.shape)}, k {list(k.shape)}, "
                           f"v {list(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise RuntimeError(f"flash_attn_varlen: the {q.shape[1]} query heads must be a multiple of the "
                           f"{k.shape[1]} key/value heads")
    max_seqlen_q = _checks.int_arg(max_seqlen_q, "max_seqlen_q", "flash_attn_varlen")
    max_seqlen_k = _checks.int_arg(max_seqlen_k, "max_seqlen_k", "flash_attn_varlen")
    for arg, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, torch.SymInt) and value < 0:  # a data-dependent SymInt cannot be compared
            raise RuntimeError(f"flash_attn_varlen: {arg} must be >= 0, got {value}")
    check_float_arg(dropout_p, "dropout_p", "flash_attn_varlen")
    check_bool_arg(causal, "causal", "flash_attn_varlen")
    if scale is not None:
        check_float_arg(scale, "scale", "flash_attn_varlen")
    if not 0.0 <= dropout_p < 1.0:
        raise RuntimeError(f"dropout probability has to be in [0, 1), but got dropout_p={dropout_p}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(not _checks.is_int(w) or w < -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1, got {window_size!r}")
    window = window_within((int(window_size[0]), int(window_size[1])), int(max_seqlen_q), int(max_seqlen_k))
    check_tensor(cu_seqlens_q, "cu_seqlens_q")
    check_tensor(cu_seqlens_k, "cu_seqlens_k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise RuntimeError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                           f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    _check_offsets_tensor(cu_seqlens_q, "cu_seqlens_q", q.device)
    _check_offsets_tensor(cu_seqlens_k, "cu_seqlens_k", q.device)
    compiling = torch.compiler.is_compiling()

    def bounds():  # the offsets' values, checked: read on CPU, and by the torch backend (which needs them)
        return (_offset_bounds(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "q"),
                _offset_bounds(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "k"))

    # On a GPU the kernels trust the offsets' values, as flash-attn's do: checking them would cost a
    # host sync per call.
    checked = bounds() if _checks.checks_read_values(q) else None
    scale_value = _checks.attention_scale(scale, q.shape[-1])

    name = _varlen_backend(q, k, v, dropout_p, (min(int(max_seqlen_q), q.shape[0]), min(int(max_seqlen_k), k.shape[0])))
    if name in ("triton", "cpu"):
        args = (q, k, v, _checks.as_int32(cu_seqlens_q), _checks.as_int32(cu_seqlens_k), int(max_seqlen_q),
                int(max_seqlen_k), bool(causal), scale_value, *window)
        op = torch.ops.gptkern.attention_varlen_fwd if name == "cpu" else torch.ops.gptkern.triton_attention_varlen
        return _autograd.call(op, *args, float(dropout_p), draw_seed(dropout_p, q.device))[0]
    if q.device.type == "meta":  # shapes only: the offsets have no values to read
        return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    if compiling:
        raise NotImplementedError("flash_attn_varlen: the torch backend needs the offsets' values and cannot "
                                  "be traced by torch.compile; use the triton or cpu backend")
    bounds_q, bounds_k = checked or bounds()
    return _varlen_torch(q, k, v, bounds_q, bounds_k, dropout_p, causal, scale, window)
