"""Modules over gptkern.ops: drop-ins for torch.nn (same constructors, forward signatures and
state_dict keys), Transformer building blocks, and ``patch`` to swap them into any model."""
from gptkern.nn.activation import Softmax
from gptkern.nn.attention import MultiheadAttention
from gptkern.nn.linear import Linear
from gptkern.nn.normalization import LayerNorm, RMSNorm
from gptkern.nn.patch import patch
from gptkern.nn.transformer import MLP, Block, CausalSelfAttention, CrossAttention

__all__ = ["Softmax", "Linear", "LayerNorm", "RMSNorm", "MultiheadAttention", "patch", "CausalSelfAttention",
           "CrossAttention", "MLP", "Block"]
