"""Test set-up: the Triton interpreter on machines without CUDA, backend reset, helpers."""
import os

import torch

# Must happen before gptkern's first Triton call (Triton picks interpret mode when a
# kernel is decorated, i.e. when gptkern.kernels is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import interpreter_bf16  # noqa: E402

    interpreter_bf16.install()  # bf16 tl.dot as on a GPU

import pytest  # noqa: E402

import gptkern  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _auto_backend():
    """Every test starts with the 'auto' backend, whatever GPTKERN_BACKEND says."""
    previous = gptkern.get_backend()
    gptkern.set_backend("auto")
    yield
    gptkern.set_backend(previous)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
