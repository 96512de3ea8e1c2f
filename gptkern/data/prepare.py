"""``gptkern prepare``: text → token shards that :class:`gptkern.data.loader.TokenLoader` reads.

Reads text files, folders (recursively, in sorted order, binaries and hidden files skipped) and JSONL files (one
``{"text": ...}`` object per line), or the embedded corpus when no input is given; tokenizes the
documents in a process pool (output order does not depend on ``workers``); splits them into
train/val by a seeded draw; and writes, each file atomically (``meta.json`` last):

- ``train.bin``, ``val.bin``: the tokens as raw little-endian ``uint16`` (``uint32`` when an id can
  exceed 65535), every document followed by the tokenizer's EOS id; read them with ``np.memmap``;
- the tokenizer's files (``tokenizer.save(out)``, read back by ``load_tokenizer(out)``);
- ``meta.json``: tokenizer kind, ``vocab_size``, ``eos_id``, ``dtype``, per split the file, token
  and document counts, the source, ``val_fraction`` and ``seed``.

Everything is built in a hidden staging folder inside ``out`` and moved into place only once complete,
so a failed run leaves the previous dataset as it was; other files in ``out`` are left alone, and
``out`` is never read as input (a folder input that contains it skips it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import numbers
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from gptkern._files import write_atomic
from gptkern.data.tokenizer import MAX_BPE_VOCAB, ByteTokenizer, make_tokenizer
from gptkern.ops._checks import is_int

META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT = "gptkern-tokens"
PIECE_CHARS = 1 << 20  # documents are encoded in pieces of at most this many characters
JSONL_SUFFIXES = (".jsonl", ".ndjson")

# The last whitespace character of a run that is followed by a non-space: cutting just before it
# gives the same GPT-2 / byte-level BPE pre-tokens on both sides as the uncut text. Whitespace as
# the tokenizers library's pre-tokenizer sees it: Python's \s also takes \x1c-\x1f.
_LAST_CUT = re.compile(r"(?s:.*)[^\S\x1c-\x1f](?=\S|[\x1c-\x1f])")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"gptkern prepare: {msg}", file=sys.stderr)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id (0 .. vocab_size - 1) fits in it, else ``uint32``."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------- reading the inputs

def _jsonl_documents(path: Path, data: bytes, log: Log) -> list[str]:
    docs, empty = [], 0
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise ValueError(f"{path}:{lineno}: not a valid JSON line ({type(err).__name__}: {err})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a string field 'text'")
        if obj["text"].strip():
            docs.append(obj["text"])
        else:
            empty += 1
    if empty:
        log(f"note: {path}: skipped {empty} line(s) with empty text")
    return docs


def _file_documents(path: Path, named: bool, log: Log) -> list[str]:
    """A file's documents: one per JSONL line, else the whole file. Binaries named on the command
    line are an error; binaries found in a folder are skipped."""
    data = path.read_bytes()
    if not data.removeprefix(b"\xef\xbb\xbf").strip():  # a byte order mark alone counts as empty
        log(f"note: skipping empty file {path}")
        return []
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _jsonl_documents(path, data, log)
    try:
        if b"\0" in data[:8192]:
            raise UnicodeDecodeError("utf-8", data[:1], 0, 1, "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        if named:
            raise ValueError(f"{path} is not a UTF-8 text file") from None
        log(f"note: skipping binary file {path}")
        return []
    return [text]


def _inside(path: Path, folder: Path) -> Optional[tuple[str, ...]]:
    """The parts of ``folder`` relative to ``path`` (both resolved) when ``folder`` is ``path`` or inside it."""
    path, folder = path.resolve(), folder.resolve()
    return folder.relative_to(path).parts if folder.is_relative_to(path) else None


def read_documents(inputs: Sequence[Union[str, os.PathLike]], log: Log = _stderr,
                   exclude: Union[str, os.PathLike, None] = None) -> tuple[list[str], str]:
    """The documents of ``inputs`` (files and folders) in order, and a description of the source.
    Hidden files and folders (``.git``) inside an input folder are not read, nor the folder
    ``exclude`` (prepare's output folder); an input folder that is ``exclude`` is an error."""
    docs: list[str] = []
    files = skipped = 0  # files that gave documents; empty or binary files
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            skip = _inside(path, Path(exclude)) if exclude is not None else None
            if skip == ():
                raise ValueError(f"input folder {path} is also the output folder: its shards and meta.json would "
                                 f"be read as text on the next run; write the output to another folder")
            if skip and Path(exclude).exists():
                log(f"note: not reading the output folder {exclude} inside {path}")
            found = sorted((p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts)
                            and not (skip and p.relative_to(path).parts[:len(skip)] == skip)),
                           key=lambda p: p.relative_to(path).as_posix())
            for p in found:
                read = _file_documents(p, False, log)
                docs += read
                files, skipped = files + bool(read), skipped + (not read)
        elif path.is_file():
            read = _file_documents(path, True, log)
            docs += read
            files, skipped = files + bool(read), skipped + (not read)
        elif path.exists():
            raise ValueError(f"input {path} is not a regular file or a folder")
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    skipped_note = f" ({skipped} empty or binary file(s) skipped)" if skipped else ""
    return docs, (f"{len(docs)} documents from {files} file(s){skipped_note} in: "
                  f"{', '.join(str(i) for i in inputs)}")


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """A bool mask, True for validation documents: round(n_docs * val_fraction) of them (at least
    one when the fraction is positive and there are two documents or more, never all), drawn by a
    generator seeded with ``seed``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n_docs * val_fraction)
    if val_fraction > 0 and n_docs >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n_docs - 1, 0))
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return mask


# ---------------------------------------------------------------- tokenizing

def _check_piece_chars(value: object, name: str) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``max_chars`` characters, in linear time.

    Each cut is placed before the last whitespace character preceding a non-space within the
    second half of the window, so byte-level BPE gives the same tokens for the pieces as for the
    whole text; a window without such a place (one 20 MB "word") is cut at its end."""
    _check_piece_chars(max_chars, "max_chars")
    pieces, start, n = [], 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        m = _LAST_CUT.match(text, start + max_chars // 2, end)
        cut = m.end() - 1 if m else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_array(tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(dtype)
    return np.asarray(tokenizer.encode(text), dtype=dtype)


# A task is a list of (piece, ends_document); its result is the tokens, EOS after each document.
_worker: dict = {}


def _init_worker(tokenizer, dtype: np.dtype) -> None:
    _worker.update(tokenizer=tokenizer, dtype=dtype)


def _encode_task(task: list[tuple[str, bool]]) -> tuple[np.ndarray, int]:
    tok, dtype = _worker["tokenizer"], _worker["dtype"]
    eos = np.array([tok.eos_id], dtype=dtype)
    parts = []
    for piece, ends_doc in task:
        parts.append(encode_array(tok, piece, dtype))
        if ends_doc:
            parts.append(eos)
    return np.concatenate(parts), sum(len(p) for p, _ in task)


def _tasks(docs: Iterable[str], piece_chars: int) -> Iterator[list[tuple[str, bool]]]:
    task, size = [], 0
    for doc in docs:
        pieces = split_text(doc, piece_chars)
        for i, piece in enumerate(pieces):
            task.append((piece, i == len(pieces) - 1))
            size += len(piece)
            if size >= piece_chars:
                yield task
                task, size = [], 0
    if task:
        yield task


class _TextBar:
    """A plain progress bar on a stream, for when tqdm is not installed."""

    def __init__(self, total: int, desc: str, stream, width: int = 30):
        self.total, self.desc, self.stream, self.width = max(total, 1), desc, stream, width
        self.n, self.shown = 0, -1

    def update(self, n: int) -> None:
        self.n += n
        pct = min(100, self.n * 100 // self.total)
        if pct != self.shown:
            self.shown = pct
            fill = self.width * pct // 100
            self.stream.write(f"\r{self.desc} [{'#' * fill}{'.' * (self.width - fill)}] {pct:3d}%")
            self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, use_tqdm: bool = True, stream=None):
    """A bar with ``update(n)`` and ``close()``: tqdm's when installed, else :class:`_TextBar`."""
    stream = stream or sys.stderr
    if not enabled or total <= 0:
        return _NoBar()
    if use_tqdm:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="char", unit_scale=True, file=stream, leave=True)
        except ImportError:
            pass
    return _TextBar(total, desc, stream)


class _ShardWriter:
    """Appends arrays to ``path`` through a temporary file, synced and renamed on commit."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f"{path.name}.tmp{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(tokens.tobytes())
        self.tokens += len(tokens)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def _encoder(tokenizer, dtype: np.dtype, workers: int):
    """``map(task) -> results`` in task order: a fork (or spawn) pool, or in-process for 1 worker."""
    if workers <= 1:
        _init_worker(tokenizer, dtype)
        yield lambda tasks: map(_encode_task, tasks)
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    # Workers encode one text at a time; also silences tokenizers' warning about forking.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer, dtype))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield lambda tasks: pool.imap(_encode_task, tasks)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------- meta.json

def write_meta(out_dir: Union[str, os.PathLike], meta: dict) -> None:
    write_atomic(str(Path(out_dir) / META_FILE), json.dumps(meta, indent=2) + "\n")


def read_meta(data_dir: Union[str, os.PathLike]) -> dict:
    """``meta.json`` of a prepared folder, checked for the fields the loader needs."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the data first (gptkern prepare --out {data_dir})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object of fields")
    for key in ("format", "tokenizer", "vocab_size", "eos_id", "dtype", "splits"):
        if key not in meta:
            raise ValueError(f"{path}: missing field {key!r}")
    if meta["format"] != FORMAT:
        raise ValueError(f"{path}: format is {meta['format']!r}, expected {FORMAT!r}")

    def invalid(field: str, want: str, value) -> ValueError:
        return ValueError(f"{path}: field {field!r} must be {want}, got {value!r}")

    vocab_size, eos_id = meta["vocab_size"], meta["eos_id"]
    if not _is_count(vocab_size) or not 1 <= vocab_size <= 2**32:  # any tokenizer's, as token_dtype takes
        raise invalid("vocab_size", "an integer from 1 to 2**32", vocab_size)
    if not _is_count(eos_id) or eos_id >= vocab_size:
        raise invalid("eos_id", f"an integer from 0 to vocab_size - 1 = {vocab_size - 1}", eos_id)
    if not isinstance(meta["tokenizer"], str):
        raise invalid("tokenizer", "a string", meta["tokenizer"])
    if meta["dtype"] != token_dtype(vocab_size).name:
        raise ValueError(f"{path}: dtype {meta['dtype']!r} does not match vocab_size {vocab_size}")
    if not isinstance(meta["splits"], dict):
        raise invalid("splits", "an object of splits", meta["splits"])
    for name, split in meta["splits"].items():
        if not isinstance(split, dict):
            raise invalid(f"splits.{name}", "an object", split)
        missing = {"file", "tokens", "documents"} - set(split)
        if missing:
            raise ValueError(f"{path}: split {name!r} lacks {sorted(missing)}")
        if not isinstance(split["file"], str) or not split["file"]:
            raise invalid(f"splits.{name}.file", "a file name", split["file"])
        for key in ("tokens", "documents"):
            if not _is_count(split[key]):
                raise invalid(f"splits.{name}.{key}", "an integer >= 0", split[key])
    return meta


def _is_count(value) -> bool:
    """A JSON integer >= 0 (not a bool, a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------- the job

def _check_vocab_size(tokenizer: str, vocab_size: Optional[int], log: Log) -> Optional[int]:
    """The BPE vocabulary size to train (default 8192); None for the other tokenizers. An unknown
    tokenizer is refused here, before any input is read."""
    if not isinstance(tokenizer, str) or not (tokenizer in ("byte", "bpe") or tokenizer.startswith("gpt2-dir:")):
        raise ValueError(f"tokenizer must be byte, bpe or gpt2-dir:DIR, got {tokenizer!r}")
    if tokenizer != "bpe":
        if vocab_size is not None:
            log(f"note: --vocab-size is ignored by the {tokenizer} tokenizer")
        return None
    if vocab_size is None:
        return 8192
    if not is_int(vocab_size) or not 257 <= vocab_size <= MAX_BPE_VOCAB:  # ids above 65535: uint32 shards
        raise ValueError(f"vocab_size (--vocab-size) must be an integer from 257 (the 256 bytes and "
                         f"<|endoftext|>) to 2**24 = {MAX_BPE_VOCAB} for the bpe tokenizer, got {vocab_size!r}")
    return vocab_size


def _remove_dead_staging(out: Path) -> None:
    """Staging folders left in ``out`` by runs that were killed (their process is gone)."""
    for leftover in out.glob(".prepare-*"):
        pid = leftover.name[len(".prepare-"):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


def _install(staging: Path, out: Path) -> None:
    """Moves the finished files from ``staging`` into ``out``: ``meta.json`` is removed first and moved
    in last, so no ``meta.json`` ever describes a mix of old and new files."""
    with contextlib.suppress(FileNotFoundError):
        (out / META_FILE).unlink()
    for path in sorted(staging.iterdir()):
        if path.name != META_FILE:
            os.replace(path, out / path.name)
    os.replace(staging / META_FILE, out / META_FILE)


def prepare(inputs: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike], tokenizer: str = "byte",
            vocab_size: Optional[int] = None, val_fraction: float = 0.1, workers: Optional[int] = None,
            seed: int = 0, max_chars: Optional[int] = None, progress: bool = True,
            piece_chars: int = PIECE_CHARS, log: Log = _stderr) -> dict:
    """Tokenize ``inputs`` (the embedded corpus when empty, capped at ``max_chars``) into ``out_dir``;
    returns the meta written to ``meta.json``."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a folder")
    vocab_size = _check_vocab_size(tokenizer, vocab_size, log)
    if workers is not None and not is_int(workers):
        raise TypeError(f"workers (--workers) must be an integer, got {workers!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers (--workers) must be >= 1, got {workers!r}")
    if not is_int(seed) or seed < 0:
        raise (ValueError if is_int(seed) else TypeError)(f"seed (--seed) must be a non-negative integer, got {seed!r}")
    if not isinstance(val_fraction, numbers.Real) or isinstance(val_fraction, bool):
        raise TypeError(f"val_fraction (--val-fraction) must be a number, got {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction (--val-fraction) must be in [0, 1), got {val_fraction}")
    _check_piece_chars(piece_chars, "piece_chars")
    seed, val_fraction = int(seed), float(val_fraction)  # plain Python numbers in meta.json
    if inputs:
        if max_chars is not None:
            raise ValueError("max_chars caps the embedded corpus; it cannot be used with inputs")
        docs, source = read_documents(inputs, log, exclude=out)
    else:
        from gptkern.data.corpus import corpus_description, stdlib_corpus

        docs, source = stdlib_corpus(max_chars), corpus_description(max_chars)
    if not docs:
        raise ValueError(f"no text to tokenize in {', '.join(map(str, inputs))}: every file was empty or skipped")
    is_val = split_documents(len(docs), val_fraction, seed)
    if val_fraction > 0 and not is_val.any():
        log("note: a single document: val.bin stays empty")
    groups = {"train": [d for d, v in zip(docs, is_val) if not v], "val": [d for d, v in zip(docs, is_val) if v]}

    if tokenizer == "bpe":
        pieces = (p for d in groups["train"] for p in split_text(d, piece_chars))
        tok = make_tokenizer("bpe", pieces, vocab_size)
        if tok.vocab_size < vocab_size:
            log(f"note: the BPE vocabulary stopped at {tok.vocab_size} of the {vocab_size} asked for: the "
                f"training text has no more pairs to merge")
    else:
        tok = make_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    workers = default_workers() if workers is None else workers
    if sum(len(d) for d in docs) <= piece_chars:
        workers = 1  # one task: a pool would only cost its start-up

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(out)
    staging = out / f".prepare-{os.getpid()}"  # hidden: never read as input; same filesystem as out
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    installed = False
    try:
        meta = _write_dataset(staging, tok, dtype, workers, groups, piece_chars, progress,
                              {"source": source, "val_fraction": val_fraction, "seed": seed})
        _install(staging, out)
        installed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not installed:
            with contextlib.suppress(OSError):
                out.rmdir()  # the empty folder this failed run made
    return meta


def _write_dataset(out: Path, tok, dtype: np.dtype, workers: int, groups: dict, piece_chars: int, progress: bool,
                   extra: dict) -> dict:
    """Shards, the tokenizer's files and ``meta.json`` (last) in ``out``; returns the meta."""
    splits = {}
    with _encoder(tok, dtype, workers) as encode:
        for name in SPLITS:
            writer = _ShardWriter(out / f"{name}.bin")
            bar = progress_bar(sum(len(d) for d in groups[name]), f"{name}", enabled=progress)
            try:
                for tokens, chars in encode(_tasks(groups[name], piece_chars)):
                    writer.write(tokens)
                    bar.update(chars)
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
            writer.commit()
            splits[name] = {"file": f"{name}.bin", "tokens": writer.tokens, "documents": len(groups[name])}
    tok.save(out)
    meta = {"format": FORMAT, "version": 1, "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": dtype.name, "splits": splits, **extra}
    write_meta(out, meta)
    return meta


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptkern prepare", description="Tokenize text into train.bin / val.bin "
                                "token shards, meta.json and the tokenizer's files, for TokenLoader.")
    p.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH",
                   help="text files, folders or JSONL files (default: the embedded standard-library corpus)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for train.bin, val.bin, meta.json, tokenizer")
    p.add_argument("--tokenizer", default="byte", help="byte, bpe (trained on the train split) or gpt2-dir:DIR")
    p.add_argument("--vocab-size", type=int, default=None, help="for bpe (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents for val.bin")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: the usable CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val draw")
    p.add_argument("--max-chars", type=int, default=None, help="cap on the embedded corpus's size")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seed < 0:  # numpy's generator takes non-negative seeds
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        meta = prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.val_fraction, args.workers,
                       args.seed, args.max_chars, progress=not args.quiet)
    except (OSError, ValueError) as err:  # an input mistake: one line and status 2, as every gptkern command
        if os.environ.get("GPTKERN_TRACEBACK"):
            raise
        _stderr(f"error: {err} (GPTKERN_TRACEBACK=1 shows where)")
        return 2
    counts = ", ".join(f"{n} {s['tokens']} tokens ({s['documents']} documents)" for n, s in meta["splits"].items())
    print(f"wrote {args.out}: {counts}; {meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {meta['dtype']}")
    return 0
