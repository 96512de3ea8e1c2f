"""What the CUDA attention kernels of gptkern._C take, and the CUDA kernel of
``gptkern::attention_bwd``: the Triton backward.

The CUDA kernels implement ``gptkern::attention_fwd`` (flash attention forward: fp16 / bf16,
head dims 64 and 128, causal or no mask, GQA) and ``gptkern::decode_attention`` (split-KV decode
over a static or paged cache). Their fakes and the autograd formula of attention_fwd, which
calls ``gptkern::attention_bwd``, are device-independent (cpu_attention.py); on CUDA tensors
attention_bwd runs the Triton backward kernels, which read the forward's log2-domain LSE. There
is no CUDA C++ attention backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from gptkern import _backend
from gptkern.ops import _autograd

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)
MAX_KEYS = 2**31 - 1 - 2 * 64  # the forward's int32 key-tile arithmetic steps up to 2 tiles of 64 past S


def cuda_attention_limits(q: torch.Tensor, v: torch.Tensor, masked: bool = False,
                          dropout_p: float = 0.0) -> Optional[str]:
    """Why the CUDA attention kernels cannot take these inputs, or None."""
    if q.dtype not in CUDA_DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16)"
    if q.shape[-1] != v.shape[-1] or q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"head dims {q.shape[-1]} (query, key) and {v.shape[-1]} (value) (supported: 64 or 128, equal)"
    if masked:
        return "an attn_mask (is_causal is supported)"
    if dropout_p > 0:
        return "dropout"
    if v.shape[-2] > MAX_KEYS:
        return f"{v.shape[-2]} keys (at most 2**31 - 129)"
    return None


def _attention_bwd_cuda(grad_out, q, k, v, out, lse, mask, causal, scale, mask_grad=False, dropout_p=0.0,
                        seed=None):
    """gptkern::attention_bwd on CUDA tensors: the Triton kernels (the same dropout stream)."""
    return _autograd.call(torch.ops.gptkern.triton_attention_backward, grad_out, q, k, v, out, lse, mask, causal,
                          scale, dropout_p, seed, mask_grad)


def register_cuda_ops() -> None:
    """With a CUDA build of gptkern._C and triton installed: Triton serves attention_bwd on CUDA."""
    ext = _backend._extension()
    if ext is not None and "cuda" in getattr(ext, "devices", ()) and _backend._has_triton():
        torch.library.register_kernel("gptkern::attention_bwd", "cuda")(_attention_bwd_cuda)
