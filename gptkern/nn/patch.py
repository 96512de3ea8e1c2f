"""gptkern.nn.patch: swap torch.nn modules for gptkern's inside any model, in place."""
from __future__ import annotations

import torch

from gptkern.nn.activation import Softmax
from gptkern.nn.attention import MultiheadAttention
from gptkern.nn.normalization import LayerNorm, RMSNorm

# Exact torch classes only: a subclass may override forward and is left alone.
_REPLACEMENTS = {
    torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.Softmax: Softmax,
}


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every torch.nn MultiheadAttention, LayerNorm, RMSNorm and Softmax in ``model`` by the
    gptkern module, in place, and return ``model``.

    Each gptkern module subclasses the torch one and adds no state, so the swap changes the
    module's class only: parameters, buffers, hooks and ``state_dict`` keys stay the same
    objects (shared, not copied), and outputs stay equal within the dtype's tolerance.
    Note: in eval mode with no grad, ``torch.nn.TransformerEncoderLayer`` may take PyTorch's
    fused "fast path", which reads the weights directly and bypasses every submodule.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model
