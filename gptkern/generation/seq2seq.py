"""Decoding for Seq2SeqTransformer: greedy and beam search, the encoder run once and the
cross-attention keys/values projected once."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from gptkern.generation.eval_mode import evaluating
from gptkern.generation.kv_cache import StaticKVCache
from gptkern.ops._checks import int_arg, is_int


def _setup(model, src, src_pad_mask, rows_per_source: int, max_new_tokens: int):
    """Memory projections for each decoder layer, repeated per beam, and a decoder KV cache."""
    c = model.config
    memory = model.encode(src, src_pad_mask)  # (B, S, C), once
    if rows_per_source > 1:
        memory = memory.repeat_interleave(rows_per_source, 0)
        src_pad_mask = None if src_pad_mask is None else src_pad_mask.repeat_interleave(rows_per_source, 0)
    memory_kv = [block.cross_attn.project_memory(memory) for block in model.decoder]
    cache = StaticKVCache(c.n_decoder_layer, memory.shape[0], c.n_head, max_new_tokens + 1, c.n_embd // c.n_head,
                          memory.dtype, memory.device)
    return memory_kv, src_pad_mask, cache


def _check(model, src, max_new_tokens, num_beams, length_penalty, early_stopping):
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"src must be a (batch, source_len) tensor of token ids, got {type(src).__name__}")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens > model.config.max_len:  # the decoder reads the start token and all but the last new one
        raise ValueError(f"max_new_tokens {max_new_tokens} is longer than max_len {model.config.max_len}: the "
                         f"decoder reads the start token and every new token but the last")
    if src.dim() != 2 or src.numel() == 0:
        raise ValueError(f"src must be a non-empty (batch, source_len) tensor, got shape {list(src.shape)}")
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) or not math.isfinite(
            length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


@torch.no_grad()
def generate_seq2seq(model, src: torch.Tensor, max_new_tokens: int, *, bos_token_id: int, eos_token_id: int,
                     src_pad_mask: Optional[torch.Tensor] = None, num_beams: int = 1, length_penalty: float = 1.0,
                     early_stopping: Union[bool, str] = False, pad_token_id: Optional[int] = None) -> torch.Tensor:
    """Translate ``src`` (B, S): returns (B, 1 + n) target ids starting with ``bos_token_id``,
    padded with ``pad_token_id`` (default: the EOS id) after each sequence's EOS.

    ``num_beams=1`` is greedy search. Beam search keeps ``num_beams`` hypotheses per source and
    scores a finished one by its summed log-probability / (generated length ** length_penalty).
    ``early_stopping``: True stops a source once it has ``num_beams`` finished hypotheses; False
    also stops when no running beam can still beat the worst of them at its current length;
    ``"never"`` runs to ``max_new_tokens``.
    """
    _check(model, src, max_new_tokens, num_beams, length_penalty, early_stopping)
    # token ids: ints, numpy integers or 0-d integer tensors, as ints
    bos_token_id = int_arg(bos_token_id, "bos_token_id", "generate_seq2seq")
    eos_token_id = int_arg(eos_token_id, "eos_token_id", "generate_seq2seq")
    vocab = model.config.target_vocab_size
    if not 0 <= bos_token_id < vocab:
        raise IndexError(f"bos_token_id {bos_token_id} is out of range for the target vocabulary of {vocab}")
    if pad_token_id is not None:
        pad_token_id = int_arg(pad_token_id, "pad_token_id", "generate_seq2seq")
    max_new_tokens, num_beams, length_penalty = int(max_new_tokens), int(num_beams), float(length_penalty)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    if max_new_tokens == 0:
        return torch.full((src.shape[0], 1), bos_token_id, dtype=torch.long, device=src.device)
    with evaluating(model, list(model.modules())):
        if num_beams == 1:
            out = _greedy(model, src, src_pad_mask, max_new_tokens, bos_token_id, eos_token_id)
        else:
            out = _beam_search(model, src, src_pad_mask, max_new_tokens, bos_token_id, eos_token_id, num_beams,
                               length_penalty, early_stopping, pad)
    return _pad_after_eos(out, eos_token_id, pad)


def _pad_after_eos(out: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    after = (out[:, 1:] == eos).long().cumsum(1) - (out[:, 1:] == eos).long() > 0  # strictly after the first EOS
    out = out.clone()
    out[:, 1:][after] = pad
    return out


def _greedy(model, src, src_pad_mask, max_new_tokens, bos, eos) -> torch.Tensor:
    b = src.shape[0]
    memory_kv, mask, cache = _setup(model, src, src_pad_mask, 1, max_new_tokens)
    tokens = torch.full((b, 1), bos, dtype=torch.long, device=src.device)
    finished = torch.zeros(b, dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        logits = model.decode(tokens[:, -1:], None, mask, cache=cache, memory_kv=memory_kv)
        token = logits[:, -1].argmax(-1)
        token = torch.where(finished, torch.full_like(token, eos), token)
        tokens = torch.cat([tokens, token[:, None]], 1)
        finished |= token == eos
        if bool(finished.all()):
            break
    return tokens


def _beam_search(model, src, src_pad_mask, max_new_tokens, bos, eos, k, length_penalty, early_stopping, pad):
    b = src.shape[0]
    device = src.device
    memory_kv, mask, cache = _setup(model, src, src_pad_mask, k, max_new_tokens)
    tokens = torch.full((b * k, 1), bos, dtype=torch.long, device=device)
    scores = torch.full((b, k), -float("inf"), device=device)
    scores[:, 0] = 0.0  # the first step expands one beam per source
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b

    def penalized(total: float, length: int) -> float:  # total: a finite log-probability, <= 0
        try:
            return total / (length ** length_penalty)
        except OverflowError:  # length ** penalty past fp64's largest: the quotient is 0
            return total * 0.0
        except ZeroDivisionError:  # length ** penalty below fp64's smallest
            return -math.inf if total < 0 else 0.0

    for step in range(max_new_tokens):
        logits = model.decode(tokens[:, -1:], None, mask, cache=cache, memory_kv=memory_kv)
        logprobs = torch.log_softmax(logits[:, -1].float(), -1)  # (B*K, V)
        vocab = logprobs.shape[-1]
        candidates = (scores.view(-1, 1) + logprobs).view(b, k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        length = step + 1  # generated tokens, the candidate included
        next_rows, next_tokens, next_scores = [], [], []
        for s in range(b):
            chosen = []
            if not done[s]:
                for rank, (score, index) in enumerate(zip(top_scores[s], top_index[s])):
                    beam, token = divmod(index, vocab)
                    if score == -float("inf"):
                        break
                    if token == eos:
                        if rank < k:
                            seq = tokens[s * k + beam, 1:].tolist() + [eos]
                            hyps[s].append((penalized(score, length), seq))
                    else:
                        chosen.append((s * k + beam, token, score))
                    if len(chosen) == k:
                        break
                if step < max_new_tokens - 1:  # at the last step the running beams are scored too (below),
                    done[s] = _source_done(hyps[s], k, chosen, length, penalized, early_stopping)  # as in HF
            if done[s] or len(chosen) < k:  # finished or out of candidates: dead beams fill the rest
                chosen += [(s * k, eos, -float("inf"))] * (k - len(chosen))
            for row, token, score in chosen:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        if all(done):
            break
        rows = torch.tensor(next_rows, device=device)
        cache.reorder(rows)
        tokens = torch.cat([tokens.index_select(0, rows), torch.tensor(next_tokens, device=device)[:, None]], 1)
        scores = torch.tensor(next_scores, device=device).view(b, k)
    for s in range(b):  # beams still running at the end count as finished
        if not done[s]:
            for beam in range(k):
                if scores[s, beam] > -float("inf"):
                    hyps[s].append((penalized(float(scores[s, beam]), tokens.shape[1] - 1),
                                    tokens[s * k + beam, 1:].tolist()))
    best = [max(h, key=lambda item: item[0])[1] if h else [] for h in hyps]
    width = 1 + max((len(seq) for seq in best), default=0)
    out = torch.full((b, width), pad, dtype=torch.long, device=device)  # a shorter hypothesis: padded
    out[:, 0] = bos
    for s, seq in enumerate(best):
        out[s, 1:1 + len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _source_done(hyps, k, running, length, penalized, early_stopping) -> bool:
    if len(hyps) < k or early_stopping == "never":
        return False
    if early_stopping is True or not running:
        return True
    worst_kept = sorted(score for score, _ in hyps)[-k]  # the k-th best finished hypothesis
    best_running = max(score for _, _, score in running)
    return worst_kept >= penalized(best_running, length)
