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
            assert r["tokens"] == sum(lengths) and r["tokens_per_s"] > 0
            assert r["flops"] == sum(bench_attention.attention_flops(r["mode"], 1, 2, n, n, 8, r["causal"])
                                     for n in lengths)
    markdown = out_md.read_text()
    assert "| op | mode | causal | B | H | L | D | provider | median ms |" in markdown
    assert "Dense: B = max(1, 48 // L) sequences (B·L = 48 tokens where L divides it), H·D = 16" in markdown
    assert "| sdpa | bwd | yes | 3 | 2 | 16 | 8 | torch:math |" in markdown
    assert f"| varlen | fwd+bwd | no | {len(lengths)} | 2 | {max(lengths)} | 8 | torch:loop |" in markdown
    assert "Not timed: torch:efficient (CUDA-only SDPA backend)." in markdown
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
