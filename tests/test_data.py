"""The data pipeline: the embedded corpus, ``gptkern prepare`` (token shards, meta.json, errors),
``TokenLoader`` (windows, determinism, resume, ranks) and ``document_bounds``."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import gptkern
from gptkern.data import ByteTokenizer, TokenLoader, document_bounds, load_tokenizer, read_meta, train_bpe
from gptkern.data import corpus
from gptkern.data import prepare as prepare_module
from gptkern.data.prepare import prepare, progress_bar, split_documents, split_text, token_dtype, write_meta
from helpers import fsync_spy

JSONL_DOCS = [f"document number {i} about topic {'abcdefghij'[i]} with some words" for i in range(10)]
DOCS = [  # the documents of the tree below, in sorted path order
    "hello world\n" * 30,
    "# Notes\n\nsome markdown text with ünïcödé ✓ and tabs\there\n",
    "def f(x):\n    return x  # comment\n",
    "first json doc",
    "third 𝄞 doc\nwith a newline",
    *JSONL_DOCS,
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "sub").mkdir()
    (root / "a.txt").write_text(DOCS[0])
    (root / "b_notes.md").write_text(DOCS[1])
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / "sub" / "c.py").write_text(DOCS[2])
    lines = [json.dumps({"text": DOCS[3]}), "", json.dumps({"text": ""}), json.dumps({"text": DOCS[4], "id": 3})]
    (root / "sub" / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "sub" / "empty.txt").write_text("")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "sub" / ".hidden.txt").write_text("not read")
    (root / "sub" / "many.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in JSONL_DOCS))
    return root


def split_docs(out, split, tokenizer):
    """The documents of a shard, decoded, checking that each one ends with EOS."""
    meta = read_meta(out)
    tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    assert len(tokens) == meta["splits"][split]["tokens"]
    if len(tokens):
        assert tokens[-1] == tokenizer.eos_id
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    return [tokenizer.decode(part.tolist()) for part in np.split(tokens, ends + 1)[:-1]]


def expected_split(docs, fraction, seed):
    mask = split_documents(len(docs), fraction, seed)
    assert mask.any() and not mask.all()
    return [d for d, v in zip(docs, mask) if not v], [d for d, v in zip(docs, mask) if v]


# ---------------------------------------------------------------- corpus

def test_stdlib_corpus_is_deterministic_and_capped():
    corpus._documents.cache_clear()
    first = corpus.stdlib_corpus(max_chars=400_000)
    corpus._documents.cache_clear()
    assert corpus.stdlib_corpus(max_chars=400_000) == first
    assert sum(map(len, first)) == 400_000 and len(first) > 10  # the library has at least that much text
    assert all(d.startswith("Module ") for d in first)
    assert all(not d.startswith(("Module test.", "Module idlelib.idle_test")) for d in first)
    assert corpus.stdlib_corpus(max_chars=1000) == [first[0][:1000]]


def test_corpus_reads_docstrings_and_comments_and_skips_tests(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "b.py").write_text('#!/usr/bin/env python\n"""Module doc."""\n# first comment\n# goes on\n'
                                   'x = "# not a comment"\n\ndef f():\n    """F doc."""\n    # ----\n    return 1\n')
    (tmp_path / "pkg" / "__init__.py").write_text('"""Package doc."""\n')
    (tmp_path / "a_bad.py").write_text("def (:\n")
    (tmp_path / "test" / "t.py").write_text('"""Test doc."""\n')
    (tmp_path / "site-packages" / "s.py").write_text('"""Installed."""\n')
    assert corpus.stdlib_files(str(tmp_path)) == ["a_bad.py", "b.py", "pkg/__init__.py"]
    assert corpus.stdlib_corpus(root=str(tmp_path)) == [
        "Module b\n\nModule doc.\n\nfirst comment\ngoes on\n\nF doc.\n", "Module pkg\n\nPackage doc.\n"]


def test_corpus_skips_every_excluded_folder_and_reads_classes_and_async_functions(tmp_path):
    """tests, dist-packages, idle_test and __pycache__ are never entered, only .py files are read,
    a module without text or one that cannot be opened gives no document; class and async function
    docstrings count, cleaned of their indentation (blank ones do not), as do comments after line 1
    starting with '#!'."""
    for skipped in ("tests", "dist-packages", "idle_test", "__pycache__"):
        (tmp_path / "pkg" / skipped).mkdir(parents=True)
        (tmp_path / "pkg" / skipped / "x.py").write_text('"""Skipped."""\n')
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for name in ("z.py", "y.py", "a.py"):
        (tmp_path / "pkg" / name).write_text("x = 1\n")  # code only: no document
    (tmp_path / "stub.pyi").write_text('"""Stub."""\n')
    (tmp_path / "old.py.txt").write_text('"""Old."""\n')
    (tmp_path / "gone.py").symlink_to(tmp_path / "missing.py")  # cannot be opened: skipped
    (tmp_path / "m.py").write_text('# Header\nclass C:\n    """Class doc."""\n\n    async def run(self):\n'
                                   '        """Runs\n        twice."""\n\n    def g(self):\n        """   """\n'
                                   '#! not a shebang\n')
    assert corpus.stdlib_files(str(tmp_path)) == ["gone.py", "m.py", "pkg/__init__.py", "pkg/a.py", "pkg/y.py",
                                                  "pkg/z.py"]
    assert corpus.stdlib_corpus(root=str(tmp_path)) == [
        "Module m\n\nHeader\n\nClass doc.\n\nRuns\ntwice.\n\n! not a shebang\n"]
    with pytest.raises(ValueError, match="max_chars must be positive"):
        corpus.stdlib_corpus(max_chars=0, root=str(tmp_path))
    assert corpus.corpus_description(1000).endswith(", first 1000 characters")
    assert "first" not in corpus.corpus_description()


# ---------------------------------------------------------------- prepare

def test_token_dtype_fits_every_id():
    assert token_dtype(257) == np.uint16 and token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_split_documents_is_seeded():
    a = split_documents(100, 0.25, seed=1)
    assert a.sum() == 25 and np.array_equal(a, split_documents(100, 0.25, seed=1))
    assert not np.array_equal(a, split_documents(100, 0.25, seed=2))
    assert split_documents(3, 0.01, 0).sum() == 1 and split_documents(1, 0.5, 0).sum() == 0
    assert split_documents(5, 0.0, 0).sum() == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(5, 1.0, 0)


def test_prepare_byte_keeps_documents_in_order(tree, tmp_path):
    notes = []
    meta = prepare([tree], tmp_path, "byte", val_fraction=0.3, workers=2, seed=3, progress=False, log=notes.append)
    train, val = expected_split(DOCS, 0.3, 3)
    tok = ByteTokenizer()
    assert split_docs(tmp_path, "train", tok) == train and split_docs(tmp_path, "val", tok) == val
    for name, docs in (("train", train), ("val", val)):
        assert meta["splits"][name] == {"file": f"{name}.bin", "documents": len(docs),
                                        "tokens": sum(len(d.encode()) + 1 for d in docs)}
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["dtype"]) == ("byte", 257, 256, "uint16")
    assert read_meta(tmp_path) == meta == json.loads((tmp_path / "meta.json").read_text())
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    text = "\n".join(notes)
    assert "empty.txt" in text and "blob.bin" in text and "data.jsonl: skipped 1 line" in text
    assert not list(tmp_path.glob("*.tmp*"))


def test_prepare_bpe_is_independent_of_workers_and_pieces(tree, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    meta = prepare([tree], one, "bpe", vocab_size=300, val_fraction=0.3, workers=1, seed=3, progress=False)
    # Pieces of <= 32 characters cut at whitespace: the same BPE training and the same tokens.
    prepare([tree], two, "bpe", vocab_size=300, val_fraction=0.3, workers=2, seed=3, progress=False, piece_chars=32)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    tok = load_tokenizer(one)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"]) == ("bpe", tok.vocab_size, tok.eos_id)
    assert meta["vocab_size"] <= 300 and meta["dtype"] == "uint16"
    train, val = expected_split(DOCS, 0.3, 3)
    assert split_docs(one, "train", tok) == train and split_docs(one, "val", tok) == val
    assert meta["splits"]["train"]["tokens"] < sum(len(d.encode()) for d in train)  # merges were used
    notes = []  # a vocabulary the text cannot fill stops short, and says so
    big = prepare([tree], tmp_path / "big", "bpe", vocab_size=60000, workers=1, progress=False, log=notes.append)
    assert big["vocab_size"] < 60000
    assert any(f"stopped at {big['vocab_size']} of the 60000" in n for n in notes)


def test_split_text_cuts_at_pretoken_boundaries():
    # \x1c-\x1f are whitespace to Python's re but not to the tokenizers library's pre-tokenizer
    words = ["alpha", "be", "  gamma", "\n\ndelta", "12345", "e's", "\tzeta", "...", "ünï", "  \n x", " \x1cf",
             "\x1f\x1e g", "\u3000h", "\x85i"]
    text = "".join(words[(i * 5) % len(words)] for i in range(400))
    pieces = split_text(text, 64)  # the longest run without whitespace (26) fits in half a window
    assert "".join(pieces) == text and all(len(p) <= 64 for p in pieces) and len(pieces) > 25
    tok = train_bpe([text], 300)
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)
    assert split_text("x" * 100, 30) == ["x" * 30] * 3 + ["x" * 10]  # no whitespace: hard cuts
    separators = "abcdefghij \x1cklm \x1d\x1enop\x1f " * 20  # every cut must go before a space
    pieces = split_text(separators, 40)
    assert all(p.startswith(" ") for p in pieces[1:])
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(separators)


def test_prepare_huge_single_line_files(tmp_path):
    rng = np.random.default_rng(0)
    words = rng.choice(["lorem", "ipsum", "dolor", "sit", "amet,", "ünï"], size=600_000)
    spaced, solid = " ".join(words), "x" * 2_500_000  # ~3.5 MB and 2.5 MB, no newline
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(spaced)
    (tmp_path / "in" / "b.txt").write_text(solid)
    meta = prepare([tmp_path / "in"], tmp_path / "out", "byte", val_fraction=0, workers=2, progress=False)
    assert meta["splits"]["train"]["tokens"] == len(spaced.encode()) + len(solid) + 2
    assert split_docs(tmp_path / "out", "train", ByteTokenizer()) == [spaced, solid]


def test_prepare_embedded_corpus(tmp_path):
    meta = prepare([], tmp_path, "byte", val_fraction=0.1, workers=1, max_chars=50_000, progress=False)
    docs = corpus.stdlib_corpus(max_chars=50_000)
    assert "embedded corpus" in meta["source"]
    assert sum(s["documents"] for s in meta["splits"].values()) == len(docs)
    assert sum(s["tokens"] for s in meta["splits"].values()) == sum(len(d.encode()) + 1 for d in docs)


def test_prepare_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not a valid JSON line"):
        prepare([bad], tmp_path / "o", progress=False)
    bad.write_text('{"text": "ok"}\n{"txt": "wrong field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object with a string field 'text'"):
        prepare(str(bad), tmp_path / "o", progress=False)  # one path, not in a list
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        prepare([bad], tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match=r"input .*nope\.txt does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.md").write_text("  \n\n")
    (tmp_path / "empty" / "c.txt").write_bytes(b"\xef\xbb\xbf \r\n")  # a byte order mark alone
    with pytest.raises(ValueError, match="no text to tokenize"):
        prepare([tmp_path / "empty"], tmp_path / "o", progress=False, log=lambda m: None)
    (tmp_path / "x.bin").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match=r"x\.bin is not a UTF-8 text file"):
        prepare([tmp_path / "x.bin"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "meta.json").exists()


def test_meta_round_trip_and_checks(tmp_path):
    meta = {"format": "gptkern-tokens", "version": 1, "tokenizer": "bpe", "vocab_size": 70000, "eos_id": 0,
            "dtype": "uint32", "splits": {"train": {"file": "train.bin", "tokens": 5, "documents": 1}},
            "source": "x", "val_fraction": 0.0, "seed": 0}
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta
    write_meta(tmp_path, {**meta, "dtype": "uint16"})
    with pytest.raises(ValueError, match="dtype 'uint16' does not match vocab_size 70000"):
        read_meta(tmp_path)
    write_meta(tmp_path, {k: v for k, v in meta.items() if k != "eos_id"})
    with pytest.raises(ValueError, match=r"meta\.json: missing field 'eos_id'"):
        read_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"meta\.json not found"):
        read_meta(tmp_path / "nothing")


META = {"format": "gptkern-tokens", "version": 1, "tokenizer": "byte", "vocab_size": 257, "eos_id": 256,
        "dtype": "uint16", "splits": {"train": {"file": "train.bin", "tokens": 40, "documents": 1}}}


@pytest.mark.parametrize("change, field", [
    ({"vocab_size": "257"}, "vocab_size"),
    ({"vocab_size": None}, "vocab_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"vocab_size": 257.0}, "vocab_size"),
    ({"vocab_size": 2**32 + 1}, "vocab_size"),
    ({"eos_id": "256"}, "eos_id"),
    ({"eos_id": 257}, "eos_id"),  # not an id of the vocabulary
    ({"eos_id": -1}, "eos_id"),
    ({"tokenizer": 3}, "tokenizer"),
    ({"splits": []}, "splits"),
    ({"splits": {"train": ["train.bin", 40, 1]}}, "splits.train"),
    ({"splits": {"train": {"file": "train.bin", "tokens": "40", "documents": 1}}}, "splits.train.tokens"),
    ({"splits": {"train": {"file": "train.bin", "tokens": False, "documents": 1}}}, "splits.train.tokens"),
    ({"splits": {"train": {"file": "train.bin", "tokens": 40, "documents": None}}}, "splits.train.documents"),
    ({"splits": {"train": {"file": 5, "tokens": 40, "documents": 1}}}, "splits.train.file"),
])
def test_meta_fields_of_the_wrong_type_name_the_file(tmp_path, change, field):
    """A hand-edited or corrupt meta.json: an error naming the file and the field, never a TypeError."""
    np.arange(40, dtype=np.uint16).tofile(tmp_path / "train.bin")
    write_meta(tmp_path, META)
    assert TokenLoader(tmp_path, "train", 8, 1).num_tokens == 40
    write_meta(tmp_path, {**META, **change})
    message = rf"{tmp_path / 'meta.json'}: field {field!r} must be .*, got "
    with pytest.raises(ValueError, match=message):
        read_meta(tmp_path)
    with pytest.raises(ValueError, match=message):
        TokenLoader(tmp_path, "train", 8, 1)


def test_meta_json_that_is_not_an_object(tmp_path):
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"meta\.json: not a JSON object"):
        read_meta(tmp_path)


def test_text_progress_bar():
    stream = io.StringIO()
    bar = progress_bar(10, "train", use_tqdm=False, stream=stream)
    bar.update(5)
    bar.update(5)
    bar.close()
    assert "train [" + "#" * 15 + "." * 15 + "]  50%" in stream.getvalue() and "#" * 30 + "] 100%" in stream.getvalue()


def test_cli_prepare_end_to_end(tmp_path):
    (tmp_path / "in.txt").write_text("tiny text for the command line\n")
    cmd = [sys.executable, "-m", "gptkern", "prepare", "--out", str(tmp_path / "out"), "--workers", "1"]
    ok = subprocess.run(cmd + ["--input", str(tmp_path / "in.txt"), "--val-fraction", "0"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "train 32 tokens (1 documents)" in ok.stdout
    assert read_meta(tmp_path / "out")["splits"]["train"]["tokens"] == 32
    bad = subprocess.run(cmd + ["--input", str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.txt does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_prepare_rejects_unusable_vocab_sizes(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("some text\n")
    for size in (0, 256, -5, 2**32 + 1):
        with pytest.raises(ValueError, match=rf"vocab_size \(--vocab-size\) must be .* got {size}"):
            prepare([tmp_path / "in.txt"], tmp_path / "out", "bpe", vocab_size=size, progress=False)
    assert not (tmp_path / "out").exists()
    argv = ["--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"), "--tokenizer", "bpe"]
    assert prepare_module.main(argv + ["--vocab-size", "0"]) == 2
    assert "error: vocab_size (--vocab-size) must be" in capsys.readouterr().err


def test_prepare_refuses_a_bpe_vocabulary_too_large_to_train(tmp_path):
    """The tokenizers library's trainer preallocates per id: 2**32 - 1 ids aborted the process (SIGABRT)."""
    (tmp_path / "in.txt").write_text("some text\n")
    with pytest.raises(ValueError, match=r"vocab_size \(--vocab-size\) must be .* to 2\*\*24 = 16777216 .*"
                                         r"got 16777217"):
        prepare([tmp_path / "in.txt"], tmp_path / "out", "bpe", vocab_size=2**24 + 1, progress=False)
    with pytest.raises(ValueError, match="vocab_size must be from 257 .* to 2\\*\\*24"):
        train_bpe(["some text"], 2**24 + 1)
    # in a subprocess: before the bound, this aborted the interpreter
    cmd = [sys.executable, "-m", "gptkern", "prepare", "--input", str(tmp_path / "in.txt"), "--out",
           str(tmp_path / "out"), "--tokenizer", "bpe", "--vocab-size", str(2**32 - 1)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "--vocab-size" in out.stderr and "got 4294967295" in out.stderr
    assert not (tmp_path / "out").exists()


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_reprepare_keeps_the_previous_dataset(tree, tmp_path, monkeypatch):
    out = tmp_path / "dsv"
    prepare([tree], out, "bpe", vocab_size=300, val_fraction=0.3, workers=1, seed=3, progress=False)
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    encode = prepare_module.encode_array

    def fail_on_val(tok, text, dtype):  # a failure while the val split is encoded, after train.bin
        if text == "other val":
            raise ValueError("encoding failed")
        return encode(tok, text, dtype)

    monkeypatch.setattr(prepare_module, "encode_array", fail_on_val)
    (tmp_path / "new.jsonl").write_text(json.dumps({"text": "other train"}) + "\n" + json.dumps({"text": "other val"}))
    with pytest.raises(ValueError, match="encoding failed"):
        prepare([tmp_path / "new.jsonl"], out, "byte", val_fraction=0.5, seed=3, workers=1, progress=False)
    assert split_documents(2, 0.5, 3).tolist() == [False, True]
    assert snapshot(out) == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert isinstance(load_tokenizer(out), gptkern.data.HFTokenizer)
    # A fresh folder is removed again when its first prepare fails.
    with pytest.raises(ValueError, match="encoding failed"):
        prepare([tmp_path / "new.jsonl"], tmp_path / "fresh" / "out", "byte", val_fraction=0.5, workers=1,
                progress=False)
    assert not (tmp_path / "fresh" / "out").exists()
    # A successful one replaces what prepare writes and leaves the other files alone; the staging
    # folder of a killed run (its process gone) is removed, a live process's is not.
    monkeypatch.undo()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (out / f".prepare-{dead}").mkdir()
    (out / f".prepare-{os.getppid()}").mkdir()
    meta = prepare([tmp_path / "new.jsonl"], out, "byte", val_fraction=0.5, seed=3, workers=1, progress=False)
    assert read_meta(out) == meta and meta["tokenizer"] == "byte" and isinstance(load_tokenizer(out), ByteTokenizer)
    assert split_docs(out, "val", ByteTokenizer()) == ["other val"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in out.iterdir()) == [f".prepare-{os.getppid()}", "gptkern_tokenizer.json",
                                                     "meta.json", "notes.txt", "tokenizer.json", "train.bin",
                                                     "val.bin"]


def test_prepare_does_not_read_its_output_folder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("first document")
    (tmp_path / "in" / "b.txt").write_text("second document")
    (tmp_path / "in" / "c.txt").write_text(" \n")  # empty: skipped, and not counted as a source file
    for _ in range(2):  # the second run finds the first one's meta.json, tokenizer files and shards
        meta = prepare([tmp_path / "in"], tmp_path / "in" / "out", "bpe", vocab_size=300, val_fraction=0,
                       workers=1, progress=False, log=lambda m: None)
        assert meta["splits"]["train"]["documents"] == 2
        assert meta["source"].startswith("2 documents from 2 file(s) (1 empty or binary file(s) skipped) in:")
    with pytest.raises(ValueError, match=r"input folder .*in is also the output folder"):
        prepare([tmp_path / "in"], tmp_path / "in", progress=False)


def test_prepare_lone_surrogates(tmp_path):
    """JSONL can hold lone surrogates ("\\ud800"): bytes keep them, BPE encodes them as U+FFFD."""
    docs = [f"doc {i} \ud800 and \udfff{'x' * i}" for i in range(6)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for kind, want in (("byte", docs), ("bpe", [d.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd")
                                                for d in docs])):
        prepare([tmp_path / "s.jsonl"], tmp_path / kind, kind, val_fraction=0.3, seed=1, workers=1, progress=False)
        tok = load_tokenizer(tmp_path / kind)
        train, val = expected_split(want, 0.3, 1)
        assert split_docs(tmp_path / kind, "train", tok) == train and split_docs(tmp_path / kind, "val", tok) == val


# ---------------------------------------------------------------- loader

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(1)
    for i in range(24):
        words = rng.choice(["red", "green", "blue", "cyan", "magenta", "7", "42", "."], size=int(rng.integers(5, 200)))
        (root / f"doc{i:02d}.txt").write_text(f"doc {i}: " + " ".join(words))
    out = root / "out"
    prepare([root], out, "byte", val_fraction=0.25, workers=1, progress=False)
    return out


def batches(loader, n, **kw):
    return [loader.next_batch(**kw) for _ in range(n)]


def test_loader_windows_come_from_the_shard(data_dir):
    loader = TokenLoader(data_dir, "train", block_size=16, batch_size=5)
    meta = read_meta(data_dir)
    assert (loader.vocab_size, loader.eos_id, loader.num_tokens) == (257, 256, meta["splits"]["train"]["tokens"])
    data = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    windows = np.lib.stride_tricks.sliding_window_view(data, 17)
    for x, y in batches(loader, 3):
        assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert (windows == row).all(axis=1).any()


def test_loader_resumes_exactly(data_dir):
    straight = batches(TokenLoader(data_dir, "train", 8, 4, seed=7), 6)
    first = TokenLoader(data_dir, "train", 8, 4, seed=7)
    part = batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    fresh = TokenLoader(data_dir, "train", 8, 4, seed=7)
    fresh.load_state_dict(state)
    for a, b in zip(straight, part + batches(fresh, 3)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(straight[0][0], straight[1][0])
    other = TokenLoader(data_dir, "train", 8, 4, seed=8).next_batch()
    assert not torch.equal(other[0], straight[0][0])
    with pytest.raises(ValueError, match="batch_size: saved 4, this loader 2"):
        TokenLoader(data_dir, "train", 8, 2, seed=7).load_state_dict(state)


def test_loader_ranks_read_disjoint_slices_of_one_global_batch(data_dir):
    whole = TokenLoader(data_dir, "train", 8, 6, seed=1)
    ranks = [TokenLoader(data_dir, "train", 8, 3, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for step in range(3):
        starts = [set(r._starts(step).tolist()) for r in ranks]
        assert len(starts[0]) == len(starts[1]) == 3 and not starts[0] & starts[1]
        x, _ = whole.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x) and not torch.equal(parts[0], parts[1])
    assert ranks[0].state_dict() == ranks[1].state_dict()
    # As many windows as rows in the global batch: the ranks share them out, each exactly once.
    block = read_meta(data_dir)["splits"]["val"]["tokens"] - 6
    tight = [TokenLoader(data_dir, "val", block, 3, rank=r, world_size=2)._starts(0).tolist() for r in (0, 1)]
    assert sorted(tight[0] + tight[1]) == list(range(6))
    with pytest.raises(ValueError, match="rank must be in"):
        TokenLoader(data_dir, "train", 8, 3, rank=2, world_size=2)


def test_loader_document_bounds_and_uint32(data_dir, tmp_path):
    x, y, cu, max_len = TokenLoader(data_dir, "val", 64, 3, seed=2).next_batch(with_doc_ids=True)
    assert torch.equal(x, TokenLoader(data_dir, "val", 64, 3, seed=2).next_batch()[0])
    want_cu, want_len = document_bounds(x, 256)
    assert torch.equal(cu, want_cu) and max_len == want_len and cu.dtype == torch.int32
    # A uint32 shard holds ids above 65535.
    tokens = np.arange(70_000, 70_040, dtype=np.uint32)
    tokens.tofile(tmp_path / "train.bin")
    write_meta(tmp_path, {"format": "gptkern-tokens", "tokenizer": "bpe", "vocab_size": 70_100, "eos_id": 70_099,
                          "dtype": "uint32", "splits": {"train": {"file": "train.bin", "tokens": 40, "documents": 1}}})
    x, y = TokenLoader(tmp_path, "train", 39, 1).next_batch()
    assert x[0].tolist() == tokens[:39].tolist() and y[0].tolist() == tokens[1:].tolist()


def test_loader_bad_input(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    val_tokens = read_meta(copy)["splits"]["val"]["tokens"]
    with pytest.raises(ValueError, match=rf"val\.bin: split 'val' has {val_tokens} tokens, fewer than "
                                         rf"block_size \+ 1 = {val_tokens + 1}"):
        TokenLoader(copy, "val", val_tokens, 1)
    TokenLoader(copy, "val", val_tokens - 1, 1).next_batch()  # one window: fits
    with pytest.raises(ValueError, match="has no split 'test'"):
        TokenLoader(copy, "test", 8, 1)
    with open(copy / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=rf"val\.bin holds 10 bytes, but meta\.json says {val_tokens} uint16"):
        TokenLoader(copy, "val", 4, 1)
    (copy / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.bin not found"):
        TokenLoader(copy, "val", 4, 1)
    (copy / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json not found"):
        TokenLoader(copy, "train", 4, 1)


@pytest.mark.gpu
def test_loader_on_cuda_matches_cpu(data_dir):
    gpu = TokenLoader(data_dir, "train", 32, 4, device="cuda").next_batch(with_doc_ids=True)
    cpu = TokenLoader(data_dir, "train", 32, 4).next_batch(with_doc_ids=True)
    assert gpu[0].is_cuda and gpu[2].is_cuda
    assert all(torch.equal(g.cpu(), c) for g, c in zip(gpu[:3], cpu[:3])) and gpu[3] == cpu[3]


# ---------------------------------------------------------------- document_bounds

def reference_bounds(x, eos):
    cu = [0]
    for r, row in enumerate(x.tolist()):
        for t, tok in enumerate(row):
            end = r * len(row) + t + 1
            if (tok == eos or t == len(row) - 1) and end != cu[-1]:
                cu.append(end)
    return cu


def test_document_bounds():
    x = torch.tensor([[1, 9, 2, 3], [9, 4, 5, 9]])
    cu, max_len = document_bounds(x, 9)
    assert cu.tolist() == [0, 2, 4, 5, 8] and cu.dtype == torch.int32 and max_len == 3
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        b, t = torch.randint(1, 5, (2,), generator=gen).tolist()
        x = torch.randint(0, 3, (b, t), generator=gen)
        cu, max_len = document_bounds(x, 0)
        assert cu.tolist() == reference_bounds(x, 0)
        assert max_len == int((cu[1:] - cu[:-1]).max())
    with pytest.raises(ValueError, match="non-empty"):
        document_bounds(torch.zeros(4, dtype=torch.long), 0)


def test_document_bounds_drive_varlen_attention():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([[5, 1, 0, 7, 3, 0, 2, 2], [4, 0, 0, 6, 6, 6, 1, 3]])
    cu, max_len = document_bounds(x, eos_id=0)
    q, k, v = (torch.randn(x.numel(), 2, 8, generator=gen) for _ in range(3))
    out = gptkern.ops.flash_attn_varlen(q, k, v, cu, cu, max_len, max_len, causal=True)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)),
                                                               is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref, atol=2e-5, rtol=2e-5)


def test_the_validation_split_always_leaves_a_training_document():
    from gptkern.data.prepare import split_documents

    for n_docs, fraction in ((1, 0.6), (3, 0.9), (10, 0.97)):
        val = split_documents(n_docs, fraction, seed=0)
        assert int(val.sum()) == max(n_docs - 1, 0) and int((~val).sum()) >= 1


def test_prepare_workers_takes_numpy_integers_and_refuses_other_types(tmp_path):
    import numpy as np

    from gptkern.data.prepare import prepare

    meta = prepare([], tmp_path / "a", "byte", max_chars=5_000, workers=np.int64(2), progress=False)
    assert meta["splits"]["train"]["tokens"] > 0
    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match="workers"):
            prepare([], tmp_path / "b", "byte", max_chars=5_000, workers=bad, progress=False)


def test_prepare_checks_seed_fraction_and_pieces_before_tokenizing(tmp_path):
    """numpy numbers are taken (and written to meta.json as plain numbers); other types and values
    are refused up front, naming the argument, not after the shards are written."""
    meta = prepare([], tmp_path / "a", "byte", max_chars=5_000, seed=np.int64(3), val_fraction=np.float32(0.5),
                   progress=False)
    assert type(meta["seed"]) is int and type(meta["val_fraction"]) is float
    assert read_meta(tmp_path / "a")["seed"] == 3
    for kwargs, error, match in ((dict(seed=-1), ValueError, "seed"), (dict(seed=1.5), TypeError, "seed"),
                                 (dict(seed=True), TypeError, "seed"),
                                 (dict(val_fraction="0.1"), TypeError, "val_fraction"),
                                 (dict(val_fraction=1.0), ValueError, "val_fraction"),
                                 (dict(piece_chars=0), ValueError, "piece_chars"),
                                 (dict(piece_chars=2.5), TypeError, "piece_chars")):
        with pytest.raises(error, match=match):
            prepare([], tmp_path / "b", "byte", max_chars=5_000, progress=False, **kwargs)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="tokenizer must be byte, bpe or gpt2-dir:DIR, got 'foo'"):
        prepare([tmp_path / "missing.txt"], tmp_path / "b", "foo", progress=False)  # before reading inputs
    for bad in (0, -1):  # a window of no characters never advanced: an endless loop
        with pytest.raises(ValueError, match="max_chars"):
            split_text("ab", bad)


def test_an_input_that_is_not_a_file_or_folder(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"pipe is not a regular file or a folder"):
        prepare([fifo], tmp_path / "o", progress=False)


def test_loader_arguments_are_ints_and_its_state_is_json(data_dir):
    loader = TokenLoader(data_dir, "train", np.int64(4), np.int32(2), seed=np.int64(5), rank=np.int64(0),
                         world_size=np.int64(1))
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["seed"] == 5 and state["block_size"] == 4
    for name in ("block_size", "batch_size", "seed", "rank", "world_size"):
        kwargs = dict(block_size=4, batch_size=2, seed=0, rank=0, world_size=1)
        for bad in (float(kwargs[name] or 1), True):
            with pytest.raises(TypeError, match=f"{name} must be an int"):
                TokenLoader(data_dir, "train", **{**kwargs, name: bad})
    with pytest.raises(ValueError, match="invalid step True"):
        loader.load_state_dict({**loader.state_dict(), "step": True})


def test_a_split_smaller_than_the_global_batch_deals_every_window_before_repeating(tmp_path):
    """3 windows for 2 ranks x 2 rows: every window is read at each step (none twice before all
    once), so the ranks never read the same window twice over."""
    write_meta_dir = tmp_path / "d"
    prepare([], write_meta_dir, "byte", max_chars=2_000, val_fraction=0.0, progress=False)
    n = read_meta(write_meta_dir)["splits"]["train"]["tokens"]
    block = n - 3  # windows start at 0, 1 or 2
    for step in range(5):
        rows = []
        for rank in range(2):
            loader = TokenLoader(write_meta_dir, "train", block, 2, seed=step, rank=rank, world_size=2)
            rows += loader._starts(0).tolist()
        assert sorted(rows[:3]) == [0, 1, 2], rows


# ---------------------------------------------------------------- durability, seeding, checks

def test_shards_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    (tmp_path / "in.txt").write_text("some text " * 20)
    synced = fsync_spy(monkeypatch)
    prepare([tmp_path / "in.txt"], tmp_path / "out", "byte", val_fraction=0, workers=1, progress=False)
    assert any(".tmp" in p and os.path.basename(p).startswith("train.bin") for p in synced), synced


def test_a_failed_install_leaves_no_meta_describing_a_mix(tmp_path, monkeypatch):
    for name, text in (("a.txt", "first " * 50), ("b.txt", "second " * 50)):
        (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    prepare([tmp_path / "a.txt"], out, "byte", val_fraction=0, workers=1, progress=False)
    real = os.replace

    def fail_on_val(src, dst, *a, **k):  # installing val.bin (after train.bin) fails
        if str(dst) == str(out / "val.bin"):
            raise OSError(5, "I/O error")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", fail_on_val)
    with pytest.raises(OSError):
        prepare([tmp_path / "b.txt"], out, "byte", val_fraction=0, workers=1, progress=False)
    monkeypatch.undo()
    # train.bin is the new one; a meta.json still there would describe the old one
    assert not (out / "meta.json").exists()


def test_whitespace_only_jsonl_texts_are_skipped(tmp_path):
    lines = [{"text": "real document one"}, {"text": "  \n\t "}, {"text": "real document two"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    notes = []
    meta = prepare([tmp_path / "d.jsonl"], tmp_path / "out", "byte", val_fraction=0, workers=1, progress=False,
                   log=notes.append)
    assert meta["splits"]["train"]["documents"] == 2
    assert any("skipped 1 line(s) with empty text" in n for n in notes)


def twin_split_dir(path):
    """Identical 200-token train and val shards."""
    tokens = np.arange(200, dtype=np.uint16) % 256
    tokens.tofile(path / "train.bin")
    tokens.tofile(path / "val.bin")
    split = {"tokens": 200, "documents": 1}
    write_meta(path, {"format": "gptkern-tokens", "tokenizer": "byte", "vocab_size": 257, "eos_id": 256,
                      "dtype": "uint16", "splits": {"train": {"file": "train.bin", **split},
                                                   "val": {"file": "val.bin", **split}}})
    return path


def test_the_split_name_seeds_the_window_draw(tmp_path):
    d = twin_split_dir(tmp_path)
    train_x = TokenLoader(d, "train", 8, 4, seed=0).next_batch()[0]
    val_x = TokenLoader(d, "val", 8, 4, seed=0).next_batch()[0]
    assert not torch.equal(train_x, val_x)


def test_a_shard_longer_than_meta_says_is_refused(tmp_path):
    d = twin_split_dir(tmp_path)
    with open(d / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=r"val\.bin holds 402 bytes, but meta\.json says 200 uint16"):
        TokenLoader(d, "val", 8, 1)


@pytest.mark.parametrize("step", [-1, "3", 2.0, None])
def test_an_invalid_saved_step_is_refused(tmp_path, step):
    d = twin_split_dir(tmp_path)
    loader = TokenLoader(d, "train", 8, 2)
    with pytest.raises(ValueError, match="invalid step"):
        loader.load_state_dict({**loader.state_dict(), "step": step})


def test_a_saved_gpt2_tokenizer_loads_back_as_gpt2(tmp_path):
    from gptkern.data import make_tokenizer

    bpe = train_bpe(["the quick brown fox jumps over the lazy dog\n" * 20], 300)
    model = json.loads(bpe.tokenizer.to_str())["model"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "src" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = make_tokenizer(f"gpt2-dir:{tmp_path / 'src'}")
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").kind == "gpt2"


# ---------------------------------------------------------------- contracts a mutation run found untested

def test_folder_files_are_read_in_relative_path_order(tmp_path):
    """Sorted by path inside the folder, not by file name: a/c.txt comes before b.txt."""
    from gptkern.data.prepare import read_documents

    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b.txt").write_text("second")
    (tmp_path / "in" / "a" / "c.txt").write_text("first")
    docs, source = read_documents([tmp_path / "in"], log=lambda m: None)
    assert docs == ["first", "second"] and source.startswith("2 documents from 2 file(s) in:")


def test_two_documents_and_a_small_fraction_still_give_one_validation_document():
    assert split_documents(2, 0.1, 0).sum() == 1 and split_documents(2, 0.0, 0).sum() == 0


def test_split_text_of_an_exact_multiple_has_no_empty_piece():
    assert split_text("x" * 90, 30) == ["x" * 30] * 3
    assert split_text("abc", 3) == ["abc"] and split_text("", 4) == [""]


@pytest.mark.parametrize("saved", [None, "true"])
def test_a_worker_pool_leaves_tokenizers_parallelism_as_it_was(tmp_path, monkeypatch, saved):
    if saved is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", saved)
    (tmp_path / "a.txt").write_text("some words " * 20)
    (tmp_path / "b.txt").write_text("other words " * 20)
    # more text than piece_chars: the pool is started
    meta = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", "byte", val_fraction=0, workers=2,
                   piece_chars=64, progress=False)
    assert meta["splits"]["train"]["documents"] == 2
    assert os.environ.get("TOKENIZERS_PARALLELISM") == saved


def test_read_meta_refuses_another_format_and_incomplete_splits(tmp_path):
    write_meta(tmp_path, {**META, "format": "other-tokens"})
    with pytest.raises(ValueError, match=r"meta\.json: format is 'other-tokens', expected 'gptkern-tokens'"):
        read_meta(tmp_path)
    write_meta(tmp_path, {**META, "splits": {"train": {"file": "train.bin", "tokens": 40}}})
    with pytest.raises(ValueError, match=r"meta\.json: split 'train' lacks \['documents'\]"):
        read_meta(tmp_path)
    write_meta(tmp_path, {**META, "splits": {"train": {"file": "", "tokens": 40, "documents": 1}}})
    with pytest.raises(ValueError, match=r"field 'splits\.train\.file' must be a file name, got ''"):
        read_meta(tmp_path)


def test_prepare_bpe_default_vocabulary_and_ignored_vocab_size_note(tmp_path):
    (tmp_path / "in.txt").write_text("tiny text for a tokenizer\n")
    notes = []
    meta = prepare([tmp_path / "in.txt"], tmp_path / "bpe", "bpe", val_fraction=0, workers=1, progress=False,
                   log=notes.append)
    assert meta["vocab_size"] < 8192 and any("of the 8192 asked for" in n for n in notes), notes
    notes.clear()
    prepare([tmp_path / "in.txt"], tmp_path / "byte", "byte", vocab_size=300, val_fraction=0, workers=1,
            progress=False, log=notes.append)
    assert any("--vocab-size is ignored by the byte tokenizer" in n for n in notes), notes


def test_max_chars_with_inputs_is_refused(tmp_path):
    (tmp_path / "in.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="max_chars caps the embedded corpus; it cannot be used with inputs"):
        prepare([tmp_path / "in.txt"], tmp_path / "out", max_chars=100, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "3", "null"])
def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path, line):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: expected a JSON object with a string field 'text'"):
        prepare([tmp_path / "d.jsonl"], tmp_path / "out", progress=False)


def test_cli_prepare_defaults_to_a_tenth_for_validation_and_quiet_hides_the_bars(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for i in range(10):
        (tmp_path / "in" / f"{i}.txt").write_text(f"document {i} " * 5)
    argv = ["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert prepare_module.main(argv + ["--quiet"]) == 0
    assert read_meta(tmp_path / "out")["splits"]["val"]["documents"] == 1
    assert read_meta(tmp_path / "out")["val_fraction"] == 0.1
    assert capsys.readouterr().err == ""
    # the module's own main: an input mistake is one line and status 2
    assert prepare_module.main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptkern prepare: error: input ") and "missing.txt does not exist" in err


def test_prepare_into_a_file_is_refused_before_reading(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"output .*afile exists and is not a folder"):
        prepare([tmp_path / "missing.txt"], tmp_path / "afile", progress=False)  # before the inputs are read


def test_a_failed_prepare_keeps_an_empty_output_folder_it_did_not_make(tmp_path, monkeypatch):
    (tmp_path / "in.txt").write_text("some text\n")
    (tmp_path / "out").mkdir()

    def fail(tok, text, dtype):
        raise ValueError("encoding failed")

    monkeypatch.setattr(prepare_module, "encode_array", fail)
    with pytest.raises(ValueError, match="encoding failed"):
        prepare([tmp_path / "in.txt"], tmp_path / "out", "byte", workers=1, progress=False)
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").iterdir()) == []
