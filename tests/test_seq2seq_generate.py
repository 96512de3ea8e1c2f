"""Seq2SeqTransformer decoding: greedy with the cache equals the uncached model; beam search
finds the exhaustive best on a tiny vocabulary."""
import itertools
import types

import numpy as np
import pytest
import torch

from gptkern.generation import generate_seq2seq
from gptkern.models import Seq2SeqConfig, Seq2SeqTransformer

BOS, EOS = 0, 1


def model_with(vocab, seed=0, std=0.5):
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=vocab, n_embd=32, n_head=4, n_encoder_layer=2,
                                             n_decoder_layer=2, max_len=16, init_std=std))
    return model.eval()


def sources(b=3, s=7, vocab=12, seed=1):
    src = torch.randint(2, vocab, (b, s), generator=torch.Generator().manual_seed(seed))
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, 4:] = True
    return src, pad


@pytest.mark.parametrize("new", [8, 16])  # 16 = max_len: the decoder reads the start token and 15 new ones
def test_greedy_equals_uncached_argmax(new):
    model = model_with(12)
    src, pad = sources()
    out = generate_seq2seq(model, src, new, bos_token_id=BOS, eos_token_id=EOS, src_pad_mask=pad, pad_token_id=11)
    assert out.shape == (3, new + 1)
    tokens = torch.full((3, 1), BOS)
    with torch.no_grad():
        for _ in range(new):
            tokens = torch.cat([tokens, model(src, tokens, pad)[:, -1].argmax(-1, keepdim=True)], 1)
    for row in range(3):
        ref = tokens[row].tolist()
        got = out[row].tolist()
        stop = ref.index(EOS, 1) + 1 if EOS in ref[1:] else len(ref)
        assert got[:stop] == ref[:stop]
        assert all(t == 11 for t in got[stop:])


def sequence_logprob(model, src, pad, seq):
    tokens = torch.tensor([[BOS] + seq[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(src, tokens, pad).double(), -1)[0]
    return sum(logprobs[i, t].item() for i, t in enumerate(seq))


def exhaustive_best(model, src, pad, vocab, max_new, length_penalty):
    """Every target of 1..max_new tokens that ends at EOS, or runs to max_new without one."""
    best, best_seq = -float("inf"), None
    for n in range(1, max_new + 1):
        for body in itertools.product([t for t in range(vocab) if t != EOS], repeat=n - 1):
            for last in range(vocab):
                if last != EOS and n < max_new:
                    continue  # unfinished sequences only at the length limit
                seq = list(body) + [last]
                score = sequence_logprob(model, src, pad, seq) / n ** length_penalty
                if score > best:
                    best, best_seq = score, seq
    return best_seq


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("seed", [1, 3])
def test_beam_search_is_exhaustive_with_enough_beams(length_penalty, seed):
    vocab, max_new = 4, 3
    model = model_with(vocab, seed=seed, std=1.0)
    src = torch.tensor([[2, 3, 3, 2, 3]])
    out = generate_seq2seq(model, src, max_new, bos_token_id=BOS, eos_token_id=EOS, num_beams=vocab ** 2,
                           length_penalty=length_penalty, early_stopping="never")
    seq = out[0, 1:].tolist()
    if EOS in seq:
        seq = seq[:seq.index(EOS) + 1]
    assert seq == exhaustive_best(model, src, None, vocab, max_new, length_penalty)


def test_beam_search_batch_rows_are_independent_and_beat_greedy():
    model = model_with(12, seed=5)
    src, pad = sources(seed=7)
    beams = generate_seq2seq(model, src, 6, bos_token_id=BOS, eos_token_id=EOS, src_pad_mask=pad, num_beams=4,
                             early_stopping=True)
    for row in range(3):
        alone = generate_seq2seq(model, src[row:row + 1], 6, bos_token_id=BOS, eos_token_id=EOS,
                                 src_pad_mask=pad[row:row + 1], num_beams=4, early_stopping=True)
        width = alone.shape[1]
        assert beams[row, :width].tolist() == alone[0].tolist()
        assert all(t == EOS for t in beams[row, width:].tolist())
    greedy = generate_seq2seq(model, src, 6, bos_token_id=BOS, eos_token_id=EOS, src_pad_mask=pad)

    def score(seq_row, row):
        seq = seq_row[1:].tolist()
        seq = seq[:seq.index(EOS) + 1] if EOS in seq else seq
        return sequence_logprob(model, src[row:row + 1], pad[row:row + 1], seq) / len(seq)

    for row in range(3):
        assert score(beams[row], row) >= score(greedy[row], row) - 1e-9


def test_bad_arguments():
    model = model_with(12)
    src, _ = sources()
    with pytest.raises(ValueError, match="num_beams"):
        generate_seq2seq(model, src, 3, bos_token_id=BOS, eos_token_id=EOS, num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens 17 is longer than max_len 16"):
        generate_seq2seq(model, src, 17, bos_token_id=BOS, eos_token_id=EOS, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_seq2seq(model, src, -1, bos_token_id=BOS, eos_token_id=EOS)
    with pytest.raises(ValueError, match="non-empty"):
        generate_seq2seq(model, src[:, :0], 3, bos_token_id=BOS, eos_token_id=EOS)
    for bad in ("True", 1, None):
        with pytest.raises(ValueError, match="early_stopping"):
            generate_seq2seq(model, src, 3, bos_token_id=BOS, eos_token_id=EOS, num_beams=2, early_stopping=bad)
    for name, bad in (("max_new_tokens", True), ("num_beams", True), ("length_penalty", float("nan")),
                      ("length_penalty", "x"), ("length_penalty", True)):
        kwargs = {"max_new_tokens": 3, "num_beams": 2, name: bad}
        with pytest.raises(ValueError, match=name):
            generate_seq2seq(model, src, kwargs.pop("max_new_tokens"), bos_token_id=BOS, eos_token_id=EOS, **kwargs)
    with pytest.raises(TypeError, match="src"):
        generate_seq2seq(model, src.tolist(), 3, bos_token_id=BOS, eos_token_id=EOS)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for bad in ("x", 1.5, [EOS, 3], True):
            ids = {"bos_token_id": BOS, "eos_token_id": EOS, name: bad}
            with pytest.raises(TypeError, match=name):
                generate_seq2seq(model, src, 3, **ids)
    for bad in (12, -1):
        with pytest.raises(IndexError, match=f"bos_token_id {bad} is out of range for the target vocabulary of 12"):
            generate_seq2seq(model, src, 3, bos_token_id=bad, eos_token_id=EOS)
    with pytest.raises(TypeError, match="src_pad_mask must be a bool tensor or None, got list"):
        generate_seq2seq(model, src, 3, bos_token_id=BOS, eos_token_id=EOS, src_pad_mask=[[False] * 7] * 3)
    # 0-d integer tensors are ids too
    as_tensors = generate_seq2seq(model, src, 3, bos_token_id=torch.tensor(BOS), eos_token_id=torch.tensor(EOS),
                                  pad_token_id=torch.tensor(0), num_beams=2)
    assert torch.equal(as_tensors, generate_seq2seq(model, src, 3, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0,
                                                    num_beams=2))
    # numpy integers are ints, as generate() takes them
    out = generate_seq2seq(model, src, np.int64(3), bos_token_id=BOS, eos_token_id=EOS, num_beams=np.int64(2))
    assert torch.equal(out, generate_seq2seq(model, src, 3, bos_token_id=BOS, eos_token_id=EOS, num_beams=2))


def test_zero_new_tokens_and_padding():
    model = model_with(12)
    src, pad = sources()
    for beams in (1, 3):
        out = generate_seq2seq(model, src, 0, bos_token_id=BOS, eos_token_id=EOS, num_beams=beams)
        assert out.tolist() == [[BOS]] * 3
    out = generate_seq2seq(model, src, 5, bos_token_id=BOS, eos_token_id=EOS, src_pad_mask=pad, num_beams=3,
                           pad_token_id=11)
    for row in out.tolist():  # after a row's EOS only padding; a row without EOS ran the full length
        if EOS in row[1:]:
            assert all(t == 11 for t in row[row.index(EOS, 1) + 1:])
        else:
            assert len(row) == 6


class _BigramDecoder(torch.nn.Module):
    """A stand-in Seq2Seq model whose next-token probabilities depend on the last token only
    (PROBS), so beam scores are exact: p(next | BOS) = (0, .5, .2, .3), and so on."""
    BOS, A, B, EOS = 0, 1, 2, 3
    PROBS = {0: [0, .5, .2, .3], 1: [0, .6, 0, .4], 2: [0, .3, .3, .4]}
    config = types.SimpleNamespace(max_len=8, n_decoder_layer=1, n_head=1, n_embd=2, target_vocab_size=4)

    def __init__(self):
        super().__init__()
        self.decoder = [types.SimpleNamespace(cross_attn=types.SimpleNamespace(project_memory=lambda m: (m, m)))]

    def encode(self, src, mask):
        return torch.zeros(src.shape[0], 1, 2)

    def decode(self, tgt, memory, mask, cache=None, memory_kv=None):
        return (torch.tensor([self.PROBS[t] for t in tgt[:, -1].tolist()]) + 1e-30).log()[:, None, :]


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beams_running_at_the_last_step_are_scored_whatever_early_stopping(early_stopping):
    """Two beams, two steps: EOS hypotheses fill the beam at the last step, but the running beam
    A A (log 0.3 = -1.20, penalized -0.60) beats A EOS (-0.81): transformers returns it for every
    early_stopping, since a source counts as done only if it was full before that step."""
    m = _BigramDecoder()
    out = generate_seq2seq(m, torch.zeros(1, 1, dtype=torch.long), 2, bos_token_id=m.BOS, eos_token_id=m.EOS,
                           num_beams=2, length_penalty=1.0, early_stopping=early_stopping)
    assert out.tolist() == [[m.BOS, m.A, m.A]]


class _EosFirst(_BigramDecoder):
    # p(. | BOS) = (0, .4, 0, .6): EOS at once scores log .6 / 1 = -0.51; the beam A A still running
    # at the end has log(.4 * .6) = -1.43 over 2 generated tokens = -0.71 and loses (counting BOS,
    # over 3, it would score -0.48 and win).
    PROBS = {0: [0, .4, 0, .6], 1: [0, .6, 0, .4], 2: [0, .3, .3, .4]}


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_running_beams_are_penalized_by_their_generated_length(early_stopping):
    m = _EosFirst()
    out = generate_seq2seq(m, torch.zeros(1, 1, dtype=torch.long), 2, bos_token_id=m.BOS, eos_token_id=m.EOS,
                           num_beams=2, length_penalty=1.0, early_stopping=early_stopping)
    assert out.tolist() == [[m.BOS, m.EOS]]


class _StopsEarly(_BigramDecoder):
    PROBS = {0: [0, .01, .87, .12], 1: [0, .03, .85, .12], 2: [0, .48, .01, .51]}


def test_early_stopping_false_compares_with_the_kth_best_finished():
    """After 4 generated tokens four hypotheses have finished; the 2nd best of them (-0.427, with
    num_beams=2) beats the best running beam at its length (-0.442), so the source is done with
    B EOS (-0.406), as with transformers' early_stopping=False. Comparing with the worst finished
    one (-2.12) would search on and return B A B A B (-0.386)."""
    m = _StopsEarly()
    out = generate_seq2seq(m, torch.zeros(1, 1, dtype=torch.long), 5, bos_token_id=m.BOS, eos_token_id=m.EOS,
                           num_beams=2, length_penalty=1.0, early_stopping=False)
    assert out.tolist() == [[m.BOS, m.B, m.EOS]]


def test_greedy_reads_the_source_padding_mask():
    """A padded source in a batch decodes as the same source alone, unpadded (weights large enough
    for the padded positions to change the output if they were read)."""
    model = model_with(12, std=1.0)
    src, pad = sources()
    out = generate_seq2seq(model, src, 8, bos_token_id=BOS, eos_token_id=EOS, src_pad_mask=pad, pad_token_id=11)
    alone = generate_seq2seq(model, src[1:2, :4], 8, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=11)
    assert out[1, :alone.shape[1]].tolist() == alone[0].tolist()
    unmasked = generate_seq2seq(model, src, 8, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=11)
    assert unmasked[1].tolist() != out[1].tolist()  # (the case: the padding would change row 1)


def test_early_stopping_true_ends_with_the_first_num_beams_finished():
    """_BigramDecoder: after 2 steps EOS (-1.20) and A EOS (-0.80) have finished, which ends the
    search with early_stopping=True; False and "never" go on, since A A ... improves towards
    log 0.6 a token, and return A A A A A (-0.547, against A A A A EOS's -0.628)."""
    m = _BigramDecoder()
    outs = {es: generate_seq2seq(m, torch.zeros(1, 1, dtype=torch.long), 5, bos_token_id=m.BOS, eos_token_id=m.EOS,
                                 num_beams=2, length_penalty=1.0, early_stopping=es).tolist()
            for es in (True, False, "never")}
    assert outs[True] == [[m.BOS, m.A, m.EOS]]
    assert outs[False] == outs["never"] == [[m.BOS] + [m.A] * 5]


class _EosThird(_BigramDecoder):
    # After A (-0.69) and B (-1.20), step 2 ranks A A (-1.39), A EOS (-1.49), then B EOS (-1.89)
    # third: transformers keeps an EOS ranked past the beams out of the hypotheses. Kept, B EOS would
    # make two finished ones and end the search (early_stopping=True) with A EOS (-0.745 a token);
    # left out, the search goes on to A A A (-0.693), which A A EOS (-0.73) does not beat.
    PROBS = {0: [0, .5, .3, .2], 1: [0, .5, .05, .45], 2: [0, .25, .25, .5]}


def test_an_eos_ranked_past_the_beams_is_not_a_hypothesis():
    m = _EosThird()
    out = generate_seq2seq(m, torch.zeros(1, 1, dtype=torch.long), 3, bos_token_id=m.BOS, eos_token_id=m.EOS,
                           num_beams=2, length_penalty=1.0, early_stopping=True)
    assert out.tolist() == [[m.BOS, m.A, m.A, m.A]]


@pytest.mark.parametrize("length_penalty", [700.0, -700.0])
def test_extreme_length_penalties_score_without_overflow(length_penalty):
    """length ** penalty past fp64's range: the penalized score is 0 or -inf, not an OverflowError or
    ZeroDivisionError; the search still returns each source's hypotheses."""
    model = model_with(12)
    src, pad = sources()
    out = generate_seq2seq(model, src, 6, bos_token_id=BOS, eos_token_id=EOS, src_pad_mask=pad, num_beams=2,
                           length_penalty=length_penalty)
    assert out.shape[0] == 3 and (out[:, 0] == BOS).all()


def test_a_config_or_keyword_arguments_not_both():
    """Keyword arguments beside a config were ignored; now refused (overriding a config's fields
    would keep its derived ones, as mlp_hidden from the old n_embd)."""
    cfg = Seq2SeqConfig(src_vocab_size=12, n_embd=32, n_head=4, n_encoder_layer=1, n_decoder_layer=1, max_len=16)
    with pytest.raises(TypeError, match=r"a config or keyword arguments, not both: got \['n_decoder_layer'\]"):
        Seq2SeqTransformer(cfg, n_decoder_layer=3)
    model = Seq2SeqTransformer(src_vocab_size=12, n_embd=32, n_head=4, n_encoder_layer=1, n_decoder_layer=3,
                               max_len=16)
    assert len(model.decoder) == 3 and model.config.mlp_hidden == 128

# Found by a mutation run over generation and nn (each test kills a mutant that all others let through).


class _Bigram(_BigramDecoder):
    """_BigramDecoder that also continues after EOS (a finished beam's row still gets scored)."""
    PROBS = {**_BigramDecoder.PROBS, 3: [0, .3, .3, .4]}


class _Tie(_Bigram):
    # step 1: EOS (log .5 / 1) and B EOS (2 log .5 / 2) have finished; the best running beam B A
    # scores 2 log .5 / 2 too: an exact tie, which ends the search (transformers: worst >= best
    # running). Searching on would find B A A A (-0.40).
    PROBS = {0: [0, 0, .5, .5], 2: [0, .5, 0, .5], 1: [0, .9, 0, .1], 3: [0, .3, .3, .4]}


def test_early_stopping_false_stops_on_a_tie_with_the_kth_finished():
    """Q8 (seq2seq.py:184 `worst_kept >= ...` -> `>`)."""
    m = _Tie()
    out = generate_seq2seq(m, torch.zeros(1, 1, dtype=torch.long), 4, bos_token_id=m.BOS, eos_token_id=m.EOS,
                           num_beams=2, length_penalty=1.0, early_stopping=False)
    assert out.tolist() == [[m.BOS, m.EOS]]


@pytest.mark.parametrize("length_penalty", [-700.0, -1100.0])
def test_a_hugely_negative_length_penalty_returns_the_shortest_hypothesis(length_penalty):
    """Q12 (seq2seq.py:122 the ZeroDivisionError branch returning 0.0 for a negative total): a
    longer hypothesis, whose length ** penalty underflows to 0, scores -inf, not 0 (the best)."""
    m = _Bigram()
    out = generate_seq2seq(m, torch.zeros(1, 1, dtype=torch.long), 5, bos_token_id=m.BOS, eos_token_id=m.EOS,
                           num_beams=2, length_penalty=length_penalty)
    assert out.tolist() == [[m.BOS, m.EOS]]
