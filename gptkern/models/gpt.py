"""GPT: a decoder-only Transformer on gptkern's kernels (GPT-2 and Llama-style presets)."""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptkern import _backend
from gptkern.models.config import GPTConfig
from gptkern.nn.linear import Linear
from gptkern.nn.rotary import rope_cos_sin
from gptkern.nn.transformer import Block, make_norm


def _recompute_contexts(backend: str):
    return contextlib.nullcontext(), _backend.backend(backend)


def retie_after_load(module: "GPT", incompatible) -> None:  # a function, not a lambda: the model stays picklable
    module._tie()


def check_token_ids(idx: torch.Tensor, vocab_size: int, name: str = "idx") -> None:
    """(B, L) integer ids in [0, vocab_size), else IndexError naming the id (one host sync; skipped
    while torch.compile traces)."""
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, got {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{name} must be (batch, sequence), got shape {list(idx.shape)}")
    if idx.numel() == 0 or not _reading_values_allowed(idx):
        return
    low, high = (int(v) for v in torch.aminmax(idx))
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise IndexError(f"token id {bad} in {name} is out of range for vocab_size {vocab_size}")


def _reading_values_allowed(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values: not while torch.compile traces or a CUDA graph is
    captured (a host sync)."""
    return not (torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def check_learned_positions(position_ids: Optional[torch.Tensor], doc_bounds, shape: torch.Size,
                            block_size: int) -> None:
    """The positions a learned table is indexed with lie in [0, block_size): ``position_ids``
    broadcastable to ``shape``, or ``doc_bounds`` (cu_seqlens, max_seqlen) covering the B * L tokens
    with no document longer than block_size. Else ValueError / IndexError naming the argument."""
    if position_ids is not None:
        if position_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"position_ids must be an int64 or int32 tensor, got {position_ids.dtype}")
        try:
            fits = torch.broadcast_shapes(position_ids.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"position_ids of shape {list(position_ids.shape)} do not broadcast to idx's "
                             f"shape {list(shape)}")
        if position_ids.numel() and _reading_values_allowed(position_ids):
            low, high = (int(v) for v in torch.aminmax(position_ids))
            if low < 0 or high >= block_size:
                bad = low if low < 0 else high
                raise IndexError(f"position {bad} in position_ids is out of range for block_size {block_size} "
                                 f"(learned position embeddings)")
    elif doc_bounds is not None:
        from gptkern.ops.attention import _check_offsets_tensor, _offset_bounds

        cu, max_seqlen = doc_bounds
        _check_offsets_tensor(cu, "doc_bounds cu_seqlens", cu.device)
        if _reading_values_allowed(cu):
            bounds = _offset_bounds(cu, "doc_bounds cu_seqlens", shape[0] * shape[1], max_seqlen, "idx (flattened)")
            longest = max((end - start for start, end in bounds), default=0)
            if longest > block_size:
                raise ValueError(f"doc_bounds: a document of {longest} tokens is longer than block_size "
                                 f"{block_size} (learned position embeddings)")


def positions_in_documents(cu_seqlens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B, L) position of each token within its document (cu_seqlens over the flattened tokens)."""
    flat = torch.arange(shape[0] * shape[1], device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens.long(), flat, right=True) - 1
    return (flat - cu_seqlens.long()[doc]).view(shape)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, L) positions counted over real tokens (left padding starts at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def gpt2_init_(model: nn.Module, n_layer: int, std: float) -> None:
    """GPT-2 initialisation: N(0, std) weights, zero biases, unit norms, and residual output
    projections (``c_proj``) scaled by 1 / sqrt(2 * n_layer)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 1.0
            nn.init.normal_(module.weight, 0.0, std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.reset_parameters()


class GPTBody(nn.Module):
    """Embeddings, ``n_layer`` pre-norm blocks and the final norm: ids (B, L) -> hidden (B, L, n_embd).

    Submodules ``wte``, ``wpe`` (learned positions only), ``drop``, ``h`` and ``ln_f``, as in GPT-2.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        if c.pos_embedding == "learned":
            self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.n_kv_head, bias=c.bias, dropout=c.dropout, norm=c.norm,
                  norm_eps=c.norm_eps, activation=c.activation, mlp_hidden=c.mlp_hidden, window=c.window)
            for _ in range(c.n_layer))
        self.ln_f = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache=None,
                doc_bounds: Optional[tuple[torch.Tensor, int]] = None) -> torch.Tensor:
        """cache: a gptkern.generation KV cache, or None. The first call with a cache is the prompt
        (left-padded with ``attention_mask``); later calls decode new tokens after the cached ones."""
        c = self.config
        decoding = cache is not None and cache.filled
        if not decoding and not (self.training and idx.is_cuda):
            # decoded tokens come from the model's own logits, and a GPU training step must not wait
            # for the host: neither is checked (the checks read the ids and positions)
            check_token_ids(idx, c.vocab_size)
            if c.pos_embedding == "learned":
                check_learned_positions(position_ids, doc_bounds, idx.shape, c.block_size)
        if attention_mask is not None and attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask must have idx's shape {list(idx.shape)}, got "
                             f"{list(attention_mask.shape)}")
        if attention_mask is not None and doc_bounds is not None:  # (the document path reads no padding)
            raise ValueError("attention_mask and doc_bounds cannot be combined: packed documents have no "
                             "padding (give the real tokens' document bounds instead)")
        if decoding:  # new tokens follow each sequence's cached ones; no padding in the cache
            attention_mask = None
            position_ids = cache.seqlens.long()[:, None] + torch.arange(idx.shape[1], device=idx.device)
        elif position_ids is None and doc_bounds is not None:
            position_ids = positions_in_documents(doc_bounds[0], idx.shape)
        elif position_ids is None:
            position_ids = (positions_from_mask(attention_mask) if attention_mask is not None
                            else torch.arange(idx.shape[1], device=idx.device))
        x = self.wte(idx)
        rope = None
        if c.pos_embedding == "learned":
            if idx.shape[1] > c.block_size:
                raise ValueError(f"sequence length {idx.shape[1]} is longer than block_size {c.block_size}")
            x = x + self.wpe(position_ids)
        else:
            rope = rope_cos_sin(position_ids, c.head_dim, c.rope_base)
        x = self.drop(x)
        key_mask = None if attention_mask is None else attention_mask.bool()
        lengths = None if attention_mask is None else attention_mask.sum(-1, dtype=torch.int32)
        for i, block in enumerate(self.h):
            layer_cache = None if cache is None else cache.layer(i, lengths)
            if c.activation_checkpointing and self.training and torch.is_grad_enabled():
                # the recompute runs in the backward, maybe on autograd's own thread: with this
                # forward's backend (a `with gptkern.backend(...)` choice is per thread)
                extra = {} if torch.compiler.is_compiling() else \
                    {"context_fn": functools.partial(_recompute_contexts, _backend.get_backend())}
                x = checkpoint(block, x, rope, key_mask, layer_cache, doc_bounds, use_reentrant=False, **extra)
            else:
                x = block(x, rope, key_mask, layer_cache, doc_bounds)
        if cache is not None:
            if decoding:
                cache.advance(idx.shape[1])
            else:
                cache.seqlens.copy_(lengths if lengths is not None else idx.shape[1])
                cache.filled = True
        return self.ln_f(x)


class GPT(nn.Module):
    """A decoder-only language model: :class:`GPTBody` plus a (by default tied) output layer.

    Parameter names follow GPT-2 (``transformer.wte``, ``transformer.h.0.attn.c_attn``, ...).
    Build on the meta device (``with torch.device("meta"): GPT(cfg)``) and load with
    ``load_state_dict(sd, assign=True)`` for a fast start-up; a tied head is re-tied on load.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTBody(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self._tie()
        self.register_load_state_dict_pre_hook(self._fill_tied_head)
        self.register_load_state_dict_post_hook(retie_after_load)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._tie()  # (a model materialised with to_empty() has lost its tie)
        gpt2_init_(self, self.config.n_layer, self.config.init_std)

    def _tie(self) -> None:
        if self.config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight

    def _fill_tied_head(self, module, state_dict, prefix, *args) -> None:
        # a checkpoint of a tied model may store the shared matrix once, under wte
        head, wte = prefix + "lm_head.weight", prefix + "transformer.wte.weight"
        if self.config.tie_weights and head not in state_dict and wte in state_dict:
            state_dict[head] = state_dict[wte]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, shared tensors once; ``non_embedding`` leaves out the position table
        (the token table stays: it is also the tied output layer)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self.transformer, "wpe"):
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs (forward + backward) per token at ``seq_len`` (default block_size):
        6 per weight of every matmul, plus 12 * n_layer * n_head * head_dim * seq_len for the
        attention scores and weighted sum (the PaLM count, without the causal halving). With a
        sliding window (each query sees at most w keys, itself included, and the kernels read no
        others), seq_len is scaled by the fraction of the causal (query, key) pairs that stay
        visible, sum over i < T of min(i + 1, w) out of T (T + 1) / 2: seq_len at w >= T, less below."""
        c = self.config
        seq_len = c.block_size if seq_len is None else seq_len
        keys = seq_len
        window = getattr(c, "window", None)
        if window is not None and window < seq_len:
            visible = window * (window + 1) / 2 + (seq_len - window) * window
            keys = seq_len * visible / (seq_len * (seq_len + 1) / 2)
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * matmul + 12.0 * c.n_layer * c.n_head * c.head_dim * keys

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                doc_bounds: Optional[tuple[torch.Tensor, int]] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx (B, L) token ids; targets (B, L) ids or -100 (ignored), optional.

        attention_mask (B, L), 1 for real tokens and 0 for padding (left or right): padding is never
        attended to, and positions count real tokens only unless position_ids (B, L) are given.
        doc_bounds (cu_seqlens, max_seqlen) over the flattened B * L tokens (see
        ``gptkern.data.loader.document_bounds``): document masking, each document attending only
        to itself with positions restarting at 0, through varlen flash attention.
        Returns (logits (B, L, vocab_size), loss or None).
        """
        logits = self.lm_head(self.transformer(idx, attention_mask, position_ids, doc_bounds=doc_bounds))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @classmethod
    def from_hf(cls, model_or_dir) -> "GPT":
        """A GPT (in eval mode, as transformers loads models) from a transformers ``GPT2LMHeadModel``
        or a local Hugging Face directory."""
        from gptkern.models.hf import gpt_from_hf

        return gpt_from_hf(model_or_dir)

    def to_hf(self, save_directory=None):
        """This model as a transformers ``GPT2LMHeadModel``; with ``save_directory``, also saved there."""
        from gptkern.models.hf import gpt_to_hf

        return gpt_to_hf(self, save_directory)
