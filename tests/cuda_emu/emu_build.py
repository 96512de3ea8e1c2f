"""Builds the CUDA kernels of csrc/cuda as a CPU library for the emulator (tests/cuda_emu/emu.h).

The sources are copied into build/cuda_emu/src with four kinds of rewrites:
- a kernel declared ``__launch_bounds__(N, ...)`` starts with
  ``::gptkern_emu::check_launch_bounds(N)``: a launch of more threads fails on a GPU;
- a ``__shared__`` declaration becomes a function static followed by
  ``::gptkern_emu::shared_memory(&name, sizeof(name))`` for each variable it declares, which
  fills the variable with 0xff bytes (NaN in every float type) once per block, as shared memory
  holds garbage when a block starts (a static would keep the previous block's values);
- each launch ``kernel<<<grid, block, smem, stream>>>(args);`` becomes a call of
  ``::gptkern_emu::launch(dim3(grid), dim3(block), smem, body)`` where ``body`` calls
  ``kernel`` with the arguments, evaluated once before the launch as on a GPU (on one line,
  followed by the newlines it replaced, so that compiler messages keep their line numbers);
- csrc/ops.cpp's schemas and csrc/cuda/register.cpp's CUDA implementations register as the
  ``gptkern_emu`` library on the CPU key, so ``torch.ops.gptkern_emu.softmax_fwd(...)`` runs the
  CUDA op (its checks, allocations and launchers) on CPU tensors.
Then torch.utils.cpp_extension builds and loads it (about a minute the first time; ninja rebuilds
only what changed).
"""
from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.path.join(ROOT, "build", "cuda_emu")
KERNELS = ("softmax.cu", "norms.cu", "attention.cu", "decode.cu")
HEADERS = ("common.cuh", "mma.cuh", "launchers.h")


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_!r} at offset {start}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "(["
        depth -= c in ")]"
        if c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (a name with template arguments) that ends at ``end``."""
    i = end
    while i > 0:
        c = text[i - 1]
        if c == ">":  # template arguments: back to the matching '<'
            depth = 0
            while True:
                i -= 1
                depth += text[i] == ">"
                depth -= text[i] == "<"
                if depth == 0:
                    break
        elif c.isalnum() or c in "_:":
            i -= 1
        else:
            break
    return i


def _one_line(piece: str) -> str:
    return " ".join(piece.split())


def rewrite_launches(text: str) -> str:
    out, pos = [], 0
    while (open_at := text.find("<<<", pos)) >= 0:
        close_at = text.index(">>>", open_at)
        config = _split_top_level(text[open_at + 3:close_at])
        if len(config) not in (2, 3, 4):
            raise ValueError(f"launch configuration {config} at offset {open_at}")
        name_end = open_at
        while text[name_end - 1].isspace():
            name_end -= 1
        name_start = _kernel_start(text, name_end)
        args_open = close_at + 3
        while text[args_open].isspace():
            args_open += 1
        if text[args_open] != "(":
            raise ValueError(f"no argument list after the launch at offset {open_at}")
        args_close = _matching(text, args_open, "(", ")")
        kernel, args = _one_line(text[name_start:name_end]), text[args_open + 1:args_close]
        config = [_one_line(c) for c in config]  # their newlines go after the call
        smem = config[2] if len(config) > 2 else "0"
        out.append(text[pos:name_start])
        newlines = text.count("\n", name_start, args_open)  # the arguments keep theirs
        out.append(f"[&] {{ auto args_ = std::make_tuple({args}); ::gptkern_emu::launch(dim3({config[0]}), "
                   f"dim3({config[1]}), {smem}, [&] {{ std::apply([&](auto&... a) {{ {kernel}(a...); }}, args_); }}); "
                   f"}}()" + "\n" * newlines)
        pos = args_close + 1
    out.append(text[pos:])
    return "".join(out)


def rewrite_registration(text: str, *, schemas: bool) -> str:
    if schemas:
        return text.replace("TORCH_LIBRARY(gptkern, m)", "TORCH_LIBRARY(gptkern_emu, m)")
    text = text.replace("TORCH_LIBRARY_IMPL(gptkern, CUDA, m)", "TORCH_LIBRARY_IMPL(gptkern_emu, CPU, m)")
    return re.sub(r"\bt\.is_cuda\(\)", "t.is_cpu()", text)


def rewrite_shared(text: str) -> str:
    def one(m: re.Match) -> str:
        indent, align, decl = m.group(1), m.group(2) or "", m.group(3)
        outer = decl
        while (inner := re.sub(r"\[[^\[\]]*\]", "", outer)) != outer:  # drop the array extents
            outer = inner
        names = re.findall(r"(\w+)\s*(?:,|$)", outer)
        if not names:
            raise ValueError(f"no variable in the __shared__ declaration {m.group(0)!r}")
        marks = " ".join(f"::gptkern_emu::shared_memory(&{n}, sizeof({n}));" for n in names)
        return f"{indent}{align}static {decl}; {marks}"

    return re.sub(r"^([ \t]*)__shared__\s+(alignas\(\w+\)\s+)?([^;]+);", one, text, flags=re.M)


def rewrite_launch_bounds(text: str) -> str:
    out, pos = [], 0
    found = 0
    for m in re.finditer(r"__global__\s+void\s+__launch_bounds__\(", text):
        found += 1
        close = _matching(text, m.end() - 1, "(", ")")
        bound = _split_top_level(text[m.end():close])[0]
        body = text.index("{", close)  # a kernel's parameter list holds no brace
        out.append(text[pos:body + 1] + f" ::gptkern_emu::check_launch_bounds({bound});")
        pos = body + 1
    if found != re.sub(r"//.*", "", text).count("__launch_bounds__("):
        raise ValueError("a __launch_bounds__ not written as `__global__ void __launch_bounds__(...) name(`")
    out.append(text[pos:])
    return "".join(out)


def rewrite_kernels(text: str) -> str:
    return rewrite_launch_bounds(rewrite_shared(rewrite_launches(text)))


def _write_if_changed(path: str, text: str) -> None:
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def sources() -> list[str]:
    """Writes the rewritten sources; returns the .cpp files to compile."""
    src = os.path.join(BUILD, "src")
    os.makedirs(src, exist_ok=True)
    cuda = os.path.join(CSRC, "cuda")
    for name in HEADERS:
        with open(os.path.join(cuda, name)) as f:
            _write_if_changed(os.path.join(src, name), f.read())
    files = []
    for name in KERNELS:
        with open(os.path.join(cuda, name)) as f:
            text = rewrite_kernels(f.read())
        files.append(os.path.join(src, name.replace(".cu", "_emu.cpp")))
        _write_if_changed(files[-1], text)
    for path, schemas in ((os.path.join(CSRC, "ops.cpp"), True), (os.path.join(cuda, "register.cpp"), False)):
        with open(path) as f:
            text = rewrite_registration(f.read(), schemas=schemas)
        if "gptkern_emu" not in text:
            raise ValueError(f"{path}: the registration to rewrite was not found")
        files.append(os.path.join(src, os.path.basename(path).replace(".cpp", "_emu.cpp")))
        _write_if_changed(files[-1], text)
    with open(os.path.join(HERE, "faulty.cpp")) as f:
        files.append(os.path.join(src, "faulty_emu.cpp"))
        _write_if_changed(files[-1], rewrite_kernels(f.read()))
    return files + [os.path.join(HERE, "harness.cpp")]


def load(verbose: bool = False) -> None:
    """Builds (when needed) and loads the library: torch.ops.gptkern_emu."""
    import torch
    from torch.utils import cpp_extension

    os.makedirs(BUILD, exist_ok=True)
    cpp_extension.load(
        name="gptkern_cuda_emu", sources=sources(), build_directory=BUILD, is_python_module=False,
        extra_include_paths=[os.path.join(HERE, "shim"), os.path.join(BUILD, "src")],
        extra_cflags=["-O2", "-fno-strict-aliasing", "-DGPTKERN_CUDA_EMU", "-Wno-unknown-pragmas",
                      "-include", os.path.join(HERE, "emu.h")],
        verbose=verbose)
    assert hasattr(torch.ops.gptkern_emu, "take_launches")


if __name__ == "__main__":
    load(verbose=True)
    print("loaded torch.ops.gptkern_emu")
