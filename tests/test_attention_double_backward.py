"""Double backward (create_graph=True) through the attention kernels of every backend here: the
gradients come as a differentiable graph, equal the kernel backward's, and differentiate again to
the float64 reference; with dropout they use the kernels' own factors."""
import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.ops import attention_double_backward
from gptkern.ops.reference import attention_ref
from helpers import backends_here

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Dropout runs in 16-bit on a GPU (no fp32 dropout configuration compiles without spills there)
DROPOUT_DTYPE, DROPOUT_TOL = (torch.float16, 4e-3) if DEVICE.type == "cuda" else (torch.float32, 1e-5)
KERNEL_BACKENDS = [b for b in backends_here(DEVICE, attention=True) if b not in ("torch", "auto")]
sdpa = gptkern.ops.scaled_dot_product_attention
varlen = gptkern.ops.flash_attn_varlen
pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no attention kernel backend here")


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def leaves_of(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def first_and_second(out, leaves):
    """The gradients of sum(out²) as a graph, and the gradients of sum(grad²) from them."""
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    return grads, torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)


def assert_all_close(got, want, tol=1e-4):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["causal", "bool-mask", "float-mask"])
def test_dense_against_float64(backend, case):
    q, k, v = rand(1, 4, 9, 8), rand(1, 2, 11, 8), rand(1, 2, 11, 12)
    mask = {"causal": None, "bool-mask": torch.rand(1, 1, 9, 11, device=DEVICE) > 0.3,
            "float-mask": rand(1, 1, 9, 11)}[case]
    leaves = leaves_of(q, k, v)
    with gptkern.backend(backend):
        out = sdpa(*leaves, attn_mask=mask, is_causal=case == "causal", enable_gqa=True)
    got = first_and_second(out, leaves)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_leaves, mask=None if mask is None else mask if case == "bool-mask" else mask.double(),
                        causal=case == "causal")
    want = first_and_second(ref, ref_leaves)
    assert_all_close((*got[0], *got[1]), (*want[0], *want[1]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float_mask_gradient_as_a_graph(backend):
    """The float mask's gradient with create_graph=True equals the kernel's, and differentiates
    again (in q and the mask) to the float64 reference."""
    q, k, v = (rand(1, 2, 9, 16) for _ in range(3))
    bias = rand(2, 9, 9)
    leaves = leaves_of(q, bias)
    grads = []
    for create_graph in (False, True):
        with gptkern.backend(backend):
            o = sdpa(leaves[0], k, v, attn_mask=leaves[1])
        grads.append(torch.autograd.grad(o, leaves, torch.ones_like(o), create_graph=create_graph))
    assert_all_close(grads[0], grads[1], tol=1e-5)
    second = torch.autograd.grad(grads[1][1].square().sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in (q, bias)]
    ref = attention_ref(ref_leaves[0], k.double(), v.double(), mask=ref_leaves[1])
    ref_dbias = torch.autograd.grad(ref, ref_leaves[1], torch.ones_like(ref), create_graph=True)[0]
    assert_all_close(second, torch.autograd.grad(ref_dbias.square().sum(), ref_leaves))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_varlen_against_float64(backend):
    """Per-sequence composition against explicit float64 math: bottom-right causal, a window,
    GQA, an empty query sequence; and with only q needing a gradient."""
    lens_q, lens_k = [5, 0, 7], [6, 2, 7]
    qv, kv, vv = rand(12, 4, 8), rand(15, 2, 8), rand(15, 2, 8)
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 6, 8, 15], dtype=torch.int32, device=DEVICE)

    def explicit(q, k, v):  # float64, one sequence at a time; k and v repeated for GQA
        outs, q0, k0 = [], 0, 0
        for lq, lk in zip(lens_q, lens_k):
            qs, ks, vs = q[q0:q0 + lq].transpose(0, 1), k[k0:k0 + lk].transpose(0, 1), v[k0:k0 + lk].transpose(0, 1)
            ks, vs = ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0)
            i, j = torch.arange(lq, device=DEVICE)[:, None] + (lk - lq), torch.arange(lk, device=DEVICE)[None, :]
            scores = (qs @ ks.transpose(1, 2) * 8 ** -0.5).masked_fill(~((j <= i) & (j >= i - 2)), float("-inf"))
            outs.append((torch.softmax(scores, -1).nan_to_num(0.0) @ vs).transpose(0, 1))
            q0, k0 = q0 + lq, k0 + lk
        return torch.cat(outs)

    leaves = leaves_of(qv, kv, vv)
    with gptkern.backend(backend):
        out = varlen(*leaves, cu_q, cu_k, 7, 7, causal=True, window_size=(2, -1))
    got = first_and_second(out, leaves)
    ref_leaves = [t.double().requires_grad_() for t in (qv, kv, vv)]
    want = first_and_second(explicit(*ref_leaves), ref_leaves)
    assert_all_close((*got[0], *got[1]), (*want[0], *want[1]))
    only_q = qv.clone().requires_grad_()  # k and v without grad: only dq is formed
    with gptkern.backend(backend):
        out = varlen(only_q, kv, vv, cu_q, cu_k, 7, 7, causal=True)
    (dq,) = torch.autograd.grad(out.sum(), only_q, create_graph=True)
    assert dq.requires_grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_varlen_without_sequences(backend):
    """No sequences (cu_seqlens [0]): the gradients are empty, as the kernel backward's."""
    leaves = leaves_of(rand(0, 2, 8), rand(0, 2, 8), rand(0, 2, 8))
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with gptkern.backend(backend):
        out = varlen(*leaves, cu, cu, 0, 0)
    grads = torch.autograd.grad(out.sum(), leaves, create_graph=True)
    assert [g.shape for g in grads] == [t.shape for t in leaves]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shapes", [((1, 2, 0, 8), (1, 2, 5, 8)), ((0, 2, 3, 8), (0, 2, 5, 8)),
                                    ((1, 2, 3, 8), (1, 2, 0, 8))], ids=["L=0", "B=0", "S=0"])
def test_empty_with_dropout(backend, shapes):
    """No queries, batches or keys, with dropout: empty or zero gradients as a graph."""
    q_shape, k_shape = shapes
    leaves = leaves_of(rand(*q_shape, dtype=DROPOUT_DTYPE), rand(*k_shape, dtype=DROPOUT_DTYPE),
                       rand(*k_shape, dtype=DROPOUT_DTYPE))
    with gptkern.backend(backend):
        out = sdpa(*leaves, dropout_p=0.5)
    grads = torch.autograd.grad(out.float().sum(), leaves, create_graph=True)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("varlen_case", [False, True])
def test_with_dropout_uses_the_kernels_mask(backend, varlen_case):
    """create_graph=True with dropout: the composition applies the kernels' own factors, so its
    gradients equal the kernel backward's for the same seed, and they differentiate again."""
    torch.manual_seed(0)  # (inputs of their own: not whatever the tests before left in the generator)
    dt = DROPOUT_DTYPE
    if varlen_case:
        leaves = leaves_of(rand(30, 4, 8, dtype=dt), rand(33, 2, 8, dtype=dt), rand(33, 2, 8, dtype=dt))
        cu_q = torch.tensor([0, 12, 30], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0, 15, 33], dtype=torch.int32, device=DEVICE)

        def fn(q, k, v):
            return varlen(q, k, v, cu_q, cu_k, 18, 18, dropout_p=0.3, causal=True, window_size=(5, -1))
    else:
        leaves = leaves_of(rand(2, 4, 19, 8, dtype=dt), rand(2, 2, 23, 8, dtype=dt), rand(2, 2, 23, 8, dtype=dt))

        def fn(q, k, v):
            return sdpa(q, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True)
    grads = []
    for create_graph in (False, True):
        torch.manual_seed(4)
        with gptkern.backend(backend):
            out = fn(*leaves)
        grads.append(torch.autograd.grad(out.float().square().sum(), leaves, create_graph=create_graph))
    for got, want in zip(grads[0], grads[1]):  # (an entry that is 0 exactly in one: fp32 noise in the other)
        scale = want.detach().double().abs().max().item()
        torch.testing.assert_close(got.double(), want.detach().double(), atol=DROPOUT_TOL * max(scale, 1.0),
                                   rtol=DROPOUT_TOL)
    second = torch.autograd.grad(sum(g.float().square().sum() for g in grads[1]), leaves)
    assert all(torch.isfinite(t).all() and t.abs().max() > 0 for t in second)


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_triton_dropout_factors_are_the_forward_mask():
    """The Triton factor kernel gives the weights the forward kernel drops (seen with V = I),
    and the C++ op's factors where it is built; odd sizes across several tiles."""
    from gptkern.kernels.attention import dropout_factors

    p, seed = 0.4, 123456789012
    seed_t = torch.tensor([seed], device=DEVICE)
    q, k = rand(2, 3, 37, 16, dtype=DROPOUT_DTYPE), rand(2, 3, 70, 16, dtype=DROPOUT_DTYPE)
    eye = torch.eye(70, device=DEVICE, dtype=DROPOUT_DTYPE).expand(2, 3, 70, 70)
    with gptkern.backend("triton"):
        weights = torch.ops.gptkern.triton_attention(q, k, eye, None, False, 0.25, p,
                                                     torch.tensor([seed]))[0]  # softmax * Z
    z = (weights.double() / F.scaled_dot_product_attention(q.double(), k.double(), eye.double(), scale=0.25))
    factors = dropout_factors(seed_t, p, 6, 37, 70, DEVICE)
    assert factors.shape == (6, 37, 70) and factors.dtype == torch.float32
    assert torch.all((factors == 0) | ((factors - 1 / (1 - p)).abs() < 1e-6))
    torch.testing.assert_close(factors.view(2, 3, 37, 70).double(), z, atol=1e-2, rtol=0)  # 0 or 1.67
    # a range of batch-heads starting past 0, with other sizes (varlen asks per sequence)
    assert torch.equal(dropout_factors(seed_t, p, 2, 37, 70, DEVICE, first_batch_head=3), factors[3:5])
    assert torch.equal(dropout_factors(seed_t + 2**32, p, 6, 37, 70, DEVICE), factors)  # the low 32 bits key it
    assert not torch.equal(dropout_factors(seed_t + 1, p, 6, 37, 70, DEVICE), factors)
    assert torch.equal(dropout_factors(seed_t, p, 2, 5, 9, DEVICE, first_batch_head=3), factors[3:5, :5, :9])
    if "cpu" in gptkern.available_backends():
        cpp = torch.ops.gptkern.attention_dropout_factors(torch.tensor([seed]), p, 6, 37, 70)
        assert torch.equal(factors.cpu(), cpp)
        cpp = torch.ops.gptkern.attention_dropout_factors(torch.tensor([seed]), p, 2, 5, 9, 3)
        assert torch.equal(factors[3:5, :5, :9].cpu(), cpp)
        cpp = torch.ops.gptkern.attention_dropout_factors(torch.tensor([seed + 2**32]), p, 6, 37, 70)
        assert torch.equal(factors.cpu(), cpp)
    assert attention_double_backward.dropout_factors(torch.tensor([seed]), 0.0, 6, 37, 70, DEVICE) is None
    with pytest.raises(RuntimeError, match="seed must be a"):  # the kernel reads it on its device
        dropout_factors(seed_t.to(torch.int32), p, 6, 37, 70, DEVICE)
