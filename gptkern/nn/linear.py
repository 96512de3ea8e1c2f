"""Linear module: torch.nn.Linear, with the forward served by gptkern.ops.linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptkern import ops
from gptkern.ops import _fx


class Linear(torch.nn.Linear):
    """Drop-in for ``torch.nn.Linear``: same arguments, parameters and ``state_dict`` keys. Without
    grad, a few rows on CPU go through gptkern's GEMV kernel (decoding); else F.linear."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript runs torch's kernel (gptkern's ops are Python)
            return F.linear(input, self.weight, self.bias)
        node = _fx.leaf_call(self, (input,), {})  # torch.fx keeps torch.nn's modules as leaves
        if node is not None:
            return node
        return ops.linear(input, self.weight, self.bias)
