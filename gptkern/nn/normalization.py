"""LayerNorm and RMSNorm modules: torch.nn's, with the forward served by gptkern.ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptkern import ops
from gptkern.ops import _fx


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``: same arguments, parameters and ``state_dict`` keys."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript runs torch's kernel (gptkern's ops are Python)
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        node = _fx.leaf_call(self, (input,), {})  # torch.fx keeps torch.nn's modules as leaves
        if node is not None:
            return node
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm``: same arguments, parameters and ``state_dict`` keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        node = _fx.leaf_call(self, (x,), {})
        if node is not None:
            return node
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)
