"""The benchmark harness and the CLI run end to end on the CPU (tiny shapes, few repeats)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from gptkern import bench_attention, benchmark


def test_benchmark_main_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "sub" / "bench.md"
    rc = benchmark.main(["--device", "cpu", "--op", "softmax,layer_norm", "--shapes", "4x64",
                         "--repeats", "2", "--warmup", "1", "--providers", "gptkern:torch,torch",
                         "--out-json", str(out_json), "--out-md", str(out_md)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["complete"] is True
    assert {"date_utc", "device_name", "torch", "triton", "python", "gptkern"} <= set(report["meta"])
    assert report["copy"][0]["shape"] == [4, 64] and report["copy"][0]["gbps"] > 0
    results = report["results"]
    assert {(r["op"], r["mode"], r["provider"]) for r in results} == {
        (op, mode, provider) for op in ("softmax", "layer_norm") for mode in ("fwd", "fwd+bwd")
        for provider in ("gptkern:torch", "torch")}
    for r in results:
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] > 0 and r["speedup_vs_torch"] > 0
        assert r["bytes"] == benchmark.traffic_bytes(r["op"], r["mode"], 4, 64, 4)
    markdown = out_md.read_text()
    assert "| op | mode | shape | provider | median ms |" in markdown
    assert "| layer_norm | fwd+bwd | 4x64 | torch |" in markdown
    assert markdown in capsys.readouterr().out
    assert not [p.name for p in tmp_path.rglob("*.tmp*")]


def test_provider_failure_is_a_table_cell():
    def broken(op):
        def forward(x, *params):
            raise RuntimeError("boom")
        return forward

    timed = {"torch": benchmark._torch_provider, "torch.compile": broken}
    rows = benchmark.run_case("rms_norm", "fwd", 2, 32, torch.float32, torch.device("cpu"), timed,
                              warmup=0, repeats=2, copy_gbps=1.0)
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["error"] == "RuntimeError: boom" and "speedup_vs_torch" not in rows[1]
    assert "| rms_norm | fwd | 2x32 | torch.compile | error: RuntimeError: boom |" in \
        benchmark.markdown({"meta": benchmark.metadata(torch.device("cpu"), [], 0, 2),
                            "complete": True, "copy": [], "results": rows, "skipped": {}})


def test_cli_info_runs():
    proc = subprocess.run([sys.executable, "-m", "gptkern", "info"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "available backends" in proc.stdout and "torch" in proc.stdout
    triton_row = next(line for line in proc.stdout.splitlines() if line.startswith("triton "))
    if not torch.cuda.is_available():  # the row says where Triton's kernels run here, or why they do not
        expected = "interpreting" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "no CUDA device"
        assert expected in triton_row or "not installed" in triton_row, triton_row


def test_a_list_entry_given_twice_is_timed_once():
    from gptkern import bench_attention

    assert benchmark._parse_list(benchmark.OPS)("softmax, rms_norm,softmax") == ["softmax", "rms_norm"]
    assert benchmark._parse_shapes("8x16,4x4,8X16") == [(8, 16), (4, 4)]
    assert bench_attention._parse_ints("512,1024,512") == [512, 1024]
    args = benchmark._parser().parse_args(["--providers", "torch,gptkern:triton,torch"])
    assert args.providers == ["torch", "gptkern:triton"]


def test_a_shape_that_does_not_fit_is_an_argument_error(capsys):
    """It had ended in an allocation traceback."""
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--device", "cpu", "--shapes", "100000000000x100000", "--op", "softmax", "--mode", "fwd"])
    assert exit_info.value.code == 2
    assert "argument --shapes: 100000000000x100000 in float32 does not fit on cpu" in capsys.readouterr().err


def test_sizes_past_int64_and_one_file_for_both_outputs_are_argument_errors(tmp_path, capsys):
    """Sizes past int64 had ended in torch's TypeError; the same path for --out-json and --out-md
    had left the Markdown where the JSON was."""
    same = str(tmp_path / "same.out")
    for argv, message in ((["--shapes", "99999999999999999999x2"], "argument --shapes"),
                          (["--out-json", same, "--out-md", same], "argument --out-md: .* is also --out-json")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(["--device", "cpu", "--op", "softmax", "--mode", "fwd", *argv])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    for flag in ("--matmul-n", "--tokens", "--width"):
        with pytest.raises(SystemExit) as exit_info:
            bench_attention.main([flag, "99999999999999999999"])
        assert exit_info.value.code == 2 and f"argument {flag}: must be below 2**31" in capsys.readouterr().err


def test_inputs_that_do_not_fit_are_table_cells(monkeypatch):
    def no_memory(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(benchmark, "_inputs", no_memory)
    rows = benchmark.run_case("softmax", "fwd", 4, 8, torch.float32, torch.device("cpu"),
                              {"torch": None, "gptkern:torch": None}, 0, 2, 1.0)
    assert [r["provider"] for r in rows] == ["torch", "gptkern:torch"]
    assert all(r["status"] == "error" and r["error"] == "the inputs do not fit: RuntimeError: out of memory"
               for r in rows)
    assert "error: the inputs do not fit" in benchmark.markdown(
        {"meta": benchmark.metadata(torch.device("cpu"), [], 0, 2), "complete": True, "copy": [], "results": rows,
         "skipped": {}})


def test_quantiles_are_the_inclusive_20th_and_80th_percentiles():
    """p20/p80 are linear-interpolated deciles over the samples (torch.quantile's default) in float64."""
    times = (torch.rand(23, dtype=torch.float64) * 10).tolist()
    stats = benchmark._quantiles(times)
    t = torch.tensor(times, dtype=torch.float64)
    for key, q in (("median_ms", 0.5), ("p20_ms", 0.2), ("p80_ms", 0.8)):
        assert abs(stats[key] - torch.quantile(t, q).item()) < 1e-12, key


def test_cpu_times_are_milliseconds():
    import time

    stats = benchmark.time_fn(lambda: time.sleep(0.02), torch.device("cpu"), warmup=0, repeats=2)
    assert 20 <= stats["median_ms"] < 2000 and 20 <= stats["first_call_ms"] < 2000, stats


def test_traffic_bytes_follow_the_documented_model():
    """Each op's fwd and bwd counts of N (x), C (a weight row, x's dtype) and R (fp32 per-row stats)."""
    rows, cols, itemsize = (int(v) for v in torch.randint(1, 100, (3,)))
    n, c, r = rows * cols * itemsize, cols * itemsize, rows * 4
    fwd = {"softmax": 2 * n, "log_softmax": 2 * n, "layer_norm": 2 * n + 2 * c + 2 * r, "rms_norm": 2 * n + c + r}
    bwd = {"softmax": 3 * n, "log_softmax": 3 * n, "layer_norm": 3 * n + 3 * c + 2 * r, "rms_norm": 3 * n + 2 * c + r}
    for op in benchmark.OPS:
        assert benchmark.traffic_bytes(op, "fwd", rows, cols, itemsize) == fwd[op], op
        assert benchmark.traffic_bytes(op, "fwd+bwd", rows, cols, itemsize) == fwd[op] + bwd[op], op


def test_providers_time_each_backend_once_and_not_triton_on_the_cpu():
    """'auto' is no provider of its own; Triton on the CPU (the interpreter) is listed as not timed."""
    from gptkern import _backend

    timed, skipped = benchmark.providers(torch.device("cpu"))
    named = {f"gptkern:{b}" for b in _backend.BACKENDS if b != "auto"}
    assert set(timed) | set(skipped) == named | {"torch", "torch.compile"} and not set(timed) & set(skipped)
    assert "gptkern:triton" in skipped and "gptkern:triton" not in timed


def test_run_case_cells_ratios_and_errors():
    """An unsupported provider is its own status; an error keeps its first two lines; % copy is the
    provider's GB/s over the copy's, speedup the torch eager time over the provider's."""
    def failing(exc):
        def make(op):
            def forward(x, *params):
                raise exc
            return forward
        return make

    timed = {"torch": benchmark._torch_provider, "gptkern:torch": benchmark._gptkern_provider("torch"),
             "no": failing(NotImplementedError("not here")), "bad": failing(RuntimeError("one\n\ntwo\nthree"))}
    copy_gbps = float(torch.rand(()) + 0.5)
    rows = benchmark.run_case("layer_norm", "fwd", 3, 16, torch.float32, torch.device("cpu"), timed,
                              warmup=0, repeats=3, copy_gbps=copy_gbps)
    by = {r["provider"]: r for r in rows}
    assert by["no"]["status"] == "unsupported" and by["no"]["error"] == "NotImplementedError: not here"
    assert by["bad"]["status"] == "error" and by["bad"]["error"] == "RuntimeError: one / two"
    for name in ("torch", "gptkern:torch"):
        r = by[name]
        assert r["gbps"] == r["bytes"] / r["median_ms"] / 1e6 and r["copy_fraction"] == r["gbps"] / copy_gbps
        assert r["speedup_vs_torch"] == by["torch"]["median_ms"] / r["median_ms"]


def test_markdown_marks_incomplete_runs_and_escapes_pipes_in_errors():
    rows = [{"op": "softmax", "mode": "fwd", "shape": [2, 8], "provider": "torch", "status": "error",
             "error": "RuntimeError: a | b"}]
    report = {"meta": benchmark.metadata(torch.device("cpu"), [], 0, 2), "copy": [], "results": rows,
              "skipped": {"gptkern:triton": "why"}}
    done = benchmark.markdown({**report, "complete": True})
    assert "(incomplete)" not in done and "error: RuntimeError: a / b |" in done
    assert "Not timed: gptkern:triton (why)." in done
    assert "(incomplete)" in benchmark.markdown({**report, "complete": False}).splitlines()[0]


def test_numbers_that_could_not_be_measured_are_json_null(tmp_path):
    """NaN and inf anywhere in the report (dicts, lists, tuples) are written as null: bare NaN is not JSON."""
    import argparse
    import math

    report = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (math.nan, 2), "e": "x"}
    out = tmp_path / "r.json"
    benchmark._save(report, argparse.Namespace(out_json=str(out), out_md=None), render=lambda r: "")
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "a": None, "b": [1.0, None, {"c": None}], "d": [None, 2], "e": "x", "autotune": benchmark.autotune.choices()}


def test_list_and_shape_parsing():
    import argparse

    assert benchmark._parse_list(benchmark.OPS)("all") == list(benchmark.OPS)
    assert benchmark._parse_shapes(f"{2**62 - 1}x2,1x1") == [(2**62 - 1, 2), (1, 1)]  # 2**63 - 2 elements: int64
    for parse, text in ((benchmark._parse_list(benchmark.OPS), " , "), (benchmark._parse_list(benchmark.OPS), "al"),
                        (benchmark._parse_shapes, "0x5"), (benchmark._parse_shapes, "3x0"),
                        (benchmark._parse_shapes, f"{2**62}x2"), (benchmark._parse_shapes, "2x3x4")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
            parse(text)


@pytest.mark.parametrize("argv,message", [
    (["--providers", " , "], "argument --providers: unknown empty list"),
    (["--repeats", "1"], "argument --repeats: must be >= 2, got 1"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["--threads", "0"], "argument --threads: must be a positive int, got 0"),
])
def test_bad_flags_are_argument_errors_in_every_benchmark(argv, message, capsys):
    """The shared checks (check_common_args, device_from_args) refuse them before any timing."""
    from gptkern import bench_train

    for main in (benchmark.main, bench_train.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--device", "cpu", "--quick", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, main


def test_one_file_for_both_outputs_is_refused_however_it_is_spelled(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        benchmark.main(["--device", "cpu", "--out-json", "same.out", "--out-md", str(tmp_path / "same.out")])
    assert "is also --out-json" in capsys.readouterr().err


def test_device_cuda_without_cuda_is_an_argument_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "--device cuda: no CUDA device here" in capsys.readouterr().err


def test_defaults_per_device_and_quick():
    """bf16 on CUDA and fp32 on the CPU; --quick takes the shorter (warmup, repeats) pair and, without
    --shapes, the first default shape only."""
    parser = benchmark._parser()
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        for quick in (False, True):
            args = parser.parse_args(["--quick"] if quick else [])
            assert benchmark.dtype_and_repeats(parser, args, torch.device(device)) == (
                dtype, *benchmark.REPEATS[device][quick])


def test_quick_keeps_the_shapes_given_and_the_run_saves_after_every_case(tmp_path, monkeypatch):
    """--quick shortens only the default shapes; the JSON is written after each case, so a run cut short
    keeps what it timed, with its metadata and only the chosen providers' skip notes."""
    calls = []
    run_case = benchmark.run_case

    def cut_short(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[:4])
        return run_case(*args, **kwargs)

    monkeypatch.setattr(benchmark, "run_case", cut_short)
    out = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--device", "cpu", "--quick", "--shapes", "2x8,3x8,4x8", "--op", "softmax", "--mode", "fwd",
                        "--providers", "torch,gptkern:triton", "--warmup", "1", "--repeats", "3",
                        "--out-json", str(out)])
    assert calls == [("softmax", "fwd", 2, 8), ("softmax", "fwd", 3, 8)]
    report = json.loads(out.read_text())
    assert report["complete"] is False and len(report["results"]) == 2
    assert (report["meta"]["warmup"], report["meta"]["repeats"]) == (1, 3)
    assert set(report["skipped"]) == {"gptkern:triton"}


def test_the_copy_roof_counts_a_read_and_a_write():
    rows, cols = (int(v) for v in torch.randint(1, 64, (2,)))
    c = benchmark.measure_copy(rows, cols, torch.float32, torch.device("cpu"), warmup=0, repeats=2)
    assert c["bytes"] == 2 * rows * cols * 4 and c["gbps"] == c["bytes"] / c["median_ms"] / 1e6
    assert c["shape"] == [rows, cols] and c["dtype"] == "float32"
