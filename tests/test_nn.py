"""gptkern.nn modules are drop-ins for their torch.nn namesakes."""
import inspect

import pytest
import torch

import gptkern
from helpers import assert_close, backends_here

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_here(DEVICE)
PAIRS = [(gptkern.nn.LayerNorm, torch.nn.LayerNorm), (gptkern.nn.RMSNorm, torch.nn.RMSNorm),
         (gptkern.nn.Softmax, torch.nn.Softmax)]
CONSTRUCTIONS = {
    "LayerNorm": [dict(normalized_shape=12), dict(normalized_shape=(3, 4), eps=1e-3),
                  dict(normalized_shape=[12], elementwise_affine=False),
                  dict(normalized_shape=12, bias=False)],
    "RMSNorm": [dict(normalized_shape=12), dict(normalized_shape=(3, 4), eps=1e-4),
                dict(normalized_shape=12, elementwise_affine=False)],
}


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_same_signatures(ours, theirs):
    def params(fn):
        return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]

    assert issubclass(ours, theirs)
    assert params(ours.__init__) == params(theirs.__init__)
    assert params(ours.forward) == params(theirs.forward)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_modules_match_torch(name, backend):
    for kwargs in CONSTRUCTIONS[name]:
        theirs = getattr(torch.nn, name)(**kwargs, device=DEVICE)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn_like(p))
        ours = getattr(gptkern.nn, name)(**kwargs, device=DEVICE)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
        assert repr(ours) == repr(theirs)
        shape = (5, 3, 4) if kwargs["normalized_shape"] == (3, 4) else (5, 12)
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        g = torch.randn(shape, device=DEVICE)
        with gptkern.backend(backend):
            y = ours(x)
            y.backward(g)
        x_ref = x.detach().requires_grad_()
        y_ref = theirs(x_ref)
        y_ref.backward(g)
        assert_close(y, y_ref, torch.float32)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
        for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_dtype_and_device_arguments():
    m = gptkern.nn.LayerNorm(8, device="meta", dtype=torch.float16)
    assert m.weight.dtype == torch.float16 and m.weight.device.type == "meta"
    m = gptkern.nn.RMSNorm(8, dtype=torch.float64)
    assert m.weight.dtype == torch.float64
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), torch.nn.RMSNorm(8, dtype=torch.float64)(x))



@pytest.mark.parametrize("module", [gptkern.nn.LayerNorm(12), gptkern.nn.LayerNorm((3, 4), bias=False),
                                    gptkern.nn.RMSNorm(12), gptkern.nn.RMSNorm(12, eps=None),
                                    gptkern.nn.Softmax(-1), gptkern.nn.Softmax(dim=None)])
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # dim=None; torch.jit
def test_torch_jit_script(module):
    """Scripted, the modules run torch's kernels on their own parameters (gptkern's ops are Python)."""
    module = module.to(DEVICE)
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    if getattr(module, "normalized_shape", None) == (12,):
        x = x.flatten(2)
    torch.testing.assert_close(torch.jit.script(module)(x), module(x))


def test_softmax_without_dim_compiles_fullgraph():
    """nn.Softmax(dim=None) picks the dimension from the rank, warning in eager, and compiles with
    fullgraph=True as torch's module does."""
    torch._dynamo.reset()
    x = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        eager = gptkern.nn.Softmax()(x)
    torch.testing.assert_close(eager, torch.softmax(x, 0))
    compiled = torch.compile(gptkern.nn.Softmax(), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)
