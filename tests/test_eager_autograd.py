"""Eager calls of the custom ops go through gptkern.ops._autograd: a plain autograd.Function
when an input needs a gradient, below the autograd key otherwise; the same formulas as the
registered autograd that torch.compile and direct torch.ops calls use."""
import pytest
import torch

import gptkern
from gptkern.ops import _autograd

OPS = {"cpu": ("norm_fwd", "softmax_fwd"), "triton": ("triton_norm", "triton_softmax")}
BACKENDS = [b for b in OPS if b in gptkern.available_backends()]


def _calls(backend):
    """(name, gptkern call, the op called directly) for a norm and a softmax."""
    norm, softmax = (getattr(torch.ops.gptkern, name) for name in OPS[backend])
    return [("layer_norm", lambda x, w: gptkern.ops.layer_norm(x, (64,), w),
             lambda x, w: norm(x, 1, w, None, 1e-5, False)[0]),
            ("softmax", lambda x, w: gptkern.ops.softmax(x * w, -1),
             lambda x, w: softmax(x * w, -1, False, torch.float32))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_function_gives_the_registered_gradients(backend):
    torch.manual_seed(0)
    x, w, g = torch.randn(3, 64), torch.randn(64), torch.randn(3, 64)
    for name, ours, direct in _calls(backend):
        grads = []
        for fn in (ours, direct):
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            with gptkern.backend(backend):
                y = fn(xg, wg)
            grads.append((y, *torch.autograd.grad(y, (xg, wg), g)))
        assert type(grads[0][0].grad_fn).__name__.startswith("Eager_"), (name, grads[0][0].grad_fn)
        for got, want in zip(grads[0], grads[1]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_grad_no_graph_is_recorded(backend):
    x = torch.randn(3, 64)
    w = torch.randn(64, requires_grad=True)
    with gptkern.backend(backend):
        for name, ours, _ in _calls(backend):
            plain = ours(x, w.detach())
            with torch.no_grad():
                no_grad = ours(x, w)
            for y in (plain, no_grad):
                assert y.grad_fn is None and not y.requires_grad, name


def test_registered_functions_cover_every_op_with_a_formula():
    names = set(_autograd._FUNCTIONS)
    assert {"gptkern::triton_norm", "gptkern::triton_softmax", "gptkern::triton_attention",
            "gptkern::triton_attention_varlen"} <= names or "triton" not in gptkern.available_backends()
    if "cpu" in gptkern.available_backends():
        assert {"gptkern::norm_fwd", "gptkern::softmax_fwd", "gptkern::attention_fwd",
                "gptkern::attention_varlen_fwd", "gptkern::linear_small_m"} <= names


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_trace_records_the_op(backend, tmp_path):
    """torch.jit.trace records the op itself (a Python Function call could not be saved)."""
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(64))

        def forward(self, x):
            return gptkern.ops.layer_norm(x, (64,), self.weight)

    module, x = Norm(), torch.randn(3, 64)
    with gptkern.backend(backend):
        traced = torch.jit.trace(module, x)
    assert f"gptkern::{OPS[backend][0]}" in str(traced.graph)
    torch.jit.save(traced, str(tmp_path / "norm.pt"))
    loaded = torch.jit.load(str(tmp_path / "norm.pt"))
    torch.testing.assert_close(loaded(x), module(x))
