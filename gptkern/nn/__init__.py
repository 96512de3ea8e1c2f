"""Modules over gptkern.ops with torch.nn's constructors, forward signatures and state_dict keys."""
from gptkern.nn.activation import Softmax
from gptkern.nn.attention import MultiheadAttention
from gptkern.nn.normalization import LayerNorm, RMSNorm

__all__ = ["Softmax", "LayerNorm", "RMSNorm", "MultiheadAttention"]
