"""flash_attn_varlen: packed ragged sequences, causal (bottom-right) and sliding windows, on every
backend that runs here, against per-sequence float64 SDPA."""
import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.ops.attention import varlen_visibility
from helpers import assert_close, backends_here, dtypes_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_here(DEVICE, attention=True)
PARAMS = [(b, d) for b in BACKENDS for d in dtypes_for(b, DEVICE)]
varlen = gptkern.ops.flash_attn_varlen


def offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def reference(q, k, v, lens_q, lens_k, causal, window, scale=None):
    """Float64, one sequence at a time, explicit visibility mask; rows that see nothing give 0."""
    outs, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        qb = q[q0:q0 + lq].double().transpose(0, 1)
        kb = k[k0:k0 + lk].double().transpose(0, 1)
        vb = v[k0:k0 + lk].double().transpose(0, 1)
        group = qb.shape[0] // kb.shape[0]
        kb, vb = kb.repeat_interleave(group, 0), vb.repeat_interleave(group, 0)
        s = qb @ kb.transpose(1, 2) * (scale if scale is not None else qb.shape[-1] ** -0.5)
        visible = varlen_visibility(lq, lk, causal, window, q.device)
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no visible key: all zero
        outs.append((p @ vb).transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)


def check(backend, dtype, lens_q, lens_k, h=4, hk=2, d=16, dv=24, causal=False, window=(-1, -1), scale=None):
    q = torch.randn(sum(lens_q), h, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), hk, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), hk, dv, device=DEVICE, dtype=dtype, requires_grad=True)
    with gptkern.backend(backend):
        out = varlen(q, k, v, offsets(lens_q), offsets(lens_k), max(lens_q), max(lens_k), causal=causal,
                     window_size=window, scale=scale)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, lens_q, lens_k, causal, window, scale)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype, msg=f"{backend} forward")
    g = torch.randn_like(out)
    with gptkern.backend(backend):
        grads = torch.autograd.grad(out, (q, k, v), g)
    for name, got, want in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_close(got, want, dtype, grad=True, atol_scale=4, msg=f"{backend} {name}")


RAGGED = [([5, 0, 1, 70, 33], [7, 3, 1, 70, 20]), ([1], [1]), ([64, 65], [64, 65]), ([0, 9], [4, 0])]


@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("lens", RAGGED)
@pytest.mark.parametrize("causal", [False, True])
def test_ragged(backend, dtype, lens, causal):
    check(backend, dtype, *lens, causal=causal)


# Lengths at the edges of 64-wide key blocks (the interpreter's, and a GPU block size), where the
# forward moves from key blocks it need not check to checked ones: a causal diagonal S - L of 62
# (2 queries over 64 keys), sequences of 63, 127 and 129 keys followed by another sequence.
BLOCK_EDGES = [([2, 70, 5], [64, 127, 9]), ([63, 65], [63, 65]), ([128, 1], [129, 63])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", BLOCK_EDGES)
@pytest.mark.parametrize("causal", [False, True])
def test_block_edges(backend, lens, causal):
    check(backend, torch.float32, *lens, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_a_query_block_wholly_before_the_first_key(backend):
    """Causal, 130 queries over 3 keys: the diagonal S - L = -127 puts queries 0-126 before every key
    (zeros), so the first query blocks' ranges of keys they surely see come out negative."""
    check(backend, torch.float32, [130, 4], [3, 4], causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,window", [(False, (8, 3)), (True, (5, -1)), (False, (0, 0)), (False, (-1, 2)),
                                           (True, (0, 0))])
def test_windows(backend, causal, window):
    check(backend, torch.float32, [5, 40, 70], [9, 40, 50], causal=causal, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(1, 1), (0, 1), (1, 0), (2, 3)])
def test_narrow_windows_over_several_key_blocks(backend, window):
    """Windows of a few keys on sequences longer than two 64-key blocks: the backward kernels'
    query ranges per key block end exactly at a block's first rows for some of them."""
    check(backend, torch.float32, [100, 7], [100, 9], causal=False, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_wider_than_every_sequence_are_unbounded(backend):
    """A window side past every key (up to 2**63 - 1) sees what -1 sees: no kernel adds it to a
    position and wraps around (Triton's int32 sums gave all zeros), with L != S either way."""
    lens_q, lens_k = [3, 10, 5], [4, 6, 9]
    q, k, v = (torch.randn(sum(n), 2, 16, device=DEVICE) for n in (lens_q, lens_k, lens_k))
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    ref = reference(q, k, v, lens_q, lens_k, False, (-1, -1))
    for window in ((2**31 - 10, -1), (-1, 2**31 - 10), (2**31 - 1, 2**31 - 1), (2**63 - 1, 2**63 - 1), (9, 10)):
        with gptkern.backend(backend):
            out = varlen(q, k, v, cu_q, cu_k, 10, 9, window_size=window)
        assert_close(out, ref, torch.float32)
    assert_close(varlen(q, k, v, cu_q, cu_k, 10, 9, window_size=(7, 9)),
                 reference(q, k, v, lens_q, lens_k, False, (7, 9)), torch.float32)  # (7 < 9 - 1 still bounds)
    if backend in ("triton", "cpu"):  # the op itself, past the Python entry point: the kernel caps each side
        ops = torch.ops.gptkern
        op = ops.triton_attention_varlen if backend == "triton" else ops.attention_varlen_fwd
        out = op(q, k, v, cu_q, cu_k, 10, 9, False, 0.25, 2**63 - 1, 2**63 - 1, 0.0, None)[0]
        assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_right_side_past_every_key_but_not_every_query_still_bounds(backend):
    """right = 5 with 4 keys in all but a sequence of 12 queries over 3 keys: bottom-right aligned,
    its query i sees keys j <= i - 4 (queries 0-3 none). A side is unbounded only past l - 1 queries
    (a kernel that capped it against the keys' count would show those queries every key)."""
    check(backend, torch.float32, [12, 2], [3, 1], window=(-1, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_attention_across_sequences(backend):
    """Changing one sequence's keys leaves every other sequence's output unchanged."""
    lens = [6, 9, 4]
    q, k, v = (torch.randn(19, 2, 16, device=DEVICE) for _ in range(3))
    cu = offsets(lens)
    with gptkern.backend(backend):
        a = varlen(q, k, v, cu, cu, 9, 9)
        k2 = k.clone()
        k2[6:15] = torch.randn_like(k2[6:15])  # (a shift common to all keys would not change softmax)
        b = varlen(q, k2, v, cu, cu, 9, 9)
    torch.testing.assert_close(a[:6], b[:6])
    torch.testing.assert_close(a[15:], b[15:])
    assert not torch.allclose(a[6:15], b[6:15])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_offsets(backend):
    """Offsets that are a strided view (a slice of a longer tensor) are read by their strides."""
    lens_q, lens_k = [4, 6, 2], [5, 3, 7]
    q, k, v = (torch.randn(sum(n), 2, 16, device=DEVICE) for n in (lens_q, lens_k, lens_k))

    def strided(cu):  # the same values at stride 2
        return torch.stack([cu, torch.full_like(cu, 999)], 1).flatten()[::2]

    with gptkern.backend(backend):
        want = varlen(q, k, v, offsets(lens_q), offsets(lens_k), 6, 7)
        got = varlen(q, k, v, strided(offsets(lens_q)), strided(offsets(lens_k)), 6, 7)
    assert_close(got, reference(q, k, v, lens_q, lens_k, False, (-1, -1)), torch.float32)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_dense_sdpa(backend):
    """Equal-length sequences: varlen equals batched SDPA (causal: L == S, so both alignments agree)."""
    q, k, v = (torch.randn(3, 2, 20, 16, device=DEVICE) for _ in range(3))
    packed = [t.transpose(1, 2).reshape(60, 2, 16) for t in (q, k, v)]
    cu = offsets([20, 20, 20])
    with gptkern.backend(backend):
        out = varlen(*packed, cu, cu, 20, 20, causal=True)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(60, 2, 16)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    q, k, v = (torch.randn(10, 2, 8, device=DEVICE) for _ in range(3))
    good = offsets([4, 6])
    no_offsets = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    cases = [
        (RuntimeError, "start at 0", dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32, device=DEVICE))),
        (RuntimeError, "non-decreasing", dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32,
                                                                        device=DEVICE),
                                              cu_seqlens_k=offsets([3, 3, 4]))),
        (RuntimeError, "has 10 rows", dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE))),
        (RuntimeError, "max_seqlen", dict(max_seqlen_q=5)),
        (RuntimeError, "same length", dict(cu_seqlens_k=offsets([4, 3, 3]))),
        (RuntimeError, "int32", dict(cu_seqlens_q=good.float())),
        (RuntimeError, "dropout", dict(dropout_p=1.5)),
        (ValueError, "window_size", dict(window_size=(-2, 0))),
        (RuntimeError, "heads", dict(k=torch.randn(10, 3, 8, device=DEVICE), v=torch.randn(10, 3, 8, device=DEVICE))),
        (RuntimeError, "total, heads, dim", dict(q=torch.randn(10, 16, device=DEVICE))),
        (RuntimeError, "dtype", dict(k=k.half())),
        (TypeError, "argument 'causal' must be bool", dict(causal="no")),
        (TypeError, "argument 'scale' must be float", dict(scale="0.5")),
        (TypeError, "argument 'dropout_p' must be float", dict(dropout_p=None)),
        (TypeError, "argument 'max_seqlen_k' must be int", dict(max_seqlen_k=6.5)),
        (RuntimeError, "max_seqlen_q must be >= 0", dict(max_seqlen_q=-1)),
        (ValueError, "window_size", dict(window_size=(True, 0))),
        (RuntimeError, "shapes do not match", dict(v=torch.randn(10, 1, 8, device=DEVICE))),  # k and v heads
        (RuntimeError, "cu_seqlens_q must be a 1-D", dict(cu_seqlens_q=no_offsets, cu_seqlens_k=no_offsets)),
    ]
    if DEVICE.type == "cuda" and backend != "torch":  # GPU kernels trust the offsets' values (no host sync)
        cases = cases[4:]
    for exc, match, override in cases:
        args = dict(q=q, k=k, v=v, cu_seqlens_q=good, cu_seqlens_k=good, max_seqlen_q=6, max_seqlen_k=6)
        args.update(override)
        with gptkern.backend(backend), pytest.raises(exc, match=match):
            varlen(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generous_max_seqlen(backend):
    """flash-attn callers often pass a loose bound (the block size): the result is the same, and
    the kernels' grid is sized by the packed tensors, not by the bound (2**40 hung the triton one)."""
    q, k, v = (torch.randn(7, 2, 8, device=DEVICE) for _ in range(3))
    cu = offsets([3, 4])
    with gptkern.backend(backend):
        want = varlen(q, k, v, cu, cu, 4, 4, causal=True)
        got = varlen(q, k, v, cu, cu, 2**40, 2**40, causal=True)
        as_tensors = varlen(q, k, v, cu, cu, torch.tensor(4), torch.tensor(4), causal=True)  # 0-d: ints to torch
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(as_tensors, want)


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_opcheck_and_compile():
    q, k, v = (torch.randn(30, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = offsets([10, 0, 20])
    torch.library.opcheck(torch.ops.gptkern.triton_attention_varlen.default,
                          (q, k, v, cu, cu, 20, 20, True, 0.25, 4, -1, 0.0, None))
    torch.library.opcheck(torch.ops.gptkern.triton_attention_varlen.default,
                          (q, k, v, cu, cu, 20, 20, False, 0.25, -1, -1, 0.2, torch.tensor([99])))
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: varlen(q, k, v, cu, cu, 20, 20, causal=True), fullgraph=True)
    with gptkern.backend("triton"):
        out = f(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v, [10, 0, 20], [10, 0, 20], True, (-1, -1)).float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_compiled_int64_offsets_beyond_int32_are_refused_not_wrapped():
    q = torch.randn(10, 2, 8)
    f = torch.compile(lambda q, cu: varlen(q, q, q, cu, cu, 7, 7), backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    with gptkern.backend("cpu"), pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
        f(q, torch.tensor([0, 3 + 2**32, 10]))  # wrapped to int32 it would read [0, 3, 10]


def test_meta_tensors_give_a_meta_result():
    q, k, v = (torch.empty(10, 2, d, device="meta") for d in (8, 8, 6))
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    out = varlen(q, k, v, cu, cu, 7, 7, causal=True)
    assert out.device.type == "meta" and out.shape == (10, 2, 6)


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_dropout_matches_dense_and_is_reproducible():
    """One packed sequence draws the same dropout mask as dense SDPA of batch 1 (same seed, same
    Philox counters), forward and backward; the seed decides the mask."""
    q, k, v = (torch.randn(1, 2, 37, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    packed = [t.detach().transpose(1, 2).reshape(37, 2, 16).requires_grad_() for t in (q, k, v)]
    cu = offsets([37])
    g = torch.randn(1, 2, 37, 16, device=DEVICE)
    with gptkern.backend("triton"):
        torch.manual_seed(5)
        dense = gptkern.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True)
        dense_grads = torch.autograd.grad(dense, (q, k, v), g)
        torch.manual_seed(5)
        out = varlen(*packed, cu, cu, 37, 37, dropout_p=0.4, causal=True)
        grads = torch.autograd.grad(out, packed, g.transpose(1, 2).reshape(37, 2, 16))
        torch.manual_seed(6)
        other = varlen(*packed, cu, cu, 37, 37, dropout_p=0.4, causal=True)
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape(37, 2, 16))
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want.transpose(1, 2).reshape(37, 2, 16))
    assert not torch.equal(out, other)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,window", [(True, (3, -1)), (False, (4, 4)), (False, (0, 5)), (True, (-1, -1))])
def test_sliding_window_attention_on_dense_tensors(backend, causal, window, monkeypatch):
    """The band attention of gptkern's windowed modules: dense (B, H, L, D) tensors, each batch row
    a sequence of the varlen kernels; no (L, L) mask is made where they serve it (triton, cpu)."""
    from gptkern.ops import attention as attention_ops

    sizes = dict(b=3, h=4, hk=2, l=37, d=16, dv=24)
    q = torch.randn(sizes["b"], sizes["h"], sizes["l"], sizes["d"], device=DEVICE, requires_grad=True)
    k = torch.randn(sizes["b"], sizes["hk"], sizes["l"], sizes["d"], device=DEVICE, requires_grad=True)
    v = torch.randn(sizes["b"], sizes["hk"], sizes["l"], sizes["dv"], device=DEVICE).transpose(2, 3).contiguous()
    v = v.transpose(2, 3).requires_grad_()  # a non-contiguous view
    masks = []
    original = attention_ops.varlen_visibility
    monkeypatch.setattr(attention_ops, "varlen_visibility", lambda *a: masks.append(a) or original(*a))
    with gptkern.backend(backend):
        out = attention_ops.sliding_window_attention(q, k, v, window, causal)
    resolved = gptkern._backend.choose("flash_attn_varlen", DEVICE, {"triton": lambda: None, "cpu": lambda: None,
                                                                      "torch": lambda: None}) \
        if backend == "auto" else backend
    assert bool(masks) == (resolved == "torch")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    packed = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in leaves]
    lens = [sizes["l"]] * sizes["b"]
    ref = reference(*packed, lens, lens, causal, window).view(sizes["b"], sizes["l"], sizes["h"], -1).transpose(1, 2)
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, msg=f"{backend} forward")
    g = torch.randn_like(out)
    with gptkern.backend(backend):
        grads = torch.autograd.grad(out, (q, k, v), g)
    for name, got, want in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_close(got, want, torch.float32, grad=True, atol_scale=4, msg=f"{backend} {name}")


def test_sliding_window_attention_edges():
    from gptkern.ops.attention import sliding_window_attention

    q = torch.randn(2, 2, 0, 8, device=DEVICE)
    assert sliding_window_attention(q, q, q, (2, -1), True).shape == (2, 2, 0, 8)
    x = torch.randn(2, 2, 5, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="sliding_window_attention: q, k, v must be"):
        sliding_window_attention(x, x[:, :, :4], x, (2, -1), True)
    with pytest.raises(RuntimeError, match="sliding_window_attention: q, k, v must be"):
        sliding_window_attention(x[0], x[0], x[0], (2, -1), True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_gives_zeros_with_zero_gradients(backend):
    """Sequences without keys, and no sequences at all, give zeros that stay in the autograd graph
    on every backend (a NaN query row included): backward runs and gives zero gradients."""
    for cu_q, cu_k in (([0, 3], [0, 0]), ([0], [0]), ([0, 2, 3], [0, 0, 4])):
        q = torch.randn(cu_q[-1], 2, 8, device=DEVICE)
        if cu_q[-1]:
            q[0] = float("nan")
        q.requires_grad_()
        k = torch.randn(cu_k[-1], 2, 8, device=DEVICE, requires_grad=True)
        v = torch.randn(cu_k[-1], 2, 6, device=DEVICE, requires_grad=True)
        offsets = [torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cu_q, cu_k)]
        with gptkern.backend(backend):
            out = gptkern.ops.flash_attn_varlen(q, k, v, *offsets, 3, max(cu_k[-1], 1))
        assert out.shape == (cu_q[-1], 2, 6) and out.requires_grad
        empty_rows = cu_q[1] if len(cu_q) > 1 else 0  # the first sequence has no keys
        assert torch.equal(out[:empty_rows], torch.zeros_like(out[:empty_rows]))
        grads = torch.autograd.grad(out.sum(), (q, k, v))  # every input in the graph, k without keys too
        assert torch.equal(grads[0][:empty_rows], torch.zeros_like(grads[0][:empty_rows]))
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, 0.5, -0.3])
def test_explicit_scales(backend, scale):
    """An explicit scale on every backend, 0 (uniform weights, not the default) included."""
    check(backend, torch.float32, [5, 0, 9], [7, 3, 9], causal=True, scale=scale)
