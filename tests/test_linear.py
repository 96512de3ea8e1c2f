"""gptkern.ops.linear and the C++ GEMV kernel (linear_small_m): float64 reference, odd shapes, leading
dims, layouts, fallbacks to F.linear (grad, many rows, layouts, dtypes), bad input, opcheck, compile."""
import sys

import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.nn import Linear
from helpers import assert_close

linear_module = sys.modules["gptkern.ops.linear"]  # the module (gptkern.ops.linear is the function)
pytestmark = pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
op = torch.ops.gptkern.linear_small_m
N, K = 1000, 777  # K not a multiple of the vector width


def weights(n=N, k=K, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    return w, (torch.randn(n, generator=gen).to(dtype) if bias else None)


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", range(1, 9))
def test_op_matches_float64(m, bias):
    w, b = weights(bias=bias)
    x = torch.randn(m, K)
    out = op(x, w, b)
    assert out.shape == (m, N) and out.dtype == torch.float32
    assert_close(out, reference(x, w, b), torch.float32)


@pytest.mark.parametrize("m,n,k", [(3, 1, 1), (1, 7, 5), (2, 33, 31), (5, 257, 64), (1, 3, 4100), (13, 300, 40),
                                   (20, 65, 129)])
def test_op_odd_shapes_and_many_rows(m, n, k):
    w, b = weights(n, k)
    x = torch.randn(m, k)
    assert_close(op(x, w, b), reference(x, w, b), torch.float32)


def test_op_bf16():
    w, b = weights(dtype=torch.bfloat16)
    x = torch.randn(3, K).bfloat16()
    out = op(x, w, b)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(x, w, b), torch.bfloat16)


def test_op_empty():
    w, b = weights(n=0, k=K)
    assert op(torch.randn(2, K), w, b).shape == (2, 0)
    assert op(torch.randn(0, K), *weights()).shape == (0, N)


def test_op_bad_inputs():
    w, b = weights()
    with pytest.raises(RuntimeError, match="weight"):
        op(torch.randn(1, K + 1), w, b)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(torch.randn(1, K).double(), w.double(), None)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(torch.randn(1, K).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        op(torch.randn(1, K), w, torch.randn(N + 1))
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(1, K), torch.randn(K, N).t(), None)
    with pytest.raises(RuntimeError, match="x must be"):
        op(torch.randn(K), w, None)


def test_opcheck():
    w, b = weights(n=40, k=33)
    for grad in (False, True):
        x = torch.randn(3, 33).requires_grad_(grad)
        torch.library.opcheck(op.default, (x, w.clone().requires_grad_(grad), b.clone().requires_grad_(grad)))
        torch.library.opcheck(op.default, (x, w, None))


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("shape", [(K,), (1, K), (2, 3, K), (1, 1, 8, K)])
def test_helper_uses_kernel_for_few_rows(backend, shape):
    w, b = weights()
    x = torch.randn(*shape)
    with torch.no_grad(), gptkern.backend(backend):
        assert linear_module._use_kernel(x, w, b)
        out = gptkern.ops.linear(x, w, b)
    assert out.shape == (*shape[:-1], N)
    torch.testing.assert_close(out, op(x.reshape(-1, K), w, b).view(out.shape), atol=0, rtol=0)
    assert_close(out, reference(x, w, b), torch.float32)


def test_helper_noncontiguous_input():
    w, b = weights()
    x = torch.randn(2 * K, 4)[::2].t()  # (4, K), strided both ways
    assert not x.is_contiguous()
    with torch.no_grad(), gptkern.backend("cpu"):
        assert linear_module._use_kernel(x, w, b)
        assert_close(gptkern.ops.linear(x, w, b), reference(x, w, b), torch.float32)


def _falls_back(x, w, b, backend="cpu"):
    """The helper gives exactly F.linear's result without the kernel."""
    with torch.no_grad(), gptkern.backend(backend):
        assert not linear_module._use_kernel(x, w, b)
        torch.testing.assert_close(gptkern.ops.linear(x, w, b), F.linear(x, w, b), atol=0, rtol=0)


def test_helper_fallbacks():
    w, b = weights()
    _falls_back(torch.randn(9, K), w, b)  # too many rows
    _falls_back(torch.randn(3, 3, K), w, b)
    _falls_back(torch.randn(2, K), torch.randn(K, N).t(), b)  # non-contiguous weight
    _falls_back(torch.randn(2, K).double(), w.double(), b.double())  # dtype the kernel lacks
    _falls_back(torch.randn(2, K), w, b, backend="torch")
    with pytest.raises(RuntimeError):  # the shape error is F.linear's
        gptkern.ops.linear(torch.randn(2, K + 1), w, b)
    for backend in ("cpu", "auto"):  # so are its type errors, naming the argument
        for args, name in (((torch.randn(2, K), None), "weight"), ((None, w), "input"),
                           ((torch.randn(2, K), w, [0.0] * N), "bias")):
            with gptkern.backend(backend), pytest.raises(TypeError, match=name):
                gptkern.ops.linear(*args)


def test_grad_mode_uses_f_linear():
    w, b = weights()
    w.requires_grad_()
    x = torch.randn(2, K, requires_grad=True)
    with gptkern.backend("cpu"):
        assert not linear_module._use_kernel(x, w, b)
        out = gptkern.ops.linear(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b), atol=0, rtol=0)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None
    assert_close(x.grad, w.detach().sum(0).expand(2, K), torch.float32, grad=True)


def test_module_same_state_and_training_path():
    torch.manual_seed(0)
    ref = torch.nn.Linear(K, 50)
    mod = Linear(K, 50)
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == ["weight", "bias"]
    x = torch.randn(1, K)
    torch.testing.assert_close(mod(x), ref(x), atol=0, rtol=0)  # grad enabled: F.linear exactly
    with torch.no_grad():
        assert_close(mod(x), reference(x, ref.weight, ref.bias), torch.float32)


def test_compile_fullgraph():
    torch._dynamo.reset()
    mod = Linear(K, 20)
    x = torch.randn(1, K)
    with torch.no_grad():
        out = torch.compile(mod, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, F.linear(x, mod.weight, mod.bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_gives_the_autocast_dtype(dtype):
    """Under CPU autocast F.linear computes in the autocast dtype: the kernel (which would keep
    fp32) steps aside for few rows too, and the module's output dtype does not depend on them."""
    w, b = weights()
    ref = torch.nn.Linear(K, N)
    mod = Linear(K, N)
    mod.load_state_dict(ref.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype), gptkern.backend("cpu"):
        for rows in (1, 8, 9):
            x = torch.randn(rows, K)
            assert not linear_module._use_kernel(x, w, b)
            assert gptkern.ops.linear(x, w, b).dtype == dtype
            torch.testing.assert_close(mod(x), ref(x), atol=0, rtol=0)


def test_module_scripts():
    """TorchScript runs F.linear on the module's parameters (gptkern's ops are Python)."""
    mod = Linear(K, N)
    x = torch.randn(3, K)
    torch.testing.assert_close(torch.jit.script(mod)(x), F.linear(x, mod.weight, mod.bias))


def test_module_traces():
    """torch.jit.trace records F.linear: its check reruns the module without grad, where the kernel
    would otherwise serve few rows and give another graph."""
    mod = Linear(K, N)
    x = torch.randn(3, K)
    traced = torch.jit.trace(mod, x)
    torch.testing.assert_close(traced(x), F.linear(x, mod.weight, mod.bias))
    with torch.no_grad():
        torch.jit.trace(mod, x[:1])


def test_a_bias_that_f_linear_broadcasts():
    """F.linear broadcasts a bias of shape (1,) or (1, N): the op gives its result too."""
    w, x = torch.randn(7, 5), torch.randn(2, 5)
    for backend in ("cpu", "auto"):
        for b in (torch.randn(1), torch.randn(1, 7)):
            with gptkern.backend(backend):
                got = gptkern.ops.linear(x, w, b)
            torch.testing.assert_close(got, F.linear(x, w, b))
