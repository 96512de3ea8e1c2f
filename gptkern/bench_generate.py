"""Generation benchmark: gptkern's ``generate`` against transformers' on the same random weights,
with and without the KV cache, and the decode-attention kernel against the copy bandwidth.

Rows (ratios measured in one run; never asserted):
- steady-state decode tokens/s (after the first WARM_TOKENS) of gptkern vs transformers ``generate``
  (greedy, batch 1, a 128-token prompt);
- gptkern with the cache vs without it: tokens/s at a ``--total``-token context;
- on CUDA: the decode-attention kernel at 8K-32K caches as a fraction of ``copy_`` bandwidth,
  and batch-64 steady-state decode throughput with the paged cache.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Optional, Sequence

import torch

import gptkern
from gptkern import _backend
from gptkern.benchmark import _save, add_common_args, check_common_args, device_from_args, metadata, time_fn
from gptkern.generation import generate
from gptkern.models import GPT, GPTConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Tokens a generate call makes before its steady state: the prefill's and, on a model's first call
# of a shape, an eager decode step and the step that captures the CUDA graph (gptkern on CUDA; the
# timed calls replay the graph kept from the warm-up call; the others' steady state starts sooner).
WARM_TOKENS = 3


def decode_rate(run, prompt_len: int, new: int, device, repeats: int, warmup: int = 1) -> dict:
    """Steady-state decode tokens/s: (time of prompt + new tokens - time of prompt + w tokens) /
    (new - w), w = min(WARM_TOKENS, new - 1); ``start_ms`` is the time of the first w tokens. NaN
    when noise made the longer run no slower than the shorter (no rate can be read from them)."""
    warm = min(WARM_TOKENS, new - 1)
    full = _timed(lambda: run(prompt_len, new), device, repeats, warmup)
    start = _timed(lambda: run(prompt_len, warm), device, repeats, warmup)
    rate = (new - warm) / (full - start) if full > start else float("nan")
    return {"start_ms": start * 1e3, "warm_tokens": warm, "total_ms": full * 1e3, "decode_tokens_per_s": rate}


def bench_vs_transformers(cfg: GPTConfig, dtype, device, prompt_len, new, batch, repeats, warmup: int = 1,
                          transformers: bool = True) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len + new), device=device)
    rows = []

    def ours(p, n):
        return generate(model, ids[:, :p], n)

    rows.append({"case": "generate", "provider": "gptkern",
                 **decode_rate(ours, prompt_len, new, device, repeats, warmup)})
    if not transformers:  # not asked for (--providers)
        return rows
    try:
        hf = model.to_hf().to(device=device, dtype=dtype).eval()
    except ImportError as err:
        rows.append({"case": "generate", "provider": "transformers", "error": str(err)})
        return rows

    def theirs(p, n):
        with torch.no_grad():
            return hf.generate(ids[:, :p], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)

    rows.append({"case": "generate", "provider": "transformers",
                 **decode_rate(theirs, prompt_len, new, device, repeats, warmup)})
    if "decode_tokens_per_s" in rows[1]:
        rows[0]["speedup"] = rows[0]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
    return rows


def bench_cache(cfg: GPTConfig, dtype, device, total: int, new: int, repeats: int, warmup: int = 1) -> list[dict]:
    """Per-token cost at a ``total``-token context: a decode step over the KV cache against
    recomputing the whole sequence (``use_cache=False``), both from a ``total - new`` prompt."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, total), device=device)
    prompt = total - new

    def run(use_cache):
        return lambda p, n: generate(model, ids[:, :p], n, use_cache=use_cache)

    cached = decode_rate(run(True), prompt, new, device, repeats, warmup)
    uncached = decode_rate(run(False), prompt, new, device, max(1, repeats // 2), warmup)
    return [{"case": f"cache vs none, {total}-token context", "provider": "gptkern",
             "with_cache_tokens_per_s": cached["decode_tokens_per_s"],
             "without_cache_tokens_per_s": uncached["decode_tokens_per_s"],
             "speedup": cached["decode_tokens_per_s"] / uncached["decode_tokens_per_s"]}]


KERNEL_REPEATS = 50


def bench_decode_kernel(device, dtype, lengths: Sequence[int], repeats: int) -> list[dict]:
    """The decode-attention kernel (B=8, H=32, Hkv=8, D=128) vs ``copy_`` of as many bytes as it
    reads, for full caches of ``lengths`` and the longest one filled to an eighth (a static cache
    early in a long generation: the kernels split the filled length, not the capacity). At least
    KERNEL_REPEATS timed calls after 10 untimed: the first H200 run timed 10 (gpu_check.sh's
    --repeats 2, five times) after 3, and its 8K cache took longer than the 16K one."""
    rows = []
    repeats = max(repeats, KERNEL_REPEATS)
    b, h, hkv, d = 8, 32, 8, 128
    cases = [(s, s) for s in lengths] + ([(max(lengths), max(lengths) // 8)] if lengths else [])
    for capacity, filled in cases:
        q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
        k, v = (torch.randn(b, hkv, capacity, d, device=device, dtype=dtype) for _ in range(2))
        seqlens = torch.full((b,), filled, dtype=torch.int32, device=device)
        with _backend.record_choices() as chosen:
            gptkern.ops.decode_attention(q, k, v, seqlens)
        t = time_fn(lambda: gptkern.ops.decode_attention(q, k, v, seqlens), device, 10, repeats,
                    queue_ahead=True)["median_ms"]  # tens of microseconds: as long as its launch
        read = 2 * b * hkv * filled * d * k.element_size()
        src = torch.empty(read // k.element_size(), device=device, dtype=dtype)
        dst = torch.empty_like(src)
        copy = time_fn(lambda: dst.copy_(src), device, 10, repeats, queue_ahead=True)["median_ms"]
        case = f"decode kernel, cache {capacity}" if filled == capacity else \
            f"decode kernel, cache {capacity} filled to {filled}"
        rows.append({"case": case, "provider": f"gptkern {chosen[-1][1]}", "median_ms": t,
                     "read_gbps": read / t / 1e6, "copy_gbps": 2 * read / copy / 1e6,
                     "fraction_of_copy": (read / t) / (2 * read / copy)})
    return rows


def bench_paged_batch(cfg, dtype, device, batch: int, prompt_len: int, new: int) -> list[dict]:
    """Steady-state decode tokens/s of a ``batch`` of left-padded prompts (lengths prompt_len/4 to
    prompt_len) with the paged cache, summed over the rows (the prefill is not counted)."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    lengths = torch.randint(max(1, prompt_len // 4), prompt_len + 1, (batch,)).tolist()  # (no empty prompt)
    ids = torch.zeros(batch, prompt_len, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, prompt_len - n:] = torch.randint(1, cfg.vocab_size, (n,), device=device)
        mask[row, prompt_len - n:] = 1
    rate = decode_rate(lambda p, n: generate(model, ids[:, :p], n, attention_mask=mask[:, :p], cache="paged"),
                       prompt_len, new, device, 2)
    return [{"case": f"batch {batch}, paged cache", "provider": "gptkern", "total_s": rate["total_ms"] / 1e3,
             "decode_tokens_per_s": batch * rate["decode_tokens_per_s"]}]


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"## gptkern generation benchmark: {meta['device_name']} ({meta['device']}), {report['dtype']}, "
             f"{meta['date_utc']}" + ("" if report["complete"] else " (incomplete)"), "",
             f"torch {meta['torch']}, {meta['num_threads']} threads; model "
             f"{report['model']}. Medians; speedup: ours / theirs.", "",
             "| case | provider | numbers | speedup |", "|---|---|---|---:|"]
    for r in report["results"]:
        numbers = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                            if k not in ("case", "provider", "speedup"))
        ratio = r.get("speedup")
        speedup = f"{ratio:.2f}x" if ratio is not None and math.isfinite(ratio) else ""
        lines.append(f"| {r['case']} | {r['provider']} | {numbers} | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_generate", description=__doc__.split("\n\n")[0].replace("\n", " "))
    add_common_args(p, "gptkern,transformers", "tiny model and short runs (seconds)",
                    threads_help="torch.set_num_threads on a CPU (on a machine without CUDA, default 2, "
                                 "the threads of the CPU targets, whatever OMP_NUM_THREADS says)")
    p.add_argument("--preset", default=None, help="model preset (default: gpt2-small, gpt2-tiny with --quick)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128, 16 with --quick)")
    p.add_argument("--new", type=int, default=None, help="tokens to generate (default 64, 8 with --quick)")
    p.add_argument("--total", type=int, default=None,
                   help="tokens for the cache comparison (default 1024, 64 with --quick; "
                        "at most the model's block_size)")
    args = p.parse_args(argv)
    check_common_args(p, args, ("gptkern", "transformers"))
    if args.providers is not None and "gptkern" not in args.providers:
        p.error("argument --providers: this benchmark times gptkern (against transformers): include gptkern")
    if args.threads is None and args.device != "cuda" and not torch.cuda.is_available():
        args.threads = 2
    device = device_from_args(p, args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    preset = args.preset or ("gpt2-tiny" if args.quick else "gpt2-small")
    try:
        cfg = GPTConfig.from_name(preset)
    except ValueError as err:
        p.error(f"argument --preset: {err}")
    prompt = args.prompt if args.prompt is not None else (16 if args.quick else 128)
    new = args.new if args.new is not None else (8 if args.quick else 64)
    total = args.total if args.total is not None else (64 if args.quick else 1024)
    cache_new = 8  # (3 left one token's difference to time)
    if new < 2:
        p.error(f"--new must be at least 2 (decode tokens/s needs a decode step), got {new}")
    if prompt < 1 or prompt + new > cfg.block_size:
        p.error(f"--prompt and --new: need 1 <= prompt and prompt + new <= the model's block_size "
                f"{cfg.block_size}, got {prompt} + {new}")
    if not cache_new < total:
        p.error(f"--total must be more than the {cache_new} tokens the cache comparison decodes, got {total}")
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    transformers = args.providers is None or "transformers" in args.providers
    sections = [lambda: bench_vs_transformers(cfg, dtype, device, prompt, new, 1, repeats, warmup, transformers),
                lambda: bench_cache(cfg, dtype, device, min(total, cfg.block_size), cache_new, repeats, warmup)]
    if device.type == "cuda":
        sections += [lambda: bench_decode_kernel(device, dtype, (8192,) if args.quick else (8192, 16384, 32768),
                                                 repeats * 5),
                     lambda: bench_paged_batch(cfg, dtype, device, 64, prompt, new)]
    report = {"meta": metadata(device, list(argv or []), warmup, repeats), "complete": False,
              "dtype": str(dtype).replace("torch.", ""), "model": preset, "results": []}
    for section in sections:  # the files are rewritten after each section (a run cut short keeps them)
        report["results"] += section()
        _save(report, args, markdown)
    report["complete"] = True
    print(_save(report, args, markdown))
    return 0
