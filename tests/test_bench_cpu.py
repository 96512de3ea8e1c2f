"""benchmarks/bench_cpu.py runs end to end in --quick mode at tiny sizes and writes its JSON; bad
--row-shapes are refused."""
import json
import os
import subprocess
import sys

import pytest

import gptkern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_bench_cpu_quick_tiny(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_cpu.py"), "--quick", "--tiny",
                          "--threads", "1", "--row-shapes", "64x256,3x7", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["threads"] == 1 and report["read_gbps"] > 0 and report["complete"]
    rows = report["rows"]
    assert {(r["case"].split()[0], r["mode"], r["dtype"]) for r in rows} == {
        (case, mode, dtype) for dtype in ("fp32", "bf16")
        for case, mode in [(c, m) for c in ("softmax", "layer_norm", "rms_norm", "attention")
                           for m in ("fwd", "fwd+bwd")] + [("decode", "fwd"), ("linear", "fwd")]}
    assert sum("dropout" in r["case"] for r in rows) == 4  # fwd and fwd+bwd in each dtype
    assert {r["case"] for r in rows if r["case"].startswith("softmax")} == {"softmax 64x256", "softmax 3x7"}
    for r in rows:
        assert r["ratio"] > 0 and r["cpu"]["p20_ms"] <= r["cpu"]["median_ms"] <= r["cpu"]["p80_ms"]
    decode = [r for r in rows if r["case"].startswith(("decode", "linear"))]
    assert all(r["gbps"] > 0 and r["read_fraction"] > 0 for r in decode)
    assert "| case | mode | dtype | cpu ms | torch ms | ratio |" in run.stdout
    assert not [p.name for p in tmp_path.rglob("*.tmp*")]


@pytest.mark.parametrize("shapes", ["3x", "0x5", "4x5x6", "ax3", ""])
def test_bench_cpu_refuses_bad_row_shapes(shapes, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_cpu
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as err:
        bench_cpu.main(["--row-shapes", shapes])
    assert err.value.code == 2 and "--row-shapes" in capsys.readouterr().err
    assert bench_cpu.row_shapes("64x256,3x7,64X256") == [(64, 256), (3, 7)]  # each shape timed once


@pytest.mark.parametrize("argv,flag", [(["--threads", "0"], "--threads"), (["--cases", "foo"], "--cases"),
                                       (["--dtype", ","], "--dtype"), (["--json", __file__ + "/x.json"], "--json")])
def test_bench_cpu_refuses_bad_flags_before_timing(argv, flag, capsys):
    """Bad flags, and a JSON path under a file, fail before anything is timed (they had crashed
    with a traceback, the JSON one after the whole run)."""
    pytest.importorskip("gptkern._C")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_cpu
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as err:
        bench_cpu.main(["--quick", "--tiny", *argv])
    assert err.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_bench_cpu_run_cut_short_keeps_the_cases_it_timed(tmp_path, monkeypatch):
    """The JSON is rewritten after every case (it had been written only at the end), with the
    arguments main() was given."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_cpu
    finally:
        sys.path.pop(0)
    real, calls = bench_cpu.timed_pair, []

    def timed_pair(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the read roof, then two cases
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_cpu, "timed_pair", timed_pair)
    out = tmp_path / "bench.json"
    argv = ["--quick", "--tiny", "--threads", "1", "--dtype", "fp32", "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench_cpu.main(argv)
    report = json.loads(out.read_text())
    assert not report["complete"] and len(report["rows"]) == 2 and report["meta"]["argv"] == argv
