"""Attention on a CUDA device at real sizes, bf16 and fp16, against a float64 reference.
Skipped (and reported) without one."""
import pytest
import torch
import torch.nn.functional as F

import gptkern
from helpers import assert_close, forced_config_runs

pytestmark = pytest.mark.gpu


def _reference(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_real_sizes(dtype, d, causal):
    q = torch.randn(2, 8, 1024, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 1536, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 1536, d, device="cuda", dtype=dtype, requires_grad=True)
    with gptkern.backend("triton"):
        out = gptkern.ops.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*leaves, is_causal=causal, enable_gqa=True)
    assert_close(out, ref, dtype)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_close(got, want, dtype, grad=True, atol_scale=2)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_float_mask_gradient_real_size(d, causal):
    """A learned (1, H, L, S) bias in bf16: its gradient (dS from the dQ kernel; with causal, zero
    above the diagonal) against float64; with dropout, dq = scale * dS k for the same dropped weights."""
    q, k, v = (torch.randn(2, 8, 900, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bias = (0.5 * torch.randn(1, 8, 900, 900, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    g = torch.randn(2, 8, 900, d, device="cuda", dtype=torch.bfloat16)
    with gptkern.backend("triton"):
        out = gptkern.ops.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
        grads = torch.autograd.grad(out, (q, k, v, bias), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    above = torch.ones(900, 900, dtype=torch.bool, device="cuda").triu(1)  # hidden by causal
    ref = _reference(*leaves[:3], attn_mask=leaves[3].masked_fill(above, float("-inf")) if causal else leaves[3])
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_close(got, want, torch.bfloat16, grad=True, atol_scale=2)
    full = (0.5 * torch.randn(2, 8, 900, 900, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    with gptkern.backend("triton"):
        out = gptkern.ops.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=0.2, is_causal=causal)
        dq, dfull = torch.autograd.grad(out, (q, full), g)
    want = dfull.double() @ k.double() / d ** 0.5  # dS is rounded to bf16 before this product
    torch.testing.assert_close(dq.double(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_attention_real_size(causal):
    """The band path of gptkern's windowed modules (varlen kernels, one sequence per batch row) in
    bf16 at a real size, against float64 SDPA with the band as a mask."""
    from gptkern.ops.attention import sliding_window_attention, varlen_visibility

    q = torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    window = (255, -1 if causal else 255)
    with gptkern.backend("triton"):
        out = sliding_window_attention(q, k, v, window, causal)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    band = varlen_visibility(2048, 2048, causal, window, q.device)
    ref = _reference(*leaves, attn_mask=band, enable_gqa=True)
    assert_close(out, ref, torch.bfloat16)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_close(got, want, torch.bfloat16, grad=True, atol_scale=2)


def test_sdpa_key_padding_mask_and_fp32():
    q, k, v = (torch.randn(4, 4, 700, 64, device="cuda") for _ in range(3))
    mask = torch.rand(4, 1, 1, 700, device="cuda") > 0.2
    with gptkern.backend("triton"):
        out = gptkern.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        causal = gptkern.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert_close(out, _reference(q, k, v, attn_mask=mask), torch.float32)
    below = torch.ones(700, 700, dtype=torch.bool, device="cuda").tril()
    assert_close(causal, _reference(q, k, v, attn_mask=mask & below), torch.float32)


def test_varlen_real_sizes():
    lengths = [1, 517, 2048, 0, 300]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lengths)
    q, k, v = (torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with gptkern.backend("triton"):
        out = gptkern.ops.flash_attn_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                            window_size=(256, 0))
    with gptkern.backend("torch"):
        ref = gptkern.ops.flash_attn_varlen(q.double(), k.double(), v.double(), cu, cu, max(lengths),
                                            max(lengths), causal=True, window_size=(256, 0))
    assert_close(out, ref, torch.bfloat16)


def test_dropout_rate_cuda():
    """v = I reads the dropped weights out (value head dim 128: dropout kernels take up to 128)."""
    q = torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    eye = torch.eye(128, device="cuda", dtype=torch.bfloat16).expand(1, 4, 128, 128)
    with gptkern.backend("triton"):
        weights = gptkern.ops.scaled_dot_product_attention(q, k, eye, dropout_p=0.25)
    dropped = (weights == 0).double().mean().item()
    assert abs(dropped - 0.25) < 0.02


def test_dropout_in_a_captured_cuda_graph_draws_a_new_mask_each_replay():
    """The seed is drawn on the GPU from torch's graph-safe generator and read by the kernels
    there: a forward and backward with dropout captured by hand replay with other masks each time,
    without a host sync, and the first replay after the same torch.manual_seed repeats."""
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        out = gptkern.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    with gptkern.backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and autotune outside the capture
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                static = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    runs = []
    for seed in (5, 5, None):
        if seed is not None:
            torch.manual_seed(seed)
        graph.replay()
        runs.append([t.clone() for t in static])
        graph.replay()
        runs.append([t.clone() for t in static])
    first, second, again, _, third, _ = runs
    for a, b in zip(first, second):
        assert not torch.equal(a, b)  # each replay drops other weights
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # reproducible from torch.manual_seed
    assert not torch.equal(first[0], third[0])


def test_varlen_does_not_sync_the_host():
    """On a GPU the offsets' values are not read (no host sync per call), as in flash-attn."""
    q, k, v = (torch.randn(300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 100, 300], device="cuda", dtype=torch.int32)
    with gptkern.backend("triton"):
        gptkern.ops.flash_attn_varlen(q, k, v, cu, cu, 200, 200, causal=True)  # compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = gptkern.ops.flash_attn_varlen(q, k, v, cu, cu, 200, 200, causal=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert out.shape == q.shape


@pytest.mark.parametrize("d", [64, 128])
def test_every_autotuning_alternative_is_correct(monkeypatch, d):
    """Each configuration first-call autotuning may choose (forced in turn; the TMA descriptor ones
    among them) gives correct results at a real size; then tuning itself picks one per kernel."""
    from gptkern.kernels import attention, autotune

    monkeypatch.setenv("GPTKERN_AUTOTUNE", "1")
    q, k, v = (torch.randn(2, 8, 1000, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn_like(q)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*leaves, is_causal=True)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())

    def run_and_check():
        with gptkern.backend("triton"):
            out = gptkern.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
            grads = torch.autograd.grad(out, (q, k, v), g)
        assert_close(out, ref, torch.bfloat16)
        for got, want in zip(grads, ref_grads):
            assert_close(got, want, torch.bfloat16, grad=True, atol_scale=2)

    capability = attention.device_capability(q.device)
    per_kernel = {name: attention.configs(name, d, d, False, attention.PLAIN, capability)
                  for name in ("fwd", "dq", "dkdv")}
    used = []
    original = attention._descriptors
    monkeypatch.setattr(attention, "_descriptors", lambda *args: used.append((args[0], args[2])) or original(*args))
    for chosen in forced_config_runs(per_kernel):
        with monkeypatch.context() as m:
            m.setattr(attention, "configs", lambda name, *args, chosen=chosen: (chosen[name],))
            run_and_check()
    assert set(used) == {(c, name) for name, cs in per_kernel.items() for c in cs if c.tma}  # each TMA one ran
    autotune.reset()
    run_and_check()
    assert len(autotune.choices()) == 3  # fwd, dkdv, dq


@pytest.mark.parametrize("backend,dropout_p", [("triton", 0.2), ("triton", 0.0), ("cuda", 0.0)])
def test_double_backward_real_size(backend, dropout_p):
    """create_graph=True in fp16: the differentiable composition (with dropout, the kernels' own
    factors from the Triton factor kernel) gives the kernel backward's gradients, and a second
    backward runs. The cuda backend (no dropout in its forward) goes through the same path."""
    if backend not in gptkern.available_backends():
        pytest.skip(f"{backend} is not available")
    leaves = [torch.randn(2, 8, 384, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3)]
    grads = []
    for create_graph in (False, True):
        torch.manual_seed(11)
        with gptkern.backend(backend):
            out = gptkern.ops.scaled_dot_product_attention(*leaves, dropout_p=dropout_p, is_causal=True)
        grads.append(torch.autograd.grad(out.float().square().sum(), leaves, create_graph=create_graph))
    for got, want in zip(grads[1], grads[0]):
        assert_close(got, want, torch.float16, grad=True, atol_scale=4)
    second = torch.autograd.grad(sum(g.float().square().sum() for g in grads[1]), leaves)
    assert all(torch.isfinite(t).all() and t.abs().max() > 0 for t in second)


def test_varlen_double_backward_with_dropout_real_size():
    """create_graph=True through flash_attn_varlen with dropout in fp16: per-sequence factors
    from the compiled Triton factor kernel give the kernel backward's gradients."""
    lengths = [300, 1, 0, 517]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    leaves = [torch.randn(sum(lengths), 8, 64, device="cuda", dtype=torch.float16, requires_grad=True)
              for _ in range(3)]
    grads = []
    for create_graph in (False, True):
        torch.manual_seed(5)
        with gptkern.backend("triton"):
            out = gptkern.ops.flash_attn_varlen(*leaves, cu, cu, max(lengths), max(lengths), dropout_p=0.2,
                                                causal=True, window_size=(128, 0))
        grads.append(torch.autograd.grad(out.float().square().sum(), leaves, create_graph=create_graph))
    for got, want in zip(grads[1], grads[0]):
        assert_close(got, want, torch.float16, grad=True, atol_scale=4)
