"""Build script: gptkern (Python) plus the C++ extension gptkern._C: the CPU kernels always, the
CUDA kernels too when the installed torch has CUDA and nvcc is found.

The extension needs torch at build time: install with ``pip install --no-build-isolation -e .``
after torch (the Makefile does). Without torch, or with GPTKERN_BUILD_EXT=0, the package is
pure Python: the ``cpu`` backend then builds the extension at its first use (gptkern._jit).
Switches: GPTKERN_BUILD_CUDA=0/1 (force the CUDA kernels off / on), GPTKERN_CUDA_ARCHS (default
"8.0;9.0"), GPTKERN_CPU_CAPABILITY=default/avx2/avx512 (unset: the best of this CPU); MAX_JOBS
is honoured by ninja.
A regular (non-editable) install also ships csrc/ as gptkern/_csrc, for that JIT build.
"""
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_helpers():
    """gptkern/_build.py, loaded by path: gptkern itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("gptkern_build", os.path.join(ROOT, "gptkern", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package (gptkern/_csrc) for the JIT fallback."""

    def run(self):
        super().run()
        if not self.dry_run and not getattr(self, "editable_mode", False):  # editable: csrc/ is beside gptkern/
            target = os.path.join(self.build_lib, "gptkern", "_csrc")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, "csrc"), target)


def extensions():
    cmdclass = {"build_py": BuildPyWithSources}
    if os.environ.get("GPTKERN_BUILD_EXT", "1") == "0":
        return [], cmdclass
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], cmdclass
    helpers = _build_helpers()
    sources = [os.path.relpath(p, ROOT) for p in helpers.cpu_sources(os.path.join(ROOT, "csrc"))]
    cxx = helpers.cxx_flags()
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if helpers.want_cuda(torch.version.cuda, helpers.find_nvcc(CUDA_HOME)):
        archs = helpers.parse_archs()
        defines = helpers.cuda_defines(archs)
        sources += [os.path.relpath(p, ROOT) for p in helpers.cuda_sources(os.path.join(ROOT, "csrc"))]
        ext = CUDAExtension("gptkern._C", sources, extra_compile_args={
            "cxx": cxx + defines, "nvcc": helpers.nvcc_flags(archs) + defines}, **kwargs)
    else:
        ext = CppExtension("gptkern._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    return [ext], cmdclass


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
