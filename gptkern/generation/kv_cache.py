"""Key/value caches for decoding: static (preallocated per sequence) and paged (a shared block pool).

Each sequence's tokens sit at cache positions 0 .. seqlens[b] - 1 with no padding in between:
a left-padded prompt is compacted when it is written, so decode attention needs no mask and
reads exactly ``seqlens[b]`` keys per sequence.
"""
from __future__ import annotations

from typing import Optional

import torch

from gptkern import ops
from gptkern.ops._checks import int_arg


def _check_dims(cls: str, **dims: object) -> None:
    """Cache dimensions: positive ints (or 0-d integer tensors), each named when it is not."""
    for name, value in dims.items():
        int_arg(value, name, cls)
    bad = {name: int(value) for name, value in dims.items() if value < 1}
    if bad:
        raise ValueError("cache dimensions must be positive, got " + ", ".join(f"{k}={v}" for k, v in bad.items()))


class StaticKVCache:
    """Per-layer buffers ``(B, n_kv_head, max_seq_len, head_dim)`` in the model's dtype.

    Memory is exactly 2 * n_layer * B * n_kv_head * max_seq_len * head_dim * element size
    (:attr:`nbytes`). ``seqlens`` (B,) int32 counts the tokens cached per sequence.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        _check_dims("StaticKVCache", n_layer=n_layer, batch_size=batch_size, n_kv_head=n_kv_head,
                    max_seq_len=max_seq_len, head_dim=head_dim)
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.max_seq_len = max_seq_len
        self.filled = False  # False until the prompt is written (prefill)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int,
                  dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> "StaticKVCache":
        c = model.config
        weight = next(model.parameters())
        return cls(c.n_layer, batch_size, c.n_kv_head, max_seq_len, c.head_dim, dtype or weight.dtype,
                   device or weight.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        """k, v (B, Hkv, L, D) of a left-padded prompt whose sequence b has lengths[b] real tokens
        at the end: they are stored at positions 0 .. lengths[b] - 1."""
        b, _, l, _ = k.shape
        if l > self.max_seq_len:
            raise ValueError(f"prompt length {l} is longer than the cache's max_seq_len {self.max_seq_len}")
        start = (l - lengths).to(torch.long)  # (B,) left padding
        index = (start[:, None] + torch.arange(l, device=k.device)).clamp(max=l - 1)  # (B, L)
        index = index[:, None, :, None].expand_as(k)
        self.k[layer][:, :, :l] = k.gather(2, index)
        self.v[layer][:, :, :l] = v.gather(2, index)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: Optional[int] = None) -> torch.Tensor:
        """Appends k, v (B, Hkv, Lq, D) after each sequence's cached tokens and returns the
        attention of q (B, H, Lq, D) over the cache (causal among the Lq new tokens; with
        ``window``, each query sees only the last ``window`` positions, itself included)."""
        b, _, lq, _ = k.shape
        rows = torch.arange(b, device=k.device)[:, None]  # (B, 1)
        cols = self.seqlens.to(torch.long)[:, None] + torch.arange(lq, device=k.device)  # (B, Lq)
        self.k[layer][rows, :, cols] = k.transpose(1, 2)  # indexed as (B, Lq, Hkv, D)
        self.v[layer][rows, :, cols] = v.transpose(1, 2)
        if window is None:
            return ops.decode_attention(q, self.k[layer], self.v[layer], self.seqlens + lq)
        keys = torch.arange(self.k[layer].shape[2], device=k.device)
        visible = (keys <= cols[..., None]) & (keys > cols[..., None] - window)  # (B, Lq, S_max)
        return ops.scaled_dot_product_attention(q, self.k[layer], self.v[layer], attn_mask=visible[:, None],
                                                enable_gqa=q.shape[1] != k.shape[1])

    def allocate(self, lengths: list[int]) -> None:
        """Checks that sequence b fits ``lengths[b]`` tokens (the paged cache takes blocks here)."""
        if max(lengths, default=0) > self.max_seq_len:
            raise ValueError(f"a sequence needs {max(lengths)} cache positions, more than max_seq_len "
                             f"{self.max_seq_len}")

    def free(self, row: int) -> None:
        """A finished sequence: nothing to return in a static cache."""

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache row ``rows[i]`` as row i (beam search)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.seqlens = self.seqlens.index_select(0, rows)

    def layer(self, index: int, prompt_lengths: Optional[torch.Tensor] = None) -> "LayerCache":
        return LayerCache(self, index, prompt_lengths)

    def advance(self, n: int) -> None:
        """After every layer has seen ``n`` new tokens per sequence."""
        self.seqlens += n

    def reset(self) -> None:
        self.seqlens.zero_()
        self.filled = False


class PagedKVCache(StaticKVCache):
    """Per-layer pools of fixed-size blocks ``(num_blocks, n_kv_head, block_size, head_dim)`` shared
    by all sequences, with a block table ``(B, max_blocks_per_seq)`` int32 per sequence.

    Blocks are taken from a free list as a sequence grows (so at most one partly filled block
    per sequence) and returned by :meth:`free`. Block 0 is a scratch block that is never handed
    out: the table rows of freed sequences point at it, so their writes land nowhere that
    matters. Running out of blocks raises RuntimeError; no sequence writes into another's blocks.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, max_seq_len: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        _check_dims("PagedKVCache", n_layer=n_layer, batch_size=batch_size, n_kv_head=n_kv_head,
                    head_dim=head_dim, block_size=block_size, num_blocks=num_blocks,
                    **({"max_seq_len": max_seq_len} if max_seq_len else {}))  # 0 / None: the pool's size
        if num_blocks < 2:
            raise ValueError(f"need num_blocks >= 2 (one is scratch), got {num_blocks}")
        max_seq_len = max_seq_len or (num_blocks - 1) * block_size
        shape = (num_blocks, n_kv_head, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.max_seq_len, self.block_size = max_seq_len, block_size
        self.block_table = torch.zeros(batch_size, -(-max_seq_len // block_size), dtype=torch.int32, device=device)
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # block 0 is scratch
        self.owned: list[list[int]] = [[] for _ in range(batch_size)]
        self.freed: set[int] = set()  # rows given back by free(): their writes go to the scratch block
        self.host_seqlens = [0] * batch_size  # seqlens as the host saw them written (for the checks)
        self.filled = False

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int, num_blocks: Optional[int] = None,
                  block_size: int = 16, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device] = None) -> "PagedKVCache":
        c = model.config
        weight = next(model.parameters())
        if num_blocks is None:  # every sequence's full length, and the scratch block
            num_blocks = batch_size * -(-max_seq_len // block_size) + 1
        return cls(c.n_layer, batch_size, c.n_kv_head, c.head_dim, num_blocks, block_size, max_seq_len,
                   dtype or weight.dtype, device or weight.device)

    def allocate(self, lengths: list[int]) -> None:
        """Make room for ``lengths[b]`` tokens in sequence b (host-side, before they are written).

        All or nothing: a request that does not fit takes no block, so the table stays in step."""
        if len(lengths) > len(self.owned):
            raise ValueError(f"lengths has {len(lengths)} entries for a cache of {len(self.owned)} sequences")
        extra = []  # blocks to add, per row
        for row, n in enumerate(lengths):
            if n > self.max_seq_len:
                raise ValueError(f"sequence {row} needs {n} cache positions, more than max_seq_len {self.max_seq_len}")
            extra.append(max(0, -(-n // self.block_size) - len(self.owned[row])))
        if sum(extra) > len(self.free_blocks):
            raise RuntimeError(f"the paged KV cache is out of blocks ({self.k[0].shape[0] - 1} blocks of "
                               f"{self.block_size} tokens): free finished sequences or allocate more")
        for row, (n, count) in enumerate(zip(lengths, extra)):
            if n > 0:
                self.freed.discard(row)
            self.owned[row].extend(self.free_blocks.pop() for _ in range(count))
        if any(extra):
            self._sync_table()

    def free(self, row: int) -> None:
        """Return sequence ``row``'s blocks to the pool; its table row points at the scratch block."""
        self.free_blocks.extend(reversed(self.owned[row]))
        self.owned[row] = []
        self.freed.add(row)
        self._sync_table()

    @property
    def blocks_in_use(self) -> int:
        return sum(len(blocks) for blocks in self.owned)

    def _sync_table(self) -> None:
        table = torch.zeros(self.block_table.shape, dtype=torch.int32)
        for row, blocks in enumerate(self.owned):
            table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.block_table.copy_(table)

    def reorder(self, rows: torch.Tensor) -> None:
        raise NotImplementedError("beam search reorders rows of a static cache; the paged cache does not")

    def reset(self) -> None:
        """Empty: every block back in the pool (the tensors stay the same objects)."""
        self.free_blocks = list(range(self.k[0].shape[0] - 1, 0, -1))
        self.owned = [[] for _ in self.owned]
        self.freed = set()
        self.host_seqlens = [0] * len(self.owned)
        self._sync_table()
        super().reset()

    def advance(self, n: int) -> None:
        super().advance(n)
        self.host_seqlens = [length + n for length in self.host_seqlens]

    def _slots(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> (block ids, offsets in the block), each (B, T). Positions past the
        table go to the scratch block (decode attention then rejects the lengths): never into a
        sequence's own blocks."""
        index = positions // self.block_size
        blocks = self.block_table.gather(1, index.clamp(max=self.block_table.shape[1] - 1))
        blocks = torch.where(index < self.block_table.shape[1], blocks, 0)
        return blocks.long(), positions % self.block_size

    def _check_allocated(self, needed: list[int]) -> None:
        """Each sequence not freed has blocks for the ``needed`` positions: else its tokens would
        go to the scratch block, which decode attention would read as its keys (host-side lengths:
        under a CUDA graph this runs at the capture, and generate allocates before every step)."""
        for row, n in enumerate(needed):
            if row not in self.freed and n > len(self.owned[row]) * self.block_size:
                raise RuntimeError(f"sequence {row} needs {n} positions of the paged KV cache but has "
                                   f"{len(self.owned[row]) * self.block_size} allocated: call allocate(lengths) "
                                   f"before writing to it")

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        if layer == 0:
            needed = [int(n) for n in lengths.tolist()]
            self._check_allocated(needed)
            self.host_seqlens = needed  # the model sets seqlens to them
        b, _, l, _ = k.shape
        start = (l - lengths).to(torch.long)[:, None]  # (B, 1) left padding
        positions = torch.arange(l, device=k.device)[None, :].expand(b, l)  # (B, L) cache positions
        source = (start + positions).clamp(max=l - 1)
        blocks, offsets = self._slots(positions)
        blocks = torch.where(positions < lengths[:, None], blocks, 0)  # padding slots go to scratch
        index = source[:, None, :, None].expand_as(k)
        self.k[layer][blocks, :, offsets] = k.gather(2, index).transpose(1, 2)  # (B, L, Hkv, D)
        self.v[layer][blocks, :, offsets] = v.gather(2, index).transpose(1, 2)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: Optional[int] = None) -> torch.Tensor:
        if window is not None:
            raise NotImplementedError("sliding-window attention over a paged cache; use the static cache")
        lq = k.shape[2]
        if layer == 0:
            self._check_allocated([n + lq for n in self.host_seqlens])
        positions = self.seqlens.to(torch.long)[:, None] + torch.arange(lq, device=k.device)  # (B, Lq)
        blocks, offsets = self._slots(positions)
        self.k[layer][blocks, :, offsets] = k.transpose(1, 2)
        self.v[layer][blocks, :, offsets] = v.transpose(1, 2)
        return ops.decode_attention(q, self.k[layer], self.v[layer], self.seqlens + lq, block_table=self.block_table)


def make_cache(model: torch.nn.Module, kind: str, batch_size: int, max_seq_len: int,
               num_blocks: Optional[int] = None) -> StaticKVCache:
    """A ``static`` or ``paged`` cache for ``model``'s layers on its device, in its dtype (under
    autocast, in the autocast dtype, as the keys and values are made, float64 models excepted)."""
    check_cache_kind(kind)
    weight = next(model.parameters())
    dtype = weight.dtype
    if torch.is_autocast_enabled(weight.device.type) and dtype != torch.float64:
        dtype = torch.get_autocast_dtype(weight.device.type)  # the keys and values autocast makes
    if kind == "static":
        return StaticKVCache.for_model(model, batch_size, max_seq_len, dtype=dtype)
    return PagedKVCache.for_model(model, batch_size, max_seq_len, num_blocks=num_blocks, dtype=dtype)


def check_cache_kind(kind: object) -> None:
    if kind not in ("static", "paged"):
        raise ValueError(f"cache must be 'static' or 'paged', got {kind!r}")


class LayerCache:
    """One layer's view of a cache, handed to its attention module for one forward. Keys, values
    and queries are cast to the cache's dtype (they differ under autocast) and the attention
    output back to the queries'."""

    def __init__(self, cache: StaticKVCache, index: int, prompt_lengths: Optional[torch.Tensor]):
        self.cache, self.index, self.prompt_lengths = cache, index, prompt_lengths

    @property
    def decoding(self) -> bool:
        return self.cache.filled

    def write_prompt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        lengths = self.prompt_lengths
        if lengths is None:
            lengths = torch.full((k.shape[0],), k.shape[2], dtype=torch.int32, device=k.device)
        dtype = self.cache.k[self.index].dtype
        self.cache.write_prompt(self.index, k.to(dtype), v.to(dtype), lengths)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
        dtype = self.cache.k[self.index].dtype
        out = self.cache.decode(self.index, q.to(dtype), k.to(dtype), v.to(dtype), window)
        return out.to(q.dtype)
