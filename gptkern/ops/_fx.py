"""torch.fx.symbolic_trace support, as torch's own functions and modules have it.

A gptkern op called on a ``torch.fx.Proxy`` is recorded as one ``call_function`` node (as
``torch.nn.functional``'s are, through ``__torch_function__``), and a gptkern.nn drop-in module
met inside a traced model as one ``call_module`` node (torch.fx's default tracer keeps
``torch.nn``'s modules as such leaves, but traces into modules of other packages).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.fx import Proxy


def proxy_in(*args: Any) -> Optional[Proxy]:
    """The first ``torch.fx.Proxy`` among ``args``, else None."""
    for arg in args:
        if isinstance(arg, Proxy):
            return arg
    return None


def record(fn: Callable, proxy: Proxy, *args: Any, **kwargs: Any) -> Proxy:
    """The node of the call ``fn(*args, **kwargs)`` in ``proxy``'s graph."""
    return proxy.tracer.create_proxy("call_function", fn, args, kwargs)


def leaf_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[Proxy]:
    """When torch.fx traces through ``module`` below its root, the ``call_module`` node it makes for
    a torch.nn leaf; else None (not tracing, or ``module`` is the traced root or outside it)."""
    proxy = proxy_in(*args, *kwargs.values())
    if proxy is None or not isinstance(proxy.tracer, torch.fx.Tracer) or getattr(proxy.tracer, "root", None) is module:
        return None  # (a Proxy of a bare Graph has no module tree: the module's ops are recorded)
    try:
        path = proxy.tracer.path_of_module(module)
    except NameError:  # a module called from a traced function, not a submodule of the root
        return None
    return proxy.tracer.create_proxy("call_module", path, args, kwargs)
