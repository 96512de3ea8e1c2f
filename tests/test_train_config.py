"""TrainConfig from config files and flags: typed values, clear errors naming the key and the file."""
import json

import pytest

from gptkern import cli
from gptkern.train.cli import parse
from gptkern.train.config import TrainConfig


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_config_file_strings_convert_as_flags_do(tmp_path):
    toml = write(tmp_path, "run.toml", 'compile = "false"\nbatch_size = "4"\nmax_steps = 6.0\n[model]\nn_layer = "2"\n')
    cfg = parse([f"--config={toml}"])  # --config=FILE as any other flag
    assert (cfg.compile, cfg.batch_size, cfg.max_steps, cfg.model) == (False, 4, 6, {"n_layer": 2})
    assert type(cfg.max_steps) is int
    cfg = parse(["--config", write(tmp_path, "run.yaml", "lr: 3e-4\nblock_size: null\nmodel:\n")])
    assert (cfg.lr, cfg.block_size, cfg.model) == (3e-4, None, {})  # PyYAML reads 3e-4 as a string


@pytest.mark.parametrize("name, text, message", [
    ("a.json", '{"max_steps": 3.5}', "max_steps expects int, got 3.5"),
    ("b.toml", 'batch_size = "4x"', "batch_size expects int, got '4x'"),
    ("c.toml", "compile = 2", "compile expects bool, got 2"),
    ("d.toml", "model = 5", "model must be a table"),
    ("e.yaml", "- a\n- b\n", "must hold a table of settings .* got a list"),
    ("f.toml", "lr = \n", "is not valid TOML"),
    ("g.yaml", "lr: [1\n", "is not valid YAML"),
    ("h.json", '{"lr": }', "is not valid JSON"),
    ("i.toml", "n_layer = 2", "unknown setting 'n_layer' .*under model"),
    ("j.yaml", "model:\n  n_layer: 1.5\n", "model.n_layer expects int, got 1.5"),
    ("k.toml", "[model]\nlayers = 2\n", "unknown model field 'layers'; known: block_size, vocab_size, n_layer"),
])
def test_bad_config_file_values_name_the_key_and_file(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError, match=f"config file {path}.*{message}"):
        parse(["--config", path])


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e39"], r"lr \(--lr\) must be a finite number at most 3.403e\+38"),
    (["--lr", "nan"], r"--lr\) must be a finite number"),
    (["--min-lr", "inf"], r"--min-lr\) must be a finite number"),
    (["--seed", "-1"], r"seed \(--seed\) must be in \[0, 2\*\*64\), got -1"),
    (["--seed", str(2**64)], r"seed \(--seed\) must be in \[0, 2\*\*64\)"),
    (["--block-size", "0"], r"block_size \(--block-size\) must be an integer >= 1, got 0"),
    (["--block-size", "-4"], r"block_size \(--block-size\) must be an integer >= 1"),
    (["--max-seconds", "-1"], r"max_seconds \(--max-seconds\) must be a positive number"),
    (["--max-seconds", "nan"], r"max_seconds \(--max-seconds\) must be a positive number"),
    # the cosine runs from lr down to min_lr (default 1e-4): a lower lr alone would make it rise
    (["--lr", "5e-5"], r"min_lr \(--min-lr\) must be at most lr \(--lr\).*got lr 5e-05 and min_lr 0.0001"),
])
def test_bad_numbers_name_the_flag(flags, message, capsys):
    with pytest.raises(ValueError, match=message):
        parse(flags)
    assert cli.main(["train", *flags]) == 2  # one line, no traceback
    assert capsys.readouterr().err.startswith("gptkern train: error: ")


def test_numpy_integers_are_stored_as_ints():
    """A numpy integer passes the integer checks and is stored as an int (config.json is JSON)."""
    import json

    import numpy as np

    from gptkern.models import Seq2SeqConfig
    from gptkern.train.config import TrainConfig

    train = TrainConfig(seed=np.int64(3), batch_size=np.int32(2))
    seq2seq = Seq2SeqConfig(src_vocab_size=np.int64(100), tgt_vocab_size=np.int16(50))
    for value in (train.seed, train.batch_size, seq2seq.src_vocab_size, seq2seq.tgt_vocab_size):
        assert type(value) is int
    json.dumps(train.to_dict())
    json.dumps(seq2seq.to_dict())


def test_files_are_written_as_utf8_whatever_the_locale(tmp_path):
    """Tokenizer files and configs hold non-ASCII text: a C locale must not make saving fail."""
    import os
    import subprocess
    import sys

    code = ("import sys; from gptkern._files import write_atomic; "
            "write_atomic(sys.argv[1], 'caf\\u00e9 \\u00a1 \\u4e2d')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.json")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "f.json").read_text(encoding="utf-8") == "caf\u00e9 \u00a1 \u4e2d"


def test_large_seeds_and_numpy_time_budgets_are_taken():
    import numpy as np

    assert parse(["--seed", str(2**64 - 1)]).seed == 2**64 - 1  # torch.manual_seed takes it
    for budget in (np.int64(5), np.float32(2.5), 7):
        value = TrainConfig(max_seconds=budget).max_seconds
        assert type(value) is float and value == float(budget)


@pytest.mark.parametrize("ext, text", [(".toml", "max_steps = 3\n"), (".yaml", "max_steps: 3\n"),
                                       (".json", '{"max_steps": 3}')])
def test_config_files_with_a_byte_order_mark(tmp_path, ext, text):
    path = tmp_path / f"run{ext}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Windows editors save UTF-8
    assert parse(["--config", str(path)]).max_steps == 3


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e38"], r"lr \(--lr\) is too large for AdamW in float32: lr / \(1 - beta1\)"),
    (["--lr", "1e36", "--beta1", "0.999"], r"lr \(--lr\) is too large .* got 1e\+36 with beta1 0.999"),
    (["--min-lr", "1e38"], r"min_lr \(--min-lr\) is too large"),
    (["--lr", "1e38", "--beta1", "0", "--weight-decay", "10"], r"lr \* weight_decay must be at most 3.403e\+38"),
])
def test_learning_rates_that_overflow_adamw_are_refused(flags, message, capsys):
    with pytest.raises(ValueError, match=message):
        parse(flags)
    assert cli.main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptkern train: error: ") and "Traceback" not in err


@pytest.mark.parametrize("lr, beta1, weight_decay", [(3e37, 0.9, 0.1), (3.4e38, 0.0, 1.0), (3e-4, 0.9, 0.1)])
def test_an_accepted_learning_rate_takes_an_adamw_step(lr, beta1, weight_decay):
    """At the bound, the first AdamW step (foreach, as on CPU) runs: its factors fit float32."""
    import torch

    from gptkern.train.trainer import make_optimizer

    cfg = TrainConfig(lr=lr, min_lr=0.0, beta1=beta1, weight_decay=weight_decay)
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    optimizer.step()  # raised "value cannot be converted to type float without overflow" at lr 1e38
    assert TrainConfig(lr=1.0, min_lr=0.5).lr == 1.0  # large but sane rates stay accepted


def test_learning_rate_schedule():
    """Linear warmup from lr / warmup_steps at step 0 to lr, then cosine down to min_lr at max_steps."""
    from gptkern.train.trainer import learning_rate

    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=12)
    assert [learning_rate(c, s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert learning_rate(c, 8) == pytest.approx(0.55)  # halfway through the decay: (lr + min_lr) / 2
    assert learning_rate(c, 12) == pytest.approx(0.1) and learning_rate(c, 50) == pytest.approx(0.1)


def test_bools_and_strings_are_typed_and_paths_are_taken(tmp_path):
    """A string "false" is a true value: refused, naming the field, from the API as from a dict."""
    with pytest.raises(ValueError, match=r"resume \(--resume\) must be true or false, got 'false'"):
        TrainConfig(resume="false")
    with pytest.raises(ValueError, match=r"doc_mask \(--doc-mask\) must be true or false, got 'no'"):
        TrainConfig.from_dict({"doc_mask": "no"})
    with pytest.raises(ValueError, match=r"device \(--device\) must be a string, got 3"):
        TrainConfig(device=3)
    cfg = TrainConfig(data=tmp_path / "d", out_dir=tmp_path / "o", min_lr=5e-5, lr=5e-5)
    assert cfg.data == str(tmp_path / "d") and cfg.out_dir == str(tmp_path / "o")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_help_anywhere_in_the_flags(capsys):
    assert cli.main(["train", "--max-steps", "3", "-h"]) == 0
    assert "--min-lr" in capsys.readouterr().out
    assert cli.main(["train", "--help"]) == 0


def test_config_flag_needs_one_file(tmp_path):
    """--config FILE / --config=FILE once: twice, or an empty or missing file name, is named."""
    path = write(tmp_path, "a.json", json.dumps({"max_steps": 3}))
    assert parse(["--config", path]).max_steps == parse([f"--config={path}"]).max_steps == 3
    for flags, message in ((["--config", path, f"--config={path}"], "--config given more than once"),
                           (["--config", path, "--config", path], "--config given more than once"),
                           (["--config", "", "--max-steps", "3"], "--config needs a file"),
                           (["--config="], "--config needs a file"), (["--config"], "--config needs a file")):
        with pytest.raises(ValueError, match=message):
            parse(flags)


def test_seq2seq_help_is_its_own(capsys):
    """`gptkern train seq2seq -h` lists the seq2seq task's flags, not pretraining's."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "seq2seq", "-h"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--data" in out and "--min-lr" not in out
