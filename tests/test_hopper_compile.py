"""Every Triton kernel, in every configuration its launcher can choose, compiles for Hopper
(sm_90) on this machine, and ptxas spills nothing (cuobjdump shows LOCAL:0 and STACK:0); the
attention defaults for bf16 at head dim 128 multiply with warpgroup MMA (wgmma in the PTX).

Configurations: each block size up to the kernel's fused limit (launch.py), for aligned
launches (pointers, N and row strides multiples of 16, which Triton specializes on) up to
the aligned limit and for unaligned ones up to the unaligned limit; each constexpr flag;
fp32 and bf16 everywhere, fp16 at the largest blocks (its code is bf16's); int64 column
offsets for strided softmax rows; frozen weights or biases in the norm backward. Attention:
every flag combination its launchers use (causal, masks, varlen, windows, dropout) at every
configuration launch can pick (the default and the autotuning alternatives), for head dims
16, 64, 80 (padded), 128 and 256, fp32 and one 16-bit type (bf16 at 128, fp16 elsewhere).
The compiles run in a subprocess because the tests run the kernels under the interpreter.

Each check runs with the installed Triton and with every other Triton that tools/bootstrap.sh
put beside it (``$VENV/triton-X.Y.Z``, imported first through PYTHONPATH): code generation
differs between versions, and torch 2.11's Triton 3.6 spills where 3.7 does not. With the
other Tritons the attention check leaves out the autotuning alternatives (268 of its 755
compiles, to keep CI's time), and so does the norm check (the backward's PREFETCH variant):
every configuration that runs untimed is checked with both, and an alternative that spilled
there would only be slower, which the timing that chooses among them sees. (The softmax and
norm forwards' warp counts and the decode candidates are few: both Tritons compile them all.)
Configurations that appear twice are compiled once.
"""
import glob
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

if __name__ != "__main__":
    pytest.importorskip("triton")

CUOBJDUMP_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


def resource_usage(kernel, types: dict, constexprs: dict, num_warps: int, aligned: bool,
                   num_stages: int = 3) -> dict:
    """Compile ``kernel`` for sm_90 and return cuobjdump's REG / STACK / SHARED / LOCAL of it.

    ``types`` gives every runtime argument's Triton type. With ``aligned``, pointers and
    integer arguments carry the divisible-by-16 hint that Triton adds at such launches.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    # Row counts are not hinted: Triton specializes them too, but only when they happen
    # to divide by 16, and they change no load's width.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if aligned and n not in constexprs and (types[n] == "i32" or types[n].startswith("*"))
             and n not in ("n_rows", "rows_per_program", "G", "ROWS", "threshold")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = {k: int(v) for k, v in CUOBJDUMP_RE.findall(out)}
    ptx = compiled.asm["ptx"]  # how the products are multiplied: Hopper's warpgroup MMA or the older mma.sync
    usage.update(WGMMA=ptx.count("wgmma.mma_async"), MMA_SYNC=ptx.count("mma.sync"))
    return usage


def blocks_up_to(limit: int) -> list[int]:
    from gptkern.kernels import launch

    return [1 << p for p in range(launch.MIN_BLOCK.bit_length() - 1, limit.bit_length())]


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def fused_blocks(kind, aligned: bool, dtype: str) -> list[int]:
    """The fused blocks a launcher can pick for ``dtype``; fp16 only at the largest (its code is bf16's)."""
    blocks = blocks_up_to(kind.max_fused(aligned, BYTES[dtype]))
    return blocks[-1:] if dtype == "fp16" else blocks


def softmax_configs():
    from gptkern.kernels import launch, softmax

    families = ((softmax._softmax_fwd_kernel, softmax._softmax_fwd_looped_kernel, launch.SOFTMAX_FWD,
                 ("X", "Y"), ("inner", "sx_n", "sx_i", "sy_n", "sy_i")),
                (softmax._softmax_bwd_kernel, softmax._softmax_bwd_looped_kernel, launch.SOFTMAX_BWD,
                 ("DY", "Y", "DX"), ("inner", "s_n", "s_i", "sd_n", "sd_i")))
    for fused_kernel, looped_kernel, kind, ptrs, unit_args in families:
        # (aligned, unit strides): aligned launches are contiguous rows; unaligned ones may be either.
        # (aligned, unit strides, int64 columns): aligned launches are contiguous rows;
        # unaligned ones may be either; only strided columns can need int64 offsets.
        for aligned, unit, wide in ((True, True, False), (False, True, False), (False, False, False),
                                    (False, False, True)):
            for dtype in BYTES:
                blocks = [(fused_kernel, b, True) for b in fused_blocks(kind, aligned, dtype)]
                blocks.append((looped_kernel, launch.LOOP_BLOCK, False))
                for kernel, block, fused in blocks:
                    for log in (False, True):
                        types = {n: "i32" for n in kernel.arg_names}
                        types.update({p: "*" + dtype for p in ptrs})
                        constexprs = {"LOG": log, "BLOCK_N": block, "WIDE": wide,
                                      **({a: 1 for a in unit_args} if unit else {})}
                        for warps in kind.warp_choices(block, fused, aligned, BYTES[dtype]):
                            yield kernel, types, constexprs, warps, aligned


def norm_configs(alternatives: bool = True):
    """The norm configurations; without ``alternatives``, the backward without its autotuning
    alternative (PREFETCH)."""
    from gptkern.kernels import launch, norms

    flags = [(rms, w, b) for rms in (False, True) for w in (False, True) for b in (False, True)
             if not (rms and b)]
    for aligned in (True, False):
        for dtype in ("fp32", "bf16", "fp16"):
            ptr = "*" + dtype
            for is_rms, has_w, has_b in flags:
                fwd_types = {n: "i32" for n in norms._norm_fwd_kernel.arg_names}
                fwd_types.update(X=ptr, Y=ptr, W=ptr, B=ptr, Mean="*fp32", Rstd="*fp32", eps="fp32")
                blocks = [(b, True) for b in fused_blocks(launch.NORM_FWD, aligned, dtype)]
                for block, fused in blocks + [(launch.LOOP_BLOCK, False)]:
                    for warps in launch.NORM_FWD.warp_choices(block, fused, aligned, BYTES[dtype]):
                        yield (norms._norm_fwd_kernel, fwd_types,
                               dict(IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_b, BLOCK_N=block, FUSED=fused),
                               warps, aligned)
                bwd_types = {n: "i32" for n in norms._norm_bwd_kernel.arg_names}
                bwd_types.update(X=ptr, DY=ptr, DX=ptr, W=ptr, Mean="*fp32", Rstd="*fp32", C1="*fp32",
                                 C2="*fp32", DW_part="*fp32", DB_part="*fp32")
                looped = min(launch.LOOP_BLOCK, launch.NORM_BWD.max_fused(aligned, BYTES[dtype]))
                warps = launch.NORM_BWD.warps(looped, fused=False)
                # NEED_DW / NEED_DB: a weight or bias may be frozen (no gradient asked for).
                for need_dw, need_db in {(has_w, has_b), (False, has_b), (has_w, False)}:
                    bwd_flags = dict(IS_RMS=is_rms, HAS_W=has_w, NEED_DW=need_dw, NEED_DB=need_db)
                    blocks = [(b, False, launch.NORM_BWD.warps(b))
                              for b in fused_blocks(launch.NORM_BWD, aligned, dtype)]
                    for block, sums_given, block_warps in blocks + [(looped, True, warps)]:
                        choices = norms.prefetch_choices(block, BYTES[dtype])  # the autotuning's
                        for prefetch in choices if alternatives else choices[:1]:
                            yield (norms._norm_bwd_kernel, bwd_types,
                                   dict(bwd_flags, BLOCK_N=block, SUMS_GIVEN=sums_given, PREFETCH=prefetch),
                                   block_warps, aligned)
                if not has_b:
                    yield (norms._norm_bwd_row_sums_kernel, bwd_types,
                           dict(IS_RMS=is_rms, HAS_W=has_w, BLOCK_N=looped), warps, aligned)
            for block_g in (1 << p for p in range(norms.SUM_ROWS_BLOCK_G.bit_length())):  # (few groups: 1, 2, ...)
                yield (norms._sum_rows_kernel, {"P": "*fp32", "OUT": ptr, "G": "i32", "N": "i32", "ROWS": "i32"},
                       {"BLOCK_G": block_g, "BLOCK_N": norms.SUM_ROWS_BLOCK_N}, 4, aligned)


ATTN_HEAD_DIMS = (16, 64, 80, 128, 256)  # powers of two and one that is padded (80 -> 128)


def attention_variants():
    """The flag combinations the attention launchers can use (windows only in varlen, masks only
    in dense calls)."""
    for dropout in (False, True):
        for causal in (False, True):
            for mask_kind in (0, 1, 2):
                yield dict(CAUSAL=causal, WINDOW=False, VARLEN=False, MASK_KIND=mask_kind, DROPOUT=dropout)
        for causal in (False, True):
            for window in (False, True):
                yield dict(CAUSAL=causal, WINDOW=window, VARLEN=True, MASK_KIND=0, DROPOUT=dropout)


def attention_configs(alternatives: bool = True):
    """The attention configurations; without ``alternatives``, only each kernel's default (the
    one launched without autotuning) for each case."""
    from gptkern.kernels import attention

    kernels = (("fwd", attention._attn_fwd_kernel), ("dq", attention._attn_bwd_dq_kernel),
               ("dkdv", attention._attn_bwd_dkdv_kernel))
    for d in ATTN_HEAD_DIMS:
        for dtype in ("bf16" if d == 128 else "fp16", "fp32"):  # fp16's code is bf16's
            for flags in attention_variants():
                weight = (attention.DROPOUT if flags["DROPOUT"] else
                          attention.MASKED if flags["MASK_KIND"] else attention.PLAIN)
                if attention.unsupported(d, d, dtype == "fp32", weight):
                    continue  # the launchers hand these to the torch backend
                # a float mask comes in the inputs' dtype or in float32
                mask_types = {0: ["*i1"], 1: ["*i1"], 2: sorted({"*" + dtype, "*fp32"})}[flags["MASK_KIND"]]
                for (name, kernel), mask_type in itertools.product(kernels, mask_types):
                    found = attention.configs(name, d, d, dtype == "fp32", weight, (9, 0))  # + alternatives
                    for cfg in found if alternatives else found[:1]:
                        if cfg.tma and not (dtype != "fp32" and weight == attention.PLAIN
                                            and not flags["VARLEN"]):
                            continue  # the launcher takes descriptors only for dense unmasked 16-bit inputs
                        types = {n: "i32" for n in kernel.arg_names}
                        types.update({n: "*" + dtype for n in ("Q", "K", "V", "O", "DO", "DK", "DV_", "DQ")
                                      if n in types})
                        types.update({n: "*fp32" for n in ("LSE", "DELTA") if n in types})
                        types.update(CU_Q="*i32", CU_K="*i32", MASK=mask_type, qk_scale="fp32", inv_keep="fp32",
                                     SEED="*i64", DQ_ACC="*fp32")
                        if "sm_scale" in types:
                            types["sm_scale"] = "fp32"
                        block_d = attention.head_block(d)
                        if cfg.tma:  # (1, 1, rows, padded dim) tiles of (B, H, seq, dim) tensors
                            for arg, (rows, _) in zip(kernel.arg_names, attention._DESCRIPTOR_TILES[name]):
                                rows = cfg.block_m if rows == "m" else cfg.block_n
                                types[arg] = f"tensordesc<{dtype}[1,1,{rows},{block_d}]>"
                        constexprs = dict(flags, D=d, DV=d, PRECISION="ieee" if dtype == "fp32" else "tf32",
                                          BLOCK_D=block_d, BLOCK_DV=block_d, BLOCK_M=cfg.block_m,
                                          BLOCK_N=cfg.block_n, DESC=cfg.tma,
                                          **({"DMASK": None} if name == "dq" else {}),
                                          **({"ATOMIC_DQ": cfg.atomic_dq} if name == "dkdv" else {}))
                        yield kernel, types, constexprs, cfg.num_warps, True, cfg.num_stages
                        if name == "dq" and flags["MASK_KIND"] == 2:  # writing the float mask's gradient
                            grad_cfg = attention.DQ_MASK_GRAD_DROPOUT if flags["DROPOUT"] else cfg
                            grad = {k: v for k, v in constexprs.items() if k != "DMASK"}
                            grad.update(BLOCK_M=grad_cfg.block_m, BLOCK_N=grad_cfg.block_n)
                            yield (kernel, dict(types, DMASK=mask_type), grad, grad_cfg.num_warps, True,
                                   grad_cfg.num_stages)
            delta = attention._attn_bwd_delta_kernel
            for varlen in (False, True):
                types = {n: "i32" for n in delta.arg_names}
                types.update(O="*" + dtype, DO="*" + dtype, DELTA="*fp32", CU_Q="*i32")
                yield (delta, types, dict(DV=d, VARLEN=varlen, BLOCK_M=attention.delta_block_m(d),
                                          BLOCK_DV=attention.head_block(d)), 4, True, 3)
    factors = attention._dropout_factors_kernel  # double backward with dropout
    yield (factors, {"Z": "*fp32", "SEED": "*i64", "first_bh": "i32", "rows": "i32", "cols": "i32",
                     "threshold": "i32", "inv_keep": "fp32"}, attention.FACTOR_BLOCKS, 4, True, 3)


def decode_variants():
    """(head dim, dtype, page size (0: static cache), GQA group size, new query tokens)."""
    for d, dtype, page, shape in itertools.product((64, 80, 128, 256), ("fp16", "fp32"), (0, 16, 64),
                                                   ((1, 1), (16, 4))):  # BLOCK_M 16 and 64
        yield (d, dtype, page, *shape)
    for page, shape in itertools.product((0, 16), ((1, 1), (8, 1), (4, 4))):
        yield (128, "bf16", page, *shape)


def decode_configs():
    from gptkern.kernels import decode

    for d, dtype, page, g, lq in decode_variants():
        cfg = decode.launch_config(g, lq, d, d, page, dtype == "fp32")
        split = decode._decode_split_kernel
        types = {n: "i32" for n in split.arg_names}
        types.update(Q="*" + dtype, K="*" + dtype, V="*" + dtype, SEQLENS="*i32", TABLE="*i32",
                     O_PART="*fp32", LSE_PART="*fp32", qk_scale="fp32")
        m_pad = -(-g * lq // cfg.block_m) * cfg.block_m
        for tiles in sorted({c for c, _ in decode.launch_candidates(cfg, dtype == "fp32")}, key=repr):
            yield split, types, dict(G=g, LQ=lq, D=d, DV=d, PAGE=page, SPLITS=8, M_PAD=m_pad,
                                     PRECISION="ieee" if dtype == "fp32" else "tf32", **tiles.constexprs()), \
                tiles.num_warps, True, tiles.num_stages
        combine = decode._decode_combine_kernel
        types = {n: "i32" for n in combine.arg_names}
        types.update(O_PART="*fp32", LSE_PART="*fp32", OUT="*" + dtype)
        for splits in (8, 64) if page == 0 else (8,):  # 64: the most splits (a batch of one on an H200)
            yield combine, types, dict(G=g, LQ=lq, DV=d, SPLITS=splits, BLOCK_S=splits, M_PAD=m_pad,
                                       BLOCK_DV=cfg.block_dv), decode.combine_warps(splits, cfg.block_dv), True, 3


def spill_probe():
    from gptkern.kernels import softmax

    yield (softmax._softmax_bwd_kernel, {n: "*fp32" if n in ("DY", "Y", "DX") else "i32"
                                         for n in softmax._softmax_bwd_kernel.arg_names},
           {"LOG": False, "BLOCK_N": 8192, "WIDE": False}, 1, False)  # 2 KB of stack (32K: 38 s to compile)


# None: the installed Triton; else a directory holding another version's ``triton`` package.
TRITONS = [None] + sorted(glob.glob(os.path.join(sys.prefix, "triton-*")))


def triton_id(path) -> str:
    return "installed" if path is None else os.path.basename(path)


def run_compiles(which: str, triton_dir=None) -> list[dict]:
    """Compile the ``which`` configurations in a subprocess with the interpreter off, with the
    Triton package found in ``triton_dir`` (None: the installed one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([p for p in (triton_dir, root, env.get("PYTHONPATH")) if p])
    out = subprocess.run([sys.executable, os.path.abspath(__file__), which], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    version, *lines = out.stdout.splitlines()
    if triton_dir is not None:  # the compiles used the Triton asked for
        assert os.path.basename(triton_dir) == f"triton-{version}", (triton_dir, version)
    return [json.loads(line) for line in lines]


def assert_no_spills(results: list[dict]) -> None:
    # ptxas puts spilled registers in the stack frame: LOCAL and STACK must both be 0.
    bad = [r for r in results if r["usage"].get("LOCAL", -1) != 0 or r["usage"].get("STACK", -1) != 0]
    assert results and not bad, f"{len(bad)} of {len(results)} configurations spill: {bad[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("triton_dir", TRITONS, ids=triton_id)
def test_softmax_kernels_compile_for_hopper_without_spills(triton_dir):
    results = run_compiles("softmax", triton_dir)
    assert {r["kernel"] for r in results} == {"_softmax_fwd_kernel", "_softmax_fwd_looped_kernel",
                                              "_softmax_bwd_kernel", "_softmax_bwd_looped_kernel"}
    assert_no_spills(results)


@pytest.mark.slow
@pytest.mark.parametrize("triton_dir", TRITONS, ids=triton_id)
def test_norm_kernels_compile_for_hopper_without_spills(triton_dir):
    results = run_compiles("norms" if triton_dir is None else "norms-defaults", triton_dir)
    assert {r["kernel"] for r in results} == {"_norm_fwd_kernel", "_norm_bwd_kernel",
                                              "_norm_bwd_row_sums_kernel",
                                              "_sum_rows_kernel"}
    assert_no_spills(results)


@pytest.mark.slow
@pytest.mark.parametrize("triton_dir", TRITONS, ids=triton_id)
def test_attention_kernels_compile_for_hopper_without_spills(triton_dir):
    results = run_compiles("attention" if triton_dir is None else "attention-defaults", triton_dir)
    assert {r["kernel"] for r in results} == {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel",
                                              "_attn_bwd_delta_kernel", "_dropout_factors_kernel"}
    assert_no_spills(results)
    assert_warpgroup_mma(results)


def assert_warpgroup_mma(results: list[dict]) -> None:
    """The default configurations for bf16 at head dim 128 without mask or dropout (the training
    case) multiply on Hopper's warpgroup MMA only: mma.sync runs at a fraction of its rate."""
    from gptkern.kernels import attention

    names = {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}
    defaults = {names[k]: attention.configs(k, 128, 128, False, attention.PLAIN, (9, 0))[0] for k in names}

    def is_default(r: dict) -> bool:
        c, cfg = r["constexprs"], defaults[r["kernel"]]
        return (c["BLOCK_M"], c["BLOCK_N"], r["warps"], c["DESC"]) == (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.tma)

    checked = [r for r in results if r["kernel"] in defaults and r["dtype"] == "*bf16" and r["constexprs"]["D"] == 128
               and not r["constexprs"]["MASK_KIND"] and not r["constexprs"]["DROPOUT"] and is_default(r)]
    assert {r["kernel"] for r in checked} == set(defaults)
    bad = [(r["kernel"], r["constexprs"], r["usage"]) for r in checked
           if not r["usage"]["WGMMA"] or r["usage"]["MMA_SYNC"]]
    assert not bad, f"{len(bad)} of {len(checked)} default configurations use mma.sync: {bad[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("triton_dir", TRITONS, ids=triton_id)
def test_decode_kernels_compile_for_hopper_without_spills(triton_dir):
    results = run_compiles("decode", triton_dir)
    assert {r["kernel"] for r in results} == {"_decode_split_kernel", "_decode_combine_kernel"}
    assert_no_spills(results)


def test_resource_usage_reports_spills():
    """The check sees a spill: an 8K block kept live by one warp (256 floats a thread)."""
    (result,) = run_compiles("spill-probe")
    assert result["usage"]["STACK"] > 0
    with pytest.raises(AssertionError, match="spill"):
        assert_no_spills([result])


def test_the_defaults_only_matrix_keeps_every_case():
    """The other Tritons' attention matrix drops only autotuning alternatives: every kernel, head
    dim, dtype and flag set is still there, with the configuration launched untuned."""
    def case(config):
        kernel, types, constexprs, *_ = config
        # a descriptor's type names its tile; as a pointer, the argument of the default's launch
        pointers = {k: re.sub(r"tensordesc<(\w+)\[.*", r"*\1", v) for k, v in types.items()}
        flags = {k: v for k, v in constexprs.items() if k not in ("BLOCK_M", "BLOCK_N", "DESC", "ATOMIC_DQ")}
        return kernel.fn.__name__, json.dumps(pointers, sort_keys=True), json.dumps(flags, sort_keys=True, default=str)

    every = list(attention_configs())
    defaults = list(attention_configs(alternatives=False))
    first = {}  # each case's first configuration in the full matrix: its default
    for c in every:
        first.setdefault(case(c), c)
    assert defaults == [c for c in every if first[case(c)] is c] and len(defaults) < len(every)


_CONFIGS: list = []


def _compile_one(index: int) -> dict:
    kernel, types, constexprs, warps, aligned, *stages = _CONFIGS[index]
    usage = resource_usage(kernel, types, constexprs, warps, aligned, *stages)
    return {"kernel": kernel.fn.__name__, "constexprs": constexprs, "warps": warps, "aligned": aligned,
            "dtype": next(t for t in types.values() if t.startswith("*")), "usage": usage}


def _main(which: str) -> None:
    import multiprocessing

    configs = {"softmax": softmax_configs, "norms": norm_configs,
               "norms-defaults": lambda: norm_configs(alternatives=False), "attention": attention_configs,
               "attention-defaults": lambda: attention_configs(alternatives=False),
               "decode": decode_configs, "spill-probe": spill_probe}[which]()
    seen = set()
    for config in configs:  # each distinct compile once (launchers share some configurations)
        kernel, *rest = config
        key = json.dumps([kernel.fn.__module__, kernel.fn.__qualname__, *rest], sort_keys=True)
        if key not in seen:
            seen.add(key)
            _CONFIGS.append(config)
    # Processes (forked: they inherit the configurations): compiling holds the GIL much of the time.
    import triton

    print(triton.__version__, flush=True)
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 2) as pool:
        for result in pool.imap(_compile_one, range(len(_CONFIGS)), chunksize=4):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
