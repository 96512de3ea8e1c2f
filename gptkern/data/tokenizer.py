"""Tokenizers with one interface: byte-level (no files), BPE trained locally, GPT-2's from a directory.

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_id``, ``save(directory)`` and is restored by :func:`load_tokenizer`. The saved form is
``gptkern_tokenizer.json`` (the kind) plus, for BPE kinds, Hugging Face's ``tokenizer.json``.
``decode`` drops the EOS id and raises ``ValueError`` for an id outside the vocabulary.
"""
from __future__ import annotations

import codecs
import json
import operator
import os
import re
from pathlib import Path
from typing import Iterable, Sequence, Union

from gptkern._files import write_atomic

EOS = "<|endoftext|>"
META_FILE = "gptkern_tokenizer.json"
HF_FILE = "tokenizer.json"
TOKENIZER_FILES = (META_FILE, HF_FILE, "vocab.json", "merges.txt")  # what a model directory's tokenizer may be
_SURROGATE = re.compile("[\ud800-\udfff]")
# The largest BPE vocabulary trained here: 64 times the largest LLM vocabularies (~256K ids), beyond any
# real use; the tokenizers library's trainer preallocates ~66 bytes per id and aborts the process (no
# Python error) when that allocation fails (2**32 ids: 283 GB).
MAX_BPE_VOCAB = 2**24


def _check_id(i, vocab_size: int, name: str) -> int:
    i = operator.index(i)  # ints, numpy and 0-d tensor ints; not floats
    if not 0 <= i < vocab_size:
        raise ValueError(f"token id {i} is out of range for the {name} tokenizer (ids 0 to {vocab_size - 1})")
    return i


def _surrogate_or_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    """A UTF-8 decode error handler: an encoded surrogate as ``surrogatepass`` decodes it, anything
    else as ``replace`` does (a global fallback to ``replace`` would change text before the error)."""
    try:
        return codecs.lookup_error("surrogatepass")(err)
    except UnicodeDecodeError:
        return codecs.lookup_error("replace")(err)


_SURROGATE_OR_REPLACE = "gptkern.surrogatepass_or_replace"
codecs.register_error(_SURROGATE_OR_REPLACE, _surrogate_or_replace)


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then ``<|endoftext|>`` (256). Needs no files; any string and any
    byte sequence round-trips (strings with lone surrogates too, via ``surrogatepass``)."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``, ``<|endoftext|>`` dropped; ValueError for an id outside 0-256."""
        return bytes(i for i in (_check_id(i, self.vocab_size, "byte") for i in ids) if i != self.eos_id)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids (``<|endoftext|>`` dropped): encoded lone surrogates come back as
        themselves, other invalid UTF-8 as U+FFFD, each where it stands (so the text of a prefix of
        ``ids`` is a prefix of the text of ``ids``, but for a character still incomplete at its end)."""
        return self.decode_bytes(ids).decode("utf-8", errors=_SURROGATE_OR_REPLACE)

    def save(self, directory: Union[str, os.PathLike]) -> None:
        write_atomic(str(Path(directory) / META_FILE), json.dumps({"kind": self.kind}) + "\n")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` byte-level BPE: trained here (kind ``bpe``) or GPT-2's (``gpt2``).

    Lone surrogates (``"\\ud800"``, which UTF-8 cannot hold) are encoded as U+FFFD, one per code point,
    so such text does not round-trip (the byte tokenizer's does)."""

    def __init__(self, tokenizer, kind: str):
        self.tokenizer, self.kind = tokenizer, kind
        eos = tokenizer.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"the tokenizer has no {EOS} token")
        self.eos_id = eos
        # the largest id + 1: a tokenizer.json may skip ids, and then its token count is too few
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(tokenizer.get_vocab_size(), max(ids, default=-1) + 1)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` read as plain text: a literal ``<|endoftext|>`` in it is not the EOS id (as
        with the byte tokenizer; EOS ids are added by whoever ends a document)."""
        self.tokenizer.encode_special_tokens = True  # set per call: a pickled copy (a worker's) drops it
        # no post-processor template either: a tokenizer.json's BOS / EOS template would put
        # special ids inside a document that prepare cuts into pieces
        return self.tokenizer.encode(_no_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (EOS dropped); ValueError for an id outside the vocabulary."""
        ids = [_check_id(i, self.vocab_size, self.kind) for i in ids]
        return self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=False)

    def save(self, directory: Union[str, os.PathLike]) -> None:
        directory = Path(directory)
        write_atomic(str(directory / HF_FILE), self.tokenizer.to_str())
        write_atomic(str(directory / META_FILE), json.dumps({"kind": self.kind}) + "\n")


def _no_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD: the tokenizers library takes only UTF-8."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of ``vocab_size`` ids (at least 257: the 256 bytes and EOS) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 257 <= vocab_size <= MAX_BPE_VOCAB:
        raise ValueError(f"vocab_size must be from 257 (256 bytes + {EOS}) to 2**24 = {MAX_BPE_VOCAB}, "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((_no_surrogates(t) for t in texts), trainer)
    return HFTokenizer(tokenizer, "bpe")


def _read_hf(path: Path, kind: str) -> HFTokenizer:
    """The tokenizer in a Hugging Face ``tokenizer.json``, with errors naming the file."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception
        raise ValueError(f"{path}: not a valid Hugging Face tokenizer file ({err})") from None
    try:
        return HFTokenizer(tokenizer, kind)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def gpt2_tokenizer(directory: Union[str, os.PathLike]) -> HFTokenizer:
    """GPT-2's tokenizer from ``tokenizer.json``, or from ``vocab.json`` plus ``merges.txt``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory = Path(directory)
    if (directory / HF_FILE).is_file():
        return _read_hf(directory / HF_FILE, "gpt2")
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(f"{directory} holds neither tokenizer.json nor vocab.json + merges.txt")
    try:
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as err:
        raise ValueError(f"{vocab} + {merges}: not a valid GPT-2 vocabulary and merges ({err})") from None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    try:
        return HFTokenizer(tokenizer, "gpt2")
    except ValueError as err:
        raise ValueError(f"{vocab}: {err}") from None


def load_tokenizer(directory: Union[str, os.PathLike]):
    """The tokenizer saved in ``directory`` (``gptkern_tokenizer.json``), or GPT-2's files there."""
    directory = Path(directory)
    meta = directory / META_FILE
    if not meta.is_file():
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} not found: no such tokenizer directory")
        if not any((directory / name).is_file() for name in (HF_FILE, "vocab.json")):
            raise FileNotFoundError(f"{meta} not found: {directory} holds no saved tokenizer (written by gptkern "
                                    f"prepare or save_pretrained) and no GPT-2 tokenizer.json or vocab.json")
        return gpt2_tokenizer(directory)
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{meta}: not valid JSON ({err})") from None
    kind = saved.get("kind") if isinstance(saved, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "gpt2"):
        return _read_hf(directory / HF_FILE, kind)
    raise ValueError(f"{meta}: unknown tokenizer kind {kind!r} (expected byte, bpe or gpt2)")


def make_tokenizer(spec: str, texts: Sequence[str] = (), vocab_size: int = 8192):
    """``byte``, ``bpe`` (trained on ``texts``) or ``gpt2-dir:DIR``."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return train_bpe(texts, vocab_size)
    if spec.startswith("gpt2-dir:"):
        return gpt2_tokenizer(spec.split(":", 1)[1])
    raise ValueError(f"tokenizer must be byte, bpe or gpt2-dir:DIR, got {spec!r}")
