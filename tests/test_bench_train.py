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


def test_a_provider_failing_after_a_timed_step_leaves_one_error_row(tmp_path, monkeypatch):
    """Its earlier time no longer stands (nor a speedup from it); the error, with a newline and a
    pipe in it, stays one table row."""
    out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
    real = bench_train.step_times

    def step_times(provider, *args):
        run = real(provider, *args)
        yield next(run)
        yield next(run)
        if provider == "gptkern":
            raise RuntimeError("Inductor failed\nfrom user code: x | y")
        yield from run

    monkeypatch.setattr(bench_train, "step_times", step_times)
    assert bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--repeats", "3", "--out-json",
                             str(out_json), "--out-md", str(out_md)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    assert [r["provider"] for r in rows] == ["gptkern", "torch"] and "step_s" not in rows[0]
    assert rows[0]["error"] == "RuntimeError: Inductor failed / from user code: x | y"
    table = [line for line in out_md.read_text().splitlines() if line.startswith("| gptkern")]
    assert table == ["| gptkern | error: RuntimeError: Inductor failed / from user code: x / y | | | |"]


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


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_torch_norms_keeps_the_model_and_leaves_gptkern_its_attention(norm, monkeypatch):
    """gptkern-attention+compile's model: the norms become torch.nn's (same state_dict, same loss),
    gptkern's norm ops are no longer called, its attention still is."""
    import torch

    import gptkern
    from gptkern.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, norm=norm))
    x = torch.randint(0, 64, (2, 16))
    keys, (_, before) = model.state_dict().keys(), model(x, x)
    assert bench_train.torch_norms(model) is model
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert len(norms) == 5 and not any(isinstance(m, (gptkern.nn.LayerNorm, gptkern.nn.RMSNorm)) for m in norms)
    assert model.state_dict().keys() == keys
    calls = []
    for name in ("layer_norm", "rms_norm", "scaled_dot_product_attention"):
        monkeypatch.setattr(gptkern.ops, name, lambda *a, _f=getattr(gptkern.ops, name), _n=name, **k:
                            (calls.append(_n), _f(*a, **k))[1])
    _, after = model(x, x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert set(calls) == {"scaled_dot_product_attention"}
