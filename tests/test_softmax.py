"""softmax / log_softmax on every backend that runs here, against the float64 reference."""
import pytest
import torch

import gptkern
from gptkern.kernels import launch
from gptkern.ops.reference import softmax_ref
from helpers import GRAD_TOLERANCES, assert_close, backends_here, dtypes_for, noncontiguous, poisoned_allocations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_here(DEVICE)
OPS = {"softmax": gptkern.ops.softmax, "log_softmax": gptkern.ops.log_softmax}
# (shape, dim): odd sizes 1, 7, 1023, primes; reductions over the last, middle and first dim.
CASES = [((1,), 0), ((7,), -1), ((3, 1023), -1), ((13, 5), 0), ((2, 31, 3), 1), ((4, 1, 97), -1),
         ((5, 2, 2), -2), ((), 0)]


def params(dtypes_of=dtypes_for):
    return [(b, d) for b in BACKENDS for d in dtypes_of(b, DEVICE)]


def check_op(op, backend, x, dim, dtype=None, grad=True):
    """Forward and backward of ``op`` against the float64 reference."""
    log = op == "log_softmax"
    x = x.detach().requires_grad_(grad)
    with gptkern.backend(backend), poisoned_allocations():
        y = OPS[op](x, dim, dtype=dtype)
    out_dtype = dtype or x.dtype
    assert y.dtype == out_dtype and y.shape == x.shape
    xr = x.detach().double().requires_grad_(grad)
    yr = softmax_ref(xr, dim, upcast=True, log=log)
    if dtype is not None and dtype.itemsize < x.dtype.itemsize:
        yr = softmax_ref(x.detach().to(dtype), dim, upcast=True, log=log)
    assert_close(y, yr, out_dtype, msg=f"{op} {backend} forward")
    if not grad:
        return
    g = torch.randn_like(y)
    with gptkern.backend(backend), poisoned_allocations():
        (dx,) = torch.autograd.grad(y, x, g)
    (dxr,) = torch.autograd.grad(softmax_ref(xr, dim, upcast=True, log=log), xr, g.double())
    assert dx.dtype == x.dtype
    assert_close(dx, dxr, min(out_dtype, x.dtype, key=lambda d: torch.finfo(d).bits), grad=True,
                 msg=f"{op} {backend} backward")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend,dtype", params())
@pytest.mark.parametrize("shape,dim", CASES)
def test_odd_shapes(op, backend, dtype, shape, dim):
    x = 3 * torch.randn(shape, device=DEVICE, dtype=dtype)
    check_op(op, backend, x, dim)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend,dtype", params())
def test_noncontiguous_views(op, backend, dtype):
    x = noncontiguous(torch.randn(6, 37, device=DEVICE, dtype=dtype))
    check_op(op, backend, x, -1)
    t = torch.randn(9, 4, 5, device=DEVICE, dtype=dtype).transpose(0, 2)  # (5, 4, 9), strided
    check_op(op, backend, t, -1)
    check_op(op, backend, t, 1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float16, torch.float32),
                                                (torch.float32, torch.float16)])
def test_dtype_argument(op, backend, in_dtype, out_dtype):
    x = torch.randn(4, 33, device=DEVICE, dtype=in_dtype)
    check_op(op, backend, x, -1, dtype=out_dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_looped_rows(op, backend, monkeypatch):
    """Rows wider than one block go through the looped (online) kernels."""
    monkeypatch.setattr(launch, "FUSED_CAP", 32)
    x = 4 * torch.randn(3, 200, device=DEVICE)
    x[0, :150] = float("-inf")  # the first tiles of a row are all -inf
    check_op(op, backend, x, -1)
    check_op(op, backend, x.t(), 0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_very_long_row(op, backend):
    """256K columns, past the fused limit, at the real tile size."""
    x = torch.randn(1, 262144 + 3, device=DEVICE)
    assert launch.row_block(launch.SOFTMAX_FWD, x.shape[-1], aligned=True, elem_bytes=4)[1] is False
    check_op(op, backend, x, -1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dim", [((0, 5), -1), ((5, 0), -1), ((0, 5), 0), ((3, 0, 2), 1)])
def test_empty(op, backend, shape, dim):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    with gptkern.backend(backend):
        y = OPS[op](x, dim)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_not_views(op, backend):
    """As torch's, the result and the gradient are tensors of their own: in-place ops and detach_()
    work on them under autograd (the C++ kernel returned a view of its row buffer)."""
    for shape, dim in (((2, 5), -1), ((2, 5), 0), ((4, 1), 0), ((), 0), ((3, 1, 4), 1)):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        with gptkern.backend(backend):
            y = OPS[op](x, dim)
            (grad,) = torch.autograd.grad(y, x, torch.randn_like(y))
        assert not y._is_view() and not grad._is_view(), (shape, dim)
        y.masked_fill_(y < -100.0, 0.0)
        y.detach_()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend,dtype", params())
@pytest.mark.parametrize("monkey_loop", [False, True])
def test_nan_inf_as_torch(op, backend, dtype, monkey_loop, monkeypatch):
    """Rows of all -inf, with +inf, with NaN: NaN where torch gives NaN, values elsewhere.
    Rows of 40 put the special values in the vectorized part (the first 32 of a 16-bit row
    under AVX-512) and in the scalar tail."""
    if monkey_loop:
        monkeypatch.setattr(launch, "FUSED_CAP", 16)
    inf, nan = float("inf"), float("nan")
    x = torch.randn(7, 40, device=DEVICE)
    x[0] = -inf
    x[1, 3] = inf
    x[2, 7] = nan
    x[3, :20] = -inf
    x[4, 37] = nan
    x[5, 38] = inf
    x = x.to(dtype)
    g = torch.randn(x.shape, device=DEVICE, dtype=dtype)
    with gptkern.backend(backend):
        xg = x.clone().requires_grad_(True)
        y = OPS[op](xg, -1)
        (dx,) = torch.autograd.grad(y, xg, g)
    xt = x.float().requires_grad_(True)
    expected = getattr(torch, op)(xt, -1)
    (dx_expected,) = torch.autograd.grad(expected, xt, g.float())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.float(), expected, equal_nan=True, atol=tol, rtol=tol)
    # dX reads the rounded output: dy - exp(y) * sum(dy) for bf16 cancels terms near 3 and
    # rounds y by 2^-9, so 1.6e-2 failed 1-2% of random inputs (1500 seeds: none at 3.2e-2)
    grad_tol = GRAD_TOLERANCES[dtype]
    torch.testing.assert_close(dx.float(), dx_expected, equal_nan=True, **grad_tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module(backend):
    m = gptkern.nn.Softmax(dim=1)
    ref = torch.nn.Softmax(dim=1)
    x = torch.randn(3, 9, 4, device=DEVICE)
    with gptkern.backend(backend):
        assert_close(m(x), ref(x.double()), torch.float32)
    assert repr(m) == repr(ref) and m.state_dict().keys() == ref.state_dict().keys()
    legacy = gptkern.nn.Softmax()
    with pytest.warns(UserWarning, match="Implicit dimension"):
        assert_close(legacy(x), torch.softmax(x.double(), 0), torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
@pytest.mark.parametrize("fused_cap", [None, 16])
def test_int64_column_offsets(op, backend, fused_cap, monkeypatch):
    """The int64-offset variant (for column offsets past 2**31) computes the same thing."""
    from gptkern.kernels import softmax as softmax_kernels

    monkeypatch.setattr(softmax_kernels, "_wide", lambda *args: True)
    monkeypatch.setattr(launch, "FUSED_CAP", fused_cap)
    check_op(op, backend, torch.randn(3, 40, 5, device=DEVICE), 1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float16, torch.bfloat16), (torch.float64, torch.float32)])
def test_dtype_argument_casts_first(op, backend, in_dtype, out_dtype):
    """Like torch: the input is rounded to ``dtype`` before the softmax."""
    x = 4 * torch.randn(3, 50, device=DEVICE, dtype=in_dtype)
    with gptkern.backend(backend):
        y = OPS[op](x, -1, dtype=out_dtype)
    assert y.dtype == out_dtype
    assert_close(y, softmax_ref(x.to(out_dtype), -1, log=op == "log_softmax"), out_dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_input_with_float_dtype(op, backend):
    x = torch.randint(-5, 5, (4, 9), device=DEVICE)
    with gptkern.backend(backend):
        y = OPS[op](x, -1, dtype=torch.float32)
    torch.testing.assert_close(y, getattr(torch, op)(x, -1, dtype=torch.float32))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward(op, backend):
    x = torch.randn(3, 11, device=DEVICE, dtype=torch.float64 if backend == "torch" else torch.float32,
                    requires_grad=True)
    g = torch.randn_like(x)
    with gptkern.backend(backend):
        y = OPS[op](x, -1)
        (dx,) = torch.autograd.grad(y, x, g, create_graph=True)
        (ddx,) = torch.autograd.grad((dx * dx).sum(), x)
    xr = x.detach().double().requires_grad_()
    yr = softmax_ref(xr, -1, log=op == "log_softmax")
    (dxr,) = torch.autograd.grad(yr, xr, g.double(), create_graph=True)
    (ddxr,) = torch.autograd.grad((dxr * dxr).sum(), xr)
    torch.testing.assert_close(ddx.double(), ddxr, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_softmax_of_large_logits_keeps_the_log_sum(backend):
    """y = (x - max) - log(sum), not x - (max + log(sum)): the latter rounds log(sum) away once
    |max| is large (log_softmax([1e8, 1e8]) came out 0)."""
    x = torch.cat([torch.full((1, 130), 1e8), torch.randn(3, 130) + 1e4], 0).to(DEVICE)
    with gptkern.backend(backend):
        got = gptkern.ops.log_softmax(x, -1)
    want = torch.log_softmax(x.double(), -1)
    assert_close(got, want, torch.float32)
    assert abs(got[0, 0].item() - (-torch.log(torch.tensor(130.0)).item())) < 1e-5


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_with_other_strides_than_the_output(op, backend):
    """The incoming gradient may be laid out unlike the (contiguous) output: transposed, or a
    broadcast of a sum's gradient (stride 0)."""
    log = op == "log_softmax"
    x = torch.randn(6, 37, device=DEVICE, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    for g in (torch.randn(37, 6, device=DEVICE).t(), torch.ones((), device=DEVICE).expand(6, 37)):
        with gptkern.backend(backend):
            (dx,) = torch.autograd.grad(OPS[op](x, -1), x, g)
        (dxr,) = torch.autograd.grad(softmax_ref(xr, -1, upcast=True, log=log), xr, g.double())
        assert_close(dx, dxr, torch.float32, grad=True, msg=f"{op} {backend} grad strides {g.stride()}")
