"""``gptkern generate``: stream a model's continuation of a prompt to stdout."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from gptkern._backend import resolve_device
from gptkern.generation.generate import generate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptkern generate", description=__doc__.replace("`", "").strip())
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="a gptkern model directory (save_pretrained, train)")
    source.add_argument("--hf-dir", metavar="DIR", help="a Hugging Face GPT-2 directory with its tokenizer files")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 gives greedy decoding (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="0 turns top-k filtering off (default 200)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: none)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 on CUDA")
    p.add_argument("--bench", action="store_true", help="print prefill time, decode tokens/s and memory")
    return p


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    if args.checkpoint:
        from gptkern.models.io import load_pretrained

        model, tokenizer = load_pretrained(args.checkpoint, device=device, dtype=dtype)
        if tokenizer is None:
            raise ValueError(f"{args.checkpoint} has no tokenizer files")
        return model, tokenizer
    from gptkern.data.tokenizer import gpt2_tokenizer
    from gptkern.models import GPT

    model = GPT.from_hf(args.hf_dir).to(device=device, dtype=dtype).eval()
    return model, gpt2_tokenizer(args.hf_dir)


def _check_flags(args: argparse.Namespace) -> None:
    """The sampling flags, named as typed (generate() would name its own arguments)."""
    import math

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not -2**63 <= args.seed < 2**64:
        raise ValueError(f"--seed must fit in 64 bits, got {args.seed}")


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids: a byte tokenizer gets the command line's own bytes (Python holds bytes
    that are not UTF-8 as escaped surrogates, which would encode as three other bytes)."""
    if hasattr(tokenizer, "encode_bytes"):
        try:
            return tokenizer.encode_bytes(prompt.encode("utf-8", errors="surrogateescape"))
        except UnicodeEncodeError:  # a lone surrogate that came from elsewhere than argv
            pass
    return tokenizer.encode(prompt)


def _show(text: str) -> None:
    """Write text to stdout; what its encoding cannot hold (a lone surrogate a byte-level model
    produced) is replaced, never an error midway through the output."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdout.write(text.encode(encoding, errors="replace").decode(encoding))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    _check_flags(args)
    model, tokenizer = load(args, device, dtype)
    ids = _encode_prompt(tokenizer, args.prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens (an empty prompt)")
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"the prompt has token id {max(ids)}, outside the model's vocabulary (vocab_size "
                         f"{model.config.vocab_size}): the tokenizer does not belong to this model")
    prompt = torch.tensor([ids], device=device)
    start = time.perf_counter()
    steps = generate(model, prompt, args.max_new_tokens, do_sample=args.temperature > 0,
                     temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
                     eos_token_id=tokenizer.eos_id, stream=True)
    _show(args.prompt)
    new: list[int] = []
    shown = ""
    first_token_s = None
    for token in steps:
        if first_token_s is None:
            first_token_s = time.perf_counter() - start
        if int(token[0]) == tokenizer.eos_id:
            break
        if int(token[0]) < tokenizer.vocab_size:  # a model's vocabulary may be padded past the tokenizer's
            new.append(int(token[0]))
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            _show(text[len(shown):])
            sys.stdout.flush()
            shown = text
    total_s = time.perf_counter() - start
    _show(tokenizer.decode(new)[len(shown):] + "\n")
    if args.bench:
        decode_s = total_s - (first_token_s or 0.0)
        rate = (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else float("nan")
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        memory = f"weights {params / 2**20:.1f} MiB"
        if device.type == "cuda":
            memory += f", peak allocated {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB"
        if first_token_s is None:  # --max-new-tokens 0: the model never ran
            print(f"prompt {len(ids)} tokens, no new tokens (nothing timed), {memory}", file=sys.stderr)
        else:
            print(f"prompt {len(ids)} tokens, prefill {1e3 * first_token_s:.1f} ms, {len(new)} new tokens, "
                  f"decode {rate:.1f} tokens/s, {memory}", file=sys.stderr)
    return 0
