"""The C++ CPU kernels of gptkern._C: build info, custom-op registrations, compile, and
dW/dB that do not depend on the thread count. (Their numerics run in every op test: 'cpu'
is one of the backends those parametrize over, and auto's choice for CPU tensors.)"""
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

import gptkern
from gptkern import _backend
from gptkern.ops.reference import layer_norm_ref, softmax_ref
from helpers import assert_close

pytestmark = pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")


def test_build_info():
    ext = _backend._extension()
    assert ext.devices in (("cpu",), ("cpu", "cuda"))
    assert isinstance(ext.compiler, str) and isinstance(ext.openmp, bool) and isinstance(ext.simd, list)
    if "cuda" in ext.devices:  # a CUDA build names its CUDA version and targets
        assert ext.cuda_version.count(".") == 1 and all(a.startswith(("sm_", "compute_")) for a in ext.cuda_archs)
    else:
        assert ext.cuda_version is None and ext.cuda_archs == ()


def test_uses_the_shared_cxx_runtime():
    """gptkern._C calls the libstdc++ torch uses, not a static copy of its own."""
    ext = _backend._extension()
    assert ext.cxx_runtime_private is False
    assert os.path.basename(ext.cxx_runtime).startswith("libstdc++"), ext.cxx_runtime
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[0\] = 9 is outside"):  # formats numbers
        torch.ops.gptkern.decode_attention(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8),
                                           torch.tensor([9], dtype=torch.int32), 1.0, None)


def test_a_private_cxx_runtime_is_reported(monkeypatch, capsys):
    from gptkern import cli

    private = SimpleNamespace(devices=("cpu",), cpu_capability="avx2", openmp=True, cuda_version=None,
                              cxx_runtime="/x/gptkern/_C.so", cxx_runtime_private=True, __file__="/x/gptkern/_C.so")
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    with pytest.warns(RuntimeWarning, match=r"own copy of libstdc\+\+.*CXX=/opt/gcc/bin/g\+\+"):
        _backend.check_cxx_runtime(private)
    assert "its own static copy of libstdc++" in cli._extension_info(private)
    shared = SimpleNamespace(**{**vars(private), "cxx_runtime": "/usr/lib/libstdc++.so.6",
                                "cxx_runtime_private": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backend.check_cxx_runtime(shared)
    assert "C++ runtime: /usr/lib/libstdc++.so.6" in cli._extension_info(shared)
    assert "CPU kernels for avx2 with OpenMP;" in cli._extension_info(shared)
    assert "CPU kernels for avx2;" in cli._extension_info(SimpleNamespace(**{**vars(shared), "openmp": False}))


def test_build_names_its_cpu_capability(monkeypatch):
    from gptkern import _build

    ext = _backend._extension()
    assert ext.cpu_capability in ("default", "avx2", "avx512")
    assert ("avx512f" in ext.simd) == (ext.cpu_capability == "avx512")
    assert not _build.missing_cpu_flags(ext.cpu_capability)  # it runs here
    monkeypatch.setenv("GPTKERN_CPU_CAPABILITY", "avx2")
    assert "-mavx2" in _build.cxx_flags() and "-DCPU_CAPABILITY_AVX2" in _build.cxx_flags()
    monkeypatch.setenv("GPTKERN_CPU_CAPABILITY", "default")
    assert not any(f.startswith(("-mavx", "-DCPU_CAPABILITY")) for f in _build.cxx_flags())
    monkeypatch.setenv("GPTKERN_CPU_CAPABILITY", "sse9")
    with pytest.raises(ValueError, match="GPTKERN_CPU_CAPABILITY='sse9'"):
        _build.cxx_flags()


def test_built_capability_reads_the_tag(tmp_path):
    from gptkern import _build

    (tmp_path / "empty.so").write_bytes(b"")
    (tmp_path / "tagged.so").write_bytes(b"\x7fELF\0...gptkern-cpu-capability=avx2\0...")
    (tmp_path / "untagged.so").write_bytes(b"\x7fELF\0...")
    assert _build.built_capability(str(tmp_path / "tagged.so")) == "avx2"
    assert _build.built_capability(str(tmp_path / "empty.so")) is None
    assert _build.built_capability(str(tmp_path / "untagged.so")) is None
    assert _build.built_capability(str(tmp_path / "missing.so")) is None


def test_a_build_for_missing_simd_is_refused(monkeypatch):
    """An AVX-512 build on a CPU without AVX-512 is not loaded (its initializers would die of SIGILL):
    the level is read from the file first, and no JIT build loads a second copy of the ops."""
    import sys

    from gptkern import _build, _jit

    ext = _backend._extension()
    assert _build.built_capability(ext.__file__) == ext.cpu_capability  # the tag in the file
    monkeypatch.delitem(sys.modules, "gptkern._C")  # as in a fresh process
    monkeypatch.setattr(_build, "built_capability", lambda path: "avx512")
    monkeypatch.setattr(_build, "host_cpu_flags", lambda: {"avx", "avx2", "fma", "f16c"})
    monkeypatch.setattr(_jit, "_failed", None)
    monkeypatch.setattr(_backend, "_EXT", _backend._UNSET)
    assert _backend._extension() is None
    assert "built for avx512" in _backend._EXT_MISSING and "avx512bw" in _backend._EXT_MISSING
    assert "GPTKERN_BACKEND=torch" in _backend._EXT_MISSING
    assert "cpu" not in gptkern.available_backends()
    with pytest.raises(_jit.JITBuildError, match="built for avx512"):
        _backend._extension(jit=True)
    monkeypatch.setattr(_build, "built_capability", lambda path: "avx2")
    monkeypatch.setattr(_backend, "_EXT", _backend._UNSET)
    assert _backend._capability_problem() == ""


def test_bad_capability_setting_is_a_build_error(monkeypatch):
    from gptkern import _jit

    monkeypatch.setattr(_jit, "_failed", None)
    monkeypatch.setenv("GPTKERN_CPU_CAPABILITY", "sse9")
    with pytest.raises(_jit.JITBuildError, match="GPTKERN_CPU_CAPABILITY='sse9'"):
        _jit.build("test")


def test_info_reports_the_build(capsys):
    from gptkern import cli

    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("C++ extension"))
    assert "built, devices: cpu" in line and f"CPU kernels for {_backend._extension().cpu_capability}" in line


@pytest.mark.parametrize("log", [False, True])
def test_opcheck_softmax(log):
    x = torch.randn(5, 19, requires_grad=True)
    for dim in (-1, 0):
        torch.library.opcheck(torch.ops.gptkern.softmax_fwd.default, (x, dim, log, torch.float32))
    torch.library.opcheck(torch.ops.gptkern.softmax_fwd.default,
                          (x.detach().bfloat16().requires_grad_(), 1, log, torch.float32))
    y = torch.softmax(x.detach(), -1)
    torch.library.opcheck(torch.ops.gptkern.softmax_bwd.default,
                          (torch.randn(5, 19), torch.log(y) if log else y, -1, log))


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float64),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_softmax_op_rejects_other_dtype_pairs(in_dtype, out_dtype):
    """The C++ softmax takes x in fp32 / bf16 / fp16 with out_dtype x's or fp32, as the CUDA one
    (the Python side casts first otherwise); anything else raises, never computes in another precision."""
    x = torch.randn(4, 40, dtype=in_dtype)
    with pytest.raises(NotImplementedError, match="softmax"):
        torch.ops.gptkern.softmax_fwd(x, -1, False, out_dtype)
    with pytest.raises(NotImplementedError, match="softmax_bwd"):
        torch.ops.gptkern.softmax_bwd(torch.randn(4, 40, dtype=torch.float64), torch.randn(4, 40, dtype=torch.float64),
                                      -1, False)
    with pytest.raises(NotImplementedError, match="softmax"):  # an empty input too
        torch.ops.gptkern.softmax_fwd(x[:0], -1, False, out_dtype)
    for out in (in_dtype, torch.float32):  # the pairs it takes
        if in_dtype != torch.float64:
            y = torch.ops.gptkern.softmax_fwd(x, -1, False, out)
            assert y.dtype == out
            assert_close(y, softmax_ref(x.double(), -1, upcast=True), out)


def test_norm_ops_check_their_parameters():
    """Called directly (the Python side checks first), the C++ norms refuse fp64 (as the softmax),
    a weight of the wrong size and a dW / dB request without the parameter, rather than reading
    out of bounds."""
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="weight must have the normalized shape's 10 elements, got 9"):
        torch.ops.gptkern.norm_fwd(x, 1, torch.randn(9), None, 1e-5, False)
    with pytest.raises(RuntimeError, match="bias must have"):
        torch.ops.gptkern.norm_fwd(x, 1, torch.randn(10), torch.randn(11), 1e-5, False)
    for rows in (3, 0):  # fp64 is the Python side's to serve (torch backend), empty inputs included
        with pytest.raises(NotImplementedError, match="norm_fwd on CPU .x.: not implemented for 'Double'"):
            torch.ops.gptkern.norm_fwd(torch.randn(rows, 10, dtype=torch.float64), 1, None, None, 1e-5, False)
    y, mean, rstd = torch.ops.gptkern.norm_fwd(x, 1, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="need_dw without a weight"):
        torch.ops.gptkern.norm_bwd(torch.randn(3, 10), x, 1, None, None, mean, rstd, False, True, False)
    with pytest.raises(RuntimeError, match="need_db without a bias"):
        torch.ops.gptkern.norm_bwd(torch.randn(3, 10), x, 1, None, None, mean, rstd, False, False, True)
    with pytest.raises(NotImplementedError, match="norm_bwd on CPU .x.: not implemented for 'Double'"):
        torch.ops.gptkern.norm_bwd(torch.randn(3, 10).double(), x.double(), 1, None, None, mean, rstd, False, False,
                                   False)
    # what the kernel reads row by row: a gradient of x's shape, one mean / rstd per row, 0 <= k <= x.dim()
    with pytest.raises(RuntimeError, match=r"grad_out must have x's shape \[3, 10\], got \[1, 10\]"):
        torch.ops.gptkern.norm_bwd(torch.randn(1, 10), x, 1, None, None, mean, rstd, False, False, False)
    with pytest.raises(RuntimeError, match=r"mean and rstd must hold one value per row of x \(3\), got 1 and 3"):
        torch.ops.gptkern.norm_bwd(torch.randn(3, 10), x, 1, None, None, mean[:1].clone(), rstd, False, False, False)
    with pytest.raises(RuntimeError, match=r"one value per row of x \(1\), got 3 and 3"):  # k = 2: one row
        torch.ops.gptkern.norm_bwd(torch.randn(3, 10), x, 2, None, None, mean, rstd, False, False, False)
    for op in ("norm_fwd", "norm_bwd"):
        for k in (3, -1):
            args = (x, k, None, None, 1e-5, False) if op == "norm_fwd" else (
                torch.randn(3, 10), x, k, None, None, mean, rstd, False, False, False)
            with pytest.raises(RuntimeError, match=rf"{op}: k \(the normalized dims\) must be in \[0, 2\], got {k}"):
                getattr(torch.ops.gptkern, op)(*args)


def test_softmax_backward_checks_the_gradient_shape():
    """Called directly, softmax_bwd refuses a grad_out of another shape than out (it read out's
    element count from it: NaN rows, or a crash past the buffer's end)."""
    out = torch.softmax(torch.randn(8, 33), -1)
    for log in (False, True):
        with pytest.raises(RuntimeError, match=r"grad_out must have out's shape \[8, 33\], got \[1, 33\]"):
            torch.ops.gptkern.softmax_bwd(torch.randn(1, 33), out, -1, log)


@pytest.mark.parametrize("is_rms", [False, True])
def test_opcheck_norm(is_rms):
    x = torch.randn(3, 4, 11, requires_grad=True)
    w = torch.randn(4, 11, requires_grad=True)
    b = None if is_rms else torch.randn(4, 11, requires_grad=True)
    torch.library.opcheck(torch.ops.gptkern.norm_fwd.default, (x, 2, w, b, 1e-5, is_rms))
    _, mean, rstd = torch.ops.gptkern.norm_fwd(x.detach(), 2, w.detach(), b, 1e-5, is_rms)
    torch.library.opcheck(torch.ops.gptkern.norm_bwd.default,
                          (torch.randn(3, 4, 11), x.detach(), 2, w.detach(), None if b is None else b.detach(),
                           mean, rstd, is_rms, True, b is not None))


def test_compile_fullgraph():
    x = torch.randn(4, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)

    def f(x, w):
        return gptkern.ops.log_softmax(gptkern.ops.layer_norm(x, (24,), w), -1)

    torch._dynamo.reset()
    with gptkern.backend("cpu"):
        y = torch.compile(f, fullgraph=True)(x, w)
        grads = torch.autograd.grad(y.sum(), (x, w))
    leaves = [t.detach().double().requires_grad_() for t in (x, w)]
    ref = softmax_ref(layer_norm_ref(leaves[0], (24,), leaves[1]), -1, log=True)
    assert_close(y, ref, torch.float32)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), leaves)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_weight_grads_do_not_depend_on_threads():
    x = torch.randn(301, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    g = torch.randn(301, 96)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with gptkern.backend("cpu"):
                runs.append(torch.autograd.grad(gptkern.ops.layer_norm(x, (96,), w, b), (x, w, b), g))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


def _mapping_flags(address: int) -> list:
    """VmFlags of the mapping of this process that holds ``address`` (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


HUGE_PAGE_PROBE = """
import sys, torch, gptkern
sys.path.insert(0, "tests")
from test_cpu_extension import _mapping_flags
from helpers import assert_close
from gptkern.ops.reference import softmax_ref
x = torch.randn(1024, 8192)  # 32 MiB of fp32: glibc maps such blocks on their own
with gptkern.backend("cpu"):
    outs = {
        "softmax": gptkern.ops.softmax(x, -1),
        "layer_norm": gptkern.ops.layer_norm(x, (8192,)),
        "rms_norm": gptkern.ops.rms_norm(x, (8192,)),
        "attention": gptkern.ops.scaled_dot_product_attention(*(x.view(16, 8, 1024, 64),) * 3, is_causal=True),
        "small": gptkern.ops.softmax(x[:512], -1),  # 16 MiB: may come from glibc's heap, never advised
    }
assert_close(outs["softmax"], softmax_ref(x, -1), torch.float32)
print(" ".join(name for name, y in outs.items() if "hg" in _mapping_flags(y.data_ptr() + y.nbytes // 2)))
"""


def _advised_outputs(setting) -> list:
    """Names of the probe's outputs whose mapping is advised huge pages, in a fresh process with
    GPTKERN_CPU_HUGE_PAGES=setting (None: unset)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GPTKERN_CPU_HUGE_PAGES"}
    if setting is not None:
        env["GPTKERN_CPU_HUGE_PAGES"] = setting
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(_thp_mode() in ("never", "unavailable"), reason="no transparent huge pages on this machine")
def test_large_outputs_are_advised_huge_pages_when_asked():
    # The hint is the VM_HUGEPAGE flag ("hg") on the output's mapping, whether or not the kernel
    # found free 2 MiB pages.
    assert _advised_outputs("1") == ["softmax", "layer_norm", "rms_norm", "attention"]


def test_huge_pages_are_off_by_default():
    """Opt-in: on a VM whose balloon hands free pages back to the host, faulting huge pages in
    again costs more than the small pages' faults (csrc/cpu/huge_pages.h)."""
    assert _advised_outputs(None) == [] and _advised_outputs("0") == []


def test_auto_counts_on_huge_pages_only_where_they_are_on(monkeypatch):
    """fp32 with gradients goes to the C++ kernels from 128 MiB only with huge pages on."""
    x = torch.randn(8192, 4096)
    _backend.cpu_huge_pages.cache_clear()
    try:
        monkeypatch.delenv("GPTKERN_CPU_HUGE_PAGES", raising=False)
        assert not _backend.cpu_huge_pages()
        assert "fp32 with gradients" in _backend.row_kernel_pays("softmax", x, 4096, True)
        _backend.cpu_huge_pages.cache_clear()
        monkeypatch.setenv("GPTKERN_CPU_HUGE_PAGES", "1")
        assert _backend.cpu_huge_pages() == (_thp_mode() not in ("never", "unavailable"))
        assert (_backend.row_kernel_pays("softmax", x, 4096, True) is None) == _backend.cpu_huge_pages()
        assert _backend.row_kernel_pays("softmax", x[:4096], 4096, True) is not None  # 16M elements
    finally:
        _backend.cpu_huge_pages.cache_clear()
