"""benchmarks/gpu_check.sh, the script a lent GPU machine runs, exercised here without a GPU: its
step plumbing, GPU_CHECK_STEPS selection and the summary it writes."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_selected_steps_only(tmp_path):
    # the script runs `python3`: this interpreter's
    env = {**os.environ, "GPU_CHECK_STEPS": "info", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = dict(line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines())
    assert steps["info"] == "0"
    assert steps["build"] == "not selected" and steps["bench_generate"] == "not selected"
    summary = (tmp_path / "summary.md").read_text()
    assert "| info | 0 |" in summary and "torch:" in summary
    assert "======== info" in (tmp_path / "steps.log").read_text()


def test_a_mistyped_step_name_is_refused(tmp_path):
    """GPU_CHECK_STEPS names only steps the script has (its list matches its `step NAME` lines)."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    listed = script.split('STEPS=" ')[1].split(' "')[0].split()
    assert listed == [line.split()[1] for line in script.splitlines() if line.startswith("step ")]
    env = {**os.environ, "GPU_CHECK_STEPS": "info,bench_trian"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown step 'bench_trian'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_every_step_runs_when_no_steps_are_named(tmp_path):
    """Unset GPU_CHECK_STEPS (the usual call) runs every step; under `set -u` the name check had
    died on the unset variable before any step. A python3 that fails at once keeps it short."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\nexit 3\n")
    (fake / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_STEPS"}
    env["PATH"] = f"{fake}:/usr/bin:/bin"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "unbound variable" not in result.stderr, result.stderr[-2000:]
    steps = dict(line.split("\t")[:2] for line in (tmp_path / "out" / "steps.tsv").read_text().splitlines())
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert set(steps) == set(script.split('STEPS=" ')[1].split(' "')[0].split())
    assert "not selected" not in steps.values() and steps["info"] == "3"
