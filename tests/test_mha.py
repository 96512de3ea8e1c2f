"""gptkern.nn.MultiheadAttention is a drop-in for torch.nn.MultiheadAttention."""
import inspect
import warnings

import numpy as np
import pytest
import torch

import gptkern
from helpers import backends_here

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_here(DEVICE, attention=True)


def pair(**kwargs):
    theirs = torch.nn.MultiheadAttention(**kwargs, device=DEVICE)
    ours = gptkern.nn.MultiheadAttention(**kwargs, device=DEVICE)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def run_both(ours, theirs, args, kwargs, backend, grad=True):
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    for t in leaves:
        t.requires_grad_(grad)
    with gptkern.backend(backend):
        out, weights = ours(*args, **kwargs)
    ref, ref_weights = theirs(*args, **kwargs)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    if kwargs.get("need_weights", True):
        torch.testing.assert_close(weights, ref_weights)
    else:
        assert weights is None and ref_weights is None
    if grad:
        g = torch.randn_like(out)
        params = list(ours.parameters()) + leaves
        ref_params = list(theirs.parameters()) + leaves
        with gptkern.backend(backend):
            got = torch.autograd.grad(out, params, g, allow_unused=True)
        want = torch.autograd.grad(ref, ref_params, g, allow_unused=True)
        for a, b in zip(got, want):
            if a is None or b is None:
                assert a is None and b is None
            else:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_signatures_match():
    def params(fn):
        return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]

    assert issubclass(gptkern.nn.MultiheadAttention, torch.nn.MultiheadAttention)
    assert params(gptkern.nn.MultiheadAttention.__init__) == params(torch.nn.MultiheadAttention.__init__)
    assert params(gptkern.nn.MultiheadAttention.forward) == params(torch.nn.MultiheadAttention.forward)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_with_masks(backend, batch_first):
    ours, theirs = pair(embed_dim=32, num_heads=4, batch_first=batch_first)
    x = torch.randn(2, 9, 32, device=DEVICE) if batch_first else torch.randn(9, 2, 32, device=DEVICE)
    kpm = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    kpm[0, 6:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9, device=DEVICE)
    bool_mask = torch.rand(9, 9, device=DEVICE) > 0.7
    bool_mask.fill_diagonal_(False)
    for kwargs in (dict(), dict(key_padding_mask=kpm), dict(attn_mask=causal, is_causal=True),
                   dict(attn_mask=causal, key_padding_mask=kpm),
                   dict(attn_mask=causal, key_padding_mask=kpm, is_causal=True), dict(attn_mask=bool_mask),
                   dict(attn_mask=bool_mask, key_padding_mask=kpm),
                   dict(attn_mask=torch.randn(8, 9, 9, device=DEVICE))):
        run_both(ours, theirs, (x, x, x), dict(kwargs, need_weights=False), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_kdim_vdim(backend):
    ours, theirs = pair(embed_dim=24, num_heads=3, kdim=10, vdim=14, batch_first=True)
    q = torch.randn(3, 5, 24, device=DEVICE)
    k = torch.randn(3, 7, 10, device=DEVICE)
    v = torch.randn(3, 7, 14, device=DEVICE)
    run_both(ours, theirs, (q, k, v), dict(need_weights=False), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_need_weights_explicit_path_and_unbatched(backend):
    ours, theirs = pair(embed_dim=16, num_heads=2, bias=False)
    x = torch.randn(6, 2, 16, device=DEVICE)
    for average in (True, False):
        run_both(ours, theirs, (x, x, x), dict(need_weights=True, average_attn_weights=average), backend)
    u = torch.randn(6, 16, device=DEVICE)
    run_both(ours, theirs, (u, u, u), dict(need_weights=False), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_kv_and_zero_attn_fall_back(backend):
    ours, theirs = pair(embed_dim=16, num_heads=2, add_bias_kv=True, add_zero_attn=True)
    x = torch.randn(5, 2, 16, device=DEVICE)
    run_both(ours, theirs, (x, x, x), dict(need_weights=False), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_trains_as_torch(backend):
    """dropout=1.0 drops every weight in training (torch's module gives zeros through out_proj);
    the ops function refuses p = 1, so the module takes torch's path there."""
    ours, theirs = pair(embed_dim=16, num_heads=2, dropout=1.0)
    ours.train(), theirs.train()
    x = torch.randn(5, 2, 16, device=DEVICE)
    run_both(ours, theirs, (x, x, x), dict(need_weights=False), backend)


def test_causal_hint_with_padding_passes_no_square_mask(monkeypatch):
    """is_causal with a key padding mask: the kernel gets the (B, 1, 1, S) padding mask and
    is_causal, not an L×S combination (it skips the tiles above the diagonal)."""
    ours, theirs = pair(embed_dim=16, num_heads=2, batch_first=True)
    x = torch.randn(2, 7, 16, device=DEVICE)
    kpm = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    kpm[1, 5:] = True
    seen = []
    sdpa = gptkern.ops.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((None if attn_mask is None else tuple(attn_mask.shape), is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(gptkern.nn.attention.ops, "scaled_dot_product_attention", spy)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)
    run_both(ours, theirs, (x, x, x), dict(attn_mask=causal, key_padding_mask=kpm, is_causal=True,
                                           need_weights=False), "auto")
    assert seen == [((2, 1, 1, 7), True)]
    for module in (ours, theirs):  # attn_mask is not read, but its type is still checked
        with pytest.raises(AssertionError, match="only bool and floating types of attn_mask"):
            module(x, x, x, attn_mask=causal.long(), key_padding_mask=kpm, is_causal=True, need_weights=False)


def test_is_causal_needs_attn_mask():
    ours, _ = pair(embed_dim=16, num_heads=2)
    x = torch.randn(5, 2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, need_weights=False, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_encoder_layer_with_patched_attention(backend):
    """A torch TransformerEncoderLayer whose self_attn is swapped for ours gives the same output."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True, device=DEVICE).eval()
    ref_layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                                 batch_first=True, device=DEVICE).eval()
    ref_layer.load_state_dict(layer.state_dict())
    mha = gptkern.nn.MultiheadAttention(32, 4, batch_first=True, device=DEVICE)
    mha.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = mha
    x = torch.randn(2, 11, 32, device=DEVICE)
    kpm = torch.zeros(2, 11, dtype=torch.bool, device=DEVICE)
    kpm[1, 8:] = True
    with gptkern.backend(backend):
        got = layer(x, src_key_padding_mask=kpm)
    want = ref_layer(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(got[~kpm], want[~kpm], atol=2e-5, rtol=2e-5)


def test_shape_checks_as_torch():
    ours, theirs = pair(embed_dim=16, num_heads=2)
    x = torch.randn(5, 2, 16, device=DEVICE)
    bad_kv = torch.randn(5, 16, device=DEVICE)
    for module in (ours, theirs):
        with pytest.raises(AssertionError):
            module(x, bad_kv, bad_kv, need_weights=False)
        with pytest.raises(AssertionError, match="embedding dimension"):
            module(torch.randn(5, 2, 17, device=DEVICE), x, x, need_weights=False)
        with pytest.raises(AssertionError, match="shape"):
            module(x, torch.randn(6, 2, 16, device=DEVICE), x, need_weights=False)
        for kpm in (torch.zeros(2, 6, dtype=torch.bool, device=DEVICE),
                    torch.zeros(3, 5, dtype=torch.bool, device=DEVICE)):
            with pytest.raises(AssertionError, match="key_padd"):
                module(x, x, x, key_padding_mask=kpm, need_weights=False)
        with pytest.raises(RuntimeError, match="attn_mask"):
            module(x, x, x, need_weights=False, attn_mask=torch.zeros(1, 5, device=DEVICE))
        with pytest.raises(RuntimeError, match="attn_mask"):
            module(x, x, x, need_weights=False, attn_mask=torch.zeros(3, 5, 5, device=DEVICE))


def test_masks_that_are_not_tensors_and_an_is_causal_that_is_not_bool_are_type_errors():
    ours, theirs = pair(embed_dim=16, num_heads=2, batch_first=True)
    x = torch.randn(2, 3, 16, device=DEVICE)
    causal = torch.ones(3, 3, dtype=torch.bool, device=DEVICE).tril()
    for module in (theirs, ours):
        for name in ("key_padding_mask", "attn_mask"):
            with pytest.raises(TypeError, match=None if module is theirs else name):
                module(x, x, x, need_weights=False, **{name: [[False] * 3] * 2})
        for flag in ("no", None, torch.tensor(True)):
            with pytest.raises(TypeError, match="is_causal"):
                module(x, x, x, need_weights=False, attn_mask=~causal, is_causal=flag)
    # torch's fused fast path (eval, no grad, biases) reads no is_causal: any truthy hint passes there
    for module in (theirs, ours):
        module.eval()
    with torch.no_grad():
        want = theirs(x, x, x, need_weights=False, attn_mask=~causal, is_causal=True)[0]
        for flag in (np.bool_(True), 1, torch.tensor(True)):
            torch.testing.assert_close(ours(x, x, x, need_weights=False, attn_mask=~causal, is_causal=flag)[0], want)
            theirs(x, x, x, need_weights=False, attn_mask=~causal, is_causal=flag)


def test_batch_mismatch_empty_batch_and_kdim_checks():
    """A key/value batch that differs from the query's raises (it was reshaped into the query's
    batch); an empty batch works; kdim / vdim mismatches raise AssertionError, as torch."""
    ours, theirs = pair(embed_dim=8, num_heads=2, batch_first=True)
    q, memory = torch.randn(2, 3, 8, device=DEVICE), torch.randn(1, 6, 8, device=DEVICE)
    for module in (ours, theirs):
        with pytest.raises(RuntimeError):
            module(q, memory, memory, need_weights=False)
    empty = torch.randn(0, 3, 8, device=DEVICE)
    out, _ = ours(empty, empty, empty, need_weights=False)
    assert out.shape == (0, 3, 8)
    ours, theirs = pair(embed_dim=8, num_heads=2, kdim=6, vdim=5)
    x = torch.randn(3, 2, 8, device=DEVICE)
    for k, v, match in ((torch.randn(4, 2, 7), torch.randn(4, 2, 5), "key"),
                        (torch.randn(4, 2, 6), torch.randn(4, 2, 4), "value")):
        for module in (ours, theirs):
            with pytest.raises(AssertionError, match=match):
                module(x, k.to(DEVICE), v.to(DEVICE), need_weights=False)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.float64, torch.bool])
@pytest.mark.parametrize("padding_dtype", [None, torch.bool, torch.float16, torch.float64])
@pytest.mark.parametrize("is_causal", [False, True])
def test_mask_dtypes_as_torch(mask_dtype, padding_dtype, is_causal):
    """Masks of other dtypes than the query's: torch merges a key_padding_mask into attn_mask (a
    bool one counting as the query's dtype), and SDPA accepts the result only if it is float32 or
    the query's dtype; gptkern accepts and refuses the same ones, with is_causal too."""
    ours, theirs = pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 3, 8, device=DEVICE)
    causal = torch.ones(3, 3, dtype=torch.bool, device=DEVICE).triu(1)  # True = masked out
    attn_mask = causal if mask_dtype == torch.bool else \
        torch.zeros(3, 3, device=DEVICE).masked_fill(causal, float("-inf")).to(mask_dtype)
    if not is_causal and mask_dtype != torch.bool:
        attn_mask = attn_mask + torch.randn(3, 3, device=DEVICE).to(mask_dtype)
    padding = torch.tensor([[False, True, False]] * 2, device=DEVICE)
    kwargs = dict(attn_mask=attn_mask, need_weights=False, is_causal=is_causal,
                  key_padding_mask=None if padding_dtype is None else padding if padding_dtype == torch.bool else
                  torch.zeros(2, 3, device=DEVICE).masked_fill(padding, float("-inf")).to(padding_dtype))
    try:
        with warnings.catch_warnings(record=True) as their_warnings:
            warnings.simplefilter("always")
            want = theirs(x, x, x, **kwargs)[0]
    except RuntimeError:
        with pytest.raises(RuntimeError, match="attn_mask dtype"):
            ours(x, x, x, **kwargs)
        return
    with warnings.catch_warnings(record=True) as our_warnings:
        warnings.simplefilter("always")
        got = ours(x, x, x, **kwargs)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    deprecated = [{str(w.message) for w in ws if "mismatched" in str(w.message)}  # torch may warn twice
                  for ws in (our_warnings, their_warnings)]
    assert deprecated[0] == deprecated[1] and bool(deprecated[0]) == (padding_dtype not in (None, mask_dtype))


def test_causal_hint_drops_attn_mask_unread_as_torch():
    """With is_causal, no key_padding_mask and need_weights=False, torch drops attn_mask without
    checking its shape (only its rank and dtype); with a padding mask it checks the shape."""
    ours, theirs = pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 5, 8, device=DEVICE)
    wrong = torch.ones(3, 3, dtype=torch.bool, device=DEVICE).triu(1)
    torch.testing.assert_close(ours(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)[0],
                               theirs(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)[0],
                               atol=2e-5, rtol=2e-5)
    kpm = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    for module in (ours, theirs):
        with pytest.raises(RuntimeError, match="attn_mask"):
            module(x, x, x, attn_mask=wrong, key_padding_mask=kpm, is_causal=True, need_weights=False)


@pytest.mark.parametrize("case", ["fast", "training", "grad", "odd heads", "sequence first", "separate kv",
                                  "float mask", "bias off", "3-D (B, L, L)", "3-D (B, L, L), bias off"])
def test_a_misfit_mask_with_the_causal_hint_raises_where_torch_fast_path_reads_it(case):
    """torch's fused fast path (eval, nothing requiring grad, batched self-attention, ...) views
    attn_mask as (1, 1, L, L) even with is_causal: a mask that does not fit raises there. Elsewhere
    torch drops it unread; gptkern raises exactly where torch does."""
    heads = 3 if case == "odd heads" else 2
    ours, theirs = pair(embed_dim=6, num_heads=heads, batch_first=case != "sequence first", bias="bias off" not in case)
    for module in (ours, theirs):
        module.train(case == "training")
    x = torch.randn(2, 5, 6, device=DEVICE)
    kv = x.clone() if case == "separate kv" else x
    wrong = torch.ones(3, 3, dtype=torch.bool, device=DEVICE).triu(1)
    if case == "float mask":
        wrong = torch.zeros(3, 3, device=DEVICE).masked_fill(wrong, float("-inf"))
    if case.startswith("3-D"):  # views as (B, -1, L, L), but the fused kernel (biases on) wants (B * H, L, L)
        wrong = torch.ones(2, 5, 5, dtype=torch.bool, device=DEVICE).triu(1)
    outcomes = []
    for module in (theirs, ours):
        with torch.set_grad_enabled(case == "grad"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module(x, kv, kv, attn_mask=wrong, is_causal=True, need_weights=False)
                outcomes.append("ok")
            except RuntimeError as err:
                outcomes.append("raised")
                assert module is theirs or "attn_mask" in str(err)
    assert outcomes[1] == outcomes[0] and outcomes[0] == ("raised" if case in ("fast", "bias off", "3-D (B, L, L)")
                                                          else "ok")


def test_nested_tensor_input_takes_torch_fast_path():
    ours, theirs = pair(embed_dim=8, num_heads=2, batch_first=True)
    ours.eval(), theirs.eval()
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], device=DEVICE)
    with torch.no_grad():
        got, want = ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0]
    for a, b in zip(got.unbind(), want.unbind()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs", [dict(batch_first=True), dict(kdim=6, vdim=5), dict(bias=False, dropout=0.0)])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script
def test_torch_jit_script(kwargs):
    """Scripted, the module runs torch's attention on its own parameters (gptkern's ops are Python)."""
    ours, theirs = pair(embed_dim=8, num_heads=2, **kwargs)
    scripted = torch.jit.script(ours)
    q = torch.randn(3, 2, 8, device=DEVICE)
    k, v = torch.randn(4, 2, ours.kdim, device=DEVICE), torch.randn(4, 2, ours.vdim, device=DEVICE)
    if ours.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    mask = torch.rand(q.shape[1] if ours.batch_first else q.shape[0], 4, device=DEVICE) < 0.3
    for need_weights in (False, True):
        got = scripted(q, k, v, attn_mask=mask, need_weights=need_weights)
        want = theirs(q, k, v, attn_mask=mask, need_weights=need_weights)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
        assert (got[1] is None) == (want[1] is None)
    layer = gptkern.nn.patch(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)).to(DEVICE)
    x = torch.randn(2, 5, 8, device=DEVICE)
    torch.testing.assert_close(torch.jit.script(layer)(x), layer(x), atol=2e-5, rtol=2e-5)
    assert isinstance(layer.self_attn, gptkern.nn.MultiheadAttention)


@pytest.mark.parametrize("batch_first, shape", [(False, (5, 2, 16)), (True, (2, 5, 16)), (False, (5, 16))])
def test_self_attention_projects_once(monkeypatch, batch_first, shape):
    """query is key is value: one matmul with in_proj_weight, whatever the layout."""
    ours, theirs = pair(embed_dim=16, num_heads=2, batch_first=batch_first)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: calls.append(w.shape) or linear(x, w, b))
    x = torch.randn(*shape, device=DEVICE)
    out, _ = ours(x, x, x, need_weights=False)
    assert calls[0] == (48, 16) and len(calls) == 2  # the fused projection, then out_proj
    monkeypatch.undo()
    torch.testing.assert_close(out, theirs(x, x, x, need_weights=False)[0], atol=2e-5, rtol=2e-5)


def test_out_projection_hooks_do_not_run_as_in_torch():
    """torch reads out_proj's weight and bias and never calls the module: its hooks do not run."""
    for cls in (torch.nn.MultiheadAttention, gptkern.nn.MultiheadAttention):
        module = cls(8, 2, batch_first=True, device=DEVICE)
        calls = []
        module.out_proj.register_forward_hook(lambda mod, args, out: calls.append(1) or out * 0)
        x = torch.randn(1, 3, 8, device=DEVICE)
        for need_weights in (False, True):
            assert not (module(x, x, x, need_weights=need_weights)[0] == 0).all()
        assert calls == []


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_that_see_no_key_as_torch(backend, bias):
    """A query that may attend to no key (a fully padded sequence, an attn_mask row of True, or under
    the causal hint only padding at or before it) gets NaN where torch's fast path runs (eval, no
    grad, batched self-attention, with biases), 0 on torch's other paths (training, gradients, no
    biases): as torch, each."""
    ours, theirs = pair(embed_dim=8, num_heads=2, batch_first=True, bias=bias)
    x = torch.randn(2, 3, 8, device=DEVICE)
    kpm = torch.tensor([[False] * 3, [True] * 3], device=DEVICE)
    am = torch.tensor([[True] * 3, [False, True, False], [False] * 3], device=DEVICE)
    causal = torch.ones(3, 3, dtype=torch.bool, device=DEVICE).triu(1)
    left_padded = torch.tensor([[True, False, False], [False] * 3], device=DEVICE)
    cases = (dict(key_padding_mask=kpm), dict(attn_mask=am), dict(key_padding_mask=kpm, attn_mask=am),
             dict(attn_mask=causal, is_causal=True, key_padding_mask=left_padded), dict(attn_mask=causal | am))
    for kwargs in cases:
        for train in (False, True):
            ours.train(train)
            theirs.train(train)
            with torch.no_grad(), gptkern.backend(backend):
                out = ours(x, x, x, need_weights=False, **kwargs)[0]
            with torch.no_grad():
                ref = theirs(x, x, x, need_weights=False, **kwargs)[0]
            assert torch.equal(out.isnan(), ref.isnan()), (kwargs, train)
            assert out.isnan().any() == (bias and not train)  # the case is one: NaN on the fast path only
            torch.testing.assert_close(out.nan_to_num(7.0), ref.nan_to_num(7.0), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_zero_attn_alone_as_torch(backend):
    """add_zero_attn without add_bias_kv (a zero key and value appended) takes torch's path too."""
    torch.manual_seed(0)
    ours, theirs = pair(embed_dim=16, num_heads=2, add_zero_attn=True)
    x = torch.randn(5, 2, 16, device=DEVICE)
    run_both(ours, theirs, (x, x, x), dict(need_weights=False), backend)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_output_is_contiguous_so_view_works_as_after_torch(batch_first, train):
    """torch's sequence-first output is a contiguous (L, B, E) tensor (code calls .view on it);
    gptkern's is contiguous in both layouts."""
    ours, theirs = pair(embed_dim=8, num_heads=2, batch_first=batch_first)
    x = torch.randn(4, 3, 8, device=DEVICE)
    for module in (ours, theirs):
        module.train(train)
    for kv in (x, torch.randn(4, 3, 8, device=DEVICE)):
        with torch.set_grad_enabled(train):
            out, ref = ours(x, kv, kv, need_weights=False)[0], theirs(x, kv, kv, need_weights=False)[0]
        assert out.is_contiguous() and out.shape == ref.shape
        if not train:
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        assert out.view(-1, 8).shape == (12, 8)


@pytest.mark.parametrize("trace", ["compile", "make_fx", "export"])
def test_queries_that_see_no_key_while_traced_as_torch(trace):
    """Under torch.compile, make_fx and torch.export torch's module leaves its fast path, so a
    query that sees no key gets 0 there rather than NaN; gptkern's too."""
    from torch.fx.experimental.proxy_tensor import make_fx

    ours, theirs = pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 4, 8, device=DEVICE)
    kpm = torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)
    kpm[0] = True
    outs = []
    for module in (theirs.eval(), ours.eval()):
        class Call(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.attention = module

            def forward(self, x, kpm):
                return self.attention(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

        with torch.no_grad():
            if trace == "compile":
                outs.append(torch.compile(Call(), backend="eager", fullgraph=True)(x, kpm))
            elif trace == "make_fx":
                outs.append(make_fx(Call())(x, kpm)(x, kpm))
            else:
                outs.append(torch.export.export(Call(), (x, kpm)).module()(x, kpm))
    assert torch.equal(outs[1].isnan(), outs[0].isnan())  # (torch 2.13: no NaN under each of the three)
    torch.testing.assert_close(outs[1].nan_to_num(7.0), outs[0].nan_to_num(7.0), atol=2e-5, rtol=2e-5)


def test_eval_mode_applies_no_dropout():
    ours, theirs = pair(embed_dim=16, num_heads=2, dropout=0.5, batch_first=True)
    ours.eval(), theirs.eval()
    x, y = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 6, 16, device=DEVICE)
    first, second = (ours(x, y, y, need_weights=False)[0] for _ in range(2))
    assert torch.equal(first, second)
    torch.testing.assert_close(first, theirs(x, y, y, need_weights=False)[0], atol=2e-5, rtol=2e-5)
