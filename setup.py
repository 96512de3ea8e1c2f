"""Build script: gptkern (Python) plus the C++ extension gptkern._C with the CPU kernels.

The extension needs torch at build time: install with ``pip install --no-build-isolation -e .``
after torch (the Makefile does). Without torch, or with GPTKERN_BUILD_EXT=0, the package is
pure Python and the ``cpu`` backend is simply unavailable. MAX_JOBS is honoured by ninja.
"""
import glob
import os

from setuptools import setup


def extensions():
    if os.environ.get("GPTKERN_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    sources = ["csrc/ops.cpp", "csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    ext = CppExtension("gptkern._C", sources, include_dirs=[os.path.abspath("csrc")],
                       extra_compile_args={"cxx": ["-O3", "-fopenmp"]}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
