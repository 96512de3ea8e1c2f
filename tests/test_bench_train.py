"""The training-step benchmark runs end to end on the CPU at a tiny size (no timing checks)."""
import json

from gptkern import bench_train


def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
    assert bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--out-json", str(out_json),
                             "--out-md", str(out_md)]) == 0
    report = json.loads(out_json.read_text())
    assert [r["provider"] for r in report["results"]] == ["gptkern", "torch"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in report["results"])
    assert report["results"][1]["speedup"] == 1.0
    assert "| gptkern |" in out_md.read_text() and "tokens/s" in capsys.readouterr().out
