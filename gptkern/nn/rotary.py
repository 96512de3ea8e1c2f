"""Rotary position embeddings (RoPE), in the half-split layout of Llama / Hugging Face.

cos/sin are computed from the positions on every call (a few small ops, shared by all layers),
so a model built on the meta device needs no buffer to be re-materialised after loading.
"""
from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., L) integer -> cos, sin (..., L, head_dim) in ``dtype`` (angles in fp32)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                              / head_dim)  # (D/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., L, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., L, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D); cos/sin (L, D) or (B, L, D). Returns x rotated, in x's dtype."""
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)
