"""torch.autocast's casting rules, applied by gptkern's ops before they choose a backend: the
custom ops have no autocast kernels, so each op casts its inputs as its torch counterpart's
autocast kernel would."""
from __future__ import annotations

from typing import Optional

import torch

# torch's autocast dispatch key per device type. Where one of the ops below has an autocast kernel
# under it, torch runs the op in float32 there (its fp32 and fp32_set_opt_dtype rules): on CUDA for
# softmax, log_softmax and layer_norm, and rms_norm from torch 2.12; CPU autocast leaves them alone.
AUTOCAST_KEYS = {"cuda": "AutocastCUDA", "xpu": "AutocastXPU"}
_ATEN_OPS = {"softmax": "aten::softmax.int", "log_softmax": "aten::log_softmax.int",
             "layer_norm": "aten::layer_norm", "rms_norm": "aten::rms_norm"}


def _has_autocast_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_ATEN_OPS[op], key)
    except (AttributeError, RuntimeError):  # a torch without the query: its documented lists
        version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
        return key == "AutocastCUDA" and (op != "rms_norm" or version >= (2, 12))


# read once (a dict lookup at each call, which Dynamo traces)
FLOAT32_RULES = {(op, key): _has_autocast_kernel(op, key) for op in _ATEN_OPS
                 for key in ("AutocastCUDA", "AutocastCPU", "AutocastXPU")}


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


def runs_in_float32(op: str, first: torch.Tensor) -> bool:
    """Whether torch's autocast runs ``op`` (softmax, log_softmax, layer_norm or rms_norm) on
    ``first`` in float32: autocast on, an eligible first input, and a float32 rule for the op on
    that device (see AUTOCAST_KEYS)."""
    device = first.device.type
    key = AUTOCAST_KEYS.get(device)
    return key is not None and _enabled(device) and _eligible(first, device) and FLOAT32_RULES[(op, key)]


def float32(op: str, *tensors: Optional[torch.Tensor]) -> tuple:
    """torch's ``fp32`` rule (layer_norm, rms_norm): the eligible inputs in float32 when
    :func:`runs_in_float32` holds for ``op`` and the first."""
    if not runs_in_float32(op, tensors[0]):
        return tensors
    device = tensors[0].device.type
    return tuple(t.float() if _eligible(t, device) else t for t in tensors)
