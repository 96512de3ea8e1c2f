"""layer_norm / rms_norm on every backend that runs here, against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.kernels import launch
from gptkern.ops.norms import default_rms_eps
from gptkern.ops.reference import layer_norm_ref, rms_norm_ref
from helpers import GRAD_TOLERANCES, assert_close, backends_here, dtypes_for, noncontiguous, poisoned_allocations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_here(DEVICE)
PARAMS = [(b, d) for b in BACKENDS for d in dtypes_for(b, DEVICE)]
# (input shape, normalized_shape): odd sizes 1, 7, 1023, primes, several normalized dims.
SHAPES = [((3, 1), (1,)), ((7,), (7,)), ((2, 1023), (1023,)), ((5, 3, 13), (13,)),
          ((4, 3, 5), (3, 5)), ((2, 2, 3, 7), (2, 3, 7)), ((1, 97), (97,))]


def call(op, x, shape, w, b, eps):
    if op == "layer_norm":
        return gptkern.ops.layer_norm(x, shape, w, b, eps)
    return gptkern.ops.rms_norm(x, shape, w, eps)


def reference(op, x, shape, w, b, eps):
    if op == "layer_norm":
        return layer_norm_ref(x, shape, w, b, 1e-5 if eps is None else eps)
    return rms_norm_ref(x, shape, w, eps)


def make_params(shape, dtype, affine, bias):
    w = 1 + 0.5 * torch.randn(shape, device=DEVICE, dtype=dtype) if affine else None
    b = torch.randn(shape, device=DEVICE, dtype=dtype) if bias else None
    return w, b


def check_norm(op, backend, x, shape, w, b, eps):
    """Forward, dX, dW and dB of ``op`` against the float64 reference."""
    dtype = x.dtype
    leaves = [t for t in (x, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    with gptkern.backend(backend), poisoned_allocations():
        y = call(op, x, shape, w, b, eps)
    assert y.dtype == dtype and y.shape == x.shape
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(ref_leaves)
    xr, wr, br = next(it), next(it) if w is not None else None, next(it) if b is not None else None
    if op == "rms_norm" and eps is None:  # the default eps is that of the input dtype
        yr = rms_norm_ref(xr, shape, wr, default_rms_eps(dtype))
    else:
        yr = reference(op, xr, shape, wr, br, eps)
    assert_close(y, yr, dtype, msg=f"{op} {backend} forward")
    g = torch.randn_like(y)
    with gptkern.backend(backend), poisoned_allocations():
        grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(yr, ref_leaves, g.double())
    # A row of zero variance (rstd = 1/sqrt(eps), e.g. normalized_shape (1,)) magnifies fp32 rounding:
    # dX = rstd * (w*dy - corrections) cancels terms of size rstd*|w*dy|, and xhat = (x - mean) * rstd
    # is off by about rstd * ulp(x), which dW sums over the rows.
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    lead = tuple(range(x.dim() - len(shape)))
    xd = xr.detach()
    var = (xd * xd).mean(dims, keepdim=True) if op == "rms_norm" else xd.var(dims, unbiased=False, keepdim=True)
    eps_used = eps if eps is not None else (default_rms_eps(dtype) if op == "rms_norm" else 1e-5)
    rstd = (var + eps_used).rsqrt()
    gd = g.double()
    magnified = {"x": rstd * (gd * (wr.detach() if wr is not None else 1.0)).abs(),
                 "w": (gd.abs() * rstd * xd.abs()).sum(lead), "b": torch.zeros(())}
    for name, got, want, leaf in zip("xwb", grads, grads_ref, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        tol = GRAD_TOLERANCES[dtype]
        # dW/dB sum over rows: scale the absolute tolerance with the size of the sum.
        atol = tol["atol"] * (1.0 if name == "x" else max(1.0, (x.numel() / leaf.numel()) ** 0.5))
        bound = atol + tol["rtol"] * want.abs() + 8 * torch.finfo(torch.float32).eps * magnified[name]
        err = (got.double() - want).abs()
        assert bool((err <= bound).all()), f"d{name} {op} {backend}: error {err.max():.3g} over the bound"


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("x_shape,shape", SHAPES)
def test_odd_shapes(op, backend, dtype, x_shape, shape):
    x = 2 + 3 * torch.randn(x_shape, device=DEVICE, dtype=dtype)
    w, b = make_params(shape, dtype, True, op == "layer_norm")
    check_norm(op, backend, x, shape, w, b, 1e-5)


OPTIONAL = [("layer_norm", affine, bias, eps) for affine, bias in [(False, False), (True, False), (False, True)]
            for eps in (1e-5, 0.1)] + [("rms_norm", affine, False, eps) for affine in (False, True)
                                       for eps in (1e-5, 0.1, None)]


@pytest.mark.parametrize("op,affine,bias,eps", OPTIONAL)
@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_params_and_eps(op, backend, affine, bias, eps):
    x = torch.randn(6, 29, device=DEVICE)
    w, b = make_params((29,), torch.float32, affine, bias)
    check_norm(op, backend, x, (29,), w, b, eps)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_noncontiguous_views(op, backend, dtype):
    x = noncontiguous(torch.randn(5, 4, 19, device=DEVICE, dtype=dtype))
    w, b = make_params((19,), dtype, True, op == "layer_norm")
    check_norm(op, backend, x, (19,), w, b, 1e-5)
    t = torch.randn(12, 3, 8, device=DEVICE, dtype=dtype).transpose(0, 1)  # (3, 12, 8)
    w, b = make_params((12, 8), dtype, True, op == "layer_norm")
    check_norm(op, backend, t, (12, 8), w, b, 1e-5)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_looped_rows(op, backend, monkeypatch):
    """Rows wider than one block go through the multi-pass kernels."""
    monkeypatch.setattr(launch, "FUSED_CAP", 32)
    x = 5 + torch.randn(9, 203, device=DEVICE)
    w, b = make_params((203,), torch.float32, True, op == "layer_norm")
    check_norm(op, backend, x, (203,), w, b, 1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton does not run here")
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("fused_cap", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_prefetch_is_correct_and_changes_no_bits(op, fused_cap, dtype, affine, monkeypatch):
    """The Triton backward's autotuning alternative (each program loads its next row early) gives
    the reference's gradients and the same bits as the default, fused and looped, with programs
    of several rows and a last one of fewer (13 rows in 4 programs, on a GPU too), on a strided
    input, with and without a weight (without one, dy's masked lanes enter the row sums)."""
    from gptkern.kernels import norms as kernels

    monkeypatch.setattr(launch, "FUSED_CAP", fused_cap)
    warps = []
    monkeypatch.setattr(kernels, "reduction_programs", lambda device, rows, w: (warps.append(w), min(rows, 4))[1])
    base = (3 + torch.randn(13, 256, device=DEVICE)).to(dtype)
    w, b = make_params((203,), dtype, affine, affine and op == "layer_norm")
    g = torch.randn(13, 203, device=DEVICE).to(dtype)
    grads = {}
    for prefetch in (False, True):
        monkeypatch.setattr(kernels, "PREFETCH_CHOICES", (prefetch,))
        x = base.clone()[:, :203]  # row stride 256
        assert x.stride() == (256, 1)
        ws, bs = (t.detach().clone() if t is not None else None for t in (w, b))
        check_norm(op, "triton", x, (203,), ws, bs, 1e-5)
        leaves = [t for t in (x, ws, bs) if t is not None]
        with gptkern.backend("triton"), poisoned_allocations():
            grads[prefetch] = torch.autograd.grad(call(op, x, (203,), ws, bs, 1e-5), leaves, g)
    for without, with_prefetch in zip(grads[False], grads[True]):
        assert torch.equal(without, with_prefetch)
    block = 256 if fused_cap is None else 64  # the programs' warps (how many programs a GPU gets)
    assert set(warps) == {launch.NORM_BWD.warps(block, fused_cap is None)}


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_looped_rows_add_eps(op, backend, monkeypatch):
    """The multi-pass kernels add eps to the variance too (a large eps shows it)."""
    monkeypatch.setattr(launch, "FUSED_CAP", 32)
    x = torch.randn(3, 45, device=DEVICE)
    w, b = make_params((45,), torch.float32, True, op == "layer_norm")
    check_norm(op, backend, x, (45,), w, b, 0.5)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_cap", [None, 16])
def test_padded_rows(op, backend, fused_cap, monkeypatch):
    """Rows of x padded in memory (row stride 50 for 37 values) while the gradient is contiguous:
    each tensor is read with its own row stride, in the fused and the multi-pass kernels."""
    monkeypatch.setattr(launch, "FUSED_CAP", fused_cap)
    x = (1 + torch.randn(5, 50, device=DEVICE))[:, :37]
    w, b = make_params((37,), torch.float32, True, op == "layer_norm")
    check_norm(op, backend, x, (37,), w, b, 1e-5)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_very_long_row(op, backend):
    x = torch.randn(2, 40000 + 1, device=DEVICE)
    assert launch.row_block(launch.NORM_FWD, x.shape[-1], aligned=True, elem_bytes=4)[1] is False
    w, b = make_params((x.shape[-1],), torch.float32, True, op == "layer_norm")
    check_norm(op, backend, x, (x.shape[-1],), w, b, 1e-5)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_4m_wide_row(op, backend):
    """A row of 4M fp32 elements keeps the fp32 tolerance: its sums must not drift with n (the C++
    kernel's 32 fp32 lanes over the whole row were off by 2e-4). 1M under Triton's interpreter
    (17 s; its lanes sum 4096-wide tiles, 256 adds each)."""
    n = (1 << 20 if backend == "triton" and DEVICE.type == "cpu" else 1 << 22) + 3
    x = 1.5 + 3 * torch.randn(1, n, device=DEVICE)
    w, b = make_params((n,), torch.float32, True, op == "layer_norm")
    check_norm(op, backend, x, (n,), w, b, 1e-5)
    # the statistics' error is what the tolerance table would hide here: about 1e-7 of max |y|
    # with sums that do not drift (torch's too), 1e-5 with the drifting ones
    with torch.no_grad(), gptkern.backend(backend):
        y = call(op, x, (n,), w, b, 1e-5).double()
    want = reference(op, x.double(), (n,), w.double(), None if b is None else b.double(), 1e-5)
    assert (y - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_deterministic(op, backend):
    """dW and dB are bit-identical from run to run (two-stage sums, no atomics)."""
    x = torch.randn(67, 48, device=DEVICE, requires_grad=True)
    w, b = make_params((48,), torch.float32, True, op == "layer_norm")
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    g = torch.randn(67, 48, device=DEVICE)
    runs = []
    for _ in range(2):
        with gptkern.backend(backend):
            y = call(op, x, (48,), w, b, 1e-5)
            runs.append(torch.autograd.grad(y, leaves, g))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(op, backend):
    x = torch.randn(0, 3, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(8, device=DEVICE, requires_grad=True)
    with gptkern.backend(backend):
        y = call(op, x, (8,), w, None, 1e-5)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_as_torch(op, backend):
    x = torch.randn(4, 16, device=DEVICE)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    w = torch.randn(16, device=DEVICE)
    with gptkern.backend(backend):
        y = call(op, x, (16,), w, None, 1e-5)
    expected = (F.layer_norm(x, (16,), w, None, 1e-5) if op == "layer_norm"
                else F.rms_norm(x, (16,), w, 1e-5))
    torch.testing.assert_close(y, expected, equal_nan=True, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_param_dtype(backend):
    """fp16 input with fp32 weight and bias: output in fp16, grads in each tensor's dtype."""
    x = torch.randn(5, 24, device=DEVICE, dtype=torch.float16)
    w, b = make_params((24,), torch.float32, True, True)
    for t in (x, w, b):
        t.requires_grad_(True)
    with gptkern.backend(backend):
        y = gptkern.ops.layer_norm(x, (24,), w, b)
        grads = torch.autograd.grad(y.float().sum(), (x, w, b))
    assert y.dtype == torch.float16
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32]
    assert_close(y, layer_norm_ref(x, (24,), w, b), torch.float16)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_rms_norm_default_eps_matches_torch(backend, dtype):
    """eps=None is the fp32 epsilon for 16-bit inputs; tiny inputs make the difference visible."""
    x = 1e-3 * torch.randn(4, 64, device=DEVICE, dtype=dtype)
    w = 1 + 0.5 * torch.randn(64, device=DEVICE, dtype=dtype)
    with gptkern.backend(backend):
        y = gptkern.ops.rms_norm(x, (64,), w)
    assert_close(y, F.rms_norm(x.double(), (64,), w.double(), eps=torch.finfo(torch.float32).eps), dtype)
    m = gptkern.nn.RMSNorm(64, device=DEVICE, dtype=dtype)
    with gptkern.backend(backend):
        assert_close(m(x), torch.nn.RMSNorm(64, device=DEVICE, dtype=dtype)(x), dtype)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight(op, backend):
    """A weight that needs no gradient: dX still right, no dW computed."""
    x = torch.randn(7, 33, device=DEVICE, requires_grad=True)
    w, b = make_params((33,), torch.float32, True, op == "layer_norm")
    g = torch.randn(7, 33, device=DEVICE)
    with gptkern.backend(backend):
        (dx,) = torch.autograd.grad(call(op, x, (33,), w, b, 1e-5), x, g)
    xr = x.detach().double().requires_grad_()
    (dxr,) = torch.autograd.grad(reference(op, xr, (33,), w.double(), None if b is None else b.double(),
                                           1e-5), xr, g.double())
    assert_close(dx, dxr, torch.float32, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_mixed_param_dtype(backend):
    x = torch.randn(5, 24, device=DEVICE, dtype=torch.float16, requires_grad=True)
    w = (1 + 0.5 * torch.randn(24, device=DEVICE)).requires_grad_()
    g = torch.randn(5, 24, device=DEVICE, dtype=torch.float16)
    with gptkern.backend(backend):
        y = gptkern.ops.rms_norm(x, (24,), w, 1e-5)
        dx, dw = torch.autograd.grad(y, (x, w), g)
    assert y.dtype == torch.float16 and dx.dtype == torch.float16 and dw.dtype == torch.float32
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = rms_norm_ref(xr, (24,), wr, 1e-5)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), g.double())
    assert_close(y, yr, torch.float16)
    assert_close(dx, dxr, torch.float16, grad=True)
    assert_close(dw, dwr, torch.float16, grad=True, atol_scale=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_shape_accepts_index_types(backend):
    import numpy as np

    x = torch.randn(3, 8, device=DEVICE)
    with gptkern.backend(backend):
        a = gptkern.ops.layer_norm(x, (np.int64(8),))
        b = gptkern.ops.rms_norm(x, [torch.tensor(8)])
    torch.testing.assert_close(a, F.layer_norm(x, (8,)))
    torch.testing.assert_close(b, F.rms_norm(x, (8,)))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["all", "input only", "params only"])
def test_double_backward(op, backend, which):
    x = torch.randn(4, 10, device=DEVICE)
    w, b = make_params((10,), torch.float32, True, op == "layer_norm")
    wanted = {"all": (x, w, b), "input only": (x,), "params only": (w, b)}[which]
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(any(t is u for u in wanted))
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    g = torch.randn(4, 10, device=DEVICE)
    # (the gradients of the weight and bias alone do not depend on them: no second order then)
    second_order = which != "params only"
    with gptkern.backend(backend):
        grads = torch.autograd.grad(call(op, x, (10,), w, b, 1e-5), leaves, g, create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in grads), leaves, allow_unused=True) \
            if second_order else ()
    ref_all = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b)]
    ref_leaves = [t for t in ref_all if t is not None and t.requires_grad]
    xr, wr, br = ref_all
    ref_grads = torch.autograd.grad(reference(op, xr, (10,), wr, br, 1e-5), ref_leaves, g.double(),
                                    create_graph=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    ref_second = torch.autograd.grad(sum((t * t).sum() for t in ref_grads), ref_leaves, allow_unused=True) \
        if second_order else ()
    for got, want, leaf in zip(second, ref_second, ref_leaves):
        got = torch.zeros_like(leaf) if got is None else got.double()
        want = torch.zeros_like(leaf) if want is None else want
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_shape,shape", [((3, 0), (0,)), ((2, 0, 3), (0, 3))])
def test_empty_normalized_shape(op, backend, x_shape, shape):
    x = torch.randn(x_shape, device=DEVICE, requires_grad=True)
    w = torch.randn(shape, device=DEVICE, requires_grad=True)
    with gptkern.backend(backend):
        y = call(op, x, shape, w, None, 1e-5)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("triton", "cpu", "cuda")])
@pytest.mark.parametrize("n", [5, 16, 17])
def test_constant_huge_rows(backend, n):
    """A row of one huge value: zero variance, (0 - mean) * rstd overflows in any padding lane; dX is
    rstd * (w*dy - mean(w*dy)) and finite (tails shorter than a vector must not turn it into NaN).
    gptkern's kernels only: PyTorch's own layer_norm backward gives NaN here (rstd**3 terms)."""
    x = torch.full((3, n), 2.0 ** 123, device=DEVICE)
    w = 1 + 0.5 * torch.randn(n, device=DEVICE)
    g = torch.randn(3, n, device=DEVICE)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    with gptkern.backend(backend):
        y = gptkern.ops.layer_norm(xl, (n,), wl, None, 1e-5)
        dx, dw = torch.autograd.grad(y, (xl, wl), g)
    wg = (g * w).double()
    want = (wg - wg.mean(-1, keepdim=True)) / (1e-5 ** 0.5)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    torch.testing.assert_close(dx.double(), want, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(dw, torch.zeros_like(dw), atol=0, rtol=0)  # xhat = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_of_constant_and_near_constant_rows(backend):
    """A constant row normalizes to the bias exactly (its mean must be exact, else rstd ~ 1/sqrt(eps)
    amplifies the rounding), a near-constant one close to float64; eps=0 on a constant row is NaN
    (0/0), as torch."""
    n = 4100
    x = torch.stack([torch.full((n,), 1000.1), 1000.1 + 1e-4 * torch.randn(n)]).to(DEVICE)
    bias = torch.randn(n, device=DEVICE)
    with gptkern.backend(backend):
        got = gptkern.ops.layer_norm(x, (n,), None, bias)
        zero_eps = gptkern.ops.layer_norm(x[:1], (n,), eps=0.0)
    assert torch.equal(got[0], bias)
    want = F.layer_norm(x.double(), (n,), None, bias.double())
    assert (got[1].double() - want[1]).abs().max() < 2e-2  # torch's own fp32 error here is about 1e-3
    assert zero_eps.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_of_an_inference_mode_input(backend):
    """F.rms_norm trains its weight on an input made under torch.inference_mode (features cached
    without autograd); gptkern too (its ops would save the inference tensor, which autograd refuses)."""
    torch.manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(4, 3, 64, device=DEVICE)
    weight = torch.randn(64, device=DEVICE, requires_grad=True)
    with gptkern.backend(backend):
        got = torch.autograd.grad(gptkern.ops.rms_norm(x, (64,), weight).square().sum(), weight)[0]
    want = torch.autograd.grad(F.rms_norm(x, (64,), weight).square().sum(), weight)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_backward_grid_fits_cuda_limits_at_the_longest_rows(monkeypatch):
    """The looped backward launches one program per 4096-column tile: at the longest row the
    Triton path takes (2**31 - 4097 elements), tiles go on the grid's first axis; the second
    (65535 at most on CUDA) holds the row groups. Meta tensors, recorded launches: nothing runs."""
    from gptkern.kernels import norms as kernels
    from gptkern.ops._checks import row_size_limits

    grids = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.setdefault(self.name, grid)

    for name in ("_norm_bwd_kernel", "_norm_bwd_row_sums_kernel", "_sum_rows_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(name))
    n = 2**31 - 1 - 4096
    assert row_size_limits("triton", n, 2) is None  # auto sends it to Triton
    x = torch.empty((2, n), device="meta", dtype=torch.bfloat16)
    w = torch.empty(n, device="meta", dtype=torch.bfloat16)
    stats = torch.empty(2, device="meta")
    kernels.norm_bwd(x, x, n, w, stats, stats, False, True, True, torch.empty_like(x), torch.empty_like(w),
                     torch.empty_like(w))
    for name, grid in grids.items():
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), (name, grid)
    assert grids["_norm_bwd_kernel"][0] > 65535  # the tiles: past the second axis' limit


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton does not run here")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,n", [(150, 100), (128, 64), (1, 7), (257, 33), (1024, 40), (1025, 40),
                                      (2500, 33)])
def test_dw_db_partials_sum_over_every_group(groups, n, out_dtype, monkeypatch):
    """The norm backward's last step adds its (G, N) fp32 partials over G, BLOCK_G rows a step:
    more groups than a step (a GPU has 4 to 32 per multiprocessor; the interpreter's backward
    makes 4), a ragged last step and column tile; past SUM_ROWS_CHUNK groups, chunks first (the
    last of one group, or ragged); the output's dtype; against a float64 sum."""
    from gptkern.kernels import norms as kernels

    monkeypatch.setattr(kernels, "SUM_ROWS_BLOCK_N_INTERPRETER", 32)  # column tiles as on a GPU
    partial = 0.5 + torch.rand(groups, n, device=DEVICE)  # each row moves every sum past fp32's tolerance
    out = torch.full((n,), float("nan"), device=DEVICE, dtype=out_dtype)
    kernels.sum_rows(partial, out)
    assert_close(out, partial.double().sum(0), out_dtype)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton does not run here")
def test_dw_db_partials_sum_in_chunks(monkeypatch):
    """Past 4 chunks of rows the sum adds the chunks in parallel first (one launch of a program per
    column tile and chunk), then their sums: with chunks of 200 rows, not a multiple of the kernel's
    128-row step, 1001 rows make 6 chunks, the last of one row."""
    from gptkern.kernels import norms as kernels

    grids = []
    kernel = kernels._sum_rows_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(kernels, "_sum_rows_kernel", Recorder())
    monkeypatch.setattr(kernels, "SUM_ROWS_CHUNK", 200)
    monkeypatch.setattr(kernels, "SUM_ROWS_BLOCK_N_INTERPRETER", 32)  # column tiles as on a GPU
    partial = 0.5 + torch.rand(1001, 40, device=DEVICE)
    out = torch.full((40,), float("nan"), device=DEVICE)
    kernels.sum_rows(partial, out)
    assert grids == [(2, 6), (2, 1)]
    assert_close(out, partial.double().sum(0), torch.float32)
    grids.clear()
    kernels.sum_rows(partial[:800], out)  # 4 chunks: one pass
    assert grids == [(2, 1)]
    assert_close(out, partial[:800].double().sum(0), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_eps_zero_is_zero(backend):
    """eps=0.0 is an eps of 0, as F.rms_norm's, not eps=None's machine epsilon (tiny rows show it)."""
    x = 1e-4 * torch.randn(4, 64, device=DEVICE)
    with gptkern.backend(backend):
        got = gptkern.ops.rms_norm(x, (64,), eps=0.0)
    torch.testing.assert_close(got, F.rms_norm(x, (64,), eps=0.0))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_uses_the_given_eps(op, backend):
    """create_graph=True gradients with an eps far from the default (small rows make eps matter)."""
    x = (0.05 * torch.randn(4, 16, device=DEVICE)).requires_grad_()
    w = torch.randn(16, device=DEVICE).requires_grad_()
    g = torch.randn(4, 16, device=DEVICE)
    want = torch.autograd.grad(reference(op, x.double(), (16,), w.double(), None, 0.1), x, g.double(),
                               create_graph=True)[0]
    with gptkern.backend(backend):
        got = torch.autograd.grad(call(op, x, (16,), w, None, 0.1), x, g, create_graph=True)[0]
    assert_close(got, want, torch.float32, grad=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("triton", "cpu", "cuda")])
def test_fp32_weight_grads_of_a_16_bit_input_keep_fp32_precision(backend):
    """The kernels accumulate dw / db in fp32 and store them in the parameters' dtype: not rounded
    through the input's fp16 (a relative error of ~1e-3; torch's own CPU layer_norm does round)."""
    x = torch.randn(8, 512, dtype=torch.float16, device=DEVICE)
    w = (1 + 0.1 * torch.randn(512, device=DEVICE)).requires_grad_()
    b = (0.1 * torch.randn(512, device=DEVICE)).requires_grad_()
    g = torch.randn(8, 512, dtype=torch.float16, device=DEVICE)
    with gptkern.backend(backend):
        got = torch.autograd.grad(gptkern.ops.layer_norm(x, (512,), w, b), (w, b), g)
    want = torch.autograd.grad(F.layer_norm(x.double(), (512,), w.double(), b.double()), (w, b), g.double())
    for a, e in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e.double(), atol=1e-4, rtol=1e-5)
