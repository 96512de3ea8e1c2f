"""The generation benchmark runs end to end on the CPU at a tiny size (no timing checks)."""
import json

import pytest

from gptkern import bench_generate

pytest.importorskip("transformers")


def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "generate.json", tmp_path / "generate.md"
    rc = bench_generate.main(["--quick", "--device", "cpu", "--threads", "1", "--prompt", "4", "--new", "3",
                              "--total", "6", "--repeats", "1", "--out-json", str(out_json), "--out-md", str(out_md)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["model"] == "gpt2-tiny" and report["dtype"] == "float32"
    providers = [(r["case"], r["provider"]) for r in report["results"]]
    assert providers == [("generate", "gptkern"), ("generate", "transformers"),
                         ("cache vs none, 6-token context", "gptkern")]
    ours, theirs, cache = report["results"]
    assert ours["decode_tokens_per_s"] > 0 and theirs["decode_tokens_per_s"] > 0 and ours["speedup"] > 0
    assert cache["with_cache_tokens_per_s"] > 0 and cache["without_cache_tokens_per_s"] > 0
    assert "| generate | gptkern |" in out_md.read_text()
    assert "decode_tokens_per_s" in capsys.readouterr().out
