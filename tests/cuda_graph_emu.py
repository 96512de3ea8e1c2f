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
- Reading a tensor on the host while capturing (``item``, ``tolist``, ``bool``, ``int``,
  ``cpu``, ``torch.equal``, ...) and data-dependent output shapes (``nonzero``, boolean-mask
  indexing, ``repeat_interleave`` by a tensor, ``bincount``, ...) raise, as they do under a real
  capture. The argument checks that read values on CPU tensors only (``gptkern.ops._checks.
  checks_read_values``) are told that the tensors are on a GPU while capturing.
- A graph reads the tensors made before its capture by address, without keeping them alive:
  the emulator holds them by weak reference, and a replay after one was freed raises.

Limits: all tensors are on the CPU here, so a host tensor that the real code would keep on the
CPU on purpose (a 0-dim scalar, frozen at capture on a GPU) cannot be told apart from a device
tensor; a custom op is recorded as one operation, so only Python-level host reads inside its
implementation are caught; a weak reference dies with the tensor object, which may happen while
another view keeps its memory alive (stricter than a GPU).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from gptkern.generation import cuda_graph
from gptkern.ops import _checks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import TensorWeakRef

_DATA_DEPENDENT = {"nonzero", "nonzero_static", "masked_select", "unique", "_unique2", "unique_consecutive",
                   "unique_dim", "bincount", "equal"}
_HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


def _host_sync(func, args, kwargs) -> bool:
    """Operations whose output shape (or result) the host must read."""
    name = func.overloadpacket.__name__
    if name in _DATA_DEPENDENT:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # boolean-mask indexing
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "repeat_interleave":  # by a tensor of repeats, unless told the output size
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    return False


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
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).min if t.is_signed() else torch.iinfo(t.dtype).max)


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
        if _host_sync(func, args, kwargs):
            raise CaptureError(f"CUDA graph capture: {func} has a data-dependent result (a host sync)")
        if name in ("lift_fresh", "lift_fresh_copy") and args[0].dim() > 0:
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
        self.undo.clear()
        # the graph's own tensors (every output) stay; the others are read by address only
        own = {id(t) for op in self.graph.ops for t in _tensors(op[3])}
        self.graph.ops = [(func, *tree_map(lambda a: a if not isinstance(a, torch.Tensor) or id(a) in own
                                           else TensorWeakRef(a), (args, kwargs)), *rest)
                          for func, args, kwargs, *rest in self.graph.ops]


def _refuse_host_read(name):
    def refuse(self, *args, **kwargs):
        raise CaptureError(f"CUDA graph capture: Tensor.{name}() reads a tensor on the host while capturing")
    return refuse


def _alive(a):
    if not isinstance(a, TensorWeakRef):
        return a
    t = a()
    if t is None:
        raise CaptureError("CUDA graph replay: a tensor the graph reads was freed after the capture (the graph "
                           "holds its address, not the tensor)")
    return t


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
                args, kwargs = tree_map(_alive, (args, kwargs), is_leaf=lambda a: isinstance(a, TensorWeakRef))
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
        cuda_graph.capture_error_mode = capture_error_mode
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
    monkeypatch.setattr(cuda_graph, "check_device", lambda device: None)
    return emulator
