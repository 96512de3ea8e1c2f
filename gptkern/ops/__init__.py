"""The functional API: drop-ins for ``torch.nn.functional``, served by the chosen backend."""
from gptkern import _backend
from gptkern.ops import cpu_attention as _cpu_attention, cuda_attention as _cuda_attention
from gptkern.ops import linear as _linear_ops, norms as _norms, softmax as _softmax_ops
from gptkern.ops.attention import flash_attn_varlen, scaled_dot_product_attention
from gptkern.ops.decode import decode_attention
from gptkern.ops.linear import linear
from gptkern.ops.norms import layer_norm, rms_norm
from gptkern.ops.softmax import log_softmax, softmax

# Fake and autograd registrations of the C++ ops (CPU and CUDA kernels of gptkern._C), made
# when the extension loads: now if it is built (importing it never builds it), else at the
# first use of the cpu backend (the JIT fallback).
_backend.on_extension_load(_softmax_ops.register_cpu_ops)
_backend.on_extension_load(_norms.register_cpu_ops)
_backend.on_extension_load(_linear_ops.register_cpu_ops)
_backend.on_extension_load(_cpu_attention.register_cpu_ops)
_backend.on_extension_load(_cuda_attention.register_cuda_ops)
_backend._extension()

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm", "scaled_dot_product_attention", "flash_attn_varlen",
           "decode_attention", "linear"]
