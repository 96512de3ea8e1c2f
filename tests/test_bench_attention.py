"""The attention benchmark runs end to end on the CPU (tiny shapes, few repeats, no timing checks)."""
import json

import pytest
import torch
import torch.nn.functional as F

from gptkern import bench_attention, cli

CPU = torch.device("cpu")


def test_main_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "attention.json", tmp_path / "sub" / "attention.md"
    rc = bench_attention.main([
        "--device", "cpu", "--seqlens", "16", "--head-dims", "8", "--tokens", "48", "--width", "16",
        "--mode", "all", "--matmul-n", "32", "--repeats", "2", "--warmup", "0",
        "--providers", "torch:sdpa,torch:math,torch:padded,torch:loop,torch:efficient,gptkern:torch,gptkern:cuda",
        "--out-json", str(out_json), "--out-md", str(out_md)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["complete"] is True
    assert {"date_utc", "device_name", "torch", "triton", "gptkern", "bwd_timing"} <= set(report["meta"])
    assert report["matmul"]["n"] == 32 and report["matmul"]["tflops"] > 0
    assert set(report["skipped"]) == {"torch:efficient", "gptkern:torch", "gptkern:cuda"}  # cuda: not built or
    # not on CPU tensors; a backend named in --providers that this machine lacks is skipped, not an error
    lengths = report["varlen_lengths"]
    assert lengths == bench_attention.varlen_lengths(48) and 0 < sum(lengths) <= 48
    results = report["results"]
    assert {(r["suite"], r["mode"], r["causal"], r["provider"]) for r in results} == (
        {("dense", m, c, p) for m in ("fwd", "bwd", "fwd+bwd") for c in (False, True)
         for p in ("torch:sdpa", "torch:math")}
        | {("varlen", m, c, p) for m in ("fwd", "bwd", "fwd+bwd") for c in (False, True)
           for p in ("torch:padded", "torch:loop")})
    for r in results:
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["tflops"] > 0 and r["matmul_fraction"] > 0 and r["speedup"] > 0
        if r["suite"] == "dense":
            assert (r["batch"], r["heads"], r["seqlen"], r["head_dim"]) == (3, 2, 16, 8)
            assert r["flops"] == bench_attention.attention_flops(r["mode"], 3, 2, 16, 16, 8, r["causal"])
        else:
            assert r["tokens"] == sum(lengths)
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_ms"] * 1e3)  # tokens per second
            assert r["flops"] == sum(bench_attention.attention_flops(r["mode"], 1, 2, n, n, 8, r["causal"])
                                     for n in lengths)
    markdown = out_md.read_text()
    assert "| op | mode | causal | B | H | L | D | provider | median ms |" in markdown
    assert "Dense: B = max(1, 48 // L) sequences (B·L = 48 tokens where L divides it), H·D = 16" in markdown
    assert "| sdpa | bwd | yes | 3 | 2 | 16 | 8 | torch:math |" in markdown
    assert f"| varlen | fwd+bwd | no | {len(lengths)} | 2 | {max(lengths)} | 8 | torch:loop |" in markdown
    assert "Not timed: torch:efficient (CUDA-only SDPA backend)." in markdown
    table = [line for line in markdown.splitlines() if line.startswith(("| sdpa |", "| varlen |"))]
    assert len(table) == len(results)  # a row per result
    assert markdown in capsys.readouterr().out
    assert not [p.name for p in tmp_path.rglob("*.tmp*")]


def test_unknown_provider_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_attention.main(["--device", "cpu", "--providers", "torch:sdpa,gptkern:nope"])
    assert exit_info.value.code == 2 and "unknown ['gptkern:nope']" in capsys.readouterr().err


def test_failures_are_table_cells():
    def broken(causal):
        def forward(q, k, v):
            raise RuntimeError("compile failed\nbecause of reasons")
        return forward

    timed = {"torch:sdpa": bench_attention._sdpa_dense(None),
             "torch:efficient": bench_attention._sdpa_dense("EFFICIENT_ATTENTION"),  # no CPU kernel
             "torch.compile": broken}
    rows = bench_attention.run_dense_case("fwd+bwd", True, 1, 2, 8, 4, torch.float32, CPU, timed,
                                          warmup=0, repeats=2, matmul_tflops=1.0)
    assert [r["status"] for r in rows] == ["ok", "unsupported", "error"]
    assert rows[2]["error"] == "RuntimeError: compile failed / because of reasons"
    assert "speedup" not in rows[1] and "speedup" not in rows[2]
    report = {"meta": bench_attention.metadata(CPU, [], 0, 2), "complete": True, "tokens": 8, "width": 8,
              "matmul": {"n": 4, "dtype": "float32", "median_ms": 1.0, "tflops": 1.0},
              "varlen_lengths": [], "results": rows, "skipped": {}}
    text = bench_attention.markdown(report)
    assert "| sdpa | fwd+bwd | yes | 1 | 2 | 8 | 4 | torch:efficient | unsupported: RuntimeError" in text
    assert "| torch.compile | error: RuntimeError: compile failed / because of reasons |" in text
    table = [line for line in text.splitlines() if line.startswith("| sdpa ")]
    assert len(table) == 3 and len({line.count("|") for line in table}) == 1  # error rows have every cell
    assert "Autotuning chose" not in text
    report["autotune"] = {"(('fwd', 128), 'cuda:0')": "AttnConfig(block_m=128, tma=True)"}
    assert "- `(('fwd', 128), 'cuda:0')`: `AttnConfig(block_m=128, tma=True)`" in bench_attention.markdown(report)


def test_inputs_that_do_not_fit_are_table_cells(monkeypatch):
    """A --tokens too large for the device: each provider's row says so (no traceback)."""
    def no_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench_attention.torch, "randn", no_memory)
    timed = {"torch:sdpa": bench_attention._sdpa_dense(None), "torch:math": bench_attention._sdpa_dense(None)}
    dense = bench_attention.run_dense_case("fwd", False, 1, 2, 8, 4, torch.float32, CPU, timed,
                                           warmup=0, repeats=2, matmul_tflops=1.0)
    varlen = bench_attention.run_varlen_case("fwd", False, [3, 5], 2, 4, torch.float32, CPU,
                                             {"torch:loop": None}, warmup=0, repeats=2, matmul_tflops=1.0)
    assert [r["provider"] for r in dense + varlen] == ["torch:sdpa", "torch:math", "torch:loop"]
    assert all(r["status"] == "error" and r["error"] == "the inputs do not fit: RuntimeError: out of memory"
               for r in dense + varlen)


@pytest.mark.parametrize("causal", [False, True])
def test_math_attention_matches_sdpa(causal):
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    torch.testing.assert_close(bench_attention.math_attention(q, k, v, causal, 8 ** -0.5),
                               F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_flop_model_and_lengths():
    assert bench_attention.attention_flops("fwd", 2, 3, 5, 7, 11, False) == 4 * 2 * 3 * 5 * 7 * 11
    assert bench_attention.attention_flops("bwd", 1, 1, 4, 4, 2, True) == 2.5 * 0.5 * 4 * 16 * 2
    assert bench_attention.attention_flops("fwd+bwd", 1, 1, 4, 4, 2, False) == 3.5 * 4 * 16 * 2
    # causal with L != S (top-left): the continuous area of the visible region, which a
    # many-row count of visible (query, key) pairs approaches
    for l, s in ((1000, 3000), (3000, 1000)):
        pairs = sum(min(i + 1, s) for i in range(l))
        flops = bench_attention.attention_flops("fwd", 1, 1, l, s, 1, True)
        assert abs(flops / (4 * pairs) - 1) < 1e-3, (l, s)
    lengths = bench_attention.varlen_lengths(16384)
    assert 16384 - 256 < sum(lengths) <= 16384 and all(256 <= n <= 4096 for n in lengths)


def test_cli_forwards_bench_attention(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench-attention", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--width", "--tokens"])
def test_zero_width_or_tokens_is_an_error(flag, capsys):
    """0 is not the default: it is refused as other values out of range are."""
    with pytest.raises(SystemExit) as exit_info:
        bench_attention.main([flag, "0"])
    assert exit_info.value.code == 2 and "--width" in capsys.readouterr().err


@pytest.mark.parametrize("n", ["0", "-3"])
def test_matmul_n_out_of_range_is_an_error(n, capsys):
    """--matmul-n 0 had fallen back to the default roof size."""
    with pytest.raises(SystemExit) as exit_info:
        bench_attention.main(["--matmul-n", n])
    assert exit_info.value.code == 2 and "argument --matmul-n: must be a positive int" in capsys.readouterr().err


def test_a_roof_matmul_too_large_to_allocate_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        # 40 PB a float32 matrix: past any address space (so no overcommit setting can grant it)
        bench_attention.main(["--quick", "--matmul-n", "100000000"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --matmul-n: 100000000x100000000 matrices" in err
    assert "do not fit" in err


def test_finish_fills_tflops_matmul_fraction_and_speedup_against_the_baseline():
    """TFLOP/s is FLOPs / ms / 1e9; % matmul the provider's TFLOP/s over the roof's; speedup the
    baseline's time over the provider's (above 1: faster than the baseline). A failed baseline
    gives no speedups."""
    def row(provider, median_ms):
        return {"provider": provider, "status": "ok", "median_ms": median_ms}

    rows = bench_attention._finish([row("torch:sdpa", 3.0), row("gptkern:cpu", 1.5),
                                    {"provider": "torch:math", "status": "error", "error": "x"}],
                                   flops=6e9, matmul_tflops=8.0, baseline="torch:sdpa")
    base, fast, failed = rows
    assert base["tflops"] == pytest.approx(2.0) and fast["tflops"] == pytest.approx(4.0)
    assert fast["matmul_fraction"] == pytest.approx(0.5)
    assert base["speedup"] == pytest.approx(1.0) and fast["speedup"] == pytest.approx(2.0)
    assert set(failed) == {"provider", "status", "error"}
    rows = bench_attention._finish([{"provider": "torch:sdpa", "status": "unsupported", "error": "x"},
                                    row("gptkern:cpu", 1.5)], 6e9, 8.0, "torch:sdpa")
    assert "speedup" not in rows[1] and rows[1]["tflops"] == pytest.approx(4.0)


def test_matmul_roof_counts_two_flops_per_multiply_add():
    mm = bench_attention.measure_matmul(16, torch.float32, CPU, warmup=0, repeats=2)
    assert mm["n"] == 16 and mm["dtype"] == "float32"
    assert mm["tflops"] == pytest.approx(2 * 16 ** 3 / mm["median_ms"] / 1e9)


def test_markdown_cells_are_in_the_units_of_their_headers():
    """ms, p20-p80 low to high, TFLOP/s, % of the matmul roof, speedup, Mtok/s; an unfinished
    run says so in its title."""
    cells = {"status": "ok", "median_ms": 1.5, "p20_ms": 1.25, "p80_ms": 1.75, "tflops": 4.0,
             "matmul_fraction": 0.5, "speedup": 2.0}
    dense = {"suite": "dense", "op": "sdpa", "mode": "fwd", "causal": True, "batch": 2, "heads": 3,
             "seqlen": 16, "head_dim": 8, "provider": "gptkern:cpu", **cells}
    varlen = {**dense, "suite": "varlen", "op": "varlen", "causal": False, "tokens_per_s": 2.5e6}
    report = {"meta": bench_attention.metadata(CPU, [], 0, 2), "complete": False, "tokens": 32, "width": 24,
              "matmul": {"n": 4, "dtype": "float32", "median_ms": 1.0, "tflops": 8.0},
              "varlen_lengths": [16], "results": [dense, varlen], "skipped": {}}
    text = bench_attention.markdown(report)
    assert text.splitlines()[0].endswith(" (incomplete)")
    assert "| sdpa | fwd | yes | 2 | 3 | 16 | 8 | gptkern:cpu | 1.5000 | 1.2500-1.7500 | 4 | 50.0% | 2.00x |" in text
    assert "| varlen | fwd | no | 2 | 3 | 16 | 8 | gptkern:cpu | 1.5000 | 1.2500-1.7500 | 4 | 50.0% | 2.00x | 2.5 |" \
        in text
    assert "(incomplete)" not in bench_attention.markdown({**report, "complete": True})


def test_the_bwd_mode_times_the_backward_alone():
    """bwd: the forward runs once, outside the timed calls; fwd+bwd: once per timed call, plus
    once at setup."""
    calls = []

    def forward(q, k, v):
        calls.append(1)
        return F.scaled_dot_product_attention(q, k, v)

    inputs = [torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3)]
    for mode, expected in (("fwd", 3), ("bwd", 1), ("fwd+bwd", 4)):
        calls.clear()
        step = bench_attention._step(forward, inputs, mode)
        for _ in range(3):
            step()
        assert len(calls) == expected, mode


@pytest.mark.parametrize("causal", [False, True])
def test_dense_providers_compute_the_same_attention(causal, monkeypatch):
    """Every dense provider (torch.compile's function run eagerly here) computes softmax(q kᵀ/√D) v
    with the case's mask: each times the attention the row says."""
    from torch._functorch import config

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    dense, _, _ = bench_attention.providers(CPU)
    with config.patch(donated_buffer=config.donated_buffer):  # (the torch.compile provider sets it)
        for name, make in dense.items():
            torch.testing.assert_close(make(causal)(q, k, v), expected, msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_providers_compute_the_same_attention(causal):
    """The packed providers' outputs match attention per sequence; the padded baseline's batch is
    right-padded (each sequence at the start of its row) and, causal, its rows' first tokens match
    too (not causal, they also see the zero padding: it has no padding mask, by design)."""
    lengths = [5, 2, 7]
    batch = bench_attention.VarlenBatch(lengths, 2, 8, torch.float32, CPU, requires_grad=False)
    spans = list(zip(batch.bounds, batch.bounds[1:]))
    expected = [F.scaled_dot_product_attention(*(t[lo:hi].transpose(0, 1) for t in (batch.q, batch.k, batch.v)),
                                               is_causal=causal).transpose(0, 1) for lo, hi in spans]
    _, varlen, _ = bench_attention.providers(CPU)
    assert "gptkern:cpu" in varlen or "cpu" not in bench_attention.gptkern.available_backends()
    for name, make in varlen.items():
        forward, inputs = make(batch, causal)
        out = forward(*inputs)
        if name == bench_attention.VARLEN_BASELINE:
            for i, (lo, hi) in enumerate(spans):
                torch.testing.assert_close(inputs[0][i, :, :hi - lo], batch.q[lo:hi].transpose(0, 1))
                if causal:
                    torch.testing.assert_close(out[i, :, :hi - lo].transpose(0, 1), expected[i], msg=name)
        else:
            torch.testing.assert_close(out, torch.cat(expected), msg=name)


def test_not_implemented_is_unsupported_not_an_error():
    def missing(causal):
        def forward(q, k, v):
            raise NotImplementedError("no kernel for this")
        return forward

    rows = bench_attention.run_dense_case("fwd", False, 1, 2, 8, 4, torch.float32, CPU, {"gptkern:x": missing},
                                          warmup=0, repeats=2, matmul_tflops=1.0)
    assert rows[0]["status"] == "unsupported" and rows[0]["error"] == "NotImplementedError: no kernel for this"


@pytest.mark.parametrize("argv,expected", [
    (["--suite", "dense", "--mode", "fwd", "--causal", "yes"], {("dense", "fwd", True)}),
    (["--suite", "varlen", "--mode", "bwd", "--causal", "no"], {("varlen", "bwd", False)}),
])
def test_suite_mode_and_causal_flags_choose_the_cases(argv, expected, tmp_path):
    out_json = tmp_path / "a.json"
    assert bench_attention.main(["--device", "cpu", "--seqlens", "16", "--head-dims", "8", "--tokens", "32",
                                 "--width", "16", "--matmul-n", "8", "--repeats", "2", "--warmup", "0",
                                 "--providers", "torch:sdpa,torch:padded", *argv, "--out-json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())["results"]
    assert results and {(r["suite"], r["mode"], r["causal"]) for r in results} == expected


def test_varlen_lengths_drop_a_remainder_shorter_than_the_shortest_draw():
    for tokens in range(64, 400):
        lengths = bench_attention.varlen_lengths(tokens)
        assert sum(lengths) <= tokens and min(lengths) >= tokens // 64, tokens
    assert bench_attention.varlen_lengths(128) == [29, 14, 26, 30, 15, 3, 10]  # a remainder of 1 < 2 dropped
