"""Transformer building blocks over gptkern.ops: self- and cross-attention, MLP, pre-norm Block."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gptkern import ops
from gptkern.nn.linear import Linear
from gptkern.nn.normalization import LayerNorm, RMSNorm
from gptkern.nn.rotary import apply_rotary
from gptkern.ops.attention import sliding_window_attention, varlen_visibility

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def check_token_mask(mask: torch.Tensor, name: str, b: int, s: int) -> None:
    """A (B, S) bool mask, True for real tokens (0/1 integers or floats would be read otherwise)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a (B, S) bool tensor (True = real token), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}: use .bool()")
    if tuple(mask.shape) != (b, s):
        raise ValueError(f"{name} must have shape (B, S) = ({b}, {s}), got {list(mask.shape)}")


def self_attention_mask(l: int, s: int, causal: bool, window: Optional[int],
                        key_mask: Optional[torch.Tensor], device: torch.device
                        ) -> tuple[Optional[torch.Tensor], bool]:
    """The (mask, is_causal) pair for SDPA. Queries are the last ``l`` of ``s`` positions.

    window: each query sees the keys less than ``window`` positions away, itself included: at most
        ``window`` keys when causal, ``2 * window - 1`` otherwise (None: unbounded).
    key_mask: (B, S) bool, True for real tokens; a query always sees itself, so no row is empty.
    Returns a bool mask (True = attend) broadcastable to (B, 1, L, S), or None with is_causal.
    """
    if key_mask is None and window is None and (l == s or not causal):
        return None, causal
    reach = window - 1 if window else -1  # keys visible on each side of the query
    visible = varlen_visibility(l, s, causal, (reach, -1 if causal else reach), device)
    mask = visible if visible is not None else torch.ones(l, s, dtype=torch.bool, device=device)  # (L, S)
    if key_mask is not None:
        itself = torch.arange(l, device=device)[:, None] + (s - l) == torch.arange(s, device=device)
        mask = mask & (key_mask[:, None, None, :] | itself)  # (B, 1, L, S)
    return mask, False


class CausalSelfAttention(nn.Module):
    """Self-attention with one fused QKV projection.

    Args:
        n_embd: model width; n_head: query heads; n_kv_head: key/value heads (GQA, default n_head).
        head_dim: per-head width (default n_embd // n_head).
        bias: biases on the projections. dropout: on the attention weights and the output.
        causal: False gives bidirectional attention (an encoder).
        window: sliding-window size: each query sees the keys less than ``window`` positions away
            (before it when causal: at most ``window`` keys; on both sides otherwise, 2 * window - 1).
    Forward: x (B, L, n_embd), rope (cos, sin) each (L, head_dim) or (B, L, head_dim) or None,
    key_mask (B, L) bool (True = real token) or None -> (B, L, n_embd).
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, head_dim: Optional[int] = None,
                 bias: bool = True, dropout: float = 0.0, causal: bool = True, window: Optional[int] = None):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        head_dim = head_dim or n_embd // n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be divisible by n_kv_head ({n_kv_head})")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of tokens or None, got {window}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.dropout, self.causal, self.window = dropout, causal, window
        self.c_attn = Linear(n_embd, (n_head + 2 * n_kv_head) * head_dim, bias=bias)
        self.c_proj = Linear(n_head * head_dim, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                key_mask: Optional[torch.Tensor] = None, cache=None,
                doc_bounds: Optional[tuple[torch.Tensor, int]] = None) -> torch.Tensor:
        """cache: a ``LayerCache`` (gptkern.generation) or None. While decoding, attention runs over
        the cached keys; on the prompt, the keys and values are also written to the cache.
        doc_bounds: (cu_seqlens int32 over the B * L flattened tokens, max_seqlen): attention stays
        inside each document (``gptkern.ops.flash_attn_varlen``)."""
        b, l, _ = x.shape
        if key_mask is not None:
            check_token_mask(key_mask, "key_mask", b, l)
        h, hkv, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split((h * d, hkv * d, hkv * d), dim=-1)
        q = q.view(b, l, h, d).transpose(1, 2)  # (B, H, L, D)
        k = k.view(b, l, hkv, d).transpose(1, 2)  # (B, Hkv, L, D)
        v = v.view(b, l, hkv, d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if doc_bounds is not None:
            y = self._attend_documents(q, k, v, *doc_bounds)
        elif cache is not None and cache.decoding:
            y = cache.decode(q, k, v, self.window)
        else:
            dropout_p = self.dropout if self.training else 0.0
            if self.window is not None and key_mask is None:  # a band: no mask, tiles outside it skipped
                reach = self.window - 1
                y = sliding_window_attention(q, k, v, (reach, -1 if self.causal else reach), self.causal, dropout_p)
            else:
                mask, is_causal = self_attention_mask(l, l, self.causal, self.window, key_mask, x.device)
                y = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                     dropout_p=dropout_p, enable_gqa=hkv != h)
            if cache is not None:
                cache.write_prompt(k, v)
        y = y.transpose(1, 2).reshape(b, l, h * d)
        return self.resid_dropout(self.c_proj(y))

    def _attend_documents(self, q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        b, h, l, d = q.shape
        q, k, v = (t.transpose(1, 2).reshape(b * l, t.shape[1], d) for t in (q, k, v))  # (B*L, heads, D)
        reach = self.window - 1 if self.window else -1
        if torch.compiler.is_compiling():  # an upper bound that does not change per batch: one graph, not one each
            max_seqlen = l
        y = ops.flash_attn_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p=self.dropout if self.training else 0.0, causal=self.causal,
                                  window_size=(reach, -1 if self.causal else reach))
        return y.view(b, l, h, d).transpose(1, 2)  # (B, H, L, D)


class CrossAttention(nn.Module):
    """Attention of x (B, L, n_embd) over memory (B, S, n_embd), e.g. a decoder over its encoder.

    memory_mask: (B, S) bool, True for real source tokens, or None.
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head, self.dropout = n_head, dropout
        self.q_proj = Linear(n_embd, n_embd, bias=bias)
        self.kv_proj = Linear(n_embd, 2 * n_embd, bias=bias)
        self.c_proj = Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, n_embd) -> keys and values (B, H, S, D): computed once when decoding."""
        b, _, e = memory.shape
        h = self.n_head
        k, v = (t.view(b, -1, h, e // h).transpose(1, 2) for t in self.kv_proj(memory).chunk(2, dim=-1))
        return k, v

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor],
                memory_mask: Optional[torch.Tensor] = None,
                memory_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """memory_kv: the output of :meth:`project_memory`, which then replaces ``memory``."""
        b, l, e = x.shape
        h = self.n_head
        q = self.q_proj(x).view(b, l, h, e // h).transpose(1, 2)  # (B, H, L, D)
        k, v = memory_kv if memory_kv is not None else self.project_memory(memory)
        if memory_mask is not None:
            check_token_mask(memory_mask, "memory_mask", b, k.shape[-2])
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, S)
        y = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, l, e)))


class MLP(nn.Module):
    """Feed-forward: c_fc -> activation -> c_proj. ``swiglu`` fuses gate and up into c_fc."""

    def __init__(self, n_embd: int, hidden: int, activation: str = "gelu_tanh", bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.c_fc = Linear(n_embd, 2 * hidden if activation == "swiglu" else hidden, bias=bias)
        self.c_proj = Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, bias: bool = True,
                 dropout: float = 0.0, norm: str = "layernorm", norm_eps: float = 1e-5,
                 activation: str = "gelu_tanh", mlp_hidden: Optional[int] = None, causal: bool = True,
                 window: Optional[int] = None):
        super().__init__()
        self.ln_1 = make_norm(norm, n_embd, norm_eps, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, n_kv_head, bias=bias, dropout=dropout, causal=causal,
                                        window=window)
        self.ln_2 = make_norm(norm, n_embd, norm_eps, bias)
        self.mlp = MLP(n_embd, mlp_hidden or 4 * n_embd, activation, bias=bias, dropout=dropout)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                key_mask: Optional[torch.Tensor] = None, cache=None,
                doc_bounds: Optional[tuple[torch.Tensor, int]] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, key_mask, cache, doc_bounds)
        return x + self.mlp(self.ln_2(x))
