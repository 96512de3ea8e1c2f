"""Kernel benchmarks: gptkern backends against torch eager and torch.compile.

Every (op, mode, shape) case is timed for each provider:

* ``gptkern:<backend>``: ``gptkern.ops.<op>`` under ``gptkern.backend(<backend>)``, for each
  backend that runs natively on the device (Triton on CPU only runs in the interpreter and
  is not timed);
* ``torch``: the PyTorch eager function (``torch.softmax``, ``F.layer_norm``, ``F.rms_norm``);
* ``torch.compile``: ``torch.compile`` of that eager function.

CUDA times come from CUDA events around each call, queued behind a sleep kernel so that they
time the kernels and not their launches (``host_ms``: what queueing one call costs the host),
CPU times from ``time.perf_counter``; both report the median and the 20th/80th percentiles
over a fixed number of repeats. A ``y.copy_(x)`` of the same size is timed too, as the
bandwidth roof.

Usage: ``python -m gptkern bench [--op softmax,rms_norm] [--mode fwd] [--shapes 8192x8192]
[--dtype bf16] [--out-json PATH] [--out-md PATH] [--quick]``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import gptkern
from gptkern._files import output_file_problem, write_atomic  # noqa: F401  (write_atomic: the bench modules use it)
from gptkern import _backend
from gptkern.kernels import autotune, timing

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("softmax", "log_softmax", "layer_norm", "rms_norm")
DEFAULT_OPS = ("softmax", "layer_norm", "rms_norm")
SOFTMAX_OPS = ("softmax", "log_softmax")
NUM_PARAMS = {"softmax": 0, "log_softmax": 0, "layer_norm": 2, "rms_norm": 1}  # weight, bias
TORCH_OPS = {"softmax": torch.softmax, "log_softmax": torch.log_softmax,
             "layer_norm": F.layer_norm, "rms_norm": F.rms_norm}
MODES = ("fwd", "fwd+bwd")

CUDA_SHAPES = ((8192, 8192), (4096, 32768), (4096, 4096), (16384, 1024))
CPU_SHAPES = ((256, 1024), (64, 8192))
# (warmup, repeats) per device type; --quick uses the second pair.
REPEATS = {"cuda": ((10, 100), (5, 20)), "cpu": ((3, 20), (2, 5))}

Fn = Callable[..., torch.Tensor]


# ---------------------------------------------------------------- timing

def _quantiles(times_ms: list[float]) -> dict[str, float]:
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
    return {"median_ms": statistics.median(times_ms), "p20_ms": deciles[1], "p80_ms": deciles[7]}


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int,
            repeats: int, queue_ahead: bool = False) -> dict[str, float]:
    """Median, p20 and p80 in ms of ``repeats`` calls of ``fn`` after ``warmup`` calls.

    The first call is timed on its own (``first_call_ms``: JIT and compile time included). On
    CUDA each call is timed between two events; with ``queue_ahead`` (kernels shorter than their
    launch from Python, ``fn`` without host syncs) a sleep kernel holds the GPU while the host
    queues the calls (kernels.timing), so the events time the kernels, not the host, and
    ``host_ms`` reports what queueing one call costs the host.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    sync()
    if device.type == "cuda":
        extra = {}
        if queue_ahead:
            extra["host_ms"] = timing.host_ms(fn)
            sync()
        times = timing.event_times_ms(fn, repeats, queue_ahead, extra.get("host_ms", 0.0))
        return {**_quantiles(times), "first_call_ms": first_ms, **extra}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {**_quantiles(times), "first_call_ms": first_ms}


# ---------------------------------------------------------------- bytes moved

def traffic_bytes(op: str, mode: str, rows: int, cols: int, itemsize: int) -> int:
    """Bytes an ideal fused implementation reads plus writes, each tensor touched once.

    With N = bytes of x, C = bytes of weight or bias (x's dtype), R = bytes of one fp32
    statistic per row (mean or rstd):
      softmax fwd:    read x; write y                               2N
      softmax bwd:    read y, dy; write dx                          3N
      layer_norm fwd: read x, w, b; write y, mean, rstd             2N + 2C + 2R
      layer_norm bwd: read dy, x, w, mean, rstd; write dx, dw, db   3N + 3C + 2R
      rms_norm fwd:   read x, w; write y, rstd                      2N + C + R
      rms_norm bwd:   read dy, x, w, rstd; write dx, dw             3N + 2C + R
    log_softmax counts as softmax; fwd+bwd is the sum of both lines. Partial sums of dw/db
    across row blocks are not counted. Every provider gets the same count, so GB/s is an
    effective bandwidth.
    """
    n, c, r = rows * cols * itemsize, cols * itemsize, rows * 4
    fwd, bwd = {
        "softmax": (2 * n, 3 * n),
        "log_softmax": (2 * n, 3 * n),
        "layer_norm": (2 * n + 2 * c + 2 * r, 3 * n + 3 * c + 2 * r),
        "rms_norm": (2 * n + c + r, 3 * n + 2 * c + r),
    }[op]
    return fwd if mode == "fwd" else fwd + bwd


# ---------------------------------------------------------------- providers

def _call(fn: Fn, op: str, x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    if op in SOFTMAX_OPS:
        return fn(x, -1)
    return fn(x, x.shape[-1:], *params)


def _gptkern_provider(name: str) -> Callable[[str], Fn]:
    def make(op: str) -> Fn:
        def forward(x, *params):
            with gptkern.backend(name):
                return _call(getattr(gptkern.ops, op), op, x, params)
        return forward
    return make


def _torch_provider(op: str) -> Fn:
    return lambda x, *params: _call(TORCH_OPS[op], op, x, params)


def _compile_provider(op: str) -> Fn:
    torch.compiler.reset()  # a fresh, shape-specialized graph per case
    return torch.compile(_torch_provider(op), dynamic=False)


def providers(device: torch.device) -> tuple[dict[str, Callable[[str], Fn]], dict[str, str]]:
    """(providers that are timed: name -> factory(op) -> forward, skipped: name -> reason)."""
    timed: dict[str, Callable[[str], Fn]] = {}
    skipped: dict[str, str] = {}
    available = gptkern.available_backends()
    for name in (b for b in _backend.BACKENDS if b != "auto"):
        key = f"gptkern:{name}"
        if name not in available:
            skipped[key] = "not available here; `gptkern info` says why"
        elif not _backend._backend_runs_on(name, device.type):
            skipped[key] = f"does not run on {device.type} tensors"
        elif name == "triton" and device.type == "cpu":
            skipped[key] = "runs only in the Triton interpreter on CPU"
        else:
            timed[key] = _gptkern_provider(name)
    timed["torch"] = _torch_provider
    timed["torch.compile"] = _compile_provider
    return timed, skipped


# ---------------------------------------------------------------- cases

def _inputs(op: str, mode: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
    """(x, params, grad_out); x and params require grad in fwd+bwd mode."""
    grad = mode == "fwd+bwd"
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, cols, dtype=dtype, device=device, generator=gen).requires_grad_(grad)
    weight = 1 + 0.1 * torch.randn(cols, dtype=dtype, device=device, generator=gen)
    bias = 0.1 * torch.randn(cols, dtype=dtype, device=device, generator=gen)
    params = [p.requires_grad_(grad) for p in (weight, bias)[:NUM_PARAMS[op]]]
    grad_out = torch.randn(rows, cols, dtype=dtype, device=device, generator=gen) if grad else None
    return x, params, grad_out


def _step(forward: Fn, x: torch.Tensor, params: list, grad_out: Optional[torch.Tensor]):
    """The timed call: forward, or forward then the gradients of x and params."""
    if grad_out is None:
        return lambda: forward(x, *params)
    inputs = [x, *params]
    return lambda: torch.autograd.grad(forward(x, *params), inputs, grad_out)


def _error(exc: Exception) -> str:
    """The exception's type and first two lines (compile errors put the cause second)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' / '.join(lines[:2])}"[:300]


def measure_copy(rows: int, cols: int, dtype: torch.dtype, device: torch.device, warmup: int,
                 repeats: int) -> dict:
    x = torch.randn(rows, cols, dtype=dtype, device=device)
    y = torch.empty_like(x)
    stats = time_fn(lambda: y.copy_(x), device, warmup, repeats, queue_ahead=True)
    nbytes = 2 * x.numel() * x.element_size()
    return {"shape": [rows, cols], "dtype": str(dtype).removeprefix("torch."), "bytes": nbytes,
            **stats, "gbps": nbytes / stats["median_ms"] / 1e6}


def inputs_error(exc: BaseException) -> dict:
    """The table cell of a case whose inputs cannot be allocated (call free_cached after the
    ``except`` block, once the traceback no longer holds the partial inputs)."""
    return {"status": "error", "error": "the inputs do not fit: " + _error(exc)}


def free_cached(device: torch.device) -> None:
    """Hand CUDA's cached blocks back after a failed allocation (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(op: str, mode: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
             timed: dict[str, Callable[[str], Fn]], warmup: int, repeats: int,
             copy_gbps: float) -> list[dict]:
    """One result dict per provider; failures become ``status: error`` entries."""
    nbytes = traffic_bytes(op, mode, rows, cols, dtype.itemsize)
    try:
        x, params, grad_out = _inputs(op, mode, rows, cols, dtype, device)
        failed = None
    except (RuntimeError, MemoryError) as exc:  # (torch.OutOfMemoryError is a RuntimeError)
        failed = inputs_error(exc)
    if failed is not None:
        free_cached(device)
        return [{"op": op, "mode": mode, "shape": [rows, cols], "dtype": str(dtype).removeprefix("torch."),
                 "provider": name, "bytes": nbytes, **failed} for name in timed]
    results = []
    for name, make in timed.items():
        print(f"[bench] {op} {mode} {rows}x{cols} {name}", file=sys.stderr, flush=True)
        entry = {"op": op, "mode": mode, "shape": [rows, cols],
                 "dtype": str(dtype).removeprefix("torch."), "provider": name, "bytes": nbytes}
        try:
            stats = time_fn(_step(make(op), x, params, grad_out), device, warmup, repeats, queue_ahead=True)
        except NotImplementedError as exc:
            entry.update(status="unsupported", error=_error(exc))
        except Exception as exc:  # a provider failing (compile error, OOM) is a table cell
            entry.update(status="error", error=_error(exc))
        else:
            gbps = nbytes / stats["median_ms"] / 1e6
            entry.update(status="ok", **stats, gbps=gbps, copy_fraction=gbps / copy_gbps)
        results.append(entry)
    eager = next((r for r in results if r["provider"] == "torch" and r["status"] == "ok"), None)
    for r in results:
        if eager is not None and r["status"] == "ok":
            r["speedup_vs_torch"] = eager["median_ms"] / r["median_ms"]
    return results


# ---------------------------------------------------------------- report

def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(dist: str) -> Optional[str]:
    """The installed version of ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(device: torch.device, argv: Sequence[str], warmup: int, repeats: int) -> dict:
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "gptkern": gptkern.__version__,
        "platform": platform.platform(),
        "num_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "warmup": warmup,
        "repeats": repeats,
        "argv": list(argv),
    }


def markdown(report: dict) -> str:
    meta = report["meta"]
    dtype = report["copy"][0]["dtype"] if report["copy"] else ""
    lines = [f"## gptkern benchmark: {meta['device_name']} ({meta['device']}), {dtype}, "
             f"{meta['date_utc']}" + ("" if report["complete"] else " (incomplete)"), "",
             f"torch {meta['torch']}, triton {meta['triton']}, gptkern {meta['gptkern']}. "
             f"Median and p20-p80 of {meta['repeats']} runs. GB/s: bytes an ideal fused kernel "
             f"moves (`gptkern.benchmark.traffic_bytes`) / time; % copy: of `y.copy_(x)` GB/s; "
             f"speedup: torch eager time / time. On CUDA the timed calls are queued behind a sleep "
             f"kernel, so the times are the kernels'; host ms: what queueing one call costs the host.",
             "", "| copy shape | median ms | GB/s |", "|---|---:|---:|"]
    for c in report["copy"]:
        lines.append(f"| {c['shape'][0]}x{c['shape'][1]} | {c['median_ms']:.4f} | {c['gbps']:.1f} |")
    lines += ["", "| op | mode | shape | provider | median ms | p20-p80 ms | GB/s | % copy "
              "| speedup | host ms |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        head = f"| {r['op']} | {r['mode']} | {r['shape'][0]}x{r['shape'][1]} | {r['provider']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r['error'].replace('|', '/')} | | | | | |")
            continue
        speedup = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else ""
        host = f"{r['host_ms']:.4f}" if "host_ms" in r else ""
        lines.append(f"{head} {r['median_ms']:.4f} | {r['p20_ms']:.4f}-{r['p80_ms']:.4f} "
                     f"| {r['gbps']:.1f} | {100 * r['copy_fraction']:.0f}% | {speedup} | {host} |")
    if report["skipped"]:
        lines += [""] + [f"Not timed: {name} ({reason})." for name, reason in report["skipped"].items()]
    if report.get("autotune"):  # the fused row kernels' warps (launch.RowKernel.warp_choices)
        lines += ["", "Autotuning chose (key: kernel, dtypes, flags, constexprs, aligned, pow2 rows; then the "
                  "device): warps"]
        lines += [f"- `{key}`: {warps}" for key, warps in report["autotune"].items()]
    return "\n".join(lines) + "\n"


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _save(report: dict, args: argparse.Namespace, render: Optional[Callable[[dict], str]] = None) -> str:
    """Write the JSON and Markdown files asked for; returns the Markdown (``render``, by default
    this module's table)."""
    report["autotune"] = autotune.choices()  # what first-call autotuning chose so far (CUDA)
    text = (render or markdown)(report)
    if args.out_json:  # (NaN, a number that could not be measured, as null: bare NaN is not JSON)
        write_atomic(args.out_json, json.dumps(_finite_or_null(report), indent=1) + "\n")
    if args.out_md:
        write_atomic(args.out_md, text)
    return text


# ---------------------------------------------------------------- entry point

def _unique(items) -> list:
    """``items`` in order, each once (a name or shape given twice is timed once)."""
    return list(dict.fromkeys(items))


def _parse_list(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = list(choices) if text == "all" else _unique(s.strip() for s in text.split(",") if s.strip())
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected 'all' or a comma-separated subset of "
                                             f"{list(choices)}, got {text!r}")
        return names
    return parse


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = _unique(tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s.strip())
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 or s[0] * s[1] >= 2**63 for s in shapes):  # (int64 sizes)
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS[,ROWSxCOLS...] of positive integers, got {text!r}")
    return shapes


def _parser(prog: str = "gptkern bench", default_ops: Sequence[str] = DEFAULT_OPS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--op", type=_parse_list(OPS), default=list(default_ops),
                   help=f"'all' or a comma-separated list of {', '.join(OPS)} "
                        f"(default: {','.join(default_ops)})")
    p.add_argument("--mode", type=_parse_list(MODES), default=list(MODES),
                   help="fwd, fwd+bwd or all (default: all)")
    p.add_argument("--shapes", type=_parse_shapes, default=None,
                   help="ROWSxCOLS,... (default: %s on CUDA, %s on CPU)" % (
                       ",".join(f"{r}x{c}" for r, c in CUDA_SHAPES),
                       ",".join(f"{r}x{c}" for r, c in CPU_SHAPES)))
    add_common_args(p, providers_example="gptkern:triton,torch",
                    quick_help="first default shape only and fewer repeats")
    return p


def add_common_args(p: argparse.ArgumentParser, providers_example: str, quick_help: str,
                    threads_help: str = "torch.set_num_threads (CPU)") -> None:
    """The options every benchmark takes: dtype, device, providers, repeats, threads, outputs."""
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--providers", type=lambda s: _unique(n.strip() for n in s.split(",") if n.strip()),
                   default=None, help=f"comma-separated subset of providers to time, "
                                      f"e.g. {providers_example} (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per provider (>= 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out-json", metavar="PATH", help="write all numbers and metadata as JSON")
    p.add_argument("--out-md", metavar="PATH", help="write the Markdown tables")


def check_providers(parser: argparse.ArgumentParser, chosen: Optional[Sequence[str]], known: Sequence[str],
                    shown: Optional[Sequence[str]] = None) -> None:
    """--providers (``chosen``, None: all) names only ``known`` providers, at least one: else one
    argparse error line listing ``shown`` (default: ``known``)."""
    if chosen is None:
        return
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        parser.error(f"argument --providers: unknown {unknown or 'empty list'}; "
                     f"choose from {', '.join(shown if shown is not None else known)}")


def check_output_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--out-json and --out-md can be written (checked before any timing: they are written after)."""
    for flag in ("out_json", "out_md"):
        path = getattr(args, flag, None)
        problem = path and output_file_problem(path)
        if problem:
            parser.error(f"argument --{flag.replace('_', '-')}: {path} {problem}")
    json_path, md_path = getattr(args, "out_json", None), getattr(args, "out_md", None)
    if json_path and md_path and os.path.abspath(json_path) == os.path.abspath(md_path):
        parser.error(f"argument --out-md: {md_path} is also --out-json (the Markdown would overwrite the JSON)")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      providers: Sequence[str]) -> None:
    """--providers names only ``providers`` (and at least one), --repeats >= 2 and --warmup >= 0
    when given: else one argparse error line."""
    check_providers(parser, args.providers, providers)
    check_output_files(parser, args)
    if args.repeats is not None and args.repeats < 2:
        parser.error(f"argument --repeats: must be >= 2, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"argument --warmup: must be >= 0, got {args.warmup}")


def device_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The device ``--device`` names (auto: CUDA when there is one); applies ``--threads``."""
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"argument --threads: must be a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return torch.device(args.device)


def dtype_and_repeats(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      device: torch.device) -> tuple[torch.dtype, int, int]:
    """--dtype (bf16 on CUDA, fp32 on CPU by default), --warmup and --repeats (per device and --quick)."""
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    warmup, repeats = REPEATS[device.type][1 if args.quick else 0]
    warmup = warmup if args.warmup is None else args.warmup
    repeats = repeats if args.repeats is None else args.repeats
    if repeats < 2:
        parser.error(f"argument --repeats: must be >= 2, got {repeats}")
    if warmup < 0:
        parser.error(f"argument --warmup: must be >= 0, got {warmup}")
    return dtype, warmup, repeats


def main(argv: Optional[Sequence[str]] = None, prog: str = "gptkern bench",
         default_ops: Sequence[str] = DEFAULT_OPS) -> int:
    """``gptkern bench``; the benchmarks/bench_*.py scripts call it with their own name and ops."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog, default_ops)
    args = parser.parse_args(argv)
    device = device_from_args(parser, args)
    shapes = args.shapes or list(CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.quick and args.shapes is None:
        shapes = shapes[:1]
    dtype, warmup, repeats = dtype_and_repeats(parser, args, device)

    timed, skipped = providers(device)
    check_providers(parser, args.providers, sorted(timed) + sorted(skipped))
    check_output_files(parser, args)
    if args.providers is not None:
        timed = {k: v for k, v in timed.items() if k in args.providers}
        skipped = {k: v for k, v in skipped.items() if k in args.providers}
    if "torch" not in timed:
        print("[bench] note: 'torch' not among the providers, no speedups", file=sys.stderr)

    copies = []
    for rows, cols in shapes:
        try:
            copies.append(measure_copy(rows, cols, dtype, device, warmup, repeats))
        except (RuntimeError, MemoryError) as exc:  # (torch.OutOfMemoryError is a RuntimeError)
            parser.error(f"argument --shapes: {rows}x{cols} in {str(dtype).removeprefix('torch.')} does not fit "
                         f"on {device}: {_error(exc)}")
    report = {"meta": metadata(device, argv, warmup, repeats), "complete": False, "copy": copies,
              "results": [], "skipped": skipped, "bytes_model": traffic_bytes.__doc__.strip()}
    for op in args.op:
        for (rows, cols), copy in zip(shapes, copies):
            for mode in args.mode:
                report["results"] += run_case(op, mode, rows, cols, dtype, device, timed,
                                              warmup, repeats, copy["gbps"])
                _save(report, args)  # after every case: a run cut short keeps what it timed
    report["complete"] = True
    print(_save(report, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
