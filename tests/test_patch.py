"""gptkern.nn.patch: torch.nn modules swapped in place, weights shared, outputs and gradients equal."""
import copy

import pytest
import torch

import gptkern
from helpers import assert_close, backends_here


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _count_gptkern_calls(monkeypatch):
    """Counts the calls into gptkern.ops made by the patched modules."""
    calls = {"attention": 0, "layer_norm": 0}
    sdpa, layer_norm = gptkern.ops.scaled_dot_product_attention, gptkern.ops.layer_norm

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(gptkern.ops, "scaled_dot_product_attention", counting("attention", sdpa))
    monkeypatch.setattr(gptkern.ops, "layer_norm", counting("layer_norm", layer_norm))
    return calls


def _check_same(reference, patched, run, device, backend_names):
    """run(model) -> output; outputs and parameter gradients of both models equal on each backend."""
    expected = run(reference)
    expected.sum().backward()
    expected_grads = _grads(reference)
    assert expected_grads
    for name in backend_names:
        patched.zero_grad(set_to_none=True)
        with gptkern.backend(name):
            out = run(patched)
        out.sum().backward()
        assert_close(out, expected, torch.float32, msg=name)
        grads = _grads(patched)
        assert grads.keys() == expected_grads.keys()
        for key, grad in grads.items():
            assert_close(grad, expected_grads[key], torch.float32, grad=True, msg=f"{name} {key}", atol_scale=4)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_stack(norm_first, batch_first, device, monkeypatch):
    torch.manual_seed(0)
    calls = _count_gptkern_calls(monkeypatch)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, norm_first=norm_first,
                                             batch_first=batch_first)
    reference = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(32),
                                            enable_nested_tensor=False).to(device)
    patched = gptkern.nn.patch(copy.deepcopy(reference))
    b, l = 3, 9
    x = torch.randn((b, l, 32) if batch_first else (l, b, 32), device=device)
    causal = torch.ones(l, l, dtype=torch.bool, device=device).triu(1)  # True = masked, as torch's
    padding = torch.zeros(b, l, dtype=torch.bool, device=device)
    padding[1, 6:] = True

    def run(model):
        return model(x, mask=causal, src_key_padding_mask=padding)

    _check_same(reference, patched, run, device, backends_here(device, attention=True))
    runs = len(backends_here(device, attention=True))
    assert calls == {"attention": 2 * runs, "layer_norm": 5 * runs}  # the patched modules did the work
    assert isinstance(patched.layers[0].self_attn, gptkern.nn.MultiheadAttention)
    assert isinstance(patched.layers[0].norm1, gptkern.nn.LayerNorm) and isinstance(patched.norm, gptkern.nn.LayerNorm)


def test_transformer_decoder_stack(device):
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(32, 4, dim_feedforward=40, dropout=0.0, batch_first=True)
    reference = torch.nn.TransformerDecoder(layer, 2).to(device)
    patched = gptkern.nn.patch(copy.deepcopy(reference))
    tgt, memory = torch.randn(2, 7, 32, device=device), torch.randn(2, 11, 32, device=device)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(7, device=device)
    memory_padding = torch.zeros(2, 11, dtype=torch.bool, device=device)
    memory_padding[0, 8:] = True

    def run(model):
        return model(tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_padding, tgt_is_causal=True)

    _check_same(reference, patched, run, device, backends_here(device, attention=True))
    assert isinstance(patched.layers[1].multihead_attn, gptkern.nn.MultiheadAttention)


def test_patch_shares_parameters_and_returns_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8),
                                torch.nn.Softmax(dim=-1))
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = torch.randn(4, 8)
    expected = model(x)
    assert gptkern.nn.patch(model) is model
    assert [type(m) for m in model] == [torch.nn.Linear, gptkern.nn.LayerNorm, gptkern.nn.RMSNorm, gptkern.nn.Softmax]
    assert all(p is params[name] for name, p in model.named_parameters())  # shared, not copied
    assert list(model.state_dict()) == keys
    assert_close(model(x), expected, torch.float32)
    assert gptkern.nn.patch(model) is model  # idempotent


def test_patch_leaves_subclasses_alone():
    class MyNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyNorm(4))
    gptkern.nn.patch(model)
    assert type(model[0]) is MyNorm
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gptkern.nn.patch("not a model")


def test_patched_eval_fast_path_stays_equal():
    # In eval mode with no grad, TransformerEncoderLayer may take PyTorch's fused path.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    reference = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    patched = gptkern.nn.patch(copy.deepcopy(reference))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_close(patched(x), reference(x), torch.float32)
