"""Every block shape the GPU tables can launch (defaults and autotuning alternatives) gives
correct attention: the interpreter normally runs one shape (INTERPRETER_CONFIG), so here each
kernel is forced to each (BLOCK_M, BLOCK_N) of the tables in turn, with sequence lengths that
are not multiples of the blocks, causal diagonals, key-padding masks and varlen windows.
Warps and stages do not change results under the interpreter; the Hopper compile check covers
them."""
import pytest
import torch

import gptkern
from test_varlen import check as check_varlen

pytestmark = pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def table_blocks() -> dict[str, list[tuple[int, int]]]:
    """kernel -> the distinct (BLOCK_M, BLOCK_N) of its table entries and alternatives."""
    from gptkern.kernels import attention

    blocks = {}
    for kernel, entries in attention._CONFIGS.items():
        found = {c[:2] for widths in entries.values() for c in widths if c is not None}
        for alternatives in attention._ALTERNATIVES.get(kernel, {}).values():
            found |= {c[:2] for width in alternatives for c in width}
        blocks[kernel] = sorted(found)
    return blocks


def block_sets() -> list[dict]:
    """Each kernel's blocks, zipped so that every shape of every kernel runs at least once."""
    blocks = table_blocks()
    count = max(len(b) for b in blocks.values())
    return [{k: b[i % len(b)] for k, b in blocks.items()} for i in range(count)]


@pytest.fixture
def forced_blocks(monkeypatch):
    """force(dict kernel -> (BLOCK_M, BLOCK_N)): the launchers use exactly those blocks."""
    from gptkern.kernels import attention

    launched = set()
    original_launch = attention.AttnConfig.launch

    def recorded_launch(self):
        launched.add((self.block_m, self.block_n))
        return original_launch(self)

    def force(chosen: dict):
        monkeypatch.setattr(attention, "configs",
                            lambda kernel, *args: (attention.AttnConfig(*chosen[kernel], 4, 1),))
        monkeypatch.setattr(attention.AttnConfig, "launch", recorded_launch)
        return launched

    return force


def test_tables_have_shapes_the_interpreter_does_not_run():
    """The check below is not empty: the tables hold non-square and non-64 blocks."""
    blocks = table_blocks()
    assert all(len(b) >= 3 for b in blocks.values())
    assert any(m != n for b in blocks.values() for m, n in b)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", block_sets(), ids=lambda b: "-".join(f"{k}{m}x{n}" for k, (m, n) in b.items()))
def test_every_table_block_shape_is_correct(blocks, forced_blocks):
    from test_attention import check as check_dense

    launched = forced_blocks(blocks)
    dtype = torch.float32
    rand = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype)  # noqa: E731
    # lengths of two or more blocks of the widest tile, odd so that no tile divides them (the
    # interpreter's time grows with the tile count: 16-wide tiles get shorter sequences)
    widest = max(max(b) for b in blocks.values())
    long = 150 if widest >= 128 else 2 * widest + 11
    # dense, L != S and not block multiples: causal (top-left), GQA, and a key-padding mask
    check_dense("triton", rand(1, 2, long, 16), rand(1, 1, long - 10, 16), rand(1, 1, long - 10, 24),
                is_causal=True, enable_gqa=True)
    keep = torch.rand(2, 1, 1, 77, device=DEVICE) > 0.3
    check_dense("triton", rand(2, 1, 45, 16), rand(2, 1, 77, 16), rand(2, 1, 77, 16), mask=keep)
    # varlen, ragged with empty and one-row sequences: causal (bottom-right) with a window
    check_varlen("triton", dtype, [0, 1, long, 37], [3, 1, long - 10, 37], h=2, hk=1, causal=True, window=(40, 0))
    assert launched == set(blocks.values())  # the kernels ran with the forced blocks


def test_block_sets_cover_every_shape():
    seen = {k: set() for k in table_blocks()}
    for blocks in block_sets():
        for k, b in blocks.items():
            seen[k].add(b)
    assert seen == {k: set(b) for k, b in table_blocks().items()}


def tma_configs() -> list[tuple[str, tuple[int, int]]]:
    """(kernel, (block_m, block_n)) of every descriptor candidate in the tables."""
    from gptkern.kernels import attention

    return sorted({(kernel, c[:2]) for kernel, table in attention._ALTERNATIVES.items() for widths in table.values()
                   for width in widths for c in width if len(c) > 4 and c[4]})


def test_tables_have_descriptor_candidates_for_every_kernel():
    assert {kernel for kernel, _ in tma_configs()} == {"fwd", "dq", "dkdv"}


@pytest.mark.parametrize("kernel,block", tma_configs(), ids=lambda x: x if isinstance(x, str) else f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_descriptor_kernels_are_correct(kernel, block, causal, monkeypatch):
    """Each kernel through TMA tensor descriptors (zero-filled tails: L, S and head dims that are
    not block multiples, Dv != D, GQA; the stores drop them), fp16 under the interpreter."""
    from gptkern.kernels import attention
    from test_attention import check as check_dense

    chosen = attention.AttnConfig(*block, 4, 1, tma=True)
    monkeypatch.setattr(attention, "configs", lambda name, *args: (chosen if name == kernel else
                                                                   attention.INTERPRETER_CONFIG,))
    used = []
    original = attention._descriptors
    monkeypatch.setattr(attention, "_descriptors", lambda *args: used.append(args[2]) or original(*args))
    rand = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=torch.float16)  # noqa: E731
    check_dense("triton", rand(2, 4, 150, 24), rand(2, 2, 139, 24), rand(2, 2, 139, 40), is_causal=causal,
                enable_gqa=True, grad=kernel != "fwd")
    assert used == [kernel]  # that kernel, and only it, took the descriptors


def test_descriptors_only_where_they_fit():
    from gptkern.kernels import attention

    def fits(q, kind=attention.MASK_NONE, **problem):
        p = attention.Problem(batch=q.shape[0], heads=q.shape[1], kv_heads=q.shape[1], l=q.shape[2], s=q.shape[2],
                              d=q.shape[3], dv=q.shape[3], causal=False, scale=1.0, **problem)
        return attention._descriptors_fit(p, kind, q, q, q, q)

    x = torch.randn(2, 3, 20, 32, dtype=torch.float16)
    assert fits(x)
    assert not fits(x.float())  # 16-bit only
    assert not fits(x, attention.MASK_BOOL)
    assert not fits(x, window=(4, 0))
    assert not fits(x, dropout_p=0.1)
    assert not fits(x.transpose(2, 3).contiguous().transpose(2, 3))  # last stride not 1
    assert not fits(torch.randn(2, 3, 20, 4, dtype=torch.float16))  # rows of 8 bytes
    assert not fits(torch.randn(1, 3, 20, 32, dtype=torch.float16).expand(2, 3, 20, 32))  # stride 0
    assert not fits(torch.randn(2 * 3 * 20 * 32 + 1, dtype=torch.float16)[1:].view(2, 3, 20, 32))  # base
    assert not fits(torch.randn(2, 3, 0, 32, dtype=torch.float16))  # no rows: no descriptor


def test_a_descriptor_choice_is_not_reused_for_inputs_that_cannot_take_it(monkeypatch):
    """Autotuning remembers TMA for aligned inputs; the same sizes with a misaligned query then
    run without descriptors (the key says whether they fit)."""
    from gptkern.kernels import attention, autotune

    plain, tma = attention.AttnConfig(64, 64, 4, 1), attention.AttnConfig(64, 64, 4, 1, tma=True)
    fwd = (plain, attention.AttnConfig(32, 32, 4, 1), tma)  # two left when descriptors do not fit
    monkeypatch.setattr(attention, "configs", lambda kernel, *args: fwd if kernel == "fwd" else (plain,))
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    monkeypatch.setattr(autotune, "_cuda_time_ms", lambda fn: fn() or (1.0 if used else 2.0))
    used = []
    original = attention._descriptors
    monkeypatch.setattr(attention, "_descriptors", lambda *args: used.append(1) or original(*args))
    autotune.reset()
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float16) for _ in range(3))
    with gptkern.backend("triton"):
        gptkern.ops.scaled_dot_product_attention(q, k, v)
        assert used  # timed, and chosen
        used.clear()
        shifted = torch.randn(q.numel() + 1, dtype=torch.float16)[1:].view(q.shape)  # base not 16-byte aligned
        shifted.copy_(q)
        out = gptkern.ops.scaled_dot_product_attention(shifted, k, v)
    assert not used
    torch.testing.assert_close(out.double(), torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double()), atol=2e-3, rtol=2e-3)
    autotune.reset()


def test_the_backward_takes_descriptors_only_for_gradients_that_fit(monkeypatch):
    """``out.sum()`` hands the backward an expanded gradient (strides 0): dq and dK/dV then run
    without descriptors even where autotuning prefers them; a dense gradient takes them."""
    from gptkern.kernels import attention, autotune

    plain, tma = attention.AttnConfig(64, 64, 4, 1), attention.AttnConfig(64, 64, 4, 1, tma=True)
    monkeypatch.setattr(attention, "configs", lambda kernel, *args: (plain,) if kernel == "fwd" else (plain, tma))
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    used, timed = [], []  # kernels that took descriptors: all, and in the candidate being timed
    monkeypatch.setattr(autotune, "_cuda_time_ms", lambda fn: (timed.clear(), fn(), 1.0 if timed else 2.0)[-1])
    original = attention._descriptors
    monkeypatch.setattr(attention, "_descriptors",
                        lambda *args: used.append(args[2]) or timed.append(1) or original(*args))
    autotune.reset()
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    for grad_out in (None, torch.randn(1, 2, 40, 16, dtype=torch.float16)):
        with gptkern.backend("triton"):
            out = gptkern.ops.scaled_dot_product_attention(q, k, v)
            used.clear()
            grads = torch.autograd.grad(out.sum() if grad_out is None else out, (q, k, v), grad_out)
        assert sorted(set(used)) == ([] if grad_out is None else ["dkdv", "dq"])  # timed, then chosen
        ref = torch.nn.functional.scaled_dot_product_attention(*leaves)
        want = torch.autograd.grad(ref, leaves, torch.ones_like(ref) if grad_out is None else grad_out.double())
        for got, w in zip(grads, want):
            torch.testing.assert_close(got.double(), w, atol=1e-2, rtol=1e-2)
    autotune.reset()


def test_triton_declines_sequences_beyond_the_launch_grid():
    """A CUDA grid's second axis holds 65535 blocks: with the smallest row block (16) the Triton
    kernels stop at 1048560 rows, and `auto` moves such calls on (varlen: by max_seqlen, not the
    packed total)."""
    from types import SimpleNamespace

    from gptkern.ops import attention

    def tensor(rows):
        return SimpleNamespace(dtype=torch.float16, shape=(1, 2, rows, 64), device=torch.device("cuda", 0))

    limit = attention.MAX_TRITON_ROWS
    assert limit == 65535 * 16
    assert attention._triton_limits(tensor(limit), tensor(limit), False, 0.0) is None
    assert f"sequences of {limit + 1} rows" in attention._triton_limits(tensor(limit + 1), tensor(16), False, 0.0)
    assert f"sequences of {limit + 1} rows" in attention._triton_limits(tensor(16), tensor(limit + 1), False, 0.0)
    assert attention._triton_limits(tensor(16), tensor(limit + 1), False, 0.0, grad=False) is None  # keys: dK/dV's grid
    assert attention._triton_limits(tensor(limit + 1), tensor(16), False, 0.0, grad=False) is not None
    assert attention._triton_limits(tensor(limit + 1), tensor(limit + 1), False, 0.0, lengths=(4096, 4096)) is None
    cpu = SimpleNamespace(dtype=torch.float16, shape=(1, 2, limit + 1, 64), device=torch.device("cpu"))
    assert attention._triton_limits(cpu, cpu, False, 0.0) is None  # the interpreter has no such grid limit
    # offsets inside a tile are 32-bit: 127 rows times the row stride plus 255 columns (head dims to
    # 256) times the column stride, per tensor
    def why(*pairs):
        return attention._triton_limits(tensor(16), tensor(16), True, 0.0, tile_strides=pairs)

    row_limit = (2**31 - 1 - 255) // 127  # with a unit column stride
    assert why((64, 1), (row_limit, 1)) is None
    assert f"strides ({row_limit + 1}, 1)" in why((64, 1), (row_limit + 1, 1))
    # K given as the transpose of a (1, 1, D, S) buffer: its column stride S counts 255 times
    assert why((1, 8421505)) is not None  # 128 x 8421505 < 2**31, but a head dim of 256 reaches past
    assert why((1, (2**31 - 1 - 127) // 255)) is None
    assert why((2**23, 2**23)) is not None  # each below 2**31 / 128: their sum is not


def test_a_gradient_whose_strides_overflow_tile_offsets_is_made_contiguous():
    from gptkern.ops import attention

    base = torch.randint(0, 100, (2**25 + 3,), dtype=torch.int8)
    assert attention._fit_tile_offsets(base[:6].view(2, 3), -2).data_ptr() == base.data_ptr()  # kept as is
    wide = base.as_strided((2, 3), (2**25, 1))  # a row stride that 127 rows overflow
    fitted = attention._fit_tile_offsets(wide, -2)
    assert fitted.stride() == (3, 1) and torch.equal(fitted, wide)


def atomic_configs() -> list[tuple[int, int]]:
    """(block_m, block_n) of every atomic dQ candidate in the tables."""
    from gptkern.kernels import attention

    return sorted({c[:2] for widths in attention._ALTERNATIVES["dkdv"].values() for width in widths for c in width
                   if len(c) > 5 and c[5]})


def test_tables_have_atomic_dq_candidates():
    assert atomic_configs()


@pytest.mark.parametrize("block", atomic_configs(), ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_atomic_dq_backward_is_correct(block, causal, monkeypatch):
    """dQ added up atomically by the dK/dV kernel (no dQ kernel runs), through descriptors: L, S and
    head dims not block multiples, L != S, Dv != D, GQA (each KV program adds into GROUP heads),
    against float64, fp16 under the interpreter."""
    from gptkern.kernels import attention
    from test_attention import check as check_dense

    chosen = attention.AttnConfig(*block, 4, 1, tma=True, atomic_dq=True)
    monkeypatch.setattr(attention, "configs", lambda name, *args: (chosen if name == "dkdv" else
                                                                   attention.INTERPRETER_CONFIG,))
    launched = []
    for name in ("_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        original = getattr(attention, name)
        monkeypatch.setattr(attention, name, type("Recorder", (), {
            "__getitem__": lambda self, grid, name=name, original=original: launched.append(name) or original[grid]})())
    rand = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=torch.float16)  # noqa: E731
    q, k, v = rand(2, 4, 150, 24), rand(2, 2, 139, 24), rand(2, 2, 139, 40)
    check_dense("triton", q, k, v, is_causal=causal, enable_gqa=True)
    assert launched == ["_attn_bwd_dkdv_kernel"]  # dQ came from it alone

    def grads():  # the same fp32 sums in another order: equal to fp16 rounding (a scale off by 1% is not)
        with gptkern.backend("triton"):
            out = gptkern.ops.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    atomic = grads()
    monkeypatch.setattr(attention, "configs", lambda name, *args: (attention.INTERPRETER_CONFIG,))
    for got, want in zip(atomic, grads()):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("case", ["float mask", "varlen"])
def test_atomic_dq_never_serves_masks_or_varlen(case, monkeypatch):
    """The atomic dK/dV kernel writes a dense dQ and no mask gradient: a table offering it (here
    first, without descriptors) is passed over for a float mask (its gradient too) and for varlen."""
    from gptkern.kernels import attention

    atomic = attention.AttnConfig(32, 16, 4, 1, atomic_dq=True)
    monkeypatch.setattr(attention, "configs", lambda name, *args: (atomic, attention.INTERPRETER_CONFIG)
                        if name == "dkdv" else (attention.INTERPRETER_CONFIG,))
    if case == "varlen":
        check_varlen("triton", torch.float16, [7, 13], [9, 11], causal=True)
        return
    leaves = [torch.randn(shape, device=DEVICE, dtype=torch.float16, requires_grad=True)
              for shape in ((1, 2, 33, 16), (1, 2, 33, 16), (1, 2, 33, 16), (1, 2, 33, 33))]
    with gptkern.backend("triton"):
        out = gptkern.ops.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves[:3], attn_mask=ref_leaves[3])
    for got, want in zip(grads, torch.autograd.grad(ref, ref_leaves, g.double())):  # dq, dk, dv, dmask
        torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("d", [64, 128])
def test_the_gpu_test_forces_every_candidate_of_every_kernel(d):
    """tests/test_gpu_attention.py forces each Hopper candidate in turn (forced_config_runs): every
    one of every kernel runs there, the dQ ones too when paired with an atomic dK/dV (which runs
    no dQ kernel)."""
    from gptkern.kernels import attention
    from helpers import forced_config_runs

    per_kernel = {name: attention.configs(name, d, d, False, attention.PLAIN, (9, 0)) for name in ("fwd", "dq", "dkdv")}
    ran = {(name, run[name]) for run in forced_config_runs(per_kernel) for name in ("fwd", "dkdv")}
    ran |= {("dq", run["dq"]) for run in forced_config_runs(per_kernel) if not run["dkdv"].atomic_dq}
    assert ran == {(name, c) for name, cs in per_kernel.items() for c in cs}
    assert any(c.atomic_dq for c in per_kernel["dkdv"])


def test_atomic_dq_is_timed_as_a_whole_backward_and_never_deterministic(monkeypatch):
    """With atomic candidates, the dQ kernel is tuned first and every plain dK/dV candidate is timed
    together with it, against the atomic one alone; torch's deterministic mode never gets the atomic
    path (autotuning is off there and the candidates drop it)."""
    from gptkern.kernels import attention, autotune

    plain, atomic = attention.AttnConfig(64, 64, 4, 1, tma=True), attention.AttnConfig(64, 64, 4, 1, tma=True,
                                                                                        atomic_dq=True)
    monkeypatch.setattr(attention, "configs", lambda kernel, *args: (attention.INTERPRETER_CONFIG,) if kernel == "fwd"
                        else (plain, atomic) if kernel == "dkdv" else (plain,))
    monkeypatch.setattr(autotune, "enabled", lambda device: not torch.are_deterministic_algorithms_enabled())
    runs, launched = [], []  # the kernels of each timed run; every launch
    monkeypatch.setattr(autotune, "_cuda_time_ms", lambda fn: (runs.append([]), fn(), 1.0 if len(runs[-1]) == 1
                                                               else 2.0)[-1])
    for name in ("_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        original = getattr(attention, name)
        monkeypatch.setattr(attention, name, type("Recorder", (), {
            "__getitem__": lambda self, grid, name=name, original=original:
            launched.append(name) or (runs[-1].append(name) if runs else None) or original[grid]})())
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 2, 40, 16, dtype=torch.float16)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves)
    want = torch.autograd.grad(ref, leaves, g.double())
    for deterministic in (False, True):
        autotune.reset()
        runs.clear()
        launched.clear()
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda d=deterministic: d)
        with gptkern.backend("triton"):
            out = gptkern.ops.scaled_dot_product_attention(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), g)
        for got, w in zip(grads, want):
            torch.testing.assert_close(got.double(), w, atol=1e-2, rtol=1e-2)
        if deterministic:
            assert runs == [] and launched == ["_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]  # the plain default
        else:  # dq alone (one candidate: not timed), then plain dK/dV + dQ, then atomic dK/dV alone (and
            # once more, as the choice)
            assert runs == [["_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"], ["_attn_bwd_dkdv_kernel"] * 2]
            assert any(cfg == repr(atomic) for cfg in autotune.choices().values())
    autotune.reset()


def test_gpus_with_less_shared_memory_get_smaller_tiles():
    """Hopper's tables (alternatives too) on sm_90 and B200's sm_100, whose multiprocessors have 228 KB
    of shared memory; one smaller default elsewhere (Ampere, Ada, consumer Blackwell sm_120)."""
    from gptkern.kernels import attention

    hopper = attention.configs("fwd", 128, 128, False, attention.PLAIN, (9, 0))
    assert len(hopper) > 1 and attention.configs("fwd", 128, 128, False, attention.PLAIN, (10, 0)) == hopper
    for capability in ((8, 0), (8, 9), (12, 0)):
        (small,) = attention.configs("fwd", 128, 128, False, attention.PLAIN, capability)
        assert small.block_n <= 32 and small.num_stages <= 2 and not small.tma
