"""Hugging Face interop: GPT-2 import/export parity and the "gptkern" attention implementation."""
import json
import os
import subprocess
import sys

import pytest
import torch

import gptkern
from gptkern.models import GPT, GPTConfig
from helpers import assert_close, backends_here

transformers = pytest.importorskip("transformers")
import gptkern.hf  # noqa: E402  (registers "gptkern" with transformers)
from gptkern.models.hf import config_to_hf  # noqa: E402

SMALL = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def hf_gpt2(**overrides):
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{**dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                               bos_token_id=0, eos_token_id=0), **overrides})
    return transformers.GPT2LMHeadModel(config).eval()


def ids(b=2, l=17, vocab=99):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("overrides", [{}, dict(activation_function="gelu", n_inner=48, layer_norm_epsilon=1e-6),
                                       dict(tie_word_embeddings=False)])
def test_logits_match_transformers(overrides):
    hf = hf_gpt2(**overrides)
    model = GPT.from_hf(hf).eval()
    idx = ids()
    torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)
    assert model.config.tie_weights == hf.config.tie_word_embeddings
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_weights


@pytest.mark.parametrize("safe", [True, False])
def test_from_directory(tmp_path, safe):
    hf = hf_gpt2()
    if safe:
        hf.save_pretrained(tmp_path)
    else:  # the legacy pickle format (transformers 5 writes safetensors only)
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    model = GPT.from_hf(tmp_path).eval()
    idx = ids()
    torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)


def test_headless_gpt2model_checkpoint(tmp_path):
    # GPT-2's original checkpoints are GPT2Model's: no "transformer." prefix and no lm_head
    hf = hf_gpt2()
    hf.transformer.save_pretrained(tmp_path)
    model = GPT.from_hf(tmp_path).eval()
    idx = ids()
    torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=2, n_embd=64, vocab_size=101, block_size=40)).eval()
    hf = model.to_hf(tmp_path / "export")
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    for source in (hf, tmp_path / "export"):
        back = GPT.from_hf(source)
        assert back.config == model.config
        state, expected = back.state_dict(), model.state_dict()
        assert state.keys() == expected.keys()
        for key in expected:
            assert torch.equal(state[key], expected[key]), key
    idx = ids(vocab=101)
    torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)
    assert not any(p.name.startswith(".gptkern-save") for p in tmp_path.iterdir())  # staging removed
    assert hf.config.bos_token_id is None and hf.config.eos_token_id is None  # 50256 is not in 101 tokens


def test_export_keeps_gpt2_special_ids_in_a_gpt2_vocabulary():
    config = GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, vocab_size=50257)
    hf_config = config_to_hf(config)
    assert hf_config.bos_token_id == hf_config.eos_token_id == 50256


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_gpt2().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.1.mlp.c_fc.bias'\].*unexpected keys "
                                         r"\['transformer.h.0.attn.rotary.weight'\]"):
        GPT.from_hf(tmp_path)


def test_a_head_that_differs_from_the_token_table_stays_untied(tmp_path):
    """tie_word_embeddings=True (the default) with an lm_head.weight of its own: transformers keeps
    that head (and warns); so does the import, from a directory or from the module."""
    from safetensors.torch import load_file, save_file

    hf_gpt2().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()  # (it logs a warning)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    x = ids()
    for source in (tmp_path, hf):
        with pytest.warns(UserWarning, match="keeping the head untied"):
            model = GPT.from_hf(source)
        assert not model.config.tie_weights
        assert_close(model(x)[0], hf(x).logits, torch.float32, atol_scale=10)
    assert GPT.from_hf(hf_gpt2()).config.tie_weights  # equal: tied, without a word


def test_weights_files_are_found_as_transformers_finds_them_and_bad_ones_named(tmp_path):
    """model.safetensors first (an unsharded save over a sharded one leaves the old index);
    missing shards, corrupt files and configs are ValueErrors / FileNotFoundErrors naming the file."""
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    x = ids()
    assert_close(GPT.from_hf(tmp_path)(x)[0], hf(x).logits, torch.float32, atol_scale=10)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"shards \\['{shard.name}'\\] named by model.safetensors.index.json"):
        GPT.from_hf(tmp_path)
    hf.save_pretrained(tmp_path)  # unsharded: transformers removes the shards, keeps the index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_close(GPT.from_hf(tmp_path)(x)[0], hf(x).logits, torch.float32, atol_scale=10)
    config = (tmp_path / "config.json").read_text()
    for text, match in (("[]", "config.json is corrupt: a JSON object was expected"),
                        ("{", "config.json is corrupt: not valid JSON"),
                        (config.replace('"vocab_size": 99', '"vocab_size": 100'),
                         r"shapes transformer.wte.weight \[99, 32\] \(config: \[100, 32\]\)")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            GPT.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(config)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        GPT.from_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin is corrupt"):
        GPT.from_hf(tmp_path)


def test_unsupported_models_and_configs(tmp_path):
    with pytest.raises(ValueError, match="pos_embedding='rope'"):
        GPT(GPTConfig.from_name("llama-tiny")).to_hf()
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT.from_hf(hf_gpt2(scale_attn_by_inverse_layer_idx=True))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GPT.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_hf(tmp_path / "missing")
    with pytest.raises(TypeError, match="GPT2LMHeadModel or a directory"):
        GPT.from_hf(42)
    # one dropout rate: different ones are said, not silently merged
    with pytest.warns(UserWarning, match="dropout rates .* differ"):
        assert GPT.from_hf(hf_gpt2(resid_pdrop=0.0, attn_pdrop=0.3, embd_pdrop=0.3)).config.dropout == 0.0


FAMILIES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=5)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attention_interface_matches_eager(family, device):
    torch.manual_seed(0)
    model = FAMILIES[family]().to(device).eval()
    idx = ids(l=12).to(device)
    mask = torch.ones_like(idx)
    mask[1, :4] = 0  # left padding
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = [model(idx).logits, model(idx, attention_mask=mask).logits]
    model.set_attn_implementation("gptkern")
    for backend in backends_here(device, attention=True):
        with torch.no_grad(), gptkern.backend(backend):
            got = [model(idx).logits, model(idx, attention_mask=mask).logits]
        assert_close(got[0], expected[0], torch.float32, msg=f"{backend} {family}", atol_scale=5)
        real = mask.bool()  # padded positions' outputs are unspecified
        assert_close(got[1][real], expected[1][real], torch.float32, msg=f"{backend} {family} padded", atol_scale=5)


def test_attention_interface_runs_gptkern(monkeypatch):
    calls = []
    sdpa = gptkern.ops.scaled_dot_product_attention
    monkeypatch.setattr(gptkern.hf.ops, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k["is_causal"]) or sdpa(*a, **k))
    model = FAMILIES["llama"]().eval()
    model.set_attn_implementation("gptkern")
    with torch.no_grad():
        model(ids(l=6))
    assert calls == [True, True]  # one call per layer, the causal hint instead of a mask


@pytest.mark.parametrize("name", ["sinks", "s_aux", "softcap", "position_bias"])
def test_what_the_interface_cannot_serve_is_refused(name):
    """Attention sinks reach the interface as ``sinks`` or, from GPT-OSS and others, ``s_aux``:
    both are refused rather than dropped (the output would silently differ from eager's)."""
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match=name):
        gptkern.hf.attention_forward(torch.nn.Module(), q, q, q, None, **{name: torch.zeros(2)})


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_float_mask_keeps_its_dtype_in_a_16_bit_model(backend):
    """As transformers' sdpa path: an fp32 additive mask is not cast to an fp16 query's dtype,
    where float32's min would become -inf (a fully masked row: 0, not the average) and a large
    bias would overflow (NaN)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if backend not in gptkern.available_backends():
        pytest.skip(f"no {backend} backend")
    module = torch.nn.Module()
    module.is_causal = False
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, dtype=torch.float16) for _ in range(3))
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 1, 0] = 1e5  # beyond float16's range
    mask[0, 0, 2] = torch.finfo(torch.float32).min  # a fully masked row
    expected = sdpa_attention_forward(module, q, k, v, mask)[0]
    with gptkern.backend(backend):
        got = gptkern.hf.attention_forward(module, q, k, v, mask)[0]
    assert torch.isfinite(got).all()
    assert_close(got, expected, torch.float16)


def test_gptkern_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import gptkern, gptkern.models, gptkern.hf\n"
            "try:\n    gptkern.hf.register()\nexcept ImportError:\n    print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_from_hf_copies_and_to_hf_replaces_the_directory(tmp_path):
    hf = hf_gpt2()
    model = GPT.from_hf(hf)
    assert not model.training  # as transformers loads models (GPT-2's dropout is 0.1)
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(1.0)
    assert not torch.equal(model.transformer.ln_f.weight, hf.transformer.ln_f.weight)  # no shared storage
    (tmp_path / "export" / "logs").mkdir(parents=True)
    (tmp_path / "export" / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # a stale index
    (tmp_path / "export" / "notes.txt").write_text("mine")  # the user's files stay, as with transformers
    (tmp_path / "export" / "logs" / "run.txt").write_text("log")
    model.to_hf(tmp_path / "export")
    assert not (tmp_path / "export" / "model.safetensors.index.json").exists()
    assert (tmp_path / "export" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "export" / "logs" / "run.txt").read_text() == "log"
    idx = ids()
    torch.testing.assert_close(GPT.from_hf(tmp_path / "export").eval()(idx)[0], model.eval()(idx)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging left


def test_saved_directories_get_the_usual_mode(tmp_path):
    """A new export directory gets the umask's mode (not tempfile's 0700), as transformers'
    save_pretrained gives; a replaced one keeps its mode."""
    import stat

    model = GPT.from_hf(hf_gpt2())
    old = os.umask(0o022)
    try:
        model.to_hf(tmp_path / "new")
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755
        (tmp_path / "kept").mkdir(mode=0o750)
        model.to_hf(tmp_path / "kept")
        assert stat.S_IMODE((tmp_path / "kept").stat().st_mode) == 0o750
    finally:
        os.umask(old)


def test_queries_kept_from_the_end_see_the_keys_before_them():
    """A model may drop the first queries after its mask was made (Gemma-4 keeps the last
    ``logits_to_keep``): with no mask and fewer queries than keys, query i sees keys up to S - L + i."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    got = gptkern.hf.attention_forward(torch.nn.Module(), q, k, v, None)[0]
    visible = torch.ones(3, 7, dtype=torch.bool).tril(4)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(got, want.transpose(1, 2))


def test_the_mask_is_written_out_for_a_prefill_into_a_static_cache():
    """sdpa's mask function gives None (its top-left causal hint) to a prefill into an empty static
    cache; gptkern's gives None only where queries and keys are as many, or one query."""
    from transformers.masking_utils import sdpa_mask

    kwargs = dict(batch_size=1, q_length=5, kv_length=12, attention_mask=torch.ones(1, 12, dtype=torch.bool))
    kwargs["attention_mask"][:, 5:] = False  # the cache slots past the prompt
    if sdpa_mask(**kwargs) is not None:
        pytest.skip("this transformers' sdpa mask does not skip here")
    mask = gptkern.hf.causal_mask(**kwargs)
    assert mask is not None and mask.shape[-2:] == (5, 12)
    assert torch.equal(mask[0, 0, :, :5], torch.ones(5, 5, dtype=torch.bool).tril()) and not mask[..., 5:].any()
    assert gptkern.hf.causal_mask(batch_size=1, q_length=6, kv_length=6) is None


@pytest.mark.skipif(not hasattr(transformers, "Gemma4TextConfig"), reason="transformers without Gemma-4")
def test_gemma4_keeping_its_last_logits_matches_eager():
    config = transformers.Gemma4TextConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2, vocab_size_per_layer_input=101, hidden_size_per_layer_input=8, pad_token_id=None,
        eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # (its zero-initialized scales would hide the attention)
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() >= 2 else 1 + 0.3 * torch.randn_like(p))
    idx = ids(l=10, vocab=101)
    out = {}
    for name in ("eager", "gptkern"):
        model.set_attn_implementation(name)
        with torch.no_grad():
            out[name] = model(idx, logits_to_keep=3).logits
    assert_close(out["gptkern"], out["eager"], torch.float32, atol_scale=5)


def test_greedy_generation_with_a_static_cache_matches_eager():
    torch.manual_seed(0)
    model = FAMILIES["llama"]().eval()
    idx = ids(b=1, l=6)
    tokens = {}
    for name in ("eager", "gptkern"):
        model.set_attn_implementation(name)
        tokens[name] = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=8, do_sample=False,
                                      cache_implementation="static", pad_token_id=0)
    assert torch.equal(tokens["gptkern"], tokens["eager"])


def test_exact_gelu_imports_as_exact_gelu():
    """activation_function="gelu" is the exact (erf) GELU, not the tanh one: weights scaled up
    so that the two differ in the logits (at GPT-2's init they agree to ~1e-6)."""
    hf = hf_gpt2(activation_function="gelu")
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(3)
    model = GPT.from_hf(hf)
    assert model.config.activation == "gelu"
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)  # tanh GELU: ~1e-3 off


def test_unscaled_attention_is_refused():
    with pytest.raises(ValueError, match="scale_attn_weights"):
        GPT.from_hf(hf_gpt2(scale_attn_weights=False))


@pytest.mark.parametrize("overrides", [dict(mlp_hidden=48), dict(norm_eps=1e-2), dict(activation="gelu")])
def test_export_keeps_mlp_width_norm_eps_and_activation(overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=2, n_embd=32, n_head=4, vocab_size=99, block_size=32,
                                    **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            p.add_(torch.randn_like(p) * 0.1)
    hf = model.to_hf()
    assert hf.config.n_inner == model.config.mlp_hidden
    assert hf.config.layer_norm_epsilon == model.config.norm_eps
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)


def test_export_ties_the_head_to_the_token_table():
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, vocab_size=99, block_size=32))
    hf = model.to_hf()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    untied = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, vocab_size=99, block_size=32,
                                     tie_weights=False)).to_hf()
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def test_old_checkpoint_with_attention_mask_buffers(tmp_path):
    """Older GPT-2 checkpoints (the original gpt2 pytorch_model.bin) carry the causal-mask buffers
    h.N.attn.bias and h.N.attn.masked_bias: not weights, dropped on import."""
    hf = hf_gpt2()
    hf.config.save_pretrained(tmp_path)
    state = dict(hf.state_dict())
    for i in range(hf.config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(64, 64).tril().view(1, 1, 64, 64)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = GPT.from_hf(tmp_path)
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)


def test_export_of_a_vocabulary_one_short_of_gpt2_eos_has_no_special_ids():
    hf_config = config_to_hf(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, vocab_size=50256))
    assert hf_config.bos_token_id is None and hf_config.eos_token_id is None  # 50256 would be out of range


def test_sharded_safetensors_directory(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    model = GPT.from_hf(tmp_path)
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)


def test_gelu_pytorch_tanh_imports_as_the_tanh_approximation():
    # large weights: exact gelu and its tanh approximation differ visibly
    hf = hf_gpt2(activation_function="gelu_pytorch_tanh", initializer_range=0.3)
    model = GPT.from_hf(hf)
    assert model.config.activation == "gelu_tanh"
    torch.testing.assert_close(model(ids())[0], hf(ids()).logits, rtol=0, atol=1e-4)


def test_a_config_without_tie_word_embeddings_imports_tied(tmp_path):
    """The hub's original GPT-2 config.json has no tie_word_embeddings key and its weights no
    lm_head: transformers' default (tied) applies."""
    from safetensors.torch import load_file, save_file

    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("lm_head.weight", None)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = GPT.from_hf(tmp_path)
    assert model.config.tie_weights and model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model(ids())[0], hf(ids()).logits, rtol=0, atol=1e-4)


def tiny(**overrides):
    return GPTConfig.from_name("gpt2-tiny", **{**dict(n_layer=1, n_embd=32, vocab_size=61, block_size=32), **overrides})


def test_export_refuses_a_sliding_window_and_bias_free_model():
    """GPT-2 has full attention and biases: such a GPT exported would silently compute other logits."""
    with pytest.raises(ValueError, match="window=4"):
        GPT(tiny(window=4)).to_hf()
    with pytest.raises(ValueError, match="bias=False"):
        GPT(tiny(bias=False)).to_hf()


def test_export_is_in_eval_mode_like_from_pretrained():
    hf = GPT(tiny(dropout=0.2)).to_hf()
    assert not hf.training
    x = torch.randint(0, 61, (1, 8))
    torch.testing.assert_close(hf(x).logits, hf(x).logits, rtol=0, atol=0)


def test_scaling_and_dropout_reach_the_kernel():
    """transformers passes the model's scaling (not always 1/sqrt(D)) and its attention dropout rate."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    scale = float(torch.rand(()) + 0.1)
    got = gptkern.hf.attention_forward(torch.nn.Module(), q, k, v, None, scaling=scale)[0]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    assert_close(got, want.transpose(1, 2), torch.float64)
    dropped = gptkern.hf.attention_forward(torch.nn.Module(), q, k, v, None, dropout=0.9, scaling=scale)[0]
    row0, v0 = dropped[:, 0], v[:, :, 0]  # (B, H, D): query 0 sees key 0 alone, weight 0 or 1 / (1 - 0.9)
    kept = row0.abs().sum(-1) != 0
    torch.testing.assert_close(row0, torch.where(kept[..., None], v0 / (1 - 0.9), torch.zeros_like(v0)))
    assert kept.any() and not kept.all()


def test_one_query_gets_no_mask():
    """A decode step (one query) keeps the causal hint: None, as sdpa's mask function gives."""
    from transformers.masking_utils import sdpa_mask

    kwargs = dict(batch_size=1, q_length=1, kv_length=7, attention_mask=torch.ones(1, 7, dtype=torch.bool))
    if sdpa_mask(**kwargs) is not None:
        pytest.skip("this transformers' sdpa mask does not skip here")
    assert gptkern.hf.causal_mask(**kwargs) is None
