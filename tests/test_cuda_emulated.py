"""The CUDA kernels of csrc/cuda, run on the CPU by the emulator of tests/cuda_emu: each CUDA
thread is a fiber, and warp shuffles, ldmatrix, mma.sync and cp.async follow the PTX ISA.

The ops are register.cpp's CUDA implementations (checks, allocations, launchers, kernels),
registered for CPU tensors as ``torch.ops.gptkern_emu`` with the gptkern ops' schemas. Each op
is compared with the float64 reference in fp32 / fp16 / bf16 on both kernel paths (warp and
block per row, vector and scalar loads), reductions over inner dims, views, NaN / inf; attention
(causal or not, GQA, L != S both ways, D 64 and 128) with its log2-domain LSE, which the Triton
backward (the CUDA path's backward) turns into the right gradients; decode over static
and paged caches with ragged lengths (0 and 1 included), one split and several; the global
memory both read (counted at cp.async): causal tiles skipped, one cache read per KV head, every
warp-wide read coalesced into the fewest 32-byte sectors. The default
schedule lets each warp run ahead to the next __syncthreads and lands each cp.async at its wait
(a missing barrier or wait reads the wrong tile); other schedules must give the same bits. The
emulator itself is shown to expose those bugs, unwritten shared memory, deadlocks and undefined
warp-level behaviour in deliberately faulty kernels (tests/cuda_emu/faulty.cpp).
What it cannot show: timing, bank conflicts (but ldmatrix's, counted here), register spills
(tests/test_cuda_compile.py checks those), or anything the real hardware does differently from
the PTX ISA's description.
"""
import math
import os
import sys

import pytest
import torch

import gptkern.ops  # noqa: F401  (registers gptkern::triton_attention_backward)
from gptkern import _backend
from gptkern.ops.reference import attention_ref, decode_attention_ref, layer_norm_ref, rms_norm_ref, softmax_ref
from helpers import assert_close

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu"))
import emu_build  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
# (order, warps run ahead, deferred cp.async). The default lets each warp run ahead to the next
# __syncthreads and lands each cp.async at its wait: a missing barrier between warps or a missing
# wait then reads the wrong tile. The others must give the same bits.
DEFAULT = ("forward", True, True)
SCHEDULES = [("forward", False, True), ("reverse", False, False), ("random", False, True), ("reverse", True, False),
             ("random", True, True)]
H200_SMS = 132


pytestmark = pytest.mark.xdist_group("cuda_emulated")  # one xdist worker builds and runs the emulator


@pytest.fixture(scope="module")
def emu():
    emu_build.load()
    return torch.ops.gptkern_emu


@pytest.fixture(autouse=True)
def _default_schedule(emu):
    emu.configure(*DEFAULT, 0, H200_SMS)
    emu.take_launches()
    yield
    emu.configure(*DEFAULT, 0, H200_SMS)


def launches(emu) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """(grid, block) of each launch since the last call."""
    flat = emu.take_launches()
    return [(tuple(flat[i:i + 3]), tuple(flat[i + 3:i + 6])) for i in range(0, len(flat), 6)]


def warp_per_row(launch) -> bool:
    return launch[1] == (32, 4, 1)  # kWarpRows rows of 32 lanes


# ----------------------------------------------------------------------------------- softmax

# Columns around the warp / block boundary (1024): vector loads when a row is 16-byte aligned.
SOFTMAX_COLS = [1, 33, 1000, 1024, 1025, 4099]


def softmax_grad_ref(y_ref: torch.Tensor, dy: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    dy = dy.double()
    if log:
        return dy - y_ref.exp() * dy.sum(dim, keepdim=True)
    return y_ref * (dy - (dy * y_ref).sum(dim, keepdim=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", SOFTMAX_COLS)
@pytest.mark.parametrize("log", [False, True])
def test_softmax(emu, dtype, cols, log):
    x = (3 * torch.randn(5, cols)).to(dtype)
    y = emu.softmax_fwd(x, -1, log, dtype)
    (fwd,) = launches(emu)
    assert warp_per_row(fwd) == (cols <= 1024)
    ref = softmax_ref(x, -1, log=log)
    assert_close(y, ref, dtype, msg="forward")
    dy = torch.randn(5, cols).to(dtype)
    dx = emu.softmax_bwd(dy, y, -1, log)
    (bwd,) = launches(emu)
    assert warp_per_row(bwd) == (cols <= 1024)
    assert_close(dx, softmax_grad_ref(ref, dy, -1, log), dtype, grad=True, msg="backward")


@pytest.mark.parametrize("cols", [130, 3001])  # a warp per row, a block per row
def test_log_softmax_of_large_logits_keeps_the_log_sum(emu, cols):
    x = torch.cat([torch.full((1, cols), 1e8), torch.randn(2, cols) + 1e4])
    y = emu.softmax_fwd(x, -1, True, torch.float32)
    assert_close(y, torch.log_softmax(x.double(), -1), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_softmax_inner_dims_and_views(emu, dtype, dim):
    x = torch.randn(7, 6, 5).to(dtype).transpose(0, 2)  # (5, 6, 7), not contiguous
    y = emu.softmax_fwd(x, dim, False, dtype)
    assert len(launches(emu)) == 1
    ref = softmax_ref(x, dim)
    assert_close(y, ref, dtype)
    dy = torch.randn(5, 6, 7).to(dtype)
    assert_close(emu.softmax_bwd(dy, y, dim, False), softmax_grad_ref(ref, dy, dim, False), dtype, grad=True)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cols", [100, 2000])
def test_softmax_16_bit_in_fp32_out(emu, dtype, cols):
    x = torch.randn(9, cols).to(dtype)
    y = emu.softmax_fwd(x, -1, True, torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, softmax_ref(x, -1, log=True), torch.float32)


@pytest.mark.parametrize("cols", [100, 5000])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_nan_and_inf(emu, cols, log):
    x = torch.randn(6, cols)
    x[0] = float("-inf")
    x[1, 3] = float("inf")
    x[2, 7] = float("nan")
    x[3, : cols // 2] = float("-inf")
    expected = (torch.log_softmax if log else torch.softmax)(x.double(), -1)
    torch.testing.assert_close(emu.softmax_fwd(x, -1, log, torch.float32).double(), expected, equal_nan=True,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_nan_among_minus_infs_in_the_block_kernel(emu, log):
    """Past 1024 columns each thread keeps a running (max, sum): a NaN makes its row NaN, as in torch, also
    when the thread reading it sees only -inf besides (its max must keep the NaN, not skip the vector)."""
    x = torch.randn(3, 2000)  # 128 threads of 4-wide vectors: thread 1 reads columns 4-7, 516-519, ...
    x[0] = float("-inf")  # a row of -inf with one NaN
    x[0, 7] = float("nan")
    x[1] = float("-inf")  # the same with a finite value, read by another thread
    x[1, 7], x[1, 1500] = float("nan"), 2.0
    x[2, :1000] = float("-inf")  # a NaN in a run of -inf, finite values after it in the same thread
    x[2, 500] = float("nan")
    y = emu.softmax_fwd(x, -1, log, torch.float32)
    assert not warp_per_row(launches(emu)[0])
    expected = (torch.log_softmax if log else torch.softmax)(x.double(), -1)
    assert bool(expected.isnan().all())
    torch.testing.assert_close(y.double(), expected, equal_nan=True)


# ------------------------------------------------------------------------------------- norms

NORM_COLS = [1, 7, 1000, 1024, 1025, 3001]


def norm_ref(kind, x, shape, w, b, eps):
    return layer_norm_ref(x, shape, w, b, eps) if kind == "layer_norm" else rms_norm_ref(x, shape, w, eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", NORM_COLS)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norms(emu, dtype, cols, kind):
    rows, eps, is_rms = 37, 1e-5, kind == "rms_norm"  # 37 rows: two groups of dW / dB partials
    x = (2 * torch.randn(rows, cols) + 0.5).to(dtype)
    w = 1 + 0.5 * torch.randn(cols)
    b = None if is_rms else 0.5 * torch.randn(cols)
    y, mean, rstd = emu.norm_fwd(x, 1, w, b, eps, is_rms)
    assert warp_per_row(launches(emu)[0]) == (cols <= 1024)
    leaves = [t.double().requires_grad_() for t in (x, w) + (() if b is None else (b,))]
    ref = norm_ref(kind, leaves[0], (cols,), leaves[1], leaves[2] if b is not None else None, eps)
    assert_close(y, ref, dtype, msg="y")
    xd = x.double()
    ref_mean = torch.zeros(rows, dtype=torch.float64) if is_rms else xd.mean(-1)
    ms = (xd * xd).mean(-1) if is_rms else xd.var(-1, unbiased=False)
    assert_close(mean, ref_mean, torch.float32, msg="mean")
    assert_close(rstd, (ms + eps).rsqrt(), torch.float32, msg="rstd")

    dy = torch.randn(rows, cols).to(dtype)
    launches(emu)
    dx, dw, db = emu.norm_bwd(dy, x, 1, w, b, mean, rstd, is_rms, True, b is not None)
    # dW / dB partials (the first (32, 8) launch; the sums of each follow): aligned rows read 16-byte
    # vectors, a thread's columns contiguous (32 of them a warp); others two columns a thread
    vec = 16 // x.element_size()
    tile = 32 * (vec if cols % vec == 0 else 2)
    sums = (-(-cols // 32), 1, 1)
    assert [grid for grid, block in launches(emu) if block == (32, 8, 1)] == [
        (-(-cols // tile), 2, 1), *[sums] * (1 + (b is not None))]
    ref_grads = torch.autograd.grad(ref, leaves, dy.double())
    assert_close(dx, ref_grads[0], dtype, grad=True, msg="dx")
    # dW / dB sum rows of dtype-rounded products: the error grows with the row count
    assert_close(dw, ref_grads[1], dtype, grad=True, msg="dw", atol_scale=math.sqrt(rows))
    if b is not None:
        assert_close(db, ref_grads[2], dtype, grad=True, msg="db", atol_scale=math.sqrt(rows))
    assert dw.dtype == w.dtype and (b is None or db.dtype == b.dtype)


@pytest.mark.parametrize("cols", [40, 1000])
def test_norm_weight_grads_over_many_row_groups(emu, cols):
    """300 rows: 10 groups of dW / dB partials (more than the 8 a thread of the sum adds in turn,
    and a last group of fewer rows), aligned (vectors) and not."""
    rows = 300
    x = torch.randn(rows, cols) + 0.5
    w, b = 1 + 0.5 * torch.randn(cols), 0.5 * torch.randn(cols)
    y, mean, rstd = emu.norm_fwd(x, 1, w, b, 1e-5, False)
    dy = torch.randn(rows, cols)
    launches(emu)
    _, dw, db = emu.norm_bwd(dy, x, 1, w, b, mean, rstd, False, True, True)
    assert (10, 1) in {grid[1:] for grid, _ in launches(emu)}  # the partials' groups
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    grads = torch.autograd.grad(layer_norm_ref(leaves[0], (cols,), *leaves[1:], 1e-5), leaves, dy.double())
    assert_close(dw, grads[1], torch.float32, grad=True, atol_scale=math.sqrt(rows))
    assert_close(db, grads[2], torch.float32, grad=True, atol_scale=math.sqrt(rows))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_backward_of_rows_one_element_off_16_bytes(emu, dtype):
    """Rows whose length allows 16-byte vectors but whose data starts one element past a 16-byte
    boundary take the scalar paths (a vector load there would fault on a GPU), with right results."""
    rows, cols = 37, 1024

    def one_off(t):
        flat = torch.empty(t.numel() + 16, dtype=t.dtype)
        start = next(i for i in range(16) if (flat.data_ptr() + i * t.element_size()) % 16 == t.element_size())
        return flat[start:start + t.numel()].view(t.shape).copy_(t)

    x, dy = one_off(torch.randn(rows, cols).to(dtype)), one_off(torch.randn(rows, cols).to(dtype))
    w, b = 1 + 0.5 * torch.randn(cols), 0.5 * torch.randn(cols)
    _, mean, rstd = emu.norm_fwd(x, 1, w, b, 1e-5, False)
    launches(emu)
    dx, dw, db = emu.norm_bwd(dy, x, 1, w, b, mean, rstd, False, True, True)
    assert [grid for grid, block in launches(emu) if block == (32, 8, 1)][0] == (cols // 64, 2, 1)  # scalar
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    grads = torch.autograd.grad(layer_norm_ref(leaves[0], (cols,), *leaves[1:], 1e-5), leaves, dy.double())
    assert_close(dx, grads[0], dtype, grad=True)
    for got, want in zip((dw, db), grads[1:]):
        assert_close(got, want, dtype, grad=True, atol_scale=math.sqrt(rows))


@pytest.mark.parametrize("dtype", HALF)
def test_norm_over_two_dims_with_16_bit_params_and_views(emu, dtype):
    """k = 2 trailing dims, bf16/fp16 weight and bias (converted to fp32 by the op), a transposed x."""
    x = torch.randn(6, 30, 11).to(dtype).transpose(0, 1)  # (30, 6, 11)
    w, b = (1 + torch.randn(6, 11)).to(dtype), torch.randn(6, 11).to(dtype)
    y, mean, rstd = emu.norm_fwd(x, 2, w, b, 1e-5, False)
    ref = layer_norm_ref(x, (6, 11), w, b, 1e-5)
    assert_close(y, ref, dtype)
    dy = torch.randn(30, 6, 11).to(dtype)
    dx, dw, db = emu.norm_bwd(dy, x, 2, w, b, mean, rstd, False, True, True)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    grads = torch.autograd.grad(layer_norm_ref(*leaves[:1], (6, 11), *leaves[1:], 1e-5), leaves, dy.double())
    assert_close(dx, grads[0], dtype, grad=True)
    assert_close(dw, grads[1], dtype, grad=True, atol_scale=math.sqrt(30))
    assert_close(db, grads[2], dtype, grad=True, atol_scale=math.sqrt(30))


@pytest.mark.parametrize("cols", [1000, 3001])  # a warp per row, a block per row
def test_layer_norm_of_a_constant_row_gives_the_bias(emu, cols):
    """Its mean must be exact: rstd ~ 1/sqrt(eps) amplifies any rounding of it."""
    x = torch.full((3, cols), 1000.1)
    b = torch.randn(cols)
    y, mean, _ = emu.norm_fwd(x, 1, None, b, 1e-5, False)
    assert torch.equal(y, b.expand(3, cols)) and torch.equal(mean, x[:, 0])


def test_norm_without_weight_and_bias(emu):
    x = torch.randn(70, 2000)
    y, mean, rstd = emu.norm_fwd(x, 1, None, None, 1e-5, False)
    assert_close(y, layer_norm_ref(x, (2000,)), torch.float32)
    dx, dw, db = emu.norm_bwd(torch.ones_like(x), x, 1, None, None, mean, rstd, False, False, False)
    assert dw.numel() == 0 and db.numel() == 0
    assert dx.abs().max() < 1e-4  # d(sum y)/dx = 0 for a layer norm without weight


@pytest.mark.parametrize("dtype, cols", [(torch.float32, 300), (torch.bfloat16, 512)])
def test_warp_kernels_of_257_to_512_columns(emu, dtype, cols):
    """The warp-per-row kernels hold 4, 8, 16 or 32 elements per lane: 16 (257 to 512 columns, scalar and
    vector loads) is the width the column lists above miss; softmax and norms, forward and backward."""
    x = torch.randn(5, cols).to(dtype)
    y = emu.softmax_fwd(x, -1, False, dtype)
    ref = softmax_ref(x, -1)
    assert_close(y, ref, dtype, msg="softmax")
    dy = torch.randn(5, cols).to(dtype)
    assert_close(emu.softmax_bwd(dy, y, -1, False), softmax_grad_ref(ref, dy, -1, False), dtype, grad=True,
                 msg="softmax backward")
    assert all(map(warp_per_row, launches(emu)))
    w, b = 1 + 0.5 * torch.randn(cols), 0.5 * torch.randn(cols)
    for kind, bias in (("layer_norm", b), ("rms_norm", None)):
        y, mean, rstd = emu.norm_fwd(x, 1, w, bias, 1e-5, kind == "rms_norm")
        assert warp_per_row(launches(emu)[0])
        leaves = [t.double().requires_grad_() for t in (x, w)]
        ref = norm_ref(kind, leaves[0], (cols,), leaves[1], None if bias is None else bias.double(), 1e-5)
        assert_close(y, ref, dtype, msg=kind)
        dx, dw, _ = emu.norm_bwd(dy, x, 1, w, bias, mean, rstd, kind == "rms_norm", True, False)
        assert warp_per_row(launches(emu)[0])  # dx (then the dW partials and their sum)
        grads = torch.autograd.grad(ref, leaves, dy.double())
        assert_close(dx, grads[0], dtype, grad=True, msg=f"{kind} dx")
        assert_close(dw, grads[1], dtype, grad=True, msg=f"{kind} dw", atol_scale=math.sqrt(5))


def test_gradients_of_another_dtype_are_cast(emu):
    """softmax_bwd / norm_bwd take a gradient of any kernel dtype: an fp32 one of a bf16 output / fp16 input
    is cast to that dtype before the kernels read it."""
    x = torch.randn(3, 200).to(torch.bfloat16)
    y = emu.softmax_fwd(x, -1, False, torch.bfloat16)
    dy = torch.randn(3, 200)
    dx = emu.softmax_bwd(dy, y, -1, False)
    assert dx.dtype == torch.bfloat16
    assert_close(dx, softmax_grad_ref(softmax_ref(x, -1), dy, -1, False), torch.bfloat16, grad=True, msg="softmax")
    x = torch.randn(6, 64).to(torch.float16)
    w, b = 1 + 0.5 * torch.randn(64), 0.5 * torch.randn(64)
    y, mean, rstd = emu.norm_fwd(x, 1, w, b, 1e-5, False)
    dy = torch.randn(6, 64)
    dx, dw, db = emu.norm_bwd(dy, x, 1, w, b, mean, rstd, False, True, True)
    assert dx.dtype == torch.float16
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    grads = torch.autograd.grad(layer_norm_ref(leaves[0], (64,), *leaves[1:], 1e-5), leaves, dy.double())
    for name, got, want in zip(("dx", "dw", "db"), (dx, dw, db), grads):
        assert_close(got, want, torch.float16, grad=True, msg=name, atol_scale=math.sqrt(6))


def test_norm_stats_of_rows_of_no_element(emu):
    """Rows of no element have variance 0: mean 0 and rstd 1/sqrt(eps) of the eps given, shaped as the lead
    dims, as gptkern's CPU op gives (torch's native_layer_norm: mean 0, rstd NaN); y is empty."""
    if "cpu" not in gptkern.available_backends():
        pytest.skip("gptkern._C's CPU kernels are not built (the comparison below calls them)")
    for shape, k in (((4, 0), 1), ((2, 3, 0, 5), 2)):
        for is_rms in (False, True):
            x = torch.randn(shape)
            y, mean, rstd = emu.norm_fwd(x, k, None, None, 0.25, is_rms)
            lead = shape[:len(shape) - k]
            assert y.shape == shape and mean.shape == rstd.shape == lead
            assert torch.equal(mean, torch.zeros(lead)) and torch.equal(rstd, torch.full(lead, 2.0))
            cpu = torch.ops.gptkern.norm_fwd(x, k, None, None, 0.25, is_rms)
            assert torch.equal(mean, cpu[1]) and torch.equal(rstd, cpu[2])
    assert launches(emu) == []


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norm_takes_its_eps(emu, kind):
    """A large eps (a variance of about 1) shows in rstd and y, in the warp (100 columns) and block (1500)
    kernels: the eps given reaches both."""
    is_rms = kind == "rms_norm"
    for cols, eps in ((100, 0.5), (1500, 10.0)):
        x = torch.randn(3, cols)
        w = 1 + 0.5 * torch.randn(cols)
        b = None if is_rms else 0.5 * torch.randn(cols)
        y, _, rstd = emu.norm_fwd(x, 1, w, b, eps, is_rms)
        assert warp_per_row(launches(emu)[0]) == (cols <= 1024)
        assert_close(y, norm_ref(kind, x, (cols,), w, b, eps), torch.float32, msg=f"y, {cols} columns")
        xd = x.double()
        ms = (xd * xd).mean(-1) if is_rms else xd.var(-1, unbiased=False)
        assert_close(rstd, (ms + eps).rsqrt(), torch.float32, msg=f"rstd, {cols} columns")


# --------------------------------------------------------------------------------- attention

# (B, H, Hkv, L, S): GQA, L != S both ways, partial tiles, one query, one key.
ATTN_SHAPES = [(1, 2, 1, 70, 90), (2, 2, 2, 64, 64), (1, 2, 1, 130, 40), (1, 1, 1, 1, 130), (1, 3, 3, 65, 1)]


def lse_ref(q, k, scale, causal):
    """log2 of the row sums of exp(q kᵀ scale) in float64, -inf for rows that see no key."""
    group = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.logsumexp(s, -1) / math.log(2)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention(emu, dtype, head_dim, causal, shape):
    if head_dim == 128 and shape[3] * shape[4] > 10000:
        pytest.skip("emulated time: the large shapes at head dim 64 only")
    b, h, hkv, l, s = shape
    q = torch.randn(b, l, h, head_dim).to(dtype).transpose(1, 2)  # (B, H, L, D) with row stride H * D
    k = torch.randn(b, hkv, s, head_dim).to(dtype)
    v = torch.randn(b, hkv, s, head_dim).to(dtype)
    scale = 1.3 / math.sqrt(head_dim)
    out, lse = emu.attention_fwd(q, k, v, None, causal, scale, 0.0, None)
    grid, block = launches(emu)[0]
    assert grid == (b * h, -(-l // 64), 1) and block == (128, 1, 1)
    assert_close(out, attention_ref(q, k, v, causal=causal, scale=scale), dtype, msg="out")
    torch.testing.assert_close(lse.double(), lse_ref(q, k, scale, causal), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_lse_feeds_the_triton_backward(emu, causal):
    """On a GPU the CUDA forward's (out, lse) go to the Triton backward kernels (there is no CUDA
    backward): the gradients they give from the emulated forward match float64's."""
    if not _backend.triton_interpret():
        pytest.skip("the Triton backward runs here through the interpreter")
    q, k, v = (torch.randn(1, n, length, 64).to(torch.float16) for n, length in ((2, 70), (1, 90), (1, 90)))
    out, lse = emu.attention_fwd(q, k, v, None, causal, 0.125, 0.0, None)
    grad_out = torch.randn_like(out)
    grads = torch.ops.gptkern.triton_attention_backward(grad_out, q, k, v, out, lse, None, causal, 0.125, 0.0, None,
                                                        False)[:3]
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(attention_ref(*leaves, causal=causal, scale=0.125), leaves, grad_out.double())
    for name, got, want in zip("qkv", grads, ref):
        assert_close(got, want, torch.float16, grad=True, msg=f"d{name}")


def test_attention_rejects_what_the_kernel_does_not_take(emu):
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="head dims 32"):
        emu.attention_fwd(q[..., :32], q[..., :32], q[..., :32], None, False, 0.1, 0.0, None)
    with pytest.raises(NotImplementedError, match="masks"):
        emu.attention_fwd(q, q, q, torch.ones(8, 8, dtype=torch.bool), False, 0.1, 0.0, None)
    with pytest.raises(NotImplementedError, match="dropout"):
        emu.attention_fwd(q, q, q, None, False, 0.1, 0.1, None)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts 2 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype)
    start = next(i for i in range(1, 8) if (flat.data_ptr() + i * t.element_size()) % 16 == 2)
    out = flat[start:start + t.numel()].view(t.shape).copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 == 2
    return out


def test_contiguous_but_misaligned_inputs_are_copied_before_the_16_byte_copies(emu):
    """contiguous() hands back a contiguous tensor as it is: the kernels' 16-byte cp.async would
    fault on its data (the emulator checks each copy's alignment), so such inputs are copied fresh."""
    q, k, v = (torch.randn(1, 2, 40, 64).to(torch.float16) for _ in range(3))
    out, _ = emu.attention_fwd(misaligned(q), misaligned(k), misaligned(v), None, True, 0.125, 0.0, None)
    assert_close(out, attention_ref(q, k, v, causal=True, scale=0.125), torch.float16)
    dq, dk, dv, seqlens, table = decode_inputs(torch.float16, 64, False, 4, 2, 1, [0, 1, 37, 300])
    got = emu.decode_attention(dq, misaligned(dk), misaligned(dv), seqlens, 0.125, table)
    assert_close(got, decode_attention_ref(dq, dk, dv, seqlens, 0.125, table), torch.float16)


def test_norm_bwd_checks_the_parameter_sizes(emu):
    """dW / dB are written n elements long: a weight or bias of another size is refused, not overrun."""
    x = torch.randn(3, 16)
    y, mean, rstd = emu.norm_fwd(x, 1, torch.ones(16), torch.zeros(16), 1e-5, False)
    for w, b, name in ((torch.ones(8), torch.zeros(16), "weight"), (torch.ones(16), torch.zeros(15), "bias")):
        with pytest.raises(RuntimeError, match=f"{name} has"):
            emu.norm_bwd(torch.ones_like(x), x, 1, w, b, mean, rstd, False, True, True)


def test_attention_gqa_with_several_kv_heads(emu):
    """Query head h reads KV head h // (H / Hkv): 6 query heads on 2 KV heads, heads 0-2 on the first and
    3-5 on the second (the shapes above have one KV head, or as many as query heads)."""
    q = torch.randn(1, 6, 40, 64).to(torch.float16)
    k, v = (torch.randn(1, 2, 70, 64).to(torch.float16) for _ in range(2))
    out, lse = emu.attention_fwd(q, k, v, None, False, 0.125, 0.0, None)
    assert_close(out, attention_ref(q, k, v, scale=0.125), torch.float16)
    torch.testing.assert_close(lse.double(), lse_ref(q, k, 0.125, False), atol=2e-3, rtol=2e-3)


def test_attention_copies_rows_of_a_stride_not_a_multiple_of_8(emu):
    """The 16-byte cp.async copies need every stride but D's to be a multiple of 8 elements: q rows 68 apart,
    k rows 66 apart, v batches 4484 apart would start copies off 16 bytes, so the op copies such views."""
    q = torch.randn(2, 2, 40, 68).to(torch.float16)[..., :64]
    k = torch.randn(2, 1, 70, 66).to(torch.float16)[..., :64]
    v = torch.randn(2, 1, 70 * 64 + 4).to(torch.float16)[..., :70 * 64].unflatten(-1, (70, 64))
    assert (q.stride(2), k.stride(2), v.stride(0)) == (68, 66, 70 * 64 + 4)
    out, _ = emu.attention_fwd(q, k, v, None, False, 0.125, 0.0, None)
    assert_close(out, attention_ref(q, k, v, scale=0.125), torch.float16)


# ------------------------------------------------------------------------------------ decode

def decode_inputs(dtype, head_dim, paged, heads, kv_heads, lq, seqlens, capacity=512, block_size=16):
    b = len(seqlens)
    q = torch.randn(b, heads, lq, head_dim).to(dtype)
    if paged:
        blocks = capacity // block_size
        table = torch.randperm(b * blocks + 3)[: b * blocks].view(b, blocks).to(torch.int32)
        k = torch.randn(b * blocks + 3, kv_heads, block_size, head_dim).to(dtype)
        v = torch.randn(b * blocks + 3, kv_heads, block_size, head_dim).to(dtype)
    else:
        table = None
        k = torch.randn(b, kv_heads, capacity, head_dim).to(dtype)
        v = torch.randn(b, kv_heads, capacity, head_dim).to(dtype)
    return q, k, v, torch.tensor(seqlens, dtype=torch.int32), table


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("heads, kv_heads, lq", [(4, 2, 1), (8, 2, 3), (16, 1, 3)])
@pytest.mark.parametrize("multiprocessors", [1, H200_SMS])
def test_decode_attention(emu, dtype, head_dim, paged, heads, kv_heads, lq, multiprocessors):
    """Rows per KV head: 2 (a block of 8), 12 (of 32), 48 (two blocks of 32); one split with one
    multiprocessor, several (and the combine kernel) with an H200's 132."""
    emu.configure(*DEFAULT, 0, multiprocessors)
    q, k, v, seqlens, table = decode_inputs(dtype, head_dim, paged, heads, kv_heads, lq, [0, 1, 37, 300])
    scale = 0.9 / math.sqrt(head_dim)
    out = emu.decode_attention(q, k, v, seqlens, scale, table)
    grids = [grid for grid, _ in launches(emu)]
    splits = grids[0][1]
    assert grids[0] == (4 * kv_heads, splits, -(-heads // kv_heads * lq // 32) if heads // kv_heads * lq > 8 else 1)
    assert (splits > 1) == (multiprocessors > 1) and len(grids) == (2 if splits > 1 else 1)
    ref = decode_attention_ref(q, k, v, seqlens, scale, table)
    assert_close(out, ref, dtype)
    assert out[0].abs().max() == 0  # cache_seqlens 0: nothing to attend


@pytest.mark.parametrize("multiprocessors", [1, H200_SMS])
def test_nan_in_a_key_or_value_gives_nan_rows(emu, multiprocessors):
    """NaN propagates as in torch (and gptkern's other backends): a NaN score makes its row's sum
    NaN, which must not read as a row that saw no key (zeros); across splits, the combine keeps it,
    also when every other split of the row is empty (its max must not drop the NaN)."""
    emu.configure(*DEFAULT, 0, multiprocessors)
    q, k, v, seqlens, _ = decode_inputs(torch.float16, 64, False, 4, 2, 1, [300, 300, 300, 20])
    k[0, 0, 250] = float("nan")  # batch 0, KV head 0: query heads 0 and 1
    v[1, 1, 3] = float("nan")  # batch 1, KV head 1: query heads 2 and 3
    k[3, 1, 10] = float("nan")  # batch 3 (20 keys: all in the first split), KV head 1: heads 2 and 3
    out = emu.decode_attention(q, k, v, seqlens, 0.125, None).float()
    splits = launches(emu)[0][0][1]
    assert (splits > 1) == (multiprocessors > 1) and 20 <= 512 // splits
    nan = torch.zeros(4, 4, dtype=torch.bool)
    nan[0, :2] = nan[1, 2:] = nan[3, 2:] = True
    assert torch.equal(out.isnan().any(-1).any(-1), nan)
    ref = decode_attention_ref(q, k, v, seqlens, 0.125, None)
    assert_close(out[2], ref[2], torch.float16)
    assert_close(out[3, :2], ref[3, :2], torch.float16)

    qa = torch.randn(1, 2, 70, 64).half()
    ka, va = torch.randn(1, 1, 90, 64).half(), torch.randn(1, 1, 90, 64).half()
    ka[0, 0, 50] = float("nan")  # causal, top-left: query rows 50 to 69 see key 50
    out, lse = emu.attention_fwd(qa, ka, va, None, True, 0.125, 0.0, None)
    assert out.shape[2] == 70 and bool(out[:, :, 50:].isnan().all()) and bool(lse[:, :, 50:].isnan().all())
    assert not out[:, :, :50].isnan().any() and not lse[:, :, :50].isnan().any()


@pytest.mark.parametrize("paged", [False, True])
def test_decode_over_strided_queries_and_caches(emu, paged):
    """q and the caches are read through their strides (multiples of 8: not copied): q laid out as
    (B, Lq, H, D), the K cache with positions outer to heads, V rows 72 elements apart."""
    q0, k0, v0, seqlens, table = decode_inputs(torch.float16, 64, paged, 8, 2, 3, [0, 1, 37, 300])
    q = q0.transpose(1, 2).contiguous().transpose(1, 2)
    k = k0.transpose(1, 2).contiguous().transpose(1, 2)
    v = torch.zeros(*v0.shape[:-1], 72, dtype=torch.float16)[..., :64].copy_(v0)
    assert not any(t.is_contiguous() for t in (q, k, v))
    out = emu.decode_attention(q, k, v, seqlens, 0.125, table)
    assert_close(out, decode_attention_ref(q0, k0, v0, seqlens, 0.125, table), torch.float16)


@pytest.mark.parametrize("block_size", [7, 64])
def test_decode_pages_of_any_block_size(emu, block_size):
    """A page may hold any number of tokens (the tests above use 16): key j is row j % block_size of page
    block_table[j // block_size], several pages to a tile of 32 keys or several tiles to a page."""
    q, k, v, seqlens, table = decode_inputs(torch.bfloat16, 64, True, 4, 2, 1, [0, 1, 37, 300],
                                            block_size=block_size)
    out = emu.decode_attention(q, k, v, seqlens, 0.125, table)
    assert_close(out, decode_attention_ref(q, k, v, seqlens, 0.125, table), torch.bfloat16)


def test_decode_combine_of_large_scores(emu):
    """The combine weighs split s by exp2(lse_s - max lse): with scores in the hundreds (the log2-domain
    LSEs past exp2f's 128), exp2(lse_s) alone would overflow and the rows turn NaN."""
    q, k, v, seqlens, _ = decode_inputs(torch.float16, 64, False, 4, 2, 1, [300, 300, 150, 37])
    out = emu.decode_attention(q, k, v, seqlens, 20.0, None)
    assert launches(emu)[0][0][1] > 1  # several splits
    assert_close(out, decode_attention_ref(q, k, v, seqlens, 20.0, None), torch.float16)


# --------------------------------------------------------------------------- global memory read

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 1, 200, 200), (2, 1, 1, 130, 70), (1, 1, 1, 70, 300)])
def test_attention_reads_each_tile_once_and_skips_tiles_above_the_diagonal(emu, causal, shape):
    """Bytes cp.async reads: per (batch, head) and 64-row query block, its Q rows once, and each K
    and V tile of the keys it can see once (causal: keys up to the block's last row)."""
    b, h, hkv, l, s = shape
    q = torch.randn(b, h, l, 64).to(torch.float16)
    k, v = (torch.randn(b, hkv, s, 64).to(torch.float16) for _ in range(2))
    emu.take_copied_bytes()
    emu.attention_fwd(q, k, v, None, causal, 0.125, 0.0, None)
    rows = 0
    for m0 in range(0, l, 64):
        keys = min(s, m0 + 64) if causal else s
        rows += min(64, l - m0) + 2 * keys  # Q, then K and V (partial tiles read only their rows)
    assert emu.take_copied_bytes() == b * h * rows * 64 * 2


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tile_loads_are_coalesced(emu, head_dim, paged):
    """Each warp-wide cp.async of the attention and decode kernels touches the fewest 32-byte
    sectors its bytes fit in (whole rows of 16-byte chunks on consecutive lanes), with a strided q
    and a paged cache too."""
    q = torch.randn(1, 130, 2, head_dim).to(torch.float16).transpose(1, 2)
    k = torch.randn(1, 1, 70, head_dim).to(torch.float16)
    emu.take_copy_sectors()
    emu.attention_fwd(q, k, k, None, True, 0.125, 0.0, None)
    sectors, fewest = emu.take_copy_sectors()
    assert sectors == fewest > 0
    q, k, v, seqlens, table = decode_inputs(torch.bfloat16, head_dim, paged, 8, 2, 1, [0, 1, 37, 300])
    emu.decode_attention(q, k, v, seqlens, 0.125, table)
    sectors, fewest = emu.take_copy_sectors()
    assert sectors == fewest > 0


@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_ldmatrix_has_no_bank_conflicts(emu, head_dim):
    """The XOR swizzle of the Q, K and V tiles puts the 8 rows each ldmatrix reads (plain for Q
    and K, transposed for V) in 8 distinct bank groups."""
    q, k, v = (torch.randn(1, 1, 130, head_dim).to(torch.bfloat16) for _ in range(3))
    emu.take_ldmatrix_conflicts()
    emu.attention_fwd(q, k, v, None, False, 0.125, 0.0, None)
    assert emu.take_ldmatrix_conflicts() == 0


@pytest.mark.parametrize("heads, kv_heads, lq, chunks", [(8, 2, 1, 1), (16, 2, 2, 1), (16, 1, 3, 2)])
@pytest.mark.parametrize("multiprocessors", [1, H200_SMS])
def test_decode_reads_the_cache_once_per_kv_head(emu, heads, kv_heads, lq, chunks, multiprocessors):
    """GQA-aware: the (H / Hkv) * Lq query rows of a KV head share each K / V load (blocks of up to
    32 rows: 48 rows read it twice), whatever the number of splits; keys past a sequence's length
    are not read."""
    emu.configure(*DEFAULT, 0, multiprocessors)
    seqlens = [0, 1, 37, 300]
    q, k, v, lengths, table = decode_inputs(torch.bfloat16, 64, True, heads, kv_heads, lq, seqlens)
    emu.take_copied_bytes()
    emu.decode_attention(q, k, v, lengths, 0.125, table)
    assert emu.take_copied_bytes() == sum(seqlens) * kv_heads * chunks * 2 * 64 * 2


# ---------------------------------------------------------------------------- thread schedules

def _cases(emu):
    """One call of every kernel family, block paths and split-KV included, with fixed inputs."""
    torch.manual_seed(0)
    x = torch.randn(5, 3001).to(torch.bfloat16)
    y = emu.softmax_fwd(x, -1, False, torch.bfloat16)
    out = [y, emu.softmax_fwd(torch.randn(3, 200), -1, True, torch.float32),
           emu.softmax_bwd(torch.randn(5, 3001).to(torch.bfloat16), y, -1, False)]
    xn = torch.randn(37, 1500).to(torch.float16)
    w, b = torch.randn(1500), torch.randn(1500)
    y, mean, rstd = emu.norm_fwd(xn, 1, w, b, 1e-5, False)
    out += [y, mean, rstd, *emu.norm_bwd(torch.randn(37, 1500).to(torch.float16), xn, 1, w, b, mean, rstd, False,
                                         True, True)]
    xw = torch.randn(9, 512).to(torch.float16)  # the warp-per-row kernels
    y, mean, rstd = emu.norm_fwd(xw, 1, w[:512], None, 1e-6, True)
    out += [y, rstd, *emu.norm_bwd(torch.randn(9, 512).to(torch.float16), xw, 1, w[:512], None, mean, rstd, True,
                                   True, False)]
    for d in (64, 128):
        q, k, v = (torch.randn(1, n, 100, d).to(torch.float16) for n in (2, 1, 1))
        out += list(emu.attention_fwd(q, k, v, None, True, 0.125, 0.0, None))
    for heads, lq in ((8, 3), (4, 1)):  # 12 rows per KV head (a block of 32), 2 (of 8)
        q, k, v, seqlens, table = decode_inputs(torch.bfloat16, 64, True, heads, 2, lq, [0, 5, 300])
        out.append(emu.decode_attention(q, k, v, seqlens, 0.125, table))
    return out


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s)))
def test_other_thread_schedules_give_the_same_bits(emu, schedule):
    expected = _cases(emu)
    emu.configure(*schedule, 1234, H200_SMS)
    got = _cases(emu)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"output {i} differs under {schedule}"


# ------------------------------------------------------------------------ the emulator itself

def test_launch_rewrite_keeps_line_numbers():
    source = "  k<T,\n    D><<<dim3(a,\n b), 32, 0,\n stream()>>>(x,\n y);\n  next();\n"
    out = emu_build.rewrite_launches(source)
    assert out.count("\n") == source.count("\n") and out.splitlines()[-1] == "  next();"
    assert "::gptkern_emu::launch(dim3(dim3(a, b)), dim3(32), 0," in out and "k<T, D>(a...)" in out
    assert "std::make_tuple(x,\n y)" in out  # evaluated once, before the launch
    with pytest.raises(ValueError, match="__launch_bounds__"):
        emu_build.rewrite_launch_bounds("__global__ __launch_bounds__(64) void k() {}")


def test_emulator_exposes_a_missing_cp_async_wait(emu):
    src, want = torch.arange(1, 65, dtype=torch.float32), torch.arange(1, 65, dtype=torch.float32)
    out = torch.full((64,), -7.0)
    emu.configure("forward", False, False, 0, H200_SMS)  # copies land at once: the bug is hidden
    emu.faulty("missing_wait", src, out)
    assert torch.equal(out, want)
    emu.configure(*DEFAULT, 0, H200_SMS)  # copies land at the wait: the bug shows
    emu.faulty("missing_wait", src, out)
    assert not torch.equal(out, want)


def test_emulator_exposes_a_missing_syncthreads(emu):
    """Thread i reads slot i + 1 without a barrier after the writes: forward, thread i runs before
    i + 1 (63 slots stale); reverse, thread 63 reads slot 0 before thread 0 writes it."""
    src, want = torch.zeros(64), torch.arange(1, 65, dtype=torch.float32)
    stale = {}
    for order in ("forward", "reverse"):
        emu.configure(order, False, True, 0, H200_SMS)
        out = torch.zeros(64)
        emu.faulty("missing_sync", src, out)
        stale[order] = int((out != want).sum())
    assert stale == {"forward": 63, "reverse": 1}


def test_emulator_reports_a_deadlock_instead_of_hanging(emu):
    with pytest.raises(RuntimeError, match="deadlocked.*waits at"):
        emu.faulty("deadlock", torch.zeros(64), torch.zeros(64))
    # and stays usable afterwards
    x = torch.randn(2, 9)
    assert_close(emu.softmax_fwd(x, -1, False, torch.float32), softmax_ref(x, -1), torch.float32)


def test_empty_inputs_launch_nothing(emu):
    """A launch with an empty grid is a CUDA error ("invalid configuration argument", which the
    emulator raises too): empty inputs must return before launching."""
    for shape, dim in (((0, 5), -1), ((4, 0), -1), ((3, 0, 2), 0)):
        x = torch.randn(shape)
        assert emu.softmax_fwd(x, dim, False, torch.float32).shape == shape
        assert emu.softmax_bwd(x, x, dim, True).shape == shape
    y, mean, rstd = emu.norm_fwd(torch.randn(0, 8), 1, torch.ones(8), None, 1e-5, False)
    assert y.shape == (0, 8) and mean.shape == rstd.shape == (0,)
    dx, dw, db = emu.norm_bwd(torch.randn(0, 8), torch.randn(0, 8), 1, torch.ones(8), torch.ones(8), mean, rstd,
                              False, True, True)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))
    q = torch.randn(1, 2, 0, 64, dtype=torch.float16)
    k = torch.randn(1, 2, 5, 64, dtype=torch.float16)
    assert emu.attention_fwd(q, k, k, None, False, 0.1, 0.0, None)[0].shape == (1, 2, 0, 64)
    out, lse = emu.attention_fwd(k, k[:, :, :0], k[:, :, :0], None, False, 0.1, 0.0, None)
    assert out.abs().max() == 0 and bool((lse == float("-inf")).all())
    assert emu.decode_attention(q, k, k, torch.tensor([3], dtype=torch.int32), 0.1, None).shape == (1, 2, 0, 64)
    assert launches(emu) == []
    x = torch.randn(4, 0)  # rows of no element: the forward's mean / rstd have the 4 rows
    y, mean, rstd = emu.norm_fwd(x, 1, torch.ones(0), torch.ones(0), 1e-5, False)
    dx, dw, db = emu.norm_bwd(torch.randn(4, 0), x, 1, torch.ones(0), torch.ones(0), mean, rstd, False, True, True)
    assert dx.shape == (4, 0) and dw.shape == db.shape == (0,)
    assert launches(emu) == []


def test_grids_beyond_the_hardware_limits_are_refused(emu):
    """gridDim.y and .z are at most 65535: attention's query blocks of 64 rows and decode's
    blocks of 32 rows per KV head; the other backends take such sizes (expanded views: no memory)."""
    one = torch.randn(1, 1, 1, 64, dtype=torch.float16)
    q = one.expand(1, 1, 65535 * 64 + 1, 64)
    with pytest.raises(NotImplementedError, match="query length 4194241 beyond 4194240"):
        emu.attention_fwd(q, one, one, None, False, 0.1, 0.0, None)
    # the key loop's int32 tile arithmetic, 2 tiles of 64 past S: so many keys would wrap around
    from gptkern.ops.cuda_attention import cuda_attention_limits

    kv = one.expand(1, 1, 2**31 - 128, 64)
    with pytest.raises(NotImplementedError, match="2147483520 keys, beyond 2147483519"):
        emu.attention_fwd(one, kv, kv, None, False, 0.1, 0.0, None)
    assert cuda_attention_limits(one, kv) == "2147483520 keys (at most 2**31 - 129)"
    assert cuda_attention_limits(one, kv[:, :, :-1]) is None
    k = torch.randn(1, 1, 16, 64, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="2097121 query rows per key/value head"):
        emu.decode_attention(one.expand(1, 1, 65535 * 32 + 1, 64), k, k, torch.tensor([16], dtype=torch.int32),
                             0.1, None)
    assert launches(emu) == []


def test_emulator_fills_shared_memory_with_garbage_per_block(emu):
    out = torch.zeros(64)
    emu.faulty("unwritten_shared", torch.zeros(64), out)
    assert torch.equal(out[:32], torch.arange(1, 33, dtype=torch.float32)) and bool(out[32:].isnan().all())


@pytest.mark.parametrize("which, message", [
    ("mismatched_shuffle", "different warp operations"),
    ("misaligned_copy", "not 16-byte aligned"),
    ("too_much_shared", "more than 48 KiB"),
    ("throws", "a thread threw: thrown by thread 5"),
    ("over_bounds", r"64 threads for a kernel of __launch_bounds__\(32\)"),
])
def test_emulator_reports_undefined_behaviour(emu, which, message):
    with pytest.raises(RuntimeError, match=message):
        emu.faulty(which, torch.zeros(64), torch.zeros(64))
    x = torch.randn(3, 40)
    assert_close(emu.softmax_fwd(x, -1, False, torch.float32), softmax_ref(x, -1), torch.float32)
