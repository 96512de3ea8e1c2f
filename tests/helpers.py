"""Shared test helpers: backends to test, tolerances, poisoning, reference comparison."""
from __future__ import annotations

import contextlib

import torch

import gptkern

# Error allowed against the float64 reference, per dtype of the tested tensors.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}
# Gradients go through one more rounding of an fp32 reduction.
GRAD_TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3.2e-2, rtol=3.2e-2),
    torch.float64: dict(atol=1e-9, rtol=1e-9),
}


# Backends that implement attention.
ATTENTION_BACKENDS = ("triton", "cpu", "torch")


def backends_here(device: torch.device, attention: bool = False) -> list[str]:
    """Every named backend that can run on ``device`` here (and implements attention, if
    asked), plus 'auto'."""
    names = [b for b in gptkern.available_backends() if gptkern._backend._backend_runs_on(b, device.type)]
    if attention:
        names = [b for b in names if b in ATTENTION_BACKENDS]
    return names + ["auto"]


def dtypes_for(backend: str, device: torch.device) -> list[torch.dtype]:
    # bf16 under the Triton interpreter: its tl.dot is widened to fp32 (tests/interpreter_bf16.py)
    return [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, grad: bool = False,
                 msg: str = "", atol_scale: float = 1.0) -> None:
    """``actual`` within the tolerance of ``dtype`` of ``expected``; ``atol_scale`` widens the
    absolute part for sums over many terms (weight gradients)."""
    tol = dict((GRAD_TOLERANCES if grad else TOLERANCES)[dtype])
    tol["atol"] *= atol_scale
    try:
        torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **tol)
    except AssertionError as err:
        raise AssertionError(f"{msg}: {err}" if msg else str(err)) from None


@contextlib.contextmanager
def poisoned_allocations():
    """Fill every new torch.empty* tensor with NaN (or -1 for integers) so an unwritten
    element shows up in the output."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like")}

    def poison(t):
        if isinstance(t, torch.Tensor) and t.numel():
            t.fill_(float("nan") if t.is_floating_point() else -1)
        return t

    def wrap(fn):
        return lambda *a, **k: poison(fn(*a, **k))

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """A strided view holding the same values as ``x``: every other column of a wider buffer."""
    buf = torch.randn(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    view = buf[..., ::2]
    view.copy_(x)
    assert not view.is_contiguous() or x.shape[-1] <= 1
    return view


def check_compiled_causal_sdpa(backend: str, q, k, v, reference) -> None:
    """Causal SDPA under torch.compile(fullgraph=True) on ``backend``: output and gradients of the fp32
    leaves q, k, v against ``reference(q, k, v)`` (float64, causal) in eager mode."""
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: gptkern.ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                      fullgraph=True)
    with gptkern.backend(backend):
        y = f(q, k, v)
        grads = torch.autograd.grad(y.sum(), (q, k, v))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_leaves)
    assert_close(y, ref, torch.float32)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), ref_leaves)):
        assert_close(got, want, torch.float32, grad=True)


def assert_argument_error(main, argv: list[str], flag: str, capsys) -> None:
    """``main(argv)`` exits with argparse's status 2 and an error line naming ``flag``."""
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def forced_config_runs(per_kernel: dict) -> list[dict]:
    """Forced (fwd, dq, dkdv) configurations so that each of every kernel's candidates runs once
    at least: the i-th of each kernel together, and, where the i-th dK/dV adds dQ up atomically
    (no dQ kernel runs then), once more with the default dK/dV so the i-th dQ runs too."""
    runs = []
    for i in range(max(len(c) for c in per_kernel.values())):
        chosen = {name: c[i % len(c)] for name, c in per_kernel.items()}
        runs.append(chosen)
        if chosen["dkdv"].atomic_dq:
            runs.append({**chosen, "dkdv": per_kernel["dkdv"][0]})
    return runs


def fsync_spy(monkeypatch) -> list[str]:
    """The paths of the files os.fsync is called on, from now until the test ends."""
    import os

    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        try:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


class StandInKernel:
    """A Triton kernel stand-in: its launches record their num_warps in ``launched`` (the
    interpreter ignores num_warps, so tests of the warp choice launch this instead)."""

    def __init__(self):
        from types import SimpleNamespace

        self.fn = SimpleNamespace(__name__="stand_in")
        self.launched: list[int] = []

    def __getitem__(self, grid):
        return lambda *args, num_warps, **constexprs: self.launched.append(num_warps)
