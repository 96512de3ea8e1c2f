"""Where a step's time goes: a torch.profiler trace summed by kernel name into categories.

On CUDA the entries are the GPU kernels (their device time); on the CPU, the ops (their self
time, which on the CPU is the kernel), an op run inside ``Optimizer.step`` (AdamW's per-tensor
``mul_``, ``lerp_``, ``addcdiv_``...) counted as the optimizer's. Used by the training-step
benchmark's ``--profile``.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

# (category, pattern on the lowercased kernel or op name); the first match wins.
CATEGORIES = (
    ("optimizer", r"adam|optimizer|multi_tensor"),
    ("attention backward", r"(attn|attention|flash|fmha|sdpa|cudnn).*(bwd|backward|bprop|dkdv|_dq_|cutlassb)"),
    ("attention forward", r"attn|attention|flash|fmha|sdpa|cudnn"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|matmul|aten::mm$|aten::addmm|aten::bmm|sm90_|linear"),
    ("norms", r"norm|_sum_rows_kernel|sum_partials_kernel"),  # (the norm backward's dW / dB sums)
    ("softmax / cross-entropy", r"softmax|cross_entropy|nll"),
    ("other", r""),
)
TOP = 10


def category(name: str) -> str:
    lowered = name.lower()
    return next(cat for cat, pattern in CATEGORIES if re.search(pattern, lowered))


def profile_steps(step: Callable[[], object], steps: int, device: torch.device) -> dict:
    """Run ``step`` ``steps`` times under torch.profiler and summarize (see summarize). A profiler
    that fails (no CUPTI) gives ``{"error": ...}``: a report cell, not a lost benchmark."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        if device.type == "cuda":
            return summarize(prof.key_averages(), steps, device.type)
        return summarize_cpu_events(prof.events(), steps)
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def _in_optimizer(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if category(parent.name) == "optimizer":
            return True
        parent = parent.cpu_parent
    return False


def summarize_cpu_events(events, steps: int) -> dict:
    """summarize's result from a CPU profile's ``events`` (FunctionEvents, with their parents): each
    op's self time, in the optimizer's category when an enclosing range is the optimizer's."""
    totals: dict[tuple[str, str], list] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or e.self_cpu_time_total <= 0:
            continue
        cat = "optimizer" if _in_optimizer(e) else category(e.name)
        total = totals.setdefault((e.name, cat), [0.0, 0])
        total[0] += e.self_cpu_time_total
        total[1] += 1
    return _summary([{"name": name, "category": cat, "ms": us / 1e3 / steps, "calls": count / steps}
                     for (name, cat), (us, count) in totals.items()])


def summarize(entries, steps: int, device_type: str) -> dict:
    """``{"total_ms", "categories": {name: ms}, "top": [{"name", "category", "ms", "calls"}]}``,
    all per step, from profiler ``entries`` (key_averages): GPU kernels on CUDA, CPU ops'
    self time on the CPU."""
    rows = []
    for e in entries:
        if device_type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "category": category(e.key), "ms": us / 1e3 / steps,
                         "calls": e.count / steps})
    return _summary(rows)


def _summary(rows: list[dict]) -> dict:
    rows.sort(key=lambda r: -r["ms"])
    categories = {cat: 0.0 for cat, _ in CATEGORIES}
    for r in rows:
        categories[r["category"]] += r["ms"]
    return {"total_ms": sum(categories.values()), "categories": categories, "top": rows[:TOP]}


def markdown(profiles: dict[str, dict], what: str) -> list[str]:
    """Lines: one table of the categories (ms per step and share) with a column per provider,
    then each provider's top kernels (a failed profile: its error)."""
    lines = [f"Profile of {name} failed: {p['error']}" for name, p in profiles.items() if "error" in p]
    profiles = {name: p for name, p in profiles.items() if "error" not in p}
    if not profiles:
        return lines
    names = list(profiles)
    lines += [f"Where a step's time goes ({what}; ms per step, share of the summed time):", "",
             "| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for cat, _ in CATEGORIES:
        cells = []
        for name in names:
            p = profiles[name]
            ms = p["categories"][cat]
            cells.append(f"{ms:.2f} ({100 * ms / p['total_ms']:.0f}%)" if p["total_ms"] else "")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{profiles[n]['total_ms']:.2f}" for n in names) + " |")
    for name in names:
        lines += ["", f"Top of {name}:", "", "| name | category | ms | calls |", "|---|---|---:|---:|"]
        lines += [f"| `{r['name'][:90].replace('|', '/')}` | {r['category']} | {r['ms']:.3f} | {r['calls']:g} |"
                  for r in profiles[name]["top"]]
    return lines
