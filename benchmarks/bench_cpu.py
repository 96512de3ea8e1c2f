"""The C++ CPU kernels (backend ``cpu``) against PyTorch's own, on this machine's CPU.

Rows: softmax / layer_norm / rms_norm (fwd, fwd+bwd), causal attention without and with dropout
(fwd, fwd+bwd) against F.scaled_dot_product_attention, decode attention (one query over a KV
cache) against SDPA, and the decode GEMVs (gptkern.ops.linear, one row, no grad) against
F.linear: the gpt2-small output layer and its 12 layers' weights in turn. Decode and GEMV rows
give their read bandwidth as a fraction of a read bandwidth measured in the same run (``sum`` of
a large fp32 tensor). The two providers of a row are timed in alternating rounds, so load from
other processes hits both alike; a round of a pair of calls shorter than 5 ms runs them several
times (not for the rows compared with the read roof).
ratio = torch time / cpu time (> 1: gptkern wins). Report only: nothing is asserted.

Usage: ``python benchmarks/bench_cpu.py [--threads 2] [--dtype fp32,bf16] [--repeats 7] [--quick]
[--tiny] [--cases attention,decode] [--row-shapes 8192x4096,1024x1024] [--json PATH]`` (gptkern
importable, e.g. installed with ``make setup``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import gptkern
from gptkern.benchmark import _unique, metadata, output_file_problem, write_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN_DROPOUT = 0.1  # the dropout row: both providers draw their own masks (in distribution alike)

CASES = ("softmax", "layer_norm", "rms_norm", "attention", "decode", "linear")  # the rows' first words


@dataclass(frozen=True)
class Sizes:
    row_shapes: tuple = ((8192, 4096),)     # norms / softmax: (rows, cols) each
    attn: tuple = (4, 8, 1024, 64)          # B, H, L = S, D (causal)
    decode: tuple = (8, 16, 4096, 64)       # B, H (= Hkv), cache length, D; one query
    read_bytes: int = 512 * 2**20           # the bandwidth probe's tensor
    vocab: int = 50257                      # GEMV rows: gpt2-small's output layer and layers
    n_embd: int = 768
    n_layer: int = 12


TINY = Sizes(row_shapes=((64, 256),), attn=(1, 2, 96, 32), decode=(2, 2, 300, 32), read_bytes=2**22, vocab=1000,
             n_embd=64, n_layer=2)


ROUND_S = 0.005  # a round of a shorter call runs it several times


def timed_pair(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
               batch: bool = True) -> dict[str, dict]:
    """Median / p20 / p80 ms per call of each function, timed in alternating rounds after
    warmup + 1 untimed calls each. With ``batch``, a round runs each function ``number`` times,
    enough for the slowest to take about ROUND_S (1 for calls of 5 ms and more); p20 / p80 are
    then over rounds, so narrower than the spread of single calls. Rows compared with a read
    roof are not batched (a repeated call would re-read cache-resident data)."""
    for fn in fns.values():
        for _ in range(warmup + 1):
            fn()
    slowest = 0.0
    for fn in fns.values():  # warm: sizes the rounds
        start = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - start)
    number = max(1, int(ROUND_S / max(slowest, 1e-7))) if batch else 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - start) * 1e3 / number)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive")
        out[name] = {"median_ms": statistics.median(ts), "p20_ms": q[1], "p80_ms": q[7]}
    return out


def with_backend(name: str, fn: Callable):
    def run(*args):
        with gptkern.backend(name):
            return fn(*args)
    return run


def grad_step(forward: Callable, inputs: list, grad_out: Optional[torch.Tensor]) -> Callable[[], object]:
    if grad_out is None:
        return lambda: forward(*inputs)
    return lambda: torch.autograd.grad(forward(*inputs), inputs, grad_out)


def row_cases(sizes: Sizes, dtype: torch.dtype):
    """(name, mode, cpu step, torch step, extra) for every row but decode."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for (n_rows, cols), mode in itertools.product(sizes.row_shapes, ("fwd", "fwd+bwd")):
        grad = mode == "fwd+bwd"
        x = torch.randn(n_rows, cols, dtype=dtype, generator=gen).requires_grad_(grad)
        w = (1 + 0.1 * torch.randn(cols, dtype=dtype, generator=gen)).requires_grad_(grad)
        b = (0.1 * torch.randn(cols, dtype=dtype, generator=gen)).requires_grad_(grad)
        g = torch.randn(n_rows, cols, dtype=dtype, generator=gen) if grad else None
        shape = (cols,)
        ops = {
            "softmax": (lambda x: gptkern.ops.softmax(x, -1), lambda x: torch.softmax(x, -1), [x]),
            "layer_norm": (lambda x, w, b, shape=shape: gptkern.ops.layer_norm(x, shape, w, b),
                           lambda x, w, b, shape=shape: F.layer_norm(x, shape, w, b), [x, w, b]),
            "rms_norm": (lambda x, w, shape=shape: gptkern.ops.rms_norm(x, shape, w),
                         lambda x, w, shape=shape: F.rms_norm(x, shape, w), [x, w]),
        }
        for name, (ours, theirs, inputs) in ops.items():
            cases.append((f"{name} {n_rows}x{cols}", mode, grad_step(with_backend("cpu", ours), inputs, g),
                          grad_step(theirs, inputs, g), None))
    bsz, heads, seq, dim = sizes.attn
    for mode, p in itertools.product(("fwd", "fwd+bwd"), (0.0, ATTN_DROPOUT)):
        grad = mode == "fwd+bwd"
        q, k, v = (torch.randn(bsz, heads, seq, dim, dtype=dtype, generator=gen).requires_grad_(grad)
                   for _ in range(3))
        g = torch.randn(bsz, heads, seq, dim, dtype=dtype, generator=gen) if grad else None
        ours = with_backend("cpu", lambda q, k, v, p=p: gptkern.ops.scaled_dot_product_attention(
            q, k, v, dropout_p=p, is_causal=True))
        theirs = lambda q, k, v, p=p: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # noqa: E731
        flops = 4 * bsz * heads * seq * seq * dim * 0.5 * (3.5 if grad else 1.0)  # causal; bwd 2.5x fwd
        cases.append((f"attention causal{f' dropout={p}' if p else ''} B={bsz} H={heads} L=S={seq} D={dim}", mode,
                      grad_step(ours, [q, k, v], g), grad_step(theirs, [q, k, v], g), {"flop": flops}))
    return cases


def read_bandwidth(nbytes: int, warmup: int, repeats: int) -> float:
    """GB/s of ``sum`` over an fp32 tensor of ``nbytes``: the read roof of this run."""
    x = torch.randn(nbytes // 4)
    t = timed_pair({"sum": lambda: x.sum()}, warmup, repeats, batch=False)["sum"]["median_ms"]
    return nbytes / t / 1e6


def decode_case(sizes: Sizes, dtype: torch.dtype):
    bsz, heads, seq, dim = sizes.decode
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(bsz, heads, 1, dim, dtype=dtype, generator=gen)
    k, v = (torch.randn(bsz, heads, seq, dim, dtype=dtype, generator=gen) for _ in range(2))
    seqlens = torch.full((bsz,), seq, dtype=torch.int32)
    ours = with_backend("cpu", lambda: gptkern.ops.decode_attention(q, k, v, seqlens))
    theirs = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    nbytes = 2 * k.numel() * k.element_size()  # K and V, each read once
    return (f"decode B={bsz} H={heads} cache={seq} D={dim}", "fwd", ours, theirs, {"bytes": nbytes, "reads": [k, v]})


def gemv_cases(sizes: Sizes, dtype: torch.dtype):
    """One-row linear layers without grad (batch-1 decoding): the output layer, then every
    layer's c_attn, attn c_proj, c_fc, mlp c_proj in turn (weights far larger than the caches)."""
    gen = torch.Generator().manual_seed(2)
    c = sizes.n_embd
    layer = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)]
    sets = {f"linear M=1 lm_head {sizes.vocab}x{c}": [(sizes.vocab, c)],
            f"linear M=1 gpt2 layers {sizes.n_layer}x[c_attn, c_proj, c_fc, c_proj]": layer * sizes.n_layer}
    cases = []
    for name, shapes in sets.items():
        ws = [torch.randn(n, k, dtype=dtype, generator=gen) / k ** 0.5 for n, k in shapes]
        bs = [torch.zeros(n, dtype=dtype) if n != sizes.vocab else None for n, _ in shapes]
        xs = {k: torch.randn(1, k, dtype=dtype, generator=gen) for _, k in shapes}

        def ours(ws=ws, bs=bs, xs=xs):
            with torch.no_grad(), gptkern.backend("cpu"):
                return [gptkern.ops.linear(xs[w.shape[1]], w, b) for w, b in zip(ws, bs)]

        def theirs(ws=ws, bs=bs, xs=xs):
            with torch.no_grad():
                return [F.linear(xs[w.shape[1]], w, b) for w, b in zip(ws, bs)]

        cases.append((name, "fwd", ours, theirs, {"bytes": sum(w.numel() * w.element_size() for w in ws), "reads": ws}))
    return cases


def run(args: argparse.Namespace, argv: Optional[list[str]] = None,
        save: Callable[[dict], None] = lambda report: None) -> dict:
    """The report; ``save`` gets it after every case (``complete`` False until the last)."""
    torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else Sizes()
    if args.row_shapes:
        sizes = replace(sizes, row_shapes=tuple(args.row_shapes))
    warmup, repeats = (0, 5) if args.quick else (2, args.repeats)
    rows = []
    roof = read_bandwidth(sizes.read_bytes, warmup, repeats)
    meta = metadata(torch.device("cpu"), sys.argv[1:] if argv is None else argv, warmup, repeats)
    meta.update(threads=args.threads, simd=getattr(gptkern._backend._extension(), "simd", None))
    report = {"meta": meta, "read_gbps": roof, "complete": False, "rows": rows}
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for name, mode, ours, theirs, extra in [*row_cases(sizes, dtype), decode_case(sizes, dtype),
                                                    *gemv_cases(sizes, dtype)]:
            if args.cases and name.split()[0] not in args.cases:
                continue
            print(f"[bench_cpu] {name} {mode} {dtype_name}", file=sys.stderr, flush=True)
            fns = {"cpu": ours, "torch": theirs}
            if extra and "bytes" in extra:
                # the read roof: torch's sum over the very tensors the case reads (same pages), timed in
                # the same rounds (this VM's bandwidth drifts between runs and allocations)
                fns["roof"] = lambda reads=extra["reads"]: [t.sum() for t in reads]
            t = timed_pair(fns, warmup, repeats, batch="roof" not in fns)
            row = {"case": name, "mode": mode, "dtype": dtype_name, "cpu": t["cpu"], "torch": t["torch"],
                   "ratio": t["torch"]["median_ms"] / t["cpu"]["median_ms"]}
            if extra and "bytes" in extra:
                row["gbps"] = extra["bytes"] / t["cpu"]["median_ms"] / 1e6
                row["roof_gbps"] = extra["bytes"] / t["roof"]["median_ms"] / 1e6
                row["read_fraction"] = row["gbps"] / row["roof_gbps"]
            if extra and "flop" in extra:
                row["gflops"] = extra["flop"] / t["cpu"]["median_ms"] / 1e6
            rows.append(row)
            save(report)
    report["complete"] = True
    return report


def _ms(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.4f}"


def table(report: dict) -> str:
    meta = report["meta"]
    lines = [f"gptkern cpu vs torch: {meta['device_name']}, {meta['threads']} threads, simd {meta['simd']}, "
             f"torch {meta['torch']}, median of {meta['repeats']} alternating rounds; ratio = torch ms / cpu ms; "
             f"read roof (fp32 sum) {report['read_gbps']:.1f} GB/s", "",
             "| case | mode | dtype | cpu ms | torch ms | ratio | notes |", "|---|---|---|---:|---:|---:|---|"]
    for r in report["rows"]:
        notes = []
        if "gflops" in r:
            notes.append(f"{r['gflops']:.0f} GFLOP/s")
        if "gbps" in r:
            notes.append(f"{r['gbps']:.1f} GB/s = {100 * r['read_fraction']:.0f}% of the read roof "
                         f"{r['roof_gbps']:.1f} GB/s (sum of the same tensors)")
        lines.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {_ms(r['cpu']['median_ms'])} | "
                     f"{_ms(r['torch']['median_ms'])} | {r['ratio']:.2f}x | {', '.join(notes)} |")
    return "\n".join(lines) + "\n"


def row_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = _unique(tuple(int(n) for n in item.lower().split("x")) for item in text.split(",") if item)
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 or s[0] * s[1] >= 2**63 for s in shapes):  # (int64 sizes)
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS[,ROWSxCOLS...] of positive integers, got {text!r}")
    return shapes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", type=lambda s: [d for d in s.split(",") if d], default=["fp32", "bf16"],
                        help="fp32,bf16 (default), fp16")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (at least 5)")
    parser.add_argument("--quick", action="store_true", help="one untimed call, 5 rounds (< 60 s)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (tests)")
    parser.add_argument("--cases", type=lambda s: [c for c in s.split(",") if c], default=None,
                        help=f"only these rows: {','.join(CASES)}")
    parser.add_argument("--row-shapes", type=row_shapes, default=None,
                        help="ROWSxCOLS[,ROWSxCOLS...] for the softmax / norm rows (default 8192x4096)")
    parser.add_argument("--json", help="write the report as JSON here (atomically)")
    args = parser.parse_args(argv)
    if "cpu" not in gptkern.available_backends():
        parser.error("the cpu backend is not available: gptkern._C is not built")
    if args.repeats < 5 or not args.dtype or any(d not in DTYPES for d in args.dtype):
        parser.error(f"--repeats must be >= 5 and --dtype a non-empty subset of {list(DTYPES)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.cases is not None and (not args.cases or any(c not in CASES for c in args.cases)):
        parser.error(f"--cases must name some of {', '.join(CASES)}, got {args.cases}")
    args.dtype = _unique(args.dtype)  # each once
    if args.json and output_file_problem(args.json):
        parser.error(f"--json {args.json} {output_file_problem(args.json)}")
    def save(report: dict) -> None:  # after each case: a run cut short keeps what it timed
        if args.json:
            write_atomic(args.json, json.dumps(report, indent=1) + "\n")

    report = run(args, argv, save)
    save(report)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
