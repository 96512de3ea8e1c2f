"""decode_attention on every backend that serves it (torch, cpu) against the float64 reference:
ragged cache lengths (0 and 1 included), several new queries, GQA, static and paged caches,
layouts, opcheck, torch.compile, bad input."""
import math

import pytest
import torch

import gptkern
from gptkern.ops.reference import decode_attention_ref
from helpers import assert_close, poisoned_allocations

decode = gptkern.ops.decode_attention
HAS_CPU = "cpu" in gptkern.available_backends()
BACKENDS = ["torch", "auto"] + (["cpu"] if HAS_CPU else [])
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="gptkern._C is not built")


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def caches(b, hk, s, d, dv, dtype=torch.float32):
    return rand(b, hk, s, d, dtype=dtype), rand(b, hk, s, dv, dtype=dtype)


def paged(k_cache, v_cache, block_size):
    """The same caches as (num_blocks, Hkv, block_size, D) blocks in shuffled order + block_table;
    the spare blocks and the slots past the end hold NaN."""
    b, hk, s, _ = k_cache.shape
    per_seq = -(-s // block_size)
    perm = torch.randperm(b * per_seq + 3)  # 3 spare blocks
    table = perm[: b * per_seq].view(b, per_seq).to(torch.int32)

    def blocks(cache):
        pad = torch.full((b, hk, per_seq * block_size - s, cache.shape[-1]), float("nan"), dtype=cache.dtype)
        full = torch.cat([cache, pad], 2).view(b, hk, per_seq, block_size, -1).transpose(1, 2)
        out = torch.full((b * per_seq + 3, hk, block_size, cache.shape[-1]), float("nan"), dtype=cache.dtype)
        out[table.long().flatten()] = full.reshape(b * per_seq, hk, block_size, -1)
        return out

    return blocks(k_cache), blocks(v_cache), table


def check(backend, q, k_cache, v_cache, seqlens, block_table=None, scale=None):
    with gptkern.backend(backend), poisoned_allocations():
        out = decode(q, k_cache, v_cache, seqlens, scale=scale, block_table=block_table)
    ref = decode_attention_ref(q, k_cache, v_cache, seqlens, scale=scale, block_table=block_table)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert_close(out, ref, q.dtype, msg=backend)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq", [1, 3])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_ragged_lengths(backend, dtype, lq, heads):
    h, hk = heads
    k_cache, v_cache = caches(5, hk, 300, 64, 64, dtype)
    seqlens = torch.tensor([0, 1, 2, 300, 77], dtype=torch.int32)  # 1 and 2 < lq: the first queries see nothing
    for cache in (k_cache, v_cache):  # unused slots may hold anything
        for b, n in enumerate(seqlens.tolist()):
            cache[b, :, n:] = float("nan")
    out = check(backend, rand(5, h, lq, 64, dtype=dtype), k_cache, v_cache, seqlens)
    assert out[0].abs().max() == 0  # an empty cache gives zeros


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [(48, 48), (80, 96), (40, 24), (20, 12), (16, 16), (32, 16), (128, 128), (256, 64),
                                  (96, 80), (160, 112), (64, 32)])
def test_head_dims_and_scale(backend, dtype, dims):
    """Rows read in place (D a multiple of one load: 8 / 16 fp32 or 16 / 32 16-bit values with
    AVX2 / AVX-512) and through fp32 buffers; the scoring loop unrolled for 1, 2, 4 and 8 loads
    per row and not; P.V tiles of 1 to 8 vectors."""
    d, dv = dims
    k_cache, v_cache = caches(2, 2, 70, d, dv, dtype)
    check(backend, rand(2, 4, 2, d, dtype=dtype), k_cache, v_cache, torch.tensor([70, 33], dtype=torch.int32),
          scale=0.3)
    if d != dv:  # the default scale is 1 / sqrt(D), the query's head dim, not the value's
        check(backend, rand(2, 4, 2, d, dtype=dtype), k_cache, v_cache, torch.tensor([70, 33], dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 5, 64])
def test_paged_equals_static(backend, block_size):
    k_cache, v_cache = caches(3, 2, 150, 32, 32)
    q = rand(3, 4, 2, 32)
    seqlens = torch.tensor([150, 1, 64], dtype=torch.int32)
    k_pages, v_pages, table = paged(k_cache, v_cache, block_size)
    static = check(backend, q, k_cache, v_cache, seqlens)
    pages = check(backend, q, k_pages, v_pages, seqlens, block_table=table)
    torch.testing.assert_close(pages, static, atol=1e-6, rtol=1e-6)


@needs_cpu
@pytest.mark.parametrize("block_size", [5, 48])
def test_paged_runs_stop_at_page_ends_past_the_first_chunk(block_size):
    """The C++ kernel reads keys in chunks of 512 (and splits of whole chunks), each in runs that end
    where a page ends: a run starting past the first chunk, mid-page, must still stop at its page's
    end, not block_size keys later (1300 keys: chunks at 512 and 1024, neither on a page boundary)."""
    k_cache, v_cache = caches(1, 2, 1300, 32, 32)
    q = rand(1, 4, 2, 32)
    seqlens = torch.tensor([1300], dtype=torch.int32)
    k_pages, v_pages, table = paged(k_cache, v_cache, block_size)
    static = check("cpu", q, k_cache, v_cache, seqlens)
    pages = check("cpu", q, k_pages, v_pages, seqlens, block_table=table)
    torch.testing.assert_close(pages, static, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_paged_pool_gives_zeros(backend):
    """No blocks at all (every sequence empty): zeros of q's dtype and (B, H, Lq, Dv), on every backend."""
    q = rand(2, 4, 1, 8)
    pool = rand(0, 2, 4, 8), rand(0, 2, 4, 6)
    table = torch.zeros(2, 3, dtype=torch.int32)
    with gptkern.backend(backend):
        out = gptkern.ops.decode_attention(q, *pool, torch.zeros(2, dtype=torch.int32),
                                           block_table=table)
    assert out.shape == (2, 4, 1, 6) and out.dtype == q.dtype and not out.any()


@needs_cpu
def test_long_cache_splits():
    """One sequence and one KV head: the cache is split across tasks and the splits combined."""
    k_cache, v_cache = caches(1, 1, 2000, 64, 64)
    for n in (2000, 700, 257, 3):
        check("cpu", rand(1, 2, 1, 64), k_cache, v_cache, torch.tensor([n], dtype=torch.int32))
        check("cpu", rand(1, 2, 1, 64, dtype=torch.bfloat16), k_cache.bfloat16(), v_cache.bfloat16(),
              torch.tensor([n], dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend):
    """q stored (B, Lq, H, D); caches stored (B, S, Hkv, D) (rows not adjacent); a cache that is
    not contiguous in D."""
    q = rand(2, 3, 4, 32).transpose(1, 2)
    k_cache, v_cache = rand(2, 50, 2, 32).transpose(1, 2), rand(2, 50, 2, 32).transpose(1, 2)
    seqlens = torch.tensor([50, 9], dtype=torch.int32)
    check(backend, q, k_cache, v_cache, seqlens)
    check(backend, q, k_cache.transpose(2, 3).contiguous().transpose(2, 3), v_cache, seqlens.long())
    # head dim 1: "contiguous" to torch whatever the last stride (torch ignores it), not 1 here
    k1, v1 = rand(2, 2, 1, 50).transpose(2, 3), rand(2, 2, 1, 50).transpose(2, 3)
    assert k1.is_contiguous() and k1.stride(-1) != 1
    check(backend, rand(2, 4, 3, 1), k1, v1, seqlens)


@needs_cpu
def test_cpu_matches_torch_backend():
    k_cache, v_cache = caches(4, 2, 128, 64, 64)
    q, seqlens = rand(4, 8, 1, 64), torch.tensor([128, 100, 1, 65], dtype=torch.int32)
    with gptkern.backend("cpu"):
        got = decode(q, k_cache, v_cache, seqlens)
    with gptkern.backend("torch"):
        want = decode(q, k_cache, v_cache, seqlens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_cpu
def test_auto_prefers_cpu_and_gradients_move_to_torch():
    k_cache, v_cache = caches(1, 1, 10, 16, 16)
    q, seqlens = rand(1, 1, 1, 16).requires_grad_(), torch.tensor([10], dtype=torch.int32)
    with gptkern.backend("cpu"), pytest.raises(NotImplementedError, match="gradients"):
        decode(q, k_cache, v_cache, seqlens)
    out = decode(q, k_cache, v_cache, seqlens)  # auto: torch serves the differentiable call
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert grad.shape == q.shape
    with torch.no_grad():
        assert gptkern._backend.choose("decode_attention", q.device, {"cpu": lambda: None,
                                                                      "torch": lambda: None}) == "cpu"


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_decode_kernels_have_no_backward():
    """The Triton and C++ decode kernels are inference-only: asked for gradients, they refuse."""
    k_cache, v_cache = caches(1, 1, 10, 16, 16)
    q = rand(1, 1, 1, 16).requires_grad_()
    for name in ["triton"] + (["cpu"] if HAS_CPU else []):
        with gptkern.backend(name), pytest.raises(NotImplementedError, match="gradients"):
            decode(q, k_cache, v_cache, torch.tensor([10], dtype=torch.int32))


@needs_cpu
def test_opcheck():
    k_cache, v_cache = caches(2, 2, 40, 16, 16)
    q, seqlens = rand(2, 4, 2, 16), torch.tensor([40, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.gptkern.decode_attention.default, (q, k_cache, v_cache, seqlens, 0.25, None))
    k_pages, v_pages, table = paged(k_cache, v_cache, 8)
    torch.library.opcheck(torch.ops.gptkern.decode_attention.default, (q, k_pages, v_pages, seqlens, 0.25, table))


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_CPU else []))
def test_compile_fullgraph(backend):
    k_cache, v_cache = caches(2, 2, 40, 16, 16)
    q, seqlens = rand(2, 4, 1, 16), torch.tensor([40, 7], dtype=torch.int32)
    k_pages, v_pages, table = paged(k_cache, v_cache, 8)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, n, t: decode(q, k, v, n, block_table=t), fullgraph=True)
    with gptkern.backend(backend):
        got = f(q, k_pages, v_pages, seqlens, table)
    assert_close(got, decode_attention_ref(q, k_cache, v_cache, seqlens), torch.float32)
    # a head-dim-1 cache whose last stride is not 1 (the C++ kernels get a view) traces too
    k1, v1 = rand(2, 2, 3, 40).transpose(2, 3)[..., 1:2], rand(2, 2, 3, 40).transpose(2, 3)[..., 1:2]
    g = torch.compile(lambda q, k, v, n: decode(q, k, v, n), backend="aot_eager", fullgraph=True)
    q1 = rand(2, 4, 1, 1)
    with gptkern.backend(backend):
        got = g(q1, k1, v1, seqlens)
    assert_close(got, decode_attention_ref(q1, k1, v1, seqlens), torch.float32)


@needs_cpu
def test_compiled_int64_indices_beyond_int32_are_refused_not_wrapped():
    """Under torch.compile the Python value checks do not run: an int64 length or block id past
    int32 must still be refused by the kernel's checks, not wrapped to a valid-looking one."""
    k_cache, v_cache = caches(2, 2, 40, 16, 16)
    q = rand(2, 4, 1, 16)
    k_pages, v_pages, table = paged(k_cache, v_cache, 8)
    f = torch.compile(lambda q, k, v, n, t: decode(q, k, v, n, block_table=t), backend="aot_eager", fullgraph=True)
    wide = table.long()
    wide[0, 1] += 2**32
    for seqlens, blocks, match in ((torch.tensor([2**32 + 3, 7]), table, r"cache_seqlens\[0\] = -1"),
                                   (torch.tensor([40, 7]), wide, r"block_table\[0, 1\] = -1")):
        torch._dynamo.reset()
        with gptkern.backend("cpu"), pytest.raises(RuntimeError, match=match):
            f(q, k_pages, v_pages, seqlens, blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    q, (k, v) = rand(2, 4, 1, 8), caches(2, 2, 10, 8, 8)
    n = torch.tensor([10, 3], dtype=torch.int32)
    _, _, table = paged(k, v, 4)
    cases = [
        (TypeError, "k_cache", dict(k_cache=[1.0])),
        (RuntimeError, "q must have 4 dims", dict(q=rand(2, 4, 8))),
        (RuntimeError, "dtype", dict(k_cache=k.double())),
        (RuntimeError, "head dim", dict(k_cache=rand(2, 2, 10, 4))),
        (RuntimeError, "heads", dict(k_cache=rand(2, 3, 10, 8), v_cache=rand(2, 3, 10, 8))),
        (RuntimeError, "k_cache .* and v_cache", dict(v_cache=rand(2, 2, 9, 8))),
        (RuntimeError, "cache_seqlens", dict(cache_seqlens=n.float())),
        (RuntimeError, "cache_seqlens", dict(cache_seqlens=n[:1])),
        (RuntimeError, r"cache_seqlens\[0\] = 11", dict(cache_seqlens=torch.tensor([11, 3], dtype=torch.int32))),
        (RuntimeError, r"cache_seqlens\[1\] = -1", dict(cache_seqlens=torch.tensor([1, -1], dtype=torch.int32))),
        (RuntimeError, "batch size", dict(k_cache=rand(3, 2, 10, 8), v_cache=rand(3, 2, 10, 8))),
        (RuntimeError, "block_table", dict(block_table=table[:1])),
        (IndexError, "block_table", dict(block_table=table + 100)),
        # k as a pool of 2 blocks of 10 tokens: block 2 is one past its end, here in sequence 0's
        # second block, which holds its last 5 tokens only
        (IndexError, r"block_table\[0\] = \[0, 2\]",
         dict(block_table=torch.tensor([[0, 2, 0], [1, 0, 0]], dtype=torch.int32),
              cache_seqlens=torch.tensor([15, 3], dtype=torch.int32))),
        (TypeError, "scale", dict(scale="0.1")),
        (RuntimeError, "device", dict(cache_seqlens=n.to("meta"))),
        (RuntimeError, "blocks of at least one token", dict(k_cache=rand(3, 2, 0, 8), v_cache=rand(3, 2, 0, 8),
                                                            block_table=table, cache_seqlens=n * 0)),
    ]
    for exc, match, override in cases:
        args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=n)
        args.update(override)
        with gptkern.backend(backend), pytest.raises(exc, match=match):
            decode(**args)


@needs_cpu
def test_bad_input_to_the_op_names_the_argument():
    q, (k, v) = rand(2, 4, 1, 8), caches(2, 2, 10, 8, 8)
    n = torch.tensor([10, 3], dtype=torch.int32)
    op = torch.ops.gptkern.decode_attention
    cases = [
        ("k_cache", lambda: op(q, k.double(), v, n, 1.0, None)),
        ("cache_seqlens", lambda: op(q, k, v, n.long(), 1.0, None)),
        (r"cache_seqlens\[0\]", lambda: op(q, k, v, n + 1, 1.0, None)),
        ("contiguous in the head dim", lambda: op(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, n, 1.0, None)),
        ("block_table", lambda: op(q, k, v, n, 1.0, torch.zeros(2, 3, dtype=torch.int64))),
        (r"block_table\[0, 1\]",
         lambda: op(q, k, v, n + 1, 1.0, torch.tensor([[0, 5, 0], [1, 1, 1]], dtype=torch.int32))),
        # lengths are checked before the table is read up to them (a 2-column table here)
        (r"cache_seqlens\[0\] = 100000 is outside \[0, 20\]",
         lambda: op(q, k, v, torch.tensor([100000, 3], dtype=torch.int32), 1.0, torch.ones(2, 2, dtype=torch.int32))),
        ("blocks of at least one token", lambda: op(q, k[:, :, :0], v[:, :, :0], n * 0, 1.0,
                                                    torch.zeros(2, 2, dtype=torch.int32))),
    ]
    for match, fn in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()



def test_triton_declines_grids_and_offsets_it_cannot_take():
    """The Triton decode kernels offset keys within one head's static cache in 32 bits, and the
    combine kernel puts a query row per block on its grid's second axis (65535 at most on a GPU):
    beyond those, `auto` moves on to the next backend."""
    from types import SimpleNamespace

    from gptkern.ops.decode import _triton_grid_limits

    def t(shape, stride=None, device="cuda"):
        if stride is None:  # contiguous
            stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
        return SimpleNamespace(shape=shape, device=torch.device(device), stride=lambda dim: stride[dim])

    q, k = t((2, 8, 1, 64)), t((2, 2, 2**25 - 1, 64), (0, 0, 64, 1))
    assert _triton_grid_limits(q, k, k, None) is None
    big = t((2, 2, 2**25, 64), (0, 0, 64, 1))
    assert "span 2147483648 elements" in _triton_grid_limits(q, big, k, None)
    wide_v = t((2, 2, 2**25 - 1, 64), (0, 0, 65, 1))  # the wider row stride of the two counts
    assert f"span {(2**25 - 2) * 65 + 64} elements" in _triton_grid_limits(q, k, wide_v, None)
    transposed = t((2, 2, 2**24, 256), (0, 0, 1, 2**24))  # (B, Hkv, D, S) seen as (B, Hkv, S, D)
    assert "span 4294967296 elements" in _triton_grid_limits(q, transposed, transposed, None)
    assert "queries or outputs of 2147483648" in _triton_grid_limits(t((2**16, 8, 64, 64)), k, k, None)
    assert _triton_grid_limits(q, big, big, SimpleNamespace(shape=(2, 8))) is None  # paged: 64-bit block offsets
    assert "65540 query rows" in _triton_grid_limits(t((2, 8, 16385, 64)), k, k, None)
    assert _triton_grid_limits(t((2, 8, 16385, 64), device="cpu"), k, k, None) is None  # the interpreter


def test_cuda_declines_grids_it_cannot_launch():
    """The CUDA decode kernel's grid: blocks of 32 query rows per KV head on its third axis
    (65535 at most) and one combine block per row (2**31 - 1): beyond, `auto` moves on."""
    from types import SimpleNamespace

    from gptkern.ops.decode import _cuda_grid_limits

    kv = SimpleNamespace(shape=(1, 2, 16, 64))
    assert _cuda_grid_limits(SimpleNamespace(shape=(1, 8, 65535 * 8, 64)), kv) is None  # 2097120 rows
    assert "2097124 query rows" in _cuda_grid_limits(SimpleNamespace(shape=(1, 8, 65535 * 8 + 1, 64)), kv)
    assert "2147483648 in all" in _cuda_grid_limits(SimpleNamespace(shape=(2**16, 2, 2**14, 64)), kv)


def test_triton_declines_a_capacity_its_int32_key_loop_could_overflow():
    """The Triton key loop steps an int32 position by up to 64 splits x 64 keys: a paged cache of
    2**31 slots (the table is never read here) goes to another backend."""
    from types import SimpleNamespace

    from gptkern.ops.decode import MAX_TRITON_CAPACITY, _triton_grid_limits

    q, k = torch.randn(1, 2, 1, 16), torch.randn(4, 2, 16, 16)
    assert _triton_grid_limits(q, k, k, SimpleNamespace(shape=(1, 4))) is None
    huge = SimpleNamespace(shape=(1, 2**27))  # 2**27 pages of 16 keys
    assert f"2147483648 keys per sequence (at most {MAX_TRITON_CAPACITY})" in _triton_grid_limits(q, k, k, huge)
    from gptkern.ops.decode import _capacity_limit  # the CUDA kernel's key loop: the same limit

    assert _capacity_limit(k, huge) and _capacity_limit(k, SimpleNamespace(shape=(1, 4))) is None


def test_cuda_declines_a_cache_it_would_copy_whole():
    """The CUDA kernel reads 16-byte rows in place; a cache view it cannot (an odd head-dim slice, a
    misaligned start, a strided last dim) it copies whole at every call: `auto` moves on (an
    explicit `cuda` backend still serves it)."""
    from gptkern.ops.decode import _cuda_cache_layout

    base = torch.randn(2, 4, 64, 72, dtype=torch.float16)
    good = base[..., :64]  # row stride 72 elements: 144 bytes, a multiple of 16
    assert _cuda_cache_layout(good, good) is None
    assert _cuda_cache_layout(base[:, :1], base[:1]) is None  # size-1 dims need no aligned stride
    odd = torch.randn(2, 4, 64, 68, dtype=torch.float16)[..., :64]  # 136-byte rows
    assert "k_cache of strides (17408, 4352, 68, 1)" in _cuda_cache_layout(odd, good)
    assert "v_cache" in _cuda_cache_layout(good, base[..., 1:65])  # starts 2 bytes past alignment
    assert "starting 2 bytes past" in _cuda_cache_layout(good, base[..., 1:65])
    assert "v_cache" in _cuda_cache_layout(good, base.transpose(-1, -2)[..., :64, :64])  # strided last dim


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_as_torch_sdpa(backend):
    """Under autocast decode computes in the autocast dtype on every backend, as torch's SDPA (and
    the torch backend, which calls it) does, and takes an fp32 query over a cache in that dtype."""
    q, (k_cache, v_cache) = rand(2, 4, 1, 16), caches(2, 2, 9, 16, 16)
    seqlens = torch.tensor([4, 9], dtype=torch.int32)
    want = decode_attention_ref(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), seqlens)
    with torch.autocast("cpu", dtype=torch.bfloat16), gptkern.backend(backend):
        for k_c, v_c in ((k_cache, v_cache), (k_cache.bfloat16(), v_cache.bfloat16())):
            out = decode(q, k_c, v_c, seqlens)
            assert out.dtype == torch.bfloat16
            assert_close(out, want, torch.bfloat16, msg=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not cast (served by torch)
        assert decode(q.double(), k_cache.double(), v_cache.double(), seqlens).dtype == torch.float64


def test_block_table_entries_past_the_filled_blocks_may_hold_anything():
    q, (k, v) = rand(2, 4, 1, 8), caches(2, 2, 10, 8, 8)
    n = torch.tensor([10, 3], dtype=torch.int32)
    k_pages, v_pages, table = paged(k, v, 4)  # 3 blocks per sequence; sequence 1 (3 tokens) uses one
    junk = table.clone()
    junk[1, 1:] = torch.tensor([-1, 2**31 - 1], dtype=torch.int32)
    for backend in BACKENDS:
        with gptkern.backend(backend):
            want = decode(q, k_pages, v_pages, n, block_table=table)
            got = decode(q, k_pages, v_pages, n, block_table=junk)
        torch.testing.assert_close(got, want, msg=backend)


def test_a_negative_block_in_use_is_refused():
    q, (k, v) = rand(2, 4, 1, 8), caches(2, 2, 10, 8, 8)
    n = torch.tensor([10, 3], dtype=torch.int32)
    k_pages, v_pages, table = paged(k, v, 4)
    table[0, 1] = -1  # sequence 0's second block (tokens 4..7) is in use
    for backend in BACKENDS:
        with gptkern.backend(backend), pytest.raises(IndexError, match=r"block_table\[0\]"):
            decode(q, k_pages, v_pages, n, block_table=table)
