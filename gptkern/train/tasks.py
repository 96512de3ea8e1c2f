"""Fine-tuning tasks: text classification (GPTForSequenceClassification from a pretrained GPT
checkpoint) and translation (Seq2SeqTransformer on tab-separated pairs, decoded with beam search)."""
from __future__ import annotations

import contextlib
import csv
import math
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from gptkern._backend import resolve_device
from gptkern.ops._checks import is_int
from gptkern.train.config import check_adamw_lr


@dataclass
class TaskConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_len: int = 64
    seed: int = 0
    device: str = "auto"  # auto: the CUDA device when there is one, else the CPU
    out_dir: Optional[str] = None
    num_beams: int = 4


def _check_config(c: TaskConfig, min_len: int) -> TaskConfig:
    """Values that would fail later (or silently do nothing) rejected up front; returns ``c`` with
    its device resolved (``auto``: CUDA when available)."""
    if isinstance(c.batch_size, bool) or not isinstance(c.batch_size, int) or c.batch_size < 1:
        raise ValueError(f"batch_size (--batch-size) must be a positive integer, got {c.batch_size!r}")
    if isinstance(c.max_len, bool) or not isinstance(c.max_len, int) or c.max_len < min_len:
        raise ValueError(f"max_len (--max-len) must be an integer of at least {min_len}, got {c.max_len!r}")
    if isinstance(c.steps, bool) or not isinstance(c.steps, int) or c.steps < 0:
        raise ValueError(f"steps (--steps) must be an integer >= 0, got {c.steps!r}")
    if not (isinstance(c.lr, (int, float)) and 0 < c.lr < float("inf")):
        raise ValueError(f"lr (--lr) must be a positive number, got {c.lr!r}")
    check_adamw_lr(c.lr, 0.9, c.weight_decay)  # _optimizer's AdamW: the default betas
    if not is_int(c.seed) or not 0 <= c.seed < 2**64:  # torch.manual_seed's range (of non-negative seeds)
        raise ValueError(f"seed (--seed) must be an integer in [0, 2**64), got {c.seed!r}")
    return replace(c, device=str(resolve_device(c.device)))


def _schedule(step: int, c: TaskConfig) -> float:
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    return c.lr * 0.5 * (1 + math.cos(math.pi * (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)))


def _optimizer(model, c: TaskConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0}],
                             lr=c.lr)


# ---------------------------------------------------------------- classification

@contextlib.contextmanager
def _no_csv_field_limit():
    """The csv module's field size limit (131072 characters by default, process-wide) lifted for the block:
    a long text is a valid cell."""
    old = csv.field_size_limit()
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # the limit is a C long: 32 bits on Windows
        csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_labelled_csv(path: str) -> list[tuple[str, str]]:
    """Rows of a CSV with ``text`` and ``label`` columns (UTF-8, with or without a byte order mark)."""
    with open(path, newline="", encoding="utf-8-sig") as f, _no_csv_field_limit():
        reader = csv.DictReader(f)
        rows = []
        try:
            if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: needs the columns text and label, got {reader.fieldnames}")
            for row in reader:
                if row["text"] is None or row["label"] is None:
                    raise ValueError(f"{path}:{reader.line_num}: a row without a text or a label: {row}")
                if any(field.strip() for field in row.get(None, ())):  # csv puts fields past the header's
                    # under None (empty ones, as from a trailing comma, are ignored)
                    raise ValueError(f"{path}:{reader.line_num}: a row with more fields than the header (quote a "
                                     f"text that holds commas): {row}")
                rows.append((row["text"], row["label"]))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a UTF-8 text file ({err})") from None
        except csv.Error as err:  # the inner reader's line: DictReader's counts only rows parsed without error
            raise ValueError(f"{path}:{reader.reader.line_num}: not a valid CSV row ({err})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _encode_batch(tokenizer, texts: list[str], max_len: int, pad_id: int, device):
    """Right-padded ids and mask (B, L); each text truncated to its last ``max_len`` tokens."""
    encoded = [tokenizer.encode(t)[-max_len:] or [pad_id] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, :len(e)] = torch.tensor(e)
        mask[row, :len(e)] = 1
    return ids.to(device), mask.to(device)


def finetune_classify(init: str, train_csv: str, val_csv: str, c: TaskConfig) -> dict:
    """Fine-tune a classifier from the gptkern checkpoint ``init``; returns val accuracy and labels."""
    from gptkern.models import GPTForSequenceClassification
    from gptkern.models.io import load_pretrained

    c = _check_config(c, 1)
    torch.manual_seed(c.seed)
    gpt, tokenizer = load_pretrained(init, device=c.device)
    if tokenizer is None:
        raise ValueError(f"{init} has no tokenizer files")
    train_rows, val_rows = read_labelled_csv(train_csv), read_labelled_csv(val_csv)
    labels = sorted({label for _, label in train_rows})
    if len(labels) < 2:
        raise ValueError(f"{train_csv}: every row has the label {labels[0]!r}; a classifier needs at least two labels")
    unknown = sorted({label for _, label in val_rows} - set(labels))
    if unknown:
        raise ValueError(f"{val_csv}: labels {unknown} never appear in {train_csv}")
    index = {label: i for i, label in enumerate(labels)}
    model = GPTForSequenceClassification.from_gpt(gpt, len(labels)).to(c.device).train()
    max_len = min(c.max_len, gpt.config.block_size)
    optimizer = _optimizer(model, c)
    order = random.Random(c.seed)
    for step in range(c.steps):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, c)
        batch = [train_rows[order.randrange(len(train_rows))] for _ in range(c.batch_size)]
        ids, mask = _encode_batch(tokenizer, [t for t, _ in batch], max_len, tokenizer.eos_id, c.device)
        target = torch.tensor([index[label] for _, label in batch], device=c.device)
        _, loss = model(ids, target, attention_mask=mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    accuracy = classification_accuracy(model, tokenizer, val_rows, index, max_len, c)
    return {"accuracy": accuracy, "labels": labels, "model": model}


@torch.no_grad()
def classification_accuracy(model, tokenizer, rows, index, max_len: int, c: TaskConfig) -> float:
    """The fraction of ``rows`` (text, label) that ``model`` labels right (on the model's device)."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in range(0, len(rows), c.batch_size):
        chunk = rows[start:start + c.batch_size]
        ids, mask = _encode_batch(tokenizer, [t for t, _ in chunk], max_len, tokenizer.eos_id, device)
        predicted = model(ids, attention_mask=mask)[0].argmax(-1).tolist()
        correct += sum(p == index[label] for p, (_, label) in zip(predicted, chunk))
    model.train()
    return correct / len(rows)


# ---------------------------------------------------------------- translation

BOS, EOS, PAD = 256, 257, 258  # byte-level ids + three specials


def read_pairs(path: str) -> list[tuple[str, str]]:
    """``source<TAB>target`` lines ("\\n" or "\\r\\n" ends a line; blank lines skipped); an empty source
    is an error naming ``file:line``."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # bytes: text mode would also end lines at "\r"
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err})") from None
    pairs = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if "\t" not in line and not line.strip():
            continue
        if line.count("\t") != 1:
            raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {line[:80]!r}")
        source, target = line.split("\t")
        if not source:
            raise ValueError(f"{path}:{number}: empty source before the tab")
        pairs.append((source, target))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def _byte_batch(texts: list[str], prefix: list[int], suffix: list[int], device, max_len: int):
    """Byte ids with ``prefix``/``suffix``, each text cut to fit ``max_len`` in all, right-padded."""
    room = max_len - len(prefix) - len(suffix)
    rows = [prefix + list(t.encode("utf-8"))[:room] + suffix for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids.to(device)


def train_seq2seq(pairs_tsv: str, c: TaskConfig, val_fraction: float = 0.1, n_embd: int = 128, n_layer: int = 2,
                  n_head: int = 4) -> dict:
    """Train a byte-level Seq2SeqTransformer on ``pairs_tsv``; beam-search the held-out pairs and
    return exact-match accuracy (and BLEU when sacrebleu is installed)."""
    from gptkern.models import Seq2SeqConfig, Seq2SeqTransformer

    c = _check_config(c, 3)  # a target holds BOS, at least one byte and EOS
    torch.manual_seed(c.seed)
    pairs = read_pairs(pairs_tsv)
    random.Random(c.seed).shuffle(pairs)
    if len(pairs) < 2:
        raise ValueError(f"{pairs_tsv}: needs at least 2 pairs (one to train on, one held out), got {len(pairs)}")
    n_val = min(len(pairs) - 1, max(1, int(len(pairs) * val_fraction)))
    val, train_pairs = pairs[:n_val], pairs[n_val:]
    model = Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=259, max_len=c.max_len, n_encoder_layer=n_layer,
                                             n_decoder_layer=n_layer, n_head=n_head, n_embd=n_embd)).to(c.device)
    optimizer = _optimizer(model, c)
    order = random.Random(c.seed + 1)
    model.train()
    for step in range(c.steps):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, c)
        batch = [train_pairs[order.randrange(len(train_pairs))] for _ in range(c.batch_size)]
        src = _byte_batch([s for s, _ in batch], [], [], c.device, c.max_len)
        tgt = _byte_batch([t for _, t in batch], [BOS], [EOS], c.device, c.max_len)
        logits = model(src, tgt[:, :-1], src == PAD)
        target = tgt[:, 1:].masked_fill(tgt[:, 1:] == PAD, -100)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    hypotheses = translate(model, [s for s, _ in val], c)
    references = [t for _, t in val]
    result = {"exact_match": sum(h == r for h, r in zip(hypotheses, references)) / len(val), "model": model,
              "examples": list(zip([s for s, _ in val], hypotheses, references))[:5]}
    try:
        import sacrebleu

        result["bleu"] = sacrebleu.corpus_bleu(hypotheses, [references]).score
    except ImportError:
        pass
    return result


@torch.no_grad()
def translate(model, sources: list[str], c: TaskConfig) -> list[str]:
    """Beam-search translations of ``sources`` (on the model's device)."""
    from gptkern.generation import generate_seq2seq

    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(sources), c.batch_size):
        chunk = sources[start:start + c.batch_size]
        src = _byte_batch(chunk, [], [], device, c.max_len)
        ids = generate_seq2seq(model, src, c.max_len - 2, bos_token_id=BOS, eos_token_id=EOS,
                               src_pad_mask=src == PAD, num_beams=c.num_beams, early_stopping=True, pad_token_id=PAD)
        for row in ids[:, 1:].tolist():
            row = row[:row.index(EOS)] if EOS in row else row
            out.append(bytes(t for t in row if t < 256).decode("utf-8", errors="replace"))
    return out


def main_classify(argv) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="gptkern finetune classify",
                                description="fine-tune a text classifier from a gptkern checkpoint")
    p.add_argument("--init", required=True, help="a gptkern checkpoint directory (with its tokenizer)")
    p.add_argument("--data", required=True, help="training CSV with text,label columns")
    p.add_argument("--val", required=True, help="validation CSV with text,label columns")
    _task_args(p)
    args = p.parse_args(argv)
    result = finetune_classify(args.init, args.data, args.val, _task_config(args))
    print(f"validation accuracy {100 * result['accuracy']:.1f}% over labels {result['labels']}")
    return 0


def main_seq2seq(argv) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="gptkern train seq2seq",
                                description="train a byte-level translation model on source<TAB>target pairs")
    p.add_argument("--data", required=True, help="a TSV file of source<TAB>target lines")
    _task_args(p)
    args = p.parse_args(argv)
    result = train_seq2seq(args.data, _task_config(args))
    for source, hypothesis, reference in result["examples"]:
        print(f"{source!r} -> {hypothesis!r} (reference {reference!r})")
    bleu = f", BLEU {result['bleu']:.1f}" if "bleu" in result else " (install sacrebleu for BLEU)"
    print(f"exact match {100 * result['exact_match']:.1f}%{bleu}", file=sys.stdout)
    return 0


def _task_args(p) -> None:
    p.add_argument("--steps", type=int, default=TaskConfig.steps)
    p.add_argument("--batch-size", type=int, default=TaskConfig.batch_size)
    p.add_argument("--lr", type=float, default=TaskConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--max-len", type=int, default=TaskConfig.max_len,
                   help="tokens per sequence; longer texts are cut (default 64)")


def _task_config(args) -> TaskConfig:
    return TaskConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      device=args.device, max_len=args.max_len)
