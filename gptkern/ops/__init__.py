"""The functional API: drop-ins for ``torch.nn.functional``, served by the chosen backend."""
from gptkern import _backend
from gptkern.ops import cpu_attention as _cpu_attention, norms as _norms, softmax as _softmax_ops
from gptkern.ops.attention import flash_attn_varlen, scaled_dot_product_attention
from gptkern.ops.decode import decode_attention
from gptkern.ops.norms import layer_norm, rms_norm
from gptkern.ops.softmax import log_softmax, softmax

if _backend._extension() is not None:  # the C++ kernels of gptkern._C
    _softmax_ops.register_cpu_ops()
    _norms.register_cpu_ops()
    _cpu_attention.register_cpu_ops()

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm", "scaled_dot_product_attention", "flash_attn_varlen",
           "decode_attention"]
