"""Modules in eval mode while a generation step runs."""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator, Sequence

import torch

# model -> [steps running (threads), the modules it switched out of training]
_running: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()
_lock = threading.RLock()


@contextlib.contextmanager
def evaluating(model: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """``model.eval()`` for one step (``modules``: ``list(model.modules())``, listed once per call).
    The modules that were training are switched back when the last overlapping step (another
    thread's) ends; a step never spans a stream's ``yield``, so the user's ``model.train()``
    between steps is kept, and the next step is in eval mode again."""
    with _lock:
        entry = _running.get(model)
        if entry is None:
            training = [m for m in modules if m.training]
            if training:
                model.eval()
            entry = _running[model] = [0, training]
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                if _running.get(model) is entry:
                    del _running[model]
                for m in entry[1]:
                    m.training = True
