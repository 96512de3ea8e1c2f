"""First-call autotuning (gptkern/kernels/autotune.py): the choice, its cache, and the attention
launchers using it. On the CPU the timer is faked and the candidates run under the interpreter."""
import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.kernels import autotune
from helpers import TOLERANCES, poisoned_allocations

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_choices():
    autotune.reset()
    yield
    autotune.reset()


LAUNCHED: list = []  # the candidates run() launched, in order


def run(cfg):
    LAUNCHED.append(cfg)


def candidates(*names):
    return list(names)


def fake_timer(times: dict):
    """A timer that runs the launch and returns times[candidate] of the candidate it launched
    (None: the launch fails), with the list of candidates it timed."""
    calls = []

    def timer(fn):
        fn()
        cfg = LAUNCHED[-1]
        calls.append(cfg)
        if times[cfg] is None:
            raise RuntimeError("out of resources")
        return times[cfg]

    return timer, calls


def test_pick_times_each_candidate_once_and_keeps_the_fastest(monkeypatch):
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    cands = candidates("a", "b", "c")
    timer, calls = fake_timer({"a": 3.0, "b": 1.0, "c": 2.0})
    assert autotune.pick("k", cands, run, CPU, timer) == "b"
    assert calls == ["a", "b", "c"]
    assert autotune.pick("k", cands, run, CPU, timer) == "b" and len(calls) == 3  # remembered
    assert autotune.pick("other", cands, run, CPU, timer) == "b" and len(calls) == 6  # a new key is timed
    assert list(autotune.choices().values()) == ["'b'", "'b'"]


def test_failing_candidates_are_dropped_and_all_failing_raises(monkeypatch):
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    cands = candidates("big", "small")
    timer, _ = fake_timer({"big": None, "small": 5.0})
    assert autotune.pick("k1", cands, run, CPU, timer) == "small"
    timer, _ = fake_timer({"big": None, "small": None})
    with pytest.raises(RuntimeError, match="out of resources"):
        autotune.pick("k2", cands, run, CPU, timer)


def test_off_or_single_candidate_takes_the_first_without_timing(monkeypatch):
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    cands = candidates("a", "b")
    assert not autotune.enabled(CPU)
    assert autotune.pick("k", cands, run, CPU, timer) == "a"  # CPU: off
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    assert autotune.pick("k", ["a"], run, CPU, timer) == "a"
    assert calls == [] and autotune.choices() == {}


def test_env_switch(monkeypatch):
    monkeypatch.setenv("GPTKERN_AUTOTUNE", "0")
    assert not autotune.enabled(torch.device("cuda"))
    monkeypatch.setenv("GPTKERN_AUTOTUNE", "1")
    assert autotune.enabled(torch.device("cuda"))
    assert not autotune.enabled(CPU)
    torch.use_deterministic_algorithms(True)
    try:  # bit-reproducible runs: always the default configuration
        assert not autotune.enabled(torch.device("cuda"))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
def test_attention_launchers_tune_and_stay_correct(monkeypatch):
    """Forward, dK/dV and dQ each time every candidate, launch the fastest (here the last one),
    and give correct outputs whichever was timed last."""
    from gptkern.kernels import attention

    cands = tuple(attention.AttnConfig(m, n, 4, 1) for m, n in ((16, 32), (32, 16), (64, 64)))
    monkeypatch.setattr(attention, "configs", lambda *args: cands)
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    launched = []
    original_launch = attention.AttnConfig.launch

    def recorded_launch(self):
        launched.append(self)
        return original_launch(self)

    monkeypatch.setattr(attention.AttnConfig, "launch", recorded_launch)
    speed = {cands[0]: 3.0, cands[1]: 2.0, cands[2]: 1.0}

    def timer(fn):
        before = len(launched)
        fn()
        return speed[launched[before]]

    monkeypatch.setattr(autotune, "_cuda_time_ms", timer)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    with gptkern.backend("triton"), poisoned_allocations():
        out = gptkern.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    # fwd, dkdv, dq: three timed candidates, then the chosen one
    assert launched == [*cands, cands[2]] * 3
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (qd, kd, vd))):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert len(autotune.choices()) == 3
    launched.clear()
    with gptkern.backend("triton"):
        gptkern.ops.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert launched == [cands[2]]  # remembered: no timing on the second call


def test_graph_capture_uses_the_choice_made_before(monkeypatch):
    """Timing syncs, which a CUDA graph capture forbids: during one, the remembered choice (as
    torch.compile's cudagraphs capture after an eager warm-up), else the default."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cands = candidates("a", "b")
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    capturing[0] = True
    assert autotune.pick("new", cands, run, cuda, timer) == "a" and calls == []
    capturing[0] = False
    assert autotune.pick("k", cands, run, cuda, timer) == "b"
    capturing[0] = True
    assert autotune.pick("k", cands, run, cuda, timer) == "b" and len(calls) == 2


def test_a_remembered_choice_no_longer_offered_is_timed_again(monkeypatch):
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    cands = candidates("a", "b", "c")
    timer, calls = fake_timer({"a": 3.0, "b": 1.0, "c": 2.0})
    assert autotune.pick("k", cands, run, CPU, timer) == "b"
    assert autotune.pick("k", ["a", "c"], run, CPU, timer) == "c" and calls[3:] == ["a", "c"]


def test_row_kernels_tune_their_warps_and_stay_correct(monkeypatch):
    """The fused softmax (forward, backward) and norm forward kernels time each warp count of
    warp_choices (default first), launch the fastest (here the last timed), give correct outputs."""
    from gptkern.kernels import launch
    from gptkern.ops.reference import layer_norm_ref, softmax_ref

    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    timed = []

    def timer(fn):
        fn()
        timed.append(len(timed))
        return 10.0 - len(timed)  # each candidate faster than the one before

    monkeypatch.setattr(autotune, "_cuda_time_ms", timer)
    x = (3 * torch.randn(5, 1024)).requires_grad_()
    w, b = torch.randn(1024), torch.randn(1024)
    g = torch.randn(5, 1024)
    with gptkern.backend("triton"), poisoned_allocations():
        y = gptkern.ops.softmax(x, -1)
        (dx,) = torch.autograd.grad(y, x, g)
        z = gptkern.ops.layer_norm(x.detach(), (1024,), w, b)
    xd = x.detach().double().requires_grad_()
    ref = softmax_ref(xd, -1)
    torch.testing.assert_close(y.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx.double(), torch.autograd.grad(ref, xd, g.double())[0], atol=1e-5, rtol=1e-4)
    x = x.detach()
    torch.testing.assert_close(z.double(), layer_norm_ref(x.double(), (1024,), w.double(), b.double()),
                               atol=1e-5, rtol=1e-5)
    kinds = {"_softmax_fwd_kernel": launch.SOFTMAX_FWD, "_softmax_bwd_kernel": launch.SOFTMAX_BWD,
             "_norm_fwd_kernel": launch.NORM_FWD}
    choices = {name: kind.warp_choices(1024, True, True, 4) for name, kind in kinds.items()}
    assert all(len(c) > 1 for c in choices.values())
    assert len(timed) == sum(len(c) for c in choices.values())
    chosen = autotune.choices()
    assert len(chosen) == 3
    for name, c in choices.items():
        assert [warps for key, warps in chosen.items() if name in key] == [repr(c[-1])]


def test_norm_backward_tunes_its_prefetch_and_launches_the_pick_last(monkeypatch):
    """The Triton norm backward times its kernel without and with the next row's early loads
    (default first), launches the faster once more, remembers it per key, and stays correct."""
    from gptkern.kernels import norms
    from gptkern.ops.reference import layer_norm_ref

    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    kernel, launched = norms._norm_bwd_kernel, []

    class Recorder:
        fn = kernel.fn

        def __getitem__(self, grid):
            def launch(*args, PREFETCH, **kwargs):
                launched.append(PREFETCH)
                kernel[grid](*args, PREFETCH=PREFETCH, **kwargs)
            return launch

    monkeypatch.setattr(norms, "_norm_bwd_kernel", Recorder())

    def timer(fn):  # the prefetch faster (other kernels' timings: any)
        before = len(launched)
        fn()
        return 2.0 - launched[-1] if len(launched) > before else 1.0

    monkeypatch.setattr(autotune, "_cuda_time_ms", timer)
    x = (3 * torch.randn(6, 96)).requires_grad_()
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    g = torch.randn(6, 96)
    for _ in range(2):
        with gptkern.backend("triton"), poisoned_allocations():
            grads = torch.autograd.grad(gptkern.ops.layer_norm(x, (96,), w, b), (x, w, b), g)
    assert launched == [False, True, True, True]  # timed both, launched the pick; then remembered
    assert [c for k, c in autotune.choices().items() if "_norm_bwd_kernel" in k] == ["True"]
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(layer_norm_ref(leaves[0], (96,), *leaves[1:]), leaves, g.double())
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_warp_choices_keep_to_what_the_largest_block_holds():
    """Fewer warps only up to the elements a thread holds at the kind's largest fused block; the
    looped kernels and the untuned kinds keep their one count."""
    from gptkern.kernels import launch

    for kind in (launch.SOFTMAX_FWD, launch.SOFTMAX_BWD, launch.NORM_FWD):
        for aligned in (True, False):
            for elem_bytes in (2, 4):
                limit = kind.max_fused(aligned, elem_bytes)
                most = limit // (32 * kind.warps(limit))
                block = 16
                while block <= limit:
                    choices = kind.warp_choices(block, True, aligned, elem_bytes)
                    assert choices[0] == kind.warps(block) and len(set(choices)) == len(choices) <= 3
                    assert all(block // (32 * w) <= max(most, block // (32 * choices[0])) for w in choices)
                    block *= 2
    assert launch.SOFTMAX_FWD.warp_choices(8192, True, True, 2) == (32, 16, 8)
    assert launch.SOFTMAX_FWD.warp_choices(4096, False, True, 2) == (launch.SOFTMAX_FWD.loop_warps,)
    assert launch.NORM_BWD.warp_choices(4096, True, True, 2) == (launch.NORM_BWD.warps(4096),)


def test_decode_kernel_tunes_stages_splits_and_key_blocks_and_stays_correct(monkeypatch):
    """Triton decode attention times each (config, splits) candidate, default first, launches the
    fastest (here the last timed) and gives the reference's output, static and paged."""
    from gptkern.kernels import decode
    from gptkern.ops.reference import decode_attention_ref

    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    timed = []

    def timer(fn):
        fn()
        timed.append(len(timed))
        return 10.0 - len(timed)

    monkeypatch.setattr(autotune, "_cuda_time_ms", timer)
    q = torch.randn(2, 4, 1, 16, dtype=torch.float16)  # 16-bit: float32 tries no more stages
    k, v = torch.randn(2, 2, 40, 16, dtype=torch.float16), torch.randn(2, 2, 40, 16, dtype=torch.float16)
    seqlens = torch.tensor([40, 7], dtype=torch.int32)
    with gptkern.backend("triton"), poisoned_allocations():
        out = gptkern.ops.decode_attention(q, k, v, seqlens)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), seqlens, 0.25)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float16])
    cfg = decode.launch_config(2, 1, 16, 16, 0, False)
    candidates = decode.launch_candidates(cfg)
    assert candidates[0] == (cfg, 2)  # (config, GPU fill): the default first
    assert len(candidates) == 6 and len(timed) == 6
    assert [(c.block_n, c.num_stages, fill) for c, fill in candidates] == \
        [(64, 1, 2), (64, 2, 2), (64, 3, 2), (64, 2, 4), (128, 3, 2), (128, 3, 4)]
    (chosen,) = autotune.choices().values()
    assert chosen == repr(candidates[-1])
    # another capacity in the same power-of-two bucket reuses the choice: no timing
    with gptkern.backend("triton"):
        gptkern.ops.decode_attention(q, torch.cat([k, k[:, :, :8]], 2), torch.cat([v, v[:, :, :8]], 2), seqlens)
    assert len(timed) == 6
    # paged: blocks of 8 tokens, sequence b's i-th block at b * 5 + i
    kp = k.view(2, 2, 5, 8, 16).permute(0, 2, 1, 3, 4).reshape(10, 2, 8, 16)
    vp = v.view(2, 2, 5, 8, 16).permute(0, 2, 1, 3, 4).reshape(10, 2, 8, 16)
    table = torch.arange(10, dtype=torch.int32).view(2, 5)
    with gptkern.backend("triton"), poisoned_allocations():
        out_paged = gptkern.ops.decode_attention(q, kp, vp, seqlens, block_table=table)
    torch.testing.assert_close(out_paged.double(), ref, **TOLERANCES[torch.float16])
    assert len(timed) == 12 and len(autotune.choices()) == 2  # the page size is in the key
    assert decode.launch_candidates(cfg, fp32=True) == ((cfg, 2), (cfg, 4))


def test_decode_candidates_with_other_split_counts_stay_correct(monkeypatch):
    """Each candidate sizes its partials and its combine from its own split count (here 1 for the
    default and 3 for the fuller grid), over ragged lengths including 0 and 1."""
    from gptkern.kernels import decode
    from gptkern.ops.reference import decode_attention_ref

    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    monkeypatch.setattr(decode, "_num_splits", lambda bh, cap, block_n, device, fill=2: fill - 1)
    q = torch.randn(3, 4, 1, 16, dtype=torch.float16)
    k, v = torch.randn(3, 2, 70, 16, dtype=torch.float16), torch.randn(3, 2, 70, 16, dtype=torch.float16)
    seqlens = torch.tensor([70, 0, 1], dtype=torch.int32)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), seqlens, 0.25)
    for best in (0, 3):  # the default (1 split) chosen, then the fuller grid (3 splits)
        autotune.reset()
        monkeypatch.setattr(autotune, "_cuda_time_ms", lambda fn, best=best: (fn(), 1.0)[1]
                            if len(launched) != best else (fn(), 0.5)[1])
        launched = []
        original = decode._decode_split_kernel

        class Recorder:
            def __getitem__(self, grid):
                launched.append(grid[1])
                return original[grid]

        monkeypatch.setattr(decode, "_decode_split_kernel", Recorder())
        with gptkern.backend("triton"), poisoned_allocations():
            out = gptkern.ops.decode_attention(q, k, v, seqlens)
        torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float16])
        assert launched == [1, 1, 1, 3, 1, 3, 1 if best == 0 else 3]  # the splits of each run, the pick last
        monkeypatch.setattr(decode, "_decode_split_kernel", original)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_timing_reads_the_whole_capacity(monkeypatch, paged):
    """The choice is kept per capacity bucket and is made on the first decode step, when the cache
    holds about the prompt: timing runs see every sequence filled to the capacity (a paged table of
    distinct pool blocks in range), and the chosen launch then runs on the real lengths."""
    from gptkern.kernels import decode
    from gptkern.ops.reference import decode_attention_ref

    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    monkeypatch.setattr(autotune, "_cuda_time_ms", lambda fn: (fn(), 1.0)[1])
    q = torch.randn(2, 4, 1, 16, dtype=torch.float16)
    k, v = torch.randn(2, 2, 48, 16, dtype=torch.float16), torch.randn(2, 2, 48, 16, dtype=torch.float16)
    seqlens = torch.tensor([5, 1], dtype=torch.int32)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), seqlens, 0.25)
    table = None
    if paged:  # 3 pool blocks of 16 tokens; sequence 1 holds block 2 only, its other entries unset
        k = k[:1].view(1, 2, 3, 16, 16).permute(0, 2, 1, 3, 4).reshape(3, 2, 16, 16)
        v = v[:1].view(1, 2, 3, 16, 16).permute(0, 2, 1, 3, 4).reshape(3, 2, 16, 16)
        table = torch.tensor([[0, 1, 2], [2, -7, 99]], dtype=torch.int32)
        ref = decode_attention_ref(q.double(), k[[0, 2]].double(), v[[0, 2]].double(), seqlens, 0.25)
    seen = []
    original = decode._decode_split_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((args[3].tolist(), args[4].tolist() if paged else None))
                return original[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(decode, "_decode_split_kernel", Recorder())
    with gptkern.backend("triton"), poisoned_allocations():
        out = gptkern.ops.decode_attention(q, k, v, seqlens, block_table=table)
    candidates = decode.launch_candidates(decode.launch_config(2, 1, 16, 16, 16 if paged else 0, False))
    assert len(seen) == len(candidates) + 1
    for lengths, timing_table in seen[:-1]:
        assert lengths == [48, 48]
        if paged:
            assert timing_table == [[0, 1, 2], [0, 1, 2]]  # in range of the 3-block pool
    assert seen[-1] == ([5, 1], table.tolist() if paged else None)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float16])


def test_tune_fused_rows_launches_the_pick_last(monkeypatch):
    """Every warp count is timed, then the fastest is launched once more (the interpreter ignores
    num_warps, so the launches are recorded from a stand-in kernel)."""
    from gptkern.kernels import launch
    from helpers import StandInKernel

    kernel = StandInKernel()
    launched = kernel.launched
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    choices = launch.SOFTMAX_FWD.warp_choices(8192, True, True, 2)
    speed = dict(zip(choices, (2.0, 1.0, 3.0)))  # the middle one is fastest

    def timer(fn):
        fn()
        return speed[launched[-1]]

    monkeypatch.setattr(autotune, "_cuda_time_ms", timer)
    args = (kernel, (64,), (), {"BLOCK_N": 8192}, True, True, 2, ("k",), CPU)
    assert launch.tune_fused_rows(launch.SOFTMAX_FWD, *args) == choices[1]
    assert launched == [*choices, choices[1]]
    launched.clear()
    assert launch.tune_fused_rows(launch.SOFTMAX_FWD, *args) == choices[1]  # remembered
    assert launched == [choices[1]]
    monkeypatch.setattr(autotune, "enabled", lambda device: False)
    autotune.reset()
    launched.clear()
    assert launch.tune_fused_rows(launch.SOFTMAX_FWD, *args) == choices[0] and launched == [choices[0]]
