"""Tokenizers (round trips, save/load) and gptkern model directories (save/load, atomic files)."""
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gptkern.data import ByteTokenizer, load_tokenizer, make_tokenizer, train_bpe
from gptkern.models import GPT, GPTConfig
from gptkern.models.io import load_pretrained, save_pretrained

CORPUS = ["the quick brown fox jumps over the lazy dog\n" * 20, "ünïcödé ✓ 𝄞 text, numbers 12345", "def f(x):\n    return x"]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.binary())
def test_byte_tokenizer_round_trips_raw_bytes(data):
    tok = ByteTokenizer()
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=24))
def test_byte_decode_of_a_prefix_is_a_prefix(data):
    """What is decoded stays decoded: the text of ids[:i] starts the text of ids (once its last
    character is complete), so streamed output never has to take back what it printed."""
    tok = ByteTokenizer()
    full = tok.decode(list(data))
    for i in range(len(data) + 1):
        part = tok.decode(list(data[:i]))
        while part.endswith("\ufffd"):  # possibly an incomplete character: not shown yet when streaming
            part = part[:-1]
        assert full.startswith(part), (data, i)


def test_byte_decode_keeps_surrogates_beside_invalid_bytes():
    tok = ByteTokenizer()
    assert tok.decode([0x41, 0xED, 0xA0, 0x80, 0x42, 0xFF, 0x43]) == "A\ud800B\ufffdC"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 320)


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


SURROGATE_TEXTS = ["\ud800", "a\udfffb", "\ud83d\ude00 two halves", "x\ud800y\udc00z", "ok text \udbff"]


def test_lone_surrogates(bpe):
    """st.text() draws no surrogates: explicit cases. The byte tokenizer round-trips them; BPE (UTF-8
    only) encodes each one as U+FFFD, and trains on text holding them."""
    for text in SURROGATE_TEXTS:
        assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
        assert bpe.decode(bpe.encode(text)) == re.sub("[\ud800-\udfff]", "\ufffd", text)
    tok = train_bpe(SURROGATE_TEXTS * 5, 280)
    assert tok.decode(tok.encode("a\udfffb")) == "a\ufffdb"


def test_decode_rejects_ids_outside_the_vocabulary(bpe):
    byte = ByteTokenizer()
    assert byte.decode([104, 256, 105]) == "hi" and byte.decode_bytes([104, 256]) == b"h"  # EOS dropped
    for bad in (257, 300, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range for the byte tokenizer"):
            byte.decode([104, bad])
        with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
            byte.decode_bytes([bad])
    assert bpe.decode(bpe.encode("the fox") + [bpe.eos_id]) == "the fox"
    for bad in (bpe.vocab_size, 99999, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range for the bpe tokenizer"):
            bpe.decode([0, bad])


def test_load_tokenizer_errors_name_the_file(tmp_path, bpe):
    bpe.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "truncat')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid Hugging Face tokenizer file"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid Hugging Face tokenizer file"):
        make_tokenizer(f"gpt2-dir:{tmp_path}")
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "gptkern_tokenizer.json").write_text('{"kind": ')
    with pytest.raises(ValueError, match=r"gptkern_tokenizer\.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "gptkern_tokenizer.json").write_text('["bpe"]')
    with pytest.raises(ValueError, match=r"gptkern_tokenizer\.json: unknown tokenizer kind None"):
        load_tokenizer(tmp_path)
    (tmp_path / "gptkern_tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"gptkern_tokenizer\.json not found: .* holds no saved tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothing not found"):
        load_tokenizer(tmp_path / "nothing")


def test_literal_eos_text_is_plain_text(bpe):
    """A literal <|endoftext|> in the text round-trips and is not the EOS id, as with the byte
    tokenizer (hypothesis draws string constants from the source, this one included)."""
    for tok in (bpe, ByteTokenizer()):
        text = "a <|endoftext|> b<|endoftext|>"
        ids = tok.encode(text)
        assert tok.eos_id not in ids and tok.decode(ids) == text


def test_bpe_learns_merges_and_saves(tmp_path, bpe):
    assert bpe.vocab_size <= 320 and bpe.eos_id is not None
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learned
    bpe.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.kind == "bpe" and again.encode("the lazy dog") == bpe.encode("the lazy dog")
    ByteTokenizer().save(tmp_path / "b")
    assert isinstance(load_tokenizer(tmp_path / "b"), ByteTokenizer)
    with pytest.raises(ValueError, match="257"):
        train_bpe(CORPUS, 100)
    with pytest.raises(ValueError, match="byte, bpe or gpt2-dir"):
        make_tokenizer("words")


def test_gpt2_tokenizer_from_vocab_and_merges(tmp_path, bpe):
    model = json.loads(bpe.tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = make_tokenizer(f"gpt2-dir:{tmp_path}")
    assert tok.encode("the quick brown fox") == bpe.encode("the quick brown fox")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        make_tokenizer(f"gpt2-dir:{tmp_path / 'none'}")


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_model_directory_round_trip(tmp_path, preset):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset, n_layer=2, vocab_size=257)).eval()
    save_pretrained(model, tmp_path, ByteTokenizer())
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    loaded, tokenizer = load_pretrained(tmp_path)
    assert isinstance(tokenizer, ByteTokenizer) and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == model.config.tie_weights


def test_model_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=2))
    save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.2"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT.from_hf"):
        load_pretrained(tmp_path)


def test_a_vocabulary_with_gaps_sizes_by_its_largest_id(tmp_path, bpe):
    """A vocab.json that skips ids (70000 with a few hundred tokens) has vocab_size = largest id + 1,
    so prepare picks a shard dtype that holds every id and decode accepts them all."""
    model = json.loads(bpe.tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    moved = next(t for t in vocab if len(t) > 1 and vocab[t] != bpe.eos_id)  # a merged token
    vocab[moved] = 70000
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = make_tokenizer(f"gpt2-dir:{tmp_path}")
    assert tok.vocab_size == 70001
    from gptkern.data.prepare import encode_array, token_dtype

    ids = encode_array(tok, moved.replace("\u0120", " ") * 3, token_dtype(tok.vocab_size))
    assert ids.dtype == np.uint32 and 70000 in ids.tolist()
    assert tok.decode([70000]) == tok.decode(tok.encode(moved.replace("\u0120", " ")))


def test_a_post_processor_template_adds_no_ids(tmp_path, bpe):
    """A tokenizer.json whose post-processor appends EOS (a BOS/EOS template): encode gives the
    text's ids alone, so prepare writes one EOS per document, not one per piece."""
    from tokenizers.processors import TemplateProcessing

    from gptkern.data.prepare import prepare

    eos = "<|endoftext|>"
    original = bpe.tokenizer.post_processor
    bpe.tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, bpe.eos_id)])
    try:
        (tmp_path / "tok").mkdir()
        bpe.tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    finally:
        bpe.tokenizer.post_processor = original
    tok = make_tokenizer(f"gpt2-dir:{tmp_path / 'tok'}")
    assert tok.encode("the fox") == bpe.encode("the fox") and bpe.eos_id not in tok.encode("the fox")
    (tmp_path / "doc.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    prepare([tmp_path / "doc.txt"], tmp_path / "out", f"gpt2-dir:{tmp_path / 'tok'}", val_fraction=0.0,
            piece_chars=20, progress=False)
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert (ids == bpe.eos_id).sum() == 1 and ids[-1] == bpe.eos_id
