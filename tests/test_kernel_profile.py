"""kernel_profile: profiler entries summed by category, and bench_train's --profile on the CPU."""
import json
from types import SimpleNamespace

import pytest
import torch

from gptkern import bench_train, kernel_profile


@pytest.mark.parametrize("name,expected", [
    ("_attn_fwd_kernel", "attention forward"),
    ("_attn_bwd_dkdv_kernel", "attention backward"),
    ("_attn_bwd_dq_kernel", "attention backward"),
    ("_attn_bwd_delta_kernel", "attention backward"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1", "attention forward"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_1_128x128x64", "attention backward"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention backward"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention forward"),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", "attention backward"),  # torch's memory-efficient backward
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention forward"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("nvjet_tst_128x192_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("triton_red_fused_native_layer_norm_native_layer_norm_backward_3", "norms"),
    ("_norm_fwd_kernel", "norms"),
    ("triton_per_fused__log_softmax__to_copy_nll_loss_forward_5", "softmax / cross-entropy"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("gptkern::linear_small_m", "matmul"),
    ("_sum_rows_kernel", "norms"),
    ("void gptkern::cuda::sum_partials_kernel<float>(float const*, float*, int, int)", "norms"),
    ("triton_poi_fused_add_gelu_7", "other"),
    ("aten::mul_", "other"),
])
def test_kernel_names_fall_into_their_category(name, expected):
    assert kernel_profile.category(name) == expected


def _entry(key, us, count, cuda):
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return SimpleNamespace(key=key, count=count, device_type=device, self_device_time_total=us if cuda else 0,
                           self_cpu_time_total=0 if cuda else us)


def test_summarize_takes_gpu_kernels_only_on_cuda_per_step():
    entries = [_entry("_attn_fwd_kernel", 3000, 4, True), _entry("nvjet_tst_gemm", 5000, 8, True),
               _entry("gptkern::attention_fwd", 9000, 4, False),  # the CPU op that launched it: not counted
               _entry("triton_poi_fused_add_0", 1000, 2, True)]
    s = kernel_profile.summarize(entries, 2, "cuda")
    assert s["total_ms"] == pytest.approx(4.5)
    assert s["categories"]["attention forward"] == pytest.approx(1.5)
    assert s["categories"]["matmul"] == pytest.approx(2.5) and s["categories"]["other"] == pytest.approx(0.5)
    assert [r["name"] for r in s["top"]] == ["nvjet_tst_gemm", "_attn_fwd_kernel", "triton_poi_fused_add_0"]
    assert s["top"][0]["calls"] == 4
    on_cpu = kernel_profile.summarize(entries, 1, "cpu")
    assert on_cpu["total_ms"] == pytest.approx(9.0) and on_cpu["categories"]["attention forward"] == pytest.approx(9.0)


def test_a_failing_profiler_is_a_report_line():
    def step():
        raise RuntimeError("no CUPTI")
    result = kernel_profile.profile_steps(step, 1, torch.device("cpu"))
    assert result == {"error": "RuntimeError: no CUPTI"}
    assert kernel_profile.markdown({"gptkern": result}, "x") == ["Profile of gptkern failed: RuntimeError: no CUPTI"]


@pytest.mark.parametrize("alternate", [True, False], ids=["alternating", "one-after-another"])
def test_bench_train_profile_reports_each_provider(tmp_path, monkeypatch, alternate):
    """Both timing orders (the CPU's alternating steps, a GPU's provider after provider) profile."""
    if not alternate:
        monkeypatch.setattr(bench_train, "ALTERNATE_ON", ())
    out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
    assert bench_train.main(["--quick", "--device", "cpu", "--threads", "1", "--profile", "1",
                             "--out-json", str(out_json), "--out-md", str(out_md)]) == 0
    profile = json.loads(out_json.read_text())["profile"]
    assert set(profile) == {"gptkern", "torch"}
    for p in profile.values():
        assert p["total_ms"] == pytest.approx(sum(p["categories"].values()))
        assert p["categories"]["matmul"] > 0 and p["categories"]["attention forward"] > 0
    text = out_md.read_text()
    assert "| category | gptkern | torch |" in text and "Top of gptkern:" in text


def test_cpu_ops_run_by_the_optimizer_count_as_optimizer():
    """AdamW on the CPU runs per-tensor aten ops (mul_, lerp_, addcdiv_, sqrt...) inside its step
    range: they are the optimizer's time, not "other"; the model's ops keep their categories."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(8, 16)
    model(x).square().mean().backward()
    optimizer.step()
    only_step = kernel_profile.profile_steps(optimizer.step, 2, torch.device("cpu"))
    assert only_step["categories"]["optimizer"] > 0
    assert all(ms == 0 for cat, ms in only_step["categories"].items() if cat != "optimizer"), only_step
    forward = kernel_profile.profile_steps(lambda: model(x), 2, torch.device("cpu"))
    assert forward["categories"]["matmul"] > 0 and forward["categories"]["optimizer"] == 0


def _event(name, us, parent=None):
    return SimpleNamespace(name=name, self_cpu_time_total=us, cpu_parent=parent,
                           device_type=torch.autograd.DeviceType.CPU)


def test_cpu_events_per_step_with_the_optimizer_found_up_the_parents():
    """Self times and calls per step; an op two ranges below Optimizer.step is the optimizer's; ops
    without self time are left out; the top is the TOP slowest."""
    steps = int(torch.randint(2, 5, ()))
    step = _event("Optimizer.step#AdamW.step", 1.0)
    nested = _event("aten::mul_", 40.0, _event("aten::_foreach_thing", 1.0, step))
    ops = [_event(f"aten::op{i}", 100.0 + i) for i in range(kernel_profile.TOP + 2)]
    s = kernel_profile.summarize_cpu_events([nested, nested, _event("aten::empty", 0.0), *ops], steps)
    assert s["categories"]["optimizer"] == pytest.approx(80.0 / 1e3 / steps)
    top = {r["name"]: r for r in s["top"]}
    assert len(s["top"]) == kernel_profile.TOP and "aten::empty" not in top
    assert [r["name"] for r in s["top"]] == [f"aten::op{i}" for i in range(kernel_profile.TOP + 1, 1, -1)]
    s = kernel_profile.summarize_cpu_events([nested, nested, _event("aten::empty", 0.0)], steps)
    assert [(r["name"], r["category"], r["calls"]) for r in s["top"]] == [("aten::mul_", "optimizer", 2 / steps)]


def test_markdown_gives_each_category_its_share():
    ms = torch.rand(2, dtype=torch.float64) + 0.5
    profile = {"total_ms": float(ms.sum()), "categories": {cat: 0.0 for cat, _ in kernel_profile.CATEGORIES},
               "top": [{"name": "a|b", "category": "matmul", "ms": float(ms[0]), "calls": 2}]}
    profile["categories"].update(matmul=float(ms[0]), other=float(ms[1]))
    lines = kernel_profile.markdown({"gptkern": profile}, "test")
    share = round(float(100 * ms[0] / ms.sum()))
    assert f"| matmul | {float(ms[0]):.2f} ({share}%) |" in lines
    assert f"| `a/b` | matmul | {float(ms[0]):.3f} | 2 |" in lines
