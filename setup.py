"""Build script: gptkern (Python) plus the C++ extension gptkern._C with the CPU kernels.

The extension needs torch at build time: install with ``pip install --no-build-isolation -e .``
after torch (the Makefile does). Without torch, or with GPTKERN_BUILD_EXT=0, the package is
pure Python and the ``cpu`` backend is simply unavailable. MAX_JOBS is honoured by ninja.
"""
import glob
import os

from setuptools import setup


def cpu_capability_flags():
    """AVX2 + FMA + F16C (ATen's 256-bit at::vec, with Sleef's exp) when the building CPU has them: the
    extension is built on the machine that runs it. GPTKERN_CPU_CAPABILITY=default turns it off."""
    if os.environ.get("GPTKERN_CPU_CAPABILITY", "").lower() == "default":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return []


def extensions():
    if os.environ.get("GPTKERN_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    sources = ["csrc/ops.cpp", "csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-fopenmp"] + cpu_capability_flags()
    ext = CppExtension("gptkern._C", sources, include_dirs=[os.path.abspath("csrc")],
                       extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
