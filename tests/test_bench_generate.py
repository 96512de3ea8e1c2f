"""The generation benchmark runs end to end on the CPU at a tiny size (no timing checks)."""
import json
import math

import pytest
import torch

import gptkern
from gptkern import bench_generate
from gptkern.models import GPTConfig
from helpers import assert_argument_error

pytest.importorskip("transformers")


def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "generate.json", tmp_path / "generate.md"
    rc = bench_generate.main(["--quick", "--device", "cpu", "--threads", "1", "--prompt", "4", "--new", "3",
                              "--total", "10", "--repeats", "2", "--out-json", str(out_json), "--out-md", str(out_md)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["model"] == "gpt2-tiny" and report["dtype"] == "float32"
    providers = [(r["case"], r["provider"]) for r in report["results"]]
    assert providers == [("generate", "gptkern"), ("generate", "transformers"),
                         ("cache vs none, 10-token context", "gptkern")]
    ours, theirs, cache = report["results"]
    for value in (ours["decode_tokens_per_s"], theirs["decode_tokens_per_s"], ours["speedup"],
                  cache["with_cache_tokens_per_s"], cache["without_cache_tokens_per_s"], cache["speedup"]):
        assert value is None or value > 0  # null: the longer run timed no slower (noise on a loaded machine)
    assert "| generate | gptkern |" in out_md.read_text()
    assert "decode_tokens_per_s" in capsys.readouterr().out
    assert report["complete"] and ours["warm_tokens"] == 2  # --new 3: the first 2 tokens are not counted


def test_decode_rate_leaves_out_the_warm_tokens(monkeypatch):
    """Tokens/s over the tokens after the first WARM_TOKENS (prefill, eager step, graph capture)."""
    seconds = {3: 40.0, 19: 40.0 + 16 * 2.0}  # a slow start (the capture), then 2 s per token
    monkeypatch.setattr(bench_generate, "_timed", lambda fn, device, repeats, warmup=1: fn())
    rate = bench_generate.decode_rate(lambda prompt, n: seconds[n], 4, 19, "cpu", 1)
    assert rate["warm_tokens"] == 3 and rate["decode_tokens_per_s"] == pytest.approx(0.5)
    seconds[19] = 39.0  # noise: the longer run timed faster, which gives no rate (it had given 1e9 tokens/s)
    assert math.isnan(bench_generate.decode_rate(lambda prompt, n: seconds[n], 4, 19, "cpu", 1)["decode_tokens_per_s"])


def test_timed_is_the_median_after_the_warmup_calls(monkeypatch):
    """An even number of repeats gives the mean of the middle two, not the slower one; warm-up
    calls are not timed."""
    clock = iter([0.0, 1.0, 10.0, 13.0])  # two timed calls: 1 s and 3 s
    monkeypatch.setattr(bench_generate.time, "perf_counter", lambda: next(clock))
    calls = []
    assert bench_generate._timed(lambda: calls.append(1), torch.device("cpu"), 2, warmup=3) == pytest.approx(2.0)
    assert len(calls) == 5


@pytest.mark.parametrize("argv,flag", [(["--providers", "foo"], "--providers"),
                                       (["--providers", "transformers"], "--providers"),
                                       (["--repeats", "1"], "--repeats"), (["--warmup", "-1"], "--warmup"),
                                       (["--prompt", "0"], "--prompt"), (["--prompt", "300"], "--prompt"),
                                       (["--total", "3"], "--total"), (["--total", "8"], "--total"),
                                       (["--preset", "foo"], "--preset")])
def test_bad_flags_are_one_error_line(argv, flag, capsys):
    assert_argument_error(bench_generate.main, ["--quick", "--device", "cpu", *argv], flag, capsys)


def test_new_below_two_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_generate.main(["--quick", "--device", "cpu", "--new", "1"])
    assert exit_info.value.code == 2 and "--new must be at least 2" in capsys.readouterr().err


def test_a_run_cut_short_keeps_the_sections_it_finished(tmp_path, monkeypatch):
    out_json = tmp_path / "generate.json"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_generate, "bench_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_generate.main(["--quick", "--device", "cpu", "--threads", "1", "--prompt", "4", "--new", "3",
                             "--repeats", "2", "--out-json", str(out_json)])
    report = json.loads(out_json.read_text())
    assert not report["complete"] and [r["provider"] for r in report["results"]] == ["gptkern", "transformers"]


def test_decode_kernel_rows_include_a_partly_filled_cache():
    """Full caches, then the longest filled to an eighth, each against a copy of what it reads
    (run on the CPU here at a tiny size; a CUDA section of the benchmark)."""
    rows = bench_generate.bench_decode_kernel(torch.device("cpu"), torch.float32, (64, 128), 2)
    assert [r["case"] for r in rows] == ["decode kernel, cache 64", "decode kernel, cache 128",
                                         "decode kernel, cache 128 filled to 16"]
    assert all(r["median_ms"] > 0 and r["read_gbps"] > 0 and r["fraction_of_copy"] > 0 for r in rows)
    assert {r["provider"] for r in rows} == {"gptkern cpu"}  # auto's choice on CPU tensors
    # the provider names the backend that served the kernel, not "auto"
    with gptkern.backend("torch"):
        rows = bench_generate.bench_decode_kernel(torch.device("cpu"), torch.float32, (64,), 1)
    assert {r["provider"] for r in rows} == {"gptkern torch"}


def test_paged_batch_counts_decode_tokens_only(monkeypatch):
    """The batch row's tokens/s is the steady-state decode rate (prefill not counted), summed
    over the batch's rows."""
    seen = []

    def fake_rate(run, prompt_len, new, device, repeats, warmup=1):
        out = run(prompt_len, new)
        seen.append((out.shape, prompt_len, new))
        return {"start_ms": 1.0, "warm_tokens": 3, "total_ms": 9.0, "decode_tokens_per_s": 250.0}

    monkeypatch.setattr(bench_generate, "decode_rate", fake_rate)
    cfg = GPTConfig.from_name("gpt2-tiny")
    rows = bench_generate.bench_paged_batch(cfg, torch.float32, torch.device("cpu"), 3, 8, 4)
    assert seen == [(torch.Size([3, 12]), 8, 4)]
    assert rows == [{"case": "batch 3, paged cache", "provider": "gptkern", "total_s": 9.0e-3,
                     "decode_tokens_per_s": 750.0}]
    for prompt_len in (1, 2, 3):  # prompts of prompt_len // 4 = 0 tokens had been drawn
        bench_generate.bench_paged_batch(cfg, torch.float32, torch.device("cpu"), 8, prompt_len, 4)


TINY = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=32)


def test_speedups_are_ours_over_theirs_and_the_cache_over_none(monkeypatch):
    """gptkern's decode tokens/s over transformers' and with the cache over without it (above 1:
    faster); the uncached rate is timed with use_cache=False."""
    rates = iter([30.0, 10.0])  # ours, then theirs
    cached = []
    real_generate = bench_generate.generate

    def generate(*args, use_cache=True, **kwargs):
        cached.append(use_cache)
        return real_generate(*args, use_cache=use_cache, **kwargs)

    def fake_rate(run, prompt_len, new, device, repeats, warmup=1):
        run(prompt_len, new)
        return {"start_ms": 1.0, "warm_tokens": 2, "total_ms": 2.0, "decode_tokens_per_s": next(rates)}

    monkeypatch.setattr(bench_generate, "decode_rate", fake_rate)
    ours, theirs = bench_generate.bench_vs_transformers(TINY, torch.float32, torch.device("cpu"), 4, 3, 1, 2)
    assert (ours["provider"], theirs["provider"]) == ("gptkern", "transformers")
    assert ours["speedup"] == pytest.approx(3.0) and "speedup" not in theirs
    monkeypatch.setattr(bench_generate, "generate", generate)
    rates = iter([40.0, 8.0])  # with the cache, then without
    [row] = bench_generate.bench_cache(TINY, torch.float32, torch.device("cpu"), 12, 4, 2)
    assert cached == [True, False]
    assert row["with_cache_tokens_per_s"] == 40.0 and row["without_cache_tokens_per_s"] == 8.0
    assert row["speedup"] == pytest.approx(5.0) and row["case"] == "cache vs none, 12-token context"


def test_decode_kernel_rows_count_the_bytes_read_against_a_copy_of_them(monkeypatch):
    """The kernel reads K and V of the filled length (2·B·Hkv·filled·D elements); a copy of as many
    bytes reads and writes them (twice the traffic); fraction_of_copy is the kernel's GB/s over the
    copy's. The kernel is given the filled length, and timed at least KERNEL_REPEATS times."""
    times, seqlens = [], []

    def fake_time_fn(fn, device, warmup, repeats, queue_ahead=False):
        times.append(repeats)
        return {"median_ms": 2.0 if len(times) % 2 else 0.5}  # the kernel's call, then the copy's

    real = gptkern.ops.decode_attention
    monkeypatch.setattr(bench_generate, "time_fn", fake_time_fn)
    monkeypatch.setattr(gptkern.ops, "decode_attention",
                        lambda q, k, v, lens: (seqlens.append(lens.tolist()), real(q, k, v, lens))[1])
    rows = bench_generate.bench_decode_kernel(torch.device("cpu"), torch.float32, (64,), 2)
    assert times == [bench_generate.KERNEL_REPEATS] * 4
    assert seqlens == [[64] * 8, [8] * 8]  # the full cache, then an eighth of it
    for row, filled in zip(rows, (64, 8)):
        read = 2 * 8 * 8 * filled * 128 * 4
        assert row["median_ms"] == 2.0 and row["read_gbps"] == pytest.approx(read / 2.0 / 1e6)
        assert row["copy_gbps"] == pytest.approx(2 * read / 0.5 / 1e6)
        assert row["fraction_of_copy"] == pytest.approx(0.125)


def test_decode_rate_times_both_runs_after_their_warmup_and_equal_times_give_no_rate(monkeypatch):
    calls = []

    def run(prompt, n):
        calls.append((prompt, n))

    bench_generate.decode_rate(run, 4, 5, torch.device("cpu"), 2, warmup=1)
    assert calls == [(4, 5)] * 3 + [(4, 3)] * 3  # warm-up + 2 timed, each
    monkeypatch.setattr(bench_generate, "_timed", lambda fn, device, repeats, warmup=1: 40.0)
    rate = bench_generate.decode_rate(lambda prompt, n: None, 4, 19, "cpu", 1)
    assert math.isnan(rate["decode_tokens_per_s"])  # (not a ZeroDivisionError)


def test_markdown_leaves_a_speedup_that_could_not_be_measured_empty():
    report = {"meta": bench_generate.metadata(torch.device("cpu"), [], 1, 2), "complete": True, "dtype": "float32",
              "model": "gpt2-tiny",
              "results": [{"case": "generate", "provider": "gptkern", "warm_tokens": 2, "decode_tokens_per_s": 12.5,
                           "speedup": 2.0},
                          {"case": "c", "provider": "gptkern", "with_cache_tokens_per_s": float("nan"),
                           "speedup": float("nan")}]}
    text = bench_generate.markdown(report)
    assert "| generate | gptkern | warm_tokens 2, decode_tokens_per_s 12.5 | 2.00x |" in text
    assert "| c | gptkern | with_cache_tokens_per_s nan |  |" in text


@pytest.mark.parametrize("argv,expected", [
    ([], dict(prompt=16, new=8, total=64, repeats=2, warmup=1, transformers=True)),
    (["--prompt", "5", "--new", "251", "--total", "9", "--repeats", "3", "--warmup", "0", "--providers", "gptkern"],
     dict(prompt=5, new=251, total=9, repeats=3, warmup=0, transformers=False)),  # gpt2-tiny: block_size 256
])
def test_flags_reach_the_sections(argv, expected, tmp_path, monkeypatch):
    """--prompt, --new, --total, --repeats, --warmup and --providers (without transformers: not
    timed) reach the benchmark's sections; prompt + new may fill the model's block_size exactly."""
    seen = {}

    def vs(cfg, dtype, device, prompt, new, batch, repeats, warmup, transformers):
        seen.update(prompt=prompt, new=new, repeats=repeats, warmup=warmup, transformers=transformers)
        return []

    def cache(cfg, dtype, device, total, new, repeats, warmup):
        seen.update(total=total)
        return []

    monkeypatch.setattr(bench_generate, "bench_vs_transformers", vs)
    monkeypatch.setattr(bench_generate, "bench_cache", cache)
    out_json = tmp_path / "g.json"
    argv = ["--quick", "--device", "cpu", "--threads", "1", *argv, "--out-json", str(out_json)]
    assert bench_generate.main(argv) == 0
    assert seen == expected
    assert json.loads(out_json.read_text())["meta"]["warmup"] == expected["warmup"]
