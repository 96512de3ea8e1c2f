"""Softmax and log-softmax over one dimension, forward and backward.

A tensor is seen as (outer, N, inner) with the reduced dimension N in the middle; one
program handles one row (one (outer, inner) pair). Rows up to the fused limit of
launch.py stay in registers; longer rows use the looped kernels (online max/sum).
All arithmetic is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptkern.kernels.launch import SOFTMAX_BWD, SOFTMAX_FWD, is_aligned, row_block, tune_fused_rows


@triton.jit
def _row_base(inner, s_o, s_i):
    row = tl.program_id(0).to(tl.int64)
    return (row // inner) * s_o + (row % inner) * s_i


@triton.jit
def _columns(BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    """Column indices; int64 when column offsets (index * column stride) may pass 2**31."""
    cols = tl.arange(0, BLOCK_N)
    if WIDE:
        cols = cols.to(tl.int64)
    return cols


@triton.jit
def _softmax_fwd_kernel(
    X, Y,                  # (outer, N, inner), strides (sx_o, sx_n, sx_i) / (sy_o, sy_n, sy_i)
    inner, N,
    sx_o, sx_n, sx_i, sy_o, sy_n, sy_i,
    LOG: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    X += _row_base(inner, sx_o, sx_i)
    Y += _row_base(inner, sy_o, sy_i)
    cols = _columns(BLOCK_N, WIDE)
    mask = cols < N
    x = tl.load(X + cols * sx_n, mask=mask, other=-float("inf")).to(tl.float32)
    z = x - tl.max(x, 0)
    e = tl.exp(z)
    s = tl.sum(e, 0)
    if LOG:
        y = z - tl.log(s)
    else:
        y = e * (1.0 / s)
    tl.store(Y + cols * sy_n, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_fwd_looped_kernel(
    X, Y,                  # (outer, N, inner), as in _softmax_fwd_kernel
    inner, N,
    sx_o, sx_n, sx_i, sy_o, sy_n, sy_i,
    LOG: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    X += _row_base(inner, sx_o, sx_i)
    Y += _row_base(inner, sy_o, sy_i)
    cols = _columns(BLOCK_N, WIDE)
    # Online max and sum per lane; a lane that has seen only -inf keeps sum 0.
    m = tl.full([BLOCK_N], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        x = tl.load(X + (start + cols) * sx_n, mask=start + cols < N, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)  # a NaN must not be dropped
        keep = m_new != -float("inf")
        s = tl.where(keep, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
        m = m_new
    row_max = tl.max(m, 0)
    # A row of only -inf gives -inf - -inf = NaN here, as torch.softmax does.
    row_sum = tl.sum(s * tl.exp(m - row_max), 0)
    log_sum = tl.log(row_sum)
    inv_sum = 1.0 / row_sum
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        x = tl.load(X + (start + cols) * sx_n, mask=mask, other=0.0).to(tl.float32)
        z = x - row_max
        if LOG:
            y = z - log_sum
        else:
            y = tl.exp(z) * inv_sum
        tl.store(Y + (start + cols) * sy_n, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    DY, Y, DX,             # (outer, N, inner) each; DY and Y share strides (s_*), DX has sd_*
    inner, N,
    s_o, s_n, s_i, sd_o, sd_n, sd_i,
    LOG: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    base = _row_base(inner, s_o, s_i)
    DY += base
    Y += base
    DX += _row_base(inner, sd_o, sd_i)
    cols = _columns(BLOCK_N, WIDE)
    mask = cols < N
    dy = tl.load(DY + cols * s_n, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + cols * s_n, mask=mask, other=0.0).to(tl.float32)
    if LOG:
        dx = dy - tl.exp(y) * tl.sum(dy, 0)
    else:
        dx = y * (dy - tl.sum(dy * y, 0))
    tl.store(DX + cols * sd_n, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_looped_kernel(
    DY, Y, DX,             # as in _softmax_bwd_kernel
    inner, N,
    s_o, s_n, s_i, sd_o, sd_n, sd_i,
    LOG: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):
    base = _row_base(inner, s_o, s_i)
    DY += base
    Y += base
    DX += _row_base(inner, sd_o, sd_i)
    cols = _columns(BLOCK_N, WIDE)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        dy = tl.load(DY + (start + cols) * s_n, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            acc += dy
        else:
            acc += dy * tl.load(Y + (start + cols) * s_n, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(acc, 0)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        dy = tl.load(DY + (start + cols) * s_n, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + (start + cols) * s_n, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * total
        else:
            dx = y * (dy - total)
        tl.store(DX + (start + cols) * sd_n, dx.to(DX.dtype.element_ty), mask=mask)


def as_3d(t: torch.Tensor, dim: int) -> torch.Tensor:
    """View (or, if no view exists, copy) ``t`` as (outer, t.shape[dim], inner)."""
    n = t.shape[dim] if t.dim() else 1
    outer = 1
    for size in t.shape[:dim]:
        outer *= size
    inner = t.numel() // max(outer * n, 1)
    return t.reshape(outer, n, inner)


def _rows_aligned(n: int, *views: torch.Tensor) -> bool:
    """Rows are contiguous and every pointer, N and row stride is a multiple of 16."""
    if views[0].shape[2] != 1 or any(v.stride(1) != 1 for v in views):
        return False
    return is_aligned(n, *views, *(v.stride(0) for v in views))


def _wide(n: int, *views: torch.Tensor) -> bool:
    return max(n - 1, 0) * max(abs(v.stride(1)) for v in views) >= 2**31 - 1


def _elem_bytes(*tensors: torch.Tensor) -> int:
    return max(t.element_size() for t in tensors)


def softmax_fwd(x: torch.Tensor, dim: int, log: bool, out: torch.Tensor) -> torch.Tensor:
    """Write softmax (or log-softmax) of ``x`` along ``dim`` into ``out`` (same shape)."""
    if x.numel() == 0:
        return out
    x3, y3 = as_3d(x, dim), as_3d(out, dim)
    outer, n, inner = x3.shape
    aligned, elem_bytes = _rows_aligned(n, x3, y3), _elem_bytes(x3, y3)
    block, fused = row_block(SOFTMAX_FWD, n, aligned, elem_bytes)
    kernel = _softmax_fwd_kernel if fused else _softmax_fwd_looped_kernel
    tune_fused_rows(SOFTMAX_FWD, kernel, (outer * inner,), (x3, y3, inner, n, *x3.stride(), *y3.stride()),
                    dict(LOG=log, BLOCK_N=block, WIDE=_wide(n, x3, y3)), fused, aligned, elem_bytes,
                    (x3.dtype, y3.dtype, inner == 1), x3.device)
    return out


def softmax_bwd(grad_out: torch.Tensor, out: torch.Tensor, dim: int, log: bool,
                grad_in: torch.Tensor) -> torch.Tensor:
    """Write the gradient of softmax (or log-softmax) along ``dim`` into ``grad_in``.

    ``out`` is the forward output; ``grad_in`` has its shape and is contiguous.
    """
    if out.numel() == 0:
        return grad_in
    dy3 = as_3d(grad_out, dim)
    y3 = as_3d(out, dim)
    if dy3.stride() != y3.stride():
        dy3 = as_3d(grad_out.contiguous(), dim)
        y3 = as_3d(out.contiguous(), dim)
    dx3 = as_3d(grad_in, dim)
    outer, n, inner = y3.shape
    aligned, elem_bytes = _rows_aligned(n, dy3, y3, dx3), _elem_bytes(dy3, y3, dx3)
    block, fused = row_block(SOFTMAX_BWD, n, aligned, elem_bytes)
    kernel = _softmax_bwd_kernel if fused else _softmax_bwd_looped_kernel
    tune_fused_rows(SOFTMAX_BWD, kernel, (outer * inner,), (dy3, y3, dx3, inner, n, *y3.stride(), *dx3.stride()),
                    dict(LOG=log, BLOCK_N=block, WIDE=_wide(n, dy3, y3, dx3)), fused, aligned, elem_bytes,
                    (dy3.dtype, y3.dtype, dx3.dtype, inner == 1), y3.device)
    return grad_in
