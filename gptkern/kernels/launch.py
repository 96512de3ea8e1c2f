"""Launch heuristics shared by the row-wise kernels (softmax, norms)."""
from __future__ import annotations

import functools

import torch
import triton

# Widest row held in registers by one program; longer rows loop over tiles.
MAX_FUSED_BLOCK = 32768
# Tile width of the looped kernels.
LOOP_BLOCK = 4096


def row_block(n_cols: int) -> tuple[int, bool]:
    """(BLOCK_N, fused): the block for a row of ``n_cols`` and whether one block holds it."""
    block = max(triton.next_power_of_2(n_cols), 16)
    if block <= MAX_FUSED_BLOCK:
        return block, True
    return LOOP_BLOCK, False


def row_warps(block: int) -> int:
    """Warps for one program handling ``block`` columns: about 8 to 16 elements per thread."""
    return max(1, min(block // 256, 32))


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_programs(device: torch.device, n_rows: int) -> int:
    """Programs for a kernel that accumulates per-column partial sums over rows."""
    if device.type == "cuda":
        target = 4 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # interpreter: programs run one after another, few are enough
        target = 4
    return max(1, min(n_rows, target))
