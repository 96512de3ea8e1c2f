"""Input checks shared by the ops: the exception types PyTorch raises, naming the argument."""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
from typing import Optional, Sequence, Union

import torch

# Input dtypes the Triton kernels take (they compute in fp32).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_dtype_support(*dtypes: torch.dtype) -> Optional[str]:
    """None when the Triton kernels take every dtype given, else the reason they don't."""
    bad = [d for d in dtypes if d not in TRITON_DTYPES]
    return f"dtype {bad[0]} (supported: float16, bfloat16, float32)" if bad else None


def row_size_limits(backend: str, n: int, rows: int) -> Optional[str]:
    """Row sizes a row kernel (softmax, norms) cannot take on ``backend``, or None: the Triton row
    loop counts in int32 by steps of 4096 and launches a program per row on its grid's first axis
    (at most 2**31 - 1); the CUDA kernels take rows of fewer than 2**30 elements."""
    if backend == "triton" and n > 2**31 - 1 - 4096:
        return f"rows of {n} elements (the Triton row loop's int32 counter: at most {2**31 - 1 - 4096})"
    if backend == "triton" and rows >= 2**31:
        return f"{rows} rows (a program per row: at most 2**31 - 1)"
    if backend == "cuda" and n >= 2**30:
        return f"rows of {n} elements (the CUDA kernels: fewer than 2**30)"
    return None


def checks_read_values(t: torch.Tensor) -> bool:
    """Whether argument checks may read ``t``'s values on the host: on CPU tensors only, and not
    while torch.compile traces. On a GPU such a read would be a host sync per call, and is not
    permitted while a CUDA graph captures (the kernels trust the values, as flash-attn's do).
    Call it as ``_checks.checks_read_values``: tests/cuda_graph_emu.py patches it here."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def as_int32(t: torch.Tensor) -> torch.Tensor:
    """An int32/int64 index tensor as int32 for the kernels, int64 values outside int32's range
    made -1 (which the kernels' own checks refuse) rather than wrapped into a valid-looking index:
    under torch.compile the Python value checks do not run."""
    if t.dtype == torch.int32:
        return t
    return torch.where((t >= 0) & (t <= 2**31 - 1), t, -1).to(torch.int32)


def kernel_seed(seed: Optional[torch.Tensor], dropout_p: float, device: torch.device, op: str
                ) -> Optional[torch.Tensor]:
    """A dropout seed as the Triton kernels read it: (1,) int64 on ``device`` (copied there if
    given elsewhere: the kernels read it on the GPU); None without dropout."""
    if dropout_p == 0:
        return None
    if seed is None or seed.numel() != 1 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
        raise RuntimeError(f"gptkern::{op}: dropout_p > 0 needs seed, a one-element integer tensor")
    return seed.reshape(1).to(device=device, dtype=torch.int64)


def check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    return t


def attention_scale(scale: Optional[float], head_dim: int) -> float:
    """``scale``, or 1 / sqrt(head_dim) (any finite value for head dim 0, whose scores are all 0)."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def check_float_arg(value: object, name: str, op: str) -> None:
    """A float argument (eps, scale, dropout_p): a real number or a 0-d tensor, as torch's parser takes."""
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return
    raise TypeError(f"{op}(): argument '{name}' must be float, not {type(value).__name__}")


def is_int(value: object) -> bool:
    """An integer (int, numpy integers) and not a bool, which isinstance(int) lets through."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_arg(value: object, name: str, op: str):
    """An int argument as torch's parser takes it: int, numpy integers, a 0-d integer tensor (as
    an int), or a SymInt under torch.compile (as is); not bool. TypeError naming it otherwise."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        return int(value)
    if is_int(value):
        return int(value)
    raise TypeError(f"{op}(): argument '{name}' must be int, not {type(value).__name__}")


def check_bool_arg(value: object, name: str, op: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}(): argument '{name}' must be bool, not {type(value).__name__}")


def check_floating(t: torch.Tensor, name: str, op: str) -> None:
    if not t.is_floating_point():
        raise NotImplementedError(f'"{op}" not implemented for {t.dtype}: {name} must be a '
                                  f"floating-point tensor")


def check_dtype_arg(dtype: Optional[torch.dtype], op: str) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{op}(): argument 'dtype' must be torch.dtype, got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise NotImplementedError(f'"{op}" not implemented for {dtype}: dtype must be a '
                                  f"floating-point dtype")


def wrap_dim(dim: int, ndim: int, op: str = "softmax") -> int:
    """``dim`` in [0, max(ndim, 1)), with torch's IndexError otherwise. Integers as torch's parser
    takes them: int, numpy integers, 0-d integer tensors; not bool."""
    dim = int_arg(dim, "dim", op)
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], "
                         f"but got {dim}): argument 'dim'")
    return dim % rank


def check_same_device(input: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least "
                               f"two devices, {input.device} (input) and {t.device} ({name})")


def _as_int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError
    return operator.index(value)  # int, numpy integers, integer 0-d tensors


def normalized_shape_tuple(normalized_shape: object, op: str) -> tuple[int, ...]:
    """A sequence of ints (a tuple, list or torch.Size), as F.layer_norm / F.rms_norm take it: a bare
    int is refused there (nn.LayerNorm takes one; its module passes a tuple)."""
    if not isinstance(normalized_shape, (tuple, list, torch.Size)):
        raise TypeError(f"{op}(): argument 'normalized_shape' (position 2) must be tuple of ints, not "
                        f"{type(normalized_shape).__name__}")
    try:
        return tuple(_as_int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(f"{op}(): argument 'normalized_shape' (position 2) must be tuple of ints, "
                        f"got {normalized_shape!r}") from None


def check_norm_args(op: str, input: torch.Tensor, normalized_shape: Sequence[int],
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None) -> None:
    check_floating(input, "input", op)
    shape = tuple(normalized_shape)
    if len(shape) == 0:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing "
                           "at least one element, but got normalized_shape = []")
    if op == "rms_norm" and input.dim() < len(shape):
        raise ValueError(f"Input tensor must have at least {len(shape)} dimensions, but got {input.dim()} "
                         f"(normalized_shape={list(shape)})")
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size {list(input.shape)}")
    params = {name: t for name, t in (("weight", weight), ("bias", bias)) if t is not None}
    for name, t in params.items():
        check_tensor(t, name)
        if tuple(t.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got "
                               f"{name} of shape {list(t.shape)} and normalized_shape = {list(shape)}")
    if op == "layer_norm":  # rms_norm, a composite in torch, promotes any weight dtype
        check_layer_norm_param_dtypes(input, params)
    check_same_device(input, weight=weight, bias=bias)


def check_layer_norm_param_dtypes(input: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    """F.layer_norm's rule: the parameters share the input's dtype, or the input is fp16/bf16
    and every parameter is fp32."""
    dtypes = {t.dtype for t in params.values()}
    if not dtypes or dtypes == {input.dtype}:
        return
    if input.dtype in (torch.float16, torch.bfloat16) and dtypes == {torch.float32}:
        return
    got = ", ".join(f"{name} {t.dtype}" for name, t in params.items())
    raise RuntimeError(f"layer_norm: mixed dtypes: input is {input.dtype} and {got}; weight and bias must "
                       f"have the input's dtype, or be float32 for a float16/bfloat16 input")


def device_guard(t: Union[torch.Tensor, torch.device]):
    """Make ``t``'s CUDA device (or ``t`` itself) current while Triton launches on it."""
    device = t if isinstance(t, torch.device) else t.device
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()
