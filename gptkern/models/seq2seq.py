"""Seq2SeqTransformer: an encoder-decoder built from gptkern blocks, for translation."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from gptkern.models.gpt import check_token_ids, gpt2_init_, retie_after_load
from gptkern.nn.transformer import ACTIVATIONS, MLP, NORMS, Block, CausalSelfAttention, CrossAttention, make_norm
from gptkern.ops._checks import is_int


@dataclass
class Seq2SeqConfig:
    """Encoder-decoder shape. ``tgt_vocab_size=None`` shares the source vocabulary (and embedding)."""
    src_vocab_size: int = 8000
    tgt_vocab_size: Optional[int] = None
    max_len: int = 256
    n_encoder_layer: int = 3
    n_decoder_layer: int = 3
    n_head: int = 4
    n_embd: int = 256
    mlp_hidden: Optional[int] = None
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("src_vocab_size", "max_len", "n_encoder_layer", "n_decoder_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))  # numpy ints too, stored as plain ints (JSON)
        if self.tgt_vocab_size is not None:
            if not is_int(self.tgt_vocab_size) or self.tgt_vocab_size < 1:
                raise ValueError(f"tgt_vocab_size must be a positive int or None, got {self.tgt_vocab_size!r}")
            self.tgt_vocab_size = int(self.tgt_vocab_size)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation not in ACTIVATIONS or self.norm not in NORMS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} and norm one of {NORMS}, got "
                             f"{self.activation!r}, {self.norm!r}")
        if (not isinstance(self.dropout, numbers.Real) or isinstance(self.dropout, bool)
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)  # numpy numbers too, stored as a float (JSON)
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd
        if not is_int(self.mlp_hidden) or self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be a positive int or None, got {self.mlp_hidden!r}")
        self.mlp_hidden = int(self.mlp_hidden)
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be True or False, got {self.bias!r}")
        for name in ("norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))

    @property
    def shared_vocab(self) -> bool:
        return self.tgt_vocab_size is None

    @property
    def target_vocab_size(self) -> int:
        return self.src_vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention over the encoder, MLP."""

    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.ln_1 = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.attn = CausalSelfAttention(c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout)
        self.ln_2 = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.cross_attn = CrossAttention(c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout)
        self.ln_3 = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.mlp = MLP(c.n_embd, c.mlp_hidden, c.activation, bias=c.bias, dropout=c.dropout)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor], memory_mask: Optional[torch.Tensor],
                cache=None, memory_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache)
        x = x + self.cross_attn(self.ln_2(x), memory, memory_mask, memory_kv)
        return x + self.mlp(self.ln_3(x))


class Seq2SeqTransformer(nn.Module):
    """Encoder (bidirectional self-attention) and decoder (causal self-attention plus
    cross-attention through ``gptkern.ops.scaled_dot_product_attention``), learned positions,
    an output layer tied to the target embedding.

    ``forward(src, tgt_in, src_pad_mask)``: src (B, S) and tgt_in (B, T) token ids; src_pad_mask
    (B, S) bool, True at source padding (torch's key_padding_mask convention), or None.
    Returns logits (B, T, target vocabulary).
    """

    def __init__(self, config: Optional[Seq2SeqConfig] = None, **kwargs: Any):
        super().__init__()
        if config is not None and kwargs:  # a given config's derived fields (mlp_hidden) would not follow
            raise TypeError(f"Seq2SeqTransformer takes a config or keyword arguments, not both: got "
                            f"{sorted(kwargs)} beside the config (use dataclasses.replace(config, ...))")
        self.config = c = config if config is not None else Seq2SeqConfig(**kwargs)
        self.src_emb = nn.Embedding(c.src_vocab_size, c.n_embd)
        self.tgt_emb = self.src_emb if c.shared_vocab else nn.Embedding(c.target_vocab_size, c.n_embd)
        self.src_pos = nn.Embedding(c.max_len, c.n_embd)
        self.tgt_pos = nn.Embedding(c.max_len, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(
            Block(c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout, norm=c.norm, norm_eps=c.norm_eps,
                  activation=c.activation, mlp_hidden=c.mlp_hidden, causal=False)
            for _ in range(c.n_encoder_layer))
        self.ln_enc = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.n_decoder_layer))
        self.ln_dec = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.target_vocab_size, bias=False)
        gpt2_init_(self, c.n_encoder_layer + c.n_decoder_layer, c.init_std)
        self._tie()
        self.register_load_state_dict_post_hook(retie_after_load)  # after load_state_dict(assign=True)

    def _tie(self) -> None:
        self.lm_head.weight = self.tgt_emb.weight

    def _embed(self, ids: torch.Tensor, table: nn.Embedding, positions: nn.Embedding, name: str,
               offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_token_ids(ids, table.num_embeddings, name)
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"{name} length {ids.shape[1]} is longer than max_len {self.config.max_len}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        if offset is not None:  # (B,) tokens already decoded
            pos = offset.long()[:, None] + pos
        return self.drop(table(ids) + positions(pos))

    def encode(self, src: torch.Tensor, src_pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """src (B, S) -> memory (B, S, n_embd); computed once per source for decoding."""
        if src_pad_mask is not None and not isinstance(src_pad_mask, torch.Tensor):
            raise TypeError(f"src_pad_mask must be a bool tensor or None, got {type(src_pad_mask).__name__}")
        if src_pad_mask is not None and src_pad_mask.shape != src.shape:
            raise ValueError(f"src_pad_mask must have src's shape {list(src.shape)}, got {list(src_pad_mask.shape)}")
        x = self._embed(src, self.src_emb, self.src_pos, "src")
        keep = None if src_pad_mask is None else ~src_pad_mask.bool()
        for block in self.encoder:
            x = block(x, key_mask=keep)
        return self.ln_enc(x)

    def decode(self, tgt_in: torch.Tensor, memory: Optional[torch.Tensor],
               src_pad_mask: Optional[torch.Tensor] = None, *, cache=None,
               memory_kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None) -> torch.Tensor:
        """tgt_in (B, T), memory (B, S, n_embd) -> logits (B, T, target vocabulary).

        For step-by-step decoding: ``cache`` (a gptkern.generation KV cache for the decoder's
        self-attention; tgt_in then holds only the new tokens) and ``memory_kv``, each decoder
        layer's ``cross_attn.project_memory(memory)``, computed once.
        """
        if memory is not None and memory.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"the batch sizes of the source ({memory.shape[0]}) and tgt_in ({tgt_in.shape[0]}) "
                             f"must be equal")
        decoding = cache is not None and cache.filled
        x = self._embed(tgt_in, self.tgt_emb, self.tgt_pos, "tgt_in", cache.seqlens if decoding else None)
        keep = None if src_pad_mask is None else ~src_pad_mask.bool()
        for i, block in enumerate(self.decoder):
            x = block(x, memory, keep, None if cache is None else cache.layer(i),
                      None if memory_kv is None else memory_kv[i])
        if cache is not None:
            if decoding:
                cache.advance(tgt_in.shape[1])
            else:
                cache.seqlens.fill_(tgt_in.shape[1])
                cache.filled = True
        return self.lm_head(self.ln_dec(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                src_pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src, src_pad_mask), src_pad_mask)
