"""Next-token choice from logits: repetition penalty, temperature, top-k, top-p, greedy."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from gptkern.ops._checks import int_arg


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float],
                        repetition_penalty: float) -> Optional[int]:
    """Checks the sampling arguments; returns top_k as an int (or None)."""
    for name, value, optional in (("temperature", temperature, False), ("top_p", top_p, True),
                                  ("repetition_penalty", repetition_penalty, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) or (
                isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex()
                and value.dtype != torch.bool)):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if top_k is not None:  # an int, numpy integer or 0-d integer tensor
        top_k = int_arg(top_k, "top_k", "generate")
    # written as "not (valid)" so that NaN is refused too
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off, as in transformers) or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    return top_k


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float,
                             seen_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits (B, V); seen (B, T) ids already in each sequence: their logits are divided by the
    penalty when positive and multiplied when negative (the CTRL rule, as transformers does).
    seen_valid (B, T) bool, if given: False at padding, whose ids are not penalized."""
    if seen_valid is not None:  # padding points at an extra column, dropped after
        seen = seen.masked_fill(~seen_valid, logits.shape[-1])
        logits = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], 1)
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    out = logits.scatter(1, seen, scores)
    return out[:, :-1] if seen_valid is not None else out


def filter_top_k_top_p(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """logits (B, V) with the tokens outside the top k (0 or None: no limit), or outside the
    smallest set whose probability reaches top_p, set to -inf (the most likely token always stays).
    top_p walks the tokens from the least likely up, as transformers does, so that tied tokens
    at the cut go the same way and seeded draws agree with it."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        tail = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # the least likely tokens, mass <= 1 - top_p
        tail[:, -1] = False  # the most likely token stays
        logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, do_sample: bool, temperature: float,
                top_k: Optional[int], top_p: Optional[float], repetition_penalty: float,
                generator: Optional[torch.Generator], seen_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits (B, V) of the last position -> (B,) chosen ids; seen (B, T) the sequences so far,
    seen_valid (B, T) False at their padding (not penalized)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty, seen_valid)
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
