"""The decode step as a CUDA graph: captured once per generate call, replayed for every token."""
from __future__ import annotations

import torch


class GraphedDecodeStep:
    """``step(tokens (B,)) -> logits (B, V)`` of one decode step over a static KV cache.

    The first call runs eagerly (it compiles the kernels and is a real step); the second
    captures the step into a CUDA graph whose inputs and outputs are fixed buffers, and every
    call from then on copies the new tokens in and replays it. The cache's writes and its
    length counter are part of the graph, so they advance on each replay.
    """

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.graph = None
        self.tokens = None
        self.logits = None

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.model.transformer(tokens, None, cache=self.cache)  # (B, 1, C)
        return self.model.lm_head(hidden[:, -1])

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:  # first step: eager, warms up every kernel
            self.tokens = tokens[:, None].clone()
            return self._run(self.tokens)
        if self.graph is None:
            self.tokens.copy_(tokens[:, None])
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run(self.tokens)
        else:
            self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits
