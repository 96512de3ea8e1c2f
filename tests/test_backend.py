"""Backend selection: set_backend, the context manager, GPTKERN_BACKEND, auto's fallbacks."""
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern import _backend


def test_default_and_available():
    assert gptkern.get_backend() == "auto"
    names = gptkern.available_backends()
    assert "torch" in names and "auto" not in names
    assert set(names) <= {"triton", "cuda", "cpu", "torch"}
    ext = _backend._extension()
    assert ("cpu" in names) == (ext is not None and "cpu" in ext.devices)
    triton_runs = _backend._has_triton() and (torch.cuda.is_available() or _backend.triton_interpret())
    assert ("triton" in names) == triton_runs


def test_triton_interpret_is_off_for_an_empty_or_zero_setting(monkeypatch):
    """TRITON_INTERPRET set to "" or "0" is off, any other value on; the value is read once."""
    for value, expected in (("", False), ("0", False), ("1", True), ("yes", True)):
        monkeypatch.setattr(_backend, "_TRITON_INTERPRET", None)
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _backend.triton_interpret() is expected, value
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.triton_interpret() is True  # still the "yes" read first


def test_set_backend_and_context_manager():
    gptkern.set_backend("torch")
    assert gptkern.get_backend() == "torch"
    with gptkern.backend("triton") as name:
        assert name == "triton" and gptkern.get_backend() == "triton"
        with gptkern.backend("auto"):
            assert gptkern.get_backend() == "auto"
        assert gptkern.get_backend() == "triton"
    assert gptkern.get_backend() == "torch"
    gptkern.set_backend(" Torch ")
    assert gptkern.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend"):
        gptkern.set_backend("cudnn")
    with pytest.raises(ValueError, match="backend"):
        with gptkern.backend("bogus"):
            pass
    assert gptkern.get_backend() == "torch"


def test_context_manager_restores_on_error():
    with pytest.raises(KeyError):
        with gptkern.backend("torch"):
            raise KeyError
    assert gptkern.get_backend() == "auto"


@pytest.mark.parametrize("value,expected", [("torch", "torch"), ("TRITON", "triton"), ("", "auto")])
def test_environment_variable(value, expected):
    env = dict(os.environ, GPTKERN_BACKEND=value)
    out = subprocess.run([sys.executable, "-c", "import gptkern; print(gptkern.get_backend())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_environment_variable_invalid():
    """A bad GPTKERN_BACKEND fails the first op call with a ValueError naming it, not the import (so
    that `gptkern info` can show it); `with backend(...)` still works."""
    env = dict(os.environ, GPTKERN_BACKEND="nope")
    script = ("import torch, gptkern\n"
              "with gptkern.backend('torch'):\n"
              "    gptkern.ops.softmax(torch.randn(2, 3), -1)\n"
              "gptkern.ops.softmax(torch.randn(2, 3), -1)\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ValueError: GPTKERN_BACKEND must be one of" in out.stderr
    assert "'nope'" in out.stderr and "line 4" in out.stderr
    info = subprocess.run([sys.executable, "-m", "gptkern", "info"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0, info.stderr
    assert re.search(r"current backend +none: GPTKERN_BACKEND must be one of", info.stdout), info.stdout


def test_auto_on_cpu_never_runs_the_triton_interpreter():
    supports = {"triton": lambda: None, "torch": lambda: None}
    for op in ("softmax", "layer_norm", "rms_norm", "scaled_dot_product_attention", "decode_attention"):
        assert _backend.choose(op, torch.device("cpu"), supports) == "torch", op


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_auto_on_cpu_runs_softmax_and_layer_norm_in_cpp_from_their_break_even(monkeypatch):
    chosen = []
    choose = _backend.choose
    monkeypatch.setattr(_backend, "choose",
                        lambda *args, **kwargs: chosen.append(choose(*args, **kwargs)) or chosen[-1])
    cases = [  # (rows, width), dtype, grad: the backend auto picks for softmax and for layer_norm
        ((64, 512), torch.float32, False, "torch", "torch"),  # 2^15 elements: the op's fixed cost dominates
        ((1024, 512), torch.float32, False, "torch", "torch"),  # 2^19: under 1M, no clear gain
        ((2048, 512), torch.float32, False, "cpu", "cpu"),  # 2^20
        ((2048, 512), torch.float32, True, "torch", "torch"),  # fp32 with gradients: as fast either way
        ((4096, 2048), torch.float32, True, "torch", "torch"),  # 32 MiB (with huge pages: from 128 MiB)
        ((512, 512), torch.bfloat16, True, "torch", "torch"),  # under 1M with gradients
        ((2048, 512), torch.bfloat16, True, "cpu", "cpu"),
        ((16384, 64), torch.float32, False, "torch", "cpu"),  # narrow rows: only layer_norm gains
    ]
    for shape, dtype, grad, for_softmax, for_layer_norm in cases:
        x = torch.randn(shape, dtype=dtype, requires_grad=grad)
        for run, expected in ((lambda: gptkern.ops.softmax(x, -1), for_softmax),
                              (lambda: gptkern.ops.log_softmax(x, -1), for_softmax),
                              (lambda: gptkern.ops.softmax(x.t(), 0), for_softmax),  # over the leading dim
                              (lambda: gptkern.ops.layer_norm(x, shape[1:], torch.ones(shape[1], dtype=dtype)),
                               for_layer_norm)):
            chosen.clear()
            run()
            assert chosen == [expected], (shape, dtype, grad)
    x = torch.randn(2048, 512)  # 2^20: a C++ size
    chosen.clear()
    gptkern.ops.softmax(x, 0)  # over a strided dim: the C++ op would copy it into rows first
    assert chosen == ["torch"]
    with gptkern.backend("cpu"):  # the sizes only steer auto: an explicit backend serves any
        gptkern.ops.softmax(torch.randn(2, 3), -1)
    assert chosen[-1] == "cpu"


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_auto_on_cpu_uses_the_cpp_kernels_where_they_win():
    supports = {"triton": lambda: None, "cpu": lambda: None, "torch": lambda: None}
    for op in ("rms_norm", "scaled_dot_product_attention", "decode_attention"):
        assert _backend.choose(op, torch.device("cpu"), supports) == "cpu", op
    supports["cpu"] = lambda: "float64"
    assert _backend.choose("rms_norm", torch.device("cpu"), supports) == "torch"


def test_auto_on_cuda_prefers_triton_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_backend_runs_on", lambda name, dev: name in ("triton", "torch"))
    cuda = torch.device("cuda")
    assert _backend.choose("softmax", cuda, {"triton": lambda: None, "torch": lambda: None}) == "triton"
    with caplog.at_level(logging.DEBUG, logger="gptkern"):
        chosen = _backend.choose("softmax", cuda, {"triton": lambda: "float64", "torch": lambda: None})
    assert chosen == "torch"
    assert "float64" in caplog.text
    # triton, then the CUDA C++ kernels, then torch
    monkeypatch.setattr(_backend, "_backend_runs_on", lambda name, dev: True)
    monkeypatch.setattr(_backend, "_load_for_auto", lambda: None)
    supports = {"cuda": lambda: None, "torch": lambda: None, "triton": lambda: None}
    assert _backend.choose("softmax", cuda, supports) == "triton"
    supports["triton"] = lambda: "float64"
    assert _backend.choose("softmax", cuda, supports) == "cuda"


def test_explicit_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.setattr(_backend, "_backend_runs_on", lambda name, dev: name in ("triton", "torch"))
    with gptkern.backend("triton"), pytest.raises(NotImplementedError, match="float64.*torch"):
        _backend.choose("softmax", torch.device("cuda"), {"triton": lambda: "float64", "torch": lambda: None})
    with gptkern.backend("cpu"), pytest.raises(NotImplementedError, match="'cpu'"):
        _backend.choose("softmax", torch.device("cuda"), {"triton": lambda: None, "torch": lambda: None})


def test_explicit_backend_not_on_this_device():
    with gptkern.backend("cuda"), pytest.raises(NotImplementedError, match="'cuda' backend"):
        gptkern.ops.softmax(torch.randn(3), 0)


def test_a_backend_runs_only_on_its_own_device_type():
    """The C++ backends serve their own device type only, triton CUDA tensors (CPU ones when
    interpreting), never others; the error lists the backends that can run the call."""
    supports = {name: (lambda: None) for name in ("triton", "cpu", "cuda", "torch")}
    for name, device in (("cpu", "cuda"), ("cuda", "cpu"), ("triton", "meta"), ("cpu", "meta")):
        assert not _backend._backend_runs_on(name, device), (name, device)
        with gptkern.backend(name), pytest.raises(NotImplementedError,
                                                  match=f"the '{name}' backend cannot run on {device} tensors"):
            _backend.choose("softmax", torch.device(device), supports)
    with gptkern.backend("cuda"), pytest.raises(NotImplementedError, match=r"backends that can: \['torch'\]$"):
        _backend.choose("softmax", torch.device("meta"), {"cuda": lambda: None, "torch": lambda: None})


def test_explicit_backend_that_does_not_implement_the_op():
    supports = {"cpu": lambda: None, "torch": lambda: None}
    for name in ("triton", "cuda"):
        with gptkern.backend(name), pytest.raises(NotImplementedError,
                                                  match=f"the '{name}' backend does not implement this op"):
            _backend.choose("linear", torch.device("cpu"), supports)


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_triton_rejects_float64_and_auto_serves_it():
    x = torch.randn(3, 5, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    with gptkern.backend("triton"), pytest.raises(NotImplementedError, match="float64"):
        gptkern.ops.softmax(x, -1)
    torch.testing.assert_close(gptkern.ops.softmax(x, -1), torch.softmax(x, -1))


def test_triton_on_cpu_without_interpreter():
    code = ("import torch, gptkern\n"
            "with gptkern.backend('triton'):\n"
            "    gptkern.ops.softmax(torch.randn(3), 0)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    assert out.returncode != 0 and "TRITON_INTERPRET" in out.stderr


def test_import_without_triton():
    """import gptkern works on a machine without triton (and the torch backend serves)."""
    code = ("import sys, importlib.util as u\n"
            "orig = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name.split('.')[0] == 'triton' else orig(name, *a)\n"
            "sys.modules['triton'] = None\n"
            "import torch, gptkern\n"
            "assert 'triton' not in gptkern.available_backends()\n"
            "print(gptkern.ops.layer_norm(torch.ones(2, 3), (3,)).sum().item())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.0"


@pytest.mark.parametrize("op", ["softmax", "layer_norm"])
def test_auto_dispatch_does_not_specialize_torch_compile_on_sizes(op):
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = ((lambda x: gptkern.ops.softmax(x, -1)) if op == "softmax"
          else (lambda x: gptkern.ops.layer_norm(x, (x.shape[-1],))))
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=counting_backend, fullgraph=True, dynamic=True)
    for rows in range(2, 14):  # all under the C++ kernels' break-even: one graph serves them
        x = torch.randn(rows, 256)
        torch.testing.assert_close(compiled(x), fn(x))
    assert len(graphs) == 1


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_forward_ad_and_torch_func_use_torch(monkeypatch):
    """The custom ops have no forward derivative: auto serves these calls with torch, and an
    explicit backend refuses them instead of returning zero tangents."""
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(2048, 512), torch.randn(2048, 512)  # large enough for the C++ kernels under auto
    cases = [(lambda a: gptkern.ops.layer_norm(a, (512,)), lambda a: F.layer_norm(a, (512,))),
             (lambda a: gptkern.ops.softmax(a, -1), lambda a: torch.softmax(a, -1)),
             (lambda a: gptkern.ops.rms_norm(a, (512,)), lambda a: F.rms_norm(a, (512,)))]
    for ours, theirs in cases:
        torch.testing.assert_close(torch.func.jvp(ours, (x,), (t,))[1], torch.func.jvp(theirs, (x,), (t,))[1])
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(ours(fwAD.make_dual(x, t))).tangent
        torch.testing.assert_close(tangent, torch.func.jvp(theirs, (x,), (t,))[1])
        torch.testing.assert_close(torch.func.grad(lambda a: ours(a).square().sum())(x),
                                   torch.func.grad(lambda a: theirs(a).square().sum())(x))
        with gptkern.backend("cpu"), pytest.raises(NotImplementedError, match="torch.func transforms"):
            torch.func.jvp(ours, (x,), (t,))
    with gptkern.backend("cpu"), fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        gptkern.ops.softmax(fwAD.make_dual(x, t), -1)


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_compiled_torch_func_uses_torch():
    """Under torch.compile the tensors' transform state cannot be read, but functorch's interpreter
    stack and the dual level can: a compiled jvp gave zero tangents, forward AD none, and a
    compiled grad failed before."""
    x, t = torch.randn(1024, 512), torch.randn(1024, 512)
    ours, theirs = (lambda a: gptkern.ops.rms_norm(a, (512,))), (lambda a: F.rms_norm(a, (512,)))

    import torch.autograd.forward_ad as fwAD

    def transforms(fn):
        def run(a, b):
            with fwAD.dual_level():
                dual_tangent = fwAD.unpack_dual(fn(fwAD.make_dual(a, b))).tangent
            return (torch.func.jvp(fn, (a,), (b,))[1], dual_tangent,
                    torch.func.grad(lambda c: fn(c).square().sum())(a))
        return run

    torch._dynamo.reset()
    got = torch.compile(transforms(ours), fullgraph=True)(x, t)
    want = transforms(theirs)(x, t)
    assert got[0].abs().sum() > 0 and got[1] is not None
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.compile(ours, fullgraph=True)(x), theirs(x))  # no transform: no change
    # fullgraph: Dynamo reports the NotImplementedError as Unsupported (a RuntimeError) quoting it
    jvp_only = lambda a, b: torch.func.jvp(ours, (a,), (b,))[1]  # noqa: E731
    for fn, reason in ((transforms(ours), "forward-mode AD"), (jvp_only, "torch.func transforms")):
        torch._dynamo.reset()
        with gptkern.backend("cpu"), pytest.raises((NotImplementedError, RuntimeError), match=reason):
            torch.compile(fn, fullgraph=True)(x, t)
    # a dual level without a dual input, and vmap alone: an explicit kernel backend serves them
    with gptkern.backend("cpu"), fwAD.dual_level():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(ours, fullgraph=True)(x), theirs(x))
    rows = x[:8].reshape(2, 4, 512)
    for backend in ("cpu", "auto"):
        torch._dynamo.reset()
        with gptkern.backend(backend):
            torch.testing.assert_close(torch.compile(torch.func.vmap(ours), fullgraph=True)(rows), theirs(rows))


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_transforms_around_vmap_use_torch():
    """grad(vmap(f)): f sees batched tensors over grad-tracking ones; the whole interpreter stack
    is read (the C++ op's formula failed under functorch before)."""
    x = torch.randn(3, 4, 512)
    loss = {name: (lambda a, fn=fn: torch.func.vmap(fn)(a).square().sum())
            for name, fn in (("ours", lambda a: gptkern.ops.rms_norm(a, (512,))),
                             ("theirs", lambda a: F.rms_norm(a, (512,))))}
    torch.testing.assert_close(torch.func.grad(loss["ours"])(x), torch.func.grad(loss["theirs"])(x))
    with gptkern.backend("cpu"), pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.grad(loss["ours"])(x)
    # jvp(vmap(f)), compiled: the innermost transform is vmap, under an open dual level whose tensors
    # are batched (unpack_dual has no batching rule: it crashed)
    t = torch.randn_like(x)
    tangents = [torch.compile(lambda fn=fn: torch.func.jvp(torch.func.vmap(fn), (x,), (t,))[1], fullgraph=True)()
                for fn in (loss["ours"], loss["theirs"])]
    torch.testing.assert_close(*tangents)


def test_forward_ad_through_attention_is_torch_s_answer():
    """PyTorch's CPU SDPA has no forward derivative and says so; gptkern's must not answer zeros,
    and its varlen attention gives torch's tangent (the C++ kernel would give none)."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    tangent = torch.randn_like(k)  # a tangent on the keys only
    for sdpa in (F.scaled_dot_product_attention, gptkern.ops.scaled_dot_product_attention):
        with pytest.raises(NotImplementedError, match="forward AD"):
            torch.func.jvp(lambda key: sdpa(q, key, v, is_causal=True), (k,), (tangent,))
    packed = [t.transpose(1, 2).reshape(16, 2, 8) for t in (q, k, v)]
    cu = torch.tensor([0, 16], dtype=torch.int32)
    tangents = []
    for backend in ("auto", "torch"):  # torch's varlen composition has a forward derivative
        with gptkern.backend(backend), fwAD.dual_level():
            dual_k = fwAD.make_dual(packed[1], tangent.transpose(1, 2).reshape(16, 2, 8))
            out = gptkern.ops.flash_attn_varlen(packed[0], dual_k, packed[2], cu, cu, 16, 16, causal=True)
            tangents.append(fwAD.unpack_dual(out).tangent)
    assert tangents[0] is not None and tangents[0].abs().sum() > 0
    torch.testing.assert_close(tangents[0], tangents[1])


def test_backend_blocks_are_per_thread():
    """Two threads' `with backend(...)` blocks ending out of order leave each thread its own
    choice and the process-wide one untouched."""
    import threading

    entered, release = [threading.Event() for _ in range(2)], [threading.Event() for _ in range(2)]
    seen = {}

    def worker(i, name):
        with gptkern.backend(name):
            entered[i].set()
            release[i].wait(10)
            seen[i] = _backend.get_backend()

    threads = [threading.Thread(target=worker, args=(i, name)) for i, name in enumerate(("torch", "cpu"))]
    for i, t in enumerate(threads):
        t.start()
        entered[i].wait(10)
    assert _backend.get_backend() == "auto"
    for i in (0, 1):  # the first to enter ends first
        release[i].set()
        threads[i].join(10)
    assert seen == {0: "torch", 1: "cpu"} and _backend.get_backend() == "auto"
    with gptkern.backend("torch"):
        gptkern.set_backend("cpu")  # the block's choice stands in this thread until it ends
        assert _backend.get_backend() == "torch"
    assert _backend.get_backend() == "cpu"
    gptkern.set_backend("auto")


def test_row_kernels_decline_rows_their_counters_cannot_reach():
    """The Triton row loop counts in int32 by 4096 (a row of 2**31 - 100 would wrap and store out of
    bounds), a program per row on its grid's first axis; the CUDA kernels take rows under 2**30:
    such calls go to the next backend under auto."""
    from gptkern.ops._checks import row_size_limits

    assert row_size_limits("triton", 2**31 - 100, 1) and row_size_limits("triton", 2**31 - 1 - 4096, 1) is None
    assert row_size_limits("triton", 1024, 2**31) and row_size_limits("triton", 1024, 2**31 - 1) is None
    assert row_size_limits("cuda", 2**30, 1) and row_size_limits("cuda", 2**30 - 1, 2**40) is None
    assert row_size_limits("cpu", 2**40, 2**40) is None


def test_record_choices_nests():
    """Each block gets the calls made inside it, nested blocks included (logs that compare equal
    are told apart by identity)."""
    from gptkern import _backend

    x = torch.randn(2, 3)
    with _backend.record_choices() as outer:
        with _backend.record_choices() as inner:
            pass
        gptkern.ops.softmax(x, -1)
    assert inner == [] and [op for op, _ in outer] == ["softmax"]
    assert _backend._choice_logs == []
    # a call inside the inner block is in both
    with _backend.record_choices() as outer, _backend.record_choices() as inner, gptkern.backend("torch"):
        gptkern.ops.log_softmax(x, -1)
    assert inner == outer == [("log_softmax", "torch")]


def test_the_size_rule_of_the_cpp_row_kernels_at_its_bounds():
    """Under auto the C++ softmax takes rows from 128 wide and calls from 1_000_000 elements (both
    bounds included)."""
    for shape, pays in (((8192, 128), True), ((8192, 127), False), ((2000, 500), True), ((1999, 500), False)):
        x = torch.randn(shape)
        assert (_backend.row_kernel_pays("softmax", x, shape[1], False) is None) == pays, shape


@pytest.mark.skipif("cpu" not in gptkern.available_backends(), reason="gptkern._C is not built")
def test_auto_under_vmap_uses_torch():
    """vmap alone: auto picks torch (its ops have batching rules), an explicit cpu backend serves it."""
    x = torch.randn(2, 4, 512)
    for backend, expected in (("auto", "torch"), ("cpu", "cpu")):
        with _backend.record_choices() as log, gptkern.backend(backend):
            out = torch.func.vmap(lambda a: gptkern.ops.rms_norm(a, (512,)))(x)
        assert log and {name for _, name in log} == {expected}, backend
        torch.testing.assert_close(out, F.rms_norm(x, (512,)))
    with _backend.record_choices() as log:
        gptkern.ops.rms_norm(x, (512,))
    assert log == [("rms_norm", "cpu")]
