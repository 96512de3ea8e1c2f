"""The CMake build: configure against the installed torch, build the ops library and the C++
unit tests, run them with ctest."""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What Torch's CMake config prints when a CUDA torch finds no CUDA toolkit, or nvcc without the libraries.
_NO_TOOLKIT = ("PyTorch: CUDA cannot be found", "CUDA_nvrtc_LIBRARY")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="no cmake")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if cmd is configure and out.returncode and torch.version.cuda and any(
                marker in out.stdout + out.stderr for marker in _NO_TOOLKIT):
            pytest.skip("a CUDA torch without a full CUDA toolkit (Torch's CMake config links nvrtc and cuBLAS)")
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "100% tests passed" in out.stdout
    assert "FAIL" not in out.stdout
