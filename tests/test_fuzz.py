"""Fuzzing the front doors: the ONNX importer, the budget parser and the CLI's budget flag.

The contract: whatever bytes or text come in, lrcc either accepts them or raises an LrccError
(a subclass included) with a message; the CLI answers with exit code 2 and one line on stderr.
Any other exception is a bug in lrcc.

ONNX: a few small valid seed models (built with onnx.helper, plus one torch.onnx export) are
mutated: bytes truncated, flipped, inserted and deleted, and the graph changed through the protobuf
API (inputs dropped or left dangling, duplicate names, cycles, unknown or swapped operators,
initializers with wrong dims or element types, NaN/Inf, zero-size and huge tensors, attributes of
the wrong type or value, broken graph inputs/outputs, missing or odd opsets, external data).
Each mutant is written to a file and given to `onnx_to_module`; when that succeeds the module runs
on its example inputs. A run that fails must fail with an LrccError, and where that error wraps a
torch error while onnxruntime runs the same file, the converter is wrong: also a bug.

The default run does 1,000 ONNX mutants and 1,000 budget inputs (a seeded mutator and hypothesis
with derandomize=True, so a failure names a case that reproduces). The long campaign:

    python benchmarks/fuzz.py --onnx 10000 --budget 10000
    pytest -m fuzz tests/test_fuzz.py      # the same sizes from pytest (deselected by default)
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import random
import re
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrcc import LrccError  # noqa: E402
from lrcc.budget import Budget, parse_size  # noqa: E402
from lrcc.errors import BudgetError  # noqa: E402
from lrcc.ir.from_onnx import SUPPORTED_OPS, onnx_to_module  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# seed models


def _vi(name: str, shape, elem: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name: str, array: np.ndarray):
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17, name: str = "seed"):
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _seed_mlp(rng: np.random.Generator):
    """Gemm (transB) -> Relu -> MatMul + Add: the two linear idioms of ONNX exporters."""
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1, alpha=1.0),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
             helper.make_node("Add", ["m", "b2"], ["y"], name="fc2_bias")]
    inits = [_init("fc1.weight", rng.standard_normal((16, 8), dtype=np.float32)),
             _init("fc1.bias", rng.standard_normal(16, dtype=np.float32)),
             _init("w2", rng.standard_normal((16, 4), dtype=np.float32)),
             _init("b2", rng.standard_normal(4, dtype=np.float32))]
    return _model(nodes, [_vi("x", ["B", 8])], [_vi("y", ["B", 4])], inits, name="mlp")


def _seed_conv(rng: np.random.Generator):
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm -> Softmax on a fixed-size image."""
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3], strides=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "head.w", "head.b"], ["g"], name="head", transB=1),
             helper.make_node("Softmax", ["g"], ["y"], name="softmax", axis=-1)]
    inits = [_init("conv.w", rng.standard_normal((4, 2, 3, 3), dtype=np.float32)),
             _init("conv.b", rng.standard_normal(4, dtype=np.float32)),
             _init("head.w", rng.standard_normal((3, 64), dtype=np.float32)),
             _init("head.b", rng.standard_normal(3, dtype=np.float32))]
    return _model(nodes, [_vi("x", [1, 2, 8, 8])], [_vi("y", [1, 3])], inits, name="conv")


def _seed_attention(rng: np.random.Generator):
    """One attention head pair with shape arithmetic (Shape -> Gather -> Concat -> Reshape),
    Transpose, scaled Softmax and LayerNormalization, on symbolic B and L."""
    def i64(*v):
        return np.asarray(v, dtype=np.int64)
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["b"], name="get_b", axis=0),
             helper.make_node("Gather", ["shape", "one"], ["l"], name="get_l", axis=0),
             helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"], name="unsq_b"),
             helper.make_node("Unsqueeze", ["l", "axes0"], ["l1"], name="unsq_l"),
             helper.make_node("Concat", ["b1", "l1", "heads"], ["split_shape"], name="cat", axis=0),
             helper.make_node("Reshape", ["q", "split_shape"], ["q4"], name="q_split"),
             helper.make_node("Reshape", ["v", "split_shape"], ["v4"], name="v_split"),
             helper.make_node("Transpose", ["q4"], ["qt"], name="q_t", perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["v4"], ["vt"], name="v_t", perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["q4"], ["kt"], name="k_t", perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["qt", "kt"], ["s"], name="scores"),
             helper.make_node("Div", ["s", "scale"], ["ss"], name="scale"),
             helper.make_node("Softmax", ["ss"], ["a"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["a", "vt"], ["o"], name="mix"),
             helper.make_node("Transpose", ["o"], ["ot"], name="o_t", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["ot", "merge_shape"], ["m"], name="merge"),
             helper.make_node("LayerNormalization", ["m", "ln.scale", "ln.bias"], ["y"], name="ln", axis=-1,
                              epsilon=1e-5)]
    inits = [_init("wq", rng.standard_normal((8, 8), dtype=np.float32)),
             _init("wv", rng.standard_normal((8, 8), dtype=np.float32)),
             _init("zero", i64(0).reshape(())), _init("one", i64(1).reshape(())), _init("axes0", i64(0)),
             _init("heads", i64(2, 4)), _init("scale", np.asarray(2.0, dtype=np.float32)),
             _init("merge_shape", i64(0, 0, 8)),
             _init("ln.scale", np.ones(8, dtype=np.float32)), _init("ln.bias", np.zeros(8, dtype=np.float32))]
    return _model(nodes, [_vi("x", ["B", "L", 8])], [_vi("y", ["B", "L", 8])], inits, name="attention")


def _seed_tokens(rng: np.random.Generator):
    """Token ids through an embedding table, a mask, Slice / Expand / ReduceMean (opset 18 axes
    input), Cast, Where, Clip, Erf, and MeanVarianceNormalization (expanded as an ONNX function)."""
    def i64(*v):
        return np.asarray(v, dtype=np.int64)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
             helper.make_node("Cast", ["mask"], ["mf"], name="mask_f", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axes_last"], ["m3"], name="mask_3d"),
             helper.make_node("Mul", ["e", "m3"], ["em"], name="masked"),
             helper.make_node("Slice", ["em", "starts", "ends", "axes_last", "steps"], ["sl"], name="slice"),
             helper.make_node("Expand", ["sl", "ones3"], ["ex"], name="expand"),
             helper.make_node("ReduceMean", ["ex", "axes1"], ["pooled"], name="pool", keepdims=0),
             helper.make_node("Greater", ["pooled", "zero_f"], ["pos"], name="gt"),
             helper.make_node("Where", ["pos", "pooled", "neg"], ["w"], name="where"),
             helper.make_node("Clip", ["w", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("Erf", ["c"], ["er"], name="erf"),
             helper.make_node("Unsqueeze", ["er", "axes1"], ["er3"], name="unsq"),
             helper.make_node("MeanVarianceNormalization", ["er3"], ["mv"], name="mvn", axes=[0, 2]),
             helper.make_node("Squeeze", ["mv", "axes1"], ["y"], name="squeeze")]
    inits = [_init("table", rng.standard_normal((20, 6), dtype=np.float32)),
             _init("axes_last", i64(-1)), _init("axes1", i64(1)),
             _init("starts", i64(1)), _init("ends", i64(5)), _init("steps", i64(1)), _init("ones3", i64(1, 1, 1)),
             _init("zero_f", np.asarray(0.0, dtype=np.float32)), _init("neg", np.asarray(-0.5, dtype=np.float32)),
             _init("lo", np.asarray(-1.0, dtype=np.float32)), _init("hi", np.asarray(1.0, dtype=np.float32))]
    inputs = [_vi("ids", ["B", "L"], TensorProto.INT64), _vi("mask", ["B", "L"], TensorProto.INT64)]
    return _model(nodes, inputs, [_vi("y", ["B", 4])], inits, opset=18, name="tokens")


def _seed_vision(rng: np.random.Generator):
    """Pad -> ConvTranspose -> BatchNormalization -> AveragePool -> Split -> Concat ->
    GlobalAveragePool -> Flatten -> TopK, ArgMax: the image operators and multi-output nodes."""
    def f32(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    nodes = [helper.make_node("Pad", ["x", "pads", "pad_value"], ["p"], name="pad", mode="constant"),
             helper.make_node("ConvTranspose", ["p", "up.w", "up.b"], ["u"], name="up", strides=[2, 2],
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], output_padding=[1, 1]),
             helper.make_node("BatchNormalization", ["u", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"],
                              name="bn", epsilon=1e-5),
             helper.make_node("AveragePool", ["b"], ["a"], name="avg", kernel_shape=[2, 2], strides=[2, 2],
                              count_include_pad=0),
             helper.make_node("Split", ["a", "split"], ["s0", "s1"], name="split", axis=1),
             helper.make_node("Concat", ["s1", "s0"], ["c"], name="concat", axis=1),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat", axis=1),
             helper.make_node("TopK", ["f", "k"], ["values", "indices"], name="topk", axis=-1, largest=1),
             helper.make_node("ArgMax", ["f"], ["best"], name="argmax", axis=1, keepdims=0)]
    inits = [_init("pads", np.asarray([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)),
             _init("pad_value", np.asarray(0.5, dtype=np.float32)),
             _init("up.w", f32(3, 4, 3, 3)), _init("up.b", f32(4)),
             _init("bn.scale", f32(4)), _init("bn.bias", f32(4)), _init("bn.mean", f32(4)),
             _init("bn.var", np.abs(f32(4)) + 0.5), _init("split", np.asarray([1, 3], dtype=np.int64)),
             _init("k", np.asarray([2], dtype=np.int64))]
    outputs = [_vi("values", [1, 2]), _vi("indices", [1, 2], TensorProto.INT64), _vi("best", [1], TensorProto.INT64)]
    return _model(nodes, [_vi("x", [1, 3, 4, 4])], outputs, inits, opset=17, name="vision")


def _seed_indexing(rng: np.random.Generator):
    """Integer and indexing operators: Range, ConstantOfShape, GatherElements, ScatterND, OneHot,
    CumSum, Tile, Trilu, Einsum, Mod, Pow, Equal, Not, And, Cast."""
    def i64(*v):
        return np.asarray(v, dtype=np.int64)
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="zeros",
                              value=numpy_helper.from_array(np.asarray([0.0], dtype=np.float32))),
             helper.make_node("Range", ["r0", "r4", "r1"], ["ar"], name="range"),
             helper.make_node("Mod", ["ar", "two"], ["parity"], name="mod", fmod=0),
             helper.make_node("Equal", ["parity", "zero"], ["even"], name="even"),
             helper.make_node("Not", ["even"], ["odd"], name="not"),
             helper.make_node("And", ["odd", "true"], ["odd2"], name="and"),
             helper.make_node("Cast", ["odd2"], ["oddf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "oddf"], ["x1"], name="add"),
             helper.make_node("GatherElements", ["x1", "gidx"], ["ge"], name="gather_el", axis=1),
             helper.make_node("ScatterND", ["zeros", "sidx", "ge"], ["sc"], name="scatter"),
             helper.make_node("CumSum", ["sc", "axis1"], ["cs"], name="cumsum", exclusive=0, reverse=1),
             helper.make_node("Tile", ["cs", "reps"], ["t"], name="tile"),
             helper.make_node("Trilu", ["t", "diag"], ["tr"], name="trilu", upper=0),
             helper.make_node("Einsum", ["tr", "proj"], ["e"], name="einsum", equation="ij,jk->ik"),
             helper.make_node("Pow", ["e", "two_f"], ["sq"], name="pow"),
             helper.make_node("OneHot", ["ohidx", "depth", "ohvals"], ["oh"], name="onehot", axis=-1),
             helper.make_node("MatMul", ["sq", "oh"], ["y"], name="mix")]
    inits = [_init("r0", i64(0).reshape(())), _init("r4", i64(4).reshape(())), _init("r1", i64(1).reshape(())),
             _init("two", i64(2).reshape(())), _init("zero", i64(0).reshape(())), _init("true", np.asarray(True)),
             _init("gidx", i64(3, 2, 1, 0, 0, 1, 2, 3).reshape(2, 4)), _init("sidx", i64(1, 0).reshape(2, 1)),
             _init("axis1", i64(1).reshape(())), _init("reps", i64(2, 1)), _init("diag", i64(0).reshape(())),
             _init("proj", rng.standard_normal((4, 3), dtype=np.float32)),
             _init("two_f", np.asarray(2.0, dtype=np.float32)), _init("ohidx", i64(0, 2, 1)),
             _init("depth", i64(3).reshape(())), _init("ohvals", np.asarray([0.0, 1.0], dtype=np.float32))]
    return _model(nodes, [_vi("x", [2, 4])], [_vi("y", [4, 3])], inits, opset=17, name="indexing")


class _TinyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
        return self.norm(x + self.out((a @ v).transpose(1, 2).reshape(b, l, 8)))


def _seed_torch_export():
    """A tiny encoder block through torch.onnx.export (the exporter's own idioms)."""
    torch.manual_seed(0)
    model = _TinyBlock().eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "block.onnx")
        torch.onnx.export(model, (torch.randn(2, 5, 8),), path, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "B", 1: "L"}, "y": {0: "B", 1: "L"}})
        return onnx.load(path)


def seed_models(with_torch: bool = True) -> dict[str, bytes]:
    """The serialized seed models the ONNX fuzzer mutates, by name."""
    rng = np.random.default_rng(0)
    seeds = {"mlp": _seed_mlp(rng), "conv": _seed_conv(rng), "attention": _seed_attention(rng),
             "tokens": _seed_tokens(rng), "vision": _seed_vision(rng), "indexing": _seed_indexing(rng)}
    if with_torch:
        seeds["torch_block"] = _seed_torch_export()
    return {name: m.SerializeToString() for name, m in seeds.items()}


# ---------------------------------------------------------------------------------------------
# mutations


def _byte_mutation(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.choice(["truncate", "flip", "flip", "flip", "insert", "delete", "splice"])
    if kind == "truncate":
        return bytes(b[:rng.randrange(len(b))]), kind
    for _ in range(rng.randint(1, 8)):
        if not b:
            break
        i = rng.randrange(len(b))
        if kind == "flip":
            b[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        elif kind == "insert":
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif kind == "delete":
            del b[i:i + rng.randint(1, 4)]
        else:  # splice: copy a chunk of the file elsewhere
            j = rng.randrange(len(b))
            b[j:j] = b[i:i + rng.randint(1, 32)]
    return bytes(b), kind


def _value_names(m) -> list[str]:
    g = m.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    names += [o for n in g.node for o in n.output if o]
    return names


def _rename_everywhere(m, old: str, new: str) -> None:
    g = m.graph
    for n in g.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]
    for coll in (g.input, g.output, g.value_info, g.initializer):
        for v in coll:
            if v.name == old:
                v.name = new


_TRICKY_NAMES = ["", "a.b", "forward", "training", "_modules", "fc1", "fc1.weight.x", "0", "with space",
                 "ünïcode", "a..b", ".", "x", "y", "w2", "shape", "onnx::MatMul_1", "__init__", "weight", "h" * 300]
_UNKNOWN_OPS = ["FooBar", "", "relu", "LSTM", "Loop", "If", "NonZero", "Unique", "Scan", "Attention", "QLinearConv"]
_DOMAINS = ["com.microsoft", "ai.onnx.ml", "x.y", "ai.onnx", "com.lrcc"]
_INTS = [0, 1, -1, 2, 3, -2, 7, 99, -100, 2 ** 31, 2 ** 62, -(2 ** 63)]
_FLOATS = [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), 0.5]
_STRINGS = ["", "bogus", "SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "CRD", "DCR", "tanh", "none", "\x00"]
_DTYPES = [np.float16, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_]


def _pick_node(m, rng, with_inputs: bool = False):
    nodes = [n for n in m.graph.node if n.input or not with_inputs]
    return rng.choice(nodes) if nodes else None


def _mut_drop_input(m, rng):
    n = _pick_node(m, rng, with_inputs=True)
    if n is None:
        return
    k = rng.randrange(len(n.input))
    if rng.random() < 0.5:
        del n.input[k]
    else:
        n.input[k] = ""


def _mut_extra_input(m, rng):
    n = _pick_node(m, rng)
    if n is not None:
        n.input.append(rng.choice(_value_names(m) + ["", "ghost"]))


def _mut_dangling(m, rng):
    n = _pick_node(m, rng, with_inputs=True)
    if n is not None:
        n.input[rng.randrange(len(n.input))] = f"ghost_{rng.randrange(100)}"


def _mut_duplicate_output(m, rng):
    n = _pick_node(m, rng)
    if n is not None and n.output:
        n.output[rng.randrange(len(n.output))] = rng.choice(_value_names(m))


def _mut_cycle(m, rng):
    nodes = list(m.graph.node)
    if not nodes:
        return
    i = rng.randrange(len(nodes))
    j = rng.randrange(i, len(nodes))
    if nodes[i].input and nodes[j].output:
        nodes[i].input[rng.randrange(len(nodes[i].input))] = nodes[j].output[0]


def _mut_reorder(m, rng):
    nodes = list(m.graph.node)
    rng.shuffle(nodes)
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del m.graph.node[:]
    m.graph.node.extend(copies)


def _mut_unknown_op(m, rng):
    n = _pick_node(m, rng)
    if n is None:
        return
    if rng.random() < 0.3:
        n.domain = rng.choice(_DOMAINS)
    else:
        n.op_type = rng.choice(_UNKNOWN_OPS)


def _opset(m) -> int:
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)


def _schema(op: str, opset: int):
    try:
        return onnx.defs.get_schema(op, opset, "")
    except Exception:  # noqa: BLE001 - no such operator at this opset
        return None


def _mut_swap_op(m, rng):
    """Another supported operator that takes as many inputs and outputs (attributes it does not
    know dropped), so the checker lets it through and the converter meets odd operands."""
    n = _pick_node(m, rng)
    if n is None:
        return
    opset = _opset(m)
    fits = []
    for op in sorted(SUPPORTED_OPS):
        schema = _schema(op, opset)
        if (schema is not None and schema.min_input <= len(n.input) <= schema.max_input
                and schema.min_output <= len(n.output) <= schema.max_output
                and all(not a.required for a in schema.attributes.values())):
            fits.append((op, schema))
    if not fits:
        return
    op, schema = rng.choice(fits)
    n.op_type = op
    keep = [a for a in n.attribute if a.name in schema.attributes]
    del n.attribute[:]
    n.attribute.extend(keep)


def _mut_drop_node(m, rng):
    if m.graph.node:
        del m.graph.node[rng.randrange(len(m.graph.node))]


def _mut_dup_node(m, rng):
    n = _pick_node(m, rng)
    if n is not None:
        m.graph.node.insert(rng.randrange(len(m.graph.node) + 1), n)


def _pick_init(m, rng):
    return rng.choice(list(m.graph.initializer)) if m.graph.initializer else None


def _mut_init_dims(m, rng):
    t = _pick_init(m, rng)
    if t is None:
        return
    dims = list(t.dims)
    kind = rng.randrange(6)
    if kind == 0:
        dims.append(1)
    elif kind == 1 and dims:
        dims.pop(rng.randrange(len(dims)))
    elif kind == 2 and dims:
        dims[rng.randrange(len(dims))] = rng.choice([0, -1, 2 ** 40, 3, 5, 1])
    elif kind == 3:
        dims = []
    elif kind == 4:
        dims = [rng.choice([2 ** 31, 2 ** 62, 10 ** 6])] + dims
    else:  # the same data in another valid shape
        arr = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(arr.reshape(-1) if arr.ndim != 1 else arr.reshape(1, -1), t.name))
        return
    del t.dims[:]
    t.dims.extend(dims)


def _mut_init_dtype_raw(m, rng):
    t = _pick_init(m, rng)
    if t is not None:
        t.data_type = rng.randrange(0, 26)


def _mut_init_cast(m, rng):
    t = _pick_init(m, rng)
    if t is None:
        return
    arr = numpy_helper.to_array(t)
    kind = rng.randrange(len(_DTYPES) + 3)
    if kind < len(_DTYPES):
        t.CopyFrom(numpy_helper.from_array(arr.astype(_DTYPES[kind]), t.name))
    elif kind == len(_DTYPES):
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.BFLOAT16, arr.shape, arr.astype(np.float32).reshape(-1)))
    elif kind == len(_DTYPES) + 1:
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.STRING, arr.shape, [b"s"] * arr.size))
    else:
        t.CopyFrom(helper.make_tensor(t.name, rng.choice([TensorProto.FLOAT8E4M3FN, TensorProto.INT4,
                                                          TensorProto.COMPLEX64, TensorProto.UINT64]),
                                      arr.shape, np.zeros(arr.size).tolist() if arr.size else []))


def _mut_init_values(m, rng):
    t = _pick_init(m, rng)
    if t is None:
        return
    arr = np.array(numpy_helper.to_array(t))
    if arr.size == 0:
        return
    flat = arr.reshape(-1)
    if arr.dtype.kind == "f":
        v = rng.choice(_FLOATS)
        if rng.random() < 0.5:
            flat[rng.randrange(flat.size)] = v
        else:
            flat[:] = v
    elif arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        flat[rng.randrange(flat.size)] = max(info.min, min(info.max, rng.choice(_INTS)))
    t.CopyFrom(numpy_helper.from_array(flat.reshape(arr.shape), t.name))


def _mut_init_zero_size(m, rng):
    t = _pick_init(m, rng)
    if t is None:
        return
    arr = numpy_helper.to_array(t)
    shape = rng.choice([(0,), (0, max(arr.shape[-1:] or (1,))), tuple(0 if i == 0 else s for i, s in enumerate(arr.shape))])
    t.CopyFrom(numpy_helper.from_array(np.zeros(shape, dtype=arr.dtype), t.name))


def _mut_init_drop_or_dup(m, rng):
    t = _pick_init(m, rng)
    if t is None:
        return
    if rng.random() < 0.5:
        m.graph.initializer.remove(t)
    else:
        m.graph.initializer.append(t)


def _mut_rename(m, rng):
    names = _value_names(m)
    if names:
        _rename_everywhere(m, rng.choice(names), rng.choice(_TRICKY_NAMES + names))


def _attr_of_new_type(a, rng):
    choices = [helper.make_attribute(a.name, rng.choice(_INTS)),
               helper.make_attribute(a.name, rng.choice(_FLOATS)),
               helper.make_attribute(a.name, rng.choice(_STRINGS)),
               helper.make_attribute(a.name, [rng.choice(_INTS) for _ in range(rng.randint(0, 4))] or [1]),
               helper.make_attribute(a.name, [0.5, 1.5]),
               helper.make_attribute(a.name, numpy_helper.from_array(np.zeros((2, 2), dtype=np.float32))),
               helper.make_attribute(a.name, helper.make_graph([], "g", [], []))]
    return rng.choice(choices)


def _attr_new_value(a, rng):
    v = helper.get_attribute_value(a)
    if a.type == onnx.AttributeProto.INT:
        return helper.make_attribute(a.name, rng.choice(_INTS))
    if a.type == onnx.AttributeProto.FLOAT:
        return helper.make_attribute(a.name, rng.choice(_FLOATS))
    if a.type == onnx.AttributeProto.STRING:
        return helper.make_attribute(a.name, rng.choice(_STRINGS))
    if a.type == onnx.AttributeProto.INTS:
        v = list(v)
        kind = rng.randrange(5)
        if kind == 0:
            v = v[::-1]
        elif kind == 1 and v:
            v.pop(rng.randrange(len(v)))
        elif kind == 2:
            v.append(rng.choice(_INTS))
        elif kind == 3 and v:
            v[rng.randrange(len(v))] = rng.choice(_INTS)
        else:
            v = []
        return helper.make_attribute(a.name, v) if v else onnx.AttributeProto(name=a.name, type=onnx.AttributeProto.INTS)
    return _attr_of_new_type(a, rng)


def _mut_attribute(m, rng):
    nodes = [n for n in m.graph.node if n.attribute]
    if not nodes:
        return
    n = rng.choice(nodes)
    k = rng.randrange(len(n.attribute))
    kind = rng.randrange(4)
    if kind == 0:
        new = _attr_of_new_type(n.attribute[k], rng)
    elif kind == 1:
        del n.attribute[k]
        return
    else:
        new = _attr_new_value(n.attribute[k], rng)
    n.attribute[k].CopyFrom(new)


def _mut_add_attribute(m, rng):
    """Set one of the attributes the node's schema knows, with a value of the right type (or, one
    time in five, an attribute it does not know)."""
    n = _pick_node(m, rng)
    if n is None:
        return
    schema = _schema(n.op_type, _opset(m))
    if schema is None or not schema.attributes or rng.random() < 0.2:
        n.attribute.append(_attr_of_new_type(onnx.AttributeProto(name=rng.choice(["bogus", "axis", "perm"])), rng))
        return
    name, spec = rng.choice(sorted(schema.attributes.items()))
    a = onnx.AttributeProto
    value = {a.INT: lambda: rng.choice(_INTS), a.FLOAT: lambda: rng.choice(_FLOATS),
             a.STRING: lambda: rng.choice(_STRINGS),
             a.INTS: lambda: [rng.choice([0, 1, 2, 3, -1, 5]) for _ in range(rng.randint(1, 4))],
             a.FLOATS: lambda: [rng.choice(_FLOATS)],
             a.TENSOR: lambda: numpy_helper.from_array(np.asarray([rng.choice(_FLOATS)], dtype=np.float32))}.get(spec.type)
    if value is None:
        return
    for k in reversed(range(len(n.attribute))):
        if n.attribute[k].name == name:
            del n.attribute[k]
    n.attribute.append(helper.make_attribute(name, value()))


def _mut_io_type(m, rng):
    g = m.graph
    vs = list(g.input) + list(g.output)
    if not vs:
        return
    v = rng.choice(vs)
    tt = v.type.tensor_type
    kind = rng.randrange(6)
    if kind == 0 and tt.shape.dim:
        d = rng.choice(list(tt.shape.dim))
        choice = rng.choice([0, 1, 3, 2 ** 40, 4096, "N", None])
        if isinstance(choice, str):
            d.dim_param = choice
        elif choice is None:
            d.Clear()
        else:
            d.dim_value = choice
    elif kind == 1:
        tt.shape.dim.add().dim_value = rng.choice([1, 2, 5])
    elif kind == 2 and tt.shape.dim:
        del tt.shape.dim[rng.randrange(len(tt.shape.dim))]
    elif kind == 3:
        tt.elem_type = rng.randrange(0, 26)
    elif kind == 4:
        tt.ClearField("shape")
    else:
        v.ClearField("type")


def _mut_io_list(m, rng):
    g = m.graph
    kind = rng.randrange(5)
    if kind == 0 and g.input:
        del g.input[rng.randrange(len(g.input))]
    elif kind == 1 and g.output:
        del g.output[rng.randrange(len(g.output))]
    elif kind == 2:
        g.output.append(helper.make_empty_tensor_value_info(rng.choice(_value_names(m) + ["ghost"])))
    elif kind == 3 and g.initializer:
        t = rng.choice(list(g.initializer))
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    elif g.input:
        g.input.append(g.input[0])


def _mut_opset(m, rng):
    kind = rng.randrange(4)
    if kind == 0:
        del m.opset_import[:]
    elif kind == 1:
        for o in m.opset_import:
            o.version = rng.choice([0, 1, 5, 7, 9, 10, 11, 12, 13, 14, 16, 18, 19, 21, 22, 23, 24, 25, 99, 10 ** 6])
    elif kind == 2:
        m.opset_import.append(helper.make_opsetid(rng.choice(_DOMAINS + [""]), rng.choice([1, 13, 99])))
    else:
        m.ir_version = rng.choice([0, 1, 3, 4, 7, 9, 10, 11, 12, 99])


def _mut_constant_node(m, rng):
    """An initializer becomes a Constant node, or a node input becomes an odd Constant."""
    g = m.graph
    if g.initializer and rng.random() < 0.5:
        t = rng.choice(list(g.initializer))
        g.initializer.remove(t)
        g.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
        return
    n = _pick_node(m, rng, with_inputs=True)
    if n is None:
        return
    name = f"const_{rng.randrange(1000)}"
    attr = rng.choice([dict(value_float=rng.choice(_FLOATS)), dict(value_ints=[rng.choice(_INTS), 2]),
                       dict(value_int=rng.choice(_INTS)), dict(value_string="s"), dict(value_floats=[]),
                       dict(value=numpy_helper.from_array(np.zeros((0, 3), dtype=np.float32))),
                       dict(value_int=1, value_float=1.0), {}])
    g.node.insert(0, helper.make_node("Constant", [], [name], **attr))
    n.input[rng.randrange(len(n.input))] = name


def _mut_external_data(m, rng):
    t = _pick_init(m, rng)
    if t is None:
        return
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.ClearField("int64_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in [("location", rng.choice(["nope.bin", "../../../../etc/hostname", "/etc/hostname", "", "."])),
                 ("offset", rng.choice(["0", "-1", "x"])), ("length", rng.choice(["4", "999999999"]))]:
        entry = t.external_data.add()
        entry.key, entry.value = k, v


# name: (mutation, weight). Mutations the checker always refuses (unsorted nodes, names defined
# twice, unknown attributes) weigh little: they test one line of lrcc. The weight goes to those
# that make valid-looking models with odd contents, which reach the converters.
STRUCTURAL = {
    "drop_input": (_mut_drop_input, 2), "extra_input": (_mut_extra_input, 1), "dangling_input": (_mut_dangling, 1),
    "duplicate_output": (_mut_duplicate_output, 1), "cycle": (_mut_cycle, 2), "reorder_nodes": (_mut_reorder, 1),
    "unknown_op": (_mut_unknown_op, 1), "swap_op": (_mut_swap_op, 8), "drop_node": (_mut_drop_node, 1),
    "duplicate_node": (_mut_dup_node, 1), "init_dims": (_mut_init_dims, 5), "init_dtype_raw": (_mut_init_dtype_raw, 3),
    "init_cast": (_mut_init_cast, 5), "init_values": (_mut_init_values, 8), "init_zero_size": (_mut_init_zero_size, 4),
    "init_drop_or_dup": (_mut_init_drop_or_dup, 1), "rename": (_mut_rename, 3), "attribute": (_mut_attribute, 6),
    "add_attribute": (_mut_add_attribute, 8), "io_type": (_mut_io_type, 5), "io_list": (_mut_io_list, 2),
    "opset": (_mut_opset, 3), "constant_node": (_mut_constant_node, 4), "external_data": (_mut_external_data, 1),
}
_NAMES = sorted(STRUCTURAL)
_WEIGHTS = [STRUCTURAL[k][1] for k in _NAMES]


def mutate(seed: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutant of a serialized seed model and a label of what was done to it."""
    if rng.random() < 0.2:
        return _byte_mutation(seed, rng)
    m = onnx.ModelProto()
    m.ParseFromString(seed)
    labels = []
    for _ in range(rng.choice([1, 1, 1, 1, 2, 3])):
        name = rng.choices(_NAMES, _WEIGHTS)[0]
        try:
            STRUCTURAL[name][0](m, rng)
        except Exception:  # noqa: BLE001 - the mutator could not build this one; not lrcc's business
            continue
        labels.append(name)
    data = m.SerializeToString()
    if rng.random() < 0.05:
        data, kind = _byte_mutation(data, rng)
        labels.append(kind)
    return data, "+".join(labels) or "none"


# ---------------------------------------------------------------------------------------------
# running one ONNX mutant


class FuzzBug(AssertionError):
    """lrcc failed a mutant in a way the contract forbids."""


_NUMBER = re.compile(r"-?\b\d[\d_]*(?:\.\d+)?(?:e[+-]?\d+)?\b")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def message_class(message: str, source: str = "") -> str:
    """A message with its file, quoted names and numbers blanked: errors of one kind share it."""
    text = message.splitlines()[0] if message else ""
    if source:
        text = text.replace(source, "FILE")
    inference = re.search(r"ONNX shape inference says: .*?op_type:(\w+)(?:.*(\[\w+Error\]))?", text)
    if inference:  # one kind per operator and error tag, not per node and shape
        text = text[:inference.start()] + f"ONNX shape inference: {inference.group(1)}: {inference.group(2) or '…'})"
    text = re.sub(r"node name: [^)]*\)", "node name: …)", text)
    text = re.sub(r"\b(Node|node|Nodes?) \([^)]*\)", r"\1 (…)", text)
    text = re.sub(r"(tensor name|name): [^)]*\)", r"\1: …)", text)
    text = _QUOTED.sub("'…'", text)
    text = _NUMBER.sub("N", text)
    return text[:150]


def reference_runs(path: str, inputs: tuple) -> bool:
    """Whether onnxruntime (graph optimisations off: they can fold away an invalid node) and the
    ONNX reference evaluator (the spec) both run the model on these inputs."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator
    feeds_of = lambda names: {name: x.numpy() for name, x in zip(names, inputs)}
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.intra_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds_of([i.name for i in sess.get_inputs()]))
        model = onnx.load(path)
        initializers = {t.name for t in model.graph.initializer}
        with np.errstate(all="ignore"):
            ReferenceEvaluator(model).run(None, feeds_of([i.name for i in model.graph.input if i.name not in initializers]))
        return True
    except Exception:  # noqa: BLE001 - either runtime refusing the model is the answer here
        return False


def run_onnx_case(data: bytes, path: str) -> tuple[str, str]:
    """Import (and run) one mutant; returns (outcome, message class). Raises FuzzBug, or lets an
    unexpected exception out, when lrcc breaks the contract."""
    with open(path, "wb") as f:
        f.write(data)
    try:
        module, inputs = onnx_to_module(path)
    except LrccError as e:
        if not str(e).strip():
            raise FuzzBug(f"empty LrccError message ({type(e).__name__})") from e
        return "rejected at import", message_class(str(e), path)
    try:
        with torch.no_grad():
            out = module(*inputs)
    except LrccError as e:
        if not str(e).strip():
            raise FuzzBug(f"empty LrccError message ({type(e).__name__})") from e
        if e.__cause__ is not None and not isinstance(e.__cause__, LrccError) and reference_runs(path, inputs):
            raise FuzzBug(f"onnxruntime and the ONNX reference run this model, lrcc fails: {e}") from e
        return "rejected at run", message_class(str(e), path)
    except Exception as e:
        if reference_runs(path, inputs):
            raise FuzzBug(f"onnxruntime and the ONNX reference run this model, lrcc raises {type(e).__name__}: {e}") from e
        raise
    for o in out if isinstance(out, tuple) else (out,):
        if not isinstance(o, torch.Tensor):
            raise FuzzBug(f"the imported module returned a {type(o).__name__}, not a tensor")
    return "accepted", ""


@dataclass
class Campaign:
    """Outcomes of a fuzz campaign: counts by (outcome, message class) and the crashes."""

    counts: Counter = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")

    def record(self, outcome: str, detail: str) -> None:
        self.counts[(outcome, detail)] += 1

    def outcomes(self) -> Counter:
        totals: Counter = Counter()
        for (outcome, _), n in self.counts.items():
            totals[outcome] += n
        return totals


def onnx_campaign(n: int, seed: int = 0, seeds: dict[str, bytes] | None = None, workdir: str | None = None,
                  progress=None) -> Campaign:
    """Run n ONNX mutants (case i uses random.Random(f"{seed}:{i}"), so each reproduces alone)."""
    seeds = seeds or seed_models()
    names = sorted(seeds)
    result = Campaign()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "mutant.onnx")
        for i in range(n):
            rng = random.Random(f"{seed}:{i}")
            name = names[i % len(names)]
            data, label = mutate(seeds[name], rng)
            t0 = time.perf_counter()
            try:
                outcome, detail = run_onnx_case(data, path)
                result.record(outcome, detail)
            except Exception as e:  # noqa: BLE001 - a crash is what the fuzzer looks for
                result.record("CRASH", f"{type(e).__name__}")
                tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
                result.crashes.append(f"case {seed}:{i} (seed {name}, {label}): {type(e).__name__}: {e}\n{tb}")
            dt = time.perf_counter() - t0
            if dt > result.slowest[0]:
                result.slowest = (dt, f"case {seed}:{i} (seed {name}, {label})")
            if progress is not None:
                progress(i)
    return result


def replay(case: str, seeds: dict[str, bytes] | None = None) -> tuple[bytes, str]:
    """The mutant of a case id "seed:i" as onnx_campaign made it (for debugging a crash)."""
    seeds = seeds or seed_models()
    names = sorted(seeds)
    seed, i = case.split(":")
    return mutate(seeds[names[int(i) % len(names)]], random.Random(f"{seed}:{i}"))


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return seed_models()


def test_seed_models_import_and_run(seeds, tmp_path) -> None:
    """The unmutated seeds are valid and import cleanly: the mutants start from working models."""
    for name, data in seeds.items():
        outcome, detail = run_onnx_case(data, str(tmp_path / f"{name}.onnx"))
        assert outcome == "accepted", (name, detail)


@pytest.mark.parametrize("part", range(4))
def test_onnx_mutants_raise_only_lrcc_errors(seeds, tmp_path, part) -> None:
    """1,000 mutants in all (4 x 250): each is accepted or rejected with an LrccError."""
    result = onnx_campaign(250, seed=part, seeds=seeds, workdir=str(tmp_path))
    assert sum(result.counts.values()) == 250
    assert not result.crashes, f"{len(result.crashes)} crash(es):\n\n" + "\n\n".join(result.crashes[:5])
    outcomes = result.outcomes()
    assert outcomes["accepted"] > 0 and outcomes["rejected at import"] > 0  # the mutator does both


# ---------------------------------------------------------------------------------------------
# budgets: Budget.parse, Budget.coerce, parse_size, and `lrcc compile --budget`

_KEYS = ["params", "bytes", "latency", "sram", "flash", "max_error", "PARAMS", " params", "param", "", "=", "sram "]
_NUMBERISH = st.one_of(
    st.sampled_from(["0.5", "1", "0", "-0.5", "1.0000001", "nan", "NaN", "inf", "-inf", "infinity", "1e-300",
                     "1e309", "1e-400", "9" * 400, "0x10", "1_0", "½", "٠.٥", "０.５", "1.5e-1", ".5", "5.",
                     "320KB", "1MB", "1 MB", "1.5KB", "0KB", "1e3KB", "1TB", "320kib", "1GiB", "-1KB", "", " ",
                     "True", "None", "0.5,", "=0.5", "0.5=0.5"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10 ** 40), 10 ** 40).map(str),
    st.builds("{}{}".format, st.integers(-5, 10 ** 25), st.sampled_from(["", "KB", "kb", "MiB", "gb", "B", "xb", " kb"])),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Zs", "Po"]), max_size=6),
    st.text(max_size=8),
)
_PART = st.builds("{}{}{}".format, st.sampled_from(_KEYS), st.sampled_from(["=", "", "==", " = ", ":"]), _NUMBERISH)
_FORMATS = ["{!r}", "{:.3g}", "{:e}", "{:.10f}", " {} "]
_FRACTION = st.builds(lambda f, v: f.format(v), st.sampled_from(_FORMATS),
                      st.one_of(st.floats(1e-6, 1.0), st.floats(1e-6, 1.0), st.floats(-0.2, 1.3)))
_SIZE = st.builds("{}{}".format, st.one_of(st.integers(1, 10 ** 7), st.integers(-2, 10 ** 7),
                                           st.sampled_from(["1.5", "0.25", "2.0"])),
                  st.sampled_from(["", "KB", "kib", "MB", "MiB", "gb", "B", " KB", "kb "]))
# mostly valid parts: the right key, '=', a value of the right kind (sometimes out of range)
_GOOD_PART = st.one_of(
    st.builds("{}={}".format, st.sampled_from(["params", "bytes", "latency", "max_error"]), _FRACTION),
    st.builds("{}={}".format, st.sampled_from(["sram", "flash"]), _SIZE),
)
SPECS = st.one_of(
    st.text(max_size=40),
    st.lists(_GOOD_PART, min_size=1, max_size=3, unique_by=lambda part: part.split("=")[0]).map(",".join),
    st.lists(_GOOD_PART, min_size=1, max_size=3, unique_by=lambda part: part.split("=")[0]).map(",".join),
    st.lists(_GOOD_PART, min_size=1, max_size=3).map(",".join),
    st.lists(_PART, min_size=1, max_size=5).map(",".join),
    st.lists(_PART, min_size=1, max_size=3).map(lambda ps: ",".join(ps + ps)),  # duplicate keys
    st.lists(_PART, min_size=0, max_size=3).map(lambda ps: ",,".join(ps) + ","),  # empty parts
)
_ANY_NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10 ** 400), 10 ** 400),
                        st.booleans(), st.none(), st.text(max_size=8), st.decimals(allow_nan=True),
                        st.fractions(), st.complex_numbers(), st.just(np.float32(0.5)), st.just(np.int64(4096)))
VALUES = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10 ** 400), 10 ** 400), SPECS, st.binary(max_size=8), st.lists(st.floats(), max_size=2),
    st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.integers(), st.none()), _ANY_NUMBER, max_size=4),
    st.just(np.float64(0.5)), st.just(Budget(params=0.5)), st.just(object()),
)
SIZES = st.one_of(_NUMBERISH, _ANY_NUMBER)


def _check_budget(b: Budget) -> None:
    """A budget that parsed is a valid one."""
    for f in ("params", "bytes", "latency"):
        v = getattr(b, f)
        assert v is None or (type(v) is float and 0 < v <= 1), (f, v)
    for f in ("sram", "flash"):
        v = getattr(b, f)
        assert v is None or (type(v) is int and v > 0), (f, v)
    assert b.max_error is None or (type(b.max_error) is float and math.isfinite(b.max_error) and b.max_error > 0)
    assert Budget.parse(str(b)) == b if str(b) != "(none)" else True  # str() reads back


def budget_outcome(fn, value) -> tuple[str, str]:
    """(outcome, message class) of one call; lets anything but a BudgetError with a message out."""
    try:
        out = fn(value)
    except BudgetError as e:
        if not str(e).strip():
            raise FuzzBug("BudgetError with an empty message") from e
        return "BudgetError", message_class(str(e))
    if isinstance(out, Budget):
        _check_budget(out)
    elif fn is parse_size:
        assert type(out) is int and out > 0, out
    return "accepted", ""


_MODEL_SPEC = "lrcc_fuzz_no_such_module:factory"


def cli_outcome(spec: str, equals: bool) -> tuple[str, str]:
    """`lrcc compile` with --budget SPEC: the budget is read before the model, so a bad budget
    is a one-line error (exit 2) naming it, and a good one gets as far as the (missing) model."""
    from lrcc.cli import main
    argv = ["compile", _MODEL_SPEC, "--calibration", "cal.pt", "-o", "out", "--quiet"]
    argv += [f"--budget={spec}"] if equals else ["--budget", spec]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
            if rc != 2:
                raise FuzzBug(f"SystemExit({e.code!r}) from argparse for {argv!r}") from e
            lines = [x for x in err.getvalue().splitlines() if x.startswith("lrcc: error:")]
            if len(lines) != 1:
                raise FuzzBug(f"argparse error without one 'lrcc: error:' line: {err.getvalue()!r}") from e
            return "usage error", message_class(lines[0])
    text = err.getvalue()
    if rc != 2 or "Traceback" in text or len(text.strip().splitlines()) != 1 or not text.startswith("lrcc: error: "):
        raise FuzzBug(f"lrcc {' '.join(argv)!r}: exit {rc}, stderr {text!r}")
    try:
        Budget.parse(spec)
    except BudgetError:
        assert "budget" in text, text
        return "budget error", message_class(text)
    assert _MODEL_SPEC in text, text  # a good budget: the next complaint is the model
    return "budget accepted", ""


def budget_campaign(n: int, derandomize: bool = True) -> Campaign:
    """n budget inputs through hypothesis: 30% text specs into Budget.parse, 30% values into
    Budget.coerce, 25% into parse_size, 15% through `lrcc compile --budget`."""
    result = Campaign()
    shares = {"Budget.parse": 0.30, "Budget.coerce": 0.30, "parse_size": 0.25, "cli": 0.15}
    sizes = {k: int(n * v) for k, v in shares.items()}
    sizes["Budget.parse"] += n - sum(sizes.values())

    def runner(what: str, strategy, call):
        @settings(max_examples=sizes[what], derandomize=derandomize, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(value) -> None:
            try:
                outcome, detail = call(value)
            except Exception as e:  # noqa: BLE001
                result.record(f"{what}: CRASH", type(e).__name__)
                result.crashes.append(f"{what}({value!r}): {type(e).__name__}: {e}\n"
                                      + "".join(traceback.format_exception(type(e), e, e.__traceback__)[-4:]))
                return
            result.record(f"{what}: {outcome}", detail)
        return run

    runner("Budget.parse", SPECS, lambda s: budget_outcome(Budget.parse, s))()
    runner("Budget.coerce", VALUES, lambda v: budget_outcome(Budget.coerce, v))()
    runner("parse_size", SIZES, lambda v: budget_outcome(lambda x: parse_size(x, "sram"), v))()
    runner("cli", st.tuples(SPECS, st.booleans()), lambda a: cli_outcome(*a))()
    return result


def test_budgets_raise_only_budget_errors() -> None:
    """1,000 budget inputs: parsed into a valid Budget or refused with a BudgetError; the CLI
    answers exit 2 with one line."""
    result = budget_campaign(1000)
    assert not result.crashes, f"{len(result.crashes)} crash(es):\n\n" + "\n\n".join(result.crashes[:5])
    # hypothesis may stop early only when a strategy is exhausted; these are not
    assert sum(result.counts.values()) >= 950
    outcomes = result.outcomes()
    assert outcomes["Budget.parse: accepted"] > 0 and outcomes["Budget.parse: BudgetError"] > 0
    assert outcomes["cli: budget accepted"] > 0 and outcomes["cli: budget error"] > 0


@pytest.mark.parametrize("spec, field, value", [
    ("params=1e999", None, None), ("max_error=nan", None, None), ("sram=" + "9" * 400, None, None),
    ("sram=9007199254740993", "sram", 9007199254740993), ("params=0.5,params=0.5", None, None),
    ("flash=1.5KB", "flash", 1536), ("latency=,", None, None),
])
def test_budget_edge_cases(spec, field, value) -> None:
    if field is None:
        with pytest.raises(BudgetError):
            Budget.parse(spec)
    else:
        assert getattr(Budget.parse(spec), field) == value


@pytest.mark.parametrize("value", [10 ** 400, -(10 ** 400), {"params": 10 ** 400}, {"max_error": 10 ** 400},
                                   {"sram": 0.5j}, {"max_error": "0.1"}])
def test_budget_coerce_huge_and_odd_numbers(value) -> None:
    with pytest.raises(BudgetError):
        Budget.coerce(value)


# ---------------------------------------------------------------------------------------------
# the long campaign


@pytest.mark.fuzz
def test_long_campaign(seeds, tmp_path) -> None:
    n_onnx = int(os.environ.get("LRCC_FUZZ_ONNX", 10000))
    n_budget = int(os.environ.get("LRCC_FUZZ_BUDGET", 10000))
    onnx_result = onnx_campaign(n_onnx, seed=1000, seeds=seeds, workdir=str(tmp_path))
    budget_result = budget_campaign(n_budget, derandomize=False)
    crashes = onnx_result.crashes + budget_result.crashes
    assert not crashes, f"{len(crashes)} crash(es):\n\n" + "\n\n".join(crashes[:5])


# ---------------------------------------------------------------------------------------------
# the bugs the fuzzer found, one small model each (the mutation that found it in the comment)


def _one_node_model(node, inputs, outputs, inits=(), opset: int = 17, **kw):
    graph = helper.make_graph([node] if not isinstance(node, list) else node, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=kw.pop("opset_imports", [helper.make_opsetid("", opset)]))
    model.ir_version = 8
    return model


def _import_error(model, tmp_path) -> str:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LrccError) as e:
        module, inputs = onnx_to_module(path)
        module(*inputs)
    assert str(path) in str(e.value)
    return str(e.value)


def test_initializer_data_that_does_not_fill_its_dims(tmp_path) -> None:
    """init_dims: dims [64] on 192 floats made numpy_helper.to_array raise ValueError."""
    w = _init("w", np.ones(192, dtype=np.float32))
    del w.dims[:]
    w.dims.extend([64])
    model = _one_node_model(helper.make_node("Add", ["x", "w"], ["y"], name="add"), [_vi("x", [64])], [_vi("y", [64])], [w])
    msg = _import_error(model, tmp_path)
    assert "initializer 'w'" in msg and "does not match its dims" in msg


def test_constant_node_with_corrupt_tensor(tmp_path) -> None:
    """init_dims + constant_node: the same, inside a Constant node's value attribute."""
    t = numpy_helper.from_array(np.ones(6, dtype=np.float32), "c")
    del t.dims[:]
    t.dims.extend([4])
    nodes = [helper.make_node("Constant", [], ["c"], name="const", value=t),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    model = _one_node_model(nodes, [_vi("x", [4])], [_vi("y", [4])])
    msg = _import_error(model, tmp_path)
    assert "node 'const'" in msg and "attribute 'value'" in msg


def test_element_types_that_contradict_each_other(tmp_path) -> None:
    """init_cast: a float16 LayerNormalization scale on float32 data reached torch and raised
    RuntimeError 'expected scalar type Float but found Half'; strict ONNX inference names it."""
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y"], name="ln")
    model = _one_node_model(node, [_vi("x", [2, 4])], [_vi("y", [2, 4])],
                            [_init("scale", np.ones(4, dtype=np.float16))])
    msg = _import_error(model, tmp_path)
    assert "inconsistent" in msg and "LayerNormalization" in msg


def test_reshape_allowzero_other_than_one_copies_zeros(tmp_path) -> None:
    """add_attribute: allowzero=2**31 was taken as true; onnxruntime and the reference switch it on
    only for 1."""
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="r", allowzero=2 ** 31)
    # (ONNX's own shape inference reads it as true: the output's shape is left undeclared here)
    model = _one_node_model(node, [_vi("x", ["B", 3, 4])], [_vi("y", ["P", "Q", "R"])], [_init("shape", np.asarray([0, 0, 4]))])
    module, (x,) = onnx_to_module(model)
    assert module(x).shape == (2, 3, 4)


def test_gather_axis_out_of_range_on_a_table(tmp_path) -> None:
    """attribute: Gather axis=-2**63 on an embedding table made _vocab_sizes raise IndexError."""
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=-(2 ** 63))
    model = _one_node_model(node, [_vi("ids", [2, 3], TensorProto.INT64)], [_vi("y", [2, 3, 4])],
                            [_init("table", np.ones((10, 4), dtype=np.float32))])
    _import_error(model, tmp_path)


def test_huge_declared_input(tmp_path) -> None:
    """io_type: an input declared [2**40, 8] made torch try to allocate 32 TiB of example input."""
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = _one_node_model(node, [_vi("x", [2 ** 40, 8])], [_vi("y", [2 ** 40, 8])])
    assert "example inputs of at most" in _import_error(model, tmp_path)


def test_default_opset_imported_twice(tmp_path) -> None:
    """opset: '' at 17 and 'ai.onnx' at 1 in one model; the importer read one, the checker the other
    (an Unsqueeze then failed with TypeError)."""
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = _one_node_model(node, [_vi("x", [2])], [_vi("y", [2])],
                            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx", 1)])
    assert "several versions" in _import_error(model, tmp_path)


@pytest.mark.parametrize("what", ["no outputs", "opset 99"])
def test_graphs_onnxruntime_refuses_to_load(tmp_path, what) -> None:
    """io_list / opset: a graph without outputs and an opset newer than onnx knows were accepted."""
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    if what == "no outputs":
        model = _one_node_model(node, [_vi("x", [2])], [])
        assert "no outputs" in _import_error(model, tmp_path)
    else:
        model = _one_node_model(node, [_vi("x", [2])], [_vi("y", [2])], opset=99)
        assert "newer than the newest" in _import_error(model, tmp_path)


def test_scatter_with_unknown_reduction(tmp_path) -> None:
    """add_attribute: reduction='bogus' raised KeyError."""
    node = helper.make_node("ScatterElements", ["x", "idx", "upd"], ["y"], name="scatter", reduction="bogus")
    model = _one_node_model(node, [_vi("x", [4])], [_vi("y", [4])],
                            [_init("idx", np.asarray([1])), _init("upd", np.ones(1, dtype=np.float32))])
    msg = _import_error(model, tmp_path)
    assert "node 'scatter'" in msg and "'bogus'" in msg


def test_range_of_2_62_values(tmp_path) -> None:
    """init_values: a Range limit of 2**62 ran ONNX's data propagation (and torch.arange) out of
    memory: the process was killed."""
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="range"),
             helper.make_node("Cast", ["r"], ["rf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["rf"], ["s"], name="sum", keepdims=1),
             helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    inits = [_init("start", np.asarray(0, dtype=np.int64)), _init("limit", np.asarray(2 ** 62, dtype=np.int64)),
             _init("delta", np.asarray(1, dtype=np.int64))]
    model = _one_node_model(nodes, [_vi("x", [1])], [_vi("y", [1])], inits)
    msg = _import_error(model, tmp_path)
    assert "node 'range'" in msg and "at most" in msg


def test_batch_norm_with_negative_epsilon_runs_as_onnx_says(tmp_path) -> None:
    """attribute: epsilon=-1 made F.batch_norm raise ValueError; onnxruntime computes with it."""
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", epsilon=-0.5)
    ones = np.ones(2, dtype=np.float32)
    model = _one_node_model(node, [_vi("x", [1, 2, 3])], [_vi("y", [1, 2, 3])],
                            [_init("s", ones), _init("b", ones * 0), _init("m", ones * 0), _init("v", ones)])
    module, (x,) = onnx_to_module(model)
    torch.testing.assert_close(module(x), x * (1 / math.sqrt(0.5)))


@pytest.mark.parametrize("case", ["slice lengths", "flatten axis", "gemm bias"])
def test_silently_accepted_invalid_nodes(tmp_path, case) -> None:
    """init_dims / add_attribute / init_zero_size: onnxruntime refuses these at run time; lrcc
    computed something (zip() cut the Slice lists, Flatten took axis 99, Gemm's C of [0, 3]
    broadcast to an empty result)."""
    if case == "slice lengths":
        node = helper.make_node("Slice", ["x", "starts", "ends"], ["y"], name="n")
        inits = [_init("starts", np.asarray([0, 1])), _init("ends", np.asarray([2]))]
        model = _one_node_model(node, [_vi("x", [4, 4])], [_vi("y", [2, 4])], inits)
    elif case == "flatten axis":
        model = _one_node_model(helper.make_node("Flatten", ["x"], ["y"], name="n", axis=99),
                                [_vi("x", [2, 3])], [_vi("y", [6, 1])])
    else:
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="n")
        model = _one_node_model(node, [_vi("x", [1, 2])], [_vi("y", [1, 3])],
                                [_init("w", np.ones((2, 3), dtype=np.float32)), _init("c", np.ones((0, 3), dtype=np.float32))])
    msg = _import_error(model, tmp_path)  # by ONNX's strict shape inference, or lrcc's converter
    assert "node 'n'" in msg or "node name: n)" in msg


def test_runtime_failure_names_the_node_and_shapes(tmp_path) -> None:
    """A Reshape that does not fit the inputs on symbolic dims: an LrccError naming the node, its
    op and its input shapes, with the torch error as its cause."""
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="merge")
    model = _one_node_model(node, [_vi("x", ["B", 6])], [_vi("y", ["B", 4])], [_init("shape", np.asarray([-1, 4]))])
    module, _ = onnx_to_module(model)
    with pytest.raises(LrccError) as e:
        module(torch.ones(1, 6))
    assert "node 'merge' (Reshape)" in str(e.value) and "float32[1, 6]" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_cli_reads_the_budget_before_the_model(capsys) -> None:
    """A bad --budget is reported as such (exit 2), before lrcc imports the model."""
    from lrcc.cli import main
    rc = main(["compile", _MODEL_SPEC, "--calibration", "cal.pt", "-o", "out", "--budget", "params=2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lrcc: error: budget params") and _MODEL_SPEC not in err


def test_budget_numbers_of_every_kind() -> None:
    """Budget.coerce(10**400) raised OverflowError; numpy scalars were refused; '9007199254740993'
    lost its last digit through float."""
    assert Budget.coerce(np.float32(0.5)).params == 0.5
    assert Budget(sram=np.int64(4096)).sram == 4096
    assert parse_size("9007199254740993", "sram") == 9007199254740993
    for bad in (10 ** 5000, {"max_error": -(10 ** 400)}, {"sram": 10 ** 5000}, "sram=" + "9" * 5000, "flash=1e400"):
        with pytest.raises(BudgetError) as e:
            Budget.coerce(bad)
        assert len(str(e.value)) < 300
