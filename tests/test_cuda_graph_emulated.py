"""The CUDA-graph decode path of generate(), run on the CPU under tests/cuda_graph_emu.py: replay
gives the tokens of eager decoding, and the step reads nothing on the host while capturing. The
same check on a real GPU is tests/test_gpu_generation.py."""
import pytest
import torch

import cuda_graph_emu
import gptkern
from gptkern.generation import generate
from gptkern.models import GPT, GPTConfig


@pytest.fixture
def emulator(monkeypatch):
    return cuda_graph_emu.install(monkeypatch)


def capture(fn):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# --- the emulator keeps a real capture's semantics ---------------------------------------------

def test_capture_runs_nothing_and_replay_runs_everything(emulator):
    state = torch.arange(4.0)
    graph, out = capture(lambda: state.add_(1) * 2)
    assert torch.equal(state, torch.arange(4.0))  # the in-place write was not applied
    assert out.isnan().all()  # a tensor made by the capture holds garbage until a replay
    graph.replay()
    assert torch.equal(state, torch.arange(4.0) + 1) and torch.equal(out, state * 2)
    graph.replay()
    assert torch.equal(state, torch.arange(4.0) + 2) and torch.equal(out, state * 2)
    assert emulator.replays == 2


def test_python_values_are_frozen_at_capture(emulator):
    buffer, counter = torch.zeros(3), [0]

    def step():
        counter[0] += 1
        buffer[counter[0] % 3] += 1.0  # the index is a Python int: fixed by the capture
        return buffer.sum()

    graph, total = capture(step)
    for _ in range(3):
        graph.replay()
    assert counter == [1] and buffer.tolist() == [0.0, 3.0, 0.0] and total.item() == 3.0


@pytest.mark.parametrize("host_read", [
    lambda t: t.item(), lambda t: t.tolist(), lambda t: bool(t.sum() > 0), lambda t: int(t.sum()),
    lambda t: t.cpu(), lambda t: torch.equal(t, t), lambda t: t.nonzero(), lambda t: t[t > 1],
    lambda t: t.repeat_interleave(t.long()), lambda t: t.long().bincount(), lambda t: t + torch.tensor([1.0]),
])
def test_host_reads_while_capturing_raise(emulator, host_read):
    x = torch.full((3,), 2.0)
    with pytest.raises(cuda_graph_emu.CaptureError, match="CUDA graph capture"):
        capture(lambda: host_read(x * 2))
    assert x.sum().item() == 6.0 and x.tolist() == [2.0] * 3  # the Tensor methods are back after the capture
    assert gptkern.ops._checks.checks_read_values(x)


def test_allowed_while_capturing(emulator):
    x, repeats = torch.arange(4.0), torch.tensor([1, 2, 1, 0])
    graph, out = capture(lambda: (x * torch.tensor(2.0), x.repeat_interleave(2), x.to(torch.uint8) + 1,
                                  x.repeat_interleave(repeats, output_size=4)))
    assert out[2].tolist() == [255] * 4  # garbage until a replay
    graph.replay()
    assert out[0].tolist() == [0.0, 2.0, 4.0, 6.0] and out[2].tolist() == [1, 2, 3, 4]
    assert out[3].tolist() == [0.0, 1.0, 1.0, 2.0]


def test_a_replay_after_a_read_tensor_was_freed_raises(emulator):
    kept, temporary = torch.ones(3), torch.ones(3)
    graph, out = capture(lambda: kept + temporary)  # noqa: F821 (deleted below on purpose)
    graph.replay()
    del temporary  # a GPU graph would now read memory the allocator may hand out again
    with pytest.raises(cuda_graph_emu.CaptureError, match="freed after the capture"):
        graph.replay()


# --- generate(cuda_graph=True) ------------------------------------------------------------------

def _model(preset):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name(preset, n_layer=2, init_std=0.2)).eval()


def _prompts(vocab):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, vocab, (3, 9), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # a shorter, left-padded prompt
    mask[2, :8] = 0  # a one-token prompt
    return prompt, mask


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("cache", ["static", "paged"])
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_graph_decode_equals_eager(emulator, preset, cache, backend):
    model = _model(preset)
    prompt, mask = _prompts(model.config.vocab_size)
    new = 16
    with gptkern.backend(backend):
        eager = generate(model, prompt, new, attention_mask=mask, cache=cache, cuda_graph=False)
        assert emulator.replays == 0
        graphed = generate(model, prompt, new, attention_mask=mask, cache=cache, cuda_graph=True)
    assert len(set(eager[:, 9:].flatten().tolist())) > 8  # varied tokens: the comparison means something
    assert torch.equal(graphed, eager)
    # the prefill and the first decode step run eagerly, the second is captured, all the rest replayed
    assert len(emulator.graphs) == 1 and emulator.replays == new - 2
    # another thread's first call may time kernels (device syncs) while this one captures
    assert emulator.graphs[0].capture_error_mode == "thread_local"


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_graph_decode_with_early_stops_and_sampling(emulator, cache):
    model = _model("llama-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    free = generate(model, prompt, 14, attention_mask=mask, cuda_graph=False)
    eos = int(free[1, 9 + 4])  # row 1 stops after 5 tokens, the others go on (or stop later)
    kwargs = dict(attention_mask=mask, cache=cache, eos_token_id=eos, pad_token_id=0)
    eager = generate(model, prompt, 14, cuda_graph=False, **kwargs)
    graphed = generate(model, prompt, 14, cuda_graph=True, **kwargs)
    assert torch.equal(graphed, eager)
    assert (eager[1, 9 + 5:] == 0).all() and (eager[:, -1] != 0).any()  # one row stopped, not all
    sampled = [generate(model, prompt, 12, attention_mask=mask, cache=cache, do_sample=True, top_p=0.9, seed=3,
                        cuda_graph=graph) for graph in (False, True)]
    assert torch.equal(*sampled)


def test_graph_decode_through_the_triton_decode_kernel(emulator):
    model = _model("llama-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    with gptkern.backend("torch"):
        expected = generate(model, prompt, 6, attention_mask=mask, cuda_graph=False)
    with gptkern.backend("triton"):
        graphed = generate(model, prompt, 6, attention_mask=mask, cuda_graph=True)
    assert torch.equal(graphed, expected)
    assert emulator.replays == 4


# --- the kept graph: reused by the next call of the same shape ----------------------------------

def _captures_and_replays(emulator):
    return len(emulator.graphs), emulator.replays


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_next_call_of_the_same_shape_replays_the_kept_graph(emulator, cache):
    model = _model("llama-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    other = torch.randint(1, model.config.vocab_size, prompt.shape, generator=torch.Generator().manual_seed(7))
    kwargs = dict(attention_mask=mask, cache=cache, eos_token_id=3, pad_token_id=0)
    expected = [generate(model, p, 12, cuda_graph=False, **kwargs) for p in (prompt, other, prompt)]
    assert not torch.equal(expected[0], expected[1])
    got = [generate(model, p, 12, cuda_graph=True, **kwargs) for p in (prompt, other, prompt)]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    # one capture; the later calls replay from their first decode step (the cache was reset)
    assert _captures_and_replays(emulator) == (1, 10 + 11 + 11)


def test_a_new_shape_backend_or_parameter_tensor_captures_again(emulator):
    model = _model("gpt2-tiny")
    prompt, mask = _prompts(model.config.vocab_size)

    def check(new, **kwargs):
        expected = generate(model, prompt, new, attention_mask=mask, cuda_graph=False, **kwargs)
        assert torch.equal(generate(model, prompt, new, attention_mask=mask, cuda_graph=True, **kwargs), expected)
        return len(emulator.graphs)

    assert check(8) == 1 and check(8) == 1
    assert check(9) == 2  # another total length
    assert check(8) == 3  # only the last graph is kept
    assert check(8, cache="paged") == 4
    with gptkern.backend("torch"):
        assert check(8, cache="paged") == 5
    assert check(8, cache="paged") == 6  # back to auto
    with torch.inference_mode():
        assert check(8, cache="paged") == 7  # its cache cannot be written outside inference mode
    assert check(8, cache="paged") == 8
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.5)  # in place: the graph reads the new values
    assert check(8, cache="paged") == 8
    model.transformer.ln_f.weight = torch.nn.Parameter(model.transformer.ln_f.weight * 0.5)  # a new tensor
    assert check(8, cache="paged") == 9
    gptkern.generation.release_decode_graphs(model)
    assert check(8, cache="paged") == 10


class _Shifted(torch.nn.Module):
    """A submodule whose forward reads a tensor held as a plain attribute."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.shift = inner, torch.randn(inner.weight.shape[0])

    def forward(self, x):
        return self.inner(x) + self.shift


def test_a_replaced_plain_tensor_attribute_captures_again(emulator):
    model = _model("gpt2-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    model.transformer.ln_f = shifted = _Shifted(model.transformer.ln_f)
    shifted.unused = torch.eye(3).to_sparse()  # no data pointer: keyed by the object

    def check():
        expected = generate(model, prompt, 8, attention_mask=mask, cuda_graph=False)
        assert torch.equal(generate(model, prompt, 8, attention_mask=mask, cuda_graph=True), expected)
        return len(emulator.graphs)

    assert check() == 1
    shifted.shift.mul_(-3.0)  # in place: the graph reads the new values
    assert check() == 1
    shifted.shift = torch.randn_like(shifted.shift) * 4  # a new tensor: replaying would read the old one
    assert check() == 2


def test_adding_or_removing_a_forward_hook_captures_again(emulator):
    """A replay runs a hook's tensor operations as captured, but not its Python."""
    model = _model("gpt2-tiny")
    prompt, mask = _prompts(model.config.vocab_size)

    def check():
        expected = generate(model, prompt, 8, attention_mask=mask, cuda_graph=False)
        assert torch.equal(generate(model, prompt, 8, attention_mask=mask, cuda_graph=True), expected)
        return len(emulator.graphs)

    assert check() == 1
    handle = model.transformer.ln_f.register_forward_hook(lambda module, args, out: out * -2.0)
    assert check() == 2 and check() == 2  # the hooked output, replayed
    handle.remove()
    handle = model.transformer.ln_f.register_forward_hook(lambda module, args, out: out * 3.0)  # same count
    assert check() == 3
    handle.remove()
    assert check() == 4
    pre = model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] + 1.0,))
    assert check() == 5
    pre.remove()
    hook = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        assert check() == 6
    finally:
        hook.remove()
    assert check() == 7
    model.register_forward_hook(lambda module, args, out: out)  # the model itself is not called
    assert check() == 7


def test_no_graph_is_captured_under_autocast(emulator):
    """A graph would read autocast's casts of the weights, which are freed when the region ends."""
    model = _model("llama-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = generate(model, prompt, 8, attention_mask=mask, cuda_graph=False)
        got = generate(model, prompt, 8, attention_mask=mask, cuda_graph=True)
    assert torch.equal(got, expected) and emulator.graphs == []
    steps = generate(model, prompt, 8, attention_mask=mask, cuda_graph=True, stream=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        next(steps), next(steps), next(steps)  # the step that would capture runs eagerly
    assert emulator.graphs == []
    list(steps)  # out of the region: captured then
    assert len(emulator.graphs) == 1
    replays = emulator.replays
    with torch.autocast("cpu", dtype=torch.bfloat16):  # that graph was not kept for autocast calls
        assert torch.equal(generate(model, prompt, 8, attention_mask=mask, cuda_graph=True), expected)
    assert emulator.replays == replays


def test_paged_reuse_returns_every_block(emulator):
    model = _model("gpt2-tiny")
    prompt = torch.randint(1, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    masks = [torch.ones_like(prompt) for _ in range(2)]
    masks[0][1:, :10] = 0  # prompt lengths 12, 2, 2: with 12 new tokens, 2 + 1 + 1 blocks of 16
    masks[1][::2, :10] = 0  # 2, 12, 2: the long one is another row
    tight = dict(cache="paged", num_cache_blocks=5)  # 4 usable blocks
    for m in (*masks, masks[0]):
        expected = generate(model, prompt, 12, attention_mask=m, cuda_graph=False, **tight)
        assert torch.equal(generate(model, prompt, 12, attention_mask=m, cuda_graph=True, **tight), expected)
    assert len(emulator.graphs) == 1  # a reset that left rows their blocks would run out of them


def test_interleaved_streams_each_get_a_cache(emulator):
    model = _model("llama-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    other, other_mask = prompt.flip(0), mask.flip(0)
    expected = [generate(model, p, 10, attention_mask=m, cuda_graph=False) for p, m in ((prompt, mask),
                                                                                          (other, other_mask))]
    generate(model, prompt, 10, attention_mask=mask, cuda_graph=True)  # a kept graph of this shape
    never_iterated = generate(model, prompt, 10, attention_mask=mask, cuda_graph=True, stream=True)
    first = generate(model, prompt, 10, attention_mask=mask, cuda_graph=True, stream=True)
    second = generate(model, other, 10, attention_mask=other_mask, cuda_graph=True, stream=True)
    tokens = [[], []]
    for a, b in zip(first, second):  # both in flight at once: the second cannot use the kept cache
        tokens[0].append(a)
        tokens[1].append(b)
    assert next(second, None) is None and next(first, None) is None  # both ended
    for got, p, e in zip(tokens, (prompt, other), expected):
        assert torch.equal(torch.cat([p, torch.stack(got, 1)], 1), e)
    assert len(emulator.graphs) == 2  # the never-iterated stream holds nothing: ``first`` reused the kept one
    assert next(never_iterated).shape == (3,)


def test_a_failed_call_drops_its_graph(emulator, monkeypatch):
    model = _model("llama-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    expected = generate(model, prompt, 10, attention_mask=mask, cuda_graph=False)
    generate(model, prompt, 10, attention_mask=mask, cuda_graph=True)
    steps = generate(model, prompt, 10, attention_mask=mask, cuda_graph=True, stream=True)
    next(steps), next(steps)
    with pytest.raises(ValueError, match="injected"):
        steps.throw(ValueError("injected"))
    assert torch.equal(generate(model, prompt, 10, attention_mask=mask, cuda_graph=True), expected)
    assert len(emulator.graphs) == 2
    steps = generate(model, prompt, 10, attention_mask=mask, cuda_graph=True, stream=True)
    next(steps)
    with pytest.raises(KeyboardInterrupt):
        steps.throw(KeyboardInterrupt())  # an interrupt, too, drops it
    assert torch.equal(generate(model, prompt, 10, attention_mask=mask, cuda_graph=True), expected)
    assert len(emulator.graphs) == 3
    steps = generate(model, prompt, 10, attention_mask=mask, cuda_graph=True, stream=True)
    next(steps), next(steps)
    steps.close()  # a stream closed early keeps it
    assert torch.equal(generate(model, prompt, 10, attention_mask=mask, cuda_graph=True), expected)
    assert len(emulator.graphs) == 3


def test_release_during_a_call_keeps_nothing(emulator):
    model = _model("llama-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    steps = generate(model, prompt, 6, attention_mask=mask, cuda_graph=True, stream=True)
    next(steps)
    gptkern.generation.release_decode_graphs(model)
    list(steps)
    generate(model, prompt, 6, attention_mask=mask, cuda_graph=True)
    assert len(emulator.graphs) == 2


def test_a_call_ending_beside_one_in_flight_leaves_that_ones_graph_kept(emulator):
    """A call that had to capture its own graph (the kept one was in use) frees it when it ends
    rather than replace the kept one: one kept cache per model beyond the calls in flight."""
    from gptkern.generation import cuda_graph

    model = _model("llama-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    expected = generate(model, prompt, 6, attention_mask=mask, cuda_graph=False)
    generate(model, prompt, 6, attention_mask=mask, cuda_graph=True)
    kept = cuda_graph._kept[model]
    in_flight = generate(model, prompt, 6, attention_mask=mask, cuda_graph=True, stream=True)
    first = next(in_flight)  # uses the kept graph
    assert torch.equal(generate(model, prompt, 6, attention_mask=mask, cuda_graph=True), expected)
    assert len(emulator.graphs) == 2 and cuda_graph._kept[model] is kept  # its own graph was not kept
    rest = list(in_flight)
    assert torch.equal(torch.cat([prompt, torch.stack([first, *rest], 1)], 1), expected)
    assert cuda_graph._kept[model] is kept
    generate(model, prompt, 6, attention_mask=mask, cuda_graph=True)
    assert len(emulator.graphs) == 2


def test_the_new_tf32_api_is_read_and_keyed(emulator):
    """torch >= 2.9 refuses get_float32_matmul_precision() once fp32_precision is set."""
    model = _model("gpt2-tiny")
    prompt, mask = _prompts(model.config.vocab_size)
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        for precision in ("tf32", "ieee", "tf32"):
            torch.backends.cuda.matmul.fp32_precision = precision
            generate(model, prompt, 4, attention_mask=mask, cuda_graph=True)
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert len(emulator.graphs) == 3


def test_another_paged_pool_size_captures_again(emulator):
    """The kept graph's cache is a pool of num_cache_blocks: a call asking for another size gets its
    own (reusing a smaller pool would run out of blocks, a larger one would hold more than asked)."""
    model = _model("gpt2-tiny")
    prompt = torch.randint(1, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    for blocks in (4, 7):  # 3 usable blocks: one per sequence of 12 + 4 tokens; then 6
        kwargs = dict(cache="paged", num_cache_blocks=blocks)
        expected = generate(model, prompt, 4, cuda_graph=False, **kwargs)
        assert torch.equal(generate(model, prompt, 4, cuda_graph=True, **kwargs), expected)
    assert len(emulator.graphs) == 2
