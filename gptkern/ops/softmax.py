"""softmax / log_softmax: the functional API, its Triton custom ops and autograd."""
from __future__ import annotations

from typing import Optional

import torch

from gptkern import _backend
from gptkern.ops import _autocast, _autograd, _fx
from gptkern.ops._checks import (check_dtype_arg, check_floating, check_tensor, device_guard,
                                 row_size_limits, triton_dtype_support, wrap_dim)


@torch.library.custom_op("gptkern::triton_softmax", mutates_args=())
def triton_softmax(x: torch.Tensor, dim: int, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    from gptkern.kernels.softmax import softmax_fwd

    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    with device_guard(x):
        return softmax_fwd(x, dim, log, out)


@triton_softmax.register_fake
def _(x, dim, log, out_dtype):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


@torch.library.custom_op("gptkern::triton_softmax_backward", mutates_args=())
def triton_softmax_backward(grad_out: torch.Tensor, out: torch.Tensor, dim: int,
                            log: bool) -> torch.Tensor:
    from gptkern.kernels.softmax import softmax_bwd

    grad_in = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    with device_guard(out):
        return softmax_bwd(grad_out, out, dim, log, grad_in)


@triton_softmax_backward.register_fake
def _(grad_out, out, dim, log):
    return torch.empty(out.shape, dtype=out.dtype, device=out.device)


def _setup_context(ctx, inputs, output):
    x, dim, log, _ = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.log, ctx.in_dtype = dim, log, x.dtype


def _make_backward(backward_op):
    """The autograd formula of a softmax forward op whose kernel backward is ``backward_op``."""
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        grad = grad.to(out.dtype)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable composition
            total = grad.sum(ctx.dim, keepdim=True) if ctx.log else (grad * out).sum(ctx.dim, keepdim=True)
            grad_in = grad - out.exp() * total if ctx.log else out * (grad - total)
        else:
            grad_in = backward_op(grad, out, ctx.dim, ctx.log)
        return grad_in.to(ctx.in_dtype), None, None, None
    return backward


_autograd.register("gptkern::triton_softmax",
                   _make_backward(lambda *args: _autograd.call(torch.ops.gptkern.triton_softmax_backward, *args)),
                   _setup_context)


def register_cpu_ops() -> None:
    """Fake and autograd registrations of the C++ ops (gptkern._C's softmax_fwd / softmax_bwd,
    CPU and CUDA kernels)."""
    torch.library.register_fake("gptkern::softmax_fwd")(
        lambda x, dim, log, out_dtype: torch.empty(x.shape, dtype=out_dtype, device=x.device))
    torch.library.register_fake("gptkern::softmax_bwd")(
        lambda grad_out, out, dim, log: torch.empty(out.shape, dtype=out.dtype, device=out.device))
    _autograd.register("gptkern::softmax_fwd", _make_backward(lambda *args: torch.ops.gptkern.softmax_bwd(*args)),
                       _setup_context)


def _softmax(op: str, input: torch.Tensor, dim: int, dtype: Optional[torch.dtype]) -> torch.Tensor:
    check_tensor(input, "input")
    dim = wrap_dim(dim, input.dim(), op)  # (first, as torch: a bad dim is an IndexError whatever the dtypes)
    check_dtype_arg(dtype, op)
    if dtype is None and _autocast.runs_in_float32(op, input):  # torch's autocast on CUDA: a float32 result
        dtype = torch.float32
    if dtype is None and not input.is_floating_point():
        if _backend.get_backend() in ("auto", "torch"):  # torch's answer (an empty result, or its error)
            return (torch.log_softmax if op == "log_softmax" else torch.softmax)(input, dim)
        check_floating(input, "input", op)
    log = op == "log_softmax"
    out_dtype = dtype if dtype is not None else input.dtype
    # torch casts the input to ``dtype`` first; the kernel upcasts fp16/bf16 to fp32 itself.
    upcast_in_kernel = input.dtype in (torch.float16, torch.bfloat16) and out_dtype == torch.float32
    cast_first = dtype is not None and dtype != input.dtype and not upcast_in_kernel
    kernel_in_dtype = out_dtype if cast_first else input.dtype

    def kernel_support():  # the Triton, C++ and CUDA kernels take the same dtypes
        return triton_dtype_support(kernel_in_dtype, out_dtype)

    width, grad = input.shape[dim] if input.dim() else 1, torch.is_grad_enabled() and input.requires_grad
    rows = input.numel() // width if width else 0

    def sized(backend: str):
        return lambda: kernel_support() or row_size_limits(backend, width, rows)

    name = _backend.choose(op, input.device, {"triton": sized("triton"), "cpu": kernel_support,
                                              "cuda": sized("cuda"), "torch": lambda: None},
                           auto_only={"cpu": lambda: _strided_dim(input, dim) or
                                      _backend.row_kernel_pays(op, input, width, grad)},
                           inputs=(input,))
    if name != "torch":
        x = input.to(out_dtype) if cast_first else input
        fwd = torch.ops.gptkern.triton_softmax if name == "triton" else torch.ops.gptkern.softmax_fwd
        return _autograd.call(fwd, x, dim, log, out_dtype)
    fn = torch.log_softmax if log else torch.softmax
    return fn(input, dim, dtype=dtype)


def _strided_dim(input: torch.Tensor, dim: int) -> Optional[str]:
    """Under auto: the C++ op copies a reduction over a strided dim into rows first (0.2-0.8x)."""
    return "a reduction over a strided dim" if input.dim() and input.stride(dim) != 1 else None


def softmax(input: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.softmax``: exp(x) / sum(exp(x)) along ``dim``, computed in fp32.

    Args:
        input: floating-point tensor of any shape.
        dim: the dimension to normalize over.
        dtype: if given, ``input`` is cast to it first and the output has this dtype.
    Returns:
        a tensor of ``input``'s shape.
    """
    if isinstance(input, _fx.Proxy):  # torch.fx.symbolic_trace
        return _fx.record(softmax, input, input, dim, dtype)
    return _softmax("softmax", input, dim, dtype)


def log_softmax(input: torch.Tensor, dim: int = -1,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.log_softmax``: x - logsumexp(x) along ``dim``; arguments as in :func:`softmax`."""
    if isinstance(input, _fx.Proxy):
        return _fx.record(log_softmax, input, input, dim, dtype)
    return _softmax("log_softmax", input, dim, dtype)
