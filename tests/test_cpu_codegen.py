"""The CPU kernels' inner loops keep their vector accumulators in registers.

GCC 12 once kept the fp32 decode's accumulators on the stack, so that every FMA read and wrote
memory and the decode ran at 60% of its speed, while every test passed. Here the memory-bound
kernels (decode, GEMV, norms, softmax) and attention are compiled to assembly with the
extension's flags for AVX-512 and AVX2 (no such CPU is needed to compile), and the test fails on
any vector FMA inside a loop whose stack operand the loop also stores to: an accumulator in memory. A
loop is the lines between a label and a conditional jump back to it, which is how GCC lays out
hot loops (code run once per outer iteration, closed by a plain jmp, is not checked; nor is a
spill reloaded into a register before its FMA). The assembly is cached in the temp directory
by a hash of the sources, flags, compiler and torch version. ``python tests/test_cpu_codegen.py``
prints the counts.
"""
import concurrent.futures
import glob
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gptkern._build import CPU_CAPABILITIES, cxx_flags  # noqa: E402

CXX = os.environ.get("CXX", "c++")
# (file, capabilities): attention is compute-bound and slow to compile, so AVX-512 only.
CASES = [(name, cap) for name in ("decode.cpp", "linear.cpp", "norms.cpp", "softmax.cpp")
         for cap in ("avx512", "avx2")]
CASES.append(("attention.cpp", "avx512"))

pytestmark = [pytest.mark.skipif(
    platform.machine() != "x86_64" or not sys.platform.startswith("linux") or shutil.which(CXX) is None,
    reason="reads GNU assembler output: needs x86-64 Linux with a C++ compiler"),
    # one xdist worker takes the module (make test's --dist loadgroup): each would compile every assembly
    pytest.mark.xdist_group("cpu_codegen")]

LABEL = re.compile(r"^(\.L\w+):")
BACK_JUMP = re.compile(r"^\s+j(?!mp\b)\w+\s+(\.L\w+)\s*$")  # conditional jumps only
STACK_FMA = re.compile(r"vfn?m(?:add|sub)\w*p[sd]\s+(-?\w*\(%r[sb]p\))")  # packed: scalar tails are short
STACK_STORE = re.compile(r"vmov\w*\s+%[xyz]mm\d+,\s*(-?\w*\(%r[sb]p\))")
CALL = re.compile(r"^\s+call\b")


def stack_fmas_in_loops(asm: str) -> list[str]:
    """FMAs whose operand is a stack slot that the same loop also stores to: an accumulator
    kept in memory. A loop is the lines between a label and a conditional jump back to it.
    Read-only slots (constants that did not fit the registers, as in AVX2's exp polynomial)
    and loops that call a function (every vector register is caller-saved there, so values
    live across the call are spilled by any compiler) are not counted."""
    lines = asm.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := BACK_JUMP.match(line)) and labels.get(m.group(1), i) < i]
    found = {}
    for a, b in loops:
        body = lines[a:b + 1]
        if any(CALL.match(line) for line in body):
            continue
        stored = {m.group(1) for line in body if (m := STACK_STORE.search(line))}
        for i, line in enumerate(body, a):
            if (m := STACK_FMA.search(line)) and m.group(1) in stored:
                found[i] = line.strip()
    return [found[i] for i in sorted(found)]


def compile_flags(cap: str) -> list[str]:
    """The extension's flags (gptkern._build.cxx_flags, torch 2.13's -std=c++20) for capability cap."""
    from torch.utils.cpp_extension import include_paths
    every_capability = {flag for _, flags in CPU_CAPABILITIES.values() for flag in flags}
    base = [flag for flag in cxx_flags() if flag not in every_capability]
    return ["-std=c++20", "-fPIC", "-w", *base, *CPU_CAPABILITIES[cap][1],
            "-I", os.path.join(ROOT, "csrc"), *[f"-I{p}" for p in include_paths()]]


def assembly(name: str, cap: str) -> str:
    import torch
    flags = compile_flags(cap)
    key = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*"))):
        with open(path, "rb") as f:
            key.update(path.encode() + f.read())
    key.update(" ".join([CXX, name, torch.__version__, *flags]).encode())
    key.update(subprocess.run([CXX, "--version"], capture_output=True).stdout)
    cache = os.path.join(tempfile.gettempdir(), f"gptkern-cpu-asm-{key.hexdigest()[:16]}.s")
    if not os.path.exists(cache):
        tmp = f"{cache}.{os.getpid()}.tmp"
        try:
            proc = subprocess.run([CXX, *flags, "-S", os.path.join(ROOT, "csrc", "cpu", name), "-o", tmp],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, f"{CXX} failed on {name} ({cap}):\n{proc.stderr[-3000:]}"
            os.replace(tmp, cache)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    with open(cache) as f:
        return f.read()


@pytest.fixture(scope="module")
def assemblies():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {case: pool.submit(assembly, *case) for case in CASES}
        return {case: fut.result() for case, fut in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_no_stack_accumulators_in_loops(assemblies, case):
    bad = stack_fmas_in_loops(assemblies[case])
    assert not bad, f"{case[0]} ({case[1]}): {len(bad)} FMAs read the stack inside loops, e.g. {bad[:4]}"


def test_checker_finds_a_stack_accumulator_in_a_loop():
    spilled = """
.L7:
\tvbroadcastss\t(%rsi,%rax,4), %zmm0
\tvfmadd213ps\t-120(%rsp), %zmm0, %zmm1
\tvmovaps\t%zmm1, -120(%rsp)
\tcmpq\t%r11, %rax
\tjne\t.L7
\tvfmadd213ps\t8(%rsp), %zmm0, %zmm2
\tjmp\t.L7
"""
    assert stack_fmas_in_loops(spilled) == ["vfmadd213ps\t-120(%rsp), %zmm0, %zmm1"]
    in_registers = spilled.replace("-120(%rsp)", "%zmm3").replace("8(%rsp)", "%zmm4")
    assert stack_fmas_in_loops(in_registers) == []
    constant = spilled.replace("\tvmovaps\t%zmm1, -120(%rsp)\n", "")  # read-only slot: a constant
    assert stack_fmas_in_loops(constant) == []
    calling = spilled.replace("\tcmpq", "\tcall\tSleef_expf16_u10@PLT\n\tcmpq")
    assert stack_fmas_in_loops(calling) == []


if __name__ == "__main__":
    for case in CASES:
        print(f"{case[0]:15s} {case[1]:7s} {len(stack_fmas_in_loops(assembly(*case)))} stack FMAs in loops")
