"""Random-window batches from the token shards written by ``gptkern prepare``.

Sampling: at step ``k`` the loader draws the start offsets of one *global* batch of
``batch_size * world_size`` windows of ``block_size + 1`` tokens from a generator seeded with
``(seed, split, k)`` (numpy ``SeedSequence`` → PCG64), without replacement whenever the split has
that many windows; a smaller split deals out every window once before any twice (permutations
end to end). Rank ``r`` takes rows ``r * batch_size`` to ``(r + 1) * batch_size`` of it.

Guarantees:
- a batch depends only on ``(seed, split, rank, world_size, batch_size, block_size, step)``:
  2N batches straight equal N batches, ``state_dict()`` → ``load_state_dict()`` into a fresh
  loader, then N more; the state is the same on every rank (saving rank 0's suffices);
- at every step the ranks read disjoint sets of windows (distinct start offsets; windows may
  still overlap in tokens, as two rows of one batch may) when the split has at least
  ``batch_size * world_size`` windows, and their batches put together in rank order equal the
  batch of a single loader with ``batch_size * world_size`` rows.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Union

import numpy as np
import torch

from gptkern.data.prepare import read_meta
from gptkern.ops._checks import is_int

STATE_VERSION = 1


def document_bounds(x: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, int]:
    """Document boundaries of a batch of token rows, for ``gptkern.ops.flash_attn_varlen``.

    Args:
        x: (B, T) token ids.
        eos_id: the end-of-document id; a document ends just after each EOS and at each row's end.
    Returns:
        cu_seqlens: (num_docs + 1,) int32 on ``x``'s device, offsets into ``x.reshape(-1)``.
        max_seqlen: the longest document, as a Python int.
    """
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"document_bounds needs a non-empty (B, T) tensor, got shape {tuple(x.shape)}")
    rows, length = x.shape
    eos_ends = torch.nonzero(x.reshape(-1) == eos_id).flatten() + 1
    row_ends = torch.arange(1, rows + 1, device=x.device) * length
    ends = torch.unique(torch.cat([eos_ends, row_ends]))  # sorted, an EOS ending a row counted once
    cu_seqlens = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


class TokenLoader:
    """Batches of ``(x, y)``, each (batch_size, block_size) int64, ``y`` = ``x`` shifted by one token.

    The split's ``.bin`` file is opened once as a read-only ``np.memmap``; each batch reads only its
    windows. On CUDA the batch goes through pinned memory with a non-blocking copy.
    """

    def __init__(self, data_dir: Union[str, os.PathLike], split: str, block_size: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu"):
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("seed", seed),
                            ("rank", rank), ("world_size", world_size)):
            if not is_int(value):
                raise TypeError(f"TokenLoader: {name} must be an int, got {type(value).__name__} {value!r}")
        block_size, batch_size, seed, rank, world_size = (int(v) for v in (block_size, batch_size, seed, rank,
                                                                              world_size))  # JSON state
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        meta = read_meta(data_dir)
        if split not in meta["splits"]:
            raise ValueError(f"{Path(data_dir) / 'meta.json'} has no split {split!r} (it has {sorted(meta['splits'])})")
        info = meta["splits"][split]
        path = Path(data_dir) / info["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (listed in {Path(data_dir) / 'meta.json'})")
        dtype = np.dtype(meta["dtype"])
        size = path.stat().st_size
        if size != info["tokens"] * dtype.itemsize:
            raise ValueError(f"{path} holds {size} bytes, but meta.json says {info['tokens']} {dtype.name} tokens "
                             f"({info['tokens'] * dtype.itemsize} bytes)")
        if info["tokens"] < block_size + 1:
            raise ValueError(f"{path}: split {split!r} has {info['tokens']} tokens, fewer than "
                             f"block_size + 1 = {block_size + 1}")
        self.data = np.memmap(path, dtype=dtype, mode="r")
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.vocab_size, self.eos_id, self.num_tokens = meta["vocab_size"], meta["eos_id"], info["tokens"]
        self.step = 0

    def _starts(self, step: int) -> np.ndarray:
        """This rank's window offsets at ``step``: its slice of the global batch."""
        total = self.batch_size * self.world_size
        windows = self.num_tokens - self.block_size
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([self.seed, zlib.crc32(self.split.encode()), step])))
        if total <= windows:
            starts = rng.choice(windows, size=total, replace=False)
        else:  # every window once before any twice
            starts = np.concatenate([rng.permutation(windows) for _ in range(-(-total // windows))])[:total]
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next_batch(self, with_doc_ids: bool = False):
        """``(x, y)``; with ``with_doc_ids=True``, ``(x, y, cu_seqlens, max_seqlen)`` where the last two
        are :func:`document_bounds` of ``x`` (documents split after every EOS, for varlen attention)."""
        starts = self._starts(self.step)
        self.step += 1
        window = self.block_size + 1
        buf = np.empty((len(starts), window), dtype=np.int64)
        for row, start in enumerate(starts):
            buf[row] = self.data[start:start + window]
        tokens = torch.from_numpy(buf)
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) each
        bounds = document_bounds(x, self.eos_id) if with_doc_ids else None
        if self.device.type != "cpu":
            pin = self.device.type == "cuda"

            def move(t: torch.Tensor) -> torch.Tensor:
                return (t.pin_memory() if pin else t).to(self.device, non_blocking=pin)

            x, y = move(x), move(y)
            bounds = None if bounds is None else (move(bounds[0]), bounds[1])
        return (x, y) if bounds is None else (x, y, *bounds)

    def state_dict(self) -> dict:
        """JSON-serialisable; identical on every rank."""
        return {"version": STATE_VERSION, "split": self.split, "seed": self.seed, "block_size": self.block_size,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_tokens": self.num_tokens,
                "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["step"]``; the rest of the state must match this loader's settings."""
        mine = self.state_dict()
        wrong = [f"{k}: saved {state.get(k)!r}, this loader {mine[k]!r}" for k in mine
                 if k != "step" and state.get(k) != mine[k]]
        if wrong:
            raise ValueError("loader state does not match this loader (" + "; ".join(wrong) + ")")
        if not is_int(state.get("step")) or state["step"] < 0:
            raise ValueError(f"loader state has an invalid step {state.get('step')!r}")
        self.step = int(state["step"])
