"""The ``gptkern`` command (also ``python -m gptkern``).

Subcommands: ``info`` (versions, device, backends), ``prepare`` (text to token shards, see
``gptkern.data.prepare``), ``generate`` (text from a model, see
``gptkern.generation.cli``), ``bench`` (kernel benchmarks, see
``gptkern.benchmark``) and ``demo`` (the main job, see ``gptkern.demo``). ``bench`` and
``demo`` (and ``prepare``, ``generate``) hand every argument after their name to their module's ``main(argv) -> int``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Callable, Optional, Sequence

import torch

from gptkern._jit import JITBuildError
from gptkern.train.checkpoint import CheckpointWriteError


def info() -> int:
    import gptkern
    from gptkern import _backend
    from gptkern.benchmark import device_name

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cap = torch.cuda.get_device_capability(0)
        device = f"cuda: {', '.join(names)} (sm_{cap[0]}{cap[1]})"
    else:
        device = f"cpu: {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads"
    ext = _backend._extension()
    rows = [
        ("gptkern", gptkern.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("triton", _triton_info()),
        ("device", device),
        ("available backends", ", ".join(gptkern.available_backends())),
        ("current backend", f"{_current_backend()} (GPTKERN_BACKEND="
                            f"{os.environ.get('GPTKERN_BACKEND', 'unset')})"),
        ("C++ extension", _extension_info(ext)),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _current_backend() -> str:
    import gptkern

    try:
        return gptkern.get_backend()
    except ValueError as err:  # a bad GPTKERN_BACKEND: every op call will raise this
        return f"none: {err}"


def _triton_info() -> str:
    """Triton's version and where its kernels run here, or why they cannot (the module, whichever
    distribution installed it: triton, pytorch-triton, ...)."""
    from gptkern import _backend

    if not _backend._has_triton():
        return "not installed: the triton backend is off (pip install triton for CUDA GPUs)"
    try:
        import triton  # an installed but broken triton fails here, not at the first kernel
    except Exception as err:  # ImportError, or whatever a broken install's import raises
        return f"installed, but it does not import ({type(err).__name__}: {err}): the triton backend is off"
    version = getattr(triton, "__version__", "unknown version")
    if _backend.triton_interpret():
        return f"{version}, interpreting its kernels on the CPU (TRITON_INTERPRET is set)"
    if torch.cuda.is_available():
        return f"{version}, compiling for the CUDA device"
    return (f"{version}, unused here: no CUDA device (TRITON_INTERPRET=1 runs its kernels on the CPU, "
            f"slowly, for tests)")


def _extension_info(ext) -> str:
    """How gptkern._C was built (devices, CUDA version and targets), or why there is none."""
    if ext is None:
        from gptkern import _backend, _jit

        why = _backend._EXT_MISSING or "gptkern._C is not built"
        then = ("the cpu backend builds it at its first use" if _jit.available()
                else f"no JIT build: {_jit.unavailable_reason()}")
        return f"not loaded: {why}; {then}"
    text = "built, devices: " + ", ".join(getattr(ext, "devices", ()))
    text += f"; CPU kernels for {getattr(ext, 'cpu_capability', 'default')}" + (
        " with OpenMP" if getattr(ext, "openmp", False) else "")
    if getattr(ext, "cuda_version", None):
        text += f"; CUDA {ext.cuda_version} kernels for {', '.join(ext.cuda_archs)}"
    if getattr(ext, "cxx_runtime_private", False):
        text += "; C++ runtime: its own static copy of libstdc++ (rebuild: see the warning)"
    elif getattr(ext, "cxx_runtime", ""):
        text += f"; C++ runtime: {ext.cxx_runtime}"
    jit_dir = getattr(ext, "jit_build_dir", None)
    return text + (f" (JIT build in {jit_dir})" if jit_dir else "")


def bench(argv: list[str]) -> int:
    from gptkern import benchmark

    return benchmark.main(argv)


def bench_attention(argv: list[str]) -> int:
    from gptkern import bench_attention as bench_attention_module

    return bench_attention_module.main(argv)


def generate(argv: list[str]) -> int:
    from gptkern.generation import cli as generate_cli

    return generate_cli.main(argv)


def train(argv: list[str]) -> int:
    from gptkern.train import cli as train_cli

    return train_cli.main(argv)


def finetune(argv: list[str]) -> int:
    from gptkern.train import cli as train_cli

    return train_cli.finetune_main(argv)


def prepare(argv: list[str]) -> int:
    from gptkern.data.prepare import main as prepare_main

    return prepare_main(argv)


def demo(argv: list[str]) -> int:
    from gptkern import demo as demo_module

    return demo_module.main(argv)


# Subcommands whose arguments go, unparsed, to another module's main.
FORWARDED: dict[str, Callable[[list[str]], int]] = {"bench": bench, "bench-attention": bench_attention,
                                                    "demo": demo, "generate": generate, "train": train,
                                                    "finetune": finetune, "prepare": prepare}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptkern", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("info", help="print versions, device and backends")
    sub.add_parser("bench", add_help=False,
                   help="time the kernels against PyTorch (gptkern bench -h for options)")
    sub.add_parser("bench-attention", add_help=False,
                   help="time attention against torch SDPA (gptkern bench-attention -h for options)")
    sub.add_parser("demo", add_help=False, help="run the main job (gptkern demo -h for options)")
    sub.add_parser("train", add_help=False, help="pretrain a GPT (gptkern train -h for options)")
    sub.add_parser("finetune", add_help=False, help="fine-tune a classifier (gptkern finetune classify -h)")
    sub.add_parser("prepare", add_help=False,
                   help="tokenize text into train/val shards (gptkern prepare -h for options)")
    sub.add_parser("generate", add_help=False,
                   help="stream a model's continuation of a prompt (gptkern generate -h for options)")
    return parser


# What a user's input or machine can cause (a missing file, a bad value, a backend named that cannot
# serve the call, a full disk under a checkpoint, a failed build of the C++ kernels, whose message
# is the compiler's): the message, not a traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               ValueError, NotImplementedError, CheckpointWriteError, JITBuildError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (`gptkern generate ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's last flush cannot fail again
        return 1


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        try:
            return FORWARDED[argv[0]](argv[1:])
        except USER_ERRORS as err:
            if os.environ.get("GPTKERN_TRACEBACK"):
                raise
            print(f"gptkern {argv[0]}: error: {err} (GPTKERN_TRACEBACK=1 shows where)", file=sys.stderr)
            return 2
    args = _parser().parse_args(argv)
    if args.command == "info":
        return info()
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
