"""The decode step as a CUDA graph, captured once and replayed for every token; the last graph of
each model (with its KV cache) is kept for the next generate call of the same shape."""
from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Optional

import torch

from gptkern import _backend
from gptkern.generation.kv_cache import StaticKVCache, make_cache


def check_device(device: torch.device) -> None:
    """``cuda_graph=True`` needs a model on a CUDA device (tests/cuda_graph_emu.py lifts this to
    run the graphed path on the CPU; call it as ``cuda_graph.check_device``)."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got one on {device}")


class GraphedDecodeStep:
    """``step(model, tokens (B,)) -> logits (B, V)`` of one decode step over a fixed KV cache.

    The first call runs eagerly (it compiles the kernels and is a real step); the second
    captures the step into a CUDA graph whose inputs and outputs are fixed buffers, and every
    call from then on copies the new tokens in and replays it. The cache's writes and its
    length counter are part of the graph, so they advance on each replay. Under autocast the
    steps run eagerly until one runs outside it.
    """

    def __init__(self, cache: StaticKVCache):
        self.cache = cache
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.tokens: Optional[torch.Tensor] = None  # (B, 1), the graph's input
        self.logits: Optional[torch.Tensor] = None  # (B, V), the graph's output

    def _run(self, model, tokens: torch.Tensor) -> torch.Tensor:
        hidden = model.transformer(tokens, None, cache=self.cache)  # (B, 1, C)
        return model.lm_head(hidden[:, -1])

    def __call__(self, model, tokens: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:  # first step: eager, warms up every kernel
            self.tokens = tokens[:, None].clone()
            return self._run(model, self.tokens)
        self.tokens.copy_(tokens[:, None])
        if self.graph is None and torch.is_autocast_enabled(self.tokens.device.type):
            # not captured: it would read autocast's weight casts, freed when the region ends
            return self._run(model, self.tokens)
        # Capture and replay run on the current device's streams: the model's device made current
        # (a model on cuda:1 while cuda:0 is current would otherwise capture an empty graph).
        device = self.tokens.device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if self.graph is None:
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream(device) if device.type == "cuda" else None
                # thread_local: CUDA then ignores this capture in other threads, whose potentially
                # unsafe calls (allocations, a first call's autotuning syncs) "global" would refuse
                # and which would invalidate it (CUDA's documented modes; not yet run on a GPU)
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    self.logits = self._run(model, self.tokens)
                self.graph = graph  # only once captured: a failed capture is tried again next step
            self.graph.replay()
        return self.logits


class _Kept:
    """A cache and its graphed step, with what they were made for."""

    def __init__(self, key: tuple, cache: StaticKVCache):
        self.key, self.cache, self.step = key, cache, GraphedDecodeStep(cache)
        self.busy = False


# model -> its last graphed step; dropped with the model
_kept: "weakref.WeakKeyDictionary[torch.nn.Module, _Kept]" = weakref.WeakKeyDictionary()
_lock = threading.RLock()  # re-entered when a collected stream's release runs inside it
_epoch = [0]  # bumped by release_decode_graphs: a call in flight then keeps nothing


def _matmul_precision() -> str:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 after the new fp32_precision API was used
        return str(torch.backends.cuda.matmul.fp32_precision)


def _hooks(model) -> tuple:
    """The forward hooks a step can run, global and per submodule (their handles' ids; the step
    calls the model's submodules, not the model): a replay runs none of their Python, so adding
    or removing one must capture again."""
    from torch.nn.modules import module as nn_module

    global_hooks = (tuple(nn_module._global_forward_pre_hooks), tuple(nn_module._global_forward_hooks))
    return global_hooks + tuple((name, tuple(m._forward_pre_hooks), tuple(m._forward_hooks))
                                for name, m in model.named_modules()
                                if name and (m._forward_pre_hooks or m._forward_hooks))


def _plain_tensors(model) -> tuple:
    """Tensors the submodules hold as plain attributes, neither parameters nor buffers (a table a
    forward reads, say): a graph reads them by address too."""
    def address(t: torch.Tensor) -> int:
        try:
            return t.data_ptr()
        except RuntimeError:  # no storage (sparse, wrapper subclasses): the object
            return id(t)

    return tuple((name, attr, address(t), t.dtype, t.device, t.shape) for name, m in model.named_modules()
                 for attr, t in vars(m).items() if isinstance(t, torch.Tensor))


def _key(model, kind: str, batch_size: int, max_seq_len: int, num_blocks: Optional[int]) -> tuple:
    """What a captured step and its cache depend on: the shapes, the backend, the stream, autocast
    and other global numerics settings, the forward hooks, and the memory of the parameters, buffers
    and plain tensor attributes (a graph reads them by address: in-place updates are seen, replaced
    tensors are not)."""
    tensors = tuple((t.data_ptr(), t.dtype, t.device, t.shape)
                    for t in itertools.chain(model.parameters(), model.buffers()))
    device = tensors[0][2]
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)  # the cache's dtype
    return (kind, batch_size, max_seq_len, num_blocks, _backend.get_backend(), stream, autocast,
            _matmul_precision(), torch.are_deterministic_algorithms_enabled(), torch.is_inference_mode_enabled(),
            _hooks(model), tensors, _plain_tensors(model))


class DecodeGraphSession:
    """The cache and graphed step of one generate call: the model's kept ones when the key matches
    and no other call is using them (reset first), else new ones, kept when the call ends."""

    def __init__(self, model, kind: str, batch_size: int, max_seq_len: int, num_blocks: Optional[int]):
        self.model, self.epoch = model, _epoch[0]
        key = _key(model, kind, batch_size, max_seq_len, num_blocks)
        # a call under autocast decodes eagerly (see GraphedDecodeStep) and is not kept, not even a
        # stream that captured once iterated outside autocast: its replays would not autocast
        self.keep = not torch.is_autocast_enabled(next(model.parameters()).device.type)
        with _lock:
            kept = _kept.get(model)
            reuse = kept is not None and kept.key == key and not kept.busy
            if reuse:
                kept.busy = True
        if reuse:
            try:
                kept.cache.reset()  # ordered after the last call's work: the stream is in the key
            except BaseException:
                kept.busy = False
                raise
            self.kept = kept
        else:
            self.kept = _Kept(key, make_cache(model, kind, batch_size, max_seq_len, num_blocks))
            self.kept.busy = True
        self.cache, self.step = self.kept.cache, self.kept.step

    def release(self, ok: bool) -> None:
        """At the end of the call: keep the step for the next call, unless it failed."""
        with _lock:
            self.kept.busy = False
            current = _kept.get(self.model)
            if not (ok and self.keep and self.epoch == _epoch[0] and self.kept.step.graph is not None):
                if current is self.kept:
                    del _kept[self.model]
            elif current is None or not current.busy:
                _kept[self.model] = self.kept  # the previous graph and cache are freed


def release_decode_graphs(model: Optional[torch.nn.Module] = None) -> None:
    """Free the CUDA graph and KV cache that generate keeps for ``model`` (every model: None);
    calls in flight keep nothing when they end."""
    with _lock:
        _epoch[0] += 1
        if model is None:
            _kept.clear()
        else:
            _kept.pop(model, None)
