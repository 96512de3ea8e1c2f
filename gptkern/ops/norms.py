"""layer_norm / rms_norm: the functional API, their Triton custom ops and autograd."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from gptkern import _backend
from gptkern.ops import _autocast, _autograd, _fx
from gptkern.ops._checks import (check_float_arg, check_norm_args, check_tensor, device_guard,
                                 normalized_shape_tuple, row_size_limits, triton_dtype_support)


def default_rms_eps(dtype: torch.dtype) -> float:
    """F.rms_norm's eps=None: the machine epsilon of the type it computes in (fp32 for fp16/bf16)."""
    return torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps


def _stats_shape(x: torch.Tensor, k: int):
    return x.shape[: x.dim() - k]


@torch.library.custom_op("gptkern::triton_norm", mutates_args=())
def triton_norm(x: torch.Tensor, k: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize over the last ``k`` dims. Returns (y, mean, rstd); mean/rstd are fp32 (*lead)."""
    from gptkern.kernels.norms import norm_fwd

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(_stats_shape(x, k), dtype=torch.float32, device=x.device)
    mean = torch.zeros_like(rstd) if is_rms else torch.empty_like(rstd)  # RMSNorm leaves it at 0
    n = math.prod(x.shape[x.dim() - k:])
    with device_guard(x):
        norm_fwd(x, n, weight, bias, eps, is_rms, y, mean, rstd)
    return y, mean, rstd


@triton_norm.register_fake
def _(x, k, weight, bias, eps, is_rms):
    stats = x.new_empty(_stats_shape(x, k), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("gptkern::triton_norm_backward", mutates_args=())
def triton_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, k: int,
                         weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         mean: torch.Tensor, rstd: torch.Tensor, is_rms: bool, need_dw: bool,
                         need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db); dw / db are empty (0,) tensors when not asked for."""
    from gptkern.kernels.norms import norm_bwd

    dx, dw, db = _grad_buffers(x, weight, bias, need_dw, need_db)
    n = math.prod(x.shape[x.dim() - k:])
    with device_guard(x):
        norm_bwd(grad_out, x, n, weight, mean, rstd, is_rms, need_dw, need_db, dx,
                 dw if need_dw else None, db if need_db else None)
    return dx, dw, db


def _grad_buffers(x, weight, bias, need_dw, need_db):
    """dx (x's shape), and dw / db, or empty (0,) tensors when not asked for."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(weight.shape if need_dw else (0,), dtype=weight.dtype if need_dw else x.dtype,
                     device=x.device)
    db = torch.empty(bias.shape if need_db else (0,), dtype=bias.dtype if need_db else x.dtype,
                     device=x.device)
    return dx, dw, db


@triton_norm_backward.register_fake
def _(grad_out, x, k, weight, bias, mean, rstd, is_rms, need_dw, need_db):
    return _grad_buffers(x, weight, bias, need_dw, need_db)


def _setup_context(ctx, inputs, output):
    x, k, weight, bias, eps, is_rms = inputs
    _, mean, rstd = output
    if x.is_inference():  # made under torch.inference_mode, which cannot be saved (the weight's grad needs it)
        x = x.clone()
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.k, ctx.eps, ctx.is_rms = k, eps, is_rms


def _double_backward_able(ctx, grad_y, x, weight, bias):
    """Gradients as a differentiable graph (create_graph=True): through torch's own norm."""
    shape = x.shape[x.dim() - ctx.k:]
    with torch.enable_grad():
        y = (F.rms_norm(x, shape, weight, ctx.eps) if ctx.is_rms
             else F.layer_norm(x, shape, weight, bias, ctx.eps))
    wanted = [t if t is not None and need else None
              for t, need in zip((x, weight, bias), (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]))]
    inputs = [t for t in wanted if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True))
    dx, dw, db = (next(grads) if t is not None else None for t in wanted)
    return dx, None, dw, db, None, None


def _make_backward(backward_op):
    """The autograd formula of a norm forward op whose kernel backward is ``backward_op``."""
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _double_backward_able(ctx, grad_y, x, weight, bias)
        need_dw = weight is not None and ctx.needs_input_grad[2]
        need_db = bias is not None and ctx.needs_input_grad[3]
        dx, dw, db = backward_op(grad_y, x, ctx.k, weight, bias, mean, rstd, ctx.is_rms, need_dw, need_db)
        return dx, None, dw if need_dw else None, db if need_db else None, None, None
    return backward


_autograd.register("gptkern::triton_norm",
                   _make_backward(lambda *args: _autograd.call(torch.ops.gptkern.triton_norm_backward, *args)),
                   _setup_context)


def register_cpu_ops() -> None:
    """Fake and autograd registrations of the C++ ops (gptkern._C's norm_fwd / norm_bwd, CPU and
    CUDA kernels)."""
    def fake_fwd(x, k, weight, bias, eps, is_rms):
        stats = x.new_empty(_stats_shape(x, k), dtype=torch.float32)
        return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)

    torch.library.register_fake("gptkern::norm_fwd")(fake_fwd)
    torch.library.register_fake("gptkern::norm_bwd")(
        lambda grad_out, x, k, weight, bias, mean, rstd, is_rms, need_dw, need_db:
        _grad_buffers(x, weight, bias, need_dw, need_db))
    _autograd.register("gptkern::norm_fwd", _make_backward(lambda *args: torch.ops.gptkern.norm_bwd(*args)),
                       _setup_context)


def _choose(op: str, input: torch.Tensor, n: int, *params: Optional[torch.Tensor],
            width: Optional[int] = None) -> str:
    """``n``: the normalized size (a row). ``width`` (layer_norm's n) steers auto's size rule;
    rms_norm's C++ kernel wins at every size (torch composes it of ops), so it passes none."""
    def kernel_support():  # the Triton, C++ and CUDA kernels take the same dtypes
        return triton_dtype_support(input.dtype, *(p.dtype for p in params if p is not None))

    def sized(backend: str):
        return lambda: kernel_support() or row_size_limits(backend, n, input.numel() // n if n else 0)

    auto_only = None
    if width is not None:
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, *params))
        auto_only = {"cpu": lambda: _backend.row_kernel_pays(op, input, width, grad)}
    return _backend.choose(op, input.device, {"triton": sized("triton"), "cpu": kernel_support,
                                              "cuda": sized("cuda"), "torch": lambda: None}, auto_only,
                           inputs=(input, *params))


def _norm_op(backend: str):
    return torch.ops.gptkern.triton_norm if backend == "triton" else torch.ops.gptkern.norm_fwd


ShapeArg = Union[Sequence[int], torch.Size]


def layer_norm(input: torch.Tensor, normalized_shape: ShapeArg, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm``: (x - mean) / sqrt(var + eps) * weight + bias over the last dims.

    Args:
        input: (*, *normalized_shape) floating-point tensor.
        normalized_shape: the trailing shape to normalize over.
        weight, bias: optional (*normalized_shape) tensors.
        eps: added to the biased variance.
    Returns:
        a tensor of ``input``'s shape and dtype (float32 under autocast where torch's is).
    """
    proxy = _fx.proxy_in(input, weight, bias)
    if proxy is not None:  # torch.fx.symbolic_trace
        return _fx.record(layer_norm, proxy, input, normalized_shape, weight, bias, eps)
    check_tensor(input, "input")
    input, weight, bias = _autocast.float32("layer_norm", input, weight, bias)  # torch's autocast on CUDA
    shape = normalized_shape_tuple(normalized_shape, "layer_norm")
    if not input.is_floating_point() and _backend.get_backend() in ("auto", "torch"):
        return F.layer_norm(input, shape, weight, bias, eps)  # torch's answer (its error) for other dtypes
    check_norm_args("layer_norm", input, shape, weight, bias)
    check_float_arg(eps, "eps", "layer_norm")
    name = _choose("layer_norm", input, math.prod(shape), weight, bias, width=math.prod(shape))
    if name != "torch":
        return _autograd.call(_norm_op(name), input, len(shape), weight, bias, float(eps), False)[0]
    return F.layer_norm(input, shape, weight, bias, eps)


def rms_norm(input: torch.Tensor, normalized_shape: ShapeArg, weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None) -> torch.Tensor:
    """``F.rms_norm``: x / sqrt(mean(x²) + eps) * weight over the last dims.

    Args:
        input: (*, *normalized_shape) floating-point tensor.
        normalized_shape: the trailing shape to normalize over.
        weight: optional (*normalized_shape) tensor.
        eps: added to the mean square; None means the machine epsilon of the compute type
            (``torch.finfo(torch.float32).eps`` for fp16/bf16/fp32 inputs), as in PyTorch.
    Returns:
        a tensor of ``input``'s shape and dtype (float32 under autocast where torch's is).
    """
    proxy = _fx.proxy_in(input, weight)
    if proxy is not None:  # torch.fx.symbolic_trace
        return _fx.record(rms_norm, proxy, input, normalized_shape, weight, eps)
    check_tensor(input, "input")
    input, weight = _autocast.float32("rms_norm", input, weight)  # torch's autocast on CUDA
    shape = normalized_shape_tuple(normalized_shape, "rms_norm")
    if not input.is_floating_point() and _backend.get_backend() in ("auto", "torch"):
        return F.rms_norm(input, shape, weight, eps)  # torch's answer for other dtypes (complex: a result)
    check_norm_args("rms_norm", input, shape, weight)
    if eps is not None:
        check_float_arg(eps, "eps", "rms_norm")
    name = _choose("rms_norm", input, math.prod(shape), weight)
    if name != "torch":
        eps_value = default_rms_eps(input.dtype) if eps is None else float(eps)
        return _autograd.call(_norm_op(name), input, len(shape), weight, None, eps_value, True)[0]
    return F.rms_norm(input, shape, weight, eps)
