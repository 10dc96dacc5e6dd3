"""The IR: import through torch.export, printing, lowering back to torch, serialisation, verify."""
from __future__ import annotations

import json

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

from lrcc.codegen.torch_module import lower_to_torch
from lrcc.errors import LrccError
from lrcc.ir.from_torch import import_module
from lrcc.ir.graph import Node, print_graph, verify
from lrcc.ir.serialize import graph_from_json, graph_to_json
from lrcc.rewrites.low_rank import replace_with_lowrank


pytestmark = pytest.mark.usefixtures("one_thread")


class ToyAttention(nn.Module):
    """LayerNorm -> fused qkv linear -> heads by view/transpose -> SDPA with a boolean mask -> out linear -> mean."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q = q.view(b, l, self.heads, d // self.heads).transpose(1, 2)
        k = k.view(b, l, self.heads, d // self.heads).transpose(1, 2)
        v = v.view(b, l, self.heads, d // self.heads).transpose(1, 2)
        keep = mask.bool()[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        a = a.transpose(1, 2).reshape(b, l, d)
        return self.out(a).mean(dim=1)


GOLDEN = """\
%p_norm_weight = param @norm.weight : f32[16]
%p_norm_bias = param @norm.bias : f32[16]
%p_qkv_weight = param @qkv.weight : f32[48, 16]
%p_qkv_bias = param @qkv.bias : f32[48]
%p_out_weight = param @out.weight : f32[16, 16]
%p_out_bias = param @out.bias : f32[16]
%x = input #0 : f32[B, L, 16]
%mask = input #1 : i64[B, L]
%sym_size_int_5 = aten.sym_size.int(%x, 1) : sym
%sym_size_int_6 = aten.sym_size.int(%mask, 0) : sym
%layer_norm = aten.layer_norm.default(%x, [16], %p_norm_weight, %p_norm_bias, 1e-05, False) : f32[B, L, 16]
%linear = linear(%layer_norm, %p_qkv_weight, %p_qkv_bias) : f32[B, L, 48]
%chunk = aten.chunk.default(%linear, 3, -1) : sym
%getitem = operator.getitem(%chunk, 0) : f32[B, L, 16]
%getitem_1 = operator.getitem(%chunk, 1) : f32[B, L, 16]
%getitem_2 = operator.getitem(%chunk, 2) : f32[B, L, 16]
%view = aten.view.default(%getitem, [%sym_size_int_6, %sym_size_int_5, 2, 8]) : f32[B, L, 2, 8]
%transpose = aten.transpose.int(%view, 1, 2) : f32[B, 2, L, 8]
%view_1 = aten.view.default(%getitem_1, [%sym_size_int_6, %sym_size_int_5, 2, 8]) : f32[B, L, 2, 8]
%transpose_1 = aten.transpose.int(%view_1, 1, 2) : f32[B, 2, L, 8]
%view_2 = aten.view.default(%getitem_2, [%sym_size_int_6, %sym_size_int_5, 2, 8]) : f32[B, L, 2, 8]
%transpose_2 = aten.transpose.int(%view_2, 1, 2) : f32[B, 2, L, 8]
%_assert_tensor_metadata_default = aten._assert_tensor_metadata.default(%mask, dtype=i64, device=cpu, layout=torch.strided) : sym
%to = aten.to.dtype(%mask, bool) : bool[B, L]
%slice_1 = aten.slice.Tensor(%to, 0, 0, 9223372036854775807) : bool[B, L]
%unsqueeze = aten.unsqueeze.default(%slice_1, 1) : bool[B, 1, L]
%unsqueeze_1 = aten.unsqueeze.default(%unsqueeze, 2) : bool[B, 1, 1, L]
%slice_2 = aten.slice.Tensor(%unsqueeze_1, 3, 0, 9223372036854775807) : bool[B, 1, 1, L]
%scaled_dot_product_attention = aten.scaled_dot_product_attention.default(%transpose, %transpose_1, %transpose_2, %slice_2) : f32[B, 2, L, 8]
%transpose_3 = aten.transpose.int(%scaled_dot_product_attention, 1, 2) : f32[B, L, 2, 8]
%reshape = aten.reshape.default(%transpose_3, [%sym_size_int_6, %sym_size_int_5, 16]) : f32[B, L, 16]
%linear_1 = linear(%reshape, %p_out_weight, %p_out_bias) : f32[B, L, 16]
%mean = aten.mean.dim(%linear_1, [1]) : f32[B, 16]
return [%mean]
"""


def _mask(b: int, l: int, lengths: list[int]) -> torch.Tensor:
    m = torch.zeros(b, l, dtype=torch.long)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    return m


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = ToyAttention().eval()
    x = torch.randn(3, 5, 16)
    mask = _mask(3, 5, [5, 3, 4])
    g, notes = import_module(model, (x, mask))
    return model, g, notes


@pytest.fixture(scope="module")
def other_inputs():
    torch.manual_seed(1)
    b, l = 6, 11  # neither the example's batch (3) nor its length (5)
    mask = _mask(b, l, [11, 7, 1, 9, 2, 10])
    return torch.randn(b, l, 16), mask


def test_print_golden(toy) -> None:
    _, g, notes = toy
    assert notes == []  # exported with dynamic B and L at the first try
    text = print_graph(g)
    assert text == GOLDEN, text
    assert str(g) == text
    assert "B" in g.symbols and "L" in g.symbols
    lo, hi = g.symbols["L"]
    assert lo <= 2 and hi > 1000


def test_sites_are_linear_ops_named_after_modules(toy) -> None:
    model, g, _ = toy
    sites = g.sites()
    assert [n.op for n in sites] == ["linear", "linear"]
    assert [n.attrs["site"] for n in sites] == ["qkv", "out"]
    linear_modules = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(n.attrs["site"] for n in sites) == sorted(linear_modules)
    for n in sites:
        w = g.tensor(n.inputs[1])
        assert w is not None and torch.equal(w, model.get_submodule(n.attrs["site"]).weight.detach())
        assert g.param_count(n) == sum(p.numel() for p in model.get_submodule(n.attrs["site"]).parameters())
    # the symbolic dims are real sympy symbols on the site shapes
    B, L = sympy.Symbol("B", integer=True, positive=True), sympy.Symbol("L", integer=True, positive=True)
    assert g["linear"].shape == (B, L, sympy.Integer(48))


def test_lowered_matches_model_on_new_shapes(toy, other_inputs) -> None:
    model, g, _ = toy
    lowered = lower_to_torch(g)
    x, mask = other_inputs
    assert int((mask == 0).sum()) > 0
    with torch.no_grad():
        want = model(x, mask)
        got = lowered(x, mask)
    assert got.shape == want.shape == (6, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the mask really matters: changing padding changes the output
    with torch.no_grad():
        other = lowered(x, torch.ones_like(mask))
    assert not torch.allclose(other, got, atol=1e-4)


def test_serialize_round_trip(toy, other_inputs) -> None:
    _, g, _ = toy
    data = json.loads(json.dumps(graph_to_json(g)))
    g2 = graph_from_json(data, g.tensors)
    verify(g2)
    assert print_graph(g2) == print_graph(g)
    # key order (an op's kwargs) survives JSON tools that sort object keys
    g3 = graph_from_json(json.loads(json.dumps(graph_to_json(g), sort_keys=True)), g.tensors)
    assert print_graph(g3) == print_graph(g)
    assert g2.symbols == g.symbols
    x, mask = other_inputs
    with torch.no_grad():
        assert torch.equal(lower_to_torch(g2)(x, mask), lower_to_torch(g)(x, mask))


def test_serialize_rejects_unknown_version(toy) -> None:
    _, g, _ = toy
    data = graph_to_json(g)
    data["version"] = 99
    with pytest.raises(LrccError, match="version"):
        graph_from_json(data, g.tensors)


# --- verify -----------------------------------------------------------------------------------
def test_verify_accepts_imported(toy) -> None:
    verify(toy[1])


def test_verify_undefined_input(toy) -> None:
    g = toy[1].copy()
    n = g["mean"]
    n.inputs = ["no_such_node"]
    n.attrs["args"] = tuple(a if i else type(a)("no_such_node") for i, a in enumerate(n.attrs["args"]))
    with pytest.raises(LrccError, match="'no_such_node' before it is defined"):
        verify(g)


def test_verify_use_before_definition(toy) -> None:
    g = toy[1].copy()
    i = next(k for k, n in enumerate(g.nodes) if n.name == "linear_1")
    g.nodes[i], g.nodes[i + 1] = g.nodes[i + 1], g.nodes[i]  # mean before the linear it reads
    with pytest.raises(LrccError, match="mean"):
        verify(g)


def test_verify_lowrank_rank_mismatch(toy) -> None:
    g = toy[1].copy()
    replace_with_lowrank(g, "linear_1", torch.randn(4, 16), torch.randn(16, 3))
    with pytest.raises(LrccError, match="ranks differ"):
        verify(g)
    g2 = toy[1].copy()
    replace_with_lowrank(g2, "linear_1", torch.randn(4, 16), torch.randn(16, 4))
    g2.remove_unused_params()
    verify(g2)


def test_verify_lowrank_wrong_input_width(toy) -> None:
    g = toy[1].copy()
    replace_with_lowrank(g, "linear_1", torch.randn(4, 15), torch.randn(16, 4))
    with pytest.raises(LrccError, match="input features"):
        verify(g)


def test_verify_missing_output(toy) -> None:
    g = toy[1].copy()
    g.nodes = g.nodes[:-1]
    with pytest.raises(LrccError, match="output"):
        verify(g)


def test_verify_inputs_disagree_with_args(toy) -> None:
    g = toy[1].copy()
    g["mean"].inputs = ["reshape"]
    with pytest.raises(LrccError, match="do not match"):
        verify(g)


def test_verify_param_missing_tensor(toy) -> None:
    g = toy[1].copy()
    del g.tensors["out.bias"]
    with pytest.raises(LrccError, match="out.bias"):
        verify(g)


def test_verify_unknown_op(toy) -> None:
    g = toy[1].copy()
    g.nodes.insert(-1, Node("weird", "frobnicate", ["mean"]))
    with pytest.raises(LrccError, match="frobnicate"):
        verify(g)


def test_graph_lookup_errors(toy) -> None:
    g = toy[1]
    with pytest.raises(LrccError, match="nope"):
        g["nope"]
    with pytest.raises(LrccError, match="already exists"):
        g.copy().add(Node("mean", "input", [], {"index": 9}))


# --- opaque operators -------------------------------------------------------------------------
class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = Swish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.act(self.fc(x)), dim=1)


OPAQUE_GOLDEN = """\
%p_fc_weight = param @fc.weight : f32[8, 8]
%p_fc_bias = param @fc.bias : f32[8]
%x = input #0 : f32[B, L, 8]
%linear = linear(%x, %p_fc_weight, %p_fc_bias) : f32[B, L, 8]
%sigmoid = aten.sigmoid.default(%linear) : f32[B, L, 8]
%mul = aten.mul.Tensor(%linear, %sigmoid) : f32[B, L, 8]
%cumsum = aten.cumsum.default(%mul, 1) : f32[B, L, 8]
return [%cumsum]
"""


def test_opaque_ops_stay_aten_and_run() -> None:
    torch.manual_seed(0)
    model = Opaque().eval()
    g, _ = import_module(model, (torch.randn(2, 4, 8),))
    assert print_graph(g) == OPAQUE_GOLDEN
    ops = {n.name: n for n in g.nodes}
    assert ops["cumsum"].op == "aten" and ops["cumsum"].attrs["target"] == "aten.cumsum.default"
    assert ops["sigmoid"].op == "aten" and ops["mul"].op == "aten"
    assert [n.attrs["site"] for n in g.sites()] == ["fc"]
    x = torch.randn(5, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(lower_to_torch(g)(x), model(x), rtol=0, atol=1e-6)
    g2 = graph_from_json(json.loads(json.dumps(graph_to_json(g))), g.tensors)
    with torch.no_grad():
        assert torch.equal(lower_to_torch(g2)(x), lower_to_torch(g)(x))


def test_import_rejects_non_module_and_bad_inputs() -> None:
    with pytest.raises(LrccError, match="nn.Module"):
        import_module(lambda x: x, (torch.randn(2, 3),))
    with pytest.raises(LrccError, match="non-empty tuple"):
        import_module(Opaque(), ())
    with pytest.raises(LrccError, match=r"example_inputs\[0\]"):
        import_module(Opaque(), ([1.0, 2.0],))
