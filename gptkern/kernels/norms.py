"""LayerNorm and RMSNorm over the last N elements of each row, forward and backward.

Forward: one program per row; rows of up to MAX_FUSED_BLOCK elements stay in
registers, longer rows take several passes over tiles. The forward saves the row's
mean (LayerNorm) and reciprocal standard deviation, in fp32.

Backward: G programs each take a contiguous range of rows, write dX and accumulate
dW/dB partial sums of their rows in fp32 into a (G, N) buffer; a second kernel sums
the buffer over G in a fixed order. No atomics: results are bit-reproducible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from gptkern.kernels.launch import reduction_programs, row_block, row_warps


@triton.jit
def _norm_fwd_kernel(
    X, Y,                  # (rows, N), row strides stride_x / stride_y, unit column stride
    W, B,                  # (N,) each, or unused when HAS_W / HAS_B is False
    Mean, Rstd,            # (rows,) fp32; Mean unused for RMSNorm
    stride_x, stride_y, N, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr, FUSED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    cols = tl.arange(0, BLOCK_N)
    if FUSED:
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, 0) / N
            xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 0) / N + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        mean = 0.0
        if not IS_RMS:
            acc = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, N, BLOCK_N):
                acc += tl.load(X + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
            mean = tl.sum(acc, 0) / N
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = tl.rsqrt(tl.sum(acc, 0) / N + eps)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _norm_bwd_row(X, DY, DX, W, cols, mask, mean, rstd, c1, c2,
                  IS_RMS: tl.constexpr, HAS_W: tl.constexpr):
    """dX of one tile given the row's c1 = mean(xhat * wdy), c2 = mean(wdy); returns (xhat, dy)."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        dx = (wdy - xhat * c1) * rstd
    else:
        dx = (wdy - (xhat * c1 + c2)) * rstd
    tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
    return xhat, dy


@triton.jit
def _norm_row_sums(X, DY, W, cols, mask, mean, rstd, HAS_W: tl.constexpr):
    """Per-lane xhat * wdy and wdy of one tile."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return xhat * wdy, wdy


@triton.jit
def _norm_bwd_kernel(
    X, DY, DX,             # (rows, N), row strides stride_x / stride_dy / stride_dx, unit column stride
    W,                     # (N,), unused when HAS_W is False
    Mean, Rstd,            # (rows,) fp32 from the forward
    DW_part, DB_part,      # (G, N) fp32 partial sums, row stride N; zeroed when not FUSED
    stride_x, stride_dy, stride_dx, n_rows, rows_per_program, N,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, FUSED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    DW_part += pid * N
    DB_part += pid * N
    dw_acc = tl.zeros([BLOCK_N], tl.float32)
    db_acc = tl.zeros([BLOCK_N], tl.float32)
    for row64 in range(first, last):  # int64 bounds, so int64 offsets
        x_row = X + row64 * stride_x
        dy_row = DY + row64 * stride_dy
        dx_row = DX + row64 * stride_dx
        rstd = tl.load(Rstd + row64)
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(Mean + row64)
        if FUSED:
            mask = cols < N
            a, b = _norm_row_sums(x_row, dy_row, W, cols, mask, mean, rstd, HAS_W)
            c1 = tl.sum(a, 0) / N
            c2 = tl.sum(b, 0) / N
            xhat, dy = _norm_bwd_row(x_row, dy_row, dx_row, W, cols, mask, mean, rstd, c1, c2,
                                     IS_RMS, HAS_W)
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DB:
                db_acc += dy
        else:
            sum_a = tl.zeros([BLOCK_N], tl.float32)
            sum_b = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, N, BLOCK_N):
                a, b = _norm_row_sums(x_row + start, dy_row + start, W + start, cols,
                                      start + cols < N, mean, rstd, HAS_W)
                sum_a += a
                sum_b += b
            c1 = tl.sum(sum_a, 0) / N
            c2 = tl.sum(sum_b, 0) / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                xhat, dy = _norm_bwd_row(x_row + start, dy_row + start, dx_row + start,
                                         W + start, cols, mask, mean, rstd, c1, c2, IS_RMS, HAS_W)
                # Only this program touches its partial row: a plain read-modify-write.
                if NEED_DW:
                    dw = tl.load(DW_part + start + cols, mask=mask, other=0.0)
                    tl.store(DW_part + start + cols, dw + dy * xhat, mask=mask)
                if NEED_DB:
                    db = tl.load(DB_part + start + cols, mask=mask, other=0.0)
                    tl.store(DB_part + start + cols, db + dy, mask=mask)
    if FUSED:
        mask = cols < N
        if NEED_DW:
            tl.store(DW_part + cols, dw_acc, mask=mask)
        if NEED_DB:
            tl.store(DB_part + cols, db_acc, mask=mask)


@triton.jit
def _sum_rows_kernel(
    P,                     # (G, N) fp32, contiguous
    OUT,                   # (N,)
    G, N,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    ptrs = P + cols
    for _ in range(0, G):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += N
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=mask)


SUM_ROWS_BLOCK = 256


def sum_rows(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[n] = sum over g of partial[g, n], in a fixed order."""
    g, n = partial.shape
    _sum_rows_kernel[(triton.cdiv(n, SUM_ROWS_BLOCK),)](partial, out, g, n,
                                                        BLOCK_N=SUM_ROWS_BLOCK, num_warps=4)
    return out


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) view of ``t`` with unit column stride, copying only when no such view exists."""
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def norm_fwd(x: torch.Tensor, n: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             eps: float, is_rms: bool, out: torch.Tensor, mean: torch.Tensor,
             rstd: torch.Tensor) -> None:
    """Normalize the last ``n`` elements of each row of ``x`` into ``out`` (contiguous, x's shape).

    ``mean`` and ``rstd`` are (rows,) fp32 and receive the statistics (``mean`` is left
    untouched for RMSNorm).
    """
    if x.numel() == 0:
        return
    x2, y2 = as_rows(x, n), out.view(-1, n)
    w = weight.reshape(-1).contiguous() if weight is not None else x2
    b = bias.reshape(-1).contiguous() if bias is not None else x2
    block, fused = row_block(n)
    _norm_fwd_kernel[(x2.shape[0],)](
        x2, y2, w, b, mean, rstd, x2.stride(0), y2.stride(0), n, eps,
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_N=block, FUSED=fused, num_warps=row_warps(block))


def norm_bwd(grad_out: torch.Tensor, x: torch.Tensor, n: int, weight: Optional[torch.Tensor],
             mean: torch.Tensor, rstd: torch.Tensor, is_rms: bool, need_dw: bool, need_db: bool,
             grad_in: torch.Tensor, grad_weight: Optional[torch.Tensor],
             grad_bias: Optional[torch.Tensor]) -> None:
    """Write dX into ``grad_in`` (contiguous, x's shape) and, when asked, dW and dB (n,)."""
    rows = x.numel() // n if n else 0
    if rows == 0:
        for g in (grad_weight, grad_bias):
            if g is not None:
                g.zero_()
        return
    x2, dy2, dx2 = as_rows(x, n), as_rows(grad_out, n), grad_in.view(-1, n)
    w = weight.reshape(-1).contiguous() if weight is not None else x2
    block, fused = row_block(n)
    programs = reduction_programs(x.device, rows)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    alloc = torch.empty if fused else torch.zeros
    dw_part = alloc((programs, n), device=x.device, dtype=torch.float32) if need_dw else rstd
    db_part = alloc((programs, n), device=x.device, dtype=torch.float32) if need_db else rstd
    _norm_bwd_kernel[(programs,)](
        x2, dy2, dx2, w, mean, rstd, dw_part, db_part,
        x2.stride(0), dy2.stride(0), dx2.stride(0), rows, rows_per_program, n,
        IS_RMS=is_rms, HAS_W=weight is not None, NEED_DW=need_dw, NEED_DB=need_db,
        BLOCK_N=block, FUSED=fused, num_warps=row_warps(block))
    if need_dw:
        sum_rows(dw_part, grad_weight)
    if need_db:
        sum_rows(db_part, grad_bias)
