"""Transformer building blocks (gptkern.nn): attention modules against a float64 reference, MLP, Block."""
import math

import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.nn import MLP, Block, CausalSelfAttention, CrossAttention
from gptkern.nn.rotary import apply_rotary, rope_cos_sin
from gptkern.nn.transformer import make_norm, self_attention_mask
from helpers import assert_close, backends_here


def reference_attention(q, k, v, visible):
    """float64 softmax(q k^T / sqrt(d)) v with ``visible`` (.., L, S) bool; GQA by repetition."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v


def reference_self_attention(module, x, rope=None, key_mask=None):
    b, l, _ = x.shape
    h, hkv, d = module.n_head, module.n_kv_head, module.head_dim
    w, bias = module.c_attn.weight.double(), module.c_attn.bias.double()
    q, k, v = F.linear(x.double(), w, bias).split((h * d, hkv * d, hkv * d), -1)
    q, k, v = (t.reshape(b, l, -1, d).transpose(1, 2) for t in (q, k, v))
    if rope is not None:
        q, k = apply_rotary(q, *(r.double() for r in rope)), apply_rotary(k, *(r.double() for r in rope))
    i, j = torch.arange(l)[:, None], torch.arange(l)[None, :]
    visible = torch.ones(l, l, dtype=torch.bool)
    if module.causal:
        visible &= j <= i
    if module.window is not None:
        visible &= (i - j).abs() < module.window
    if key_mask is not None:
        visible = visible & (key_mask[:, None, None, :] | (i == j))
    y = reference_attention(q, k, v, visible).transpose(1, 2).reshape(b, l, h * d)
    return F.linear(y, module.c_proj.weight.double(), module.c_proj.bias.double())


ATTENTION_CASES = [
    dict(n_head=4, n_kv_head=None, causal=True, window=None, rope=False, key_mask=False),
    dict(n_head=4, n_kv_head=2, causal=True, window=None, rope=True, key_mask=False),
    dict(n_head=4, n_kv_head=1, causal=True, window=5, rope=True, key_mask=False),
    dict(n_head=4, n_kv_head=4, causal=False, window=None, rope=False, key_mask=True),
    dict(n_head=2, n_kv_head=2, causal=True, window=None, rope=False, key_mask=True),
    dict(n_head=4, n_kv_head=2, causal=False, window=4, rope=False, key_mask=False),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_self_attention_matches_reference(case, device):
    torch.manual_seed(0)
    n_embd, b, l = 64, 2, 13
    module = CausalSelfAttention(n_embd, case["n_head"], case["n_kv_head"], causal=case["causal"],
                                 window=case["window"]).to(device)
    x = torch.randn(b, l, n_embd, device=device, requires_grad=True)
    rope = rope_cos_sin(torch.arange(l, device=device), module.head_dim) if case["rope"] else None
    key_mask = None
    if case["key_mask"]:
        key_mask = torch.rand(b, l, device=device) > 0.3
    expected = reference_self_attention(module, x, rope, key_mask)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    expected_grad = x.grad.clone()
    for name in backends_here(device, attention=True):
        x.grad = None
        with gptkern.backend(name):
            out = module(x, rope, key_mask)
        out.backward(grad.to(out.dtype))
        assert_close(out, expected, torch.float32, msg=name)
        assert_close(x.grad, expected_grad, torch.float32, grad=True, msg=f"{name} grad")


def test_self_attention_mask_shapes():
    mask, causal = self_attention_mask(6, 6, True, None, None, torch.device("cpu"))
    assert mask is None and causal
    mask, causal = self_attention_mask(6, 6, True, 2, None, torch.device("cpu"))
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert not causal and torch.equal(mask, (j <= i) & (j > i - 2))
    key_mask = torch.tensor([[False, True, True, True, True, True]])
    mask, _ = self_attention_mask(6, 6, False, None, key_mask, torch.device("cpu"))
    assert mask.shape == (1, 1, 6, 6)
    assert mask[0, 0, 0, 0] and not mask[0, 0, 1, 0]  # padding sees itself, nobody else sees it
    with pytest.raises(ValueError, match="window"):
        CausalSelfAttention(32, 4, window=0)


def test_token_masks_of_the_blocks_must_be_bool_b_by_s():
    """An HF-style 0/1 mask (int or float) would be read as additive or fail deep in SDPA: refused
    with the argument named."""
    x = torch.randn(2, 5, 32)
    attn, cross = CausalSelfAttention(32, 4), CrossAttention(32, 4)
    memory = torch.randn(2, 7, 32)
    for bad in (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5)):
        with pytest.raises(TypeError, match="key_mask must be a .B, S. bool tensor"):
            attn(x, key_mask=bad)
    with pytest.raises(ValueError, match=r"key_mask must have shape \(B, S\) = \(2, 5\), got \[2, 6\]"):
        attn(x, key_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="memory_mask"):
        cross(x, memory, memory_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="memory_mask"):
        cross(x, memory, memory_mask=torch.ones(2, 5, dtype=torch.bool))
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    assert cross(x, memory, memory_mask=keep).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="n_kv_head"):
        CausalSelfAttention(32, 4, n_kv_head=3)


def test_rotary_is_a_rotation_of_relative_position():
    torch.manual_seed(0)
    d = 16
    q, k = torch.randn(1, 1, 1, d, dtype=torch.float64), torch.randn(1, 1, 1, d, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), d, dtype=torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([pk]), d, dtype=torch.float64)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    assert torch.allclose(score(7, 3), score(14, 10))  # depends on pq - pk only
    assert not torch.allclose(score(7, 3), score(7, 4))
    cos, sin = rope_cos_sin(torch.arange(5), d)
    assert torch.allclose(apply_rotary(q.float(), cos[:1], sin[:1]), q.float())  # position 0: identity
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(torch.arange(3), 7)


def test_cross_attention_ignores_padded_memory(device):
    torch.manual_seed(0)
    module = CrossAttention(32, 4).to(device)
    x, memory = torch.randn(2, 5, 32, device=device), torch.randn(2, 9, 32, device=device)
    keep = torch.ones(2, 9, dtype=torch.bool, device=device)
    keep[0, 6:] = False
    out = module(x, memory, keep)
    memory2 = memory.clone()
    memory2[0, 6:] = torch.randn(3, 32, device=device)
    assert_close(module(x, memory2, keep), out, torch.float32)
    # against the reference on the unpadded part
    q = F.linear(x.double(), module.q_proj.weight.double(), module.q_proj.bias.double())
    k, v = F.linear(memory.double(), module.kv_proj.weight.double(), module.kv_proj.bias.double()).chunk(2, -1)
    q, k, v = (t.reshape(2, -1, 4, 8).transpose(1, 2) for t in (q, k, v))
    y = reference_attention(q, k, v, keep[:, None, None, :]).transpose(1, 2).reshape(2, 5, 32)
    expected = F.linear(y, module.c_proj.weight.double(), module.c_proj.bias.double())
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "swiglu"])
def test_mlp_activations(activation):
    torch.manual_seed(0)
    mlp = MLP(16, 24, activation).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    h = mlp.c_fc(x)
    if activation == "swiglu":
        assert mlp.c_fc.out_features == 48
        gate, up = h.chunk(2, -1)
        h = gate * torch.sigmoid(gate) * up
    elif activation == "relu":
        h = h.clamp(min=0)
    elif activation == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    else:
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp(x), mlp.c_proj(h))
    with pytest.raises(ValueError, match="activation"):
        MLP(16, 24, "tanh")


def test_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = Block(32, 4, norm="rmsnorm", activation="swiglu", bias=False)
    x = torch.randn(2, 7, 32)
    h = x + block.attn(block.ln_1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.ln_2(h)))
    assert isinstance(block.ln_1, gptkern.nn.RMSNorm)
    with pytest.raises(ValueError, match="norm"):
        Block(32, 4, norm="batchnorm")


@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_rotary_is_llama_and_hugging_face_half_split(base):
    """Half-split RoPE as Llama / Hugging Face lay it out (weights in that convention load as they
    are): out[:h] = x1 cos - x2 sin, out[h:] = x2 cos + x1 sin, at frequencies base ** (-2i / d)."""
    d, pos = 4, 3
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)  # (B, H, L, D)
    cos, sin = rope_cos_sin(torch.tensor([pos]), d, base, dtype=torch.float64)
    freqs = [base ** (-i / d) for i in (0, 2)]
    c = torch.tensor([math.cos(pos * f) for f in freqs], dtype=torch.float64)
    s = torch.tensor([math.sin(pos * f) for f in freqs], dtype=torch.float64)
    x1, x2 = x[..., :2], x[..., 2:]
    torch.testing.assert_close(apply_rotary(x, cos, sin), torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1),
                               atol=1e-6, rtol=1e-6)  # (angles in fp32)


def test_block_dropout_reaches_the_attention_output_and_the_mlp():
    """Training mode, dropout 0.999: the attention sublayer's residual dropout and the MLP's dropout
    zero (nearly) all of their outputs (without them, c_proj's bias would show through)."""
    torch.manual_seed(0)
    block = Block(16, 2, dropout=0.999).train()
    x = torch.randn(2, 8, 16)
    attn, mlp = block.attn(block.ln_1(x)), block.mlp(block.ln_2(x))
    assert (attn == 0).float().mean() > 0.95
    assert (mlp == 0).float().mean() > 0.95
    block.eval()
    assert (block.attn(block.ln_1(x)) != 0).all() and (block.mlp(block.ln_2(x)) != 0).all()


def test_cross_attention_dropout_is_off_in_eval_mode():
    torch.manual_seed(0)
    attn = CrossAttention(32, 4, dropout=0.5).eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, memory), attn(x, memory), rtol=0, atol=0)


def test_bidirectional_window_with_one_document_equals_the_plain_forward():
    """causal=False with a window sees ``window - 1`` keys on both sides, in the packed-document
    (varlen) path as in the plain one."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, causal=False, window=2).eval()
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        plain = attn(x)
        packed = attn(x, doc_bounds=(torch.tensor([0, 6], dtype=torch.int32), 6))
    torch.testing.assert_close(packed, plain)


def test_rotary_positions_are_not_rounded_through_half_precision():
    cos, sin = rope_cos_sin(torch.tensor([4097]), 8, dtype=torch.float64)  # 4097 is not a float16
    assert abs(cos[0, 0].item() - math.cos(4097)) < 1e-5
    assert abs(sin[0, 0].item() - math.sin(4097)) < 1e-5

# Found by a mutation run over generation and nn (each test kills a mutant that all others let through).


def test_make_norm_and_block_keep_the_rmsnorm_eps():
    """T9 (transformer.py:24 RMSNorm(dim, eps=eps) -> RMSNorm(dim)): a Llama-style GPT's
    norm_eps was dropped for torch's default."""
    x = torch.randn(2, 3, 8) * 0.1
    norm = make_norm("rmsnorm", 8, 0.5)
    assert norm.eps == 0.5
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), norm.weight, 0.5))
    block = Block(8, 2, norm="rmsnorm", norm_eps=0.5)
    assert block.ln_1.eps == block.ln_2.eps == 0.5


def test_scripted_rmsnorm_keeps_its_eps():
    """N3 (normalization.py:28 the TorchScript path without eps)."""
    x = torch.randn(2, 3, 8) * 0.1
    norm = gptkern.nn.RMSNorm(8, eps=0.5)
    torch.testing.assert_close(torch.jit.script(norm)(x), norm(x))


def test_block_mlp_hidden_defaults_to_four_times_the_width():
    """T5 (transformer.py:210 `4 * n_embd` -> `2 * n_embd`): Block's documented GPT-2 default."""
    assert Block(8, 2).mlp.c_fc.out_features == 32
    assert Block(8, 2, activation="swiglu").mlp.c_proj.in_features == 32


def test_self_attention_mask_queries_are_the_last_l_of_s_positions():
    """T2 (transformer.py:53 `+ (s - l)` dropped from `itself`): with fewer queries than keys, a
    query at a padding position still sees itself (no row of the mask is empty)."""
    key_mask = torch.tensor([[True, False, False, False]])
    mask, is_causal = self_attention_mask(2, 4, True, None, key_mask, torch.device("cpu"))
    assert not is_causal
    assert mask[0, 0].tolist() == [[True, False, True, False], [True, False, False, True]]
