"""Hugging Face attention interface: ``attn_implementation="gptkern"`` for transformers models.

Importing this module (or calling :func:`register`) registers ``"gptkern"`` with transformers'
``AttentionInterface`` and its mask interface, so GPT-2, Llama, Mistral, Qwen2 and other models
that dispatch attention through ``ALL_ATTENTION_FUNCTIONS`` run it on
``gptkern.ops.scaled_dot_product_attention``. transformers stays optional: without it, import
works and ``register`` raises ImportError.
"""
from __future__ import annotations

from typing import Optional

import torch

from gptkern import ops

NAME = "gptkern"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs
                      ) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, H, L, D), key/value (B, Hkv, S, D), mask a bool
    (True = attend) or additive (B or 1, 1 or H, L, S) tensor or None. Returns (B, L, H, Dv), None."""
    # attention sinks come as sinks or as s_aux (GPT-OSS and others)
    unsupported = [name for name in ("softcap", "position_bias", "sinks", "s_aux") if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"gptkern attention does not support {', '.join(unsupported)} (softcap, "
                                  f"position biases or attention sinks); use attn_implementation='eager'")
    l, s = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # the causal hint only holds for a prompt (L > 1) with no explicit mask, as in transformers' sdpa
    causal = bool(causal and attention_mask is None and l > 1)
    if causal and s > l:
        # gptkern's masks are None only where the mask had as many queries as keys (causal_mask):
        # these queries are its last L (Gemma-4 drops the others), query i sees keys up to S - L + i
        attention_mask = torch.ones(l, s, dtype=torch.bool, device=query.device).tril(s - l)
        causal = False
    # a float mask stays in its dtype, as sdpa takes it: fp32's min in an fp16 model must not
    # become -inf (a fully masked row would give 0, not the average) nor a large bias overflow
    out = ops.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=causal, scale=scaling,
                                           enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def causal_mask(*args, **kwargs) -> Optional[torch.Tensor]:
    """transformers' sdpa mask (boolean, True = attend), None (the causal hint) only where there are
    as many queries as keys, or one query. sdpa's also gives None to a prefill into an empty static
    cache (keys past the prompt unused), which relies on torch's top-left causal alignment; but a
    model that then keeps only its last queries (Gemma-4 does so unless the implementation is
    named "sdpa") needs the bottom-right one. Here that case gets the mask written out."""
    import inspect

    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if mask is not None:
        return mask
    bound = inspect.signature(sdpa_mask).bind(*args, **kwargs).arguments
    q_length = bound["q_length"] if "q_length" in bound else len(bound["cache_position"])  # (transformers 4)
    if q_length in (1, bound["kv_length"]):
        return None
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


def register() -> None:
    """Register ``"gptkern"`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, causal_mask)  # sdpa's boolean masks


try:
    register()
except ImportError:  # transformers is optional
    pass
