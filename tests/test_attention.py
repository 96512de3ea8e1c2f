"""scaled_dot_product_attention on every backend that runs here, against a float64
reference (torch's math SDPA in float64) and against F.scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F

import gptkern
from helpers import assert_close, backends_here, check_compiled_causal_sdpa, dtypes_for, poisoned_allocations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_here(DEVICE, attention=True)
PARAMS = [(b, d) for b in BACKENDS for d in dtypes_for(b, DEVICE)]
sdpa = gptkern.ops.scaled_dot_product_attention
# Attention sums over S terms: gradients get a looser absolute tolerance than row ops.
ATTN_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def reference(q, k, v, mask=None, **kw):
    """SDPA in float64 on explicit math: softmax(q kᵀ scale + mask) v, 0 for rows that see nothing."""
    q, k, v = q.double(), k.double(), v.double()
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    if kw.get("is_causal") and (mask is not None or (kw.get("scale") or 1) < 0):
        # both apply: combined here (torch's math backend raises); a negative scale: torch's causal path gives NaN
        kw = {**kw, "is_causal": False}
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = causal if mask is None else mask & causal if mask.dtype == torch.bool else \
            mask.masked_fill(~causal, float("-inf"))
    if q.dim() >= 3 and 0 in (q.shape[-3], k.shape[-3]):  # torch 2.11's CPU SDPA dies of SIGFPE on zero heads
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, attn_mask=mask, **kw)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def check(backend, q, k, v, mask=None, grad=True, **kw):
    dtype = q.dtype
    leaves = [q, k, v]
    for t in leaves:
        t.requires_grad_(grad)
    with gptkern.backend(backend), poisoned_allocations():
        out = sdpa(q, k, v, attn_mask=mask, **kw)
    ref_leaves = [t.detach().double().requires_grad_(grad) for t in leaves]
    ref = reference(*ref_leaves, mask=mask, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype, msg=f"{backend} forward")
    if not grad:
        return
    g = torch.randn_like(out)
    with gptkern.backend(backend), poisoned_allocations():
        grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=ATTN_ATOL[dtype] * 4, rtol=ATTN_ATOL[dtype] * 4,
                                   msg=lambda m: f"{backend} {name}: {m}")


# (B, H, Hkv, L, S, D, Dv): odd sizes, L != S both ways, head dims that are not powers of 2.
SHAPES = [(1, 1, 1, 1, 1, 16, 16), (2, 3, 3, 37, 53, 16, 16), (1, 2, 2, 70, 33, 24, 40),
          (1, 2, 2, 7, 129, 64, 64), (2, 1, 1, 65, 65, 8, 20)]


@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(backend, dtype, shape, causal):
    b, h, hk, l, s, d, dv = shape
    check(backend, rand(b, h, l, d, dtype=dtype), rand(b, hk, s, d, dtype=dtype),
          rand(b, hk, s, dv, dtype=dtype), is_causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hk", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_and_mqa(backend, hk, causal):
    check(backend, rand(2, 4, 19, 32), rand(2, hk, 23, 32), rand(2, hk, 23, 16), is_causal=causal,
          enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_with_different_key_and_value_heads(backend):
    """torch repeats key heads and value heads separately (Hq=6, Hk=2, Hv=3)."""
    check(backend, rand(2, 6, 9, 16), rand(2, 2, 11, 16), rand(2, 3, 11, 8), is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale(backend):
    check(backend, rand(1, 2, 9, 16), rand(1, 2, 11, 16), rand(1, 2, 11, 16), scale=0.37)
    # negative: torch's own causal kernels return NaN here, the torch backend passes the rule as a mask
    check(backend, rand(1, 2, 9, 16), rand(1, 2, 11, 16), rand(1, 2, 11, 16), scale=-0.37, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_of_queries_without_batch_or_head_dims(backend):
    """As torch: an (S,) mask serves a 2-D, 3-D or 5-D query (every row), not a 4-D one (torch's 4-D
    paths read its dim -2); a 2-D query's mask broadcasts to (L, S), so a (1, L, S) one is refused."""
    keep = torch.rand(11, device=DEVICE) > 0.3
    check(backend, rand(9, 16), rand(11, 16), rand(11, 8), mask=keep)
    check(backend, rand(2, 9, 16), rand(2, 11, 16), rand(2, 11, 8), mask=rand(11))
    check(backend, rand(2, 1, 2, 9, 16), rand(2, 1, 2, 11, 16), rand(2, 1, 2, 11, 8), mask=keep)
    check(backend, rand(9, 16), rand(11, 16), rand(11, 8), mask=rand(9, 11) > 0)
    with gptkern.backend(backend), pytest.raises(RuntimeError, match=r"attn_mask of shape \[1, 9, 11\] does not "
                                                                     r"broadcast to \[9, 11\]"):
        sdpa(rand(9, 16), rand(11, 16), rand(11, 8), attn_mask=rand(1, 9, 11) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks(backend):
    q, k, v = rand(2, 3, 21, 16), rand(2, 3, 34, 16), rand(2, 3, 34, 16)
    key_padding = torch.rand(2, 1, 1, 34, device=DEVICE) > 0.3
    key_padding[1] = False  # a batch that sees nothing: zeros, as torch gives
    check(backend, q, k, v, mask=key_padding)
    full_bool = torch.rand(21, 34, device=DEVICE) > 0.5
    full_bool[4] = False
    check(backend, q, k, v, mask=full_bool)
    additive = rand(3, 21, 34)
    additive[:, 5] = float("-inf")
    check(backend, q, k, v, mask=additive)
    check(backend, q, k, v, mask=rand(2, 1, 21, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_ranks(backend):
    """(B, L, H, D) storage transposed to (B, H, L, D), 3-D and 2-D inputs, broadcast batch."""
    q = rand(2, 17, 3, 16).transpose(1, 2)
    k = rand(2, 25, 3, 16).transpose(1, 2)
    v = rand(2, 25, 3, 16).transpose(1, 2)
    check(backend, q, k, v, is_causal=True)
    check(backend, rand(3, 10, 16), rand(3, 12, 16), rand(3, 12, 16))
    check(backend, rand(10, 16), rand(12, 16), rand(12, 16))
    check(backend, rand(2, 3, 10, 16), rand(1, 3, 12, 16), rand(1, 3, 12, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_no_keys(backend):
    check(backend, rand(2, 2, 0, 16), rand(2, 2, 5, 16), rand(2, 2, 5, 16))
    check(backend, rand(2, 2, 5, 16), rand(2, 2, 0, 16), rand(2, 2, 0, 16))
    check(backend, rand(0, 2, 5, 16), rand(0, 2, 5, 16), rand(0, 2, 5, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_more_queries_than_keys(backend):
    """Top-left alignment: the last queries see every key, the first only key 0."""
    check(backend, rand(1, 2, 40, 16), rand(1, 2, 9, 16), rand(1, 2, 9, 16), is_causal=True)


def test_matches_torch_sdpa_directly():
    q, k, v = rand(2, 4, 33, 32), rand(2, 4, 47, 32), rand(2, 4, 47, 32)
    for causal in (False, True):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for backend in BACKENDS:
            with gptkern.backend(backend):
                got = sdpa(q, k, v, is_causal=causal)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_triton_unsupported_configs_raise_and_auto_falls_back():
    q, k, v = rand(1, 2, 8, 16), rand(1, 2, 8, 16), rand(1, 2, 8, 16)
    with gptkern.backend("triton"):
        with pytest.raises(NotImplementedError, match="float64"):
            sdpa(q.double(), k.double(), v.double())
        with pytest.raises(NotImplementedError, match="head dims"):
            sdpa(rand(1, 1, 4, 272), rand(1, 1, 4, 272), rand(1, 1, 4, 272))
    out = sdpa(q.double(), k.double(), v.double())  # auto: served by torch
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))


def test_eager_broadcast_rule_matches_torch():
    """The plain-Python broadcast of eager calls gives torch.broadcast_shapes' result, and its error."""
    from gptkern.ops.attention import _broadcast_shapes

    cases = [((2, 3), (2, 3)), ((1, 3), (4, 1)), ((), (2, 1)), ((0,), (1,)), ((5, 0, 2), (0, 1)),
             ((2, 1, 4), (3, 1), (1,)), ((3,), (4,)), ((0,), (2,)), ((2, 3), (3, 2)), ((1,), ())]
    for shapes in cases:
        try:
            want = torch.broadcast_shapes(*shapes)
        except RuntimeError as err:
            with pytest.raises(RuntimeError, match=str(err)[:30]):
                _broadcast_shapes(*shapes)
        else:
            got = _broadcast_shapes(*shapes)
            assert got == want and isinstance(got, torch.Size), shapes


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    q, k, v = rand(2, 4, 5, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 8)
    cases = [
        (RuntimeError, "query", lambda: sdpa(q, rand(2, 4, 6, 4), v)),
        (RuntimeError, "key and value", lambda: sdpa(q, k, rand(2, 4, 7, 8))),
        (RuntimeError, "heads|broadcast", lambda: sdpa(q, rand(2, 2, 6, 8), rand(2, 2, 6, 8))),
        (RuntimeError, "heads", lambda: sdpa(q, rand(2, 3, 6, 8), rand(2, 3, 6, 8), enable_gqa=True)),
        (IndexError, "enable_gqa", lambda: sdpa(rand(5, 8), rand(6, 8), rand(6, 8), enable_gqa=True)),
        (RuntimeError, "broadcast", lambda: sdpa(q, rand(3, 4, 6, 8), rand(3, 4, 6, 8))),
        (RuntimeError, "attn_mask", lambda: sdpa(q, k, v, attn_mask=torch.ones(4, 6, dtype=torch.bool,
                                                                                  device=DEVICE))),
        (RuntimeError, "attn_mask", lambda: sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.long,
                                                                                  device=DEVICE))),
        (RuntimeError, "dropout", lambda: sdpa(q, k, v, dropout_p=1.0)),
        (RuntimeError, "dropout", lambda: sdpa(q, k, v, dropout_p=1.5)),
        (TypeError, "dropout_p", lambda: sdpa(q, k, v, dropout_p="0.1")),
        (TypeError, "dropout_p", lambda: sdpa(q, k, v, dropout_p=torch.tensor([0.0]))),  # a 0-d tensor is a float
        (TypeError, "is_causal", lambda: sdpa(q, k, v, is_causal=1)),
        (TypeError, "enable_gqa", lambda: sdpa(q, k, v, enable_gqa=None)),
        (TypeError, "scale", lambda: sdpa(q, k, v, scale="a")),
        (TypeError, "positional", lambda: sdpa(q, k, v, None, 0.0, False, 0.5)),  # keyword-only, as torch's
        (TypeError, "attn_mask", lambda: sdpa(q, k, v, attn_mask=[[True]])),
        (RuntimeError, "dropout", lambda: sdpa(q, k, v, dropout_p=-0.1)),
        (RuntimeError, "query", lambda: sdpa(q.long(), k.long(), v.long())),
        (NotImplementedError, "query", lambda: sdpa(q.cfloat(), k.cfloat(), v.cfloat())),  # as torch's
        (RuntimeError, "same dtype", lambda: sdpa(q.cfloat(), k, v)),  # the dtype check comes first in torch
        (RuntimeError, "query must have at least 2 dimensions", lambda: sdpa(rand(8), rand(6, 8), rand(6, 8))),
        (RuntimeError, "key must have at least 2 dimensions", lambda: sdpa(rand(5, 8), rand(8), rand(6, 8))),
        (RuntimeError, "value must have at least 2 dimensions", lambda: sdpa(rand(5, 8), rand(6, 8), rand(8))),
        (RuntimeError, "dtype", lambda: sdpa(q, k.half(), v)),
        (RuntimeError, "device", lambda: sdpa(q, k.to("meta"), v)),
        (TypeError, "key", lambda: sdpa(q, [1.0], v)),
    ]
    for exc, match, fn in cases:
        with gptkern.backend(backend), pytest.raises(exc, match=match):
            fn()


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_opcheck_and_compile():
    q, k, v = (rand(1, 2, 20, 16).requires_grad_() for _ in range(3))
    mask = (torch.rand(1, 1, 1, 20, device=DEVICE) > 0.2).expand(1, 2, 20, 20)
    for m, causal in ((None, True), (mask, False)):
        torch.library.opcheck(torch.ops.gptkern.triton_attention.default, (q, k, v, m, causal, 0.25, 0.0, None))
    seed = torch.tensor([12345])
    torch.library.opcheck(torch.ops.gptkern.triton_attention.default, (q, k, v, None, True, 0.25, 0.3, seed))
    out, lse = torch.ops.gptkern.triton_attention(q.detach(), k.detach(), v.detach(), None, True, 0.25, 0.3, seed)
    torch.library.opcheck(torch.ops.gptkern.triton_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, True,
                           0.25, 0.3, seed))
    check_compiled_causal_sdpa("triton", q, k, v, lambda q, k, v: reference(q, k, v, is_causal=True))


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_backward_is_deterministic():
    q, k, v = (rand(1, 4, 70, 32).requires_grad_() for _ in range(3))
    g = rand(1, 4, 70, 32)
    runs = []
    with gptkern.backend("triton"):
        for _ in range(2):
            out = sdpa(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
            runs.append(torch.autograd.grad(out, (q, k, v), g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif("triton" not in gptkern.available_backends() or DEVICE.type != "cpu",
                    reason="memory check on CPU")
def test_no_l_by_s_tensor_is_allocated():
    """The Triton path never allocates an L×S tensor: every allocation it makes is O(L)."""
    l = s = 256
    q, k, v = rand(1, 1, l, 16), rand(1, 1, s, 16), rand(1, 1, s, 16)
    sizes = []
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "zeros", "ones", "full")}

    def spy(fn):
        def wrapped(*a, **kw):
            t = fn(*a, **kw)
            sizes.append(t.numel())
            return t
        return wrapped

    try:
        for name, fn in originals.items():
            setattr(torch, name, spy(fn))
        mask = torch.rand(1, 1, 1, s) > 0.1
        q.requires_grad_()
        with gptkern.backend("triton"):
            out = sdpa(q, k, v, attn_mask=mask)
            out.sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
    assert sizes and max(sizes) <= l * 16 and max(sizes) < l * s


def _dropout_factors(q, k, p, seed, **kw):
    """The kernel's dropout factors Z (0 or 1/(1-p)) for q, k under ``seed``: run it with V = I."""
    s = k.shape[-2]
    eye = torch.eye(s, device=DEVICE, dtype=q.dtype).expand(*k.shape[:-1], s)
    torch.manual_seed(seed)
    with gptkern.backend("triton"):
        weights = sdpa(q, k, eye, dropout_p=p, **kw)  # = softmax(...) * Z
    probs = reference(q, k, eye, **kw)
    return (weights.double() / probs.clamp_min(1e-30)).round(decimals=4), probs


def _check_dropout(q, k, v, p, seed, **kw):
    """Forward and gradients under ``seed`` against float64 (softmax * Z) @ V, with Z the kernel's
    own mask: the backward must regenerate exactly the forward's mask. Returns (Z, softmax)."""
    z, probs = _dropout_factors(q, k, p, seed, **kw)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    with gptkern.backend("triton"):
        out = sdpa(*leaves, dropout_p=p, **kw)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    s = k.shape[-2]
    eye = torch.eye(s, device=DEVICE, dtype=torch.float64).expand(*k.shape[:-1], s)
    weights = reference(ref_leaves[0], ref_leaves[1], eye, **kw)  # softmax, differentiable in q, k
    ref = (weights * z) @ ref_leaves[2].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    assert_close(out, ref, torch.float32)
    for got, want in zip(grads, torch.autograd.grad(ref, ref_leaves, g.double())):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    return z, probs


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_statistics_and_gradients(causal):
    p = 0.3
    z, probs = _check_dropout(rand(1, 2, 48, 16), rand(1, 2, 80, 16), rand(1, 2, 80, 24), p, seed=7,
                              is_causal=causal)
    kept = z[probs > 0]
    assert torch.all((kept.abs() < 1e-4) | ((kept - 1 / (1 - p)).abs() < 1e-3))
    dropped = (kept.abs() < 1e-4).double().mean().item()
    assert abs(dropped - p) < 0.03, dropped


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_dropout_reproducible_under_manual_seed():
    q, k, v = rand(2, 2, 33, 16), rand(2, 2, 33, 16), rand(2, 2, 33, 16)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        with gptkern.backend("triton"):
            outs.append(sdpa(q, k, v, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_cases_without_spill_free_gpu_config_are_routed_to_torch():
    from gptkern.kernels import attention as kernels

    assert kernels.unsupported(128, 128, False, kernels.PLAIN) is None
    assert kernels.unsupported(256, 256, False, kernels.PLAIN) is None
    assert "dropout" in kernels.unsupported(256, 256, False, kernels.DROPOUT)
    assert "mask" in kernels.unsupported(256, 200, False, kernels.MASKED)
    assert "float32" in kernels.unsupported(64, 64, True, kernels.DROPOUT)
    assert "float32" in kernels.unsupported(256, 256, True, kernels.PLAIN)
    assert kernels.unsupported(128, 128, True, kernels.PLAIN) is None
    for (fp32, weight), by_width in kernels._CONFIGS["fwd"].items():
        for index, d in enumerate((64, 128, 256)):
            # a case is either served everywhere or nowhere
            served = [kernels._CONFIGS[k][(fp32, weight)][index] is not None for k in kernels._CONFIGS]
            assert all(served) or not any(served), (fp32, weight, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_across_many_blocks(backend):
    """Masks read at the right offsets in every (query block, key block) tile, with gradients."""
    q, k, v = rand(2, 3, 100, 16), rand(2, 3, 150, 16), rand(2, 3, 150, 16)
    check(backend, q, k, v, mask=torch.rand(100, 150, device=DEVICE) > 0.4)
    check(backend, q, k, v, mask=rand(3, 100, 150))
    check(backend, q, k, v, mask=rand(2, 1, 150, 100).transpose(-1, -2))  # strided (L, S)
    check(backend, q, k, v, mask=torch.rand(2, 1, 1, 150, device=DEVICE) > 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l,s", [(21, 34), (34, 21), (100, 150)])
def test_mask_with_causal(backend, l, s):
    """attn_mask and is_causal together: both apply, as in torch's fused kernels (its docs forbid
    the pair, its math backend raises), with the tiles above the diagonal skipped; L != S both
    ways and across many blocks."""
    q, k, v = rand(2, 3, l, 16), rand(2, 3, s, 16), rand(2, 3, s, 8)
    key_padding = torch.rand(2, 1, 1, s, device=DEVICE) > 0.3
    key_padding[1, ..., 0] = False  # query 0 of batch 1 sees only key 0 under causal: nothing, zeros
    check(backend, q, k, v, mask=key_padding, is_causal=True)
    check(backend, q, k, v, mask=rand(3, l, s), is_causal=True)
    check(backend, rand(2, 6, l, 16), k, v, mask=torch.rand(l, s, device=DEVICE) > 0.5, is_causal=True,
          enable_gqa=True)
    with gptkern.backend(backend):
        got = sdpa(q, k, v, attn_mask=key_padding, is_causal=True)
    assert_close(got, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), key_padding & torch.ones(
        l, s, dtype=torch.bool, device=DEVICE).tril()), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_finfo_min_and_float32_mask(backend):
    """Hugging Face's finfo.min masks: a fully masked row averages every key, as torch does."""
    q, k, v = rand(2, 2, 9, 16, dtype=torch.float16), rand(2, 2, 12, 16, dtype=torch.float16), \
        rand(2, 2, 12, 16, dtype=torch.float16)
    mask = torch.zeros(2, 1, 9, 12, device=DEVICE)
    mask[0, :, 2] = torch.finfo(torch.float32).min
    mask[1, :, :, 5:] = torch.finfo(torch.float32).min
    with gptkern.backend(backend):
        got = sdpa(q, k, v, attn_mask=mask)  # a float32 mask with fp16 inputs is allowed
    want = reference(q, k, v, mask=mask)
    assert_close(got, want, torch.float16)
    assert_close(got, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask),
                 torch.float16)
    # gradients in fp32, against torch's fused SDPA (float64 would not saturate; an explicit fp32
    # softmax differs on the fully masked row: see test_cpu_attention's fully masked rows)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    g = torch.randn(2, 2, 9, 16, device=DEVICE)
    with gptkern.backend(backend):
        got = torch.autograd.grad(sdpa(*leaves, attn_mask=mask), leaves, g)
    want = torch.autograd.grad(F.scaled_dot_product_attention(*leaves, attn_mask=mask), leaves, g)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend):
    q, k, v = rand(1, 2, 10, 16), rand(1, 2, 10, 16), rand(1, 2, 10, 16)
    with torch.autocast(DEVICE.type, dtype=torch.float16 if backend == "triton" else torch.bfloat16):
        with gptkern.backend(backend):
            got = sdpa(q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.dtype == want.dtype
    assert_close(got, want.double(), got.dtype)


def test_autocast_leaves_float64_alone_as_torch():
    """torch's autocast casts floating-point inputs other than float64: a float64 call stays in
    float64, and a float64 mask beside float32 inputs is refused as torch refuses it."""
    q = rand(1, 2, 6, 8).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sdpa(q, q, q).dtype == F.scaled_dot_product_attention(q, q, q).dtype == torch.float64
        x, mask = q.float(), torch.zeros(6, 6, dtype=torch.float64)
        for fn in (sdpa, F.scaled_dot_product_attention):
            with pytest.raises(RuntimeError, match="attn_mask dtype"):
                fn(x, x, x, attn_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_value_dim_and_bad_mask_rank(backend):
    q, k = rand(1, 2, 5, 8, ), rand(1, 2, 6, 8)
    v = rand(1, 2, 6, 0)
    check(backend, q, k, v)
    check(backend, rand(1, 2, 5, 0), rand(1, 2, 6, 0), rand(1, 2, 6, 4))  # E = 0: every key weighs the same
    check(backend, rand(1, 2, 5, 0), rand(1, 2, 6, 0), rand(1, 2, 6, 4), is_causal=True)
    check(backend, rand(2, 0, 3, 8), rand(2, 0, 4, 8), rand(2, 0, 4, 8))  # no heads: torch's empty result
    with gptkern.backend(backend):  # no query heads, grouped keys and values of different head counts
        out = sdpa(rand(1, 0, 3, 8), rand(1, 2, 5, 8), rand(1, 1, 5, 6), enable_gqa=True)
    assert out.shape == (1, 0, 3, 6)
    for bad in (torch.tensor(True, device=DEVICE), torch.ones(6, dtype=torch.bool, device=DEVICE)):
        with gptkern.backend(backend), pytest.raises(IndexError, match="attn_mask"):
            sdpa(q, k, rand(1, 2, 6, 8), attn_mask=bad)


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_dropout_gradients_with_gqa_and_batches():
    """The dK/dV kernel regenerates each query head's mask (batch 2, groups of 2)."""
    _check_dropout(rand(2, 4, 24, 16), rand(2, 2, 40, 16), rand(2, 2, 40, 8), 0.25, seed=11, enable_gqa=True)

@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("mask_shape", ["HLS", "B11S", "BHLS"])
@pytest.mark.parametrize("causal", [False, True])
def test_float_mask_gradient(backend, dtype, mask_shape, causal):
    """A learnable additive mask (a relative-position bias, ALiBi slopes): its gradient, summed over
    the dims it is broadcast along, against float64. The triton and cpu kernels write dS; with
    causal, the tiles above the diagonal are skipped and their dS is zero (several key blocks)."""
    b, h, l, s = (2, 3, 70, 150) if causal else (2, 3, 21, 34)
    q, k, v = rand(b, h, l, 16, dtype=dtype), rand(b, h, s, 16, dtype=dtype), rand(b, h, s, 24, dtype=dtype)
    mask = rand(*({"B": b, "H": h, "L": l, "S": s, "1": 1}[c] for c in mask_shape), dtype=dtype)
    mask[..., 3] = float("-inf")  # a key nobody sees
    leaves = [t.requires_grad_() for t in (q, k, v, mask)]
    with gptkern.backend(backend), poisoned_allocations():
        out = sdpa(q, k, v, attn_mask=mask, is_causal=causal)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves[:3], mask=ref_leaves[3], is_causal=causal)
    assert_close(out, ref, dtype, msg=f"{backend} forward")
    g = torch.randn_like(out)
    with gptkern.backend(backend), poisoned_allocations():
        grads = torch.autograd.grad(out, leaves, g)
    for name, got, want in zip(("dq", "dk", "dv", "dmask"), grads, torch.autograd.grad(ref, ref_leaves, g.double())):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=ATTN_ATOL[dtype] * 8, rtol=ATTN_ATOL[dtype] * 4,
                                   msg=lambda m: f"{backend} {name}: {m}")


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_float_mask_gradient_with_dropout_is_the_score_gradient():
    """With dropout there is no float64 reference; but the mask adds to the scores, so its gradient
    is dS and dq = scale * dS k must hold for the same dropped weights (GQA: k repeated)."""
    q, k, v = rand(2, 4, 40, 16), rand(2, 2, 56, 16), rand(2, 2, 56, 16)
    mask = (0.5 * rand(2, 4, 40, 56)).requires_grad_()
    q.requires_grad_()
    torch.manual_seed(5)
    with gptkern.backend("triton"):
        out = sdpa(q, k, v, attn_mask=mask, dropout_p=0.4, enable_gqa=True, scale=0.3)
        dq, dmask = torch.autograd.grad(out, (q, mask), torch.randn_like(out))
    assert dmask.abs().max() > 0
    want = 0.3 * dmask.double() @ k.double().repeat_interleave(2, 1)
    torch.testing.assert_close(dq.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_opcheck_backward_with_mask_gradient():
    q, k, v = (rand(1, 2, 20, 16) for _ in range(3))
    mask = rand(1, 1, 20, 20).expand(1, 2, 20, 20)
    out, lse = torch.ops.gptkern.triton_attention(q, k, v, mask, False, 0.25, 0.0, None)
    for causal in (False, True):
        torch.library.opcheck(torch.ops.gptkern.triton_attention_backward.default,
                              (torch.randn_like(out), q, k, v, out, lse, mask, causal, 0.25, 0.0, None, True))
    for m in (None, mask > 0):
        with pytest.raises(RuntimeError, match="mask_grad needs a float mask"):
            torch.ops.gptkern.triton_attention_backward(out, q, k, v, out, lse, m, False, 0.25, 0.0, None, True)


def test_meta_tensors_give_meta_results():
    """Meta tensors (shape inference, as torch.nn modules built on device="meta"): torch's SDPA
    gives a meta result, so do gptkern's op and MultiheadAttention (autocast has no meta device)."""
    meta = [torch.empty(*shape, device="meta") for shape in ((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 6))]
    out = sdpa(*meta, enable_gqa=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 3, 6)
    mha = gptkern.nn.MultiheadAttention(8, 2, batch_first=True, device="meta")
    x = torch.empty(2, 3, 8, device="meta")
    assert mha(x, x, x, need_weights=False)[0].shape == (2, 3, 8)


def test_dropout_seed_is_drawn_on_the_inputs_device_whatever_the_default_device():
    """The kernels read the seed on their device (no host sync; a CUDA graph replay draws anew).
    It comes from torch's generator for that device."""
    from gptkern.ops.attention import draw_seed

    torch.manual_seed(3)
    expected = draw_seed(0.1, DEVICE)
    torch.set_default_device("meta")
    try:
        torch.manual_seed(3)
        seed = draw_seed(0.1, DEVICE)
    finally:
        torch.set_default_device(None)
    assert seed.device == expected.device and seed.device.type == DEVICE.type and torch.equal(seed, expected)
    assert seed.shape == (1,) and seed.dtype == torch.int64
    assert draw_seed(0.0, DEVICE) is None


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="needs the triton backend")
def test_triton_op_takes_a_seed_from_another_device_and_refuses_a_bad_one():
    """A seed given on the CPU for inputs elsewhere is copied to them (the kernels read it there);
    dropout with no seed, or a seed that is not one integer, is an error, not seed 0."""
    q = rand(1, 2, 16, 16)
    args = (q, q, q, None, False, 0.25, 0.3)
    with gptkern.backend("triton"):
        a = torch.ops.gptkern.triton_attention(*args, torch.tensor([5]))[0]
        b = torch.ops.gptkern.triton_attention(*args, torch.tensor([5], device=DEVICE))[0]
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        for bad in (None, torch.tensor([1, 2]), torch.tensor([0.5])):
            with pytest.raises(RuntimeError, match="needs seed"):
                torch.ops.gptkern.triton_attention(*args, bad)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in gptkern.available_backends()])
def test_a_nan_score_makes_its_rows_and_their_lse_nan(backend):
    """Every kernel backend (CUDA's under the emulator) propagates a NaN key to the rows that see
    it, output and saved LSE, and leaves the others alone; a row that sees no key gives 0, -inf."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 70, 64), torch.randn(1, 1, 90, 64), torch.randn(1, 1, 90, 64)
    k[0, 0, 50] = float("nan")  # causal, top-left: query rows 50 to 69 see key 50
    if backend == "cpu":
        out, lse = torch.ops.gptkern.attention_fwd(q, k, v, None, True, 0.125, 0.0, None)
    else:
        out, lse = torch.ops.gptkern.triton_attention(q, k, v, None, True, 0.125, 0.0, None)
    assert bool(out[:, :, 50:].isnan().all()) and bool(lse[:, :, 50:].isnan().all())
    assert not out[:, :, :50].isnan().any() and not lse[:, :, :50].isnan().any()


@pytest.mark.parametrize("where", ["query", "mask", "mask, second key block"])
@pytest.mark.parametrize("backend", backends_here(DEVICE, attention=True))
def test_a_nan_score_gives_nan_gradients_as_torch(backend, where):
    """A NaN score (from a NaN query entry or mask entry) makes the gradients NaN where torch's are,
    never inf (the C++ backward's fast exp turned NaN into inf; its forward's running max dropped a
    NaN met after the first block of keys, saving an LSE of +inf)."""
    torch.manual_seed(0)
    keys = 100 if where == "mask, second key block" else 24
    q, k, v = rand(1, 2, 20, 16), rand(1, 2, keys, 16), rand(1, 2, keys, 16)
    mask = rand(20, keys)
    if where == "query":
        q[0, 1, 3, 0] = float("nan")
    else:
        mask[5, keys - 20] = float("nan")
    grads, grad_out = [], rand(1, 2, 20, 16)
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if name == "reference":
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
        else:
            with gptkern.backend(name):
                out = gptkern.ops.scaled_dot_product_attention(*leaves, attn_mask=mask)
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for got, want in zip(*grads):
        assert not got.isinf().any()
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", backends_here(DEVICE, attention=True))
@pytest.mark.parametrize("size", [1e2, 1e3, 1e4])
def test_gradients_of_huge_scores(backend, size):
    """Scores of 1e4 to 1e8: the backward recomputes each weight from the saved log2-domain LSE in
    that same domain, so a key that takes all the weight gets exactly 1 (the C++ backward once
    converted the LSE back to the natural domain first: at 1e8, weights off by 1e6)."""
    if backend == "triton" and size > 1e2:
        pytest.skip("the Triton dK/dV kernel recomputes scores as K Q^T, which may round differently from the "
                    "forward's Q K^T (numpy's BLAS kernels under the interpreter, on some CPUs): at scores of 1e6 "
                    "one ulp of a score is a visible weight error")
    torch.manual_seed(0)
    q, k, v = rand(1, 2, 8, 8) * size, rand(1, 2, 8, 8) * size, rand(1, 2, 8, 8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with gptkern.backend(backend):
        out = gptkern.ops.scaled_dot_product_attention(*leaves)
    (dv,) = torch.autograd.grad(out, leaves[2], torch.ones_like(out))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(F.scaled_dot_product_attention(*ref), ref[2], torch.ones_like(out).double())[0]
    if backend == "triton":  # scores of about 1e4: within a few ulps of each score
        torch.testing.assert_close(dv.double(), want, atol=1e-3, rtol=1e-3)
        return
    assert dv.sum(-1).sum(-1).tolist() == [[64.0, 64.0]]  # columns of P sum to L = 8, times Dv = 8
    torch.testing.assert_close(dv.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backends_here(DEVICE, attention=True))
def test_scale_zero_and_inputs_of_different_ranks_as_torch(backend):
    """scale=0.0 is uniform weights (not the default scale); q, k, v of different ranks and a 2-D
    mask broadcast from the right, as torch's."""
    torch.manual_seed(0)
    q, k, v = rand(1, 2, 6, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    with gptkern.backend(backend):
        got = gptkern.ops.scaled_dot_product_attention(q, k, v, scale=0.0)
    torch.testing.assert_close(got, v.mean(-2, keepdim=True).expand(1, 2, 6, 8), atol=1e-5, rtol=1e-5)
    k3, v3 = rand(2, 9, 8), rand(2, 9, 8)  # (H, S, E) against a (1, H, L, E) query
    mask = torch.ones(6, 9, dtype=torch.bool, device=DEVICE).tril()
    for args, kwargs in (((q, k3, v3), {}), ((q[:, :1], k[:, :1], v[:, :1]), dict(attn_mask=mask))):
        with gptkern.backend(backend):
            got = gptkern.ops.scaled_dot_product_attention(*args, **kwargs)
        want = F.scaled_dot_product_attention(*args, **kwargs)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_with_causal_hides_the_future_keys(backend):
    """A float mask that hides query 0's only causally visible key: that row sees nothing (0, as
    torch), it does not average over the future keys."""
    q, k, v = rand(1, 1, 3, 8), rand(1, 1, 3, 8), rand(1, 1, 3, 8)
    mask = torch.zeros(3, 3, device=DEVICE)
    mask[0, 0] = float("-inf")
    with gptkern.backend(backend):
        out = sdpa(q, k, v, attn_mask=mask, is_causal=True)
    assert_close(out, reference(q, k, v, mask, is_causal=True), torch.float32)
    assert not out[0, 0, 0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_head_dim_of_one_broadcasts(backend):
    """torch broadcasts every batch / head dim of size 1, the query's too (forward and gradients)."""
    check(backend, rand(2, 1, 5, 16), rand(2, 3, 6, 16), rand(2, 3, 6, 16), is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_arguments_take_zero_dim_tensors(backend):
    """torch's argument parser takes a 0-d tensor for a float (scale, dropout_p, eps)."""
    q, k, v, x = rand(1, 2, 4, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8), rand(3, 8)
    with gptkern.backend(backend):
        torch.testing.assert_close(sdpa(q, k, v, scale=torch.tensor(0.5), dropout_p=torch.tensor(0.0)),
                                   F.scaled_dot_product_attention(q, k, v, scale=0.5))
        torch.testing.assert_close(gptkern.ops.layer_norm(x, (8,), eps=torch.tensor(1e-3)),
                                   F.layer_norm(x, (8,), eps=1e-3))
        torch.testing.assert_close(gptkern.ops.rms_norm(x, (8,), eps=torch.tensor(1e-3)),
                                   F.rms_norm(x, (8,), eps=1e-3))
