"""The benchmark harness and the CLI run end to end on the CPU (tiny shapes, few repeats)."""
import json
import os
import re
import subprocess
import sys

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
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--device", "cpu", "--shapes", "100000000000x100000", "--op", "softmax", "--mode", "fwd"])
    assert exit_info.value.code == 2
    assert "argument --shapes: 100000000000x100000 in float32 does not fit on cpu" in capsys.readouterr().err


def test_sizes_past_int64_and_one_file_for_both_outputs_are_argument_errors(tmp_path, capsys):
    """Sizes past int64 had ended in torch's TypeError; the same path for --out-json and --out-md
    had left the Markdown where the JSON was."""
    import pytest

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
