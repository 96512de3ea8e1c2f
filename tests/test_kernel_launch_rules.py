"""The Python side of the Triton kernel layer, each rule checked alone
(launch heuristics, autotuning, attention configurations and tune keys, decode launch sizing, op
argument checks). CPU only: nothing here launches a kernel except the decode key test (interpreter)."""
import pytest
import torch

import gptkern
from gptkern.kernels import attention, autotune, decode, launch
from gptkern.ops import _checks
import test_autotune
from helpers import StandInKernel

CPU = torch.device("cpu")


fresh_choices = test_autotune.fresh_choices  # autouse: no remembered choice leaks between tests


# --- launch.py -------------------------------------------------------------------------------------

def test_fp32_rows_keep_the_norm_forward_fp32_cap():
    """NORM_FWD caps 4-byte rows at 16384 (its fp32 fused kernel spills above): a 32768-wide fp32 row
    is looped, the same row in 16-bit is fused."""
    assert launch.NORM_FWD.max_fused(True, 4) == 16384
    assert launch.NORM_FWD.max_fused(True, 2) == 32768
    assert launch.row_block(launch.NORM_FWD, 32768, True, 4) == (launch.LOOP_BLOCK, False)
    assert launch.row_block(launch.NORM_FWD, 32768, True, 2) == (32768, True)
    assert launch.row_block(launch.NORM_FWD, 16384, True, 4) == (16384, True)


@pytest.mark.parametrize("kind", [launch.SOFTMAX_FWD, launch.SOFTMAX_BWD, launch.NORM_FWD, launch.NORM_BWD])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_a_row_exactly_at_the_fused_limit_is_fused(kind, aligned, elem_bytes):
    limit = kind.max_fused(aligned, elem_bytes)
    assert launch.row_block(kind, limit, aligned, elem_bytes) == (limit, True)
    assert launch.row_block(kind, limit + 1, aligned, elem_bytes) == (min(launch.LOOP_BLOCK, limit), False)
    assert launch.row_block(kind, 3, aligned, elem_bytes) == (launch.MIN_BLOCK, True)


def test_fused_cap_also_bounds_the_looped_tile(monkeypatch):
    """Tests lower FUSED_CAP to run the looped kernels over several tiles of a short row: the tile is
    the cap, not LOOP_BLOCK (which would hold the whole row in one pass)."""
    monkeypatch.setattr(launch, "FUSED_CAP", 32)
    assert launch.row_block(launch.SOFTMAX_FWD, 100, True, 2) == (32, False)
    assert launch.row_block(launch.NORM_BWD, 100, False, 4) == (32, False)
    assert launch.row_block(launch.SOFTMAX_FWD, 32, True, 2) == (32, True)


def test_is_aligned_needs_n_pointers_and_strides_multiples_of_16():
    t = torch.empty(256)
    assert t.data_ptr() % 16 == 0
    assert launch.is_aligned(32, t, 64)
    assert not launch.is_aligned(24, t, 64)   # n
    assert not launch.is_aligned(32, t, 24)   # a stride
    assert not launch.is_aligned(32, t[1:])   # a pointer 4 bytes past alignment
    assert launch.is_aligned(0)


def test_tune_fused_rows_times_aligned_and_unaligned_launches_apart(monkeypatch):
    """Triton specializes aligned launches (16-byte hints) into other code: a choice timed for an
    aligned launch is not reused for an unaligned one with the same kernel, sizes and block."""
    kernel = StandInKernel()
    launched = kernel.launched
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    timed = []

    def timer(fn):
        fn()
        timed.append(launched[-1])
        return {32: 3.0, 16: 1.0, 8: 2.0}[launched[-1]]

    monkeypatch.setattr(autotune, "_cuda_time_ms", timer)
    kind = launch.SOFTMAX_FWD
    assert kind.warp_choices(8192, True, True, 2) == (32, 16, 8)
    assert kind.warp_choices(8192, True, False, 2) == (32, 16)
    common = (kernel, (64,), (), {"BLOCK_N": 8192}, True)
    assert launch.tune_fused_rows(kind, *common, True, 2, ("k",), CPU) == 16
    assert timed == [32, 16, 8]
    assert launch.tune_fused_rows(kind, *common, False, 2, ("k",), CPU) == 16
    assert timed == [32, 16, 8, 32, 16]  # timed again for the unaligned launch
    assert len(autotune.choices()) == 2


def test_reduction_programs_stay_within_the_rows(monkeypatch):
    assert [launch.reduction_programs(CPU, n) for n in (0, 1, 3, 4, 1000)] == [1, 1, 3, 4, 4]
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert launch.reduction_programs(cuda, 7) == 7
    assert launch.reduction_programs(cuda, 100_000) == 4 * 132
    # programs of few warps: about 40 warps of them an SM (at most 32 programs), 16 rows each at least,
    # never fewer than 4 an SM
    per_sm = {16: 4, 8: 4, 4: 10, 2: 20, 1: 32}
    assert {w: launch.reduction_programs(cuda, 10**6, w) for w in per_sm} == {w: n * 132 for w, n in per_sm.items()}
    assert launch.reduction_programs(cuda, 16 * 1000, 1) == 1000
    assert launch.reduction_programs(cuda, 16 * 100, 1) == 4 * 132
    assert launch.reduction_programs(CPU, 1000, 1) == 4  # the interpreter: few


# --- autotune.py -----------------------------------------------------------------------------------

def test_a_choice_is_kept_per_device(monkeypatch):
    """Two GPUs (perhaps of different kinds) time the same key each for themselves."""
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timed = []
    speeds = {0: {"a": 1.0, "b": 2.0}, 1: {"a": 2.0, "b": 1.0}}
    current = [0]

    def timer(fn):
        fn()
        return speeds[current[0]][timed[-1]]

    run = timed.append
    assert autotune.pick("k", ["a", "b"], run, torch.device("cuda", 0), timer) == "a"
    current[0] = 1
    assert autotune.pick("k", ["a", "b"], run, torch.device("cuda", 1), timer) == "b"
    assert timed == ["a", "b", "a", "b"] and len(autotune.choices()) == 2
    assert autotune.pick("k", ["a", "b"], run, torch.device("cuda", 0), timer) == "a" and len(timed) == 4


# --- attention.py ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_head_dims_take_the_table_of_their_padded_width(kernel):
    """Head dims up to 64 take the first column of the tables, 65 to 128 (padded to 128) the second,
    above that the third."""
    def expected(width):
        default = attention._CONFIGS[kernel][(False, attention.PLAIN)][width]
        alternatives = attention._ALTERNATIVES[kernel][(False, attention.PLAIN)][width] if width < 2 else ()
        return tuple(attention.AttnConfig(*c) for c in (default, *alternatives))

    for d, width in ((16, 0), (64, 0), (65, 1), (80, 1), (128, 1), (129, 2), (256, 2)):
        assert attention.configs(kernel, d, d, False, attention.PLAIN, (9, 0)) == expected(width), d
    assert attention.configs(kernel, 64, 128, False, attention.PLAIN, (9, 0)) == expected(1)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (12, 0)])
def test_smaller_gpus_get_tiles_within_their_limits(capability):
    """Less shared memory than Hopper: one default of at most 64 x 32 on at most 4 warps and 2 stages."""
    for kernel in ("fwd", "dq", "dkdv"):
        for d in (16, 64, 128):
            for fp32 in (False, True):
                for weight in (attention.PLAIN, attention.MASKED, attention.DROPOUT):
                    if attention.unsupported(d, d, fp32, weight):
                        continue
                    (cfg,) = attention.configs(kernel, d, d, fp32, weight, capability)
                    assert cfg.block_m <= 64 and cfg.block_n <= 32, (kernel, d, fp32, weight, cfg)
                    assert cfg.num_warps <= 4 and cfg.num_stages <= 2, (kernel, d, fp32, weight, cfg)
                    assert not cfg.tma and not cfg.atomic_dq


def test_delta_kernel_rows_hold_about_2048_elements():
    assert [attention.delta_block_m(dv) for dv in (1, 16, 32, 33, 64, 128, 256)] == [64, 64, 64, 32, 32, 16, 16]


def test_head_block_pads_to_a_power_of_two_of_at_least_16():
    """tl.dot needs K >= 16: small head dims are padded to 16."""
    assert [attention.head_block(d) for d in (1, 4, 8, 15, 16, 17, 80, 128, 129)] == \
        [16, 16, 16, 16, 16, 32, 128, 128, 256]


def _problem(**changes):
    base = dict(batch=2, heads=8, kv_heads=8, l=100, s=100, d=64, dv=64, causal=False, scale=0.125)
    return attention.Problem(**{**base, **changes})


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_tune_key_tells_apart_what_the_choice_depends_on(kernel):
    """Each thing the best configuration depends on changes the key: flags (causal, window, dropout,
    mask kind, descriptors), dtype, head dims and sizes (batch-heads, query and key rows, GQA group)."""
    q = torch.empty(1, dtype=torch.float16)

    def key(problem, tensor=q, kind=attention.MASK_NONE, descriptors=False):
        return attention._tune_key(kernel, problem, tensor, kind, descriptors)

    base = key(_problem())
    variants = {
        "causal": key(_problem(causal=True)),
        "window": key(_problem(window=(8, 0))),
        "dropout": key(_problem(dropout_p=0.1)),
        "mask": key(_problem(), kind=attention.MASK_BOOL),
        "descriptors": key(_problem(), descriptors=True),
        "dtype": key(_problem(), tensor=q.float()),
        "d": key(_problem(d=32)),
        "dv": key(_problem(dv=32)),
        "batch": key(_problem(batch=8)),
        "l": key(_problem(l=1000)),
        "s": key(_problem(s=1000)),
        "group": key(_problem(heads=8, kv_heads=2, batch=8) if kernel == "dkdv" else _problem(kv_heads=2)),
    }
    assert {name for name, k in variants.items() if k == base} == set()
    assert key(_problem(l=120, s=127)) == base  # the same power-of-two bucket


def test_deterministic_mode_drops_atomic_dq_candidates(monkeypatch):
    """The atomic dQ path sums in a varying order: torch's deterministic mode never gets it, even
    where descriptors fit and a table put it first."""
    atomic = attention.AttnConfig(64, 64, 4, 1, tma=True, atomic_dq=True)
    plain = attention.AttnConfig(64, 64, 4, 1, tma=True)
    monkeypatch.setattr(attention, "configs", lambda *args: (atomic, plain))
    tensors = [torch.randn(1, 2, 32, 16, dtype=torch.float16) for _ in range(6)]
    p = attention.Problem(batch=1, heads=2, kv_heads=2, l=32, s=32, d=16, dv=16, causal=False, scale=0.25)
    candidates, fit = attention._candidates("dkdv", p, attention.MASK_NONE, *tensors)
    assert fit and candidates == (atomic, plain)
    torch.use_deterministic_algorithms(True)
    try:
        candidates, fit = attention._candidates("dkdv", p, attention.MASK_NONE, *tensors)
    finally:
        torch.use_deterministic_algorithms(False)
    assert fit and candidates == (plain,)


def test_dropout_sets_the_work_per_score_even_with_a_mask():
    """Dropout keeps the most registers live: with a mask too, the DROPOUT tables (as the routing in
    gptkern/ops/attention.py assumes), not the MASKED ones."""
    with_dropout = _problem(dropout_p=0.1)
    assert with_dropout.weight(attention.MASK_BOOL) == attention.DROPOUT
    assert with_dropout.weight(attention.MASK_FLOAT) == attention.DROPOUT
    assert with_dropout.weight(attention.MASK_NONE) == attention.DROPOUT
    assert _problem().weight(attention.MASK_BOOL) == attention.MASKED
    assert _problem().weight(attention.MASK_NONE) == attention.PLAIN


# --- decode.py -------------------------------------------------------------------------------------

def test_decode_launch_config_tiles():
    """Rows: 16 for fp32 whatever the group; 16-bit up to 64 (32 at head dim 256). Keys: a K tile of
    about 32 elements a thread, half that for fp32."""
    fp16, fp32 = (decode.launch_config(32, 1, 64, 64, 0, f) for f in (False, True))
    assert (fp16.block_m, fp16.block_n, fp16.num_warps) == (32, 64, 4)
    assert (fp32.block_m, fp32.block_n, fp32.num_warps) == (16, 32, 4)
    one = decode.launch_config(1, 1, 64, 64, 0, True)
    assert (one.block_m, one.block_n) == (16, 32)
    big = decode.launch_config(16, 4, 128, 128, 16, False)
    assert (big.block_m, big.block_n, big.num_warps) == (64, 64, 8)
    wide = decode.launch_config(16, 4, 256, 256, 0, False)
    assert (wide.block_m, wide.block_n, wide.num_warps) == (32, 32, 8)


def test_decode_splits_on_a_gpu(monkeypatch):
    """fill times the GPU's multiprocessors in programs, at most one split per key block, at most 64
    splits (the combine kernel's largest checked tile)."""
    monkeypatch.setattr(decode, "sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert decode._num_splits(16, 1 << 20, 64, cuda, fill=2) == 17
    assert decode._num_splits(16, 1 << 20, 64, cuda, fill=4) == 33
    assert decode._num_splits(1, 1 << 20, 64, cuda) == 64
    assert decode._num_splits(1, 100, 64, cuda) == 2
    assert decode._num_splits(1000, 1 << 20, 64, cuda) == 1
    assert decode._num_splits(1, 10_000, 64, CPU) == 4


def test_full_cache_view_of_an_empty_pool_keeps_the_lengths():
    """A paged cache with no pool blocks: timing must not read blocks that do not exist."""
    seqlens = torch.zeros(2, dtype=torch.int32)
    table = torch.zeros(2, 3, dtype=torch.int32)
    got_lengths, got_table = decode._full_cache_view(seqlens, table, 0, 48)
    assert got_lengths.tolist() == [0, 0] and got_table.tolist() == table.tolist()
    full_lengths, full_table = decode._full_cache_view(seqlens, table, 4, 48)
    assert full_lengths.tolist() == [48, 48] and full_table.tolist() == [[0, 1, 2], [3, 0, 1]]


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_decode_choice_is_kept_per_capacity_bucket(monkeypatch):
    """A cache in another power-of-two capacity bucket is timed again."""
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    timed = []
    monkeypatch.setattr(autotune, "_cuda_time_ms", lambda fn: (fn(), timed.append(1), 1.0)[-1])
    q = torch.randn(1, 2, 1, 16, dtype=torch.float16)
    seqlens = torch.tensor([5], dtype=torch.int32)
    with gptkern.backend("triton"):
        for capacity in (40, 48, 200):
            k = torch.randn(1, 1, capacity, 16, dtype=torch.float16)
            gptkern.ops.decode_attention(q, k, k, seqlens)
            if capacity == 40:
                first = len(timed)
    assert first > 1 and len(timed) == 2 * first and len(autotune.choices()) == 2


# --- ops/_checks.py --------------------------------------------------------------------------------

def test_kernel_seed_refuses_a_bool_seed():
    with pytest.raises(RuntimeError, match="needs seed"):
        _checks.kernel_seed(torch.tensor([True]), 0.1, CPU, "triton_attention")
    assert _checks.kernel_seed(torch.tensor([3], dtype=torch.int32), 0.1, CPU, "op").dtype == torch.int64


def test_int_arg_refuses_a_bool_tensor():
    with pytest.raises(TypeError, match="argument 'dim' must be int"):
        _checks.int_arg(torch.tensor(True), "dim", "softmax")
    with pytest.raises(TypeError, match="argument 'dim' must be int"):
        _checks.wrap_dim(torch.tensor(False), 2)
    assert _checks.int_arg(torch.tensor(-1), "dim", "softmax") == -1
