"""Backend selection: which implementation serves a call.

Backends: ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``cuda`` and ``cpu`` (C++ kernels from ``gptkern._C``), ``torch`` (PyTorch
composition, always available) and ``auto``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
import threading
import warnings
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

log = logging.getLogger("gptkern")

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
_ENV_VAR = "GPTKERN_BACKEND"


def _check_name(name: str, source: str = "backend") -> str:
    if isinstance(name, str) and name.strip().lower() in BACKENDS:
        return name.strip().lower()
    raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")


# The process-wide choice, from GPTKERN_BACKEND at import; None when that is not a backend, so that
# op calls fail (get_backend raises the ValueError naming the variable), not ``import gptkern``.
try:
    _current: Optional[str] = _check_name(os.environ.get(_ENV_VAR, "auto") or "auto", source=_ENV_VAR)
    _ENV_ERROR: Optional[str] = None
except ValueError as _err:
    _current, _ENV_ERROR = None, str(_err)


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device, with ValueError when it names no device torch knows or a
    CUDA device and none is here."""
    try:
        device = torch.device(device)
    except RuntimeError as err:  # "Expected one of cpu, cuda, ... device type at start of device string"
        raise ValueError(f"device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA device is available here (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: where torch has one; meta holds no data
        available = torch.backends.mps.is_available if device.type == "mps" else \
            getattr(getattr(torch, device.type, None), "is_available", None)
        if available is None or not available():
            raise ValueError(f"device {device}: not available here")
    return device


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``check_device(device)``, with ``"auto"`` meaning the CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


_local = threading.local()  # .override: this thread's ``with backend(...)`` choice, or None


def get_backend() -> str:
    """The backend name in force: this thread's ``with backend(...)`` choice, else the
    process-wide one (``auto`` unless set otherwise)."""
    override = getattr(_local, "override", None)
    if override is not None:
        return override
    if _current is None:  # until set_backend: the import-time value was not a backend
        raise ValueError(_ENV_ERROR)
    return _current


def set_backend(name: str) -> None:
    """Select the backend for every following gptkern op call (process-wide; a ``with backend(...)``
    block still in force in a thread takes precedence there until it ends)."""
    global _current
    _current = _check_name(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Context manager that selects a backend for the calls of this thread and restores the
    previous choice on exit (blocks in other threads are independent)."""
    previous = getattr(_local, "override", None)
    _local.override = _check_name(name)
    try:
        yield _local.override
    finally:
        _local.override = previous


_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET: Optional[bool] = None


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter.

    Read once, at the first call: Triton decides interpret mode when a kernel is
    decorated, so ``TRITON_INTERPRET=1`` must be set before gptkern's first Triton call.
    """
    global _TRITON_INTERPRET
    if _TRITON_INTERPRET is None:
        _TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _TRITON_INTERPRET


def _has_triton() -> bool:
    return _HAS_TRITON


def _extension(jit: bool = False):
    """``gptkern._C`` if it is built (looked up once), else None.

    With ``jit``, a missing extension is built now (gptkern._jit: the first use of the ``cpu``
    backend); a failed build raises gptkern._jit.JITBuildError with the compiler's message.
    Functions given to :func:`on_extension_load` run once the module is loaded.
    """
    global _EXT, _EXT_MISSING
    if _EXT is _UNSET:
        _C = None
        _EXT_MISSING = _capability_problem()  # checked on the file: loading it could die of SIGILL
        if not _EXT_MISSING and importlib.util.find_spec("gptkern._C") is None:
            _EXT_MISSING = "gptkern._C is not built"  # (importing it would blame a circular import)
        if not _EXT_MISSING:
            try:
                from gptkern import _C  # type: ignore[attr-defined]
            except ImportError as err:
                _EXT_MISSING = f"gptkern._C does not import ({err})"
        _EXT = _C
        if _C is not None:
            check_cxx_runtime(_C)
            _run_load_hooks()
    if _EXT is None and jit:
        from gptkern import _jit

        _EXT = _jit.build(_EXT_MISSING)
        check_cxx_runtime(_EXT)
        _run_load_hooks()
    return _EXT


def check_cxx_runtime(ext) -> None:
    """Warn when ``ext`` (gptkern._C) carries its own copy of libstdc++: a compiler that links it
    statically (seen on a GPU image: CXX=/opt/gcc/bin/g++) gives a second C++ runtime beside
    torch's, and formatting a number into an error message then crashed the process."""
    if getattr(ext, "cxx_runtime_private", False):
        warnings.warn(
            f"gptkern._C ({getattr(ext, '__file__', '?')}) carries its own copy of libstdc++, linked statically "
            f"by the compiler that built it (CXX={os.environ.get('CXX', 'unset')}); its argument checks can crash "
            f"the process. Rebuild it with a compiler that links libstdc++ dynamically, e.g. CC=/usr/bin/gcc "
            f"CXX=/usr/bin/g++ pip install --no-build-isolation -e .", RuntimeWarning, stacklevel=3)


def _capability_problem() -> str:
    """Why the built gptkern._C cannot run on this CPU (built elsewhere, for SIMD this CPU lacks), else ""."""
    from gptkern import _build, _jit

    if "gptkern._C" in sys.modules:
        return ""
    try:
        spec = importlib.util.find_spec("gptkern._C")
    except (ImportError, ValueError):
        spec = None
    capability = _build.built_capability(spec.origin) if spec is not None and spec.origin else None
    missing = _build.missing_cpu_flags(capability) if capability else set()
    if not missing:
        return ""
    problem = (f"gptkern._C was built for {capability} but this CPU lacks {', '.join(sorted(missing))}: rebuild it "
               f"here (pip install --no-build-isolation -e .), or set GPTKERN_BACKEND=torch")
    _jit.refuse(problem)  # a second _C would register the same ops again
    return problem


_UNSET = object()
_EXT = _UNSET
_EXT_MISSING = ""
_LOAD_HOOKS: list[Callable[[], None]] = []
_HOOKS_RUN = 0


def on_extension_load(fn: Callable[[], None]) -> None:
    """Run ``fn`` (fake / autograd registrations of the C++ ops) once gptkern._C is loaded."""
    _LOAD_HOOKS.append(fn)
    if _EXT is not _UNSET and _EXT is not None:
        _run_load_hooks()


def _run_load_hooks() -> None:
    global _HOOKS_RUN
    while _HOOKS_RUN < len(_LOAD_HOOKS):
        _HOOKS_RUN += 1
        _LOAD_HOOKS[_HOOKS_RUN - 1]()


def _ext_serves(name: str, device_type: str) -> bool:
    """Whether gptkern._C, as built or as the JIT fallback would build it, serves ``name``."""
    if device_type != name:
        return False
    ext = _extension()
    if ext is not None:
        return name in getattr(ext, "devices", ()) and (name != "cuda" or torch.cuda.is_available())
    if name == "cpu":
        if torch.compiler.is_compiling():  # no build while tracing (its file checks would break the graph):
            return False  # an eager call builds it; until then, compiled graphs use another backend
        from gptkern import _jit

        return _jit.available()
    return False  # the JIT fallback builds the CPU kernels only


def _extension_problem(name: str) -> str:
    """Why gptkern._C cannot serve the ``cpu`` / ``cuda`` backend here (for error messages)."""
    ext = _extension()
    if ext is not None:
        return f"gptkern._C was built without {name} kernels"
    from gptkern import _jit

    why = _EXT_MISSING or "gptkern._C is not built"
    jit = _jit.unavailable_reason() if name == "cpu" else "the JIT build makes the CPU kernels only"
    return f"{why}; {jit}" if jit else why


def _backend_runs_on(name: str, device_type: str) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        if not _has_triton():
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    if name in ("cpu", "cuda"):
        return _ext_serves(name, device_type)
    return False


def available_backends() -> list[str]:
    """Backends that can run a call on this machine (``torch`` always)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS[1:] if any(_backend_runs_on(b, d) for d in devices)]


# Order tried by ``auto``, per device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}
# Per-op exceptions to _AUTO_ORDER, (op, device type) -> order, where the C++ kernels win
# (benchmarks/bench_cpu.py, 2 threads, AMD EPYC, AVX-512): causal attention fwd 2.0x, fwd+bwd 2.4x
# (fp32) of PyTorch's CPU SDPA, decode 1.3x / 7.7x (fp32 / bf16); rms_norm 2-3x forward and 5-10x forward+backward
# (PyTorch's is a composition of ops; 0.7x only on tiny 64x64 inputs); ``linear`` (no grad, at most
# 8 rows): the GEMV kernel reads the weights on both cores, MKL's on one (gpt2-small output layer
# 2.1-2.4x F.linear). softmax / log_softmax / layer_norm: from the sizes row_kernel_pays allows.
_AUTO_ORDER_BY_OP = {(op, "cpu"): ("cpu", "torch")
                     for op in ("scaled_dot_product_attention", "flash_attn_varlen", "decode_attention", "linear",
                                "rms_norm", "softmax", "log_softmax", "layer_norm")}


# From 32 MiB a fresh output is its own mapping (glibc), which the C++ ops advise onto transparent
# huge pages under GPTKERN_CPU_HUGE_PAGES=1 (csrc/cpu/huge_pages.h): far fewer page faults than
# PyTorch's output. fp32 with gradients gains from 128 MiB (2.4-2.7x at 8192 x 4096); at 32 MiB
# softmax ran 0.3-3.5x.
HUGE_PAGE_ELEMENTS = 32 * 2**20


@functools.lru_cache(maxsize=None)
def cpu_huge_pages() -> bool:
    """Whether the C++ CPU ops' large outputs get transparent huge pages: GPTKERN_CPU_HUGE_PAGES=1
    (read once, as the C++ side does) on Linux with THP not "never"."""
    if os.environ.get("GPTKERN_CPU_HUGE_PAGES") != "1":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def row_kernel_pays(op: str, input: torch.Tensor, width: int, grad: bool) -> Optional[str]:
    """Under ``auto``, whether the C++ softmax / log_softmax / layer_norm beats PyTorch's on this
    CPU call (None), else why not. Measured on 2 threads (benchmarks/results/
    2026-11-29_amd-epyc-2t_cpu-crossover.md, 2026-11-30_amd-epyc-2t_cpu-crossover.md,
    2026-11-30_amd-epyc-2t_cpu-huge-pages.md): from 1M elements (0.96-2.2x forward; in 16-bit with
    gradients 1.1-2.1x, bf16 softmax medians 0.92-1.17x); from 250K to 1M the forward ran 0.8-1.8x
    on a quiet VM and 0.7-1.2x on a loaded one, no clear winner, so it stays on torch. fp32
    forward+backward stays on torch (0.74-1.4x), but from HUGE_PAGE_ELEMENTS with huge pages on
    (2.4-2.7x); softmax rows under 128 wide too (0.8-1.0x: torch's kernel is as fast there), and
    softmax over a strided dim (the C++ op copies it: 0.2-0.8x)."""
    # fixed reasons: formatting a size would make torch.compile specialize on it
    if not isinstance(input.numel(), int) or not isinstance(width, int):
        return "symbolic sizes (torch.compile / export with dynamic shapes: no size guard)"
    if op != "layer_norm" and width < 128:
        return "rows under 128 wide (PyTorch's kernel is as fast)"
    if grad and input.dtype == torch.float32 and not (input.numel() >= HUGE_PAGE_ELEMENTS and cpu_huge_pages()):
        return "fp32 with gradients (PyTorch's kernels are as fast below 128 MiB with huge pages)"
    if input.numel() < 1_000_000:
        return "a small call (the custom op's fixed cost exceeds its gain)"
    return None


_GRAD_TRANSFORMS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def _transform_reason(inputs: Sequence[Optional[torch.Tensor]]) -> Optional[str]:
    """torch.func.grad / vjp / jvp and forward-mode AD: the custom ops have no forward derivative
    (a tangent would come back as zeros) and their autograd formulas do not run under functorch's
    grad. None when no such transform is active (vmap alone: see _vmap_reason)."""
    level = getattr(torch.autograd.forward_ad, "_current_level", -1)
    if torch.compiler.is_compiling():
        # Dynamo traces the transforms with functorch's interpreters active and reads the top one
        # (isinstance traces, where `is not None` folds to True), not the whole stack
        top = torch._C._functorch.peek_interpreter_stack()
        if isinstance(top, torch._C._functorch.CInterpreter) and (
                torch._functorch.pyfunctorch.coerce_cinterpreter(top).key() in _GRAD_TRANSFORMS):
            return "torch.func transforms (grad, vjp, jvp) under torch.compile"
    elif level < 0 and torch._C._functorch.peek_interpreter_stack() is None:
        return None  # no transform and no dual level
    elif any(ci.key() in _GRAD_TRANSFORMS for ci in torch._C._functorch.get_interpreter_stack() or ()):
        return "torch.func transforms (grad, vjp, jvp)"  # also grad(vmap(f)): batched tensors inside
    if level < 0:
        return None
    if isinstance(torch._C._functorch.peek_interpreter_stack(), torch._C._functorch.CInterpreter):
        return "forward-mode AD under a functorch transform"  # batched tensors: unpack_dual has no batching rule
    if any(isinstance(t, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
           for t in inputs):
        return "forward-mode AD (a dual tensor)"
    return None


def _vmap_reason() -> Optional[str]:
    """Under auto, vmap prefers torch: its ops have batching rules, where a custom op runs
    functorch's fallback, once per sample. (An explicitly chosen kernel backend still serves it.)"""
    top = torch._C._functorch.peek_interpreter_stack()
    if isinstance(top, torch._C._functorch.CInterpreter) and (
            torch._functorch.pyfunctorch.coerce_cinterpreter(top).key() == torch._C._functorch.TransformType.Vmap):
        return "vmap (torch's ops have batching rules; a custom op would run once per sample)"
    return None


# A check returns None when the backend can serve the call, else a reason.
Support = Callable[[], Optional[str]]


_logged: set[tuple[str, str, str]] = set()


def _log_fallback_once(op: str, name: str, reason: str) -> None:
    if torch.compiler.is_compiling() or (op, name, reason) in _logged:
        return
    _logged.add((op, name, reason))
    log.debug("gptkern.%s: backend %r skipped under auto: %s", op, name, reason)


_choice_logs: list[list[tuple[str, str]]] = []


@contextlib.contextmanager
def record_choices() -> Iterator[list[tuple[str, str]]]:
    """Collect (op, backend) for every op call inside the block (benchmarks name the backend
    that ``auto`` picked with it)."""
    log: list[tuple[str, str]] = []
    _choice_logs.append(log)
    try:
        yield log
    finally:
        _choice_logs[:] = [other for other in _choice_logs if other is not log]  # by identity: logs may be equal


def choose(op: str, device: torch.device, supports: dict[str, Support],
           auto_only: Optional[dict[str, Support]] = None,
           inputs: Sequence[Optional[torch.Tensor]] = ()) -> str:
    """Pick the backend for one call of ``op`` on ``device`` (see ``_choose``)."""
    name = _choose(op, device, supports, auto_only, inputs)
    for log in _choice_logs:
        log.append((op, name))
    return name


def _choose(op: str, device: torch.device, supports: dict[str, Support],
            auto_only: Optional[dict[str, Support]], inputs: Sequence[Optional[torch.Tensor]]) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``supports`` maps each backend that implements ``op`` to a check of the call's
    configuration; ``torch`` must be among them and serve everything. ``auto_only`` adds checks
    that only ``auto`` applies (where a backend can serve the call but is slower). ``inputs``:
    the call's tensors, which only ``torch`` serves under torch.func transforms or forward AD.
    """
    device_type = device.type
    transform = _transform_reason(inputs)
    if transform is not None:
        supports = {name: (check if name == "torch" else (lambda: transform)) for name, check in supports.items()}
    name = get_backend()
    if name != "auto":
        if name not in supports:
            runs = [b for b in supports if _backend_runs_on(b, device_type)]
            raise NotImplementedError(
                f"gptkern.{op}: the {name!r} backend does not implement this op; "
                f"backends that can run it on {device_type} tensors here: {runs}, or 'auto'")
        if not _backend_runs_on(name, device_type):
            runs = [b for b in supports if _backend_runs_on(b, device_type)]
            hint = " (set TRITON_INTERPRET=1 before the first Triton call, which imports triton)" if (
                name == "triton" and device_type == "cpu" and _has_triton()) else ""
            if name == device_type and name in ("cpu", "cuda") and not torch.compiler.is_compiling():
                hint = f" ({_extension_problem(name)})"
            raise NotImplementedError(
                f"gptkern.{op}: the {name!r} backend cannot run on {device_type} tensors "
                f"here{hint}; backends that can: {runs}")
        reason = supports[name]()
        if reason is not None:
            raise NotImplementedError(
                f"gptkern.{op}: the {name!r} backend does not support {reason}; "
                f"the 'torch' backend can serve this call")
        if name in ("cpu", "cuda"):
            _extension(jit=True)  # the first use of the cpu backend may build gptkern._C
        return name
    order = _AUTO_ORDER_BY_OP.get((op, device_type)) or _AUTO_ORDER.get(device_type, ("torch",))
    for name in order:
        if name not in supports or not _backend_runs_on(name, device_type):
            continue
        reason = supports[name]()
        if reason is None and name != "torch":
            reason = _vmap_reason()
        if reason is None and auto_only and name in auto_only:
            reason = auto_only[name]()
        if reason is None and name in ("cpu", "cuda"):
            reason = _load_for_auto()
        if reason is None:
            return name
        _log_fallback_once(op, name, reason)
    return "torch"


def _load_for_auto() -> Optional[str]:
    """Load (or build) gptkern._C for auto; a failed build is warned about once and skipped."""
    from gptkern import _jit

    try:
        _extension(jit=True)
        return None
    except _jit.JITBuildError as err:
        if "jit" not in _warned:
            _warned.add("jit")
            warnings.warn(str(err), RuntimeWarning, stacklevel=3)
        return "gptkern._C failed to build"


_warned: set[str] = set()
