"""Tokenizers (round trips, save/load) and gptkern model directories (save/load, atomic files)."""
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gptkern.data import ByteTokenizer, load_tokenizer, make_tokenizer, train_bpe
from gptkern.models import GPT, GPTConfig
from gptkern.models.io import load_pretrained, save_pretrained

CORPUS = ["the quick brown fox jumps over the lazy dog\n" * 20, "ünïcödé ✓ 𝄞 text, numbers 12345",
          "def f(x):\n    return x"]


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
    ids = bpe.encode("the fox")  # numpy and 0-d tensor ints are ids, floats are not
    assert bpe.decode([np.int64(i) for i in ids]) == bpe.decode([torch.tensor(i) for i in ids]) == "the fox"
    for tok in (byte, bpe):
        with pytest.raises(TypeError):
            tok.decode([104, 105.0])


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
    (tmp_path / "gptkern_tokenizer.json").write_bytes(b'{"kind": "\xff"}')  # not UTF-8
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
    for too_few in (100, 256):
        with pytest.raises(ValueError, match="257"):
            train_bpe(CORPUS, too_few)
    with pytest.raises(ValueError, match="byte, bpe or gpt2-dir"):
        make_tokenizer("words")


def test_gpt2_tokenizer_from_vocab_and_merges(tmp_path, bpe):
    model = json.loads(bpe.tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = make_tokenizer(f"gpt2-dir:{tmp_path}")
    assert tok.encode("the quick brown fox") == bpe.encode("the quick brown fox")
    assert load_tokenizer(tmp_path).encode("the quick brown fox") == bpe.encode("the quick brown fox")
    (tmp_path / "a:b").mkdir()  # a directory name with a colon
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "a:b" / name).write_text((tmp_path / name).read_text())
    assert make_tokenizer(f"gpt2-dir:{tmp_path / 'a:b'}").encode("the fox") == bpe.encode("the fox")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        make_tokenizer(f"gpt2-dir:{tmp_path / 'none'}")
    tok.save(tmp_path / "saved")  # saved and loaded as GPT-2's kind
    again = load_tokenizer(tmp_path / "saved")
    assert again.kind == "gpt2" and again.encode("the lazy dog") == bpe.encode("the lazy dog")
    (tmp_path / "merges.txt").unlink()  # vocab.json alone is not GPT-2's tokenizer
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer.json nor vocab.json \+ merges.txt"):
        make_tokenizer(f"gpt2-dir:{tmp_path}")


def test_special_tokens_other_than_eos_decode_as_their_text(bpe):
    """decode drops the EOS id only: another special token of a tokenizer.json is text."""
    from tokenizers import Tokenizer

    from gptkern.data.tokenizer import HFTokenizer

    inner = Tokenizer.from_str(bpe.tokenizer.to_str())
    inner.add_special_tokens(["<|pad|>"])
    tok = HFTokenizer(inner, "bpe")
    pad = inner.token_to_id("<|pad|>")
    assert tok.decode(bpe.encode("the fox") + [pad, tok.eos_id]) == "the fox<|pad|>"


def test_a_tokenizer_without_eos_is_named(tmp_path):
    from tokenizers import Tokenizer, models

    (tmp_path / "gptkern_tokenizer.json").write_text(json.dumps({"kind": "bpe"}))
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: the tokenizer has no <\|endoftext\|> token"):
        load_tokenizer(tmp_path)


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


def _random_text(n):
    return "".join(random.choice("ab é中\n{}") for _ in range(n))


def test_write_atomic_syncs_the_whole_text_before_the_rename(tmp_path, monkeypatch):
    """write_atomic makes the missing folders, fsyncs its temporary file with all the text in it
    before the rename, and leaves no temporary file, also when the rename fails (the old file stays)."""
    from gptkern._files import write_atomic

    path, text = tmp_path / "new" / "deeper" / "f.json", _random_text(300)
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd).st_size, path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(str(path), text)
    assert synced == [(len(text.encode("utf-8")), False)]
    assert path.read_text(encoding="utf-8") == text and os.listdir(path.parent) == ["f.json"]

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(str(path), _random_text(50))
    assert path.read_text(encoding="utf-8") == text and os.listdir(path.parent) == ["f.json"]


def test_read_json_object_names_a_file_that_is_not_utf8(tmp_path):
    from gptkern._files import read_json_object

    (tmp_path / "c.json").write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"c\.json is corrupt: not valid JSON"):
        read_json_object(tmp_path / "c.json")


def test_weights_files_are_whole_names():
    """Only whole weights file names are replaced by a new save: a user's backup named after one stays."""
    from gptkern._files import is_weights_file

    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"):
        assert is_weights_file(name), name
    for name in ("model.safetensors.bak", "pytorch_model.bin.old", "model.safetensors.index.json~", "notes.txt",
                 "my_model.bin"):
        assert not is_weights_file(name), name


def test_save_into_directory_from_inside_it_and_over_a_leftover(tmp_path, monkeypatch):
    """A working directory anywhere inside the target is kept (the target is updated in place); a
    swap folder left by a save that died is no obstacle."""
    from gptkern._files import save_into_directory

    out, text = tmp_path / "out", _random_text(40)
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "data.txt").write_text(text, encoding="utf-8")
    (out / "old.txt").write_text("old")

    def write(folder):
        (folder / "a.txt").write_text(text, encoding="utf-8")

    monkeypatch.chdir(out / "sub")
    save_into_directory(out, write, keep=lambda name: name != "old.txt")
    assert Path.cwd() == out / "sub" and (out / "sub" / "data.txt").read_text(encoding="utf-8") == text
    assert sorted(os.listdir(out)) == ["a.txt", "sub"]
    monkeypatch.chdir(tmp_path)
    leftover = tmp_path / f".out.old-{os.getpid()}"
    (leftover / "x").mkdir(parents=True)
    save_into_directory(out, write, keep=lambda name: True)
    assert sorted(os.listdir(out)) == ["a.txt", "sub"] and sorted(os.listdir(tmp_path)) == ["out"]
