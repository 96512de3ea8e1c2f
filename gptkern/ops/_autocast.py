"""torch.autocast's casting rules, applied by gptkern's ops before they choose a backend: the
custom ops have no autocast kernels, so each op casts its inputs as its torch counterpart's
autocast kernel would."""
from __future__ import annotations

from typing import Optional

import torch

# Where torch's autocast runs softmax, log_softmax, layer_norm and rms_norm in float32 (its CPU
# autocast leaves them in the input's dtype).
FLOAT32_DEVICES = ("cuda",)


def _enabled(device_type: str) -> bool:
    # meta tensors: autocast has no meta device (and Dynamo cannot trace torch.amp.is_autocast_available)
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _eligible(t: object, device_type: str) -> bool:
    """As torch's autocast: a floating-point tensor of the autocast device, float64 excluded
    (anything else passes through, for the op's own checks)."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def lower_precision(*tensors: Optional[torch.Tensor]) -> tuple:
    """torch's ``lower_precision_fp`` rule (SDPA): under autocast, the eligible inputs in the
    autocast dtype; the first tensor gives the device."""
    device = tensors[0].device.type
    if not _enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if _eligible(t, device) else t for t in tensors)


def runs_in_float32(first: torch.Tensor) -> bool:
    """Whether autocast runs softmax / normalization on ``first`` in float32 (its ``fp32`` and
    ``fp32_set_opt_dtype`` rules: on CUDA, for an eligible first input)."""
    device = first.device.type
    return device in FLOAT32_DEVICES and _enabled(device) and _eligible(first, device)


def float32(*tensors: Optional[torch.Tensor]) -> tuple:
    """torch's ``fp32`` rule (layer_norm, rms_norm): the eligible inputs in float32 when
    :func:`runs_in_float32` holds for the first."""
    if not runs_in_float32(tensors[0]):
        return tensors
    device = tensors[0].device.type
    return tuple(t.float() if _eligible(t, device) else t for t in tensors)
