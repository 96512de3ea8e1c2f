"""Bad input raises the exception type PyTorch raises, with a message naming the argument."""
import pytest
import torch

import gptkern
from helpers import backends_here

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_here(DEVICE)
ops = gptkern.ops


def raises(exc, match, fn, backend):
    with gptkern.backend(backend), pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_dtypes(backend):
    xi = torch.arange(12, device=DEVICE).reshape(3, 4)
    # auto and torch defer to torch's functions for dtypes the kernels lack (torch's own message)
    names = "not implemented for 'Long'" if backend in ("auto", "torch") else "input"
    raises(NotImplementedError, names, lambda: ops.softmax(xi, -1), backend)
    raises(NotImplementedError, names, lambda: ops.log_softmax(xi, -1), backend)
    raises(NotImplementedError, names, lambda: ops.layer_norm(xi, (4,)), backend)
    raises(NotImplementedError, names, lambda: ops.rms_norm(xi, (4,)), backend)
    x = torch.randn(3, 4, device=DEVICE)
    raises(NotImplementedError, "dtype", lambda: ops.softmax(x, -1, dtype=torch.int32), backend)
    long_w = torch.ones(4, dtype=torch.long, device=DEVICE)
    raises(RuntimeError, "weight", lambda: ops.layer_norm(x, (4,), long_w), backend)  # torch: mixed dtype
    if backend in ("cpu", "triton", "cuda"):  # torch's rms_norm promotes: only auto / torch serve it
        raises(NotImplementedError, "int64", lambda: ops.rms_norm(x, (4,), long_w), backend)
    else:
        with gptkern.backend(backend):
            torch.testing.assert_close(ops.rms_norm(x, (4,), long_w), torch.nn.functional.rms_norm(x, (4,), long_w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_mixed_parameter_dtypes(backend):
    """F.layer_norm's rule: parameters in the input's dtype, or fp32 ones for a 16-bit input."""
    x = torch.randn(3, 4, device=DEVICE)
    w16, w32 = torch.randn(4, device=DEVICE).half(), torch.randn(4, device=DEVICE)
    raises(RuntimeError, "weight torch.float16", lambda: ops.layer_norm(x, (4,), w16), backend)
    raises(RuntimeError, "bias torch.float16", lambda: ops.layer_norm(x.half(), (4,), w32, w16), backend)
    raises(RuntimeError, "bias torch.float32", lambda: ops.layer_norm(x.half(), (4,), w16, w32), backend)
    raises(RuntimeError, "weight torch.float32", lambda: ops.layer_norm(x.double(), (4,), w32), backend)
    with gptkern.backend(backend):
        out = ops.layer_norm(x.half(), (4,), w32, w32)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_arguments(backend):
    x = torch.randn(3, 4, device=DEVICE)
    raises(TypeError, "eps", lambda: ops.layer_norm(x, (4,), eps="a"), backend)
    raises(TypeError, "eps", lambda: ops.rms_norm(x, (4,), eps="a"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dim_out_of_range(backend):
    x = torch.randn(3, 4, device=DEVICE)
    raises(IndexError, "dim", lambda: ops.softmax(x, 2), backend)
    raises(IndexError, "dim", lambda: ops.log_softmax(x, -3), backend)
    raises(IndexError, "dim", lambda: ops.softmax(torch.tensor(1.0, device=DEVICE), 1), backend)
    # the dim is checked first, as torch does: an integer input with a bad dim is an IndexError
    raises(IndexError, "dim", lambda: ops.log_softmax(torch.ones(2, 3, dtype=torch.long, device=DEVICE), 2), backend)
    raises(TypeError, "dim", lambda: ops.softmax(x, 1.0), backend)
    raises(TypeError, "dim", lambda: ops.softmax(x, True), backend)
    raises(TypeError, "dim", lambda: ops.softmax(x, torch.tensor(1.0)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dim_as_torch_parses_it(backend):
    """numpy integers and 0-d integer tensors are dims to torch's parser too."""
    import numpy as np

    x = torch.randn(3, 4, device=DEVICE)
    with gptkern.backend(backend):
        for dim in (np.int64(0), torch.tensor(-1), np.int32(1)):
            torch.testing.assert_close(ops.softmax(x, dim), torch.softmax(x, int(dim)))
            torch.testing.assert_close(ops.log_softmax(x, dim), torch.log_softmax(x, int(dim)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [ops.layer_norm, ops.rms_norm])
def test_wrong_normalized_shape(backend, op):
    x = torch.randn(3, 4, device=DEVICE)
    raises(RuntimeError, "normalized_shape", lambda: op(x, (5,)), backend)
    # more dims than the input: torch's layer_norm raises RuntimeError, its rms_norm ValueError
    raises(ValueError if op is ops.rms_norm else RuntimeError, "normalized_shape", lambda: op(x, (2, 3, 4)),
           backend)
    raises(RuntimeError, "normalized_shape", lambda: op(x, ()), backend)
    raises(TypeError, "normalized_shape", lambda: op(x, "4"), backend)
    raises(TypeError, "normalized_shape", lambda: op(x, 4), backend)  # an int: F's refuse it (nn's take one)
    raises(TypeError, "normalized_shape", lambda: op(x[:, :1], (True,)), backend)  # True == 1, not an int to torch


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_weight_shape(backend):
    x = torch.randn(3, 4, device=DEVICE)
    w5 = torch.ones(5, device=DEVICE)
    raises(RuntimeError, "weight", lambda: ops.layer_norm(x, (4,), w5), backend)
    raises(RuntimeError, "bias", lambda: ops.layer_norm(x, (4,), None, w5), backend)
    raises(RuntimeError, "weight", lambda: ops.rms_norm(x, (4,), w5), backend)
    raises(TypeError, "weight", lambda: ops.rms_norm(x, (4,), [1.0] * 4), backend)
    x3, w6 = torch.randn(3, 2, 3, device=DEVICE), torch.ones(6, device=DEVICE)  # as many elements, another shape
    raises(RuntimeError, "weight", lambda: ops.layer_norm(x3, (2, 3), w6), backend)
    raises(RuntimeError, "bias", lambda: ops.layer_norm(x3, (2, 3), None, w6), backend)
    raises(RuntimeError, "weight", lambda: ops.rms_norm(x3, (2, 3), w6), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_devices(backend):
    x = torch.randn(3, 4, device=DEVICE)
    meta = torch.ones(4, device="meta")
    raises(RuntimeError, "weight", lambda: ops.layer_norm(x, (4,), meta), backend)
    raises(RuntimeError, "bias", lambda: ops.layer_norm(x, (4,), None, meta), backend)
    raises(RuntimeError, "weight", lambda: ops.rms_norm(x, (4,), meta), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_a_tensor(backend):
    raises(TypeError, "input", lambda: ops.softmax([1.0, 2.0], 0), backend)
    raises(TypeError, "input", lambda: ops.layer_norm([1.0, 2.0], (2,)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_torch_serves_and_the_kernels_do_not(backend):
    """torch's rms_norm takes complex inputs and its softmax an empty integer tensor: auto and torch
    give torch's result; a kernel backend named explicitly raises NotImplementedError naming the dtype."""
    torch.manual_seed(0)
    xc = torch.randn(3, 4, dtype=torch.complex64, device=DEVICE)
    empty = torch.ones(0, 4, dtype=torch.long, device=DEVICE)
    calls = [(lambda: ops.rms_norm(xc, (4,)), lambda: torch.nn.functional.rms_norm(xc, (4,)), "complex64"),
             (lambda: ops.softmax(empty, -1), lambda: torch.softmax(empty, -1), "int64"),
             (lambda: ops.log_softmax(empty, 1), lambda: torch.log_softmax(empty, 1), "int64")]
    for ours, theirs, dtype in calls:
        if backend in ("auto", "torch"):
            with gptkern.backend(backend):
                got = ours()
            want = theirs()
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want)
        else:
            raises(NotImplementedError, dtype, ours, backend)
