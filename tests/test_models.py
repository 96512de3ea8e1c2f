"""GPTConfig and GPT: presets, checks, initialisation, loss, tying, meta loading, backends, compile."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.models import GPT, PRESETS, GPTConfig
from gptkern.models.io import load_pretrained, save_pretrained
from helpers import assert_close, backends_here


def tiny(name="gpt2-tiny", **overrides):
    base = dict(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=97)
    if name.startswith("llama"):
        base.update(n_kv_head=2, mlp_hidden=96)
    return GPTConfig.from_name(name, **{**base, **overrides})


def random_ids(cfg, b=2, l=13, seed=1):
    return torch.randint(0, cfg.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


def test_presets_and_parameter_counts():
    assert {"gpt2-tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"} <= set(PRESETS)
    llama = GPTConfig.from_name("llama-small")
    assert (llama.pos_embedding, llama.norm, llama.activation, llama.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert llama.n_kv_head < llama.n_head
    expected = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168}  # GPT-2's published shapes
    for name, count in expected.items():
        with torch.device("meta"):
            model = GPT(GPTConfig.from_name(name))
        assert model.num_params(non_embedding=False) == count
        assert model.num_params() == count - model.config.block_size * model.config.n_embd
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_name("gpt5")


def test_config_checks_and_round_trip():
    with pytest.raises(ValueError, match=r"n_embd \(100\) must be divisible by n_head \(12\)"):
        GPTConfig(n_embd=100, n_head=12)
    with pytest.raises(ValueError, match=r"n_head \(12\) must be divisible by n_kv_head \(5\)"):
        GPTConfig(n_kv_head=5)
    for bad in (dict(n_layer=0), dict(vocab_size=-3), dict(dropout=1.0), dict(norm="batchnorm"),
                dict(activation="tanh"), dict(pos_embedding="alibi"), dict(window=0), dict(window=2.5),
                dict(mlp_hidden=0), dict(mlp_hidden=-4), dict(mlp_hidden=2.5), dict(n_kv_head=True),
                dict(tie_weights="no"), dict(bias=1), dict(norm_eps=-1.0), dict(rope_base=0.0), dict(rope_base=1.0),
                dict(rope_base=1e-50), dict(n_embd={}), dict(n_embd="768"), dict(n_embd=None),
                dict(init_std=-1.0), dict(init_std=float("nan")), dict(dropout="0.1"), dict(dropout=None)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GPTConfig(**bad)
    with pytest.raises(ValueError, match="unknown GPTConfig fields.*n_layers"):
        GPTConfig.from_name("gpt2-tiny", n_layers=3)
    cfg = tiny("llama-tiny", window=8)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


def test_bad_inputs():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="33.*32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(IndexError, match="token id 97.*vocab_size 97"):
        model(torch.tensor([[1, 97, 2]]))
    with pytest.raises(IndexError, match="token id -1"):
        model(torch.tensor([[1, -1, 2]]))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask and doc_bounds cannot be combined"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4),
              doc_bounds=(torch.tensor([0, 4], dtype=torch.int32), 4))
    # learned positions: every index into the table is checked, naming the argument
    ids = torch.randint(0, 97, (2, 12))
    for positions, match in ((torch.arange(25, 37), "position 36 in position_ids.*block_size 32"),
                             (torch.arange(-1, 11), "position -1 in position_ids")):
        with pytest.raises(IndexError, match=match):
            model(ids, position_ids=positions)
    with pytest.raises(ValueError, match=r"position_ids of shape \[3, 12\]"):
        model(ids, position_ids=torch.zeros(3, 12, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids must be an int64 or int32"):
        model(ids, position_ids=torch.zeros(12))
    for cu, max_len, match in (([0, 5, 24], 19, "doc_bounds: a document of 19 tokens.*block_size 16"),
                               ([5, 12, 24], 12, "must start at 0, got 5"),
                               ([0, 5], 5, "ends at 5 but idx")):
        short = GPT(tiny(block_size=16))
        with pytest.raises((ValueError, RuntimeError), match=match):
            short(ids, doc_bounds=(torch.tensor(cu, dtype=torch.int32), max_len))
    assert torch.isfinite(model(ids, position_ids=torch.arange(20, 32))[0]).all()  # the table's last rows
    # rope has no table of positions: longer sequences run
    rope = GPT(tiny("llama-tiny"))
    assert rope(torch.zeros(1, 40, dtype=torch.long))[0].shape == (1, 40, 97)


def test_loss_ignores_minus_100():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = random_ids(model.config)
    targets = random_ids(model.config, seed=2)
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep].double(), targets[keep])
    assert logits.shape == (2, 13, 97)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    assert model(idx)[1] is None


def test_initialisation_and_tying():
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("gpt2-tiny", n_layer=8, n_embd=256)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    for proj in (block.attn.c_proj, block.mlp.c_proj):  # residual projections: 0.02 / sqrt(2 * n_layer)
        assert abs(proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
        assert torch.count_nonzero(proj.bias) == 0
    assert torch.equal(block.ln_1.weight, torch.ones(256))
    untied = GPT(tiny("llama-tiny"))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.transformer.h[0].attn.c_attn.bias is None
    # built on the meta device, then materialised and initialised: tied again, as built directly
    for name in ("gpt2-tiny", "llama-tiny"):
        with torch.device("meta"):
            lazy = GPT(tiny(name))
        lazy.to_empty(device="cpu")
        lazy.reset_parameters()
        assert (lazy.lm_head.weight is lazy.transformer.wte.weight) == lazy.config.tie_weights
        assert lazy.num_params() == GPT(tiny(name)).num_params()


def test_flops_per_token():
    model = GPT(tiny())
    c = model.config
    per_layer = 4 * c.n_embd ** 2 + 2 * c.n_embd * c.mlp_hidden  # qkv + proj + mlp weights
    matmul = c.n_layer * per_layer + c.vocab_size * c.n_embd
    assert model.flops_per_token() == 6 * matmul + 12 * c.n_layer * c.n_embd * c.block_size
    assert model.flops_per_token(8) < model.flops_per_token()
    # a window of w keys: the attention term scales by the visible share of the causal pairs
    windowed = GPT(tiny(window=4))
    t = 16
    seen = sum(min(i + 1, 4) for i in range(t))  # 10 over the first 4 queries, then 4 each
    attention = windowed.flops_per_token(t) - 6 * matmul
    assert attention == pytest.approx(12 * c.n_layer * c.n_embd * t * seen / (t * (t + 1) / 2))
    assert windowed.flops_per_token(3) == model.flops_per_token(3)  # a window past the sequence: no change
    # a smaller window never costs more, down from the full count at w = T
    counts = [GPT(tiny(window=w)).flops_per_token(t) for w in range(1, t + 1)]
    assert counts == sorted(counts) and len(set(counts)) == t and counts[-1] == model.flops_per_token(t)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_meta_build_and_assign_load(name):
    torch.manual_seed(0)
    model = GPT(tiny(name)).eval()
    idx = random_ids(model.config)
    expected = model(idx)[0]
    state = model.state_dict()
    if model.config.tie_weights:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # stored once, as safetensors does
    with torch.device("meta"):
        fresh = GPT(model.config)
    assert fresh.transformer.wte.weight.is_meta
    fresh.load_state_dict(state, assign=True)
    fresh.eval()
    assert not any(p.is_meta for p in fresh.parameters())
    assert (fresh.lm_head.weight is fresh.transformer.wte.weight) == model.config.tie_weights
    torch.testing.assert_close(fresh(idx)[0], expected, rtol=0, atol=0)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = GPT(tiny())
    ckpt = copy.deepcopy(plain)
    ckpt.config = GPTConfig(**{**plain.config.to_dict(), "activation_checkpointing": True})
    ckpt.transformer.config = ckpt.config
    idx = random_ids(plain.config)
    for model in (plain, ckpt):
        model(idx, idx)[1].backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.2))
    idx = random_ids(model.config)
    a, b = model(idx)[0], model(idx)[0]
    assert not torch.equal(a, b)
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_left_padding_with_attention_mask_matches_unpadded():
    torch.manual_seed(0)
    for name in ("gpt2-tiny", "llama-tiny"):
        model = GPT(tiny(name)).eval()
        short = random_ids(model.config, b=1, l=6)
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)
        mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
        expected = model(short)[0]
        got = model(padded, attention_mask=mask)[0][:, 4:]
        assert_close(got, expected, torch.float32, msg=name)


@pytest.mark.parametrize("name,extra", [("gpt2-tiny", {}), ("llama-tiny", {}), ("llama-tiny", {"window": 4})])
def test_backends_agree(name, extra, device):
    torch.manual_seed(0)
    model = GPT(tiny(name, **extra)).to(device)
    idx = random_ids(model.config).to(device)
    with gptkern.backend("torch"):
        logits, loss = model(idx, idx)
        loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for backend in backends_here(device, attention=True):
        model.zero_grad(set_to_none=True)
        with gptkern.backend(backend):
            got, got_loss = model(idx, idx)
            got_loss.backward()
        assert_close(got, logits, torch.float32, msg=backend, atol_scale=4)
        for n, p in model.named_parameters():
            assert_close(p.grad, expected[n], torch.float32, grad=True, msg=f"{backend} {n}", atol_scale=4)


def test_compile_fullgraph_forward():
    torch.manual_seed(0)
    model = GPT(tiny("llama-tiny")).eval()
    idx = random_ids(model.config)
    expected = model(idx)[0]
    compiled = torch.compile(model.forward, fullgraph=True)
    assert_close(compiled(idx)[0], expected, torch.float32)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_document_masking_equals_separate_documents(name, device):
    """doc_bounds: each document attends only to itself, positions restart: the same logits as
    running every document on its own."""
    from gptkern.data.loader import document_bounds

    torch.manual_seed(0)
    model = GPT(tiny(name)).to(device).eval()
    eos = 5
    rows = torch.tensor([[7, 8, eos, 9, 10, 11, eos, 12, 13, 14], [15, 16, 17, 18, eos, 19, 20, 21, 22, 23]],
                        device=device)
    bounds = document_bounds(rows, eos)
    assert bounds[0].tolist() == [0, 3, 7, 10, 15, 20] and bounds[1] == 5
    for backend in backends_here(device, attention=True):
        with gptkern.backend(backend):
            packed = model(rows, doc_bounds=bounds)[0].flatten(0, 1)
            cu = bounds[0].tolist()
            flat = rows.flatten()
            for start, end in zip(cu, cu[1:]):
                alone = model(flat[start:end][None])[0][0]
                assert_close(packed[start:end], alone, torch.float32, msg=f"{backend} doc {start}:{end}",
                             atol_scale=4)


def test_save_pretrained_keeps_other_files_and_saves_into_the_working_directory(tmp_path, monkeypatch):
    """As transformers' save_pretrained: older weights files go, the user's other files stay;
    saving into the working directory (".") works and leaves the process in it."""
    from gptkern.models.io import load_pretrained, save_pretrained

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1)).eval()
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.txt").write_text("data")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "sub"]
    assert (out / "sub" / "data.txt").read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left
    from gptkern.data import ByteTokenizer

    save_pretrained(model, out, ByteTokenizer())
    save_pretrained(model, out)  # no tokenizer now: the old one's files must not stay beside the model
    assert load_pretrained(out)[1] is None and not (out / "gptkern_tokenizer.json").exists()
    link = tmp_path / "latest"
    link.symlink_to(out)
    save_pretrained(model, link)  # through a symlink: it still points at the saved model
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "out"]
    monkeypatch.chdir(out)
    save_pretrained(model, ".")
    assert Path.cwd() == out and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left inside
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    torch.testing.assert_close(load_pretrained(".")[0](idx)[0], model(idx)[0])


def test_load_pretrained_names_the_broken_file(tmp_path):
    from gptkern.models.io import load_pretrained, save_pretrained

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1))
    save_pretrained(model, tmp_path / "m")
    config_file, weights = tmp_path / "m" / "config.json", tmp_path / "m" / "model.safetensors"
    good_config, good_weights = config_file.read_text(), weights.read_bytes()
    for text, match in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                        ('{"model_type": "gptkern-gpt"}', "'config'"),
                        (good_config.replace('"vocab_size": 512', '"vocab_size": 100'), "shapes.*wte"),
                        (good_config.replace('"n_layer": 1', '"n_layer": "1"'), "n_layer")):
        config_file.write_text(text)
        with pytest.raises(ValueError, match=match) as err:
            load_pretrained(tmp_path / "m")
        assert "config.json" in str(err.value)
    config_file.write_text(good_config)
    weights.write_bytes(good_weights[:100])
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        load_pretrained(tmp_path / "m")
    weights.write_bytes(good_weights)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_pretrained(tmp_path / "m", device="cuda")
    assert not load_pretrained(tmp_path / "m")[0].training


def test_models_pickle_and_numpy_config_values():
    import io

    import numpy as np

    from gptkern.models import Seq2SeqConfig, Seq2SeqTransformer

    for model in (GPT(tiny()), Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=20, n_embd=16, n_head=2))):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copy_ = torch.load(buffer, weights_only=False)
        embedding = copy_.transformer.wte if isinstance(copy_, GPT) else copy_.tgt_emb
        assert copy_.lm_head.weight is embedding.weight
    cfg = GPTConfig.from_name("gpt2-tiny", n_layer=np.int64(2), norm_eps=np.float32(1e-5), window=np.int32(8),
                              dropout=np.float32(0.1))
    assert type(cfg.n_layer) is int and type(cfg.norm_eps) is float and type(cfg.window) is int
    assert type(cfg.dropout) is float and type(Seq2SeqConfig(dropout=np.float32(0.1)).dropout) is float


def test_activation_checkpointing_recomputes_with_the_forward_backend():
    """A `with gptkern.backend(...)` choice is per thread; the backward (and its recompute) may run
    on another one (autograd's, on CUDA): the recompute still uses the forward's backend."""
    import threading
    import unittest.mock

    model = GPT(tiny(activation_checkpointing=True)).train()
    idx = torch.randint(0, 97, (2, 16))
    chosen = []
    real = gptkern._backend.choose

    def spy(*args, **kwargs):
        chosen.append(real(*args, **kwargs))
        return chosen[-1]

    def backward():
        try:
            loss.backward()
            outcome.append("ok")
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            outcome.append(err)

    with unittest.mock.patch.object(gptkern._backend, "choose", spy), gptkern.backend("torch"):
        loss = model(idx, idx)[1]
    outcome = []
    with unittest.mock.patch.object(gptkern._backend, "choose", spy):
        thread = threading.Thread(target=backward)
        thread.start()
        thread.join(60)
    assert outcome == ["ok"] and set(chosen) == {"torch"}, (outcome, set(chosen))


def test_compiled_document_masking_compiles_one_graph():
    """Batches whose longest document differs: the compiled model passes the row length as the
    varlen bound, so one graph serves them all (not one per max_seqlen, up to the recompile limit)."""
    from gptkern.data.loader import document_bounds

    torch._dynamo.reset()
    model = GPT(tiny()).eval()
    compiled = torch.compile(model, backend="aot_eager")
    counts = torch._dynamo.utils.counters["stats"]
    before = counts["unique_graphs"]
    for cut in (2, 4, 7):  # longest document 8, 6, 3 ... tokens
        rows = torch.randint(6, 97, (2, 10))
        rows[:, cut] = 5
        bounds = document_bounds(rows, 5)
        torch.testing.assert_close(compiled(rows, doc_bounds=bounds)[0], model(rows, doc_bounds=bounds)[0])
    assert counts["unique_graphs"] - before == 1


def test_export_with_a_dynamic_batch_under_auto():
    """The CPU size rule of `auto` must not put a guard on a symbolic size (export failed)."""
    from torch.export import Dim

    for module in (gptkern.nn.Softmax(-1), gptkern.nn.LayerNorm(256)):
        with torch.no_grad():
            program = torch.export.export(module, (torch.randn(8, 256),), dynamic_shapes=({0: Dim("B")},))
        x = torch.randn(5000, 256)
        torch.testing.assert_close(program.module()(x), module(x))


def test_rope_base_reaches_the_model():
    torch.manual_seed(0)
    a = GPT(tiny("llama-tiny")).eval()
    b = GPT(tiny("llama-tiny", rope_base=100.0)).eval()
    b.load_state_dict(a.state_dict())
    ids = random_ids(a.config)
    with torch.no_grad():
        assert not torch.allclose(a(ids)[0], b(ids)[0], atol=1e-4)


def test_init_std_reaches_the_embeddings():
    torch.manual_seed(0)
    model = GPT(tiny(init_std=0.1))
    for table in (model.transformer.wte, model.transformer.wpe):
        assert abs(table.weight.std().item() - 0.1) < 0.01
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.1) < 0.01


def test_window_reaches_every_block_of_the_model():
    """GPTConfig.window must limit attention in the model itself: with n_layer layers of a w-token
    window, a token reaches at most n_layer * (w - 1) positions ahead; past that, changing it
    changes nothing (full attention would)."""
    torch.manual_seed(0)
    for name in ("gpt2-tiny", "llama-tiny"):
        cfg = GPTConfig.from_name(name, n_layer=2, n_embd=64, vocab_size=61, block_size=32, window=4)
        model = GPT(cfg).eval()
        full = GPT(GPTConfig(**{**cfg.to_dict(), "window": None})).eval()
        full.load_state_dict(model.state_dict())
        ids = torch.randint(1, 61, (1, 16), generator=torch.Generator().manual_seed(1))
        changed = ids.clone()
        changed[0, 0] = 0
        reach = cfg.n_layer * (cfg.window - 1)  # positions 0..6 may see token 0
        with torch.no_grad():
            a, b = model(ids)[0], model(changed)[0]
            torch.testing.assert_close(a[:, reach + 1:], b[:, reach + 1:], rtol=0, atol=0, msg=name)
            assert not torch.allclose(a[:, :reach + 1], b[:, :reach + 1])
            assert not torch.allclose(full(ids)[0][:, reach + 1:], full(changed)[0][:, reach + 1:])
            # within the window the two models agree
            torch.testing.assert_close(model(ids[:, :4])[0], full(ids[:, :4])[0])


def test_load_pretrained_casts_to_the_given_dtype(tmp_path):
    torch.manual_seed(0)
    for name in ("gpt2-tiny", "llama-tiny"):
        model = GPT(GPTConfig.from_name(name, n_layer=1, n_embd=32, vocab_size=61)).eval()
        save_pretrained(model, tmp_path / name)
        loaded, _ = load_pretrained(tmp_path / name, dtype=torch.bfloat16)
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}, name
        assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == model.config.tie_weights
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value.to(torch.bfloat16), rtol=0, atol=0, msg=key)
        assert {p.dtype for p in load_pretrained(tmp_path / name)[0].parameters()} == {torch.float32}


def test_learned_position_checks_are_exact_at_block_size():
    """Position block_size (one past the table) and a document of block_size + 1 tokens are refused
    by gptkern's own checks, naming the argument (on CUDA the table lookup would be a device assert)."""
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, vocab_size=97, block_size=16)).eval()
    ids = torch.randint(0, 97, (2, 12))
    with pytest.raises(IndexError, match="position 16 in position_ids.*block_size 16"):
        model(ids, position_ids=torch.arange(5, 17))
    model(ids, position_ids=torch.arange(4, 16))  # the table's last row: fine
    # cu_seqlens over the 24 flattened tokens: a document of 17 tokens, then one of 16
    for cu, ok in (([0, 17, 24], False), ([0, 16, 24], True)):
        bounds = (torch.tensor(cu, dtype=torch.int32), max(b - a for a, b in zip(cu, cu[1:])))
        if ok:
            model(ids, doc_bounds=bounds)
        else:
            with pytest.raises(ValueError, match="doc_bounds: a document of 17 tokens.*block_size 16"):
                model(ids, doc_bounds=bounds)


def test_rope_config_refuses_an_odd_head_dim():
    with pytest.raises(ValueError, match="rope needs an even head_dim, got 5"):
        GPTConfig(pos_embedding="rope", n_embd=20, n_head=4)
    GPTConfig(pos_embedding="learned", n_embd=20, n_head=4)  # learned positions: any head_dim


def test_idx_of_the_wrong_rank_is_named():
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, vocab_size=61))
    for bad in (torch.tensor([1, 2, 3]), torch.zeros(1, 2, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"idx must be \(batch, sequence\), got shape"):
            model(bad)


def test_an_untied_model_directory_without_its_head_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = GPT(GPTConfig.from_name("llama-tiny", n_layer=1, n_embd=32, vocab_size=61))  # untied head
    save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["lm_head.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"model.safetensors does not match its config: missing keys "
                                         r"\['lm_head.weight'\]"):
        load_pretrained(tmp_path)


def test_model_weights_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from helpers import fsync_spy

    synced = fsync_spy(monkeypatch)
    save_pretrained(GPT(tiny(n_layer=1)), tmp_path / "m")
    assert any(Path(p).name.startswith("model.safetensors.tmp") for p in synced), synced


def test_load_pretrained_names_missing_weights_extra_keys_and_bad_config_values(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    model = GPT(tiny(n_layer=1))
    save_pretrained(model, tmp_path / "m")
    config_file, weights = tmp_path / "m" / "config.json", tmp_path / "m" / "model.safetensors"
    good_config, good_weights = config_file.read_text(), weights.read_bytes()
    # a hand-written config without mlp_hidden whose n_embd is not a number (once a TypeError
    # inside GPTConfig): a ValueError naming the file
    config = json.loads(good_config)
    del config["config"]["mlp_hidden"]
    config_file.write_text(json.dumps({**config, "config": {**config["config"], "n_embd": {}}}))
    with pytest.raises(ValueError, match=r"config\.json: "):
        load_pretrained(tmp_path / "m")
    config_file.write_text(good_config)
    state = load_file(str(weights))
    save_file({**state, "transformer.extra": torch.zeros(2)}, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its config: missing keys \[\], "
                                         r"unexpected keys \['transformer\.extra'\]"):
        load_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found: the model directory has no weights"):
        load_pretrained(tmp_path / "m")
    weights.write_bytes(good_weights)
    import safetensors.torch

    def io_error(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safetensors.torch, "load_file", io_error)  # a read error: named, as a corrupt file
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt: not a readable safetensors file .*"
                                         r"Input/output error"):
        load_pretrained(tmp_path / "m")
