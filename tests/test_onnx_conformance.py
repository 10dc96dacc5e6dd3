"""ONNX backend node tests for the operators transformer and MLP exports lean on: every case passes
through import, torch.export into the IR and lowering (benchmarks/onnx_conformance.py runs them all)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.backend.test.case.test_case import TestCase  # noqa: E402

from lrcc.ir.from_onnx import SUPPORTED_OPS  # noqa: E402
from lrcc.ir.onnx_conformance import case_op, node_test_cases, run_case, run_conformance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CORE_OPS = ["Gemm", "MatMul", "Softmax", "LayerNormalization", "Add", "Relu", "Transpose", "Reshape",
            "LayerNormalization (expanded)", "Softmax (expanded)"]
# the brief's list of operators torch.onnx.export produces for encoders and MLPs
EXPORTER_OPS = ["Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Relu", "Sigmoid", "Softmax",
                "LayerNormalization", "ReduceMean", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Concat", "Gather",
                "Shape", "Slice", "Cast", "Constant", "ConstantOfShape", "Where", "Equal", "Expand", "Identity", "Neg",
                "Exp", "Log", "Max", "Min", "Flatten", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Gelu",
                "Range", "Split"]
# cases that cannot pass, and why: torch has no CPU arithmetic for unsigned 16/32/64-bit integers
ELEMENT_TYPE_CASES = {"test_add_uint16", "test_add_uint32", "test_add_uint64"}


def test_exporter_ops_are_claimed() -> None:
    assert not [op for op in EXPORTER_OPS if op not in SUPPORTED_OPS]


@pytest.fixture(scope="module")
def core():
    return run_conformance(CORE_OPS)


def test_every_core_case_passes(core) -> None:
    ran = {r.op for r in core.results}
    assert ran == set(CORE_OPS), set(CORE_OPS) - ran
    assert core.skipped == 0  # every case of these operators uses only supported operators
    failures = {r.name: r.reason for r in core.results if not r.passed}
    assert set(failures) == ELEMENT_TYPE_CASES, failures
    for name in ELEMENT_TYPE_CASES:
        assert "element type UINT" in failures[name] and "not supported" in failures[name]
    per_op = core.per_op
    assert per_op["Gemm"]["cases"] >= 10 and per_op["Gemm"]["passed"] == per_op["Gemm"]["cases"]
    assert per_op["LayerNormalization (expanded)"]["passed"] >= 30  # shape arithmetic: Shape, Slice, Concat, ...


def test_case_names_map_to_their_operator() -> None:
    by_name = {c.name: c for c in node_test_cases()}
    assert case_op(by_name["test_gemm_default_no_bias"]) == "Gemm"
    assert case_op(by_name["test_layer_normalization_2d_axis0_expanded"]) == "LayerNormalization (expanded)"
    assert case_op(by_name["test_greater_equal_expanded"]) == "GreaterOrEqual (expanded)"


def _relu_case(expected: np.ndarray) -> TestCase:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    x = np.array([[-1, 0, 1], [2, -3, 4]], np.float32)
    return TestCase("test_my_relu", "test_my_relu", None, None, model, [([x], [expected])], "node", 1e-3, 1e-7)


def test_harness_detects_wrong_values_shapes_and_types() -> None:
    good = np.array([[0, 0, 1], [2, 0, 4]], np.float32)
    assert run_case(_relu_case(good)).passed
    off = run_case(_relu_case(good + np.float32(1e-3)))
    assert not off.passed and "differs" in off.reason
    shape = run_case(_relu_case(good.reshape(3, 2)))
    assert not shape.passed and "shape" in shape.reason
    dtype = run_case(_relu_case(good.astype(np.float64)))
    assert not dtype.passed and "element type" in dtype.reason
