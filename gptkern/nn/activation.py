"""Softmax module: torch.nn's, with the forward served by gptkern.ops."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from gptkern import ops
from gptkern.ops import _fx


def _legacy_softmax_dim(ndim: int) -> int:
    # torch.nn.Softmax(dim=None) picks the dimension from the rank, with a warning (in eager
    # only: Dynamo cannot trace warnings.warn here, and fullgraph=True would fail on it).
    if not torch.compiler.is_compiling():
        warnings.warn("Implicit dimension choice for softmax has been deprecated. "
                      "Change the call to include dim=X as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


def _softmax(input: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """Softmax.forward's computation (a torch.fx node of its own when the module is the traced root)."""
    return ops.softmax(input, dim if dim is not None else _legacy_softmax_dim(input.dim()))


class Softmax(torch.nn.Softmax):
    """Drop-in for ``torch.nn.Softmax``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript runs torch's kernel (gptkern's ops are Python)
            return F.softmax(input, self.dim, _stacklevel=5)
        node = _fx.leaf_call(self, (input,), {})  # torch.fx keeps torch.nn's modules as leaves
        if node is not None:
            return node
        if isinstance(input, _fx.Proxy):
            return _fx.record(_softmax, input, input, self.dim)
        return _softmax(input, self.dim)
