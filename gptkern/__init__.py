"""gptkern: a kernel engine for GPT-style Transformers.

Importing gptkern needs neither a GPU nor a compiler nor triton.
"""
from gptkern._backend import available_backends, backend, get_backend, set_backend
from gptkern import models, nn, ops

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "set_backend", "get_backend", "backend", "available_backends", "__version__"]
