"""torch's autocast rules on gptkern's ops, whose custom ops have no autocast kernels: on CUDA,
softmax, log_softmax, layer_norm (and rms_norm from torch 2.12) run in float32 (the ``fp32`` and
``fp32_set_opt_dtype`` rules). Here CUDA's rules are pointed at CPU autocast, which exercises the
same code on every CPU backend; tests/test_gpu.py checks them against torch on CUDA."""
import pytest
import torch
import torch.nn.functional as F

import gptkern
from gptkern.ops import _autocast
from helpers import backends_here

BACKENDS = backends_here(torch.device("cpu"))


@pytest.fixture
def cpu_runs_fp32(monkeypatch):
    monkeypatch.setattr(_autocast, "AUTOCAST_KEYS", {"cpu": "AutocastCUDA"})


def test_the_rules_are_the_installed_torchs():
    """Read from torch's dispatcher: CUDA autocast has float32 kernels for the four ops (rms_norm
    from torch 2.12), CPU autocast for none."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    for op in ("softmax", "log_softmax", "layer_norm", "rms_norm"):
        assert _autocast.FLOAT32_RULES[(op, "AutocastCUDA")] == (op != "rms_norm" or version >= (2, 12))
        assert not _autocast.FLOAT32_RULES[(op, "AutocastCPU")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_softmax_and_norms_run_in_float32(cpu_runs_fp32, backend, dtype):
    x = (3 * torch.randn(5, 40)).to(dtype).requires_grad_()
    w = (1 + torch.rand(40)).to(dtype).requires_grad_()
    b = torch.randn(40).to(dtype).requires_grad_()
    ref_x, ref_w, ref_b = (t.detach().float().requires_grad_() for t in (x, w, b))
    cases = [
        (lambda x, w, b: gptkern.ops.softmax(x, -1), lambda x, w, b: torch.softmax(x, -1), (x,)),
        (lambda x, w, b: gptkern.ops.log_softmax(x, 0), lambda x, w, b: torch.log_softmax(x, 0), (x,)),
        (lambda x, w, b: gptkern.ops.layer_norm(x, (40,), w, b), lambda x, w, b: F.layer_norm(x, (40,), w, b),
         (x, w, b)),
        (lambda x, w, b: gptkern.ops.rms_norm(x, (40,), w), lambda x, w, b: F.rms_norm(x, (40,), w), (x, w)),
    ]
    for (ours, theirs, leaves), op in zip(cases, ("softmax", "log_softmax", "layer_norm", "rms_norm")):
        if not _autocast.FLOAT32_RULES[(op, "AutocastCUDA")]:
            continue  # rms_norm before torch 2.12
        with torch.autocast("cpu", dtype=torch.bfloat16), gptkern.backend(backend):
            got = ours(x, w, b)
        want = theirs(ref_x, ref_w, ref_b)  # torch's CUDA autocast: the same op on float32 inputs
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(got)
        grads = torch.autograd.grad(got, leaves, g)
        ref_grads = torch.autograd.grad(want, [ref_x, ref_w, ref_b][:len(leaves)], g)
        for a, r, leaf in zip(grads, ref_grads, leaves):
            assert a.dtype == leaf.dtype  # the casts' backward returns each input's dtype
            torch.testing.assert_close(a, r.to(a.dtype), atol=2e-2, rtol=2e-2)


def test_what_the_rule_leaves_alone(cpu_runs_fp32):
    """An explicit softmax dtype is kept, float64 is not cast, and outside autocast nothing changes."""
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gptkern.ops.softmax(x, -1, dtype=torch.bfloat16).dtype == torch.bfloat16
        assert gptkern.ops.softmax(x.double(), -1).dtype == torch.float64
        assert gptkern.ops.layer_norm(x.double(), (8,)).dtype == torch.float64
    assert gptkern.ops.softmax(x, -1).dtype == gptkern.ops.layer_norm(x, (8,)).dtype == torch.bfloat16


def test_cpu_autocast_keeps_the_input_dtype_as_torch():
    """torch's CPU autocast leaves these ops in the input's dtype; so does gptkern by default."""
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ours, theirs in ((gptkern.ops.softmax(x, -1), torch.softmax(x, -1)),
                             (gptkern.ops.layer_norm(x, (8,)), F.layer_norm(x, (8,))),
                             (gptkern.ops.rms_norm(x, (8,)), F.rms_norm(x, (8,)))):
            assert ours.dtype == theirs.dtype == torch.bfloat16
