"""generate(): prefill the prompt into a KV cache, then decode one token at a time."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from gptkern.generation import cuda_graph as graphs
from gptkern.generation.cuda_graph import DecodeGraphSession, GraphedDecodeStep
from gptkern.generation.eval_mode import evaluating
from gptkern.generation.kv_cache import check_cache_kind, make_cache
from gptkern.generation.sampling import check_sampling_args, next_tokens
from gptkern.models.gpt import check_token_ids
from gptkern.ops._checks import int_arg, is_int


def _check_prompt(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  max_new_tokens: int) -> torch.Tensor:
    """The (B, L) 0/1 mask of the left-padded prompt, after the argument checks."""
    if not is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a (batch, prompt_len) tensor of token ids, got {type(input_ids).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, prompt_len), got shape {list(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"the prompt is empty: input_ids has shape {list(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(attention_mask.shape)}")
    mask = (attention_mask.to(input_ids.device) != 0).long()
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("a prompt in the batch is empty (its attention_mask is all zeros)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):  # the caches keep the last sum(mask) positions
        raise ValueError("prompts must be left-padded: attention_mask has padding after a real token")
    c = model.config
    longest = int(mask.sum(-1).max())  # positions count real tokens: padding takes none
    if c.pos_embedding == "learned" and fed_length(longest, max_new_tokens) > c.block_size:
        raise ValueError(f"prompt length {longest} plus max_new_tokens {max_new_tokens} is longer than "
                         f"the model's context (block_size {c.block_size}; the last new token is not fed back)")
    return mask


def _check_bool(flag, name: str) -> None:
    if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {flag!r}")


def fed_length(prompt_len: int, max_new_tokens: int) -> int:
    """The longest sequence the model runs on: the prompt and every new token but the last, which
    is returned, never fed back (so, as in transformers, block_size + 1 tokens in all fit)."""
    return prompt_len + max(max_new_tokens - 1, 0)


def _stop_ids(eos_token_id: Union[int, Sequence[int], torch.Tensor, None], device) -> Optional[torch.Tensor]:
    """The EOS ids (an int, a sequence of them, or a tensor of any shape) as a 1-D LongTensor."""
    if eos_token_id is None:
        return None
    try:
        ids = torch.as_tensor(eos_token_id).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"eos_token_id must be a token id (int), a sequence of them or None, got "
                        f"{eos_token_id!r}") from None
    if ids.numel() == 0:  # [] or (): no EOS
        return None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"eos_token_id must be token ids (ints), got {eos_token_id!r}")
    return ids.to(device=device, dtype=torch.long)


def _tokenizer_size(tokenizer) -> Optional[int]:
    """How many ids ``tokenizer`` decodes (transformers': with its added tokens), or None if unknown."""
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    return size if is_int(size) else None


@torch.no_grad()
def _decode_steps(model, input_ids, mask, max_new_tokens, *, cache, graphed: Optional[GraphedDecodeStep],
                  do_sample, temperature, top_k, top_p, repetition_penalty, eos, pad_token_id, stop_strings,
                  tokenizer, generator) -> Iterator[torch.Tensor]:
    """Yields (B,) next tokens, finished sequences padded, until all stop or the budget is spent."""
    b = input_ids.shape[0]
    seen = input_ids
    seen_valid = mask.bool() if not bool(mask.all()) else None  # left padding is not penalized
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    # finished rows output pad_token_id but feed the model a valid id (their outputs are not read),
    # so a pad outside the vocabulary (-1 in some configs) is fine
    feed_pad = pad_token_id if 0 <= pad_token_id < model.config.vocab_size else 0
    generated: list[list[int]] = [[] for _ in range(b)]
    if cache is not None:
        lengths = mask.sum(-1).tolist()
        cache.allocate(lengths)
    done = [False] * b
    known_ids = _tokenizer_size(tokenizer) if stop_strings else None
    step_input, step_mask = input_ids, mask
    modules = list(model.modules())
    for step in range(max_new_tokens):
        with evaluating(model, modules):  # each step, not across the yield: the user owns the mode between
            if graphed is not None and step > 0:
                logits = graphed(model, step_input[:, 0])
            else:
                hidden = model.transformer(step_input, step_mask, cache=cache)  # (B, L or 1, C)
                logits = model.lm_head(hidden[:, -1])  # (B, V): the last position is a real token (left padding)
        token = next_tokens(logits, seen, do_sample, temperature, top_k, top_p, repetition_penalty, generator,
                            seen_valid)
        fed = torch.where(finished, torch.full_like(token, feed_pad), token)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        if eos is not None:
            finished |= torch.isin(token, eos)
        if stop_strings:
            for i, t in enumerate(token.tolist()):
                if done[i]:
                    continue
                if known_ids is None or t < known_ids:  # a padded vocabulary's ids have no text
                    generated[i].append(t)
                text = tokenizer.decode(generated[i])  # whole: a character may span tokens
                if any(s in text for s in stop_strings):  # (a match found earlier would have stopped it)
                    finished[i] = True
        seen = torch.cat([seen, fed[:, None]], 1)  # (a finished row's ids are not read)
        if seen_valid is not None:
            seen_valid = torch.cat([seen_valid, torch.ones_like(seen_valid[:, :1])], 1)
        yield token
        if step == max_new_tokens - 1:
            return
        if eos is not None or stop_strings:
            done = finished.tolist()  # the one host sync per step
            if all(done):
                return
        if cache is not None:
            for row in range(b):
                if done[row] and lengths[row] >= 0:
                    cache.free(row)
                    lengths[row] = -1  # freed: its writes go to scratch
                elif not done[row]:
                    lengths[row] += 1
            cache.allocate([max(n, 0) for n in lengths])
            step_input, step_mask = fed[:, None], None
        else:
            step_input, step_mask = seen, torch.cat([step_mask, torch.ones_like(token)[:, None]], 1)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
             *, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             eos_token_id: Union[int, Sequence[int], torch.Tensor, None] = None, pad_token_id: Optional[int] = None,
             stop_strings: Union[str, Sequence[str], None] = None, tokenizer=None, seed: Optional[int] = None,
             stream: bool = False, use_cache: bool = True, cache: str = "static",
             num_cache_blocks: Optional[int] = None, cuda_graph: Optional[bool] = None):
    """Continue each prompt of ``input_ids`` (B, L) by up to ``max_new_tokens`` tokens.

    Prompts of different lengths are left-padded, with ``attention_mask`` (B, L) 1 on real tokens.
    Greedy by default; ``do_sample=True`` samples with ``temperature`` (0: greedy, where transformers
    raises), ``top_k``, ``top_p`` (after a ``repetition_penalty``), reproducibly with ``seed``. A
    sequence stops on its own at ``eos_token_id`` (one id or several) or at one of ``stop_strings``
    found in its generated text (decoded with ``tokenizer``; the prompt's text is not searched); later positions hold
    ``pad_token_id`` (default: the first EOS id, else 0), and generation ends early once every
    sequence has stopped. Each step runs the model in eval mode (its mode is restored after it).

    Returns a LongTensor (B, L + new): the prompt followed by the new tokens, as transformers
    returns it. With ``stream=True``, returns an iterator of the (B,) new tokens of each step.
    ``cache``: ``static`` (per-sequence buffers) or ``paged`` (a shared pool of 16-token blocks,
    ``num_cache_blocks`` of them, one of which is scratch; finished sequences return theirs);
    ``use_cache=False`` runs the whole sequence at every step. ``cuda_graph`` (default: on for CUDA models) captures the
    decode step once and replays it for every token; the graph and its cache are kept for the
    model's next call with the same batch size, total length and cache
    (:func:`gptkern.generation.release_decode_graphs` frees them).
    """
    model_device = next(model.parameters()).device
    mask = _check_prompt(model, input_ids, attention_mask, max_new_tokens)
    prompt = input_ids = input_ids.to(model_device, torch.long)  # returned in full
    mask = mask.to(model_device)
    # the model reads the real tokens only: padding ids (any value) become 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    check_token_ids(input_ids, model.config.vocab_size, "input_ids")
    c = model.config
    if c.pos_embedding == "learned" and fed_length(input_ids.shape[1], max_new_tokens) > c.block_size:
        # the padded width would pass the context: the steps skip the columns that are padding in
        # every row (only then: a fixed width keeps the CUDA-graph session's key from call to call)
        lead = input_ids.shape[1] - int(mask.sum(-1).max())
        input_ids, mask = input_ids[:, lead:], mask[:, lead:]
    top_k = check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    check_cache_kind(cache)
    if cache == "paged" and getattr(model.config, "window", None) is not None:
        raise ValueError("a sliding-window model decodes with cache='static' (the paged cache has no windows)")
    if isinstance(stop_strings, str):  # one string, as transformers takes it (not its characters)
        stop_strings = [stop_strings]
    if stop_strings is not None:
        try:
            stop_strings = list(stop_strings)
        except TypeError:
            raise TypeError(f"stop_strings must be a string, a sequence of strings or None, got "
                            f"{stop_strings!r}") from None
        if not all(isinstance(s, str) for s in stop_strings):
            raise TypeError(f"stop_strings must be strings, got {stop_strings!r}")
        if not all(stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs a tokenizer to decode the generated tokens")
    eos = _stop_ids(eos_token_id, model_device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    else:  # an int, numpy integer or 0-d integer tensor
        pad_token_id = int_arg(pad_token_id, "pad_token_id", "generate")
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if seed is not None and not -2**63 <= seed < 2**64:  # torch.Generator.manual_seed's range
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=model_device).manual_seed(int(seed))
    for name, flag in (("do_sample", do_sample), ("stream", stream), ("use_cache", use_cache)):
        _check_bool(flag, name)
    if cuda_graph is None:
        cuda_graph = model_device.type == "cuda"
    _check_bool(cuda_graph, "cuda_graph")
    cuda_graph = bool(cuda_graph)
    if num_cache_blocks is not None and cache != "paged":
        raise ValueError(f"num_cache_blocks sizes the paged cache; cache={cache!r} does not use it")
    shape = (cache, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, num_cache_blocks)
    use_cache = use_cache and max_new_tokens > 0
    if cuda_graph and use_cache:  # (only the cached decode steps are graphed)
        graphs.check_device(model_device)
    # the graphed path takes the model's kept cache when the generator starts, and gives it back
    # when it ends (a stream that is never iterated holds nothing)
    kv_cache = make_cache(model, *shape) if use_cache and not cuda_graph else None

    def steps():
        session, ok = None, True
        try:
            if use_cache and cuda_graph:
                session = DecodeGraphSession(model, *shape)
            yield from _decode_steps(model, input_ids, mask, max_new_tokens,
                                     cache=session.cache if session is not None else kv_cache,
                                     graphed=session.step if session is not None else None,
                                     do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                     repetition_penalty=repetition_penalty, eos=eos, pad_token_id=pad_token_id,
                                     stop_strings=stop_strings, tokenizer=tokenizer, generator=generator)
        except BaseException as err:
            ok = isinstance(err, GeneratorExit)  # a stream closed early is fine; an error or interrupt is not kept
            raise
        finally:
            if session is not None:
                session.release(ok)

    if stream:
        return steps()
    new = list(steps())
    return torch.cat([prompt, torch.stack(new, 1)], 1) if new else prompt.clone()
