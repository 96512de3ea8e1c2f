"""The functional API: drop-ins for ``torch.nn.functional``, served by the chosen backend."""
from gptkern.ops.attention import flash_attn_varlen, scaled_dot_product_attention
from gptkern.ops.norms import layer_norm, rms_norm
from gptkern.ops.softmax import log_softmax, softmax

__all__ = ["softmax", "log_softmax", "layer_norm", "rms_norm", "scaled_dot_product_attention", "flash_attn_varlen"]
