"""The main job (``make demo``, ``gptkern demo``): pretrain a small GPT on the embedded corpus
and sample from it, then check and time the kernels.

1. data: the embedded corpus (docstrings and comments of Python's standard library) is
   tokenized into OUT/data (once; reused afterwards);
2. training: ``gpt2-tiny`` for about 3 minutes on a CPU (``gpt2-small`` in bf16 on a GPU) with a
   progress bar, checkpoints in OUT/train;
3. sampling: text from the checkpoint through the KV cache, with its tokens/s;
4. kernels: a correctness summary of every op (softmax, log_softmax, layer_norm, rms_norm,
   attention) on every backend that runs here, then the kernel benchmark tables.

On a machine without CUDA the Triton kernels run in the Triton interpreter, so the
summary covers them too (at small sizes); they are not timed there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Callable, Optional, Sequence

import torch


def _enable_interpreter_without_cuda() -> None:
    # Before gptkern's first Triton call: Triton reads it when kernels are decorated.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _cases(device: torch.device) -> list[tuple[str, tuple[int, ...]]]:
    small = device.type == "cpu"
    shapes = [(4, 7), (3, 1023), (2, 5, 96)] if small else [(64, 7), (1024, 1023), (512, 8192), (64, 40000)]
    return [(op, s) for op in ("softmax", "log_softmax", "layer_norm", "rms_norm") for s in shapes]


def _run(op: str, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    import gptkern

    n = x.shape[-1]
    if op == "softmax":
        return gptkern.ops.softmax(x, -1)
    if op == "log_softmax":
        return gptkern.ops.log_softmax(x, -1)
    if op == "layer_norm":
        return gptkern.ops.layer_norm(x, (n,), *params)
    return gptkern.ops.rms_norm(x, (n,), *params, eps=1e-6)


def _reference(op: str) -> Callable:
    from gptkern.ops import reference

    return {
        "softmax": lambda x, p: reference.softmax_ref(x, -1),
        "log_softmax": lambda x, p: reference.softmax_ref(x, -1, log=True),
        "layer_norm": lambda x, p: reference.layer_norm_ref(x, (x.shape[-1],), *p),
        "rms_norm": lambda x, p: reference.rms_norm_ref(x, (x.shape[-1],), *p, eps=1e-6),
    }[op]


def check(op: str, shape: tuple[int, ...], dtype: torch.dtype, backend: str,
          device: torch.device) -> tuple[float, float]:
    """Max |error| of the forward and of all gradients against the float64 reference."""
    import gptkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (3 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_()
    n = shape[-1]
    params = []
    if op in ("layer_norm", "rms_norm"):
        params.append((1 + 0.5 * torch.randn(n, generator=gen)).to(device, dtype).requires_grad_())
    if op == "layer_norm":
        params.append(torch.randn(n, generator=gen).to(device, dtype).requires_grad_())
    with gptkern.backend(backend):
        y = _run(op, x, params)
        g = torch.randn(y.shape, generator=gen).to(device, dtype)
        grads = torch.autograd.grad(y, [x, *params], g)
    leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    y_ref = _reference(op)(leaves[0], leaves[1:])
    grads_ref = torch.autograd.grad(y_ref, leaves, g.double())
    fwd = (y.double() - y_ref).abs().max().item()
    bwd = max((a.double() - b).abs().max().item() for a, b in zip(grads, grads_ref))
    return fwd, bwd


# Max |error| allowed, per dtype, for outputs (forward) and gradients.
LIMITS = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 5e-2), torch.bfloat16: (8e-2, 4e-1)}


def correctness_summary(device: torch.device) -> bool:
    import gptkern
    from gptkern import _backend

    backends = [b for b in gptkern.available_backends() if _backend._backend_runs_on(b, device.type)]
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    print(f"## Correctness on {device.type}: max |error| against a float64 reference\n")
    print("| op | shape | backend | dtype | forward | gradients | result |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for op, shape in _cases(device):
        for backend in backends:
            for dtype in dtypes:
                ok &= _row(op, "x".join(map(str, shape)), backend, dtype,
                           lambda: check(op, shape, dtype, backend, device))
    ok &= _attention_summary(backends, dtypes, device)
    print()
    return ok


def check_attention(causal: bool, dtype: torch.dtype, backend: str, device: torch.device) -> tuple[float, float]:
    """Max |error| of SDPA (GQA, L != S) forward and gradients against float64 math."""
    import torch.nn.functional as F

    import gptkern

    gen = torch.Generator(device="cpu").manual_seed(1)
    shapes = [(2, 4, 40, 32), (2, 2, 56, 32), (2, 2, 56, 24)]
    q, k, v = (torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes)
    with gptkern.backend(backend):
        out = gptkern.ops.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        g = torch.randn(out.shape, generator=gen).to(device, dtype)
        grads = torch.autograd.grad(out, (q, k, v), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=True)
    fwd = (out.double() - ref).abs().max().item()
    bwd = max((a.double() - b).abs().max().item()
              for a, b in zip(grads, torch.autograd.grad(ref, leaves, g.double())))
    return fwd, bwd


def _attention_summary(backends, dtypes, device) -> bool:
    ok = True
    for causal in (False, True):
        # cuda: head dims 64 and 128 only (this case: 32 and 24)
        for backend in [b for b in backends if b != "cuda"]:
            for dtype in dtypes:
                ok &= _row("sdpa causal" if causal else "sdpa", "gqa 4/2 heads, L=40, S=56", backend, dtype,
                           lambda: check_attention(causal, dtype, backend, device))
    return ok


def _row(op: str, shape: str, backend: str, dtype: torch.dtype, measure: Callable[[], tuple[float, float]]) -> bool:
    """Print one table row: the errors ``measure`` returns against the dtype's limits."""
    try:
        fwd, bwd = measure()
    except Exception as exc:  # report, keep going
        print(f"| {op} | {shape} | {backend} | {str(dtype)[6:]} | error: {type(exc).__name__}: {exc} | | FAIL |")
        return False
    lim_f, lim_b = LIMITS[dtype]
    passed = fwd <= lim_f and bwd <= lim_b
    print(f"| {op} | {shape} | {backend} | {str(dtype)[6:]} | {fwd:.2e} | {bwd:.2e} | {'ok' if passed else 'FAIL'} |")
    return passed


def prepare_corpus(data, corpus_chars: Optional[int]) -> dict:
    """The embedded corpus tokenized into ``data`` (a pathlib.Path), capped at ``corpus_chars``;
    kept from an earlier run with the same cap, prepared again (over its own files) for another.
    A folder holding another dataset is refused, never overwritten. Returns its meta."""
    from gptkern._files import read_json_object
    from gptkern.data.corpus import corpus_description
    from gptkern.data.prepare import prepare

    meta_file = data / "meta.json"
    wanted = corpus_description(corpus_chars)
    if meta_file.is_file():
        meta = read_json_object(meta_file)  # a corrupt one is refused, naming the file
        source = str(meta.get("source", ""))
        if source == wanted:
            return meta
        if not source.startswith("embedded corpus:"):
            raise ValueError(f"{data} holds another dataset ({source}); give the demo another --out")
    elif data.exists() and any(data.iterdir()):
        raise ValueError(f"{data} is not empty and holds no prepared dataset; give the demo another --out")
    prepare([], data, "byte", max_chars=corpus_chars, progress=False)
    return read_json_object(meta_file)


# What a training run writes into its out_dir (gptkern/train/trainer.py, metrics.py, _files.py)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "loss.png", "tensorboard")
FILE_MANAGER_LEFTOVERS = (".DS_Store", "Thumbs.db", "desktop.ini")  # what browsing the folder may add


def clear_training_run(out_dir: str) -> None:
    """Delete the training run in ``out_dir`` (the demo's last one); a folder holding anything else
    is refused, never deleted."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise ValueError(f"{out_dir} is not a folder; give the demo another --out")
        return
    other = sorted(name for name in os.listdir(out_dir)
                   if name not in RUN_OUTPUTS + FILE_MANAGER_LEFTOVERS
                   and not name.startswith(tuple(f"{f}.tmp" for f in RUN_OUTPUTS)))
    if other:
        raise ValueError(f"{out_dir} holds files that are not a training run's ({', '.join(other[:3])}"
                         f"{', ...' if len(other) > 3 else ''}); give the demo another --out")
    shutil.rmtree(out_dir)


def pretrain_and_sample(out: str, minutes: float, corpus_chars: Optional[int], device: torch.device) -> None:
    """Steps 1-3: data, training, sampling."""
    import time
    from pathlib import Path

    from gptkern.generation import generate
    from gptkern.models.io import load_pretrained
    from gptkern.train import TrainConfig, train
    from gptkern.train.checkpoint import latest_checkpoint

    data = Path(out) / "data"
    clear_training_run(str(Path(out) / "train"))  # a fresh run each time (checked before any work)
    print(f"== 1/4 data: the embedded corpus -> {data}")
    meta = prepare_corpus(data, corpus_chars)
    print(f"   {meta['splits']['train']['tokens']:,} training tokens, {meta['splits']['val']['tokens']:,} "
          f"validation tokens ({meta['source']})")
    gpu = device.type == "cuda"
    config = TrainConfig(preset="gpt2-small" if gpu else "gpt2-tiny", data=str(data), out_dir=str(Path(out) / "train"),
                         batch_size=16 if gpu else 12, block_size=512 if gpu else 128, max_steps=5000 if gpu else 2000,
                         lr=6e-4 if gpu else 2e-3, min_lr=6e-5 if gpu else 2e-4, warmup_steps=50,
                         eval_interval=250, eval_steps=10, log_interval=10, checkpoint_interval=500,
                         max_seconds=60 * minutes, seed=1337)
    print(f"\n== 2/4 training {config.preset} for up to {minutes:g} min on {device.type} "
          f"(loss, tokens/s{', MFU' if gpu else ''} in the bar)")
    losses = train(config)
    print(f"   {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    path = latest_checkpoint(config.out_dir)
    print(f"\n== 3/4 sampling from {path} with the KV cache")
    model, tokenizer = load_pretrained(path, device=device)
    prompt = torch.tensor([tokenizer.encode("def ")], device=device)
    new = config.block_size - prompt.shape[1]  # the positions the model was trained on

    def sample(n):
        return generate(model, prompt, n, do_sample=True, temperature=0.8, top_k=40, seed=0)

    sample(8)  # warm-up: compiles and caches every kernel
    start = time.perf_counter()
    sample(1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    ids = sample(new)
    seconds = time.perf_counter() - start
    print("-" * 72)
    print(tokenizer.decode(ids[0].tolist()))
    print("-" * 72)
    print(f"   {new} tokens in {seconds:.2f} s: {(new - 1) / max(seconds - prefill, 1e-9):.0f} tokens/s decode "
          f"(batch 1, {device.type})\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gptkern demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training time (default 3)")
    parser.add_argument("--out", default="runs/demo", help="data, checkpoints and metrics (default runs/demo)")
    parser.add_argument("--corpus-chars", type=int, default=None, help="cap the embedded corpus (characters)")
    parser.add_argument("--skip-train", action="store_true", help="no data, training or sampling")
    parser.add_argument("--skip-bench", action="store_true", help="no kernel benchmarks")
    args = parser.parse_args(argv)
    if not 0 < args.minutes < float("inf"):
        parser.error(f"--minutes must be a positive number, got {args.minutes:g}")
    if args.corpus_chars is not None and args.corpus_chars < 1:
        parser.error(f"--corpus-chars must be >= 1, got {args.corpus_chars}")
    _enable_interpreter_without_cuda()
    import gptkern
    from gptkern import _backend, benchmark

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"gptkern {gptkern.__version__} on {benchmark.device_name(device)}; "
          f"backends here: {', '.join(gptkern.available_backends())}")
    if not args.skip_train:
        pretrain_and_sample(args.out, args.minutes, args.corpus_chars, device)
    print("== 4/4 kernels: correctness on every backend, then the benchmarks")
    if device.type == "cpu" and _backend.triton_interpret():
        print("(no CUDA device: the demo runs the Triton kernels in the Triton interpreter, "
              "TRITON_INTERPRET=1, for the correctness table; they are not timed)")
    print()
    ok = correctness_summary(device)
    if not args.skip_bench:
        from gptkern import bench_attention

        bench_args = ["--quick"] + (["--threads", "1"] if device.type == "cpu" else [])
        benchmark.main(bench_args)
        bench_attention.main(bench_args)
    print("correctness: all ok" if ok else "correctness: FAILURES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
