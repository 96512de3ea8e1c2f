"""LayerNorm and RMSNorm over the last N elements of each row, forward and backward.

Forward: one program per row; rows up to the fused limit of launch.py stay in
registers, longer rows take several passes over tiles. The forward saves the row's
mean (LayerNorm) and reciprocal standard deviation, in fp32.

Backward: G programs each take a contiguous range of rows, write dX and accumulate
dW/dB partial sums of their rows in fp32 registers, stored into a (G, N) buffer; a
last kernel sums the buffer over G in a fixed order (for a G of thousands, chunks of
rows first, then their sums). Rows too long for registers first get their two row
reductions from a separate pass, then a (column tiles, G) grid does the rest. No
atomics: results are bit-reproducible. On a GPU, autotuning also times a variant
that loads each program's next row while it computes the current one (PREFETCH:
the same arithmetic, so the same bits).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from gptkern.kernels import autotune
from gptkern.kernels.launch import NORM_BWD, NORM_FWD, is_aligned, reduction_programs, row_block, tune_fused_rows


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
        else:  # the mean of x - x[0], plus x[0]: exact for a constant row, close for a near-constant one
            x0 = tl.load(X).to(tl.float32)
            mean = x0 + tl.sum(tl.where(mask, x - x0, 0.0), 0) / N
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
            x0 = tl.load(X).to(tl.float32)
            acc = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, N, BLOCK_N):
                x = tl.load(X + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
                acc += tl.where(start + cols < N, x - x0, 0.0)
            mean = x0 + tl.sum(acc, 0) / N
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
def _norm_bwd_kernel(
    X, DY, DX,             # (rows, N), row strides stride_x / stride_dy / stride_dx, unit column stride
    W,                     # (N,), unused when HAS_W is False
    Mean, Rstd,            # (rows,) fp32 from the forward
    C1, C2,                # (rows,) fp32 row sums from _norm_bwd_row_sums_kernel when SUMS_GIVEN
    DW_part, DB_part,      # (G, N) fp32 partial sums, row stride N
    stride_x, stride_dy, stride_dx, n_rows, rows_per_program, N,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    SUMS_GIVEN: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr = False,
):
    """Program (t, g) writes dX of column tile t for the rows of group g and keeps that tile's
    dW/dB partials in registers. Without SUMS_GIVEN one tile holds the whole row (grid (1, G))
    and the row sums c1 = mean(xhat * w * dy), c2 = mean(w * dy) are computed here. Tiles go on
    the grid's first axis: a row of 2**31 elements has 2**19 of them (the second holds 65535).
    With PREFETCH the next row's x and dy are loaded before this row's reductions and store, so
    that they are in flight while the program computes (a program holds one row at a time)."""
    pid = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], tl.float32)
    db_acc = tl.zeros([BLOCK_N], tl.float32)
    if PREFETCH:  # the first row (every program has one); stored dtypes, converted when used
        x_next = tl.load(X + first * stride_x + cols, mask=mask, other=0.0)
        dy_next = tl.load(DY + first * stride_dy + cols, mask=mask, other=0.0)
    for row in range(first, last):  # int64 bounds, so int64 offsets
        if PREFETCH:
            x = x_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            more = mask & (row + 1 < last)
            x_next = tl.load(X + (row + 1) * stride_x + cols, mask=more, other=0.0)
            dy_next = tl.load(DY + (row + 1) * stride_dy + cols, mask=more, other=0.0)
        else:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)  # masked lanes: maybe inf
        wdy = dy * w if HAS_W else dy  # 0 on masked lanes, so they add nothing below
        if SUMS_GIVEN:
            c1 = tl.load(C1 + row)
        else:
            c1 = tl.sum(xhat * wdy, 0) / N
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            if SUMS_GIVEN:
                c2 = tl.load(C2 + row)
            else:
                c2 = tl.sum(wdy, 0) / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(DW_part + pid * N + cols, dw_acc, mask=mask)
    if NEED_DB:
        tl.store(DB_part + pid * N + cols, db_acc, mask=mask)


@triton.jit
def _norm_bwd_row_sums_kernel(
    X, DY, W, Mean, Rstd,  # as in _norm_bwd_kernel
    C1, C2,                # (rows,) fp32 out: mean(xhat * w * dy), mean(w * dy)
    stride_x, stride_dy, N,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """First pass of the looped backward: the two row reductions dX needs."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    DY += row * stride_dy
    rstd = tl.load(Rstd + row)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(Mean + row)
    cols = tl.arange(0, BLOCK_N)
    sum_a = tl.zeros([BLOCK_N], tl.float32)
    sum_b = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
        wdy = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            wdy = wdy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
        sum_a += tl.where(mask, (x - mean) * rstd, 0.0) * wdy
        sum_b += wdy
    tl.store(C1 + row, tl.sum(sum_a, 0) / N)
    tl.store(C2 + row, tl.sum(sum_b, 0) / N)


@triton.jit
def _sum_rows_kernel(
    P,                     # (G, N) fp32, contiguous
    OUT,                   # (cdiv(G, ROWS), N): row c gets the sum of P's rows c * ROWS ... c * ROWS + ROWS - 1
    G, N, ROWS,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (t, c) sums column tile t of P's rows chunk c, BLOCK_G rows a step (their loads in
    flight together; one row a step left an SM waiting on each load in turn), then over the
    step's rows, in a fixed order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    chunk = tl.program_id(1).to(tl.int64)
    first = chunk * ROWS
    last = tl.minimum(first + ROWS, G)
    rows = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for g0 in range(first, last, BLOCK_G):
        g = g0 + rows  # int64: G * N may pass 2**31
        acc += tl.load(P + g[:, None] * N + cols[None, :], mask=(g < last)[:, None] & mask[None, :], other=0.0)
    tl.store(OUT + chunk * N + cols, tl.sum(acc, 0).to(OUT.dtype.element_ty), mask=mask)


SUM_ROWS_BLOCK_G = 128
SUM_ROWS_BLOCK_N = 32  # 24 column tiles at 768 columns, 256 at 8192
SUM_ROWS_BLOCK_N_INTERPRETER = 4096  # the interpreter runs programs one by one: few, wide ones
SUM_ROWS_CHUNK = 256  # over 4 chunks of rows: the chunks summed in parallel first, then their sums


def sum_rows(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[n] = sum over g of partial[g, n], in a fixed order."""
    g, n = partial.shape
    block_n = SUM_ROWS_BLOCK_N if partial.device.type == "cuda" else SUM_ROWS_BLOCK_N_INTERPRETER
    tiles = triton.cdiv(n, block_n)
    blocks = dict(BLOCK_G=min(SUM_ROWS_BLOCK_G, triton.next_power_of_2(g)), BLOCK_N=block_n, num_warps=4)
    if g > 4 * SUM_ROWS_CHUNK:  # (short rows of many programs: 4224 groups on an H200, 4 column tiles at 128)
        chunks = triton.cdiv(g, SUM_ROWS_CHUNK)
        sums = torch.empty((chunks, n), device=partial.device, dtype=torch.float32)
        _sum_rows_kernel[(tiles, chunks)](partial, sums, g, n, SUM_ROWS_CHUNK, **blocks)
        partial, g = sums, chunks
        blocks["BLOCK_G"] = min(SUM_ROWS_BLOCK_G, triton.next_power_of_2(g))
    _sum_rows_kernel[(tiles, 1)](partial, out, g, n, g, **blocks)
    return out


# What the backward's autotuning times: without, then with the next row's loads issued early (the default
# first: it runs untuned). A program walks its rows one by one, and an SM holds one program of a
# long row (registers), so without the prefetch its loads wait through each row's reductions.
PREFETCH_CHOICES = (False, True)
PREFETCH_MAX_BYTES = 16384  # a block of 8192 fp32 elements spills with the prefetch (sm_90)


def prefetch_choices(block: int, elem_bytes: int) -> tuple[bool, ...]:
    """The backward's PREFETCH choices for a block of up to ``elem_bytes``-byte elements."""
    return PREFETCH_CHOICES if block * elem_bytes <= PREFETCH_MAX_BYTES else PREFETCH_CHOICES[:1]


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
    aligned = is_aligned(n, x2, y2, w, b, x2.stride(0), y2.stride(0))
    elem_bytes = max(t.element_size() for t in (x2, w, b))
    block, fused = row_block(NORM_FWD, n, aligned, elem_bytes)
    tune_fused_rows(NORM_FWD, _norm_fwd_kernel, (x2.shape[0],),
                    (x2, y2, w, b, mean, rstd, x2.stride(0), y2.stride(0), n, eps),
                    dict(IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=block,
                         FUSED=fused), fused, aligned, elem_bytes, (x2.dtype, w.dtype, b.dtype, y2.dtype),
                    x2.device)


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
    aligned = is_aligned(n, x2, dy2, dx2, w, x2.stride(0), dy2.stride(0), dx2.stride(0))
    elem_bytes = max(t.element_size() for t in (x2, dy2, w))
    block, fused = row_block(NORM_BWD, n, aligned, elem_bytes)
    programs = reduction_programs(x.device, rows, NORM_BWD.warps(block, fused))
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    dw_part = torch.empty((programs, n), device=x.device, dtype=torch.float32) if need_dw else rstd
    db_part = torch.empty((programs, n), device=x.device, dtype=torch.float32) if need_db else rstd
    flags = dict(IS_RMS=is_rms, HAS_W=weight is not None, NEED_DW=need_dw, NEED_DB=need_db,
                 BLOCK_N=block, num_warps=NORM_BWD.warps(block, fused))
    strides = (x2.stride(0), dy2.stride(0), dx2.stride(0), rows, rows_per_program, n)
    if fused:
        c1 = c2 = rstd  # unused
        tiles = 1
    else:
        c1 = torch.empty(rows, device=x.device, dtype=torch.float32)
        c2 = torch.empty_like(c1)
        _norm_bwd_row_sums_kernel[(rows,)](
            x2, dy2, w, mean, rstd, c1, c2, x2.stride(0), dy2.stride(0), n,
            IS_RMS=is_rms, HAS_W=weight is not None, BLOCK_N=block, num_warps=NORM_BWD.warps(block, fused))
        tiles = triton.cdiv(n, block)

    def run(prefetch: bool) -> None:
        _norm_bwd_kernel[(tiles, programs)](x2, dy2, dx2, w, mean, rstd, c1, c2, dw_part, db_part, *strides,
                                            SUMS_GIVEN=not fused, PREFETCH=prefetch, **flags)

    # Prefetching the next row changes no arithmetic (the same bits either way), only when loads are issued.
    key = ("_norm_bwd_kernel", x2.dtype, dy2.dtype, w.dtype, dx2.dtype, tuple(sorted(flags.items())), fused,
           aligned, triton.next_power_of_2(rows), triton.next_power_of_2(n))  # (looped rows: one BLOCK_N)
    run(autotune.pick(key, prefetch_choices(block, elem_bytes), run, x.device))
    if need_dw:
        sum_rows(dw_part, grad_weight)
    if need_db:
        sum_rows(db_part, grad_bias)
