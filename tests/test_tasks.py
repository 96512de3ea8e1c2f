"""Fine-tuning tasks learn small synthetic problems: classification and translation (string reversal)."""
import csv
import random
import subprocess
import sys

import pytest
import torch

from gptkern.data import ByteTokenizer
from gptkern.models import GPT, GPTConfig
from gptkern.models.io import save_pretrained
from gptkern.train.tasks import TaskConfig, finetune_classify, read_labelled_csv, read_pairs, train_seq2seq


def random_text(rng, low, high):
    return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(low, high)))


@pytest.fixture
def classification_files(tmp_path):
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig.from_name("gpt2-tiny", n_layer=2, n_embd=64, vocab_size=257, block_size=64)),
                    tmp_path / "ckpt", ByteTokenizer())
    rng = random.Random(0)
    for name, n in (("train", 1000), ("val", 200)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for _ in range(n):
                text = random_text(rng, 5, 16)
                writer.writerow([text, "yes" if "h" in text[:3] else "no"])  # a rule over the first characters
    return tmp_path


def test_classifier_learns_a_rule(classification_files):
    d = classification_files
    result = finetune_classify(str(d / "ckpt"), str(d / "train.csv"), str(d / "val.csv"),
                               TaskConfig(steps=150, batch_size=32, lr=2e-3))
    assert result["labels"] == ["no", "yes"]
    assert result["accuracy"] >= 0.9


def test_seq2seq_learns_to_reverse(tmp_path):
    rng = random.Random(0)
    words = [random_text(rng, 3, 7) for _ in range(800)]
    (tmp_path / "pairs.tsv").write_text("\n".join(f"{w}\t{w[::-1]}" for w in words) + "\n")
    result = train_seq2seq(str(tmp_path / "pairs.tsv"), TaskConfig(steps=300, batch_size=32, lr=2e-3, max_len=16,
                                                                   num_beams=2), n_embd=64, n_layer=2)
    assert result["exact_match"] >= 0.9, result["examples"]


def test_task_input_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("sentence,label\nhi,1\n")
    with pytest.raises(ValueError, match="bad.csv: needs the columns text and label"):
        read_labelled_csv(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        read_pairs(str(tmp_path / "bad.tsv"))
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(str(tmp_path / "empty.tsv"))


def test_finetune_command(classification_files):
    d = classification_files
    result = subprocess.run([sys.executable, "-m", "gptkern", "finetune", "classify", "--init", str(d / "ckpt"),
                             "--data", str(d / "train.csv"), "--val", str(d / "val.csv"), "--steps", "5",
                             "--batch-size", "8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation accuracy" in result.stdout
