"""generate(): parity with transformers' greedy search, cache equivalence, sampling, stopping, streaming."""
import numpy as np
import pytest
import torch

import gptkern
from gptkern.generation import PagedKVCache, StaticKVCache, generate
from gptkern.generation.sampling import apply_repetition_penalty, filter_top_k_top_p
from gptkern.models import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def hf_and_gpt(initializer_range=0.3):
    """A random tiny GPT-2 with large weights (varied greedy output) and gptkern's copy of it."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, initializer_range=initializer_range)
    hf = transformers.GPT2LMHeadModel(config).eval()
    return hf, GPT.from_hf(hf).eval()


def left_padded(lengths, vocab=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers_single_prompt(use_cache):
    hf, model = hf_and_gpt()
    prompt, _ = left_padded([7])
    expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = generate(model, prompt, 16, use_cache=use_cache)
    assert got.dtype == torch.long and got.shape == (1, 23)
    assert len(set(got[0, 7:].tolist())) > 3  # varied output: the comparison means something
    assert torch.equal(got, expected)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers_left_padded_batch(use_cache):
    hf, model = hf_and_gpt()
    prompt, mask = left_padded([9, 4, 6, 1])
    expected = hf.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    got = generate(model, prompt, 12, attention_mask=mask, use_cache=use_cache)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("cache", ["static", "paged"])
def test_up_to_block_size_plus_one_tokens_as_transformers(use_cache, cache):
    """The last new token is never fed back: prompt + new may reach block_size + 1 (64 + 1 here, and
    a left-padded batch ending there), as transformers generates; one more is refused."""
    hf, model = hf_and_gpt()
    for lengths, new in (([64], 1), ([60, 57], 5)):
        prompt, mask = left_padded(lengths)
        expected = hf.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
        got = generate(model, prompt, new, attention_mask=mask, use_cache=use_cache, cache=cache)
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="prompt length 60 plus max_new_tokens 6 .*block_size 64"):
        generate(model, left_padded([60])[0], 6, use_cache=use_cache, cache=cache)


def test_cached_equals_uncached_on_every_attention_backend(device):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("llama-tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=61,
                                    mlp_hidden=96, init_std=0.2)).to(device).eval()
    prompt, mask = left_padded([5, 3], vocab=61)
    prompt, mask = prompt.to(device), mask.to(device)
    expected = generate(model, prompt, 10, attention_mask=mask, use_cache=False)
    for backend in ("torch", "auto"):
        with gptkern.backend(backend):
            assert torch.equal(generate(model, prompt, 10, attention_mask=mask), expected), backend


def test_static_cache_memory_is_exact():
    cache = StaticKVCache(n_layer=3, batch_size=2, n_kv_head=4, max_seq_len=50, head_dim=16, dtype=torch.bfloat16)
    assert cache.nbytes == 2 * 3 * 2 * 4 * 50 * 16 * 2
    with pytest.raises(ValueError, match="n_layer=0"):
        StaticKVCache(0, 1, 1, 1, 1)
    with pytest.raises(TypeError, match="head_dim"):
        StaticKVCache(1, 1, 1, 1, 2.5)
    assert StaticKVCache(1, 1, 1, torch.tensor(8), 4).max_seq_len == 8  # a 0-d integer tensor is an int

    for bad, match in ((dict(n_kv_head=0), "n_kv_head=0"), (dict(batch_size=-1), "batch_size=-1"),
                       (dict(head_dim=None), "head_dim"), (dict(num_blocks=1), "num_blocks"),
                       (dict(num_blocks="9"), "num_blocks")):
        args = dict(n_layer=1, batch_size=1, n_kv_head=1, head_dim=4, num_blocks=4)
        args.update(bad)
        with pytest.raises((ValueError, TypeError), match=match):
            PagedKVCache(**args)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    _, model = hf_and_gpt()
    prompt, mask = left_padded([6, 3], seed=2)
    a = generate(model, prompt, 12, attention_mask=mask, do_sample=True, temperature=1.3, top_p=0.9, seed=5)
    b = generate(model, prompt, 12, attention_mask=mask, do_sample=True, temperature=1.3, top_p=0.9, seed=5)
    c = generate(model, prompt, 12, attention_mask=mask, do_sample=True, temperature=1.3, top_p=0.9, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, prompt, 12, attention_mask=mask)
    assert torch.equal(generate(model, prompt, 12, attention_mask=mask, do_sample=True, top_k=1, seed=1), greedy)


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_top_k_top_p(logits, 2, None)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logits, None, 0.7)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logits, None, 0.5)) == [True, False, False, False]
    assert kept(filter_top_k_top_p(logits, None, 0.81)) == [True, True, True, False]
    assert kept(filter_top_k_top_p(logits, None, 1.0)) == [True] * 4
    assert kept(filter_top_k_top_p(logits, 0, None)) == [True] * 4  # 0: no top-k, as transformers reads it


def test_temperature_scales_the_logits_before_top_p():
    """As transformers' warpers run: temperature 3 flattens [.5, .3, .15, .05] to about
    [.34, .28, .23, .16], so top_p=0.7 keeps three tokens (filtering unscaled logits keeps two)."""
    from gptkern.generation.sampling import next_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    drawn = next_tokens(logits, torch.zeros(4000, 1, dtype=torch.long), True, 3.0, None, 0.7, 1.0,
                        torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1, 2}


def test_top_p_matches_transformers_with_ties():
    """Tied logits at the cut: the same tokens stay as with transformers' TopPLogitsWarper, so
    seeded sampling agrees with it there too."""
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        logits = torch.randint(0, 4, (3, 12), generator=g).float()  # many ties
        for p in (0.3, 0.5, 0.8, 0.95):
            theirs = TopPLogitsWarper(p)(None, logits.clone())
            assert torch.equal(filter_top_k_top_p(logits, None, p).isinf(), theirs.isinf()), (logits, p)


def test_repetition_penalty_matches_transformers():
    hf, model = hf_and_gpt()
    prompt, _ = left_padded([5])
    expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, repetition_penalty=1.8, pad_token_id=0,
                           eos_token_id=None)
    assert torch.equal(generate(model, prompt, 10, repetition_penalty=1.8), expected)


@pytest.mark.parametrize("use_cache", [True, False])
def test_repetition_penalty_skips_left_padding(use_cache):
    """Padding ids are not part of a prompt: a padded row decodes as the same prompt alone, and the
    batch as transformers does (it skips the padding too). The padding id here is a token the
    prompt alone generates, so that penalizing it would change the output."""
    hf, model = hf_and_gpt()
    prompt, mask = left_padded([9, 4, 6, 1], seed=5)
    alone = [generate(model, prompt[row:row + 1, 9 - n:], 10, repetition_penalty=1.7, use_cache=use_cache)[0, n:]
             for row, n in enumerate((9, 4, 6, 1))]
    pad = int(alone[1][0])  # the first token row 1 (5 padding positions) generates
    prompt = prompt.masked_fill(mask == 0, pad)
    got = generate(model, prompt, 10, attention_mask=mask, repetition_penalty=1.7, use_cache=use_cache)
    for row in range(4):
        assert torch.equal(got[row, 9:], alone[row]), row
    expected = hf.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, repetition_penalty=1.7,
                           pad_token_id=pad, eos_token_id=None)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("use_cache", [True, False])
def test_padding_takes_no_context(use_cache):
    """A batch padded to a fixed width (tokenizer padding="max_length") fits when its real prompts
    do: the context check counts real tokens, and the output keeps the whole padded prompt."""
    hf, model = hf_and_gpt()  # n_positions 64
    prompt, mask = left_padded([5, 8])
    wide = torch.cat([torch.zeros(2, 52, dtype=torch.long), prompt], 1)  # (2, 60)
    wide_mask = torch.cat([torch.zeros(2, 52, dtype=torch.long), mask], 1)
    got = generate(model, wide, 10, attention_mask=wide_mask, use_cache=use_cache)
    assert got.shape == (2, 70) and torch.equal(got[:, :60], wide)
    assert torch.equal(got[:, 60:], generate(model, prompt, 10, attention_mask=mask)[:, 8:])
    with pytest.raises(ValueError, match="prompt length 8 plus max_new_tokens 58"):
        generate(model, wide, 58, attention_mask=wide_mask)  # 8 + 57 fit: the last is not fed


def test_a_fixed_width_that_fits_keeps_its_cache_length(monkeypatch):
    """The padding columns are skipped only when the padded width would pass the context: a batch
    padded to a fixed width that fits keeps one cache (and CUDA-graph) length from call to call."""
    import importlib

    gen = importlib.import_module("gptkern.generation.generate")  # the package's `generate` is the function

    _, model = hf_and_gpt()
    lengths = []
    make_cache = gen.make_cache
    monkeypatch.setattr(gen, "make_cache", lambda m, kind, b, n, blocks: lengths.append(n) or make_cache(m, kind, b, n,
                                                                                                           blocks))
    for real in ([5, 8], [3, 2]):
        prompt, mask = left_padded(real)
        pad = 40 - prompt.shape[1]
        wide = torch.cat([torch.zeros(2, pad, dtype=torch.long), prompt], 1)
        wide_mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), mask], 1)
        got = generate(model, wide, 10, attention_mask=wide_mask, cuda_graph=False)
        assert torch.equal(got[:, 40:], generate(model, prompt, 10, attention_mask=mask, cuda_graph=False)[:, -10:])
    assert lengths[0] == lengths[2] == 50


def test_eos_stops_each_sequence_and_pads():
    _, model = hf_and_gpt()
    prompt, mask = left_padded([6, 2, 4], seed=3)
    free = generate(model, prompt, 10, attention_mask=mask)
    eos = int(free[0, 6 + 2])  # the third token the first sequence generates
    out = generate(model, prompt, 10, attention_mask=mask, eos_token_id=[eos, 98], pad_token_id=0)
    for row in range(3):
        new, ref = out[row, 6:].tolist(), free[row, 6:].tolist()
        stop = next((i for i, t in enumerate(ref) if t in (eos, 98)), None)
        if stop is None:
            assert new == ref[:len(new)]
        else:
            assert new[:stop + 1] == ref[:stop + 1] and all(t == 0 for t in new[stop + 1:])
    if all(any(t in (eos, 98) for t in free[r, 6:].tolist()) for r in range(3)):
        assert out.shape[1] < free.shape[1]  # everyone stopped: generation ended early
    # without pad_token_id, the first EOS id pads
    new = generate(model, prompt, 10, attention_mask=mask, eos_token_id=[eos, 98])[0, 6:].tolist()
    stop = new.index(eos)
    assert new[stop + 1:] and all(t == eos for t in new[stop + 1:])


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_and_streaming():
    _, model = hf_and_gpt()
    prompt, _ = left_padded([5])
    full = generate(model, prompt, 12)
    text = CharTokenizer().decode(full[0, 5:].tolist())
    stop = text[3:5]
    out = generate(model, prompt, 12, stop_strings=[stop], tokenizer=CharTokenizer())
    assert CharTokenizer().decode(out[0, 5:].tolist()).endswith(stop)
    assert out.shape[1] == 5 + text.index(stop) + len(stop)
    streamed = list(generate(model, prompt, 12, stream=True))
    assert all(t.shape == (1,) for t in streamed)
    assert torch.equal(torch.stack(streamed, 1), full[:, 5:])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompt, 3, stop_strings=["x"])
    # one string is one stop string (as transformers takes it), not a set of characters
    assert torch.equal(generate(model, prompt, 12, stop_strings=stop, tokenizer=CharTokenizer()), out)
    with pytest.raises(ValueError, match="non-empty strings"):
        generate(model, prompt, 3, stop_strings=[""], tokenizer=CharTokenizer())
    with pytest.raises(TypeError, match="stop_strings must be strings"):
        generate(model, prompt, 3, stop_strings=["ok", 3], tokenizer=CharTokenizer())
    with pytest.raises(TypeError, match="stop_strings"):
        generate(model, prompt, 3, stop_strings=5, tokenizer=CharTokenizer())


class SmallTokenizer(CharTokenizer):
    """Knows ids 0-9 only, as a tokenizer whose model's vocabulary was padded past it."""
    vocab_size = 10

    def decode(self, ids):
        if any(i >= self.vocab_size for i in ids):
            raise ValueError(f"token id out of range: {ids}")
        return super().decode(ids)


def test_stop_strings_skip_ids_past_the_tokenizer():
    """Ids of a padded vocabulary (past the tokenizer's) are left out of the stop-string text, as
    the CLI leaves them out of what it shows; the tokens themselves are generated as without."""
    _, model = hf_and_gpt()
    prompt, _ = left_padded([5])
    full = generate(model, prompt, 12)
    assert (full[0, 5:] >= SmallTokenizer.vocab_size).any()  # the case: ids the tokenizer cannot decode
    out = generate(model, prompt, 12, stop_strings=["never there"], tokenizer=SmallTokenizer())
    assert torch.equal(out, full)


@pytest.mark.parametrize("cache", ["static", "paged", None])
def test_a_pad_id_outside_the_vocabulary_pads_without_being_fed(cache):
    """pad_token_id=-1 (as in some Llama configs) fills finished rows' output but is never fed to
    the model, which only takes ids in [0, vocab_size): the other rows' tokens are unchanged."""
    _, model = hf_and_gpt()
    prompt, mask = left_padded([6, 2, 4], seed=3)
    free = generate(model, prompt, 10, attention_mask=mask)
    eos = int(free[0, 6 + 2])
    kwargs = dict(use_cache=False) if cache is None else dict(cache=cache)
    for penalty in (1.0, 1.3):  # (the penalty reads the ids so far)
        want = generate(model, prompt, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=5,
                        repetition_penalty=penalty, **kwargs)
        got = generate(model, prompt, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=-1,
                       repetition_penalty=penalty, **kwargs)
        padded = got == -1
        assert padded.any() and not padded.all(dim=1).any()  # a row stopped while another went on
        assert torch.equal(got[~padded], want[~padded]) and (want[padded] == 5).all()


def test_the_prompts_padding_ids_are_never_read():
    """Left padding may hold any id (here vocab_size and -1): the model sees only the real tokens,
    and the prompt comes back as given."""
    _, model = hf_and_gpt()
    prompt, mask = left_padded([6, 2, 4], seed=3)
    want = generate(model, prompt, 5, attention_mask=mask)
    for pad in (99, -1):
        odd = prompt.masked_fill(mask == 0, pad)
        for kwargs in (dict(), dict(use_cache=False), dict(cache="paged")):
            got = generate(model, odd, 5, attention_mask=mask, **kwargs)
            assert torch.equal(got[:, :6], odd) and torch.equal(got[:, 6:], want[:, 6:])
    wide = torch.cat([torch.full((1, 70), 99), torch.randint(1, 99, (1, 4))], 1)  # past block_size 64
    assert generate(model, wide, 3, attention_mask=(wide != 99).long()).shape == (1, 77)


def test_bad_arguments():
    _, model = hf_and_gpt()
    prompt, mask = left_padded([3, 2])
    nan = float("nan")
    for kwargs, match in ((dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
                          (dict(temperature=nan), "temperature"), (dict(top_p=0.0), "top_p"),
                          (dict(top_p=1.5), "top_p"), (dict(top_p=nan), "top_p"), (dict(top_k=-1), "top_k"),
                          (dict(repetition_penalty=nan), "repetition_penalty"),
                          (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(seed=2**64), "seed must fit"),
                          (dict(num_cache_blocks=9), "num_cache_blocks sizes the paged cache")):
        args = dict(max_new_tokens=2, do_sample=True)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, attention_mask=mask, **args)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        generate(model, prompt, 3, attention_mask=mask, cuda_graph=True)  # before any step runs
    # nothing graphed without the cache: as asked, whatever the device
    assert generate(model, prompt, 2, attention_mask=mask, cuda_graph=np.bool_(True), use_cache=False).shape[1] == \
        prompt.shape[1] + 2
    for flag in ("cuda_graph", "do_sample", "stream", "use_cache"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            generate(model, prompt, 3, attention_mask=mask, **{flag: "False"})
    for ids in (prompt + 99, prompt.masked_fill(mask == 1, -1)):  # vocab_size 99 (padding is not read)
        with pytest.raises(IndexError, match="in input_ids is out of range for vocab_size 99"):
            generate(model, ids, 0, attention_mask=mask)
    with pytest.raises(ValueError, match="prompt length 60 plus max_new_tokens 10.*block_size 64"):
        generate(model, torch.ones(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, prompt, 2, attention_mask=mask.flip(1))
    for holed in ([[1, 0, 1]], [[0, 1, 0, 1]]):  # padding after a real token, not at the end
        ids = torch.ones(1, len(holed[0]), dtype=torch.long)
        with pytest.raises(ValueError, match="left-padded"):
            generate(model, ids, 2, attention_mask=torch.tensor(holed))
    with pytest.raises(TypeError, match="input_ids"):
        generate(model, prompt.float(), 2, attention_mask=mask)
    with pytest.raises(TypeError, match="eos_token_id"):
        generate(model, prompt, 2, attention_mask=mask, eos_token_id=1.5)
    for bad in ("a", ["a"], object()):
        with pytest.raises(TypeError, match="eos_token_id"):
            generate(model, prompt, 2, attention_mask=mask, eos_token_id=bad)
    for bad in ("x", 1.5, True):
        with pytest.raises(TypeError, match="pad_token_id"):
            generate(model, prompt, 2, attention_mask=mask, eos_token_id=3, pad_token_id=bad)
    assert torch.equal(generate(model, prompt, 4, attention_mask=mask, eos_token_id=torch.tensor(3),
                                pad_token_id=torch.tensor(0)),
                       generate(model, prompt, 4, attention_mask=mask, eos_token_id=3, pad_token_id=0))
    for args, kwargs, match in (((None, 2), {}, "input_ids"), (([[1, 2]], 2), {}, "input_ids"),
                                ((prompt, 2), dict(attention_mask=[[1, 1, 1]]), "attention_mask"),
                                ((prompt, 2), dict(temperature="1"), "temperature"),
                                ((prompt, 2), dict(do_sample=True, seed="x"), "seed"),
                                ((prompt, True), {}, "max_new_tokens"), ((prompt, "3"), {}, "max_new_tokens"),
                                ((prompt, None), {}, "max_new_tokens"), ((prompt, 2), dict(top_k=True), "top_k"),
                                ((prompt, 2), dict(do_sample=True, top_k="5"), "top_k")):
        with pytest.raises(TypeError, match=match):
            generate(model, *args, **kwargs)
    with pytest.raises(TypeError, match="temperature"):
        generate(model, prompt, 2, attention_mask=mask, temperature=None)
    # numbers as numpy scalars and 0-d tensors are fine
    sampled = [generate(model, prompt, 3, attention_mask=mask, do_sample=True, seed=seed, temperature=t)
               for seed, t in ((np.int64(3), torch.tensor(1)), (3, 1.0))]
    assert torch.equal(*sampled)
    top_k = [generate(model, prompt, 3, attention_mask=mask, do_sample=True, seed=5, top_k=k)
             for k in (torch.tensor(2), 2)]
    assert torch.equal(*top_k)
    assert torch.equal(generate(model, prompt, 0, attention_mask=mask), prompt)
    out = generate(model, prompt.int(), 0, attention_mask=mask.bool())  # a LongTensor, as documented
    assert out.dtype == torch.long and torch.equal(out, prompt)


def test_eos_token_id_as_tensor_or_numpy_int():
    _, model = hf_and_gpt()
    prompt, mask = left_padded([6, 2, 4], seed=3)
    free = generate(model, prompt, 10, attention_mask=mask)
    eos = int(free[0, 6 + 2])
    want = generate(model, prompt, 10, attention_mask=mask, eos_token_id=eos)
    assert want.shape != free.shape or not torch.equal(want, free)  # the EOS changes the output
    for given in (torch.tensor(eos), torch.tensor([eos]), np.int64(eos), [np.int64(eos)]):
        assert torch.equal(generate(model, prompt, 10, attention_mask=mask, eos_token_id=given), want)
    for empty in ([], (), torch.tensor([], dtype=torch.long)):  # no EOS
        assert torch.equal(generate(model, prompt, 10, attention_mask=mask, eos_token_id=empty), free)


def test_every_step_decodes_in_eval_mode_and_the_mode_is_the_users_between_steps():
    """A model in train mode (with dropout): two streams in flight, a plain call while one is
    open, and model.train() between a stream's steps all decode in eval mode; between steps
    and after the calls the model has the mode the user gave it, per module."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=2, dropout=0.5, init_std=0.2))
    prompt, _ = left_padded([5], vocab=model.config.vocab_size)
    want = generate(model.eval(), prompt, 6)[0, 5:].tolist()
    model.train()
    model.transformer.h[0].eval()  # a submodule the user keeps in eval mode
    modes = [m.training for m in model.modules()]
    unused = generate(model, prompt, 6, stream=True)
    del unused
    first, second = generate(model, prompt, 6, stream=True), generate(model, prompt, 6, stream=True)
    got_first, got_second = [int(next(first))], [int(next(second))]
    assert [m.training for m in model.modules()] == modes
    assert generate(model, prompt, 6)[0, 5:].tolist() == want  # while both streams are open
    assert [m.training for m in model.modules()] == modes
    model.train()  # between steps: the user's call stands, the next step is in eval mode again
    model.transformer.h[0].eval()
    got_first += [int(t) for t in first]
    got_second += [int(t) for t in second]
    assert got_first == want and got_second == want
    assert [m.training for m in model.modules()] == modes


def test_overlapping_steps_keep_eval_mode_until_the_last_one_ends():
    """Steps that overlap (nested here, as another thread's would) share one switch to eval mode:
    the modules that were training are switched back when the last one ends (after an error too),
    and the next step is in eval mode again."""
    from gptkern.generation.eval_mode import evaluating

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Dropout(0.5))
    model[2].eval()  # the user's choice, kept
    modes = [m.training for m in model.modules()]
    modules = list(model.modules())
    for _ in range(2):
        with evaluating(model, modules):
            assert not any(m.training for m in model.modules())
            with evaluating(model, modules):
                assert not any(m.training for m in model.modules())
            assert not any(m.training for m in model.modules())  # the other step still runs
        assert [m.training for m in model.modules()] == modes
    with pytest.raises(KeyError):
        with evaluating(model, modules):
            raise KeyError("a step that fails")
    assert [m.training for m in model.modules()] == modes
    from gptkern.generation import eval_mode

    assert model not in eval_mode._running  # nothing left registered


def test_paged_cache_equals_static_and_frees_blocks():
    _, model = hf_and_gpt()
    prompt, mask = left_padded([9, 2, 5], seed=4)
    static = generate(model, prompt, 14, attention_mask=mask)
    paged = generate(model, prompt, 14, attention_mask=mask, cache="paged")
    assert torch.equal(paged, static)
    # a stopping sequence returns its blocks, which others then reuse without corrupting anything
    eos = int(static[1, 9 + 1])
    with_eos = generate(model, prompt, 14, attention_mask=mask, eos_token_id=eos)
    # 4 usable blocks: the two long sequences need their second block after the short one frees its own
    tight = generate(model, prompt, 14, attention_mask=mask, eos_token_id=eos, cache="paged", num_cache_blocks=5)
    assert torch.equal(tight, with_eos)


def test_paged_cache_allocator():

    cache = PagedKVCache(n_layer=1, batch_size=2, n_kv_head=1, head_dim=4, num_blocks=4, block_size=4)
    cache.allocate([5, 4])  # 2 blocks + 1 block: the pool's 3 usable blocks
    assert cache.blocks_in_use == 3 and not cache.free_blocks
    first = set(cache.owned[0])
    with pytest.raises(RuntimeError, match="out of blocks"):
        cache.allocate([5, 5])
    assert set(cache.owned[0]) == first  # nothing taken from the other sequence
    cache.free(0)
    assert cache.blocks_in_use == 1 and cache.block_table[0].tolist() == [0, 0, 0]  # scratch
    cache.allocate([0, 8])
    assert len(cache.owned[1]) == 2 and 0 not in cache.owned[1]


def test_a_refused_paged_allocation_takes_no_block():
    """allocate() is all or nothing: a request that runs out of blocks (or past max_seq_len in a
    later row) leaves owned, the free list and the block table as they were, so a retry that needs
    no new block still finds every sequence's blocks in the table (it had kept the scratch block)."""

    cache = PagedKVCache(n_layer=1, batch_size=2, n_kv_head=1, head_dim=4, num_blocks=4, block_size=16,
                         max_seq_len=48)
    for bad, error in (([20, 30], RuntimeError), ([20, 49], ValueError)):
        with pytest.raises(error):
            cache.allocate(bad)
        assert cache.owned == [[], []] and len(cache.free_blocks) == 3 and not cache.block_table.any()
    cache.allocate([20, 10])
    assert cache.block_table[:, :2].tolist() == [cache.owned[0], cache.owned[1] + [0]]
    assert sorted(cache.owned[0] + cache.owned[1]) == [1, 2, 3]
    with pytest.raises(ValueError, match="lengths has 3 entries"):
        cache.allocate([1, 1, 1])


def test_paged_cache_refuses_unallocated_writes_and_never_spills_into_blocks():
    """Writes before any allocate() raise (they would all land in the scratch block), and so do
    writes past a sequence's blocks, whether its table has columns left or not, with every
    block intact; a freed sequence's writes go to scratch."""

    cache = PagedKVCache(n_layer=1, batch_size=2, n_kv_head=1, head_dim=4, num_blocks=3, block_size=2,
                         max_seq_len=2)
    kv = torch.arange(8.0).reshape(2, 1, 1, 4)
    with pytest.raises(RuntimeError, match="allocate"):
        cache.decode(0, kv, kv, kv)
    with pytest.raises(RuntimeError, match="allocate"):
        cache.write_prompt(0, kv, kv, torch.ones(2, dtype=torch.int32))
    cache.allocate([2, 2])
    for _ in range(2):
        cache.decode(0, kv, kv, kv)
        cache.advance(1)
    kept = [t.clone() for t in cache.k + cache.v]
    with pytest.raises(RuntimeError):  # position 2 of a 2-token table
        cache.decode(0, kv, kv, kv + 1)
    for before, after in zip(kept, cache.k + cache.v):
        assert torch.equal(before[1:], after[1:])  # block 0 is scratch
    wide = PagedKVCache(n_layer=1, batch_size=2, n_kv_head=1, head_dim=4, num_blocks=5, block_size=2,
                        max_seq_len=8)  # 4 table columns per sequence
    wide.allocate([2, 2])
    wide.write_prompt(0, kv.expand(2, 1, 2, 4), kv.expand(2, 1, 2, 4), torch.full((2,), 2, dtype=torch.int32))
    wide.seqlens.fill_(2)
    kept = [t.clone() for t in wide.k + wide.v]
    with pytest.raises(RuntimeError, match="sequence 0 needs 3 positions .* has 2 allocated"):
        wide.decode(0, kv, kv, kv + 1)  # column 1 of the table is unallocated (0, the scratch block)
    for before, after in zip(kept, wide.k + wide.v):
        assert torch.equal(before, after)
    wide.free(0)
    wide.allocate([0, 3])
    wide.decode(0, kv, kv, kv + 1)  # row 0 freed: to scratch; row 1 has a new block


def test_an_explicit_block_count_of_zero_is_refused():
    _, model = hf_and_gpt()
    prompt, _ = left_padded([5])
    with pytest.raises(ValueError, match="num_blocks"):
        generate(model, prompt, 3, cache="paged", num_cache_blocks=0)


def test_prompt_longer_than_cache_raises():
    cache = StaticKVCache(1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="5.*max_seq_len 4"):
        cache.allocate([5])


def test_sliding_window_model_decodes_with_the_cache():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("llama-tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=61,
                                    mlp_hidden=96, window=4, init_std=0.2)).eval()
    prompt, mask = left_padded([7, 3], vocab=61)
    expected = generate(model, prompt, 12, attention_mask=mask, use_cache=False)
    assert torch.equal(generate(model, prompt, 12, attention_mask=mask), expected)
    with pytest.raises(ValueError, match="sliding-window"):
        generate(model, prompt, 2, attention_mask=mask, cache="paged")


def test_stop_string_spanning_tokens():
    """A multi-byte character arrives in two tokens (the 4th and 5th generated): the stop string
    still matches, because the generated ids are decoded together."""
    from gptkern.data import ByteTokenizer

    _, model = hf_and_gpt()
    prompt, _ = left_padded([4])
    target = "é".encode()

    class Positional(ByteTokenizer):  # decodes the 4th and 5th ids of a sequence to the bytes of "é"
        def decode(self, ids):
            data = bytes(target[i - 3] if i in (3, 4) else ord("a") for i in range(len(list(ids))))
            return data.decode("utf-8", errors="replace")

    out = generate(model, prompt, 10, stop_strings=["é"], tokenizer=Positional())
    assert out.shape[1] == 4 + 5


def test_stop_string_inside_a_long_token():
    """The token that completes a stop string may decode to far more text after it."""
    _, model = hf_and_gpt()
    prompt, _ = left_padded([4])

    class LongTokens:  # the second generated token decodes to "STOP" and 40 spaces
        def decode(self, ids):
            return "".join("STOP" + " " * 40 if i == 1 else "x" for i in range(len(list(ids))))

    out = generate(model, prompt, 10, stop_strings=["STOP"], tokenizer=LongTokens())
    assert out.shape[1] == 4 + 2


def test_generate_under_autocast_caches_in_the_autocast_dtype():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("llama-tiny", n_layer=2, init_std=0.2)).eval()
    prompt, mask = left_padded([6, 2], vocab=512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = gptkern.generation.kv_cache.make_cache(model, "paged", 2, 16)
        static, paged = (generate(model, prompt, 8, attention_mask=mask, cache=kind) for kind in ("static", "paged"))
    assert cache.k[0].dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):  # a bf16 model: autocast makes fp16 keys and values
        assert gptkern.generation.kv_cache.make_cache(model.bfloat16(), "static", 2, 16).k[0].dtype == torch.float16
        assert gptkern.generation.kv_cache.make_cache(model.double(), "static", 2, 16).k[0].dtype == torch.float64
    assert torch.equal(static, paged) and static.shape == (2, 14)


def test_degenerate_sampling_settings_are_greedy():
    """do_sample with temperature 0 (documented as greedy) or a tiny top_p (the top token is always
    kept) gives the greedy tokens, not an error from an all-filtered distribution."""
    _, model = hf_and_gpt()
    prompt, mask = left_padded([5, 3])
    greedy = generate(model, prompt, 6, attention_mask=mask)
    for kwargs in (dict(temperature=0.0), dict(top_p=1e-9), dict(temperature=0.0, top_p=0.5, top_k=3)):
        assert torch.equal(generate(model, prompt, 6, attention_mask=mask, do_sample=True, seed=1, **kwargs),
                           greedy), kwargs


def test_every_row_stopping_at_its_first_token_ends_after_one_column():
    _, model = hf_and_gpt()
    prompt, mask = left_padded([5, 3, 4])
    first = generate(model, prompt, 1, attention_mask=mask)[:, -1].tolist()
    out = generate(model, prompt, 8, attention_mask=mask, eos_token_id=first)
    assert out.shape == (3, prompt.shape[1] + 1) and out[:, -1].tolist() == first


def test_stop_strings_with_an_eos_that_never_comes():
    """A stop string stops its sequence whether or not eos_token_id is given too."""
    _, model = hf_and_gpt()
    prompt, _ = left_padded([5])
    full = generate(model, prompt, 12)
    text = CharTokenizer().decode(full[0, 5:].tolist())
    unused = next(t for t in range(1, 99) if t not in full[0].tolist())
    stop = text[3:5]
    want = generate(model, prompt, 12, stop_strings=[stop], tokenizer=CharTokenizer())
    assert want.shape[1] < full.shape[1]
    got = generate(model, prompt, 12, stop_strings=[stop], tokenizer=CharTokenizer(), eos_token_id=unused)
    assert torch.equal(got, want)


def test_stop_strings_skip_the_first_id_past_the_tokenizer():
    """An id equal to the tokenizer's size is past it (ids 0 .. size - 1 decode)."""
    _, model = hf_and_gpt()
    prompt, _ = left_padded([5])
    full = generate(model, prompt, 12)
    boundary = type("Boundary", (SmallTokenizer,), {"vocab_size": int(full[0, 6])})  # a generated id
    out = generate(model, prompt, 12, stop_strings=["never there"], tokenizer=boundary())
    assert torch.equal(out, full)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("kind", ["static", "paged"])
def test_several_tokens_decoded_at_once_equal_the_full_forward(preset, kind):
    """A cached step of 3 tokens (speculative decoding, chunked prefill) sits them at their own positions."""

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 8))
    cache_type = StaticKVCache if kind == "static" else PagedKVCache
    cache = cache_type.for_model(model, 1, 16)
    cache.allocate([8])
    with torch.no_grad():
        full = model(ids)[0][0, 5:]
        model.transformer(ids[:, :5], cache=cache)
        got = model.lm_head(model.transformer(ids[:, 5:], cache=cache))[0]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert cache.seqlens.tolist() == [8]


def test_cache_bookkeeping_edges():

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2-tiny", vocab_size=64)).eval()
    paged = PagedKVCache.for_model(model, 1, 64)
    paged.allocate([5])  # one 16-token block: decoding to position 16 needs a second
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs 17 positions"):
        model.transformer(torch.randint(0, 64, (1, 5)), cache=paged)
        for _ in range(12):
            model.transformer(torch.randint(0, 64, (1, 1)), cache=paged)
    pool = PagedKVCache(1, 1, 1, 4, num_blocks=4, block_size=16)
    pool.allocate([16])
    pool.free(0)
    pool.allocate([16])  # the freed row is in use again, with one block
    k = torch.randn(1, 1, 20, 4)
    with pytest.raises(RuntimeError):
        pool.write_prompt(0, k, k, torch.tensor([20]))
    static = StaticKVCache(1, 2, 1, 8, 4)
    static.allocate([8, 3])  # exactly the capacity fits
    static.seqlens.copy_(torch.tensor([2, 5]))
    static.reorder(torch.tensor([1, 0]))
    assert static.seqlens.tolist() == [5, 2]

# Found by a mutation run over generation and nn (each test kills a mutant that all others let through).


def tiny_gpt(vocab=64, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("gpt2-tiny", vocab_size=vocab)).eval()


def test_a_pad_id_equal_to_vocab_size_pads_without_being_fed():
    """G3 (generate.py:100 `pad_token_id < vocab_size` -> `<=`): a pad id one past the vocabulary
    (a pad token added to the tokenizer, the embedding not resized) is output, never fed."""
    model = tiny_gpt()
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    free = generate(model, prompt, 8)
    eos = int(free[0, 5])
    assert eos not in free[1, 4:].tolist()  # (the case: row 0 stops, row 1 goes on)
    out = generate(model, prompt, 8, eos_token_id=eos, pad_token_id=64)
    assert out[0, 6:].eq(64).all() and torch.equal(out[1], free[1])


def test_left_padding_is_not_penalized_when_the_row_generates_token_0():
    """G4 (generate.py:96 seen_valid dropped). generate() rewrites the padding ids to 0 before
    they reach the penalty, so the existing test (which puts a generated id in the padding) does
    not see penalized padding: here the prompt alone generates token 0, which penalized padding
    would push down."""
    model = tiny_gpt(vocab=4, seed=5)
    real = torch.randint(0, 4, (1, 3), generator=torch.Generator().manual_seed(5))
    alone = generate(model, real, 8, repetition_penalty=3.0)
    assert 0 in alone[0, 3:].tolist()  # (the case: token 0 is generated)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), real], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)], 1)
    for kwargs in (dict(), dict(use_cache=False), dict(cache="paged")):
        got = generate(model, padded, 8, attention_mask=mask, repetition_penalty=3.0, **kwargs)
        assert torch.equal(got[:, 7:], alone[:, 3:]), kwargs


def test_seed_takes_the_unsigned_64_bit_range():
    """G8 (generate.py:218 `seed < 2**64` -> `< 2**63`): torch.Generator takes seeds up to
    2**64 - 1; the existing test checks only that 2**64 is refused."""
    model = tiny_gpt()
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    for seed in (2**63, 2**64 - 1):
        a = generate(model, prompt, 3, do_sample=True, seed=seed)
        assert torch.equal(a, generate(model, prompt, 3, do_sample=True, seed=seed))


def test_an_empty_batch_is_a_value_error():
    """G11 (generate.py:31 the `input_ids.shape[0] == 0` check dropped): a (0, L) prompt raised a
    RuntimeError from torch's max() instead; the existing test checks only (1, 0)."""
    model = tiny_gpt()
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(0, 3, dtype=torch.long), 2)


def test_repetition_penalty_skips_ids_at_padding_positions():
    """S9 (sampling.py:43 padding pointed at id 0 instead of the extra column): only the ids at
    valid positions are penalized."""
    logits = torch.tensor([[2.0, -1.0, 4.0]])
    seen = torch.tensor([[0, 2]])
    out = apply_repetition_penalty(logits, seen, 2.0, torch.tensor([[False, True]]))
    assert out.tolist() == [[2.0, -1.0, 2.0]]


def test_top_k_zero_is_off():
    """S2 (sampling.py:28 `top_k < 0` -> `<= 0`): top_k=0 means no limit, as in transformers."""
    model = tiny_gpt()
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(model, prompt, 5, do_sample=True, seed=3, top_k=0),
                       generate(model, prompt, 5, do_sample=True, seed=3))


def test_a_prompt_that_exactly_fills_a_static_cache():
    """K2 (kv_cache.py:139 `l > max_seq_len` -> `>=`): a prompt of exactly max_seq_len tokens fits."""
    cache = StaticKVCache(1, 1, 1, 4, 2)
    k = torch.arange(8.0).reshape(1, 1, 4, 2)
    cache.write_prompt(0, k, k, torch.tensor([4]))
    assert torch.equal(cache.k[0], k)
    model = tiny_gpt()
    full = StaticKVCache.for_model(model, 1, 5)
    full.allocate([5])
    with torch.no_grad():
        model.transformer(torch.randint(0, 64, (1, 5)), cache=full)
    assert full.seqlens.tolist() == [5]


def test_paged_writes_past_the_table_go_to_scratch_on_every_layer():
    """K9 (kv_cache.py:293 `index < table width` -> `<=`): a position one block past the table
    was clamped into the sequence's last block. Layer 0's host check refuses such writes; a
    later layer (or a replayed CUDA graph) is not checked, and must not spill either."""
    cache = PagedKVCache(n_layer=2, batch_size=1, n_kv_head=1, head_dim=4, num_blocks=2, block_size=2,
                         max_seq_len=2)
    cache.allocate([2])
    kv = torch.ones(1, 1, 2, 4)
    for layer in range(2):
        cache.write_prompt(layer, kv, kv, torch.tensor([2], dtype=torch.int32))
    cache.seqlens.fill_(2)
    kept = [t[1:].clone() for t in cache.k + cache.v]
    new = torch.full((1, 1, 1, 4), 7.0)
    with pytest.raises(RuntimeError):  # decode attention refuses the length
        cache.decode(1, new, new, new)
    for before, after in zip(kept, cache.k + cache.v):
        assert torch.equal(before, after[1:])  # block 0 is scratch
