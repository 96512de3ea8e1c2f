"""The CUDA kernels compile on a machine without a GPU: every csrc/cuda/*.cu is compiled with
nvcc for sm_80 and sm_90 (``-Xptxas -v``), and ptxas must report no spill stores or loads in any
function and no stack frame in any kernel. The host files of a CUDA build (register.cpp, and
bindings.cpp with GPTKERN_WITH_CUDA) must compile against the installed torch headers.

The .cu files include only light headers (ATen/core/TensorBase.h, c10/cuda/CUDAStream.h), so a
compile takes seconds; C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for the CUDA build's
generated cuda_cmake_macros.h. ptxas output is cached in the temp directory by a hash of the
sources, flags and nvcc version. ``python tests/test_cuda_compile.py`` prints the
register / spill table.
"""
import concurrent.futures
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = ("80", "90")
CU_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CUDA_DIR, "*.cu")))
JOBS = 2


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)


NVCC = find_nvcc()


def cuda_include_dirs() -> list[str]:
    """Where the CUDA headers may be: beside CUDA_HOME's nvcc, or /usr/local/cuda."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    return [os.path.join(h, "include") for h in homes if h]


def torch_includes():
    import torch.utils.cpp_extension as ext

    return ext.include_paths()


def nvcc_flags(arch: str) -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the __CUDA_NO_HALF_* macros of a real build

    return ["-std=c++17", "-O3", "-lineinfo", f"-arch=sm_{arch}", "-Xptxas", "-v",
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *COMMON_NVCC_FLAGS,
            *(f"-I{p}" for p in torch_includes()), f"-I{CUDA_DIR}"]


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
    for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*"))):
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    return h.hexdigest()[:24]


def _cached_run(cmd: list[str], key: str) -> tuple[int, str]:
    """(return code, stdout + stderr) of cmd, from the cache when the key was seen."""
    cache = os.path.join(tempfile.gettempdir(), "gptkern-nvcc-cache")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, key + ".log")
    if os.path.exists(path):
        with open(path) as f:
            return 0, f.read()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    if out.returncode == 0:
        temporary = f"{path}.{os.getpid()}.tmp"  # (xdist workers may compile the same key at once)
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    return out.returncode, text


def compile_cu(name: str, arch: str) -> tuple[int, str]:
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    flags = nvcc_flags(arch)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, "-c", os.path.join(CUDA_DIR, name), "-o", os.path.join(tmp, "out.o"), *flags]
        return _cached_run(cmd, _hash(version, name, arch, " ".join(flags)))


ENTRY_RE = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
PROPS_RE = re.compile(r"Function properties for (\S+)")
STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS_RE = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict[str, dict]:
    """{mangled function: {entry, regs, stack, spill_stores, spill_loads}} from ptxas -v output."""
    funcs: dict[str, dict] = {}
    entries, current = set(), None
    for line in text.splitlines():
        if m := ENTRY_RE.search(line):
            entries.add(m[1])
        if m := PROPS_RE.search(line):
            current = m[1]
            funcs.setdefault(current, {"entry": current in entries, "regs": None})
        elif current and (m := STACK_RE.search(line)):
            funcs[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current and (m := REGS_RE.search(line)):
            funcs[current]["regs"] = int(m[1])
    return funcs


def problems(funcs: dict[str, dict]) -> list[str]:
    bad = []
    for name, f in funcs.items():
        if f.get("spill_stores") or f.get("spill_loads"):
            bad.append(f"{demangle(name)}: {f['spill_stores']} bytes spill stores, {f['spill_loads']} loads")
        if f["entry"] and f.get("stack"):
            bad.append(f"{demangle(name)}: {f['stack']} bytes stack frame")
    return bad


def demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return name
    return re.sub(r"gptkern::cuda::\(anonymous namespace\)::", "", out or name)


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
# about 2 minutes on 2 cores without the cache, seconds with it; one xdist worker takes the module
# (make test's --dist loadgroup), or each would compile everything
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cuda_compile")]


@pytest.fixture(scope="module")
def ptxas_reports():
    """{(file, arch): (returncode, output)}, compiled JOBS at a time."""
    pytest.importorskip("torch")
    pairs = [(name, arch) for name in CU_FILES for arch in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        results = pool.map(lambda p: compile_cu(*p), pairs)
        return dict(zip(pairs, results))


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles_without_spills(ptxas_reports, name, arch):
    rc, text = ptxas_reports[(name, arch)]
    assert rc == 0, f"nvcc failed on {name} for sm_{arch}:\n{text[-6000:]}"
    errors = [line for line in text.splitlines()
              if re.search(r"\berror\b|warning #\d+-D: .*(instantiation|stub)", line)]
    assert not errors, "\n".join(errors)
    funcs = parse_ptxas(text)
    assert any(f["entry"] for f in funcs.values()), f"no kernel found in {name}"
    bad = problems(funcs)
    assert not bad, f"{name} sm_{arch}:\n" + "\n".join(bad)


@needs_nvcc
def test_parser_sees_spills(tmp_path):
    """A kernel forced to spill (16 registers for a 64-float array) is reported."""
    src = tmp_path / "spill.cu"
    src.write_text("__global__ void spill(float* x, int n) {\n  float a[64];\n"
                   "  for (int i = 0; i < 64; ++i) a[i] = x[i * n];\n"
                   "  float s = 0;\n  for (int i = 0; i < 64; ++i) s += a[(i * 7) % 64] * a[i];\n"
                   "  x[threadIdx.x] = s;\n}\n")
    out = subprocess.run([NVCC, "-c", str(src), "-o", str(tmp_path / "s.o"), "-arch=sm_90", "-Xptxas", "-v",
                          "-maxrregcount=16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    funcs = parse_ptxas(out.stdout + out.stderr)
    assert funcs and problems(funcs), funcs


def host_compile(source: str, extra: list[str]) -> subprocess.CompletedProcess:
    cxx = os.environ.get("CXX", "c++")
    includes = [f"-isystem{p}" for p in torch_includes()]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", *includes, f"-I{os.path.join(ROOT, 'csrc')}", *extra,
           os.path.join(ROOT, "csrc", *source.split("/"))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@needs_nvcc
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no host C++ compiler")
def test_host_files_of_the_cuda_build_compile():
    cuda_include = next((d for d in cuda_include_dirs() if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))),
                        None)
    assert cuda_include is not None, f"no cuda_runtime_api.h in {cuda_include_dirs()}"
    builds = {
        "cuda/register.cpp": [],
        "bindings.cpp": ["-DGPTKERN_WITH_CUDA", "-DGPTKERN_CUDA_ARCHS=sm_80,sm_90", f"-isystem{cuda_include}",
                         f"-isystem{sysconfig.get_paths()['include']}"],
    }
    with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        results = dict(zip(builds, pool.map(lambda item: host_compile(*item), builds.items())))
    for source, out in results.items():
        assert out.returncode == 0, f"{source}:\n{out.stderr[-6000:]}"


def _table() -> str:
    lines = ["| kernel | arch | registers | stack | spill stores | spill loads |", "|---|---|---:|---:|---:|---:|"]
    for name in CU_FILES:
        for arch in ARCHS:
            rc, text = compile_cu(name, arch)
            if rc:
                lines.append(f"| {name}: compile failed | sm_{arch} | | | | |")
                continue
            for mangled, f in sorted(parse_ptxas(text).items(), key=lambda kv: demangle(kv[0])):
                if f["entry"]:
                    lines.append(f"| {demangle(mangled)[:110]} | sm_{arch} | {f['regs']} | {f.get('stack')} "
                                 f"| {f.get('spill_stores')} | {f.get('spill_loads')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if NVCC is None:
        sys.exit("nvcc not found")
    print(_table())
