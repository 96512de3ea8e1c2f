"""The JIT fallback (gptkern._jit): a copy of the package without gptkern._C, in a subprocess with
a temporary cache directory, builds the extension at the first use of the cpu backend (never at
import), reuses the build, holds a file lock while building, and reports a failed build with the
compiler's message and how to do without it."""
import os
import queue
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USE_CPU = """
import sys, torch, gptkern
from gptkern import _backend
x = torch.randn(3, 37)
try:
    with gptkern.backend("cpu"):
        y = gptkern.ops.softmax(x, -1)
except Exception as err:
    print("ERROR", type(err).__name__, err)
    sys.exit(3)
torch.testing.assert_close(y, torch.softmax(x, -1))
print("OK", type(_backend._extension()).__name__, "cpu" in _backend._extension().devices)
"""


@pytest.fixture
def bare_package(tmp_path):
    """(environment, cache dir): PYTHONPATH at a copy of gptkern without any built _C."""
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(ROOT, "gptkern"), pkg / "gptkern",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__", "_csrc"))
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPTKERN_", "TRITON_INTERPRET"))}
    env.update(PYTHONPATH=str(pkg), GPTKERN_CACHE_DIR=str(cache), GPTKERN_SOURCE_DIR=os.path.join(ROOT, "csrc"))
    os.chdir(tmp_path)  # the subprocesses must not find the repository's gptkern in their cwd
    return env, cache


@pytest.fixture
def broken_sources(tmp_path):
    src = tmp_path / "broken"
    (src / "cpu").mkdir(parents=True)
    for name in ("ops.cpp", "bindings.cpp"):
        (src / name).write_text("#error gptkern test: broken on purpose\n")
    return str(src)


# The subprocesses import the copy: the editable install's finder (which would find the
# repository's gptkern._C) is removed first.
PRELUDE = ("import sys; sys.meta_path = [f for f in sys.meta_path "
           "if not getattr(f, '__module__', '').startswith('__editable__')]\n")


def command(script):
    return [sys.executable, "-c", PRELUDE + script]


def run(env, script, timeout=300):
    return subprocess.run(command(script), env=env, capture_output=True, text=True, timeout=timeout)


def test_import_never_builds(bare_package, broken_sources):
    env, cache = bare_package
    env["GPTKERN_SOURCE_DIR"] = broken_sources  # a build attempt would fail loudly
    out = run(env, "import gptkern; print(gptkern.available_backends()); "
                   "from gptkern import _backend; print(_backend._EXT); _backend._extension(); "
                   "print(_backend._EXT_MISSING)")
    assert out.returncode == 0, out.stderr
    assert "'cpu'" in out.stdout and "None" in out.stdout  # available through the fallback, not built
    assert "gptkern._C is not built" in out.stdout  # (not a "circular import")
    assert "building" not in out.stderr
    assert not cache.exists() or not any(cache.iterdir())


def test_disabled_with_gptkern_jit_0(bare_package):
    env, _ = bare_package
    env["GPTKERN_JIT"] = "0"
    out = run(env, USE_CPU)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "NotImplementedError" in out.stdout and "cannot run on cpu tensors" in out.stdout
    # the reason is in the message: no extension, and no JIT build to make one
    assert "gptkern._C is not built; GPTKERN_JIT=0 turns the JIT build off" in out.stdout


def test_lock_wait_and_failure_message(bare_package, broken_sources):
    """A second builder waits for the lock; a failed build shows the compiler and the way out."""
    import fcntl

    env, cache = bare_package
    env["GPTKERN_SOURCE_DIR"] = broken_sources
    cache.mkdir()
    with open(cache / "build.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(command(USE_CPU), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
        seen = []
        try:
            while not any("waiting for another process" in line for line in seen):
                seen.append(lines.get(timeout=120))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    stdout = proc.communicate(timeout=300)[0]
    assert proc.returncode == 3, stdout + "".join(seen)
    assert "JITBuildError" in stdout
    assert "broken on purpose" in stdout  # the compiler's message
    assert "GPTKERN_BACKEND=torch" in stdout and "GPTKERN_JIT=0" in stdout


@pytest.mark.slow
def test_first_cpu_use_builds_then_reuses(bare_package):
    env, cache = bare_package
    env.setdefault("MAX_JOBS", "2")
    first = run(env, USE_CPU, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr[-4000:]
    assert "OK module True" in first.stdout
    assert "building the C++ CPU kernels" in first.stderr and "built gptkern._C" in first.stderr
    again = run(env, USE_CPU, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr[-4000:]
    assert "OK module True" in again.stdout
    assert "building" not in again.stderr  # loaded from the cache
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 1


def test_a_killed_build_leaves_no_lock_that_hangs_the_next(bare_package, broken_sources):
    """torch's own lock file in the build folder, left by a build that was killed, is cleared
    under gptkern's lock: the next build runs (here it fails at once: broken sources) rather
    than wait forever."""
    env, cache = bare_package
    env["GPTKERN_SOURCE_DIR"] = broken_sources
    assert run(env, USE_CPU).returncode == 3
    (build_dir,) = [d for d in cache.iterdir() if d.is_dir()]
    (build_dir / "lock").write_text("")  # as a SIGKILL during torch's build leaves it
    out = run(env, USE_CPU, timeout=120)
    assert out.returncode == 3 and "broken on purpose" in out.stdout, out.stdout + out.stderr


def test_an_unusable_cache_folder_is_a_build_error_and_auto_moves_on(bare_package, tmp_path):
    env, _ = bare_package
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    env["GPTKERN_CACHE_DIR"] = str(not_a_folder / "cache")
    out = run(env, USE_CPU)
    assert out.returncode == 3 and "JITBuildError" in out.stdout and "cache folder" in out.stdout, out.stdout
    assert "GPTKERN_CACHE_DIR" in out.stdout
    out = run(env, "import torch, gptkern; q = torch.randn(1, 2, 8, 16); "
                   "print(gptkern.ops.scaled_dot_product_attention(q, q, q).shape)")
    assert out.returncode == 0 and "torch.Size([1, 2, 8, 16])" in out.stdout, out.stdout + out.stderr


def test_a_capability_this_cpu_lacks_is_refused_before_building(monkeypatch):
    """GPTKERN_CPU_CAPABILITY=avx512 on a CPU without AVX-512: the JIT path refuses, as the import
    guard does for an installed build, instead of loading code that dies of SIGILL."""
    from gptkern import _build, _jit

    monkeypatch.setattr(_jit, "_failed", None)
    monkeypatch.setenv("GPTKERN_CPU_CAPABILITY", "avx512")
    monkeypatch.setattr(_build, "host_cpu_flags", lambda: {"avx2", "fma"})

    def never(*args, **kwargs):
        raise AssertionError("built for a capability this CPU lacks")

    monkeypatch.setattr(_jit, "_load", never)
    with pytest.raises(_jit.JITBuildError, match=r"GPTKERN_CPU_CAPABILITY=avx512: this CPU lacks avx512"):
        _jit.build("test")


def test_a_damaged_cached_build_is_built_again(tmp_path, monkeypatch, capsys):
    """The ``built`` marker records the library's digest: a library truncated or replaced since (a
    crash right after a build) is rebuilt instead of loaded (dlopen of a truncated file dies of
    SIGBUS). Markers of older builds, without a digest, are trusted."""
    from torch.utils import cpp_extension

    from gptkern import _jit

    build_dir = tmp_path / "cpu-x"
    build_dir.mkdir()
    loads = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, extra_include_paths, build_directory, **kwargs):
        (build_dir / "_C.so").write_bytes(b"library %d" % len(loads))
        loads.append(build_directory)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_jit, "_failed", None)
    assert _jit._load("test", "src", [], [], str(build_dir)) == "module"
    marker = (build_dir / "built").read_text().split()
    assert marker[1] == _jit._file_digest(str(build_dir / "_C.so")) and len(loads) == 1
    assert "building the C++ CPU kernels" in capsys.readouterr().err
    _jit._load("test", "src", [], [], str(build_dir))  # intact: loaded, not built (no message)
    assert "build" not in capsys.readouterr().err
    (build_dir / "_C.so").write_bytes(b"lib")  # truncated
    (build_dir / "stale.o").write_bytes(b"")
    _jit._load("test", "src", [], [], str(build_dir))
    assert "is damaged; building it again" in capsys.readouterr().err
    assert not (build_dir / "stale.o").exists() and (build_dir / "_C.so").read_bytes() == b"library 2"
    (build_dir / "built").write_text("12345.0\n")  # an older marker: trusted
    assert _jit._intact(str(build_dir), str(build_dir / "built"))


def test_a_source_dir_without_sources_is_named(bare_package, tmp_path):
    env, _ = bare_package
    env["GPTKERN_SOURCE_DIR"] = str(tmp_path / "nope")
    out = run(env, USE_CPU)
    assert out.returncode == 3 and "GPTKERN_SOURCE_DIR holds no ops.cpp" in out.stdout, out.stdout + out.stderr
    out = run(env, "import torch, gptkern; print(gptkern.ops.softmax(torch.randn(64, 64), -1).shape)")
    assert out.returncode == 0 and "torch.Size([64, 64])" in out.stdout, out.stdout + out.stderr  # auto moves on


def test_compiling_without_the_extension_builds_nothing_and_traces(bare_package):
    """torch.compile(fullgraph=True) under auto with no gptkern._C: tracing does not probe for a JIT
    build (its file checks would break the graph); the graph uses another backend."""
    env, cache = bare_package
    out = run(env, "import torch, gptkern\n"
                   "f = torch.compile(lambda x: gptkern.ops.rms_norm(x, (8,)), fullgraph=True, backend='eager')\n"
                   "x = torch.randn(3, 8)\n"
                   "torch.testing.assert_close(f(x), torch.nn.functional.rms_norm(x, (8,)))\n"
                   "print('OK')", timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "building" not in out.stderr and (not cache.exists() or not any(cache.iterdir()))


def test_switches_and_folders_from_the_environment(monkeypatch, tmp_path):
    """GPTKERN_JIT=0 (spaces around it too) turns the build off; the cache is $GPTKERN_CACHE_DIR, else
    gptkern/ under $XDG_CACHE_HOME, else under ~/.cache; CXX names the compiler looked for."""
    from gptkern import _jit

    monkeypatch.setattr(_jit, "_failed", None)
    monkeypatch.setenv("GPTKERN_JIT", " 0\n")
    assert not _jit.enabled() and not _jit.available()
    monkeypatch.setenv("GPTKERN_JIT", "1")
    assert _jit.enabled()
    monkeypatch.delenv("GPTKERN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _jit.cache_dir() == str(tmp_path / "xdg" / "gptkern")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _jit.cache_dir() == str(tmp_path / "home" / ".cache" / "gptkern")
    monkeypatch.setenv("GPTKERN_CACHE_DIR", str(tmp_path / "mine"))
    assert _jit.cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert _jit.unavailable_reason() == f"no C++ compiler ({tmp_path / 'no-such-compiler'}) on PATH to build it"
    assert not _jit.available()


def test_a_failure_is_not_retried_in_the_process(monkeypatch, tmp_path):
    """Sources not found: the error is kept, and later builds (sources found again) raise it at once;
    refuse() does the same with its own reason."""
    from gptkern import _jit

    monkeypatch.setattr(_jit, "_failed", None)
    monkeypatch.setenv("GPTKERN_SOURCE_DIR", str(tmp_path))
    with pytest.raises(_jit.JITBuildError, match="GPTKERN_SOURCE_DIR=.* holds no ops.cpp"):
        _jit.build("test")
    monkeypatch.delenv("GPTKERN_SOURCE_DIR")
    assert _jit.source_dir() is not None and not _jit.available()
    assert "an earlier build in this process failed" in _jit.unavailable_reason()
    monkeypatch.setattr(_jit, "_failed", None)
    _jit.refuse("refused for the test")
    with pytest.raises(_jit.JITBuildError, match="refused for the test"):
        _jit.build("test")


def test_the_build_folder_changes_with_the_flags_and_torch(monkeypatch, tmp_path):
    import torch

    from gptkern import _jit

    (tmp_path / "a.cpp").write_text("int a;\n")
    sources = [str(tmp_path / "a.cpp")]
    digest = _jit._digest(sources, [], ["-O3"])
    assert _jit._digest(sources, [], ["-O3"]) == digest and _jit._digest(sources, [], ["-O2"]) != digest
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert _jit._digest(sources, [], ["-O3"]) != digest


def test_the_built_marker_is_written_whole_and_the_module_installed(tmp_path, monkeypatch):
    """The marker goes to a temporary file, fsynced, then renamed over ``built``; build() names its
    folder on the module and makes it gptkern._C."""
    import sys
    import types

    from torch.utils import cpp_extension

    from gptkern import _jit

    module = types.ModuleType("_C")

    def fake_load(name, sources, extra_cflags, extra_ldflags, extra_include_paths, build_directory, **kwargs):
        with open(os.path.join(build_directory, "_C.so"), "wb") as f:
            f.write(os.urandom(64))
        return module

    synced, replaced = [], []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append((src, dst)) or replace(src, dst))
    monkeypatch.setattr(_jit, "_failed", None)
    monkeypatch.setenv("GPTKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GPTKERN_CPU_CAPABILITY", raising=False)
    monkeypatch.setitem(sys.modules, "gptkern._C", None)
    assert _jit.build("test") is module and sys.modules["gptkern._C"] is module
    (build_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert module.jit_build_dir == str(build_dir)
    done = str(build_dir / "built")
    assert len(synced) == 1 and len(replaced) == 1 and replaced[0][1] == done and replaced[0][0] != done
    assert sorted(p.name for p in build_dir.iterdir()) == ["_C.so", "built"]


def test_cpu_capability_flags_and_tags(monkeypatch, tmp_path):
    """The best level whose every feature the CPU has; a tag at the file's very start is read; without
    /proc/cpuinfo nothing is reported missing."""
    from gptkern import _build

    monkeypatch.delenv("GPTKERN_CPU_CAPABILITY", raising=False)
    for flags, best in (({"avx2"}, "default"), ({"avx2", "fma", "f16c"}, "avx2"),
                        ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx512")):
        monkeypatch.setattr(_build, "host_cpu_flags", lambda: set(flags))
        assert _build.cpu_capability() == best, flags
    monkeypatch.setattr(_build, "host_cpu_flags", lambda: set())
    assert _build.missing_cpu_flags("avx512") == set()
    (tmp_path / "first.so").write_bytes(b"gptkern-cpu-capability=avx512\0rest")
    assert _build.built_capability(str(tmp_path / "first.so")) == "avx512"


def test_cuda_build_switches_and_architectures(monkeypatch, tmp_path):
    from gptkern import _build

    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o644)
    assert _build.find_nvcc(str(tmp_path)) is None  # not executable
    nvcc.chmod(0o755)
    if not os.access(nvcc, os.X_OK):
        pytest.skip("the temporary folder is mounted noexec")
    assert _build.find_nvcc(str(tmp_path)) == str(nvcc) and _build.find_nvcc(None) is None
    monkeypatch.setenv("GPTKERN_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"GPTKERN_BUILD_CUDA=1 .* no nvcc \(set CUDA_HOME\)"):
        _build.want_cuda("12.4", None)
    assert _build.want_cuda("12.4", str(nvcc))
    monkeypatch.setenv("GPTKERN_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="GPTKERN_BUILD_CUDA must be 0 or 1, got 'yes'"):
        _build.want_cuda("12.4", str(nvcc))
    monkeypatch.setenv("GPTKERN_BUILD_CUDA", "0")
    assert not _build.want_cuda("12.4", str(nvcc))
    monkeypatch.delenv("GPTKERN_BUILD_CUDA")
    assert not _build.want_cuda(None, str(nvcc)) and _build.want_cuda("12.4", str(nvcc))
    archs = _build.parse_archs("8.0; 9.0a+PTX")
    assert archs == [("80", False), ("90a", True)]
    assert _build.nvcc_flags(archs) == ["-O3", "-lineinfo", "-gencode=arch=compute_80,code=sm_80",
                                        "-gencode=arch=compute_90a,code=sm_90a",
                                        "-gencode=arch=compute_90a,code=compute_90a"]
    assert _build.cuda_defines(archs) == ["-DGPTKERN_WITH_CUDA", "-DGPTKERN_CUDA_ARCHS=sm_80,sm_90a,compute_90a"]
    for bad in ("7.5", "8", "sm_80", ";"):
        with pytest.raises(ValueError, match="GPTKERN_CUDA_ARCHS"):
            _build.parse_archs(bad)
