"""A user's mistakes on the command line give one line on stderr and exit status 2, not a traceback."""
import json

import pytest
import torch

from gptkern import cli
from gptkern.train.config import TrainConfig


def run(capsys, *argv):
    status = cli.main(list(argv))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    return err


def test_missing_files(capsys, tmp_path):
    err = run(capsys, "generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "a")
    assert err.startswith("gptkern generate: error: ") and "nope" in err and "not found" in err
    assert "no such model directory" in err  # not "config.json not found" for a missing directory
    err = run(capsys, "finetune", "classify", "--init", str(tmp_path / "gone"), "--data", "x.csv", "--val", "y.csv")
    assert "gone not found: no such model directory" in err
    err = run(capsys, "train", "--config", str(tmp_path / "nope.toml"))
    assert err.startswith("gptkern train: error: ") and "nope.toml" in err
    err = run(capsys, "train", "--data", str(tmp_path / "corpus"), "--max-steps", "1", "--device", "cpu",
              "--out-dir", str(tmp_path / "run"))
    assert "meta.json not found" in err and "gptkern prepare" in err


def test_a_training_run_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    err = run(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "a")
    assert "is a training run" in err and "checkpoints" in err
    (tmp_path / "model.safetensors").write_bytes(b"x")
    err = run(capsys, "generate", "--checkpoint", str(tmp_path / "model.safetensors"), "--prompt", "a")
    assert "model.safetensors is a file, not a model directory" in err and str(tmp_path) in err


def test_a_csv_row_without_a_label(tmp_path):
    from gptkern.train.tasks import read_labelled_csv

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,a\nworld\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: a row without a text or a label"):
        read_labelled_csv(str(bad))
    extra = tmp_path / "extra.csv"  # an unquoted comma in the text: a third field, not a label
    extra.write_text("text,label\nfine,a\ngood, really good,pos\n")
    with pytest.raises(ValueError, match=r"extra\.csv:3: a row with more fields than the header"):
        read_labelled_csv(str(extra))
    trailing = tmp_path / "trailing.csv"  # empty fields after the label (a spreadsheet export) are fine
    trailing.write_text("text,label\nfine,a,\nok,b,,\n")
    assert read_labelled_csv(str(trailing)) == [("fine", "a"), ("ok", "b")]
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"text,label\nhello,a\n\xff\xfe,b\n")
    with pytest.raises(ValueError, match=r"binary\.csv: not a UTF-8 text file"):
        read_labelled_csv(str(binary))


def test_a_long_csv_text_is_read_and_a_bad_row_names_its_line(tmp_path, monkeypatch):
    import contextlib
    import csv

    from gptkern.train import tasks

    long = "word " * 40_000  # 200,000 characters: over the csv module's default field limit (131072)
    path = tmp_path / "long.csv"
    path.write_text(f'text,label\n"{long}",pos\nshort,neg\n')
    limit = csv.field_size_limit()
    assert tasks.read_labelled_csv(str(path)) == [(long, "pos"), ("short", "neg")]
    assert csv.field_size_limit() == limit  # the process-wide limit is put back

    @contextlib.contextmanager
    def small_limit():  # a parse error, now that the limit is lifted
        old = csv.field_size_limit(1000)
        try:
            yield
        finally:
            csv.field_size_limit(old)

    monkeypatch.setattr(tasks, "_no_csv_field_limit", small_limit, raising=False)
    bad = tmp_path / "bad.csv"  # the error is on line 4 (row 2 spans lines 2-3), not the line of the row before
    bad.write_text(f'text,label\n"two\nlines",a\n{"x" * 200_000},b\n')
    with pytest.raises(ValueError, match=r"bad\.csv:4: not a valid CSV row \(field larger than field limit"):
        tasks.read_labelled_csv(str(bad))


def test_seq2seq_needs_a_pair_to_hold_out(tmp_path):
    """One pair cannot be both trained on and evaluated: evaluating on the training pair would
    report a score that means nothing."""
    from gptkern.train.tasks import TaskConfig, train_seq2seq

    one = tmp_path / "one.tsv"
    one.write_text("abc\tcba\n")
    with pytest.raises(ValueError, match=r"one\.tsv: needs at least 2 pairs"):
        train_seq2seq(str(one), TaskConfig(steps=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path):
    err = run(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "a", "--device", "cuda")
    assert "no CUDA device is available" in err
    err = run(capsys, "train", "--device", "cuda", "--data", str(tmp_path), "--out-dir", str(tmp_path / "run"))
    assert "no CUDA device is available" in err
    err = run(capsys, "finetune", "classify", "--init", str(tmp_path), "--data", "x.csv", "--val", "y.csv",
              "--device", "cuda")
    assert "no CUDA device is available" in err


def test_block_size_flag_grows_the_model_context():
    """--block-size longer than the preset's context: the model's context follows; an explicit
    [model] block_size is kept (and the trainer then refuses the longer window)."""
    assert TrainConfig(preset="gpt2-tiny", block_size=512).model_config().block_size == 512
    assert TrainConfig(preset="gpt2-tiny", block_size=64).model_config().block_size == 256
    assert TrainConfig(preset="gpt2-tiny", block_size=512, model={"block_size": 128}).model_config().block_size == 128


def test_a_corrupt_model_directory_and_bench_threads(capsys, tmp_path):
    from gptkern.models import GPT, GPTConfig
    from gptkern.models.io import save_pretrained

    save_pretrained(GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1)), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = run(capsys, "generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "a")
    assert "model.safetensors is corrupt" in err
    for command in ("bench", "bench-attention"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--threads", "0"])
        assert exit_info.value.code == 2 and "--threads" in capsys.readouterr().err


def test_generate_without_a_tokenizer_or_with_an_empty_prompt(capsys, tmp_path):
    from gptkern.data import ByteTokenizer
    from gptkern.models import GPT, GPTConfig
    from gptkern.models.io import save_pretrained

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, vocab_size=257))
    save_pretrained(model, tmp_path / "bare")  # no tokenizer
    err = run(capsys, "generate", "--checkpoint", str(tmp_path / "bare"), "--prompt", "a", "--device", "cpu")
    assert err.startswith("gptkern generate: error: ") and "has no tokenizer files" in err
    save_pretrained(model, tmp_path / "full", ByteTokenizer())
    err = run(capsys, "generate", "--checkpoint", str(tmp_path / "full"), "--prompt", "", "--device", "cpu")
    assert err.startswith("gptkern generate: error: --prompt encodes to no tokens")


def test_traceback_setting_shows_train_flag_errors(monkeypatch):
    monkeypatch.setenv("GPTKERN_TRACEBACK", "1")
    with pytest.raises(ValueError, match="block_size"):
        cli.main(["train", "--block-size", "0"])


def test_devices_torch_does_not_know_or_that_are_not_here(capsys, tmp_path):
    for device in ("gpu", "cuda:x", "meta"):
        err = run(capsys, "train", "--device", device, "--data", str(tmp_path), "--out-dir", str(tmp_path / "run"))
        assert err.startswith("gptkern train: error: device ") and "Traceback" not in err
        err = run(capsys, "finetune", "classify", "--init", str(tmp_path), "--data", "x.csv", "--val", "y.csv",
                  "--device", device)
        assert err.startswith("gptkern finetune: error: device ")


def test_out_dir_that_is_a_file(capsys, tmp_path):
    from gptkern.data.prepare import prepare

    prepare([], tmp_path / "data", "byte", max_chars=20_000, progress=False)
    (tmp_path / "afile").write_text("x")
    err = run(capsys, "train", "--data", str(tmp_path / "data"), "--out-dir", str(tmp_path / "afile"),
              "--max-steps", "1", "--device", "cpu", "--progress", "false")
    assert "afile" in err and "exists and is not a folder" in err


@pytest.mark.parametrize("flag,value", [("--weight-decay", "-1"), ("--grad-clip", "-1"), ("--beta1", "1"),
                                        ("--beta2", "-0.1"), ("--peak-tflops", "-1"), ("--peak-tflops", "0")])
def test_optimizer_and_mfu_values_out_of_range(capsys, flag, value):
    err = run(capsys, "train", flag, value)
    assert flag in err


def test_task_steps_and_lr_out_of_range(capsys, tmp_path):
    for argv, flag in ((("finetune", "classify", "--steps", "-5"), "--steps"),
                       (("train", "seq2seq", "--steps", "-1"), "--steps"),
                       (("train", "seq2seq", "--lr", "0"), "--lr")):
        (tmp_path / "pairs.tsv").write_text("ab\tba\ncd\tdc\nef\tfe\n")
        extra = ["--data", str(tmp_path / "pairs.tsv")] if argv[0] == "train" else \
            ["--init", str(tmp_path), "--data", "x.csv", "--val", "y.csv"]
        err = run(capsys, *argv, *extra)
        assert flag in err, err


def test_deeply_nested_jsonl_line_is_named(capsys, tmp_path):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n")
    status = cli.main(["prepare", "--input", str(tmp_path / "deep.jsonl"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "deep.jsonl:1: not a valid JSON line" in err and "Traceback" not in err


def test_prepare_negative_seed_names_the_flag(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--out", str(tmp_path / "out"), "--seed", "-1"])
    assert exit_info.value.code == 2 and "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_prepare_workers_below_one_is_an_error(capsys, tmp_path, workers):
    err = run(capsys, "prepare", "--out", str(tmp_path / "out"), "--max-chars", "1000", "--workers", workers)
    assert f"--workers) must be >= 1, got {workers}" in err and not (tmp_path / "out").exists()


def test_bench_thread_default_is_in_the_help(capsys):
    from gptkern import bench_generate, bench_train

    for module in (bench_train, bench_generate):
        with pytest.raises(SystemExit):
            module.main(["-h"])
        assert "default 2" in " ".join(capsys.readouterr().out.split())


def test_a_backend_that_cannot_serve_the_call_is_one_line(capsys, tmp_path, monkeypatch):
    """GPTKERN_BACKEND=cuda on a CPU machine: the op's NotImplementedError is one line, exit 2."""
    from gptkern.models import GPT, GPTConfig
    from gptkern.models.io import save_pretrained
    from gptkern.data import ByteTokenizer

    save_pretrained(GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, vocab_size=257)).eval(), tmp_path, ByteTokenizer())
    import gptkern

    gptkern.set_backend("cuda")  # (conftest puts 'auto' back for the next test)
    if torch.cuda.is_available():
        pytest.skip("cuda serves here")
    err = run(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "a", "--max-new-tokens", "2",
              "--device", "cpu")
    assert "cuda" in err and "backend" in err


def test_a_closed_pipe_ends_the_command_quietly():
    """`gptkern generate ... | head`: the reader goes away; no traceback, exit status 1 (as Python's own
    recipe for SIGPIPE)."""
    import subprocess
    import sys

    code = ("import sys; from gptkern import cli\n"
            "def boom(argv):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "cli.FORWARDED['generate'] = boom\nsys.exit(cli.main(['generate']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_bench_flags_named_and_every_backend_a_provider(capsys):
    """--repeats and --warmup are named in their own errors; any gptkern backend is a --providers
    name (one not available here is reported as not timed, as the help's example implies)."""
    from gptkern import benchmark

    for flags, message in ((["--repeats", "1"], "argument --repeats: must be >= 2, got 1"),
                           (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1")):
        with pytest.raises(SystemExit) as exit_:
            benchmark.main(flags + ["--quick", "--shapes", "4x8"])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    timed, skipped = benchmark.providers(torch.device("cpu"))
    assert {f"gptkern:{b}" for b in ("triton", "cuda", "cpu", "torch")} <= set(timed) | set(skipped)


@pytest.mark.parametrize("flags,message", [(["--top-k", "-1"], "--top-k must be >= 0"),
                                           (["--temperature", "nan"], "--temperature must be"),
                                           (["--temperature", "inf"], "--temperature must be a finite number"),
                                           (["--top-p", "0"], "--top-p must be in"),
                                           (["--seed", "99999999999999999999"], "--seed must fit in 64 bits"),
                                           (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0")])
def test_generate_names_its_flags(capsys, flags, message):
    err = run(capsys, "generate", "--checkpoint", "/nonexistent", "--prompt", "a", *flags)  # (checked first)
    assert message in err


def test_a_failed_build_of_the_cpu_kernels_is_its_message_not_a_traceback(monkeypatch, capsys):
    """A backend named explicitly whose JIT build fails (gptkern._jit.JITBuildError): the compiler's
    message and the way out, exit status 2."""
    from gptkern import cli
    from gptkern._jit import JITBuildError

    def boom(argv):
        raise JITBuildError("gptkern: building the C++ extension gptkern._C failed:\nerror: broken\n"
                            "gptkern: to run without the C++ kernels, use the torch backend")

    monkeypatch.setitem(cli.FORWARDED, "generate", boom)
    assert cli.main(["generate"]) == 2
    err = capsys.readouterr().err
    assert "gptkern generate: error: gptkern: building" in err and "error: broken" in err
    assert "Traceback" not in err


def test_finetune_help(capsys):
    from gptkern import cli

    assert cli.main(["finetune", "--help"]) == 0
    assert "gptkern finetune classify --init CKPT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # after the task: its own parser's flags
        cli.main(["finetune", "classify", "-h"])
    assert exit_info.value.code == 0 and "--init" in capsys.readouterr().out
    assert cli.main(["finetune"]) == 2
    assert "gptkern finetune: error: no task given" in capsys.readouterr().err
    assert cli.main(["finetune", "regress", "--init", "x"]) == 2
    assert "gptkern finetune: error: unknown task 'regress'" in capsys.readouterr().err


def test_benchmark_output_files_are_checked_before_any_timing(tmp_path, capsys):
    from gptkern import benchmark
    from gptkern._files import output_file_problem

    (tmp_path / "file").write_text("")
    assert output_file_problem(str(tmp_path / "new" / "deeper" / "out.json")) is None  # folders made later
    assert output_file_problem(str(tmp_path)) == "is a folder"
    problem = output_file_problem(str(tmp_path / "file" / "out.json"))
    assert problem == f"cannot be written: {tmp_path / 'file'} is a file"
    for flag, path in (("--out-json", tmp_path), ("--out-md", tmp_path / "file" / "t.md")):
        with pytest.raises(SystemExit) as exit_:
            benchmark.main(["--quick", "--shapes", "4x8", flag, str(path)])
        assert exit_.value.code == 2 and f"argument {flag}: {path} " in capsys.readouterr().err
