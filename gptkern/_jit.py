"""JIT fallback: builds the C++ extension at the first use of the ``cpu`` backend when the
installed package has none (installed with GPTKERN_BUILD_EXT=0, or ``gptkern._C`` fails to import).

``torch.utils.cpp_extension.load`` compiles the CPU kernels (csrc/: ops.cpp, bindings.cpp,
cpu/*.cpp) into ``$GPTKERN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/gptkern`` or
``~/.cache/gptkern``), one directory per hash of the sources, flags, torch and Python, and says
so on stderr. An ``fcntl.flock`` on ``<cache>/build.lock`` keeps two processes from building at
once: the second waits and then loads the first one's build. ``GPTKERN_JIT=0`` disables the
fallback; ``GPTKERN_SOURCE_DIR`` names another csrc/ directory. The CUDA kernels are not built
here (``pip install`` builds them, see setup.py).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import sys
import time
from typing import Iterator, Optional

from gptkern import _build

DISABLE_HINT = ("to run without the C++ kernels, use the torch backend (GPTKERN_BACKEND=torch or "
                "gptkern.set_backend('torch')); GPTKERN_JIT=0 turns this build off")


class JITBuildError(RuntimeError):
    """Building gptkern._C at run time failed; the message holds the compiler's output."""


_failed: Optional[str] = None  # the first failure's message: a process does not retry


def enabled() -> bool:
    return os.environ.get("GPTKERN_JIT", "1").strip() != "0"


def source_dir() -> Optional[str]:
    """The csrc/ directory to build from: $GPTKERN_SOURCE_DIR, the installed copy
    (gptkern/_csrc) or the repository's (an editable install); None without one."""
    env = os.environ.get("GPTKERN_SOURCE_DIR")
    if env:
        return env if os.path.isfile(os.path.join(env, "ops.cpp")) else None
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")):
            return candidate
    return None


def cache_dir() -> str:
    env = os.environ.get("GPTKERN_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gptkern")


def unavailable_reason() -> Optional[str]:
    """Why no JIT build can be tried here, or None."""
    if not enabled():
        return "GPTKERN_JIT=0 turns the JIT build off"
    if _failed is not None:
        return _failed.splitlines()[0] + " (an earlier build in this process failed)"
    if source_dir() is None:
        return ("GPTKERN_SOURCE_DIR holds no ops.cpp" if os.environ.get("GPTKERN_SOURCE_DIR")
                else "the C++ sources (csrc/) are not installed")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH to build it"
    return None


def available() -> bool:
    """Whether a JIT build can be tried here (enabled, sources and a C++ compiler found, no
    earlier failure)."""
    return (enabled() and _failed is None and source_dir() is not None
            and shutil.which(os.environ.get("CXX", "c++")) is not None)


@contextlib.contextmanager
def build_lock(path: str) -> Iterator[None]:
    """Exclusive lock on ``path`` (created if missing); says on stderr when it has to wait."""
    import fcntl  # POSIX only: imported here so that gptkern imports everywhere

    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"gptkern: waiting for another process to finish building the C++ extension "
                  f"(lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _digest(sources: list[str], headers: list[str], flags: list[str]) -> str:
    import torch

    h = hashlib.sha256()
    for path in sorted(sources) + sorted(headers):
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(flags).encode())
    h.update(f"{torch.__version__} {sys.version}".encode())
    return h.hexdigest()[:16]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _intact(build_dir: str, done: str) -> bool:
    """Whether the finished build's library is the one its ``built`` marker recorded (a library
    truncated by a crash would die of SIGBUS in dlopen). Markers without a digest are trusted."""
    with open(done) as f:
        fields = f.read().split()
    if len(fields) < 2:
        return True
    library = os.path.join(build_dir, "_C.so")
    return os.path.isfile(library) and _file_digest(library) == fields[1]


def _load(reason: str, src: str, sources: list[str], flags: list[str], build_dir: str):
    """Compile (once) and load the extension in ``build_dir``, under the cache's build lock."""
    global _failed
    done = os.path.join(build_dir, "built")
    fresh = not os.path.exists(done)
    if not fresh and not _intact(build_dir, done):
        print(f"gptkern: the cached build in {build_dir} is damaged; building it again", file=sys.stderr, flush=True)
        shutil.rmtree(build_dir)
        os.makedirs(build_dir)
        fresh = True
    if fresh:
        print(f"gptkern: {reason}; building the C++ CPU kernels from {src} into {build_dir} "
              f"(once per source version, about a minute)", file=sys.stderr, flush=True)
    # torch's own lock in the build folder, left by a build that was killed, would make load() wait
    # forever; build.lock, held here, already keeps every other build of this cache out
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(build_dir, "lock"))
    start = time.monotonic()
    try:
        from torch.utils.cpp_extension import load

        module = load(name="_C", sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                      extra_include_paths=[src], build_directory=build_dir, with_cuda=False, verbose=False)
    except Exception as err:  # the compiler's output is in the message
        _failed = (f"gptkern: building the C++ extension gptkern._C from {src} failed:\n{err}\ngptkern: "
                   f"{DISABLE_HINT}; deleting {build_dir} makes the next use build it afresh")
        raise JITBuildError(_failed) from None
    if fresh:  # the marker, with the library's digest, written whole
        tmp = f"{done}.tmp{os.getpid()}"
        library = os.path.join(build_dir, "_C.so")
        with open(tmp, "w") as f:  # (a library named otherwise: no digest, trusted as before)
            f.write(f"{time.time()} {_file_digest(library) if os.path.isfile(library) else ''}".rstrip() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, done)
        print(f"gptkern: built gptkern._C in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def refuse(reason: str) -> None:
    """Make every later :func:`build` raise JITBuildError(reason)."""
    global _failed
    _failed = reason


def build(reason: str):
    """Build (or load the cached build of) the CPU extension and return the module.

    Raises JITBuildError with the compiler's message (and how to do without) on failure.
    """
    global _failed
    if _failed is not None:
        raise JITBuildError(_failed)
    src = source_dir()
    if src is None:
        where = (f"GPTKERN_SOURCE_DIR={os.environ['GPTKERN_SOURCE_DIR']} holds no ops.cpp"
                 if os.environ.get("GPTKERN_SOURCE_DIR") else "its C++ sources (csrc/) were not found")
        _failed = f"gptkern: cannot build gptkern._C: {where}; {DISABLE_HINT}"
        raise JITBuildError(_failed)
    sources = _build.cpu_sources(src)
    headers = glob.glob(os.path.join(src, "*.h")) + glob.glob(os.path.join(src, "cpu", "*.h"))
    try:
        flags = _build.cxx_flags()
    except ValueError as err:  # a bad GPTKERN_CPU_CAPABILITY
        _failed = f"gptkern: cannot build gptkern._C: {err}; {DISABLE_HINT}"
        raise JITBuildError(_failed) from None
    missing = _build.missing_cpu_flags(_build.cpu_capability())
    if missing:  # GPTKERN_CPU_CAPABILITY asks for instructions this CPU lacks: loading would crash (SIGILL)
        _failed = (f"gptkern: cannot build gptkern._C for GPTKERN_CPU_CAPABILITY={_build.cpu_capability()}: this "
                   f"CPU lacks {', '.join(sorted(missing))}; unset it, or {DISABLE_HINT}")
        raise JITBuildError(_failed)
    root = cache_dir()
    try:
        build_dir = os.path.join(root, f"cpu-{_digest(sources, headers, flags)}")
    except OSError as err:  # a source file unreadable or gone
        _failed = f"gptkern: cannot build gptkern._C: reading its sources in {src}: {err}; {DISABLE_HINT}"
        raise JITBuildError(_failed) from None
    try:
        os.makedirs(build_dir, exist_ok=True)
        with build_lock(os.path.join(root, "build.lock")):
            module = _load(reason, src, sources, flags, build_dir)
    except OSError as err:  # not a folder, read-only, full: under auto the torch backend serves
        _failed = (f"gptkern: cannot build gptkern._C in the cache folder {root} ({err}); set GPTKERN_CACHE_DIR "
                   f"to a writable folder, or {DISABLE_HINT}")
        raise JITBuildError(_failed) from None
    module.jit_build_dir = build_dir
    sys.modules["gptkern._C"] = module
    return module
