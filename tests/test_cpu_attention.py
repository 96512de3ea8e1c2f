"""The C++ CPU attention kernels (backend 'cpu'): dense and varlen, forward and gradients, against
the float64 reference; masks, GQA, layouts, the LSE convention, opcheck, torch.compile, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern import _backend
from gptkern.ops.attention import varlen_visibility
from gptkern.ops.reference import attention_ref
from helpers import assert_close, check_compiled_causal_sdpa, noncontiguous, poisoned_allocations

pytestmark = pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
sdpa = gptkern.ops.scaled_dot_product_attention
varlen = gptkern.ops.flash_attn_varlen
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def check(q, k, v, mask=None, causal=False, scale=None, grad=True, **kw):
    """sdpa on the cpu backend (poisoned outputs) against attention_ref in float64, values and grads."""
    dtype = q.dtype
    leaves = [t.requires_grad_(grad) for t in (q, k, v)]
    with gptkern.backend("cpu"), poisoned_allocations():
        out = sdpa(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **kw)
    ref_leaves = [t.detach().double().requires_grad_(grad) for t in leaves]
    ref = attention_ref(*ref_leaves, mask=mask, causal=causal, scale=scale)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype, msg="forward")
    if not grad:
        return out
    g = torch.randn_like(out)
    with gptkern.backend("cpu"), poisoned_allocations():
        grads = torch.autograd.grad(out, leaves, g)
    for name, got, want in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_leaves, g.double())):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want, dtype, grad=True, atol_scale=4, msg=name)
    return out


# (B, H, Hkv, L, S, D, Dv): L != S both ways, L = 1, S = 1, head dims 48 / 80 / 96 and uneven
# ones, GQA, and more than one 64-row block (causal block skipping).
SHAPES = [(1, 1, 1, 1, 1, 16, 16), (2, 4, 2, 37, 53, 48, 48), (1, 2, 1, 70, 33, 80, 80),
          (1, 2, 2, 1, 65, 96, 96), (2, 2, 1, 65, 1, 32, 24), (1, 3, 3, 130, 129, 64, 40),
          (1, 4, 1, 29, 150, 20, 12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(dtype, shape, causal):
    b, h, hk, l, s, d, dv = shape
    check(rand(b, h, l, d, dtype=dtype), rand(b, hk, s, d, dtype=dtype), rand(b, hk, s, dv, dtype=dtype),
          causal=causal)


def test_float16():
    check(rand(1, 2, 37, 32, dtype=torch.float16), rand(1, 2, 70, 32, dtype=torch.float16),
          rand(1, 2, 70, 32, dtype=torch.float16), causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_noncontiguous_views(causal):
    """(B, L, H, D) storage transposed to (B, H, L, D), and views with a last-dim stride of 2."""
    q, k, v = rand(2, 67, 4, 32).transpose(1, 2), rand(2, 70, 2, 32).transpose(1, 2), rand(2, 70, 2, 32).transpose(1, 2)
    check(q, k, v, causal=causal)
    check(noncontiguous(rand(1, 2, 19, 24)), noncontiguous(rand(1, 2, 23, 24)), noncontiguous(rand(1, 2, 23, 16)),
          causal=causal)


def test_gqa_mapping():
    """Query head h reads KV head h // (H / Hkv): each KV head's values shifted by its index show
    through in the outputs of exactly its query heads."""
    q, k = rand(1, 6, 5, 16), rand(1, 3, 7, 16)
    v = torch.zeros(1, 3, 7, 8) + torch.arange(3.0)[None, :, None, None]
    with gptkern.backend("cpu"):
        out = sdpa(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 0, 1, 1, 2, 2]))
    check(q, k, rand(1, 3, 7, 8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks(dtype):
    q, k, v = rand(2, 3, 21, 16, dtype=dtype), rand(2, 3, 70, 16, dtype=dtype), rand(2, 3, 70, 16, dtype=dtype)
    key_padding = torch.rand(2, 1, 1, 70) > 0.3
    key_padding[1] = False  # a batch that sees nothing: zeros and zero gradients
    out = check(q, k, v, mask=key_padding)
    assert out[1].abs().max() == 0
    full_bool = torch.rand(21, 70) > 0.5
    full_bool[4] = False
    check(q, k, v, mask=full_bool)
    additive = rand(3, 21, 70)
    additive[:, 5] = float("-inf")
    check(q, k, v, mask=additive)
    check(q, k, v, mask=additive.to(dtype))  # a mask in the query's dtype
    check(q, k, v, mask=rand(2, 1, 21, 1))  # broadcast over keys and heads


def test_fully_masked_rows_match_torch():
    """An all-False bool row and an all -inf float row give 0, as torch's SDPA; a finfo.min row
    (Hugging Face's mask value) attends uniformly, as torch's, and its gradients are those of
    torch's fused kernel (its log2-domain LSE must not overflow to the -inf of a row that sees
    nothing). At that magnitude log(sum) is lost in the fp32 LSE, so like torch's fused kernel
    the backward does not renormalize such a row: an explicit fp32 softmax differs there."""
    q, k, v = rand(1, 2, 6, 16), rand(1, 2, 9, 16), rand(1, 2, 9, 16)
    masks = [torch.ones(6, 9, dtype=torch.bool), torch.zeros(6, 9), torch.zeros(6, 9), torch.zeros(6, 9),
             torch.zeros(6, 9)]
    masks[0][2] = False
    masks[1][2] = float("-inf")
    masks[2][2] = torch.finfo(torch.float32).min
    masks[3][2] = torch.finfo(torch.float32).min
    masks[3][4, :5] = torch.finfo(torch.float32).min  # partly masked
    masks[4][2] = torch.finfo(torch.bfloat16).min
    g = torch.randn(1, 2, 6, 16)
    for mask in masks:
        results = []
        for fn, name in ((sdpa, "cpu"), (F.scaled_dot_product_attention, "torch")):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            with gptkern.backend(name):
                out = fn(*leaves, attn_mask=mask)
            results.append((out, *torch.autograd.grad(out, leaves, g)))
        for got, want, what in zip(*results, ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=what)


def test_causal_mask_is_applied_top_left():
    """Top-left alignment with L > S: query 0 sees only key 0, so its output is v[0]."""
    q, k, v = rand(1, 2, 40, 16), rand(1, 2, 9, 16), rand(1, 2, 9, 16)
    with gptkern.backend("cpu"):
        out = sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    check(q, k, v, causal=True)


def test_scale_and_empty():
    check(rand(1, 2, 9, 16), rand(1, 2, 11, 16), rand(1, 2, 11, 16), scale=0.37)
    check(rand(2, 2, 0, 16), rand(2, 2, 5, 16), rand(2, 2, 5, 16))
    check(rand(2, 2, 5, 16), rand(2, 2, 0, 16), rand(2, 2, 0, 16))
    check(rand(2, 2, 5, 16), rand(2, 2, 7, 16), rand(2, 2, 7, 0))


def test_lse_is_log2_domain_like_triton():
    """The LSE is log2(sum_j 2^(s_ij log2 e)) = logsumexp / ln 2, -inf for a row that sees nothing."""
    q, k, v = rand(2, 4, 33, 16), rand(2, 2, 70, 16), rand(2, 2, 70, 16)
    mask = torch.ones(2, 4, 33, 70, dtype=torch.bool)
    mask[0, 1, 3] = False
    _, lse = torch.ops.gptkern.attention_fwd(q, k, v, mask, False, 0.25)
    s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    want = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1) / math.log(2)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)
    assert lse[0, 1, 3] == float("-inf")


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_backward_takes_the_triton_lse():
    """The backends are interchangeable: the C++ backward given the Triton op's output and LSE gives
    the gradients it gives with its own."""
    q, k, v = rand(1, 2, 40, 16), rand(1, 2, 50, 16), rand(1, 2, 50, 16)
    g = rand(1, 2, 40, 16)
    out_t, lse_t = torch.ops.gptkern.triton_attention(q, k, v, None, True, 0.25, 0.0, None)
    out_c, lse_c = torch.ops.gptkern.attention_fwd(q, k, v, None, True, 0.25)
    torch.testing.assert_close(lse_t, lse_c, atol=1e-5, rtol=1e-5)
    got = torch.ops.gptkern.attention_bwd(g, q, k, v, out_t, lse_t, None, True, 0.25)
    want = torch.ops.gptkern.attention_bwd(g, q, k, v, out_c, lse_c, None, True, 0.25)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_do_not_depend_on_threads():
    q, k, v = (rand(1, 4, 150, 32).requires_grad_() for _ in range(3))
    g = rand(1, 4, 150, 32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with gptkern.backend("cpu"):
                out = sdpa(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
                runs.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_float64_is_not_supported_and_auto_moves_on():
    q, k, v = rand(1, 2, 8, 16), rand(1, 2, 8, 16), rand(1, 2, 8, 16)
    with gptkern.backend("cpu"), pytest.raises(NotImplementedError, match="float64"):
        sdpa(q.double(), k.double(), v.double())
    supports = {"cpu": lambda: None, "torch": lambda: None}
    assert _backend.choose("scaled_dot_product_attention", torch.device("cpu"), supports) == "cpu"
    assert _backend.choose("softmax", torch.device("cpu"), supports, {"cpu": lambda: "too small"}) == "torch"
    out = sdpa(q.double(), k.double(), v.double())  # auto: torch serves it
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))


def _run_with_seed(backend, fn, leaves, seed):
    """fn(*leaves) under ``backend`` after torch.manual_seed(seed); (out, gradients)."""
    torch.manual_seed(seed)
    with gptkern.backend(backend):
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out) + 0.5 * torch.arange(out.shape[-1]))
    return out, grads


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
@pytest.mark.parametrize("case", ["causal", "gqa-mask", "varlen-window"])
def test_dropout_draws_the_triton_kernels_mask(case):
    """For one seed the C++ kernels drop exactly the weights the Triton kernels drop (the same
    Philox counters: key, query, batch-head), forward and backward, so outputs and gradients agree
    to rounding; another seed gives another mask."""
    if case == "varlen-window":
        leaves = [rand(40, 4, 16).requires_grad_(), rand(45, 2, 16).requires_grad_(), rand(45, 2, 24).requires_grad_()]
        cu_q = torch.tensor([0, 10, 10, 40], dtype=torch.int32)
        cu_k = torch.tensor([0, 20, 25, 45], dtype=torch.int32)

        def fn(q, k, v):
            return varlen(q, k, v, cu_q, cu_k, 30, 20, dropout_p=0.3, causal=True, window_size=(7, -1))
    else:
        gqa = case == "gqa-mask"
        leaves = [rand(2, 4, 37, 16).requires_grad_(), rand(2, 2 if gqa else 4, 70, 16).requires_grad_(),
                  rand(2, 2 if gqa else 4, 70, 24).requires_grad_()]
        mask = (torch.rand(2, 1, 1, 70) > 0.2) if gqa else None

        def fn(q, k, v):
            return sdpa(q, k, v, attn_mask=mask, dropout_p=0.3, is_causal=not gqa, enable_gqa=gqa)
    out_c, grads_c = _run_with_seed("cpu", fn, leaves, seed=5)
    out_t, grads_t = _run_with_seed("triton", fn, leaves, seed=5)
    for a, b in zip((out_c, *grads_c), (out_t, *grads_t)):  # another mask would differ by O(1)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    out_other, _ = _run_with_seed("cpu", fn, leaves, seed=6)
    assert (out_other - out_c).abs().max() > 1e-2


def test_dropout_statistics_and_reproducibility():
    """With V = I the output is softmax * Z: Z takes only 0 and 1 / (1 - p), drops about p of the
    weights, repeats under torch.manual_seed, and is what attention_dropout_factors gives."""
    p, s = 0.3, 96
    q, k = rand(2, 4, 64, 16), rand(2, 4, s, 16)
    eye = torch.eye(s).expand(2, 4, s, s)
    outs = []
    for seed in (9, 9):
        torch.manual_seed(seed)
        with gptkern.backend("cpu"):
            outs.append(sdpa(q, k, eye, dropout_p=p))
    assert torch.equal(outs[0], outs[1])
    z = outs[0].double() / F.scaled_dot_product_attention(q.double(), k.double(), eye.double())
    assert torch.all(((z - 0).abs() < 1e-4) | ((z - 1 / (1 - p)).abs() < 1e-3))
    dropped = (z.abs() < 1e-4).double().mean().item()
    assert abs(dropped - p) < 0.02, dropped
    torch.manual_seed(9)
    seed = gptkern.ops.attention.draw_seed(p, torch.device("cpu"))  # the seed the calls above drew
    factors = torch.ops.gptkern.attention_dropout_factors(seed, p, 2 * 4, 64, s).view(2, 4, 64, s)
    torch.testing.assert_close(factors.double(), z, atol=1e-3, rtol=0)


def test_opcheck():
    q, k, v = (rand(1, 2, 20, 16).requires_grad_() for _ in range(3))
    bool_mask = (torch.rand(1, 1, 1, 20) > 0.2).expand(1, 2, 20, 20)
    float_mask = rand(1, 1, 20, 20).expand(1, 2, 20, 20)
    for mask, causal in ((None, True), (bool_mask, False), (float_mask, False)):
        torch.library.opcheck(torch.ops.gptkern.attention_fwd.default, (q, k, v, mask, causal, 0.25))
    out, lse = torch.ops.gptkern.attention_fwd(q.detach(), k.detach(), v.detach(), bool_mask, True, 0.25)
    torch.library.opcheck(torch.ops.gptkern.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, bool_mask, True, 0.25))
    out, lse = torch.ops.gptkern.attention_fwd(q.detach(), k.detach(), v.detach(), float_mask, False, 0.25)
    torch.library.opcheck(torch.ops.gptkern.attention_bwd.default,  # with the float mask's gradient
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, float_mask, False,
                           0.25, True))
    seed = torch.tensor([1234])  # dropout: the forward and the backward with it
    torch.library.opcheck(torch.ops.gptkern.attention_fwd.default, (q, k, v, None, True, 0.25, 0.3, seed))
    out, lse = torch.ops.gptkern.attention_fwd(q.detach(), k.detach(), v.detach(), None, True, 0.25, 0.3, seed)
    torch.library.opcheck(torch.ops.gptkern.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, True, 0.25,
                           False, 0.3, seed))
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs seed"):
        torch.ops.gptkern.attention_fwd(q, k, v, None, True, 0.25, 0.3, None)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        torch.ops.gptkern.attention_fwd(q, k, v, None, True, 0.25, 1.0, seed)
    qv, kv, vv = (rand(30, 2, 16).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 10, 10, 30], dtype=torch.int32)
    torch.library.opcheck(torch.ops.gptkern.attention_varlen_fwd.default,
                          (qv, kv, vv, cu, cu, 20, 20, True, 0.25, 4, -1))
    out, lse = torch.ops.gptkern.attention_varlen_fwd(qv.detach(), kv.detach(), vv.detach(), cu, cu, 20, 20, False,
                                                      0.25, -1, -1)
    torch.library.opcheck(torch.ops.gptkern.attention_varlen_bwd.default,
                          (torch.randn_like(out), qv.detach(), kv.detach(), vv.detach(), out, lse, cu, cu, 20, 20,
                           False, 0.25, -1, -1))


def test_compile_fullgraph():
    q, k, v = (rand(1, 2, 20, 16).requires_grad_() for _ in range(3))
    check_compiled_causal_sdpa("cpu", q, k, v, lambda q, k, v: attention_ref(q, k, v, causal=True))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    packed = [t.detach()[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # (20, 2, 16)
    g = torch.compile(lambda q, k, v: varlen(q, k, v, cu, cu, 13, 13, causal=True), fullgraph=True)
    with gptkern.backend("cpu"):
        got = g(*packed)
    assert_close(got, varlen_ref(*(t.double() for t in packed), [7, 13], [7, 13], True, (-1, -1)), torch.float32)


# ---------------------------------------------------------------------------------------- varlen

def varlen_ref(q, k, v, lens_q, lens_k, causal, window, scale=None):
    """Float64, one sequence at a time through attention_ref with flash-attn's visibility mask."""
    outs, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        mask = varlen_visibility(lq, lk, causal, window, q.device)
        seq = [t[a:a + n].transpose(0, 1)[None] for t, a, n in ((q, q0, lq), (k, k0, lk), (v, k0, lk))]
        outs.append(attention_ref(*seq, mask=mask, scale=scale)[0].transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)


def check_varlen(lens_q, lens_k, causal=False, window=(-1, -1), dtype=torch.float32, h=4, hk=2, d=16, dv=24):
    cu = [torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lens_q, lens_k)]
    q = rand(sum(lens_q), h, d, dtype=dtype).requires_grad_()
    k = rand(sum(lens_k), hk, d, dtype=dtype).requires_grad_()
    v = rand(sum(lens_k), hk, dv, dtype=dtype).requires_grad_()
    with gptkern.backend("cpu"), poisoned_allocations():
        out = varlen(q, k, v, *cu, max(lens_q), max(lens_k), causal=causal, window_size=window)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = varlen_ref(*leaves, lens_q, lens_k, causal, window)
    assert_close(out, ref, dtype, msg="forward")
    g = torch.randn_like(out)
    with gptkern.backend("cpu"), poisoned_allocations():
        grads = torch.autograd.grad(out, (q, k, v), g)
    for name, got, want in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_close(got, want, dtype, grad=True, atol_scale=4, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [([5, 0, 1, 70, 33], [7, 3, 1, 70, 20]), ([1], [1]), ([0, 9], [4, 0]),
                                  ([130, 2], [65, 140])])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_ragged(dtype, lens, causal):
    check_varlen(*lens, causal=causal, dtype=dtype)


@pytest.mark.parametrize("causal,window", [(False, (8, 3)), (True, (5, -1)), (False, (0, 0)), (False, (-1, 2)),
                                           (True, (70, 0))])
def test_varlen_windows(causal, window):
    check_varlen([5, 40, 130], [9, 40, 100], causal=causal, window=window)


def test_varlen_bottom_right_causal():
    """Causal with L < S: the last query sees every key (bottom-right), unlike dense sdpa."""
    q, k, v = rand(3, 1, 16), rand(8, 1, 16), rand(8, 1, 16)
    cu_q, cu_k = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 8], dtype=torch.int32)
    with gptkern.backend("cpu"):
        out = varlen(q, k, v, cu_q, cu_k, 3, 8, causal=True)
    full = F.scaled_dot_product_attention(q[2:].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    torch.testing.assert_close(out[2], full.transpose(0, 1)[0])


# -------------------------------------------------------------------------------------- bad input

def test_bad_input_to_the_ops_names_the_argument():
    q, k, v = rand(1, 4, 5, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    fwd = torch.ops.gptkern.attention_fwd
    cases = [
        ("q", lambda: fwd(q.double(), k, v, None, False, 1.0)),
        ("one dtype", lambda: fwd(q, k.bfloat16(), v, None, False, 1.0)),
        ("k must have 4 dims", lambda: fwd(q, k[0], v, None, False, 1.0)),
        ("heads of q", lambda: fwd(q, rand(1, 3, 6, 8), rand(1, 3, 6, 8), None, False, 1.0)),
        ("head dim", lambda: fwd(q, rand(1, 2, 6, 4), v, None, False, 1.0)),
        ("batch", lambda: fwd(q, rand(2, 2, 6, 8), rand(2, 2, 6, 8), None, False, 1.0)),
        ("mask", lambda: fwd(q, k, v, torch.ones(1, 4, 5, 7, dtype=torch.bool), False, 1.0)),
        ("mask", lambda: fwd(q, k, v, torch.ones(1, 4, 5, 6, dtype=torch.long), False, 1.0)),
        ("lse", lambda: torch.ops.gptkern.attention_bwd(q, q, k, v, q, rand(1, 4, 6), None, False, 1.0)),
    ]
    qv, kv = rand(10, 2, 8), rand(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    vfwd = torch.ops.gptkern.attention_varlen_fwd
    cases += [
        ("cu_seqlens_q", lambda: vfwd(qv, kv, kv, cu.long(), cu, 6, 6, False, 1.0, -1, -1)),
        ("cu_seqlens_k", lambda: vfwd(qv, kv, kv, cu, cu[:2], 6, 6, False, 1.0, -1, -1)),
        ("cu_seqlens_q .*start at 0", lambda: vfwd(qv, kv, kv, cu + 1, cu, 6, 6, False, 1.0, -1, -1)),
        ("cu_seqlens_k ends at 10", lambda: vfwd(qv, kv[:9], kv[:9], cu, cu, 6, 6, False, 1.0, -1, -1)),
        ("max_seqlen", lambda: vfwd(qv, kv, kv, cu, cu, 5, 6, False, 1.0, -1, -1)),
        ("window", lambda: vfwd(qv, kv, kv, cu, cu, 6, 6, False, 1.0, -2, -1)),
    ]
    for match, fn in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()


def test_schemas_are_the_shared_contract():
    """The CUDA kernels implement these same schemas: the strings must not drift."""
    want = [
        "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale, float dropout_p=0., "
        "Tensor? seed=None) -> (Tensor, Tensor)",
        "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
        "bool causal, float scale, bool mask_grad=False, float dropout_p=0., Tensor? seed=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        "attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left, int window_right, "
        "float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor)",
        "attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
        "int window_left, int window_right, float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor, Tensor)",
        "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale, "
        "Tensor? block_table) -> Tensor",
    ]
    for schema in want:
        op = getattr(torch.ops.gptkern, schema.split("(")[0]).default
        assert str(op._schema) == "gptkern::" + schema


def test_float_mask_gradient_rules():
    """mask_grad needs a float mask (its create_graph=True path: test_attention_double_backward.py)."""
    q, k, v = (rand(1, 2, 9, 16) for _ in range(3))
    out, lse = torch.ops.gptkern.attention_fwd(q, k, v, None, False, 0.25)
    bool_mask = torch.ones(1, 2, 9, 9, dtype=torch.bool)
    for mask in (None, bool_mask):
        with pytest.raises(RuntimeError, match="mask_grad needs a float mask"):
            torch.ops.gptkern.attention_bwd(out, q, k, v, out, lse, mask, False, 0.25, True)
