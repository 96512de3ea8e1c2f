"""CUDA graphs emulated on CPU tensors, to test code that captures and replays graphs without a GPU.

``install(monkeypatch)`` replaces ``torch.cuda.CUDAGraph`` and ``torch.cuda.graph`` with
stand-ins that keep the semantics that matter to the captured code:

- Capture records every operation (at the dispatcher, as ``(op, args, kwargs, outputs)``) and
  then undoes its effects: on a GPU, capture launches nothing, so the tensors it writes keep
  their old values, and the tensors it creates hold garbage (here NaN, or -7777 for integers)
  until the first replay.
- Replay runs the recorded operations again on the same tensors: in-place operations mutate
  their recorded arguments, and the outputs of the others are copied into the tensors made
  during capture. Python code, Python numbers and host-side state are frozen as captured.
- Reading a tensor on the host while capturing (``item``, ``tolist``, ``bool``, ``int``, ...)
  and data-dependent output shapes (``nonzero``, ...) raise, as they do under a real capture.
  The argument checks that read values on CPU tensors only (``gptkern.ops._checks.
  checks_read_values``) are told that the tensors are on a GPU while capturing.

Limits: all tensors are on the CPU here, so a host tensor that the real code would keep on the
CPU on purpose cannot be told apart from a device tensor; a custom op is recorded as one
operation, so the host code inside its Python implementation is checked for host reads only.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from gptkern.ops import _checks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "unique_dim"}
_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class CaptureError(RuntimeError):
    """What CUDA raises for an operation that is not permitted while a stream is capturing."""


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _writes(func) -> list[int]:
    """Indices of the arguments ``func`` mutates."""
    return [i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _shares_memory(t: torch.Tensor, others: list[torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-7777)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: "CUDAGraph"):
        super().__init__()
        self.graph = graph
        self.undo: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its value before a write)
        self.created: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            raise CaptureError(f"CUDA graph capture: {func} reads a tensor on the host while capturing")
        if name in _DATA_DEPENDENT:
            raise CaptureError(f"CUDA graph capture: {func} has a data-dependent output shape (a host sync)")
        if name in ("lift_fresh", "lift_fresh_copy"):
            raise CaptureError("CUDA graph capture: torch.tensor(<Python data>) copies host memory while capturing")
        inputs = _tensors((args, kwargs))
        for i in _writes(func):
            for t in _tensors(args[i] if i < len(args) else kwargs.get(func._schema.arguments[i].name)):
                self.undo.append((t, t.clone()))
        out = func(*args, **kwargs)
        fresh = [t for t in _tensors(out) if not _shares_memory(t, inputs)]
        self.created.extend(fresh)
        self.graph.ops.append((func, args, kwargs, out, {id(t) for t in fresh}))
        return out

    def finish(self) -> None:
        with torch.no_grad():
            for t, before in reversed(self.undo):
                t.copy_(before)
            for t in self.created:
                _poison(t)


def _refuse_host_read(name):
    def refuse(self, *args, **kwargs):
        raise CaptureError(f"CUDA graph capture: Tensor.{name}() reads a tensor on the host while capturing")
    return refuse


class CUDAGraph:
    """Stand-in for ``torch.cuda.CUDAGraph``: ``replay()`` reruns what ``graph(self)`` captured."""

    def __init__(self):
        self.ops: list[tuple[Any, tuple, dict, Any, set[int]]] = []
        self.captured = False
        self.replays = 0

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("CUDAGraph.replay: nothing was captured")
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, recorded, fresh in self.ops:
                out = func(*args, **kwargs)
                for old, new in zip(_tensors(recorded), _tensors(out)):
                    if id(old) not in fresh:
                        continue  # a view or an argument written in place: already up to date
                    if old.shape != new.shape or old.dtype != new.dtype:
                        raise CaptureError(f"CUDA graph replay: {func} gave {new.dtype} {list(new.shape)}, "
                                           f"captured as {old.dtype} {list(old.shape)}")
                    old.copy_(new)

    def reset(self) -> None:
        self.ops, self.captured = [], False


class Emulator:
    """What ``install`` returns: every graph captured, and a count of captures."""

    def __init__(self):
        self.graphs: list[CUDAGraph] = []

    @property
    def replays(self) -> int:
        return sum(g.replays for g in self.graphs)

    @contextlib.contextmanager
    def graph(self, cuda_graph: CUDAGraph, pool=None, stream=None, capture_error_mode: str = "global"):
        if cuda_graph.captured:
            raise RuntimeError("CUDA graph capture: this graph was captured already (reset() it first)")
        self.graphs.append(cuda_graph)
        recorder = _Recorder(cuda_graph)
        saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
        checks_read_values = _checks.checks_read_values
        try:
            for name in _HOST_READS:
                setattr(torch.Tensor, name, _refuse_host_read(name))
            _checks.checks_read_values = lambda t: False  # as on a GPU
            with recorder:
                yield
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
            _checks.checks_read_values = checks_read_values
            recorder.finish()
        cuda_graph.captured = True


def install(monkeypatch) -> Emulator:
    """Patch ``torch.cuda.CUDAGraph`` / ``torch.cuda.graph`` for one test."""
    emulator = Emulator()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", emulator.graph)
    return emulator
