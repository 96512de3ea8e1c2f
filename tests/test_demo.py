"""The main job runs end to end: data, a short training run, sampling, and every op reported correct."""
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


def test_demo_flags_and_a_corpus_prepared_with_another_cap(tmp_path, capsys):
    """--minutes and --corpus-chars are checked before any work; data prepared with one cap is
    kept for the same cap and prepared again for another."""
    import pytest

    from gptkern import demo

    for argv, flag in ((["--minutes", "0"], "--minutes"), (["--minutes", "-1"], "--minutes"),
                       (["--corpus-chars", "0"], "--corpus-chars")):
        with pytest.raises(SystemExit) as exit_info:
            demo.main([*argv, "--out", str(tmp_path / "unused")])
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()
    small = demo.prepare_corpus(tmp_path / "data", 20_000)
    (tmp_path / "data" / "marker").write_text("")
    assert demo.prepare_corpus(tmp_path / "data", 20_000) == small and (tmp_path / "data" / "marker").exists()
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
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        demo.clear_training_run(str(tmp_path / "file"))
