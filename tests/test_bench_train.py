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
                                       (["--profile", "-1"], "--profile"),
                                       (["--peak-tflops", "0"], "--peak-tflops")])  # (0 would be no MFU)
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


def _fake_step_times(seconds: dict):
    """step_times yielding the given seconds per provider, in turn (no model is built or run)."""
    def step_times(provider, *args):
        yield None
        yield from seconds[provider]
    return step_times


@pytest.mark.parametrize("alternate", [True, False])
def test_rows_are_the_median_step_in_ms_tokens_per_s_mfu_and_speedup(alternate, tmp_path, monkeypatch):
    """tokens/s is batch x block / the median step's seconds; MFU is FLOPs per token (at --block) x
    tokens/s / --peak-tflops; speedup is tokens/s over torch+compile's (above 1: faster); the table
    shows ms and percentages. Sequential (GPU) runs give each provider's median the same way."""
    import torch

    from gptkern.models import GPT, GPTConfig

    if not alternate:
        monkeypatch.setattr(bench_train, "ALTERNATE_ON", ())
    seconds = {"gptkern": [0.1, 0.3, 0.2], "torch": [0.4, 0.4, 0.4], "torch+compile": [0.3, 0.3, 0.3]}
    monkeypatch.setattr(bench_train, "step_times", _fake_step_times(seconds))
    out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
    assert bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--repeats", "3", "--batch", "3",
                             "--block", "8", "--peak-tflops", "1e-9", "--providers", "gptkern,torch,torch+compile",
                             "--out-json", str(out_json), "--out-md", str(out_md)]) == 0
    report = json.loads(out_json.read_text())
    assert (report["batch"], report["block"], report["reference"]) == (3, 8, "torch+compile")
    with torch.device("meta"):
        flops = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=2)).flops_per_token(8)
    rows = {r["provider"]: r for r in report["results"]}
    assert list(rows) == ["gptkern", "torch", "torch+compile"]
    for name, step_s in (("gptkern", 0.2), ("torch", 0.4), ("torch+compile", 0.3)):
        r = rows[name]
        assert r["step_s"] == pytest.approx(step_s) and r["tokens_per_s"] == pytest.approx(24 / step_s)
        assert r["mfu"] == pytest.approx(flops * 24 / step_s / 1e3)
        assert r["speedup"] == pytest.approx(0.3 / step_s)
    mfu = 100 * rows["gptkern"]["mfu"]
    assert f"| gptkern | 200.0 | 120 | {mfu:.1f}% | 1.50x |" in out_md.read_text()


def test_step_times_warm_up_and_set_each_providers_backend(monkeypatch):
    """The torch providers run on the torch backend, gptkern's on auto; warmup steps run before the
    first yield; gptkern-attention's model has torch.nn's norms."""
    import torch

    import gptkern
    from gptkern.models import GPT, GPTConfig

    seen = []
    forward = GPT.forward

    def spy(self, *args, **kwargs):
        norms = {type(m) for m in self.modules() if isinstance(m, torch.nn.LayerNorm)}
        seen.append((gptkern.get_backend(), norms))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8)
    for provider, backend, norm in (("gptkern", "auto", gptkern.nn.LayerNorm), ("torch", "torch", gptkern.nn.LayerNorm),
                                    ("gptkern-attention+compile", "auto", torch.nn.LayerNorm)):
        seen.clear()
        run = bench_train.step_times(provider, cfg, 1, 4, None, torch.device("cpu"), 2)
        assert next(run) is None and len(seen) == 2  # the warmup steps
        assert next(run) > 0 and len(seen) == 3
        assert seen == [(backend, {norm})] * 3, provider


def test_profile_flag_profiles_each_provider(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "step_times", _fake_step_times({"gptkern": [0.1] * 4, "torch": [0.2] * 4}))
    out_json = tmp_path / "train.json"
    assert bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--profile", "1",
                             "--out-json", str(out_json)]) == 0
    assert set(json.loads(out_json.read_text())["profile"]) == {"gptkern", "torch"}


def test_a_block_of_the_models_block_size_is_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "step_times", _fake_step_times({"gptkern": [0.1] * 2}))
    out_json = tmp_path / "train.json"
    assert bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--block", "256", "--providers",
                             "gptkern", "--out-json", str(out_json)]) == 0  # gpt2-tiny: block_size 256
    assert json.loads(out_json.read_text())["block"] == 256
