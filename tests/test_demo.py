"""The main job runs end to end: data, a short training run, sampling, and every op reported correct."""
import re
import subprocess
import sys

import torch


def test_demo_correctness_summary():
    out = subprocess.run([sys.executable, "-m", "gptkern", "demo", "--skip-train", "--skip-bench"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "correctness: all ok" in out.stdout
    for op in ("softmax", "log_softmax", "layer_norm", "rms_norm", "sdpa causal"):
        assert f"| {op} |" in out.stdout
    if not torch.cuda.is_available():  # then every backend listed runs the table on the CPU
        for backend in out.stdout.split("backends here:")[1].split("\n")[0].replace(",", " ").split():
            assert f"| sdpa causal | gqa 4/2 heads, L=40, S=56 | {backend} |" in out.stdout, backend


def test_demo_trains_and_samples(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gptkern", "demo", "--minutes", "0.15", "--corpus-chars", "300000",
                          "--out", str(tmp_path), "--skip-bench"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for step in ("1/4 data", "2/4 training", "3/4 sampling", "4/4 kernels"):
        assert step in out.stdout
    assert "tokens/s decode" in out.stdout and "correctness: all ok" in out.stdout
    assert (tmp_path / "train" / "loss.png").is_file()
    assert list((tmp_path / "train" / "checkpoints").glob("step_*"))


def test_demo_flags_and_a_corpus_prepared_with_another_cap(tmp_path, capsys, monkeypatch):
    """--minutes and --corpus-chars are checked before any work; data prepared with one cap is
    kept for the same cap and prepared again for another."""
    import pytest

    from gptkern import demo

    for argv, flag in ((["--minutes", "0"], "--minutes"), (["--minutes", "-1"], "--minutes"),
                       (["--minutes", "inf"], "--minutes"), (["--minutes", "nan"], "--minutes"),
                       (["--corpus-chars", "0"], "--corpus-chars")):
        with pytest.raises(SystemExit) as exit_info:
            demo.main([*argv, "--out", str(tmp_path / "unused")])
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()
    small = demo.prepare_corpus(tmp_path / "data", 20_000)
    (tmp_path / "data" / "marker").write_text("")
    assert demo.prepare_corpus(tmp_path / "data", 20_000) == small and (tmp_path / "data" / "marker").exists()
    import gptkern.data.prepare as prepare_module

    with monkeypatch.context() as patched:  # the same cap: kept, not prepared again
        patched.setattr(prepare_module, "prepare", lambda *args, **kwargs: pytest.fail("prepared again"))
        assert demo.prepare_corpus(tmp_path / "data", 20_000) == small
    larger = demo.prepare_corpus(tmp_path / "data", 40_000)
    assert larger["source"] != small["source"] and (tmp_path / "data" / "marker").exists()  # over its files
    assert larger["splits"]["train"]["tokens"] > small["splits"]["train"]["tokens"]
    # a folder with the user's own dataset, or other files, is refused and left as it was
    from gptkern.data.prepare import prepare

    (tmp_path / "mine" / "data" / "raw").mkdir(parents=True)
    (tmp_path / "mine" / "data" / "raw" / "notes.txt").write_text("my own notes " * 50)
    with pytest.raises(ValueError, match="not empty"):
        demo.prepare_corpus(tmp_path / "mine" / "data", 20_000)
    prepare([tmp_path / "mine" / "data" / "raw"], tmp_path / "mine" / "data", "byte", progress=False)
    with pytest.raises(ValueError, match="holds another dataset"):
        demo.prepare_corpus(tmp_path / "mine" / "data", 20_000)
    assert (tmp_path / "mine" / "data" / "raw" / "notes.txt").is_file()
    for text, match in (("{", "is corrupt: not valid JSON"), ("[1]", "is corrupt: a JSON object was expected")):
        (tmp_path / "mine" / "data" / "meta.json").write_text(text)  # named, and the folder left alone
        with pytest.raises(ValueError, match=match):
            demo.prepare_corpus(tmp_path / "mine" / "data", 20_000)
        assert (tmp_path / "mine" / "data" / "raw" / "notes.txt").is_file()


def test_demo_clears_only_a_training_run(tmp_path):
    """The demo starts a fresh run over its last one; a train folder holding anything else (the
    user's files) is refused and left as it was."""
    import pytest

    from gptkern import demo

    run = tmp_path / "train"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json", "loss.png", "config.json.tmp123", ".DS_Store"):
        (run / name).write_text("")
    demo.clear_training_run(str(run))
    assert not run.exists()
    demo.clear_training_run(str(run))  # nothing there: nothing to do
    run.mkdir()
    (run / "checkpoints").mkdir()
    (run / "precious.txt").write_text("important")
    with pytest.raises(ValueError, match=r"holds files that are not a training run's \(precious.txt\)"):
        demo.clear_training_run(str(run))
    assert (run / "precious.txt").read_text() == "important"
    (run / "precious.txt").unlink()
    for name in ("metrics.jsonl.bak", "checkpoints-old"):  # a run's names, not its temporary files
        (run / name).write_text("mine")
        with pytest.raises(ValueError, match=re.escape(name)):
            demo.clear_training_run(str(run))
        assert (run / name).read_text() == "mine"
        (run / name).unlink()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        demo.clear_training_run(str(tmp_path / "file"))


def test_demo_rows_fail_past_each_dtypes_limits(capsys):
    """A row is ok while both errors are within its dtype's limits (forward, gradients: float32
    1e-4 / 1e-3, float16 1e-2 / 5e-2, bfloat16 8e-2 / 4e-1), FAIL past either; a measurement that
    raises is a FAIL row naming the error."""
    from gptkern import demo

    limits = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 5e-2), torch.bfloat16: (8e-2, 4e-1)}
    for dtype, (fwd, bwd) in limits.items():
        assert demo._row("softmax", "4x7", "torch", dtype, lambda: (fwd, bwd))
        for errors in ((1.5 * fwd, 0.0), (0.0, 1.5 * bwd), (1.5 * fwd, 1.5 * bwd)):
            assert not demo._row("softmax", "4x7", "torch", dtype, lambda: errors)
    rows = capsys.readouterr().out.splitlines()
    assert [row.split("|")[-2].strip() for row in rows] == ["ok", "FAIL", "FAIL", "FAIL"] * 3
    assert rows[0] == "| softmax | 4x7 | torch | float32 | 1.00e-04 | 1.00e-03 | ok |"
    assert rows[6] == "| softmax | 4x7 | torch | float16 | 0.00e+00 | 7.50e-02 | FAIL |"

    def broken():
        raise RuntimeError("no kernel")

    assert not demo._row("softmax", "4x7", "triton", torch.float16, broken)
    assert capsys.readouterr().out == "| softmax | 4x7 | triton | float16 | error: RuntimeError: no kernel | | FAIL |\n"


def test_demo_check_measures_the_output_and_every_gradient(monkeypatch):
    """check() and check_attention() report the largest |error| of the output, below the reference
    as well as above, and of the gradients (a bias's and a value's among them), in the dtype of
    the row."""
    import torch.nn.functional as F

    from gptkern import demo

    cpu = torch.device("cpu")
    fwd, bwd = demo.check("layer_norm", (4, 7), torch.float32, "torch", cpu)
    assert fwd < 1e-5 and bwd < 1e-5
    assert demo.check("softmax", (4, 7), torch.float16, "torch", cpu)[0] > 1e-6  # float16 outputs

    def off(op, x, params):  # outputs 0.01 low, the bias gradient 1.5 times too large
        weight, bias = params
        return F.layer_norm(x, (x.shape[-1],), weight, bias) - 0.01 + 0.5 * (bias - bias.detach())

    monkeypatch.setattr(demo, "_run", off)
    fwd, bwd = demo.check("layer_norm", (4, 7), torch.float32, "torch", cpu)
    assert abs(fwd - 0.01) < 1e-5 and bwd > 0.1
    monkeypatch.setattr(demo, "_run", lambda op, x, params: off(op, x, params) + 0.02)  # 0.01 high
    assert abs(demo.check("layer_norm", (4, 7), torch.float32, "torch", cpu)[0] - 0.01) < 1e-5
    import gptkern

    fwd, bwd = demo.check_attention(True, torch.float32, "torch", cpu)
    assert fwd < 1e-5 and bwd < 1e-5

    def attention_off(q, k, v, **kwargs):  # the value gradient 1.5 times too large
        return F.scaled_dot_product_attention(q, k, v + 0.5 * (v - v.detach()), **kwargs) - 0.01

    monkeypatch.setattr(gptkern.ops, "scaled_dot_product_attention", attention_off)
    fwd, bwd = demo.check_attention(True, torch.float32, "torch", cpu)
    assert abs(fwd - 0.01) < 1e-5 and bwd > 0.1
    monkeypatch.setattr(gptkern.ops, "scaled_dot_product_attention",
                        lambda q, k, v, **kwargs: attention_off(q, k, v, **kwargs) + 0.02)  # 0.01 high
    assert abs(demo.check_attention(True, torch.float32, "torch", cpu)[0] - 0.01) < 1e-5


def test_demo_summary_covers_every_case_and_fails_on_any_row(monkeypatch, capsys):
    """The table has a row per op, shape, backend that runs here and dtype (float32 and float16 on
    a CPU), plus both attention cases; one row over its limits anywhere fails the summary."""
    import gptkern
    from gptkern import _backend, demo

    cpu = torch.device("cpu")
    failing = set()

    def measured(*case):
        seen.append(case)
        return (1.0, 0.0) if case in failing else (0.0, 0.0)

    monkeypatch.setattr(demo, "check", lambda op, shape, dtype, backend, device: measured(op, shape, dtype, backend))
    monkeypatch.setattr(demo, "check_attention",
                        lambda causal, dtype, backend, device: measured("sdpa", causal, dtype, backend))
    backends = [b for b in gptkern.available_backends() if _backend._backend_runs_on(b, "cpu")]
    dtypes = (torch.float32, torch.float16)
    cases = demo._cases(cpu)
    assert {op for op, _ in cases} == {"softmax", "log_softmax", "layer_norm", "rms_norm"}
    want = [(op, shape, dtype, b) for op, shape in cases for b in backends for dtype in dtypes]
    want += [("sdpa", causal, dtype, b) for causal in (False, True) for b in backends if b != "cuda"
             for dtype in dtypes]
    seen = []
    assert demo.correctness_summary(cpu)
    assert sorted(map(repr, seen)) == sorted(map(repr, want)) and len(seen) == len(want)
    assert "FAIL" not in capsys.readouterr().out
    for case in (want[0], want[-1], [c for c in want if c[0] == "sdpa"][0]):
        failing = {case}
        seen = []
        assert not demo.correctness_summary(cpu), case
        assert capsys.readouterr().out.count("| FAIL |") == 1


def test_demo_main_runs_what_its_flags_ask_and_exits_1_on_failures(tmp_path, monkeypatch, capsys):
    """--skip-train / --skip-bench skip their steps; --out, --minutes and --corpus-chars reach the
    training; the exit status is 1 when the correctness table has a failure."""
    from gptkern import bench_attention, benchmark, demo

    calls = []
    monkeypatch.setattr(demo, "pretrain_and_sample", lambda *args: calls.append(("train", *args)))
    monkeypatch.setattr(benchmark, "main", lambda argv: calls.append(("bench", argv)))
    monkeypatch.setattr(bench_attention, "main", lambda argv: calls.append(("bench_attention", argv)))
    summary = [True]
    monkeypatch.setattr(demo, "correctness_summary", lambda device: summary[0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = ["--out", str(tmp_path / "run")]  # (nothing is written there: training is stubbed)
    assert demo.main([*out, "--skip-train", "--skip-bench"]) == 0 and calls == []
    assert "correctness: all ok" in capsys.readouterr().out
    assert demo.main(["--out", str(tmp_path), "--minutes", "0.5", "--corpus-chars", "1000", "--skip-bench"]) == 0
    assert calls == [("train", str(tmp_path), 0.5, 1000, device)]
    calls.clear()
    assert demo.main([*out, "--skip-train"]) == 0
    quick = ["--quick"] + (["--threads", "1"] if device.type == "cpu" else [])
    assert calls == [("bench", quick), ("bench_attention", quick)]
    summary[0] = False
    capsys.readouterr()
    assert demo.main([*out, "--skip-train", "--skip-bench"]) == 1
    out = capsys.readouterr().out
    assert "correctness: FAILURES above" in out and "all ok" not in out


def test_demo_pretrain_checks_its_folder_first_and_samples_the_newest_checkpoint(tmp_path, monkeypatch):
    """A train folder holding the user's files is refused before the data is prepared; an earlier
    run is cleared; training gets the time asked for; sampling loads this run's newest checkpoint."""
    from pathlib import Path

    import pytest

    import gptkern.models.io as io_module
    import gptkern.train as train_module
    from gptkern import demo

    cpu = torch.device("cpu")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "precious.txt").write_text("mine")
    monkeypatch.setattr(train_module, "train", lambda config: pytest.fail("trained"))
    with pytest.raises(ValueError, match="holds files that are not a training run's"):
        demo.pretrain_and_sample(str(tmp_path), 0.5, 20_000, cpu)
    assert not (tmp_path / "data").exists() and (tmp_path / "train" / "precious.txt").read_text() == "mine"
    (tmp_path / "train" / "precious.txt").unlink()

    def checkpoint(out_dir, step):
        folder = Path(out_dir) / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
        return folder

    checkpoint(tmp_path / "train", 900)  # the last demo's run
    configs = []

    def fake_train(config):
        configs.append(config)
        for step in (10, 20):
            checkpoint(config.out_dir, step)
        return [5.0, 4.0]

    class Loaded(Exception):
        pass

    def fake_load(path, *args, **kwargs):
        raise Loaded(path)

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(io_module, "load_pretrained", fake_load)
    with pytest.raises(Loaded) as loaded:
        demo.pretrain_and_sample(str(tmp_path), 0.5, 20_000, cpu)
    assert Path(loaded.value.args[0]) == tmp_path / "train" / "checkpoints" / "step_00000020"
    (config,) = configs
    assert config.max_seconds == 30 and config.preset == "gpt2-tiny"
    assert config.data == str(tmp_path / "data") and config.out_dir == str(tmp_path / "train")
    assert "first 20000 characters" in demo.prepare_corpus(tmp_path / "data", 20_000)["source"]
