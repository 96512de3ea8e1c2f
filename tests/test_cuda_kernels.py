"""The CUDA C++ kernels of gptkern._C on a CUDA device: each op against the float64 reference and
against the torch backend (error at most twice torch's own, plus the dtype's tolerance), fp32 /
fp16 / bf16, odd shapes, both kernel paths (warp and block per row, vector and scalar loads),
reductions over inner dims, non-contiguous inputs; attention (causal or not, GQA, L != S) with
its LSE against the Triton kernel's, gradients through attention_bwd (Triton on CUDA); decode
with ragged cache_seqlens (0 and 1 included), paged against static caches, one split and many.
Skipped (and reported) without a CUDA device."""
import math

import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern import _backend
from gptkern.ops.reference import layer_norm_ref, rms_norm_ref, softmax_ref
from helpers import TOLERANCES, assert_close

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    ext = _backend._extension()
    if ext is None or "cuda" not in ext.devices:
        pytest.fail("gptkern._C has no CUDA kernels: build them with "
                    "GPTKERN_BUILD_CUDA=1 pip install --no-deps --no-build-isolation -e .")


def check_vs_torch(got, torch_out, ref, dtype, msg="", grad=False):
    """got within the dtype's tolerance of ref, and its error at most 2x torch's (+ atol)."""
    assert_close(got, ref, dtype, grad=grad, msg=msg)
    err = (got.double() - ref.double()).abs().nan_to_num(0).max().item()
    torch_err = (torch_out.double() - ref.double()).abs().nan_to_num(0).max().item()
    assert err <= 2 * torch_err + TOLERANCES[dtype]["atol"], f"{msg}: error {err:.3g}, torch's {torch_err:.3g}"


def run_both(fn, *tensors):
    """fn under the cuda and the torch backend: (outputs, grads) of each, same upstream gradient."""
    results = []
    g = None
    for name in ("cuda", "torch"):
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
        with gptkern.backend(name):
            y = fn(*leaves)
            g = torch.randn_like(y) if g is None else g
            grads = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], g)
        results.append((y, grads))
    return results, g


# ----------------------------------------------------------------------------------- softmax

# Columns around the warp / block boundary (1024), vector and scalar loads, long rows.
SOFTMAX_SHAPES = [(1, 1), (7, 33), (333, 1023), (64, 1024), (65, 1025), (16, 4099), (8, 32768), (2, 262147)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("log", [False, True])
def test_softmax(dtype, shape, log):
    x = 3 * torch.randn(shape, device="cuda").to(dtype)
    fn = (lambda t: gptkern.ops.log_softmax(t, -1)) if log else (lambda t: gptkern.ops.softmax(t, -1))
    ((y, (dx,)), (yt, (dxt,))), g = run_both(fn, x)
    xr = x.double().requires_grad_()
    ref = softmax_ref(xr, -1, log=log)
    (dref,) = torch.autograd.grad(ref, xr, g.double())
    check_vs_torch(y, yt, ref, dtype, "forward")
    check_vs_torch(dx, dxt, dref, dtype, "backward", grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_softmax_inner_dims_and_views(dtype, dim):
    base = torch.randn(37, 300, 5, device="cuda").to(dtype)
    for x in (base, base.transpose(0, 2)):  # contiguous and strided
        ((y, (dx,)), (yt, (dxt,))), g = run_both(lambda t: gptkern.ops.softmax(t, dim), x)
        xr = x.double().requires_grad_()
        ref = softmax_ref(xr, dim)
        (dref,) = torch.autograd.grad(ref, xr, g.double())
        check_vs_torch(y, yt, ref, dtype, f"dim {dim} forward")
        check_vs_torch(dx, dxt, dref, dtype, f"dim {dim} backward", grad=True)


@pytest.mark.parametrize("dtype", HALF)
def test_softmax_16_bit_in_fp32_out(dtype):
    x = torch.randn(129, 2000, device="cuda").to(dtype)
    with gptkern.backend("cuda"):
        y = gptkern.ops.log_softmax(x, -1, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, softmax_ref(x, -1, log=True), torch.float32)


@pytest.mark.parametrize("cols", [100, 5000])
def test_softmax_nan_inf_and_edge_shapes(cols):
    x = torch.randn(6, cols, device="cuda")
    x[0] = float("-inf")
    x[1, 3] = float("inf")
    x[2, 7] = float("nan")
    x[3, : cols // 2] = float("-inf")
    with gptkern.backend("cuda"):
        for op in (gptkern.ops.softmax, gptkern.ops.log_softmax):
            name = op.__name__
            torch.testing.assert_close(op(x, -1), getattr(torch, name)(x, -1), equal_nan=True, atol=1e-5, rtol=1e-5)
        assert gptkern.ops.softmax(torch.tensor(2.0, device="cuda"), 0).item() == 1.0
        assert gptkern.ops.softmax(torch.empty(0, 5, device="cuda"), -1).shape == (0, 5)


# ------------------------------------------------------------------------------------- norms

NORM_COLS = [1, 7, 1023, 1024, 1025, 4099, 32768]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", NORM_COLS)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norms(dtype, cols, kind):
    rows = max(1, 2 ** 20 // cols) if cols > 1 else 300
    x = (2 + 3 * torch.randn(rows, cols, device="cuda")).to(dtype)
    w = (1 + 0.5 * torch.randn(cols, device="cuda")).to(dtype)
    b = torch.randn(cols, device="cuda").to(dtype)
    if kind == "layer_norm":
        fn = lambda x, w, b: gptkern.ops.layer_norm(x, (cols,), w, b)  # noqa: E731
        ref_fn = lambda x, w, b: layer_norm_ref(x, (cols,), w, b)  # noqa: E731
        args = (x, w, b)
    else:
        fn = lambda x, w: gptkern.ops.rms_norm(x, (cols,), w, 1e-6)  # noqa: E731
        ref_fn = lambda x, w: rms_norm_ref(x, (cols,), w, 1e-6)  # noqa: E731
        args = (x, w)
    ((y, grads), (yt, grads_t)), g = run_both(fn, *args)
    leaves = [t.double().requires_grad_() for t in args]
    ref = ref_fn(*leaves)
    check_vs_torch(y, yt, ref, dtype, "forward")
    for name, got, tgot, want in zip("xwb", grads, grads_t, torch.autograd.grad(ref, leaves, g.double())):
        scale = 1.0 if name == "x" else max(1.0, rows ** 0.5)  # dW / dB sum over the rows
        assert_close(got, want, dtype, grad=True, atol_scale=scale, msg=f"d{name}")


@pytest.mark.parametrize("dtype", HALF)
def test_norm_mixed_params_views_and_frozen_weight(dtype):
    x = torch.randn(64, 8, 48, device="cuda").to(dtype).transpose(0, 1)  # (8, 64, 48) strided
    w = torch.randn(64, 48, device="cuda", requires_grad=True)  # fp32 weight with 16-bit input
    b = torch.randn(64, 48, device="cuda")                        # bias without gradient
    xl = x.detach().requires_grad_()
    with gptkern.backend("cuda"):
        y = gptkern.ops.layer_norm(xl, (64, 48), w, b)
        dx, dw = torch.autograd.grad(y, (xl, w), torch.ones_like(y))
    leaves = [t.detach().double().requires_grad_() for t in (x, w)]
    ref = layer_norm_ref(leaves[0], (64, 48), leaves[1], b.double())
    assert_close(y, ref, dtype)
    rdx, rdw = torch.autograd.grad(ref, leaves, torch.ones_like(ref))
    assert_close(dx, rdx, dtype, grad=True)
    assert_close(dw, rdw, dtype, grad=True, atol_scale=4)
    assert dw.dtype == torch.float32


def test_norm_weight_grads_bitwise_deterministic():
    x = torch.randn(4097, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    with gptkern.backend("cuda"):
        runs = [torch.autograd.grad(gptkern.ops.layer_norm(x, (2048,), w, b), (x, w, b), g) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_opcheck_and_compile():
    x = torch.randn(5, 70, device="cuda", requires_grad=True)
    w = torch.randn(70, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.gptkern.softmax_fwd.default, (x, -1, False, torch.float32))
    torch.library.opcheck(torch.ops.gptkern.norm_fwd.default, (x, 1, w, None, 1e-5, True))
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: gptkern.ops.softmax(gptkern.ops.rms_norm(x, (70,), w), -1), fullgraph=True)
    with gptkern.backend("cuda"):
        y = f(x, w)
        y.sum().backward()
    assert_close(y, softmax_ref(rms_norm_ref(x, (70,), w), -1), torch.float32)


# --------------------------------------------------------------------------------- attention

def sdpa_ref(q, k, v, causal, scale):
    """float64 attention (top-left causal) and its natural-log LSE."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        l, n = s.shape[-2:]
        s = s.masked_fill(torch.ones(l, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


ATTN_SHAPES = [(2, 8, 8, 100, 300), (2, 8, 2, 300, 100), (1, 4, 1, 1, 257), (3, 6, 3, 129, 129)]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,h,hkv,l,s", ATTN_SHAPES)
def test_attention_forward_and_lse(dtype, d, causal, b, h, hkv, l, s):
    q = torch.randn(b, h, l, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype)
    scale = 1 / math.sqrt(d)
    out, lse = torch.ops.gptkern.attention_fwd(q, k, v, None, causal, scale)
    ref, ref_lse = sdpa_ref(q, k, v, causal, scale)
    torch_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != h)
    check_vs_torch(out, torch_out, ref, dtype, "out")
    torch.testing.assert_close(lse.double(), ref_lse * math.log2(math.e), atol=2e-3, rtol=1e-3)
    if gptkern._backend._has_triton():  # the same convention as the Triton kernel's LSE
        _, tlse = torch.ops.gptkern.triton_attention(q, k, v, None, causal, scale, 0.0, None)
        torch.testing.assert_close(lse, tlse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_sdpa_route_gradients_and_views(dtype, causal):
    """gptkern SDPA under the cuda backend: (B, L, H, D) views, GQA, gradients via Triton."""
    b, l, s, h, hkv, d = 2, 200, 333, 8, 2, 128
    q = torch.randn(b, l, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype).transpose(1, 2)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with gptkern.backend("cuda"):
        out = gptkern.ops.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=True)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=causal, enable_gqa=True)
    assert_close(out, ref, dtype)
    for got, want in zip(grads, torch.autograd.grad(ref, ref_leaves, g.double())):
        assert_close(got, want, dtype, grad=True, atol_scale=2)


def test_attention_unsupported_configs_raise_not_implemented():
    q = torch.randn(1, 2, 16, 80, device="cuda", dtype=torch.float16)
    with gptkern.backend("cuda"), pytest.raises(NotImplementedError, match="head dims"):
        gptkern.ops.scaled_dot_product_attention(q, q, q)
    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16)
    with gptkern.backend("cuda"), pytest.raises(NotImplementedError, match="attn_mask"):
        gptkern.ops.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(16, 16, dtype=torch.bool,
                                                                                device="cuda"))
    with pytest.raises(NotImplementedError, match="masks"):
        torch.ops.gptkern.attention_fwd(q, q, q, torch.ones(1, 2, 16, 16, dtype=torch.bool, device="cuda"),
                                        False, 0.125)
    with pytest.raises(NotImplementedError, match="dtype"):
        torch.ops.gptkern.attention_fwd(q.float(), q.float(), q.float(), None, False, 0.125)


def test_attention_opcheck():
    q = torch.randn(1, 4, 70, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 90, 64, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.gptkern.attention_fwd.default, (q, k, k, None, True, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------ decode

def decode_ref(q, k, v, seqlens, scale):
    """float64: query i of Lq sees keys j <= seqlens[b] - Lq + i of the static caches; none: 0."""
    b, h, lq, _ = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=torch.float64, device=q.device)
    for bi in range(b):
        for i in range(lq):
            last = int(seqlens[bi]) - lq + i
            if last < 0:
                continue
            kk = k[bi, :, : last + 1].double().repeat_interleave(group, 0)
            vv = v[bi, :, : last + 1].double().repeat_interleave(group, 0)
            p = torch.softmax(q[bi, :, i].double()[:, None, :] @ kk.transpose(-1, -2) * scale, -1)
            out[bi, :, i] = (p @ vv)[:, 0]
    return out


def paged(k, v, block_size):
    """The (B, Hkv, S, D) caches k and v cut into (num_blocks, Hkv, block_size, D) pages stored in
    shuffled order (NaN pages besides, never referenced), and the (B, max_blocks) int32 table."""
    b, hkv, s, d = k.shape
    per = -(-s // block_size)
    order = torch.randperm(b * per + 3, device=k.device)[: b * per]
    pools = []
    for cache in (k, v):
        padded = torch.zeros(b, hkv, per * block_size, d, dtype=cache.dtype, device=cache.device)
        padded[:, :, :s] = cache
        pool = torch.full((b * per + 3, hkv, block_size, d), float("nan"), dtype=cache.dtype, device=cache.device)
        pool[order] = padded.reshape(b, hkv, per, block_size, d).transpose(1, 2).reshape(b * per, hkv, block_size, d)
        pools.append(pool)
    return pools[0], pools[1], order.reshape(b, per).to(torch.int32)


DECODE_CASES = [  # (B, H, Hkv, Lq, S_max): one split (many blocks) and many splits (few blocks)
    (64, 8, 8, 1, 256), (3, 8, 2, 1, 4000), (4, 16, 2, 3, 700), (2, 64, 1, 1, 1500), (5, 4, 4, 4, 65)]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b,h,hkv,lq,s_max", DECODE_CASES)
def test_decode_static_and_paged(dtype, d, b, h, hkv, lq, s_max):
    q = torch.randn(b, h, lq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, s_max, d, device="cuda", dtype=dtype)
    v = torch.randn(b, hkv, s_max, d, device="cuda", dtype=dtype)
    seqlens = torch.randint(0, s_max + 1, (b,), device="cuda", dtype=torch.int32)
    seqlens[0] = 0
    seqlens[-1] = 1
    if b > 2:
        seqlens[1] = s_max
    scale = 1 / math.sqrt(d)
    out = torch.ops.gptkern.decode_attention(q, k, v, seqlens, scale, None)
    ref = decode_ref(q, k, v, seqlens, scale)
    assert out.shape == (b, h, lq, d) and out.dtype == dtype
    assert_close(out, ref, dtype, msg="static")
    assert torch.all(out[0] == 0)
    with gptkern.backend("cuda"):  # the public API routes to the same kernel
        torch.testing.assert_close(gptkern.ops.decode_attention(q, k, v, seqlens), out, atol=0, rtol=0)
    for block_size in (16, 256):
        kp, vp, table = paged(k, v, block_size)
        out_p = torch.ops.gptkern.decode_attention(q, kp, vp, seqlens, scale, table)
        assert_close(out_p, ref, dtype, msg=f"paged {block_size}")
        torch.testing.assert_close(out_p, out, atol=2e-3, rtol=0)


def test_extension_uses_the_shared_cxx_runtime():
    """A gptkern._C linked with its own static libstdc++ crashed in the next test's first check
    (formatting a number into the message; H200 image, CXX=/opt/gcc/bin/g++, 2026-11-30)."""
    ext = _backend._extension()
    assert not ext.cxx_runtime_private, f"gptkern._C carries its own libstdc++ ({ext.cxx_runtime}): rebuild it"


def test_decode_checks_and_fake():
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 32, 64, device="cuda", dtype=torch.float16)
    seqlens = torch.tensor([3, 32], device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        torch.ops.gptkern.decode_attention(q, k, k, seqlens.long(), 0.125, None)
    with pytest.raises(NotImplementedError, match="head dims"):
        torch.ops.gptkern.decode_attention(q[..., :32], k[..., :32], k[..., :32], seqlens, 0.125, None)
    torch.library.opcheck(torch.ops.gptkern.decode_attention.default, (q, k, k, seqlens, 0.125, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_cuda_backend_available_and_auto_order():
    assert "cuda" in gptkern.available_backends()
    x = torch.randn(4, 64, device="cuda")
    supports = {"cuda": lambda: None, "torch": lambda: None}
    assert _backend.choose("softmax", x.device, supports) == "cuda"  # auto: cuda after triton
