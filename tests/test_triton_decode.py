"""The Triton decode-attention kernel (split-KV with a combine step) against a float64 reference."""
import math

import pytest
import torch

import gptkern
from helpers import assert_close, dtypes_for, poisoned_allocations


def reference(q, k, v, seqlens):
    """float64, sequence by sequence: query i of Lq sees keys j <= seqlen - Lq + i; none -> 0."""
    b, h, lq, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=torch.float64, device=q.device)
    for s in range(b):
        n = int(seqlens[s])
        for head in range(h):
            keys, values = k[s, head // group, :n].double(), v[s, head // group, :n].double()
            for i in range(lq):
                visible = n - lq + i + 1
                if visible > 0:
                    weights = torch.softmax(q[s, head, i].double() @ keys[:visible].T / math.sqrt(d), -1)
                    out[s, head, i] = weights @ values[:visible]
    return out


def paged_copy(k, v, page, seed=0):
    """The same cache as shuffled pages: (num_blocks, Hkv, page, D) pools and a block table."""
    b, hkv, s, _ = k.shape
    per_seq = -(-s // page)
    num_blocks = b * per_seq + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:b * per_seq]
    table = order.view(b, per_seq).to(torch.int32).to(k.device)
    pools = []
    for cache in (k, v):
        pool = torch.randn(num_blocks, hkv, page, cache.shape[-1], dtype=cache.dtype, device=cache.device)
        padded = torch.nn.functional.pad(cache, (0, 0, 0, per_seq * page - s))
        pool[table.long().flatten()] = padded.view(b, hkv, per_seq, page, -1).transpose(1, 2).flatten(0, 1)
        pools.append(pool)
    return pools[0], pools[1], table


CASES = [  # (B, H, Hkv, Lq, D, S_max, seqlens)
    (3, 4, 2, 1, 64, 150, [150, 1, 0]),
    (2, 8, 1, 3, 48, 90, [77, 3]),
    (2, 6, 6, 1, 32, 40, [40, 17]),
    (1, 32, 2, 2, 16, 70, [70]),  # 32 rows per kv head: two row blocks in fp32
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_decode_kernel_matches_reference(case, device):
    b, h, hkv, lq, d, s, lengths = case
    torch.manual_seed(0)
    for dtype in dtypes_for("triton", device):
        q = torch.randn(b, h, lq, d, dtype=dtype, device=device)
        k = torch.randn(b, hkv, s, d, dtype=dtype, device=device)
        v = torch.randn(b, hkv, s, d, dtype=dtype, device=device)
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        expected = reference(q, k, v, seqlens)
        with gptkern.backend("triton"), poisoned_allocations():
            static = gptkern.ops.decode_attention(q, k, v, seqlens)
            kp, vp, table = paged_copy(k, v, page=16)
            paged = gptkern.ops.decode_attention(q, kp, vp, seqlens, block_table=table)
        assert static.shape == (b, h, lq, d) and static.dtype == dtype
        assert_close(static, expected, dtype, msg=f"static {dtype}")
        assert_close(paged, expected, dtype, msg=f"paged {dtype}")


def test_decode_kernel_strided_query_and_scale(device):
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 32, device=device).transpose(1, 2)  # (B, H=4, Lq=1, D), non-contiguous
    k, v = torch.randn(2, 2, 50, 32, device=device), torch.randn(2, 2, 50, 24, device=device)  # Dv != D
    seqlens = torch.tensor([50, 77, 9, 77], dtype=torch.int32, device=device)[::2]  # strided lengths too
    with gptkern.backend("triton"):
        out = gptkern.ops.decode_attention(q, k, v, seqlens, scale=0.3)
    expected = reference(q * (0.3 * math.sqrt(32)), k, v, seqlens)
    assert_close(out, expected, torch.float32)


def test_decode_kernel_compiles_under_torch_compile(device):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 16, device=device), torch.randn(1, 2, 20, 16, device=device), \
        torch.randn(1, 2, 20, 16, device=device)
    seqlens = torch.tensor([13], dtype=torch.int32, device=device)

    def step(q, k, v, n):
        return gptkern.ops.decode_attention(q, k, v, n)

    with gptkern.backend("triton"):
        expected = step(q, k, v, seqlens)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, seqlens)
    assert_close(compiled, expected, torch.float32)


def test_decode_kernel_never_reads_past_the_cache(device):
    """On a GPU the kernel trusts cache_seqlens (the op checks them only on CPU): a length past the
    cache reads no further than the cache, as if it were the capacity (the CUDA kernel's rule)."""
    from gptkern.kernels.decode import decode_fwd

    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 32, device=device)
    k, v = (torch.randn(2, 2, 20, 32, device=device) for _ in range(2))  # S_max 20
    kp, vp, table = paged_copy(k, v, page=16)  # 2 pages of 16: capacity 32
    for cache, tbl, capacity in (((k, v), None, 20), ((kp, vp), table, 32)):
        at_capacity = torch.tensor([7, capacity], dtype=torch.int32, device=device)
        past = torch.tensor([7, capacity + 10_000_000], dtype=torch.int32, device=device)
        want = decode_fwd(q, *cache, at_capacity, 0.25, tbl)
        torch.testing.assert_close(decode_fwd(q, *cache, past, 0.25, tbl), want, atol=0, rtol=0)


def test_every_split_reads_keys_of_a_mostly_empty_cache(monkeypatch, device):
    """Key blocks are dealt to the splits round-robin up to the filled length: with a quarter of a
    1024-key cache filled, each of the 4 splits sees keys (a finite partial log-sum-exp), where
    contiguous quarters of the capacity left the work to one split."""
    from gptkern.kernels import decode

    seen = []
    original = decode._decode_combine_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(o_part, lse_part, *args, **kwargs):
                seen.append((lse_part.clone(), kwargs["SPLITS"], kwargs["M_PAD"]))
                return original[grid](o_part, lse_part, *args, **kwargs)
            return launch

    monkeypatch.setattr(decode, "_decode_combine_kernel", Recorder())
    monkeypatch.setattr(decode, "_num_splits", lambda bh, cap, block_n, device, fill=2: 4)
    monkeypatch.setattr(decode.autotune, "enabled", lambda device: False)  # one launch to look at
    q = torch.randn(1, 2, 1, 16, device=device)
    k, v = torch.randn(1, 2, 1024, 16, device=device), torch.randn(1, 2, 1024, 16, device=device)
    seqlens = torch.tensor([256], dtype=torch.int32, device=device)
    with gptkern.backend("triton"):
        out = gptkern.ops.decode_attention(q, k, v, seqlens)
    assert_close(out, reference(q, k, v, seqlens), torch.float32)
    (lse, splits, m_pad), = seen
    per_split = lse.view(2, splits, m_pad)[:, :, 0]  # (kv heads, splits): the one query row
    assert splits == 4 and torch.isfinite(per_split).all(), per_split


@pytest.mark.parametrize("splits", [3, 5])
def test_split_counts_that_are_not_powers_of_two(monkeypatch, device, splits):
    """The combine kernel pads the splits to a power of two (a GPU's split count, from its SM count,
    often is not one): the padding lanes must weigh nothing, for every (batch, kv head)."""
    from gptkern.kernels import decode

    monkeypatch.setattr(decode, "_num_splits", lambda bh, cap, block_n, device, fill=2: splits)
    monkeypatch.setattr(decode.autotune, "enabled", lambda device: False)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 2, 16, device=device)
    k, v = torch.randn(2, 2, 400, 16, device=device), torch.randn(2, 2, 400, 16, device=device)
    seqlens = torch.tensor([400, 150], dtype=torch.int32, device=device)
    with gptkern.backend("triton"), poisoned_allocations():
        out = gptkern.ops.decode_attention(q, k, v, seqlens)
    assert_close(out, reference(q, k, v, seqlens), torch.float32)


def test_paged_cache_with_value_dim_other_than_key_dim(device):
    """Paged K and V pools of different head dims: each pool is read with its own strides."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 2, 32, device=device)
    k, v = torch.randn(2, 2, 40, 32, device=device), torch.randn(2, 2, 40, 24, device=device)
    seqlens = torch.tensor([40, 23], dtype=torch.int32, device=device)
    kp, vp, table = paged_copy(k, v, page=16)
    with gptkern.backend("triton"), poisoned_allocations():
        out = gptkern.ops.decode_attention(q, kp, vp, seqlens, block_table=table)
    assert_close(out, reference(q, k, v, seqlens), torch.float32)
