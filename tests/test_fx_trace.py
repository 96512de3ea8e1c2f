"""torch.fx.symbolic_trace records gptkern's ops and modules as it records torch's: an op called on
Proxies is one call_function node, a gptkern.nn drop-in inside a model one call_module node."""
import pytest
import torch

import gptkern
from gptkern import nn as gnn
from gptkern import ops
from helpers import backends_here


def traced(model):
    graph_module = torch.fx.symbolic_trace(model)
    return graph_module, [(n.op, n.target) for n in graph_module.graph.nodes if n.op.startswith("call")]


def test_patched_model_traces_with_its_modules_as_leaves():
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = torch.nn.LayerNorm(8)
            self.rms = torch.nn.RMSNorm(8)
            self.softmax = torch.nn.Softmax(-1)
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, padding):
            y = self.attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]
            return self.softmax(self.proj(self.rms(self.norm(x + y))))

    model = gnn.patch(Model())
    x, padding = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False, False, False, True, True]])
    graph_module, calls = traced(model)
    assert [c for c in calls if c[0] == "call_module"] == [
        ("call_module", name) for name in ("attention", "norm", "rms", "proj", "softmax")]
    # the traced graph runs gptkern's modules: the same numbers as the model, on every backend here
    torch.testing.assert_close(graph_module(x, padding), model(x, padding))
    assert isinstance(graph_module.attention, gnn.MultiheadAttention)


@pytest.mark.parametrize("module", [gnn.LayerNorm(6), gnn.LayerNorm(6, bias=False), gnn.RMSNorm(6),
                                    gnn.Softmax(1), gnn.Softmax(), gnn.Linear(6, 3)])
@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
def test_a_traced_root_module_records_gptkern_functions(module):
    """A module traced as the root (no module above it to call) is traced through, as torch's."""
    x = torch.randn(4, 6)
    graph_module, calls = traced(module)
    assert len(calls) == 1 and calls[0][0] == "call_function"
    torch.testing.assert_close(graph_module(x), module(x))
    torch.testing.assert_close(graph_module(x), torch.fx.symbolic_trace(torch.nn.Sequential(module))(x))


def test_ops_called_in_a_traced_function_are_nodes_that_run_gptkern():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    weight = torch.randn(8)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    lengths = torch.tensor([2, 5], dtype=torch.int32)

    def f(q, k, v, weight):
        a = ops.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        b = ops.layer_norm(a, (8,), weight) + ops.rms_norm(a, [8], weight, eps=1e-6)
        c = ops.softmax(b, -1) + ops.log_softmax(b, dim=2)
        packed = q[0].transpose(0, 1)  # (5, 2, 8)
        d = ops.flash_attn_varlen(packed, packed, packed, cu, cu, 3, 3, causal=True)
        e = ops.decode_attention(q[:, :, :1], k, v, lengths)
        return c, d, e, ops.linear(e, weight.expand(3, 8).contiguous())

    graph_module, calls = traced(f)
    targets = {target for op, target in calls if op == "call_function"}
    assert {ops.scaled_dot_product_attention, ops.layer_norm, ops.rms_norm, ops.softmax, ops.log_softmax,
            ops.flash_attn_varlen, ops.decode_attention, ops.linear} <= targets
    for backend in backends_here(q.device, attention=True):  # (those with every op used here)
        with gptkern.backend(backend):
            for got, want in zip(graph_module(q, k, v, weight), f(q, k, v, weight)):
                torch.testing.assert_close(got, want)


def test_fx_checks_do_not_change_eager_errors():
    """Outside tracing, bad input still gets torch's exception naming the argument."""
    with pytest.raises(TypeError, match="input"):
        ops.layer_norm([1.0, 2.0], (2,))
    with pytest.raises(TypeError, match="query"):
        ops.scaled_dot_product_attention("q", torch.randn(1, 2, 3), torch.randn(1, 2, 3))


def test_a_proxy_of_a_bare_graph_records_the_modules_ops():
    """A Proxy made on an fx.Graph directly (no tracer of modules): the module's ops are recorded,
    as torch.nn's are."""
    graph = torch.fx.Graph()
    x = torch.fx.Proxy(graph.placeholder("x"))
    norm = gnn.LayerNorm(4)
    graph.output(norm(x).node)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [ops.layer_norm]
