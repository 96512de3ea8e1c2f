"""Training-step benchmark: tokens/s and MFU of a GPT training step (forward, backward, AdamW)
on gptkern's kernels against the same model on the ``torch`` backend, eager and compiled
(nanoGPT's recipe: torch SDPA + ``torch.compile``). Ratios measured in one run; never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Iterator, Optional, Sequence

import torch

import gptkern
import gptkern.nn as gnn
from gptkern import benchmark, kernel_profile
from gptkern.benchmark import _save, add_common_args, check_common_args, device_from_args, metadata
from gptkern.models import GPT, GPTConfig
from gptkern.train.metrics import peak_flops
from gptkern.train.trainer import PEAK_FLOPS

# gptkern-attention+compile: gptkern's attention, the norms torch.nn's own, which Inductor fuses with
# their neighbours (the residual adds): how much of the gap to torch+compile is attention's.
PROVIDERS = ("gptkern", "gptkern+compile", "torch", "torch+compile", "gptkern-attention+compile")
# Devices whose providers alternate step by step (a shared CPU drifts between blocks of steps;
# a GPU is steady, and one provider after another keeps the finished ones if a run is cut short).
ALTERNATE_ON = ("cpu",)


def step_times(provider: str, cfg: GPTConfig, batch: int, block: int, dtype, device,
               warmup: int) -> Iterator[Optional[float]]:
    """Builds the model and runs ``warmup`` untimed optimizer steps of ``batch`` sequences of
    ``block`` tokens, then yields None; every later ``next`` runs one step and yields its seconds.
    The backend is set per step, so several of these can alternate."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if provider.startswith("gptkern-attention"):
        torch_norms(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    backend = "torch" if provider.startswith("torch") else "auto"
    forward = torch.compile(model) if provider.endswith("+compile") else model
    x = torch.randint(0, cfg.vocab_size, (batch, block), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, block), device=device)

    def step() -> float:
        with gptkern.backend(backend):
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
            return time.perf_counter() - start

    for _ in range(warmup):
        step()
    yield None
    while True:
        yield step()


def torch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """``model``'s gptkern LayerNorm / RMSNorm modules turned into torch.nn's own, in place (the
    same parameters and state_dict: gptkern's subclass torch's and only override forward)."""
    for module in model.modules():
        if isinstance(module, gnn.LayerNorm):
            module.__class__ = torch.nn.LayerNorm
        elif isinstance(module, gnn.RMSNorm):
            module.__class__ = torch.nn.RMSNorm
    return model


def step_time(provider: str, cfg: GPTConfig, batch: int, block: int, dtype, device, steps: int, warmup: int,
              profile: int = 0) -> tuple[float, Optional[dict]]:
    """Median seconds of ``steps`` optimizer steps of one provider, timed alone; then, with
    ``profile`` > 0, where the time of that many more steps goes (kernel_profile), else None."""
    run = step_times(provider, cfg, batch, block, dtype, device, warmup)
    next(run)
    seconds = statistics.median(next(run) for _ in range(steps))
    return seconds, kernel_profile.profile_steps(lambda: next(run), profile, device) if profile else None


def markdown(report: dict) -> str:
    meta = report["meta"]
    alternating = " (the providers alternating step by step)" if meta["device"] in ALTERNATE_ON else ""
    reference = (f"speedup: tokens/s / {report['reference']}'s." if report["reference"]
                 else "speedup: none (no torch provider timed).")
    lines = [f"## gptkern training-step benchmark: {meta['device_name']} ({meta['device']}), {report['dtype']}, "
             f"{meta['date_utc']}" + ("" if report["complete"] else " (incomplete)"), "",
             f"torch {meta['torch']}, {meta['num_threads']} threads; {report['model']}, "
             f"batch {report['batch']} x {report['block']} tokens; median of {meta['repeats']} steps"
             f"{alternating}. {reference}", "",
             "| provider | step ms | tokens/s | MFU | speedup |", "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['provider']} | error: {r['error'].replace('|', '/')} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(f"| {r['provider']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {speedup} |")
    if report.get("profile"):
        lines += [""] + kernel_profile.markdown(
            report["profile"], "GPU kernels" if meta["device"] == "cuda" else "CPU ops' self time")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.splitlines()[0])
    add_common_args(p, "gptkern,torch+compile", "a tiny model and 2 steps",
                    threads_help="torch.set_num_threads on a CPU (on a machine without CUDA, default 2, "
                                 "the threads of the CPU targets, whatever OMP_NUM_THREADS says)")
    p.add_argument("--preset", default=None, help="default: gpt2-small on CUDA, gpt2-tiny on the CPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many more steps of each provider and report where "
                        "their time goes, by kernel category (default: 0, none)")
    args = p.parse_args(argv)
    check_common_args(p, args, PROVIDERS)
    for name in ("batch", "block"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"argument --{name}: must be >= 1, got {getattr(args, name)}")
    if args.profile < 0:
        p.error(f"argument --profile: must be >= 0, got {args.profile}")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):
        p.error(f"argument --peak-tflops: must be a positive number, got {args.peak_tflops}")
    if args.threads is None and args.device != "cuda" and not torch.cuda.is_available():
        args.threads = 2
    device = device_from_args(p, args)
    gpu = device.type == "cuda"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if gpu else "fp32")]
    preset = args.preset or ("gpt2-small" if gpu and not args.quick else "gpt2-tiny")
    try:
        cfg = GPTConfig.from_name(preset, **({"n_layer": 2} if args.quick else {}))
    except ValueError as err:
        p.error(f"argument --preset: {err}")
    batch = args.batch if args.batch is not None else (2 if args.quick else 16 if gpu else 8)
    block = args.block if args.block is not None else (32 if args.quick else min(cfg.block_size, 1024 if gpu else 256))
    if block > cfg.block_size:
        p.error(f"argument --block: at most the model's block_size {cfg.block_size}, got {block}")
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    providers = args.providers or [p_ for p_ in PROVIDERS if gpu or not p_.endswith("+compile")]
    peak = peak_flops(device, args.peak_tflops, PEAK_FLOPS)
    with torch.device("meta"):
        flops = GPT(cfg).flops_per_token(block)
    results = []
    report = {"meta": metadata(device, list(argv or []), warmup, repeats), "complete": False, "model": preset,
              "batch": batch, "reference": None, "block": block,
              "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
              "results": results, "profile": {}}

    def record(provider: str, seconds: float) -> None:
        tokens = batch * block / seconds
        row = {"provider": provider, "step_s": seconds, "tokens_per_s": tokens,
               "mfu": flops * tokens / peak if peak else None}
        for i, r in enumerate(results):
            if r["provider"] == provider:
                results[i] = row
                return
        results.append(row)

    def failed(provider: str, err: Exception) -> None:  # a provider that fails is reported, not fatal
        # (in place of a row its earlier steps recorded: its time no longer stands, nor its speedup)
        results[:] = [r for r in results if r["provider"] != provider]
        results.append({"provider": provider, "error": benchmark._error(err)})

    if device.type not in ALTERNATE_ON:  # one provider after another, saved after each
        for provider in providers:
            try:
                seconds, profile = step_time(provider, cfg, batch, block, dtype, device, repeats, warmup, args.profile)
                record(provider, seconds)
                if profile is not None:
                    report["profile"][provider] = profile
            except Exception as err:
                failed(provider, err)
            _add_speedups(report)
            _save(report, args, markdown)
    else:  # the providers' steps alternate, saved after each round
        runs, times = {}, {}
        for provider in providers:
            try:
                runs[provider] = step_times(provider, cfg, batch, block, dtype, device, warmup)
                next(runs[provider])
            except Exception as err:
                runs.pop(provider, None)
                failed(provider, err)
        for _ in range(repeats):
            for provider, run in list(runs.items()):
                try:
                    times.setdefault(provider, []).append(next(run))
                except Exception as err:
                    del runs[provider]
                    failed(provider, err)
                    continue
                record(provider, statistics.median(times[provider]))
            results.sort(key=lambda r: providers.index(r["provider"]))
            _add_speedups(report)
            _save(report, args, markdown)
        for provider, run in runs.items() if args.profile else ():
            report["profile"][provider] = kernel_profile.profile_steps(lambda: next(run), args.profile, device)
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
