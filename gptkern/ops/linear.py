"""linear: ``F.linear``, served on CPU for a few rows (batch-1 decoding) by the C++ GEMV kernel."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from gptkern import _backend
from gptkern.ops import _autograd, _fx

MAX_ROWS = 8  # flattened rows of input the kernel serves; above, F.linear (MKL GEMM) wins
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def register_cpu_ops() -> None:
    """Fake and autograd registrations of gptkern._C's linear_small_m (inference-only: the helper
    never sends it inputs that need grad; its backward is torch's, for completeness)."""
    torch.library.register_fake("gptkern::linear_small_m")(
        lambda x, weight, bias: x.new_empty((x.shape[0], weight.shape[0])))

    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        return (grad @ weight if need_x else None, grad.t() @ x if need_w else None,
                grad.sum(0) if need_b else None)

    _autograd.register("gptkern::linear_small_m", backward, setup_context)


def _kernel_serves(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the C++ kernel takes this call: the conditions apart from the backend choice."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)
            and isinstance(bias, (torch.Tensor, type(None)))):
        return False  # F.linear raises torch's TypeError naming the argument
    if input.device.type != "cpu" or weight.dim() != 2 or input.dim() < 1 or not weight.is_contiguous():
        return False
    if torch.is_autocast_enabled("cpu"):  # F.linear casts to the autocast dtype; the custom op would not
        return False
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    k = weight.shape[1]
    if input.shape[-1] != k or k == 0 or not 0 < input.numel() // k <= MAX_ROWS:
        return False
    if input.dtype not in KERNEL_DTYPES or weight.dtype != input.dtype or weight.device != input.device:
        return False
    return bias is None or (bias.dtype == input.dtype and bias.shape == (weight.shape[0],)
                            and bias.device == input.device)


def _use_kernel(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if _backend.get_backend() not in ("auto", "cpu") or not _kernel_serves(input, weight, bias):
        return False
    if _backend.get_backend() == "auto" and input.dtype != torch.float32:
        return False  # bf16 measured slower than F.linear once: only when the cpu backend is asked for
    ext = _backend._extension()  # never built here: a model's forward does not start a JIT build
    if ext is None or "cpu" not in getattr(ext, "devices", ()):
        return False
    return _backend.choose("linear", input.device, {"cpu": lambda: None, "torch": lambda: None},
                           inputs=(input, weight, bias)) == "cpu"


def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``: input (*, K) @ weight (N, K)^T + bias (N,) -> (*, N).

    On CPU, without grad and for at most 8 rows of input (all leading dims together), fp32 (bf16
    too under the ``cpu`` backend), contiguous weight, the ``cpu`` backend (and ``auto``) runs
    gptkern's GEMV kernel, which
    reads the weights at close to the machine's bandwidth on every core; otherwise F.linear.
    Under torch.compile, torch.jit.trace (whose check reruns without grad) or CPU autocast this is
    F.linear.
    """
    proxy = _fx.proxy_in(input, weight, bias)
    if proxy is not None:  # torch.fx.symbolic_trace
        return _fx.record(linear, proxy, input, weight, bias)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not _use_kernel(input, weight, bias):
        return F.linear(input, weight, bias)
    y = _autograd.call(torch.ops.gptkern.linear_small_m, input.reshape(-1, weight.shape[1]), weight, bias)
    return y.view(*input.shape[:-1], weight.shape[0])
