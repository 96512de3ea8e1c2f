"""The training-step benchmark runs end to end on the CPU at a tiny size (no timing checks)."""
import json

import pytest

from gptkern import bench_train
from helpers import assert_argument_error


def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
    assert bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--out-json", str(out_json),
                             "--out-md", str(out_md)]) == 0
    report = json.loads(out_json.read_text())
    assert [r["provider"] for r in report["results"]] == ["gptkern", "torch"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in report["results"])
    assert report["results"][1]["speedup"] == 1.0 and report["complete"]
    assert "| gptkern |" in out_md.read_text() and "tokens/s" in capsys.readouterr().out


def test_a_run_cut_short_keeps_the_rounds_it_timed(tmp_path, monkeypatch):
    """On the CPU the providers alternate step by step and the files are rewritten after each
    round: a run interrupted in its second round keeps the first round's times, marked incomplete."""
    out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
    real, order = bench_train.step_times, []

    def step_times(provider, *args):
        run = real(provider, *args)
        yield next(run)  # built and warmed
        order.append(provider)
        yield next(run)  # round 1
        if provider == "torch":
            raise KeyboardInterrupt
        order.append(provider)
        yield next(run)

    monkeypatch.setattr(bench_train, "step_times", step_times)
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--repeats", "3", "--out-json",
                          str(out_json), "--out-md", str(out_md)])
    assert order == ["gptkern", "torch", "gptkern"]  # alternating
    report = json.loads(out_json.read_text())
    assert not report["complete"] and [r["provider"] for r in report["results"]] == ["gptkern", "torch"]
    assert report["results"][1]["speedup"] == 1.0
    assert "(incomplete)" in out_md.read_text() and "alternating" in out_md.read_text()


def test_a_sequential_run_cut_short_keeps_the_providers_it_timed(tmp_path, monkeypatch):
    """One provider after another (as on a GPU), saved after each: the first one's row survives an
    interrupted second, marked incomplete, and with no torch provider timed there is no speedup
    column to fill."""
    monkeypatch.setattr(bench_train, "ALTERNATE_ON", ())
    out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
    real = bench_train.step_time
    calls = []

    def step_time(provider, *args):
        calls.append(provider)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(provider, *args)

    monkeypatch.setattr(bench_train, "step_time", step_time)
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--out-json", str(out_json),
                          "--out-md", str(out_md)])
    report = json.loads(out_json.read_text())
    assert not report["complete"] and report["reference"] is None
    assert [r["provider"] for r in report["results"]] == ["gptkern"] and "speedup" not in report["results"][0]
    text = out_md.read_text()
    assert "(incomplete)" in text and "speedup: none" in text and "nan" not in text


@pytest.mark.parametrize("argv,flag", [(["--providers", "foo"], "--providers"), (["--providers", ","], "--providers"),
                                       (["--repeats", "0"], "--repeats"), (["--warmup", "-3"], "--warmup"),
                                       (["--batch", "0"], "--batch"), (["--block", "100000"], "--block"),
                                       (["--peak-tflops", "-5"], "--peak-tflops"), (["--preset", "foo"], "--preset"),
                                       (["--profile", "-1"], "--profile")])
def test_bad_flags_are_one_error_line(argv, flag, capsys):
    assert_argument_error(bench_train.main, ["--quick", "--device", "cpu", *argv], flag, capsys)
