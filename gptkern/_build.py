"""Sources and compiler flags of the C++ extension ``gptkern._C``, shared by ``setup.py`` and the
JIT fallback (``gptkern._jit``). Standard library only: setup.py loads this file by path, before
gptkern is importable.

Switches (environment): ``GPTKERN_BUILD_CUDA`` (unset: CUDA kernels when torch has CUDA and
nvcc is found; ``0`` never; ``1`` always, an error without them), ``GPTKERN_CUDA_ARCHS``
(default ``8.0;9.0``, ``+PTX`` after one also embeds its PTX), ``GPTKERN_CPU_CAPABILITY``
(``default``: no SIMD flags, ``avx2``, ``avx512``; unset: the best the building CPU has).
"""
from __future__ import annotations

import glob
import mmap
import os
import re
from typing import Optional

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cpu_sources(csrc: str) -> list[str]:
    """The op schemas, the build-info module and the CPU kernels."""
    return [os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "bindings.cpp"),
            *sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))]


def cuda_sources(csrc: str) -> list[str]:
    """The CUDA kernels (.cu) and their host-side registration (.cpp)."""
    return [*sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu"))),
            *sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp")))]


# ATen's at::vec picks its 256- or 512-bit Vectorized<float> from these macros; the flags match
# the ones ATen compiles its own AVX2 / AVX512 kernels with.
CPU_CAPABILITIES = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512"]),
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]),
}


def host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_capability() -> str:
    """The SIMD level the CPU kernels are compiled for: ``GPTKERN_CPU_CAPABILITY`` (default, avx2,
    avx512), else the best this CPU has. The extension is built on the machine that runs it; at import,
    gptkern checks that the running CPU has what the build used."""
    wanted = os.environ.get("GPTKERN_CPU_CAPABILITY", "").lower()
    if wanted and wanted != "default" and wanted not in CPU_CAPABILITIES:
        raise ValueError(f"GPTKERN_CPU_CAPABILITY={wanted!r}: expected default, avx2 or avx512")
    if wanted:
        return wanted
    flags = host_cpu_flags()
    return next((name for name, (needs, _) in CPU_CAPABILITIES.items() if needs <= flags), "default")


def built_capability(path: str) -> Optional[str]:
    """The SIMD level a built extension file was compiled for (its gptkern_cpu_capability_tag), read
    without loading it; None when the file has no tag."""
    tag = b"gptkern-cpu-capability="
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(tag)
            value = data[at + len(tag):at + len(tag) + 16] if at >= 0 else None
    except (OSError, ValueError):  # ValueError: an empty file
        return None
    found = re.match(rb"[a-z0-9]+", value) if value else None
    return found.group(0).decode() if found else None


def missing_cpu_flags(capability: str) -> set[str]:
    """The CPU features a build for ``capability`` uses that this CPU lacks (empty: it runs here)."""
    needs = CPU_CAPABILITIES.get(capability, (set(), []))[0]
    flags = host_cpu_flags()
    return needs - flags if flags else set()  # no /proc/cpuinfo: nothing to check against


def cpu_capability_flags() -> list[str]:
    name = cpu_capability()
    return [] if name == "default" else list(CPU_CAPABILITIES[name][1])


def cxx_flags() -> list[str]:
    return ["-O3", "-fopenmp", *cpu_capability_flags()]


def find_nvcc(cuda_home: Optional[str]) -> Optional[str]:
    """nvcc under ``cuda_home`` (torch's CUDA_HOME), or None."""
    if not cuda_home:
        return None
    path = os.path.join(cuda_home, "bin", "nvcc")
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def want_cuda(torch_cuda_version: Optional[str], nvcc: Optional[str]) -> bool:
    """Whether to compile the CUDA kernels, from GPTKERN_BUILD_CUDA and what is installed."""
    switch = os.environ.get("GPTKERN_BUILD_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"GPTKERN_BUILD_CUDA must be 0 or 1, got {switch!r}")
    if switch == "0":
        return False
    missing = [what for what, ok in (("a CUDA build of torch (torch.version.cuda is None)", torch_cuda_version),
                                     ("nvcc (set CUDA_HOME)", nvcc)) if not ok]
    if switch == "1" and missing:
        raise RuntimeError("GPTKERN_BUILD_CUDA=1 but the CUDA kernels cannot be built: no " + " and no ".join(missing))
    return not missing


def parse_archs(text: Optional[str] = None) -> list[tuple[str, bool]]:
    """GPTKERN_CUDA_ARCHS ("8.0;9.0+PTX") as [("80", False), ("90", True)]: (arch, embed PTX)."""
    text = (os.environ.get("GPTKERN_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS) if text is None else text
    archs = []
    for item in filter(None, (s.strip() for s in re.split(r"[;, ]", text))):
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", item)
        if m is None or int(m[1]) < 8:
            raise ValueError(f"GPTKERN_CUDA_ARCHS: {item!r} is not a compute capability of 8.0 or above "
                             f"(the kernels use sm_80 instructions), e.g. '8.0;9.0'")
        archs.append((f"{m[1]}{m[2]}{m[3]}", m[4] is not None))
    if not archs:
        raise ValueError(f"GPTKERN_CUDA_ARCHS names no architecture: {text!r}")
    return archs


def nvcc_flags(archs: list[tuple[str, bool]]) -> list[str]:
    """-O3 and one -gencode per architecture (torch adds none when these are given)."""
    flags = ["-O3", "-lineinfo"]
    for arch, ptx in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def cuda_defines(archs: list[tuple[str, bool]]) -> list[str]:
    """Macros that bindings.cpp reports as build information (no quotes: they pass through shells)."""
    names = [f"sm_{a}" for a, _ in archs] + [f"compute_{a}" for a, ptx in archs if ptx]
    return ["-DGPTKERN_WITH_CUDA", f"-DGPTKERN_CUDA_ARCHS={','.join(names)}"]
