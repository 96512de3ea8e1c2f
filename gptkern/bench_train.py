"""Training-step benchmark: tokens/s and MFU of a GPT training step (forward, backward, AdamW)
on gptkern's kernels against the same model on the ``torch`` backend, eager and compiled
(nanoGPT's recipe: torch SDPA + ``torch.compile``). Ratios measured in one run; never asserted.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

import gptkern
from gptkern.benchmark import _save, add_common_args, device_from_args, metadata
from gptkern.models import GPT, GPTConfig
from gptkern.train.metrics import peak_flops
from gptkern.train.trainer import PEAK_FLOPS

PROVIDERS = ("gptkern", "gptkern+compile", "torch", "torch+compile")


def step_time(provider: str, cfg: GPTConfig, batch: int, block: int, dtype, device, steps: int, warmup: int) -> float:
    """Median seconds of one optimizer step of ``batch`` sequences of ``block`` tokens."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    backend = "torch" if provider.startswith("torch") else "auto"
    forward = torch.compile(model) if provider.endswith("+compile") else model
    x = torch.randint(0, cfg.vocab_size, (batch, block), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, block), device=device)
    times = []
    with gptkern.backend(backend):
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                _, loss = forward(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def markdown(report: dict) -> str:
    meta = report["meta"]
    reference = (f"speedup: tokens/s / {report['reference']}'s." if report["reference"]
                 else "speedup: none (no torch provider timed).")
    lines = [f"## gptkern training-step benchmark: {meta['device_name']} ({meta['device']}), {report['dtype']}, "
             f"{meta['date_utc']}" + ("" if report["complete"] else " (incomplete)"), "",
             f"torch {meta['torch']}, {meta['num_threads']} threads; {report['model']}, "
             f"batch {report['batch']} x {report['block']} tokens; median of {meta['repeats']} steps. {reference}", "",
             "| provider | step ms | tokens/s | MFU | speedup |", "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['provider']} | error: {r['error']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(f"| {r['provider']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.splitlines()[0])
    add_common_args(p, "gptkern,torch+compile", "a tiny model and 2 steps")
    p.add_argument("--preset", default=None, help="default: gpt2-small on CUDA, gpt2-tiny on the CPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)
    if args.threads is None and args.device != "cuda" and not torch.cuda.is_available():
        args.threads = 2
    device = device_from_args(p, args)
    gpu = device.type == "cuda"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if gpu else "fp32")]
    preset = args.preset or ("gpt2-small" if gpu and not args.quick else "gpt2-tiny")
    cfg = GPTConfig.from_name(preset, **({"n_layer": 2} if args.quick else {}))
    batch = args.batch or (2 if args.quick else 16 if gpu else 8)
    block = args.block or (32 if args.quick else min(cfg.block_size, 1024 if gpu else 256))
    repeats = args.repeats or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    providers = args.providers or [p_ for p_ in PROVIDERS if gpu or not p_.endswith("+compile")]
    peak = peak_flops(device, args.peak_tflops, PEAK_FLOPS)
    flops = GPT(cfg).flops_per_token(block) if not gpu else None
    results = []
    report = {"meta": metadata(device, list(argv or []), warmup, repeats), "complete": False, "model": preset,
              "batch": batch, "reference": None, "block": block,
              "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
              "results": results}
    for provider in providers:  # the files are rewritten after each provider (a run cut short keeps them)
        try:
            seconds = step_time(provider, cfg, batch, block, dtype, device, repeats, warmup)
        except Exception as err:  # a provider that fails is reported, not fatal
            results.append({"provider": provider, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        else:
            if flops is None:
                with torch.device("meta"):
                    flops = GPT(cfg).flops_per_token(block)
            tokens = batch * block / seconds
            results.append({"provider": provider, "step_s": seconds, "tokens_per_s": tokens,
                            "mfu": flops * tokens / peak if peak else None})
        _add_speedups(report)
        _save(report, args, markdown)
    report["complete"] = True
    print(_save(report, args, markdown))
    return 0


def _add_speedups(report: dict) -> None:
    """Each timed provider's tokens/s over torch+compile's (torch's when that is not timed)."""
    timed = {r["provider"]: r["tokens_per_s"] for r in report["results"] if "tokens_per_s" in r}
    report["reference"] = next((name for name in ("torch+compile", "torch") if name in timed), None)
    for r in report["results"]:
        if report["reference"] and "tokens_per_s" in r:
            r["speedup"] = r["tokens_per_s"] / timed[report["reference"]]
