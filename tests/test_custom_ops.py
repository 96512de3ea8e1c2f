"""The Triton custom ops pass torch.library.opcheck and trace under torch.compile(fullgraph=True)."""
import pytest
import torch

import gptkern
from gptkern.ops.reference import layer_norm_ref, rms_norm_ref, softmax_ref
from helpers import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif("triton" not in gptkern.available_backends(),
                                reason="triton cannot run here")


def rand(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, requires_grad=grad)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [-1, 0])
def test_opcheck_softmax(log, dim):
    x = rand(5, 19, grad=True)
    torch.library.opcheck(torch.ops.gptkern.triton_softmax.default, (x, dim, log, torch.float32))
    torch.library.opcheck(torch.ops.gptkern.triton_softmax.default,
                          (x.detach().half().requires_grad_(), dim, log, torch.float32))
    y = torch.softmax(x.detach(), dim)
    torch.library.opcheck(torch.ops.gptkern.triton_softmax_backward.default,
                          (rand(5, 19), torch.log(y) if log else y, dim, log))


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_opcheck_norm(is_rms, affine):
    x = rand(3, 4, 11, grad=True)
    w = rand(4, 11, grad=True) if affine else None
    b = rand(4, 11, grad=True) if affine and not is_rms else None
    torch.library.opcheck(torch.ops.gptkern.triton_norm.default, (x, 2, w, b, 1e-5, is_rms))
    w, b = [t.detach() if t is not None else None for t in (w, b)]
    _, mean, rstd = torch.ops.gptkern.triton_norm(x.detach(), 2, w, b, 1e-5, is_rms)
    torch.library.opcheck(torch.ops.gptkern.triton_norm_backward.default,
                          (rand(3, 4, 11), x.detach(), 2, w, b, mean, rstd, is_rms, affine,
                           b is not None))


def _graph_breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count


def test_compile_fullgraph_forward_backward():
    """One compiled function using all four ops, forward and backward, no graph breaks."""
    x = rand(4, 24, grad=True)
    w = (1 + 0.1 * torch.randn(24, device=DEVICE)).requires_grad_()
    b = rand(24, grad=True)

    def f(x, w, b):
        h = gptkern.ops.layer_norm(x, (24,), w, b)
        h = gptkern.ops.rms_norm(h, (24,), w)
        return gptkern.ops.softmax(h, -1) + gptkern.ops.log_softmax(h, 0)

    def f_ref(x, w, b):
        h = layer_norm_ref(x, (24,), w, b)
        h = rms_norm_ref(h, (24,), w, eps=torch.finfo(torch.float32).eps)
        return softmax_ref(h, -1) + softmax_ref(h, 0, log=True)

    with gptkern.backend("triton"):
        assert _graph_breaks(f, x, w, b) == 0
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True)
        y = compiled(x, w, b)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), g)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y_ref = f_ref(*leaves)
    grads_ref = torch.autograd.grad(y_ref, leaves, g.double())
    assert_close(y, y_ref, torch.float32)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_compile_dynamic_shapes():
    """A dynamic batch dimension traces through the fake implementations."""
    with gptkern.backend("triton"):
        torch._dynamo.reset()
        f = torch.compile(lambda x: gptkern.ops.layer_norm(x, (16,)) + gptkern.ops.softmax(x, -1),
                          fullgraph=True, dynamic=True)
        for rows in (3, 5):
            x = rand(rows, 16)
            assert_close(f(x), layer_norm_ref(x, (16,)) + softmax_ref(x, -1), torch.float32)
