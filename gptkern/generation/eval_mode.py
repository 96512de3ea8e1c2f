"""The model in eval mode while any generation of it runs, streams included."""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator

import torch

# model -> [generations running, its training flag before the first of them]
_running: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; the mode it had before the first of the overlapping blocks
    (two streams in flight) comes back when the last one ends."""
    with _lock:
        entry = _running.setdefault(model, [0, model.training])
        entry[0] += 1
        model.eval()
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                _running.pop(model, None)
                model.train(entry[1])
