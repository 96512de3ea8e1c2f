"""GPTConfig: the shape of a GPT, checked when built, with named presets."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

from gptkern.nn.transformer import ACTIVATIONS, NORMS
from gptkern.ops._checks import is_int

POSITIONS = ("learned", "rope")

_GPT2 = dict(vocab_size=50257, block_size=1024)
_LLAMA = dict(pos_embedding="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_weights=False)
PRESETS: dict[str, dict[str, Any]] = {
    # for tests and CPU demos: the trainer sets vocab_size from its tokenizer
    "gpt2-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=512),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, **_GPT2),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **_GPT2),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, **_GPT2),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, **_GPT2),  # 1558M
    # Llama-style: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head
    "llama-tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=352, block_size=256,
                       vocab_size=512, **_LLAMA),
    "llama-small": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, mlp_hidden=2048, block_size=2048,
                        vocab_size=32000, **_LLAMA),  # 125M
}


@dataclass
class GPTConfig:
    """A decoder-only Transformer. Defaults are GPT-2 small (124M).

    n_kv_head: key/value heads for grouped-query attention (None: n_head).
    mlp_hidden: MLP width (None: 4 * n_embd). activation: gelu_tanh (GPT-2's), gelu, relu, swiglu.
    pos_embedding: ``learned`` (absolute, at most block_size positions) or ``rope``.
    window: sliding-window attention size in tokens (None: full causal attention).
    """
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: Optional[int] = None
    mlp_hidden: Optional[int] = None
    activation: str = "gelu_tanh"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    bias: bool = True
    dropout: float = 0.0
    pos_embedding: str = "learned"
    rope_base: float = 10000.0
    window: Optional[int] = None
    tie_weights: bool = True
    activation_checkpointing: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None and is_int(self.n_embd):  # (a bad n_embd is named below)
            self.mlp_hidden = 4 * self.n_embd
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))  # numpy ints too, stored as plain ints (JSON)
        for name in ("bias", "tie_weights", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        # rope_base: RoPE's wavelengths grow as its powers; at or below 1 they do not (and fp32
        # powers of a tiny base underflow to 0, giving infinite frequencies)
        for name, low, strict in (("norm_eps", 0.0, False), ("init_std", 0.0, False), ("rope_base", 1.0, True)):
            value = getattr(self, name)
            if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not value < math.inf
                    or not (value > low if strict else value >= low)):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
            setattr(self, name, float(value))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        for name, allowed in (("activation", ACTIVATIONS), ("norm", NORMS), ("pos_embedding", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if (not isinstance(self.dropout, numbers.Real) or isinstance(self.dropout, bool)
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)  # numpy numbers too, stored as a float (JSON)
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.window is not None:
            if not is_int(self.window) or self.window < 1:
                raise ValueError(f"window must be a positive number of tokens or None, got {self.window}")
            self.window = int(self.window)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A preset (``gpt2-tiny``, ``gpt2-small``, ..., ``llama-tiny``, ``llama-small``) with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return build_dataclass(cls, {**PRESETS[name], **overrides}, "GPTConfig fields")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        return build_dataclass(cls, values, "GPTConfig fields")


def build_dataclass(cls, values: dict[str, Any], what: str):
    """``cls(**values)``, naming the unknown keys (and the known ones) instead of a TypeError."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return cls(**values)
