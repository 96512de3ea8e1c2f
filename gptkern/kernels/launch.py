"""Launch heuristics shared by the row-wise kernels (softmax, norms).

A row of N elements is held in registers by one program when N fits the kernel's
fused limit; longer rows take looped (multi-pass) kernels. Limits are measured: every
block a launcher can pick compiles for sm_90 without register spills
(tests/test_hopper_compile.py). Triton vectorizes 16-byte loads only when it knows the
pointers, N and the row strides are multiples of 16, which frees registers: aligned rows
get a larger limit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from gptkern.kernels import autotune

# Tile width of the looped kernels.
LOOP_BLOCK = 4096
MIN_BLOCK = 16


@dataclass(frozen=True)
class RowKernel:
    """Limits of one family of row kernels."""
    max_fused_aligned: int
    max_fused_unaligned: int
    max_fused_fp32: int = 1 << 30   # a further cap for 4-byte elements
    elems_per_warp: int = 256       # warps = block // elems_per_warp, within [1, max_warps]
    max_warps: int = 32
    loop_warps: int = 16            # warps of the looped kernels (tile LOOP_BLOCK)
    tune_warps: bool = False        # autotune the fused kernels' warps (warp_choices) on a GPU

    def warps(self, block: int, fused: bool = True) -> int:
        if not fused:
            return self.loop_warps
        return max(1, min(block // self.elems_per_warp, self.max_warps))

    def warp_choices(self, block: int, fused: bool, aligned: bool, elem_bytes: int) -> tuple[int, ...]:
        """What the autotuner times for a fused block (tune_fused_rows): the default warps, then up
        to two smaller counts, so that a thread holds up to as many elements as at the largest fused
        block by default (the compile check covers every choice). On an H200 the bf16 forwards of
        8192-wide rows at 32 warps (8 elements a thread) ran at 21-33% of copy bandwidth, those of
        32768-wide rows at 32 warps (32 a thread) at 49-79%."""
        default = self.warps(block, fused)
        if not fused or not self.tune_warps:
            return (default,)
        limit = self.max_fused(aligned, elem_bytes)
        per_thread = limit // (32 * self.warps(limit))
        fewer = [w for w in (16, 8, 4, 2, 1) if w < default and block // (32 * w) <= per_thread]
        return (default, *fewer[:2])

    def max_fused(self, aligned: bool, elem_bytes: int = 2) -> int:
        limit = self.max_fused_aligned if aligned else self.max_fused_unaligned
        return min(limit, self.max_fused_fp32) if elem_bytes >= 4 else limit


SOFTMAX_FWD = RowKernel(max_fused_aligned=32768, max_fused_unaligned=16384, tune_warps=True)
SOFTMAX_BWD = RowKernel(max_fused_aligned=16384, max_fused_unaligned=16384, tune_warps=True)
NORM_FWD = RowKernel(max_fused_aligned=32768, max_fused_unaligned=16384, max_fused_fp32=16384,
                     loop_warps=8, tune_warps=True)
NORM_BWD = RowKernel(max_fused_aligned=8192, max_fused_unaligned=4096, elems_per_warp=128, max_warps=16)

# Tests lower this to exercise the looped kernels on small rows (None: no cap).
FUSED_CAP = None


def is_aligned(n: int, *tensors_and_strides) -> bool:
    """True when ``n``, every int and every tensor's data pointer are multiples of 16 (bytes)."""
    if n % 16:
        return False
    for item in tensors_and_strides:
        value = item.data_ptr() if isinstance(item, torch.Tensor) else item
        if value % 16:
            return False
    return True


def row_block(kind: RowKernel, n_cols: int, aligned: bool, elem_bytes: int) -> tuple[int, bool]:
    """(BLOCK_N, fused): the block for a row of ``n_cols`` elements of up to ``elem_bytes``
    bytes, and whether one block holds the row."""
    block = max(triton.next_power_of_2(n_cols), MIN_BLOCK)
    limit = kind.max_fused(aligned, elem_bytes)
    if FUSED_CAP is not None:
        limit = min(limit, FUSED_CAP)
    if block <= limit:
        return block, True
    return min(LOOP_BLOCK, limit), False


def tune_fused_rows(kind: RowKernel, kernel, grid: tuple, args: tuple, constexprs: dict, fused: bool,
                    aligned: bool, elem_bytes: int, key: tuple, device: torch.device) -> int:
    """Launch ``kernel[grid](*args, **constexprs)`` with the warps the autotuner picks among
    ``kind.warp_choices`` for this key (the default without a GPU or with autotuning off), and
    return them."""
    block = constexprs["BLOCK_N"]

    def run(warps: int) -> None:
        kernel[grid](*args, **constexprs, num_warps=warps)

    choices = kind.warp_choices(block, fused, aligned, elem_bytes)
    full_key = (kernel.fn.__name__, *key, tuple(sorted(constexprs.items())), aligned, triton.next_power_of_2(grid[0]))
    warps = autotune.pick(full_key, choices, run, device)
    run(warps)
    return warps


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The multiprocessors of a CUDA ``device`` (no index: the current one), cached."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def reduction_programs(device: torch.device, n_rows: int, warps: int = 16) -> int:
    """Programs of ``warps`` warps for a kernel that accumulates per-column partial sums over rows,
    each walking its share of the rows one by one. On a GPU, 4 a multiprocessor; programs of 4
    warps or fewer (rows of up to 512 columns) number as many as an SM holds at once, about 40
    warps (the norm backward's 45-62 registers a thread; at most 32 programs), where 4 one-warp
    programs left an SM with 4 warps of rows in flight, but keep 16 rows each (their partial
    sums are traffic too) down to 4 programs an SM."""
    if device.type == "cuda":
        sms = sm_count(device)
        target = 4 * sms
        if warps < 8:
            target = max(target, min(min(32, 40 // warps) * sms, n_rows // 16))
    else:  # interpreter: programs run one after another, few are enough
        target = 4
    return max(1, min(n_rows, target))
