"""Tests that need a CUDA device: bf16 and fp16 at realistic sizes, the Triton backend on
GPU against the float64 reference and against torch. Skipped (and reported) without one."""
import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.ops.reference import layer_norm_ref, rms_norm_ref, softmax_ref
from helpers import assert_close

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Shapes around every launcher limit: fused blocks, aligned or not, and looped rows.
SHAPES = [(8192, 8192), (4096, 32768), (333, 1023), (64, 16385), (16, 32769), (8, 131072),
          (2, 262147), (4097, 4099)]


def _inputs(shape, dtype, params):
    x = (3 * torch.randn(shape, device="cuda")).to(dtype).requires_grad_()
    n = shape[-1]
    w = (1 + 0.5 * torch.randn(n, device="cuda")).to(dtype).requires_grad_() if params else None
    b = torch.randn(n, device="cuda").to(dtype).requires_grad_() if params > 1 else None
    return x, w, b


def _grad_check(got, leaves, ref_fn, dtype):
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = ref_fn(*ref_leaves)
    assert_close(got, ref, dtype)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    for name, a, r, leaf in zip("xwb", grads, ref_grads, leaves):
        # dW / dB sum over many rows: allow for that in the absolute tolerance.
        scale = 1.0 if name == "x" else max(1.0, (got.numel() / leaf.numel()) ** 0.5)
        assert_close(a, r, dtype, grad=True, atol_scale=scale, msg=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_cuda(dtype, shape, log):
    x, _, _ = _inputs(shape, dtype, 0)
    with gptkern.backend("triton"):
        y = (gptkern.ops.log_softmax if log else gptkern.ops.softmax)(x, -1)
        if not log:
            _grad_check(y, [x], lambda x: softmax_ref(x, -1), dtype)
            return
        # log_softmax's backward reads the saved output, as torch's does: dx = g - exp(y) * sum(g).
        # A half y is off by up to |y| * 2**-11 (bf16: 2**-8), which exp(y) * sum(g) over 32K
        # columns turns into more than the gradient tolerance (seen on an H200), so dx is compared
        # with that formula on the kernel's own y; y itself against the float64 reference.
        assert_close(y, softmax_ref(x.detach().double(), -1, log=True), dtype)
        g = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, [x], g)
        ref = g.double() - y.detach().double().exp() * g.double().sum(-1, keepdim=True)
        assert_close(dx, ref, dtype, grad=True, msg="dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_cuda(dtype, shape):
    x, w, b = _inputs(shape, dtype, 2)
    n = shape[-1]
    with gptkern.backend("triton"):
        y = gptkern.ops.layer_norm(x, (n,), w, b)
        _grad_check(y, [x, w, b], lambda x, w, b: layer_norm_ref(x, (n,), w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_cuda(dtype, shape):
    x, w, _ = _inputs(shape, dtype, 1)
    n = shape[-1]
    with gptkern.backend("triton"):
        y = gptkern.ops.rms_norm(x, (n,), w, 1e-6)
        _grad_check(y, [x, w], lambda x, w: rms_norm_ref(x, (n,), w, 1e-6), dtype)


def test_auto_uses_triton_on_cuda():
    assert "triton" in gptkern.available_backends()
    x = torch.randn(4, 64, device="cuda")
    from gptkern import _backend
    assert _backend.choose("softmax", x.device, {"triton": lambda: None, "torch": lambda: None}) == "triton"


def test_noncontiguous_and_other_dims_cuda():
    x = torch.randn(64, 512, 48, device="cuda", dtype=torch.bfloat16)
    with gptkern.backend("triton"):
        for dim in (0, 1, 2):
            assert_close(gptkern.ops.softmax(x, dim), softmax_ref(x, dim), torch.bfloat16)
        t = x.transpose(0, 2)
        assert_close(gptkern.ops.layer_norm(t, (64,)), layer_norm_ref(t, (64,)), torch.bfloat16)


def test_compile_fullgraph_cuda():
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = torch.compile(lambda x, w: gptkern.ops.softmax(gptkern.ops.rms_norm(x, (1024,), w), -1),
                      fullgraph=True)
    with gptkern.backend("triton"):
        y = f(x, w)
        y.float().sum().backward()
    ref = softmax_ref(rms_norm_ref(x, (1024,), w), -1)
    assert_close(y, ref, torch.bfloat16)


def test_deterministic_weight_grads_cuda():
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    runs = []
    with gptkern.backend("triton"):
        for _ in range(2):
            y = gptkern.ops.layer_norm(x, (4096,), w, b)
            runs.append(torch.autograd.grad(y, (x, w, b), g))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("cols", [1000, 40000])
def test_nan_inf_cuda(op, cols):
    """NaN and inf propagate as in torch, in the fused and the looped kernels (GPU max
    instructions drop NaN unless told not to)."""
    x = torch.randn(6, cols, device="cuda")
    x[0] = float("-inf")
    x[1, 3] = float("inf")
    x[2, 7] = float("nan")
    x[3, : cols // 2] = float("-inf")
    x[4, 0] = float("nan")
    with gptkern.backend("triton"):
        y = getattr(gptkern.ops, op)(x, -1)
    torch.testing.assert_close(y, getattr(torch, op)(x, -1), equal_nan=True, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_other_dims_backward_and_dtype_arg_cuda(op):
    x = torch.randn(33, 700, 5, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with gptkern.backend("triton"):
        y = getattr(gptkern.ops, op)(x, 1, dtype=torch.float32)
        assert y.dtype == torch.float32
        _grad_check(y, [x], lambda x: softmax_ref(x, 1, log=op == "log_softmax"), torch.bfloat16)


def test_large_strided_softmax_int64_offsets_cuda():
    """Reducing over dim 0 of a tensor with more than 2**31 elements (int64 column offsets)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.randn(65537, 32768, device="cuda", dtype=torch.bfloat16)
    with gptkern.backend("triton"):
        y = gptkern.ops.softmax(x, 0)
    cols = [0, 12345, 32767]
    torch.testing.assert_close(y[:, cols].float(), torch.softmax(x[:, cols].float(), 0), atol=1e-3, rtol=2e-2)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_cuda_autocast_runs_softmax_and_norms_in_the_dtype_torchs_do(backend):
    if backend != "auto" and backend not in gptkern.available_backends():  # (auto is always there)
        pytest.skip(f"{backend} not built here")
    x = torch.randn(6, 256, device="cuda", dtype=torch.bfloat16)
    w, b = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with gptkern.backend(backend):
            got = [gptkern.ops.softmax(x, -1), gptkern.ops.log_softmax(x, -1),
                   gptkern.ops.layer_norm(x, (256,), w.bfloat16(), b), gptkern.ops.rms_norm(x, (256,), w)]
        want = [torch.softmax(x, -1), torch.log_softmax(x, -1), F.layer_norm(x, (256,), w.bfloat16(), b),
                F.rms_norm(x, (256,), w)]
    for a, r in zip(got, want):  # float32 (rms_norm: from torch 2.12; before, bf16 as its input)
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, atol=1e-5 if r.dtype == torch.float32 else 1e-2, rtol=1e-2)
