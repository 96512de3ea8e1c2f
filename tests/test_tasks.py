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
                               TaskConfig(steps=150, batch_size=32, lr=2e-3, device="cpu"))  # the issue: a CPU minute
    assert result["labels"] == ["no", "yes"]
    assert result["accuracy"] >= 0.9


def test_seq2seq_learns_to_reverse(tmp_path):
    rng = random.Random(0)
    words = [random_text(rng, 3, 7) for _ in range(800)]
    (tmp_path / "pairs.tsv").write_text("\n".join(f"{w}\t{w[::-1]}" for w in words) + "\n")
    result = train_seq2seq(str(tmp_path / "pairs.tsv"), TaskConfig(steps=300, batch_size=32, lr=2e-3, max_len=16,
                                                                   num_beams=2, device="cpu"), n_embd=64, n_layer=2)
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
    (tmp_path / "bom.csv").write_bytes("text,label\r\nhi,a\r\n".encode("utf-8-sig"))  # Excel's UTF-8 CSV
    assert read_labelled_csv(str(tmp_path / "bom.csv")) == [("hi", "a")]


def test_read_pairs_splits_lines_at_newlines_only(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_bytes("\ufeffpage\x0cbreak\tkaerb\r\na\u2028b\x1cc\x85\tx\n\nlast\tone".encode())
    assert read_pairs(str(path)) == [("page\x0cbreak", "kaerb"), ("a\u2028b\x1cc\x85", "x"), ("last", "one")]
    path.write_text("a\x0cb\tc\nd\u2028e\tf\n\tempty source\n")
    with pytest.raises(ValueError, match=r"p\.tsv:3: empty source"):
        read_pairs(str(path))
    path.write_text("a\tb\n\t\n")
    with pytest.raises(ValueError, match=r"p\.tsv:2: empty source"):
        read_pairs(str(path))


def test_task_config_errors(tmp_path):
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, vocab_size=257, block_size=16)),
                    tmp_path / "ckpt", ByteTokenizer())
    (tmp_path / "one.csv").write_text("text,label\nhello,a\nworld,a\n")
    (tmp_path / "pairs.tsv").write_text("ab\tba\ncd\tdc\n")
    args = (str(tmp_path / "ckpt"), str(tmp_path / "one.csv"), str(tmp_path / "one.csv"))
    with pytest.raises(ValueError, match=r"one\.csv: every row has the label 'a'; .* at least two labels"):
        finetune_classify(*args, TaskConfig(steps=1))
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"batch_size \(--batch-size\) must be a positive integer, got {bad}"):
            finetune_classify(*args, TaskConfig(steps=1, batch_size=bad))
        with pytest.raises(ValueError, match=rf"max_len \(--max-len\) must be an integer of at least 1, got {bad}"):
            finetune_classify(*args, TaskConfig(steps=1, max_len=bad))
        with pytest.raises(ValueError, match=r"batch_size \(--batch-size\)"):
            train_seq2seq(str(tmp_path / "pairs.tsv"), TaskConfig(steps=1, batch_size=bad))
    with pytest.raises(ValueError, match=r"max_len \(--max-len\) must be an integer of at least 3, got 2"):
        train_seq2seq(str(tmp_path / "pairs.tsv"), TaskConfig(steps=1, max_len=2))
    for bad in (-1, 2**64, 1.5):
        with pytest.raises(ValueError, match=r"seed \(--seed\) must be an integer in \[0, 2\*\*64\)"):
            finetune_classify(*args, TaskConfig(steps=1, seed=bad))
        with pytest.raises(ValueError, match=r"seed \(--seed\)"):
            train_seq2seq(str(tmp_path / "pairs.tsv"), TaskConfig(steps=1, seed=bad))
    with pytest.raises(ValueError, match=r"device 'gpu'"):
        train_seq2seq(str(tmp_path / "pairs.tsv"), TaskConfig(steps=1, device="gpu"))


def test_task_device_defaults_to_the_gpu_when_there_is_one():
    from gptkern.train.tasks import _check_config

    assert TaskConfig().device == "auto"
    assert _check_config(TaskConfig(), 1).device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _check_config(TaskConfig(device="cpu"), 1).device == "cpu"


def test_finetune_command(classification_files):
    d = classification_files
    result = subprocess.run([sys.executable, "-m", "gptkern", "finetune", "classify", "--init", str(d / "ckpt"),
                             "--data", str(d / "train.csv"), "--val", str(d / "val.csv"), "--steps", "5",
                             "--batch-size", "8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation accuracy" in result.stdout
