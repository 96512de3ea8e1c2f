"""Property tests: hypothesis draws shapes, dims, dtypes and backends; every op must match
the float64 reference."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import gptkern  # noqa: E402
from gptkern.ops.reference import layer_norm_ref, rms_norm_ref, softmax_ref  # noqa: E402
from helpers import assert_close, backends_here, dtypes_for  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_here(DEVICE)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def problems(draw, max_rank=4, max_numel=4096):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from(dtypes_for(backend, DEVICE)))
    rank = draw(st.integers(1, max_rank))
    shape = draw(st.lists(st.integers(1, 70), min_size=rank, max_size=rank).filter(
        lambda s: torch.Size(s).numel() <= max_numel))
    transpose = rank >= 2 and draw(st.booleans())
    return backend, dtype, shape, transpose


def make_input(shape, dtype, transpose, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
    return x.transpose(0, -1) if transpose else x


@SETTINGS
@given(problem=problems(), log=st.booleans(), data=st.data())
def test_softmax_property(problem, log, data):
    backend, dtype, shape, transpose = problem
    x = make_input(shape, dtype, transpose, data.draw(st.integers(0, 2**16))).requires_grad_()
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1))
    fn = gptkern.ops.log_softmax if log else gptkern.ops.softmax
    with gptkern.backend(backend):
        y = fn(x, dim)
        g = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, g)
    xr = x.detach().double().requires_grad_()
    yr = softmax_ref(xr, dim, log=log)
    (dxr,) = torch.autograd.grad(yr, xr, g.double())
    assert_close(y, yr, dtype)
    assert_close(dx, dxr, dtype, grad=True)


@SETTINGS
@given(problem=problems(), rms=st.booleans(), affine=st.booleans(), data=st.data())
def test_norm_property(problem, rms, affine, data):
    backend, dtype, shape, transpose = problem
    x = make_input(shape, dtype, transpose, data.draw(st.integers(0, 2**16)))
    k = data.draw(st.integers(1, x.dim()))
    norm_shape = tuple(x.shape[x.dim() - k:])
    w = (1 + 0.3 * torch.randn(norm_shape)).to(DEVICE, dtype) if affine else None
    b = torch.randn(norm_shape).to(DEVICE, dtype) if affine and not rms else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    with gptkern.backend(backend):
        y = (gptkern.ops.rms_norm(x, norm_shape, w, 1e-5) if rms
             else gptkern.ops.layer_norm(x, norm_shape, w, b, 1e-5))
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, wr, br = (ref_leaves + [None, None])[:3] if affine else (ref_leaves[0], None, None)
    ref = (rms_norm_ref(xr, norm_shape, wr, 1e-5) if rms
           else layer_norm_ref(xr, norm_shape, wr, br, 1e-5))
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, ref, dtype)
    if backend == "torch" and dtype != torch.float32:
        return  # PyTorch's own 16-bit CPU norm backward is not ours to grade
    for got, want, leaf in zip(grads, torch.autograd.grad(ref, ref_leaves, g.double()), leaves):
        scale = max(1.0, (x.numel() / leaf.numel()) ** 0.5)
        assert_close(got, want, dtype, grad=True, atol_scale=scale)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_attention_property(data):
    """Random batch, heads (GQA), lengths, head dims, causal and scale: SDPA and varlen."""
    import torch.nn.functional as F

    backend = data.draw(st.sampled_from(backends_here(DEVICE, attention=True)))
    dtype = data.draw(st.sampled_from(dtypes_for(backend, DEVICE)))
    hk = data.draw(st.integers(1, 2))
    h = hk * data.draw(st.integers(1, 3))
    b, l, s = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 80)), data.draw(st.integers(1, 80))
    d, dv = data.draw(st.integers(1, 48)), data.draw(st.integers(1, 48))
    causal = data.draw(st.booleans())
    scale = data.draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v = ((torch.randn(shape, generator=gen)).to(DEVICE, dtype)
               for shape in ((b, h, l, d), (b, hk, s, d), (b, hk, s, dv)))
    with gptkern.backend(backend):
        out = gptkern.ops.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, scale=scale,
                                         enable_gqa=True)
    assert_close(out, ref, dtype)
