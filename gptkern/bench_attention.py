"""Attention benchmark: gptkern's flash attention against every torch SDPA backend and torch.compile.

Dense cases ((B, H, L, D) tensors, ``L == S``, B·L tokens and H·D model width held constant) time:

* ``gptkern:<backend>``: ``gptkern.ops.scaled_dot_product_attention`` under that backend, for each
  backend that runs natively on the device (Triton on CPU only runs in the interpreter: not timed;
  ``gptkern:torch`` forwards to ``F.scaled_dot_product_attention``, i.e. ``torch:sdpa``: not timed);
* ``torch:sdpa``: ``F.scaled_dot_product_attention`` with PyTorch's own backend choice (the
  baseline of the speedup column);
* ``torch:flash``, ``torch:efficient``, ``torch:cudnn``, ``torch:math``: the same call under
  ``torch.nn.attention.sdpa_kernel(SDPBackend.<X>)``; a backend that refuses a configuration is
  reported as ``unsupported`` (``efficient`` and ``cudnn`` are CUDA-only and not timed on CPU);
* ``torch.compile``: ``torch.compile`` of ``math_attention`` (softmax(q kᵀ · scale + causal mask) v
  written with torch ops); a compile failure is an ``error`` cell.

Varlen cases (random sequence lengths summing to about the same number of tokens, packed as
(total, H, D)) time ``gptkern:<backend>`` ``flash_attn_varlen`` against ``torch:padded`` (one
``F.scaled_dot_product_attention`` call under the flash backend on the batch right-padded to the
longest sequence, without a padding mask, padding copies not timed: what a padded batch costs; the
baseline of the speedup column) and ``torch:loop`` (one ``F.scaled_dot_product_attention`` per
sequence on views of the packed tensors, outputs concatenated).

Modes: ``fwd``; ``bwd``: the forward runs once, untimed, then only
``torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)`` is timed; ``fwd+bwd``: both.
TFLOP/s counts the FLOPs of ``attention_flops`` (from the actual lengths for varlen, so padding
does no useful work); "% matmul" is of a square ``torch.matmul`` timed in the same run (8192³ on
CUDA, 512³ on CPU, in the benchmark's dtype). Timing, statistics and metadata come from
``gptkern.benchmark``.

Usage: ``python -m gptkern bench-attention [--quick] [--mode fwd,bwd,fwd+bwd] [--causal both]
[--seqlens 1024,4096] [--head-dims 64,128] [--suite dense,varlen] [--out-json P] [--out-md P]``.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gptkern
from gptkern import _backend, benchmark
from gptkern.benchmark import _error, _parse_list, add_common_args, device_from_args, metadata, time_fn

MODES = ("fwd", "bwd", "fwd+bwd")
SUITES = ("dense", "varlen")
# Per device type: sequence lengths, head dims, tokens per batch (B·L), model width (H·D).
DEFAULTS = {"cuda": {"seqlens": (512, 1024, 2048, 4096, 8192, 16384), "head_dims": (64, 128),
                     "tokens": 16384, "width": 2048, "matmul_n": 8192},
            "cpu": {"seqlens": (128, 256), "head_dims": (64,), "tokens": 512, "width": 256,
                    "matmul_n": 512}}
QUICK = {"cuda": {"seqlens": (1024, 4096), "head_dims": (128,)},
         "cpu": {"seqlens": (128,), "head_dims": (64,)}}
QUICK_MODES = ("fwd", "fwd+bwd")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SDPA_BACKENDS = {"torch:flash": "FLASH_ATTENTION", "torch:efficient": "EFFICIENT_ATTENTION",
                 "torch:cudnn": "CUDNN_ATTENTION", "torch:math": "MATH"}
CUDA_ONLY_SDPA = ("torch:efficient", "torch:cudnn")
DENSE_BASELINE, VARLEN_BASELINE = "torch:sdpa", "torch:padded"
BWD_TIMING = ("bwd: forward once outside the timed region, then torch.autograd.grad(out, inputs, "
              "grad_out, retain_graph=True) timed alone")

Forward = Callable[..., torch.Tensor]


def attention_flops(mode: str, batch: int, heads: int, l: int, s: int, d: int, causal: bool) -> float:
    """Matmul FLOPs of attention: fwd 4·B·H·L·S·D (q kᵀ and p v, 2 each), halved when causal
    and L = S; bwd 2.5x fwd (five matmuls instead of two); fwd+bwd 3.5x fwd. Softmax and masking
    are not counted; every provider gets the same count. Causal counts the area of the visible
    region under PyTorch's top-left alignment: L²/2 of L·S when L <= S, L·S - S²/2 when L > S."""
    area = l * s
    if causal:
        area = l * l / 2 if l <= s else l * s - s * s / 2
    return 4.0 * batch * heads * area * d * MODE_FACTOR[mode]


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale + causal mask) v with plain torch ops (the torch.compile provider)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


# ---------------------------------------------------------------- providers
# A dense factory takes (causal) and returns forward(q, k, v); a varlen factory takes
# (VarlenBatch, causal) and returns (forward, inputs): forward(*inputs) is the timed call.

def _gptkern_dense(name: str) -> Callable[[bool], Forward]:
    def make(causal: bool) -> Forward:
        def forward(q, k, v):
            with gptkern.backend(name):
                return gptkern.ops.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return forward
    return make


def _sdpa_dense(backend: Optional[str]) -> Callable[[bool], Forward]:
    def make(causal: bool) -> Forward:
        def forward(q, k, v):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return forward
    return make


def _compile_dense(causal: bool) -> Forward:
    torch.compiler.reset()  # a fresh, shape-specialized graph per case
    # The bwd mode replays one backward (retain_graph=True), which donated buffers forbid.
    torch._functorch.config.donated_buffer = False

    def forward(q, k, v):
        return math_attention(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]))
    return torch.compile(forward, dynamic=False)


class VarlenBatch:
    """Packed q, k, v (total, H, D) of sequences of ``lengths``, with int32 cu_seqlens."""

    def __init__(self, lengths: Sequence[int], heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, requires_grad: bool):
        self.lengths = list(lengths)
        self.bounds = [0]
        for n in self.lengths:
            self.bounds.append(self.bounds[-1] + n)
        self.cu_seqlens = torch.tensor(self.bounds, dtype=torch.int32, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        self.q, self.k, self.v = (
            torch.randn(self.bounds[-1], heads, head_dim, dtype=dtype, device=device,
                        generator=gen).requires_grad_(requires_grad) for _ in range(3))

    def padded(self) -> list[torch.Tensor]:
        """q, k, v right-padded with zeros to (B, H, max length, D), fresh leaves."""
        b, h, d = len(self.lengths), self.q.shape[1], self.q.shape[2]
        out = []
        for t in (self.q, self.k, self.v):
            p = t.new_zeros(b, max(self.lengths), h, d)
            for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
                p[i, :hi - lo] = t.detach()[lo:hi]
            out.append(p.transpose(1, 2).contiguous().requires_grad_(t.requires_grad))
        return out


def _gptkern_varlen(name: str):
    def make(batch: VarlenBatch, causal: bool):
        n = max(batch.lengths)

        def forward(q, k, v):
            with gptkern.backend(name):
                return gptkern.ops.flash_attn_varlen(q, k, v, batch.cu_seqlens, batch.cu_seqlens, n, n,
                                                     causal=causal)
        return forward, [batch.q, batch.k, batch.v]
    return make


def _padded_varlen(batch: VarlenBatch, causal: bool):
    return _sdpa_dense("FLASH_ATTENTION")(causal), batch.padded()


def _loop_varlen(batch: VarlenBatch, causal: bool):
    spans = list(zip(batch.bounds, batch.bounds[1:]))

    def forward(q, k, v):
        outs = [F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), k[lo:hi].transpose(0, 1),
                                               v[lo:hi].transpose(0, 1), is_causal=causal)
                for lo, hi in spans]
        return torch.cat([o.transpose(0, 1) for o in outs])
    return forward, [batch.q, batch.k, batch.v]


VARLEN_BACKENDS = ("triton", "cpu")  # gptkern backends with flash_attn_varlen kernels


def providers(device: torch.device) -> tuple[dict, dict, dict[str, str]]:
    """(dense providers, varlen providers, skipped: name -> reason)."""
    _, skipped = benchmark.providers(device)  # which gptkern backends run natively here
    skipped = {k: v for k, v in skipped.items() if k.startswith("gptkern:")}
    dense: dict = {}
    varlen: dict = {}
    for name in gptkern.available_backends():
        key = f"gptkern:{name}"
        if key in skipped:
            continue
        if name == "torch":
            skipped[key] = f"forwards to F.scaled_dot_product_attention, timed as {DENSE_BASELINE}"
            continue
        dense[key] = _gptkern_dense(name)
        if name in VARLEN_BACKENDS:
            varlen[key] = _gptkern_varlen(name)
        else:
            skipped[f"{key} (varlen)"] = "no varlen kernels (flash_attn_varlen: triton, cpu or torch)"
    if "gptkern:triton" not in dense and "gptkern:triton" not in skipped:
        skipped["gptkern:triton"] = ("runs only in the Triton interpreter on CPU" if device.type == "cpu"
                                     and benchmark.package_version("triton") else "not available here")
    dense[DENSE_BASELINE] = _sdpa_dense(None)
    for key, backend in SDPA_BACKENDS.items():
        if device.type != "cuda" and key in CUDA_ONLY_SDPA:
            skipped[key] = "CUDA-only SDPA backend"
        else:
            dense[key] = _sdpa_dense(backend)
    dense["torch.compile"] = _compile_dense
    varlen[VARLEN_BASELINE] = _padded_varlen
    varlen["torch:loop"] = _loop_varlen
    return dense, varlen, skipped


# ---------------------------------------------------------------- timing one provider

def _unsupported(exc: Exception) -> bool:
    text = str(exc)
    return isinstance(exc, NotImplementedError) or (
        isinstance(exc, RuntimeError) and ("No available kernel" in text or "No viable backend" in text))


def _step(forward: Forward, inputs: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """The timed call (see BWD_TIMING); runs the forward once for the grad modes."""
    if mode == "fwd":
        return lambda: forward(*inputs)
    out = forward(*inputs)
    gen = torch.Generator(device=out.device).manual_seed(1)
    grad_out = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=gen)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(forward(*inputs), inputs, grad_out)


def _measure(build: Callable[[], tuple[Forward, list[torch.Tensor]]], mode: str, device: torch.device,
             warmup: int, repeats: int) -> dict:
    """status ok with the timings, or unsupported / error with the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            forward, inputs = build()
            stats = time_fn(_step(forward, inputs, mode), device, warmup, repeats)
        except Exception as exc:  # a provider failing (no kernel, compile error, OOM) is a table cell
            benchmark.free_cached(device)
            reason = _error(exc)
            if _unsupported(exc):
                # torch's warnings say why each SDPA backend refused ("... requires ..."); the
                # "... not used because:" headers carry no reason.
                why = [str(w.message).strip().splitlines()[0] for w in caught
                       if str(w.message).strip() and not str(w.message).strip().endswith(":")]
                return {"status": "unsupported", "error": (f"{reason} ({'; '.join(why[:2])})" if why
                                                           else reason)[:300]}
            return {"status": "error", "error": reason}
    return {"status": "ok", **stats}


def _finish(results: list[dict], flops: float, matmul_tflops: float, baseline: str) -> list[dict]:
    base = next((r for r in results if r["provider"] == baseline and r["status"] == "ok"), None)
    for r in results:
        if r["status"] != "ok":
            continue
        r["tflops"] = flops / r["median_ms"] / 1e9
        r["matmul_fraction"] = r["tflops"] / matmul_tflops
        if base is not None:
            r["speedup"] = base["median_ms"] / r["median_ms"]
    return results


def _log(text: str) -> None:
    print(f"[bench-attention] {text}", file=sys.stderr, flush=True)


def run_dense_case(mode: str, causal: bool, batch: int, heads: int, seqlen: int, head_dim: int,
                   dtype: torch.dtype, device: torch.device, timed: dict, warmup: int, repeats: int,
                   matmul_tflops: float) -> list[dict]:
    """One result dict per provider for q, k, v of shape (batch, heads, seqlen, head_dim)."""
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        qkv, failed = [torch.randn(batch, heads, seqlen, head_dim, dtype=dtype, device=device,
                                   generator=gen).requires_grad_(mode != "fwd") for _ in range(3)], None
    except (RuntimeError, MemoryError) as exc:  # (torch.OutOfMemoryError is a RuntimeError)
        qkv, failed = None, benchmark.inputs_error(exc)
    if failed is not None:
        benchmark.free_cached(device)
    flops = attention_flops(mode, batch, heads, seqlen, seqlen, head_dim, causal)
    results = []
    for name, make in timed.items():
        _log(f"dense {mode} causal={causal} {batch}x{heads}x{seqlen}x{head_dim} {name}")
        entry = {"suite": "dense", "op": "sdpa", "mode": mode, "causal": causal, "batch": batch,
                 "heads": heads, "seqlen": seqlen, "head_dim": head_dim,
                 "dtype": str(dtype).removeprefix("torch."), "provider": name, "flops": flops,
                 "tokens": batch * seqlen}
        entry.update(failed or _measure(lambda: (make(causal), qkv), mode, device, warmup, repeats))
        results.append(entry)
    return _finish(results, flops, matmul_tflops, DENSE_BASELINE)


def varlen_lengths(tokens: int, seed: int = 0) -> list[int]:
    """Random lengths, uniform in [tokens/64, tokens/4] (at least 1), summing to at most
    ``tokens``: drawn until the next would not fit, then the remainder if it is long enough."""
    lo, hi = max(1, tokens // 64), max(1, tokens // 4)
    rng = random.Random(seed)
    lengths: list[int] = []
    while True:
        n = rng.randint(lo, hi)
        if sum(lengths) + n > tokens:
            break
        lengths.append(n)
    rest = tokens - sum(lengths)
    if rest >= lo:
        lengths.append(rest)
    return lengths


def run_varlen_case(mode: str, causal: bool, lengths: Sequence[int], heads: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device, timed: dict, warmup: int, repeats: int,
                    matmul_tflops: float) -> list[dict]:
    """One result dict per provider for packed sequences of ``lengths``."""
    try:
        batch, failed = VarlenBatch(lengths, heads, head_dim, dtype, device, mode != "fwd"), None
    except (RuntimeError, MemoryError) as exc:
        batch, failed = None, benchmark.inputs_error(exc)
    if failed is not None:
        benchmark.free_cached(device)
    flops = sum(attention_flops(mode, 1, heads, n, n, head_dim, causal) for n in lengths)
    tokens = sum(lengths)
    results = []
    for name, make in timed.items():
        _log(f"varlen {mode} causal={causal} {len(lengths)} seqs {tokens} tokens H={heads} D={head_dim} {name}")
        entry = {"suite": "varlen", "op": "varlen", "mode": mode, "causal": causal,
                 "batch": len(lengths), "heads": heads, "seqlen": max(lengths), "head_dim": head_dim,
                 "dtype": str(dtype).removeprefix("torch."), "provider": name, "flops": flops,
                 "tokens": tokens}
        entry.update(failed or _measure(lambda: make(batch, causal), mode, device, warmup, repeats))
        if entry["status"] == "ok":
            entry["tokens_per_s"] = tokens / entry["median_ms"] * 1e3
        results.append(entry)
    return _finish(results, flops, matmul_tflops, VARLEN_BASELINE)


def measure_matmul(n: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int) -> dict:
    """TFLOP/s of an n x n x n ``torch.matmul``: the roof for the "% matmul" column."""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, dtype=dtype, device=device, generator=gen) for _ in range(2))
    c = torch.empty_like(a)
    stats = time_fn(lambda: torch.matmul(a, b, out=c), device, warmup, repeats)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), **stats,
            "tflops": 2.0 * n ** 3 / stats["median_ms"] / 1e9}


# ---------------------------------------------------------------- report

def _cells(r: dict) -> str:
    if r["status"] != "ok":
        return f" {r['status']}: {r['error'].replace('|', '/')} | | | | |"  # as many cells as an ok row
    speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
    return (f" {r['median_ms']:.4f} | {r['p20_ms']:.4f}-{r['p80_ms']:.4f} | {r['tflops']:.3g} "
            f"| {100 * r['matmul_fraction']:.1f}% | {speedup} |")


def markdown(report: dict) -> str:
    meta, mm = report["meta"], report["matmul"]
    lines = [f"## gptkern attention benchmark: {meta['device_name']} ({meta['device']}), "
             f"{mm['dtype']}, {meta['date_utc']}" + ("" if report["complete"] else " (incomplete)"), "",
             f"torch {meta['torch']}, triton {meta['triton']}, gptkern {meta['gptkern']}. Median and "
             f"p20-p80 of {meta['repeats']} runs. TFLOP/s: `gptkern.bench_attention.attention_flops` "
             f"(4·B·H·L·S·D, x0.5 causal; bwd x2.5, fwd+bwd x3.5) / time; % matmul: of a "
             f"{mm['n']}³ {mm['dtype']} torch.matmul, {mm['tflops']:.3g} TFLOP/s "
             f"({mm['median_ms']:.4f} ms); {BWD_TIMING}.", ""]
    dense = [r for r in report["results"] if r["suite"] == "dense"]
    varlen = [r for r in report["results"] if r["suite"] == "varlen"]
    if dense:
        lines += [f"Dense: B = max(1, {report['tokens']} // L) sequences (B·L = {report['tokens']} tokens where L "
                  f"divides it), H·D = {report['width']}; speedup: "
                  f"{DENSE_BASELINE} (PyTorch's default SDPA) time / time.", "",
                  "| op | mode | causal | B | H | L | D | provider | median ms | p20-p80 ms | TFLOP/s "
                  "| % matmul | speedup |", "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in dense:
            lines.append(f"| {r['op']} | {r['mode']} | {'yes' if r['causal'] else 'no'} | {r['batch']} "
                         f"| {r['heads']} | {r['seqlen']} | {r['head_dim']} | {r['provider']} |" + _cells(r))
        lines.append("")
    if varlen:
        lengths = report["varlen_lengths"]
        lines += [f"Varlen: {len(lengths)} sequences, {sum(lengths)} tokens, lengths {lengths}; "
                  f"FLOPs from the actual lengths; speedup: {VARLEN_BASELINE} (padded batch, flash "
                  f"backend) time / time.", "",
                  "| op | mode | causal | seqs | H | max L | D | provider | median ms | p20-p80 ms "
                  "| TFLOP/s | % matmul | speedup | Mtok/s |",
                  "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in varlen:
            tok = f" {r['tokens_per_s'] / 1e6:.3g} |" if r["status"] == "ok" else " |"
            lines.append(f"| {r['op']} | {r['mode']} | {'yes' if r['causal'] else 'no'} | {r['batch']} "
                         f"| {r['heads']} | {r['seqlen']} | {r['head_dim']} | {r['provider']} |"
                         + _cells(r) + tok)
        lines.append("")
    if report["skipped"]:
        lines += [f"Not timed: {name} ({reason})." for name, reason in report["skipped"].items()]
    if report.get("autotune"):
        lines += ["", "Autotuning chose (key: kernel, dtype, D, Dv, causal, window, varlen, mask kind, dropout, "
                  "pow2 sizes (B·H, L, S), descriptors fit; then the device):"]
        lines += [f"- `{key}`: `{cfg}`" for key, cfg in report["autotune"].items()]
    return "\n".join(lines).rstrip("\n") + "\n"


def _save(report: dict, args: argparse.Namespace) -> str:
    return benchmark._save(report, args, markdown)  # with report["autotune"]: what autotuning chose


# ---------------------------------------------------------------- entry point

def _parse_ints(text: str) -> list[int]:
    try:
        values = benchmark._unique(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        values = []
    if not values or min(values) < 1 or max(values) >= 2**31:
        raise argparse.ArgumentTypeError(f"expected positive integers N[,N...] below 2**31, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptkern bench-attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", type=_parse_list(SUITES), default=list(SUITES),
                   help="dense, varlen or all (default: all)")
    p.add_argument("--mode", type=_parse_list(MODES), default=None,
                   help="'all' or a comma-separated subset of fwd, bwd, fwd+bwd (default: all; "
                        "--quick: fwd,fwd+bwd)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--seqlens", type=_parse_ints, default=None,
                   help="dense sequence lengths (default: %s on CUDA, %s on CPU)" % (
                       ",".join(map(str, DEFAULTS["cuda"]["seqlens"])),
                       ",".join(map(str, DEFAULTS["cpu"]["seqlens"]))))
    p.add_argument("--head-dims", type=_parse_ints, default=None,
                   help="head dims (default: 64,128 on CUDA, 64 on CPU)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per batch, B·L, also the varlen total (default: 16384 on CUDA, 512 on CPU)")
    p.add_argument("--width", type=int, default=None,
                   help="H·D: heads = width // head dim (default: 2048 on CUDA, 256 on CPU)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="size of the square matmul roof (default: 8192 on CUDA, 512 on CPU)")
    add_common_args(p, providers_example="gptkern:triton,torch:sdpa,torch:padded",
                    quick_help="CUDA: L 1024,4096, D 128; CPU: L 128, D 64; modes fwd,fwd+bwd; fewer repeats")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    device = device_from_args(parser, args)
    defaults = {**DEFAULTS[device.type], **(QUICK[device.type] if args.quick else {})}
    seqlens = args.seqlens or list(defaults["seqlens"])
    head_dims = args.head_dims or list(defaults["head_dims"])
    tokens = defaults["tokens"] if args.tokens is None else args.tokens
    width = defaults["width"] if args.width is None else args.width
    modes = args.mode or list(QUICK_MODES if args.quick else MODES)
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    dtype, warmup, repeats = benchmark.dtype_and_repeats(parser, args, device)
    if tokens < 1 or any(width // d < 1 for d in head_dims):
        parser.error("--tokens must be positive and --width at least the largest head dim")
    for flag, value in (("--tokens", tokens), ("--width", width), ("--matmul-n", args.matmul_n)):
        if value is not None and value >= 2**31:  # (past int64 once multiplied; torch would raise a TypeError)
            parser.error(f"argument {flag}: must be below 2**31, got {value}")
    if args.matmul_n is not None and args.matmul_n < 1:
        parser.error(f"argument --matmul-n: must be a positive int, got {args.matmul_n}")

    dense, varlen, skipped = providers(device)
    if args.providers is not None:
        known = set(dense) | set(varlen) | set(skipped)
        anywhere = known | {f"gptkern:{name}" for name in _backend.BACKENDS if name != "auto"}
        benchmark.check_providers(parser, args.providers, sorted(anywhere), shown=sorted(known))
        for name in sorted(set(args.providers) - known):  # a gptkern backend not built or not usable here
            skipped[name] = "not available here"
        dense = {k: v for k, v in dense.items() if k in args.providers}
        varlen = {k: v for k, v in varlen.items() if k in args.providers}
        skipped = {k: v for k, v in skipped.items() if k in args.providers}
    benchmark.check_output_files(parser, args)

    matmul_n = defaults["matmul_n"] if args.matmul_n is None else args.matmul_n
    try:
        matmul = measure_matmul(matmul_n, dtype, device, warmup, repeats)
    except (RuntimeError, MemoryError) as exc:  # (torch.OutOfMemoryError is a RuntimeError)
        parser.error(f"argument --matmul-n: {matmul_n}x{matmul_n} matrices in {str(dtype).removeprefix('torch.')} "
                     f"do not fit on {device}: {benchmark._error(exc)}")
    lengths = varlen_lengths(tokens)
    report = {"meta": {**metadata(device, argv, warmup, repeats), "bwd_timing": BWD_TIMING},
              "complete": False, "tokens": tokens, "width": width, "matmul": matmul,
              "varlen_lengths": lengths, "results": [], "skipped": skipped,
              "flops_model": attention_flops.__doc__.strip()}
    tflops = matmul["tflops"]
    if "dense" in args.suite and dense:
        for d in head_dims:
            for l in seqlens:
                for causal in causals:
                    for mode in modes:
                        report["results"] += run_dense_case(mode, causal, max(1, tokens // l), width // d,
                                                            l, d, dtype, device, dense, warmup, repeats,
                                                            tflops)
                        _save(report, args)  # after every case: a run cut short keeps what it timed
    if "varlen" in args.suite and varlen:
        for d in head_dims:
            for causal in causals:
                for mode in modes:
                    report["results"] += run_varlen_case(mode, causal, lengths, width // d, d, dtype,
                                                         device, varlen, warmup, repeats, tflops)
                    _save(report, args)
    report["complete"] = True
    print(_save(report, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
