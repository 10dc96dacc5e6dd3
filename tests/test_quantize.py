"""Quantised, low-rank + quantised and sparse + low-rank forms, and the joint planner over them."""
from __future__ import annotations

import math
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrcc
from lrcc import Budget
from lrcc.codegen.torch_module import CompressedLinear, lower_to_torch
from lrcc.ir.from_torch import import_module
from lrcc.ir.graph import print_graph, verify
from lrcc.rewrites import factorize_linear, match, quantize_linear, quantize_lowrank, sparsify_lowrank
from lrcc.rewrites.quantize import (QuantSpec, awq_scales, dequantize, pack, padded_columns, quant_bytes, quant_parts,
                                    quantize_gptq, quantize_rtn, stored_weight, unpack)
from lrcc.rewrites.rule import replace_site
from lrcc.rewrites.sparse_low_rank import csr_parts, sparse_bytes


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int, rows: int = 2000, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few loud channels, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / n ** 0.5
    loud = torch.ones(n)
    loud[: max(1, n // 16)] = 8.0
    return (torch.randn(rows, n, generator=gen) @ mix + 0.1 * torch.randn(rows, n, generator=gen)) * loud


def _weight(m: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) / n ** 0.5


def _out_err(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor) -> float:
    return float((x.double() @ (w2.double() - w.double()).T).pow(2).sum())


# --- storage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 37, 64])
def test_pack_round_trip_and_size(bits, cols) -> None:
    codes = torch.randint(0, 1 << bits, (5, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[1] == (cols if bits == 8 else math.ceil(cols / 8) * bits)
    assert torch.equal(unpack(packed, bits, cols), codes)


@pytest.mark.parametrize("spec", [QuantSpec(8, 0), QuantSpec(4, 32), QuantSpec(4, 128), QuantSpec(3, 64), QuantSpec(2, 64)])
@pytest.mark.parametrize("shape", [(24, 64), (16, 50), (40, 200)])
def test_quant_bytes_is_what_is_stored(spec, shape) -> None:
    w = _weight(*shape)
    parts = quant_parts(*quantize_rtn(w, spec), spec)
    assert sum(t.numel() * t.element_size() for t in parts.values()) == quant_bytes(*shape, spec)
    assert parts["scale"].dtype == torch.float16 and parts["codes"].dtype == torch.uint8


@pytest.mark.parametrize("spec", [QuantSpec(8, 0), QuantSpec(4, 32), QuantSpec(4, 64)])
def test_rtn_error_is_at_most_half_a_step(spec) -> None:
    """Round to nearest: every weight lands within half a step, plus what storing the scale in fp16
    (relative error <= 2^-11) can shift the far end of the grid by: qmax steps times that."""
    w = _weight(16, 96)
    codes, scale, zero = quantize_rtn(w, spec)
    w2 = dequantize(codes, scale, zero, 96)
    g = 96 if spec.group == 0 else spec.group
    step = scale.repeat_interleave(g, dim=1)[:, :96]
    qmax = (1 << spec.bits) - 1
    assert ((w2 - w).abs() <= step * (0.5 + qmax * 2.0 ** -11) + 1e-7).all()


@pytest.mark.parametrize("spec", [QuantSpec(3, 64), QuantSpec(2, 32), QuantSpec(2, 64)])
def test_low_bit_clipping_search_beats_the_min_max_grid(spec) -> None:
    """At <= 3 bits the grid's range is searched: its squared error is never above min-max RTN's."""
    w = _weight(16, 128)
    w[:, 3] *= 6  # an outlier column
    searched = dequantize(*quantize_rtn(w, spec), 128)
    qmax = (1 << spec.bits) - 1
    wg = w.reshape(-1, spec.group)
    lo, hi = wg.min(1).values.clamp(max=0), wg.max(1).values.clamp(min=0)
    scale = ((hi - lo) / qmax).half().float()
    zero = torch.round(-lo / scale)
    minmax = ((torch.clamp(torch.round(wg / scale[:, None]) + zero[:, None], 0, qmax) - zero[:, None]) * scale[:, None])
    err_searched = (searched - w).pow(2).sum()
    err_minmax = (minmax.reshape(w.shape) - w).pow(2).sum()
    assert err_searched < err_minmax


def test_groups_that_do_not_divide_are_padded() -> None:
    w = _weight(8, 50)
    spec = QuantSpec(4, 32)
    codes, scale, zero = quantize_rtn(w, spec)
    assert codes.shape == (8, padded_columns(50, 32)) == (8, 64) and scale.shape == (8, 2)
    assert dequantize(codes, scale, zero, 50).shape == (8, 50)


# --- the laws the rules rely on -------------------------------------------------------------------
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 128), QuantSpec(3, 64), QuantSpec(2, 64), QuantSpec(8, 0)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output(spec, act_order) -> None:
    x = _data(128)
    w = _weight(48, 128)
    rtn = dequantize(*quantize_rtn(w, spec), 128)
    gptq = dequantize(*quantize_gptq(w, x.T @ x, spec, act_order=act_order), 128)
    assert _out_err(x, w, gptq) < _out_err(x, w, rtn)


def test_awq_scaling_never_worse_than_plain_rtn() -> None:
    x = _data(64)
    w = _weight(32, 64)
    spec = QuantSpec(4, 32)
    a = x.T @ x
    s, alpha = awq_scales(w, a, x.shape[0], spec)
    scaled = dequantize(*quantize_rtn(w * s, spec), 64) / s
    plain = dequantize(*quantize_rtn(w, spec), 64)
    assert _out_err(x, w, scaled) <= _out_err(x, w, plain) * (1 + 1e-6)
    s0, _ = awq_scales(w, a, x.shape[0], spec, alphas=(0.0,))
    assert torch.equal(s0, torch.ones(64))  # alpha 0 is plain RTN


def test_csr_parts_reconstruct_the_sparse_part() -> None:
    w = _weight(20, 30)
    mask = w.abs() > 0.2
    parts = csr_parts(w, mask)
    assert sum(t.numel() * t.element_size() for t in parts.values()) == sparse_bytes(20, 30, int(mask.sum()))
    dense = stored_weight(parts, {"m": 20, "n": 30})
    torch.testing.assert_close(dense, torch.where(mask, w.half().float(), torch.zeros(())))


# --- rules on a graph --------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 64)
        self.tiny = nn.Linear(64, 4)

    def forward(self, x):
        return self.tiny(self.fc2(F.gelu(self.fc1(x))))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    g, _ = import_module(model, (torch.randn(4, 64),))
    return model, g


class _Stats:
    def __init__(self, g, x):
        self.sums, self.tokens = {}, {}
        h = x
        for n in g.sites():
            site = n.attrs["site"]
            w = g.tensor(n.inputs[1])
            self.sums[site] = (h.T @ h).double()
            self.tokens[site] = h.shape[0]
            b = g.tensor(n.inputs[2]) if len(n.inputs) > 2 else None
            h = F.linear(h, w, b)
            if site == "fc1":
                h = F.gelu(h)

    def xtx(self, site):
        return self.sums[site]


AFTER_QUANT = """\
%p_fc1_weight = param @fc1.weight : f32[96, 64]
%p_fc1_bias = param @fc1.bias : f32[96]
%p_fc2_bias = param @fc2.bias : f32[64]
%p_tiny_weight = param @tiny.weight : f32[4, 64]
%p_tiny_bias = param @tiny.bias : f32[4]
%x = input #0 : f32[B, 64]
%linear = linear(%x, %p_fc1_weight, %p_fc1_bias) : f32[B, 96]
%gelu = aten.gelu.default(%linear) : f32[B, 96]
%linear_1_codes = param @fc2.codes : u8[64, 48]
%linear_1_scale = param @fc2.scale : f16[64, 3]
%linear_1_zero = param @fc2.zero : f16[64, 3]
%linear_1 = compressed_linear(%gelu, %linear_1_codes, %linear_1_scale, %linear_1_zero, %p_fc2_bias, bits=4, cols=96, group=32, m=64, n=96, roles=['codes', 'scale', 'zero', 'bias']) : f32[B, 64]
%linear_2 = linear(%linear_1, %p_tiny_weight, %p_tiny_bias) : f32[B, 4]
return [%linear_2]
"""


def test_quantize_rule_golden_and_numerics(mlp) -> None:
    model, g = mlp
    m = match(g, [quantize_linear], {"quant_methods": ("gptq",)})
    assert m.fired == {"quantize_linear": 2}
    assert [s for s, _, _ in m.rejected] == ["tiny"]  # 4 x 64: too small for group-wise
    x = torch.randn(500, 64)
    stats = _Stats(g, x)
    cand = next(c for c in m.candidates["fc2"] if c.knobs["bits"] == 4 and c.knobs["group"] == 32)
    delta = cand.spectrum(stats)
    assert cand.bytes == sum(t.numel() * t.element_size() for t in delta.parts.values()) + 4 * 64
    new = g.copy()
    replace_site(new, cand.node, dict(delta.parts), dict(delta.attrs))
    new.remove_unused_params()
    verify(new)
    assert print_graph(new) == AFTER_QUANT
    xin = torch.randn(7, 64)
    with torch.no_grad():
        want = model.tiny(F.linear(F.gelu(model.fc1(xin)), model.fc2.weight + delta.dw, model.fc2.bias))
        got = lower_to_torch(new)(xin)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", [quantize_lowrank, sparsify_lowrank])
def test_hybrid_rules_module_matches_stored_weight(mlp, rule) -> None:
    model, g = mlp
    m = match(g, [rule])
    assert m.fired[rule.name] >= 1
    stats = _Stats(g, torch.randn(500, 64))
    for cand in m.candidates["fc1"]:
        delta = cand.spectrum(stats)
        assert cand.bytes == sum(t.numel() * t.element_size() for t in delta.parts.values()) + 4 * 96
        mod = CompressedLinear({**delta.parts, "bias": model.fc1.bias.detach()}, 96, 64, delta.attrs.get("bits"),
                               delta.attrs.get("cols"))
        xin = torch.randn(5, 64)
        torch.testing.assert_close(mod(xin), F.linear(xin, model.fc1.weight.detach() + delta.dw, model.fc1.bias.detach()),
                                   rtol=1e-4, atol=1e-4)


def test_compressed_linear_verify_rejects_half_a_part(mlp) -> None:
    _, g = mlp
    new = g.copy()
    w = g.tensor(new.sites()[1].inputs[1])
    spec = QuantSpec(4, 32)
    parts = quant_parts(*quantize_rtn(w, spec), spec)
    del parts["zero"]
    replace_site(new, new.sites()[1].name, parts, {"m": 64, "n": 96, "bits": 4, "cols": 96})
    with pytest.raises(lrcc.LrccError, match="zero"):
        verify(new)


# --- the joint planner -----------------------------------------------------------------------------
class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 128)
        self.c = nn.Linear(128, 32)

    def forward(self, x):
        return self.c(F.gelu(self.b(F.gelu(self.a(x)))))


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    model = Wide().eval()
    gen = torch.Generator().manual_seed(3)
    mix = torch.randn(64, 64, generator=gen)
    batches = [(torch.randn(b, 64, generator=gen) @ mix,) for b in (64, 48, 80, 64, 56, 64, 72, 64)]
    return model, batches


@pytest.fixture(scope="module")
def plans(wide):
    model, batches = wide
    out = {}
    for name, rules in (("joint", None), ("lowrank", [factorize_linear]), ("quant", [quantize_linear])):
        opts = {"sequential": False} if rules is None else {"sequential": False, "rules": rules}
        out[name] = lrcc.compile(model, batches[0], budget=Budget(bytes=0.2), calibration=batches, options=opts)
    return out


def test_bytes_budget_holds_and_the_artifact_is_that_small(plans, wide, tmp_path) -> None:
    cm = plans["joint"]
    t = cm.report.totals
    assert t["bytes_after"] <= 0.2 * t["bytes_before"]
    out = cm.save(tmp_path / "m")
    raw = (out / "weights.safetensors").read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    site_refs = [r for r in cm.graph.tensors if r.split(".")[0] in {"a", "b", "c"}]
    site_bytes = sum(cm.graph.tensors[r].numel() * cm.graph.tensors[r].element_size() for r in site_refs)
    assert site_bytes == t["bytes_after"]          # what the report counts is what is stored
    assert len(raw) == 8 + header + site_bytes      # and the file holds nothing else
    again = lrcc.load(out)
    x = wide[1][0][0]
    assert torch.equal(again(x), cm(x))


def test_joint_plan_at_least_as_good_as_each_single_form(plans) -> None:
    """Same probes, same candidates: the exact solver over the union can only do better."""
    joint = plans["joint"].report.totals["error"]
    assert joint <= plans["lowrank"].report.totals["error"] * (1 + 1e-6)
    assert joint <= plans["quant"].report.totals["error"] * (1 + 1e-6)
    assert {r["rule"] for r in plans["quant"].report.rows} <= {"quantize_linear", "-"}


def test_bytes_budget_below_reach_names_the_smallest(wide) -> None:
    model, batches = wide
    with pytest.raises(lrcc.BudgetError, match="smallest reachable"):
        lrcc.compile(model, batches[0], budget=Budget(bytes=0.01), calibration=batches,
                     options={"rules": [quantize_linear]})
