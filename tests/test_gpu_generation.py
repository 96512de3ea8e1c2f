"""GPU-only checks of decoding: CUDA-graph replay equals eager decoding, the decode kernel at
real cache lengths in bf16."""
import pytest
import torch

import gptkern
from gptkern.generation import generate
from gptkern.models import GPT, GPTConfig
from helpers import assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("cache", ["static", "paged"])
def test_cuda_graph_decode_equals_eager(preset, cache):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset, init_std=0.2)).cuda().eval()
    prompt = torch.randint(1, model.config.vocab_size, (3, 12), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    eager = generate(model, prompt, 40, attention_mask=mask, cache=cache, cuda_graph=False)
    graphed = generate(model, prompt, 40, attention_mask=mask, cache=cache, cuda_graph=True)
    assert torch.equal(graphed, eager)
    other = prompt.flip(1)  # the same shape: replays the graph kept from the call above
    assert torch.equal(generate(model, other, 40, attention_mask=mask, cache=cache, cuda_graph=True),
                       generate(model, other, 40, attention_mask=mask, cache=cache, cuda_graph=False))
    with torch.autocast("cuda", dtype=torch.bfloat16):  # decodes eagerly, in a bf16 cache
        autocast = [generate(model, prompt, 12, attention_mask=mask, cache=cache, cuda_graph=graph)
                    for graph in (False, True)]
    assert torch.equal(*autocast)
    sampled = [generate(model, prompt, 20, attention_mask=mask, do_sample=True, top_p=0.9, seed=3, cache=cache,
                        cuda_graph=graph) for graph in (False, True)]
    assert torch.equal(*sampled)


@pytest.mark.parametrize("cache_len", [8192, 32768])
def test_decode_kernel_long_cache_bf16(cache_len):
    torch.manual_seed(0)
    b, h, hkv, d = 4, 32, 8, 128
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, cache_len, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, cache_len, d, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.tensor([cache_len, cache_len // 3, 1, 0], dtype=torch.int32, device="cuda")
    with gptkern.backend("triton"):
        out = gptkern.ops.decode_attention(q, k, v, seqlens)
    with gptkern.backend("torch"):
        expected = gptkern.ops.decode_attention(q.double(), k.double(), v.double(), seqlens)
    assert_close(out, expected, torch.bfloat16)


def test_load_pretrained_puts_the_model_on_the_device(tmp_path):
    """load_pretrained(device="cuda", dtype=bf16): every parameter and buffer there, tied weights kept,
    the same logits as the model moved by hand."""
    from gptkern.models.io import load_pretrained, save_pretrained

    torch.manual_seed(0)
    for preset in ("gpt2-tiny", "llama-tiny"):
        model = GPT(GPTConfig.from_name(preset, n_layer=1)).eval()
        save_pretrained(model, tmp_path / preset)
        loaded, _ = load_pretrained(tmp_path / preset, device="cuda", dtype=torch.bfloat16)
        tensors = [*loaded.parameters(), *loaded.buffers()]
        assert all(t.device.type == "cuda" for t in tensors), preset
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}, preset
        assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == model.config.tie_weights
        ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
        by_hand = model.to("cuda", torch.bfloat16)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids)[0], by_hand(ids)[0], rtol=0, atol=0)
