"""Softmax module: torch.nn's, with the forward served by gptkern.ops."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from gptkern import ops


def _legacy_softmax_dim(ndim: int) -> int:
    # torch.nn.Softmax(dim=None) picks the dimension from the rank, with a warning (in eager
    # only: Dynamo cannot trace warnings.warn here, and fullgraph=True would fail on it).
    if not torch.compiler.is_compiling():
        warnings.warn("Implicit dimension choice for softmax has been deprecated. "
                      "Change the call to include dim=X as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(torch.nn.Softmax):
    """Drop-in for ``torch.nn.Softmax``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript runs torch's kernel (gptkern's ops are Python)
            return F.softmax(input, self.dim, _stacklevel=5)
        dim = self.dim if self.dim is not None else _legacy_softmax_dim(input.dim())
        return ops.softmax(input, dim)
