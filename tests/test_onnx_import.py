"""ONNX in: models exported by both torch.onnx exporters import as equivalent torch modules, their
linear layers become lrcc sites, they compile, and bad files give one clear LrccError."""
from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lrcc  # noqa: E402
from lrcc import LrccError  # noqa: E402
from lrcc.codegen.torch_module import lower_to_torch  # noqa: E402
from lrcc.ir.from_onnx import SUPPORTED_OPS, onnx_to_module  # noqa: E402
from lrcc.ir.from_torch import import_module  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64, out: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    """A post-norm encoder block: nn.Linear projections, softmax attention, GELU MLP, batch first."""

    def __init__(self, d: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        hd = d // self.heads
        q, k, v = (p(x).view(b, l, self.heads, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = self.ln1(x + self.o((a @ v).transpose(1, 2).reshape(b, l, d)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


def _export(model: nn.Module, args: tuple, path, dynamo: bool, dims: dict[int, str], opset: int | None = None) -> str:
    model.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=(dims,), opset_version=opset)
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": dims, "y": dims})
    return str(path)


def _ort(path: str, *inputs: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Each model exported by each exporter: {(name, exporter): (torch model, path)}."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("onnx")
    mlp, block = MLP(), Block()
    out = {}
    for exporter in ("dynamo", "legacy"):
        dyn = exporter == "dynamo"
        out["mlp", exporter] = mlp, _export(mlp, (torch.randn(2, 32),), d / f"mlp_{exporter}.onnx", dyn, {0: "batch"})
        out["block", exporter] = block, _export(block, (torch.randn(2, 5, 32),), d / f"block_{exporter}.onnx", dyn,
                                                {0: "batch", 1: "seq"})
    # nn.TransformerEncoderLayer: the legacy exporter of this torch fails on its attention
    # (scaled_dot_product_attention's is_causal), so the dynamo exporter only
    tel = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    out["encoder_layer", "dynamo"] = tel, _export(tel, (torch.randn(2, 5, 32),), d / "tel_dynamo.onnx", True,
                                                  {0: "batch", 1: "seq"})
    # at opset 23 the dynamo exporter writes attention as one Attention node, imported through its function body
    out["encoder_layer", "opset23"] = tel, _export(tel, (torch.randn(2, 5, 32),), d / "tel_opset23.onnx", True,
                                                   {0: "batch", 1: "seq"}, opset=23)
    return out


CASES = [("mlp", "dynamo"), ("mlp", "legacy"), ("block", "dynamo"), ("block", "legacy"), ("encoder_layer", "dynamo"),
         ("encoder_layer", "opset23")]


@pytest.mark.parametrize("name,exporter", CASES)
def test_imported_module_matches_onnxruntime_and_torch(exported, name, exporter) -> None:
    model, path = exported[name, exporter]
    if exporter == "opset23":
        assert "Attention" in {n.op_type for n in onnx.load(path).graph.node}
    module, examples = onnx_to_module(path)
    x = torch.randn(3, 32) if name == "mlp" else torch.randn(3, 7, 32)  # not the export shapes
    want = _ort(path, x)
    with torch.no_grad():
        got = module(x).numpy()
        ref = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # example inputs: symbolic dims become 2 (batch) and 8 (others)
    assert [tuple(e.shape) for e in examples] == ([(2, 32)] if name == "mlp" else [(2, 8, 32)])


@pytest.mark.parametrize("name,exporter", CASES)
def test_linear_layers_become_sites_with_symbolic_dims(exported, name, exporter) -> None:
    model, path = exported[name, exporter]
    module, examples = onnx_to_module(path)
    g, _ = import_module(module, examples)
    linears = [n for n in g.nodes if n.op == "linear"]
    # every nn.Linear, and the encoder layer's packed q/k/v projection (a bare parameter), is a site
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules()) + (name == "encoder_layer")
    assert len(linears) == n_linear, [n.attrs["site"] for n in linears]
    if name != "encoder_layer":  # every bias was folded into its linear (MatMul + Add, Gemm's C)
        assert all(len(n.inputs) == 3 for n in linears)
    sites = {n.attrs["site"] for n in linears}
    if name == "mlp":  # Gemm weights keep their initializer names
        assert sites == {"fc1", "fc2"}
    expected_dims = {"B"} if name == "mlp" else {"B", "L"}
    assert expected_dims <= set(g.symbols)
    low = lower_to_torch(g)
    x = torch.randn(5, 32) if name == "mlp" else torch.randn(3, 11, 32)
    np.testing.assert_allclose(low(x).detach().numpy(), _ort(path, x), rtol=1e-5, atol=1e-5)


def test_compile_onnx_block(exported) -> None:
    _, path = exported["block", "legacy"]
    torch.manual_seed(1)
    calibration = [(torch.randn(4, 8, 32),) for _ in range(8)]
    cm = lrcc.compile(path, budget="params=0.5", calibration=calibration)
    rows = cm.report.rows
    assert len(rows) == 6
    assert any(r["choice"].startswith("rank") for r in rows)
    assert cm.report.totals["params_after"] <= 0.5 * cm.report.totals["params_before"]
    x = torch.randn(3, 10, 32)
    want = torch.from_numpy(_ort(path, x))
    got = cm(x)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.3, rel  # compressed to half the parameters: close, not equal


def test_compile_onnx_mlp_dynamo_with_default_examples(exported) -> None:
    _, path = exported["mlp", "dynamo"]
    cm = lrcc.compile(path, budget="params=0.5", calibration=[(torch.randn(16, 32),) for _ in range(4)])
    assert {r["site"] for r in cm.report.rows} == {"fc1", "fc2"}
    assert any(r["choice"].startswith("rank") for r in cm.report.rows)


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_gemm_attributes_fold_into_the_linear() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # transB=0: (in, out)... here A^T is (N, 6)
    c = rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("Gemm", ["a", "w", "c"], ["y"], name="gemm", transA=1, transB=0, alpha=0.5, beta=2.0)
    model = _model([node], [_vi("a", [6, "n"])], [_vi("y", ["n", 4])],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    module, examples = onnx_to_module(model)
    assert [tuple(e.shape) for e in examples] == [(6, 8)]
    a = torch.randn(6, 5)
    want = 0.5 * a.numpy().T @ w + 2.0 * c
    np.testing.assert_allclose(module(a).numpy(), want, rtol=1e-5, atol=1e-5)
    g, _ = import_module(module, (a,))
    (lin,) = [n for n in g.nodes if n.op == "linear"]
    assert lin.attrs["site"] == "w" and len(lin.inputs) == 3


def test_matmul_with_bias_first_add_becomes_one_linear() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "layer.0.weight"], ["mm"], name="mm"),
             helper.make_node("Add", ["layer.0.bias", "mm"], ["y"], name="add")]  # bias first, as the legacy exporter
    model = _model(nodes, [_vi("x", ["b", "l", 8])], [_vi("y", ["b", "l", 3])],
                   [numpy_helper.from_array(w, "layer.0.weight"), numpy_helper.from_array(b, "layer.0.bias")])
    module, examples = onnx_to_module(model)
    x = torch.randn(2, 3, 8)
    np.testing.assert_allclose(module(x).numpy(), x.numpy() @ w + b, rtol=1e-5, atol=1e-5)
    g, _ = import_module(module, examples)
    (lin,) = [n for n in g.nodes if n.op == "linear"]
    assert lin.attrs["site"] == "layer.0"
    assert not [n for n in g.nodes if n.op == "aten" and "add" in n.attrs["target"]]


def test_example_inputs_token_ids_and_masks() -> None:
    table = numpy_helper.from_array(np.zeros((50, 4), np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["y"])]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    model = _model(nodes, [_vi("input_ids", ["batch", "seq"], TensorProto.INT64),
                           _vi("attention_mask", ["batch", "seq"], TensorProto.INT64)],
                   [_vi("y", ["batch", "seq", 4])], [table, axes])
    module, (ids, mask) = onnx_to_module(model)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < 50  # below the embedding table's size
    assert set(mask.unique().tolist()) <= {0, 1} and (mask[:, 0] == 1).all()
    assert module(ids, mask).shape == (2, 8, 4)


def test_missing_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LrccError) as e:
        onnx_to_module("model.onnx")
    assert str(e.value) == "model.onnx: no such file"
    with pytest.raises(LrccError, match="model.onnx: no such file"):
        lrcc.compile("model.onnx", budget="params=0.5")


def test_truncated_and_garbage_files(exported, tmp_path) -> None:
    _, path = exported["block", "legacy"]
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(LrccError) as e:
        onnx_to_module(truncated)
    assert str(truncated) in str(e.value) and "not a valid ONNX model" in str(e.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(LrccError) as e:
        onnx_to_module(garbage)
    assert str(garbage) in str(e.value) and "not a valid ONNX model" in str(e.value)


def test_unsupported_ops_are_listed_with_their_nodes(tmp_path) -> None:
    assert "NonMaxSuppression" not in SUPPORTED_OPS and "Unique" not in SUPPORTED_OPS
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms_a"),
             helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel2"], name="nms_b"),
             helper.make_node("Unique", ["scores"], ["vals"], name="unique_1"),
             helper.make_node("Relu", ["scores"], ["r"], name="fine")]
    model = _model(nodes, [_vi("boxes", [1, 4, 4]), _vi("scores", [1, 1, 4])],
                   [_vi("sel", ["n", 3], TensorProto.INT64), _vi("sel2", ["n", 3], TensorProto.INT64),
                    _vi("vals", ["u"]), _vi("r", [1, 1, 4])], opset=11)
    path = tmp_path / "nms.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LrccError) as e:
        onnx_to_module(path)
    msg = str(e.value)
    assert str(path) in msg
    for word in ("NonMaxSuppression", "nms_a", "nms_b", "Unique", "unique_1"):
        assert word in msg
    assert "fine" not in msg and "Relu" not in msg.split("supports")[0]


def test_checker_rejects_a_broken_graph(tmp_path) -> None:
    node = helper.make_node("Relu", ["nowhere"], ["y"], name="r")  # reads a value nothing defines
    model = _model([node], [_vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(LrccError, match="not a valid ONNX model"):
        onnx_to_module(model)
