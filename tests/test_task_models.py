"""GPTForSequenceClassification and Seq2SeqTransformer, plus a short training run on gptkern's kernels."""
import pytest
import torch

import gptkern
from gptkern.models import GPT, GPTConfig, GPTForSequenceClassification, Seq2SeqConfig, Seq2SeqTransformer
from helpers import assert_close, backends_here


def tiny_config(**overrides):
    return GPTConfig.from_name("gpt2-tiny", **{**dict(n_layer=2, n_embd=64, block_size=32, vocab_size=50),
                                                **overrides})


def ids(shape, vocab, seed=0, low=0):
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_classifier_pools_last_real_token():
    torch.manual_seed(0)
    model = GPTForSequenceClassification(tiny_config(), num_labels=3, pad_token_id=0).eval()
    a, b = ids((1, 7), 50, seed=1, low=1), ids((1, 4), 50, seed=2, low=1)
    expected = torch.cat([model(a)[0], model(b)[0]])
    right = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])  # pad id 0 on the right
    assert_close(model(right)[0], expected, torch.float32)
    left = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = (left != 0).long()
    assert_close(model(left, attention_mask=mask)[0], expected, torch.float32)
    assert model(right)[0].shape == (2, 3)


def test_classifier_losses_and_checks():
    torch.manual_seed(0)
    x = ids((3, 6), 50, low=1)
    model = GPTForSequenceClassification(tiny_config(), num_labels=4)
    logits, loss = model(x, torch.tensor([0, 3, 1]))
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 1])))
    regression = GPTForSequenceClassification(tiny_config(), num_labels=1)
    logits, loss = regression(x, torch.tensor([0.5, -1.0, 2.0]))
    assert torch.isclose(loss, ((logits.squeeze(-1) - torch.tensor([0.5, -1.0, 2.0])) ** 2).mean())
    _, column_loss = regression(x, torch.tensor([[0.5], [-1.0], [2.0]]))  # (B, 1) labels, as transformers
    torch.testing.assert_close(column_loss, loss)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="num_labels"):
            GPTForSequenceClassification(tiny_config(), num_labels=bad)


def test_classifier_loads_pretrained_gpt():
    torch.manual_seed(0)
    gpt = GPT(tiny_config())
    model = GPTForSequenceClassification.from_gpt(gpt, num_labels=2)
    for key, value in gpt.transformer.state_dict().items():
        assert torch.equal(model.transformer.state_dict()[key], value), key
    x = ids((2, 5), 50)
    torch.testing.assert_close(model.transformer(x), gpt.transformer(x))
    half = GPTForSequenceClassification.from_gpt(gpt.to(torch.bfloat16), num_labels=2)  # the GPT's dtype
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    bad = {k: v for k, v in gpt.state_dict().items() if "h.1.ln_2" not in k}
    with pytest.raises(ValueError, match=r"missing keys \['h.1.ln_2.bias', 'h.1.ln_2.weight'\]"):
        model.load_gpt_state_dict(bad)


def small_seq2seq(**overrides):
    torch.manual_seed(0)
    return Seq2SeqTransformer(Seq2SeqConfig(**{**dict(src_vocab_size=40, n_embd=32, n_head=4, n_encoder_layer=2,
                                                      n_decoder_layer=2, max_len=24), **overrides}))


def test_seq2seq_attention_pattern():
    model = small_seq2seq(tgt_vocab_size=30).eval()
    src, tgt = ids((2, 9), 40, seed=1), ids((2, 6), 30, seed=2)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    logits = model(src, tgt, pad)
    assert logits.shape == (2, 6, 30)
    # padded source tokens are invisible
    src2 = src.clone()
    src2[1, 6:] = (src2[1, 6:] + 1) % 40
    assert_close(model(src2, tgt, pad), logits, torch.float32)
    # the decoder is causal: a later target token changes nothing before it
    tgt2 = tgt.clone()
    tgt2[:, 4] = (tgt2[:, 4] + 1) % 30
    out2 = model(src, tgt2, pad)
    assert_close(out2[:, :4], logits[:, :4], torch.float32)
    assert not torch.allclose(out2[:, 4:], logits[:, 4:])
    # the encoder is bidirectional: the last source token changes the first memory position
    src3 = src.clone()
    src3[0, 8] = (src3[0, 8] + 1) % 40
    assert not torch.allclose(model.encode(src3)[0, 0], model.encode(src)[0, 0])


def test_seq2seq_vocabularies_and_checks():
    shared = small_seq2seq()
    assert shared.tgt_emb is shared.src_emb and shared.lm_head.weight is shared.src_emb.weight
    separate = small_seq2seq(tgt_vocab_size=17)
    assert separate.tgt_emb is not separate.src_emb and separate.lm_head.out_features == 17
    with pytest.raises(IndexError, match="token id 17 in tgt_in.*vocab_size 17"):
        separate(ids((1, 4), 40), torch.tensor([[1, 17]]))
    with pytest.raises(ValueError, match="src length 30 is longer than max_len 24"):
        separate(ids((1, 30), 40), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="src_pad_mask"):
        separate(ids((1, 4), 40), torch.tensor([[1, 2]]), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        Seq2SeqConfig(n_embd=30, n_head=4)
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match="tgt_vocab_size must be a positive int or None"):
            Seq2SeqConfig(tgt_vocab_size=bad)
    for bad in (dict(mlp_hidden=0), dict(mlp_hidden=-5), dict(mlp_hidden=2.5), dict(norm_eps=-1.0),
                dict(init_std=float("nan")), dict(bias=1), dict(dropout="0.1"), dict(dropout=None)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Seq2SeqConfig(**bad)
    for src_batch, tgt_batch in ((1, 3), (3, 1)):  # no broadcasting of one source over targets
        with pytest.raises(ValueError, match="batch sizes"):
            separate(ids((src_batch, 4), 40), ids((tgt_batch, 3), 17))


def test_seq2seq_stays_tied_after_an_assign_load():
    model = small_seq2seq()
    with torch.device("meta"):
        fresh = small_seq2seq()
    fresh.load_state_dict(model.state_dict(), assign=True)
    assert fresh.lm_head.weight is fresh.tgt_emb.weight
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("which", ["classifier", "seq2seq"])
def test_task_models_agree_across_backends(which, device):
    torch.manual_seed(0)
    if which == "classifier":
        model = GPTForSequenceClassification(tiny_config(n_kv_head=2), num_labels=3).to(device)
        x = ids((2, 9), 50).to(device)
        mask = torch.ones_like(x)
        mask[0, :3] = 0

        def run():
            return model(x, torch.tensor([1, 2], device=device), attention_mask=mask)
    else:
        model = small_seq2seq(tgt_vocab_size=30).to(device)
        src, tgt = ids((2, 9), 40).to(device), ids((2, 6), 30).to(device)
        pad = torch.zeros(2, 9, dtype=torch.bool, device=device)
        pad[0, 7:] = True

        def run():
            logits = model(src, tgt, pad)
            return logits, logits.float().logsumexp(-1).mean()
    with gptkern.backend("torch"):
        expected, loss = run()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for backend in backends_here(device, attention=True):
        model.zero_grad(set_to_none=True)
        with gptkern.backend(backend):
            out, loss = run()
            loss.backward()
        assert_close(out, expected, torch.float32, msg=backend, atol_scale=4)
        for n, p in model.named_parameters():
            assert_close(p.grad, grads[n], torch.float32, grad=True, msg=f"{backend} {n}", atol_scale=4)


def _train(backend: str, steps: int, device) -> list[float]:
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("gpt2-tiny", n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=16)
    model = GPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(4 * 17, device=device).view(4, 17) % 16  # a counting task: learnable
    losses = []
    with gptkern.backend(backend):
        for _ in range(steps):
            _, loss = model(data[:, :-1], data[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def test_training_tracks_the_torch_backend(device):
    """A tiny GPT trained 50 steps on gptkern's kernels follows the torch backend's loss curve
    (the Triton interpreter, at 3-4 s a step, the first 12)."""
    expected = _train("torch", 50, device)
    assert expected[-1] < 0.25 * expected[0]
    for backend in backends_here(device, attention=True):
        if backend in ("torch", "auto"):
            continue
        steps = 12 if backend == "triton" and device.type == "cpu" else 50
        losses = _train(backend, steps, device)
        worst = max(abs(a - b) / b for a, b in zip(losses, expected[:steps]))
        assert worst < 0.02, (backend, worst, losses[-5:], expected[-5:])


def test_classifier_pools_the_last_real_token_of_a_right_padded_mask():
    """attention_mask alone (no pad_token_id; the padding id is a real token id) with right padding:
    the pooled state is the last token the mask keeps, not the last position."""
    torch.manual_seed(0)
    model = GPTForSequenceClassification(tiny_config(), num_labels=3).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, 50, (1, 7), generator=g), torch.randint(1, 50, (1, 4), generator=g)
    expected = torch.cat([model(a)[0], model(b)[0]])
    right = torch.cat([a, torch.cat([b, torch.full((1, 3), 7)], 1)])  # padded with id 7
    mask = torch.ones_like(right)
    mask[1, 4:] = 0
    torch.testing.assert_close(model(right, attention_mask=mask)[0], expected, rtol=1e-5, atol=1e-5)
    # the mask wins over pad_token_id
    model.pad_token_id = 7
    torch.testing.assert_close(model(right, attention_mask=mask)[0], expected, rtol=1e-5, atol=1e-5)


def test_classifier_refuses_a_gpt_checkpoint_with_extra_body_keys():
    """A deeper GPT's checkpoint must not load silently into a shallower classifier (its extra
    layers dropped): the unexpected keys are listed."""
    deeper = GPT(tiny_config(n_layer=3))
    model = GPTForSequenceClassification(tiny_config(), num_labels=2)
    with pytest.raises(ValueError, match=r"unexpected keys \['h.2.attn.c_attn.bias'"):
        model.load_gpt_state_dict(deeper.state_dict())


def test_seq2seq_lengths_are_checked_exactly_at_max_len():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=40, n_embd=32, n_head=4, n_encoder_layer=1,
                                             n_decoder_layer=1, max_len=8)).eval()
    ok, long = torch.randint(0, 40, (1, 8)), torch.randint(0, 40, (1, 9))
    assert model(ok, ok).shape == (1, 8, 40)  # max_len tokens: fine
    with pytest.raises(ValueError, match="src length 9 is longer than max_len 8"):
        model(long, ok)
    with pytest.raises(ValueError, match="tgt_in length 9 is longer than max_len 8"):
        model(ok, long)


def test_seq2seq_norms_follow_the_config():
    """norm_eps and bias reach every norm of the encoder and decoder (ln_1/2/3, ln_enc, ln_dec)."""
    for bias in (True, False):
        model = Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=40, n_embd=32, n_head=4, n_encoder_layer=1,
                                                 n_decoder_layer=2, norm_eps=1e-2, bias=bias))
        norms = [(n, m) for n, m in model.named_modules() if n.split(".")[-1].startswith("ln_")]
        assert len(norms) == 1 * 2 + 2 * 3 + 2
        for name, norm in norms:
            assert norm.eps == 1e-2, name
            assert (getattr(norm, "bias", None) is not None) == bias, name
