"""The main job runs and reports every op as correct."""
import subprocess
import sys


def test_demo_correctness_summary():
    out = subprocess.run([sys.executable, "-m", "gptkern", "demo", "--skip-bench"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "correctness: all ok" in out.stdout
    for op in ("softmax", "log_softmax", "layer_norm", "rms_norm", "sdpa causal"):
        assert f"| {op} |" in out.stdout
    assert "| triton |" in out.stdout or "triton" not in out.stdout.split("backends here:")[1].split("\n")[0]
