"""Linear module: torch.nn.Linear, with the forward served by gptkern.ops.linear."""
from __future__ import annotations

import torch

from gptkern import ops


class Linear(torch.nn.Linear):
    """Drop-in for ``torch.nn.Linear``: same arguments, parameters and ``state_dict`` keys. Without
    grad, a few rows on CPU go through gptkern's GEMV kernel (decoding); else F.linear."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.linear(input, self.weight, self.bias)
