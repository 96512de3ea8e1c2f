"""Plain PyTorch compositions of each op, written out step by step.

They are the yardstick of the tests: with ``upcast=True`` they compute in float64
and return float64, independent of torch's own fused kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from gptkern.ops.norms import default_rms_eps


def _prepare(x: torch.Tensor, upcast: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if dtype is not None:
        x = x.to(dtype)
    return x.double() if upcast else x.float()


def softmax_ref(x: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None,
                upcast: bool = True, log: bool = False) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)) along ``dim`` (or its log)."""
    out_dtype = dtype if dtype is not None else x.dtype
    x = _prepare(x, upcast, dtype)
    if x.dim() == 0:
        x = x.reshape(1)
        squeeze = True
    else:
        squeeze = False
    z = x - x.amax(dim, keepdim=True)
    s = z.exp().sum(dim, keepdim=True)
    y = z - s.log() if log else z.exp() / s
    y = y.reshape(()) if squeeze else y
    return y if upcast else y.to(out_dtype)


def layer_norm_ref(x: torch.Tensor, normalized_shape: Sequence[int],
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5, upcast: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) * weight + bias over the trailing dims."""
    dims = tuple(range(-len(normalized_shape), 0))
    xf = _prepare(x, upcast)
    mean = xf.mean(dims, keepdim=True)
    var = ((xf - mean) ** 2).mean(dims, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _prepare(weight, upcast)
    if bias is not None:
        y = y + _prepare(bias, upcast)
    return y if upcast else y.to(x.dtype)


def rms_norm_ref(x: torch.Tensor, normalized_shape: Sequence[int],
                 weight: Optional[torch.Tensor] = None, eps: Optional[float] = None,
                 upcast: bool = True) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight over the trailing dims; eps=None: the machine
    epsilon of the compute type (fp32 for fp16/bf16), as F.rms_norm."""
    if eps is None:
        eps = default_rms_eps(x.dtype)
    dims = tuple(range(-len(normalized_shape), 0))
    xf = _prepare(x, upcast)
    y = xf / torch.sqrt((xf * xf).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * _prepare(weight, upcast)
    return y if upcast else y.to(x.dtype)
