"""Import an ONNX model as an equivalent torch module ("ONNX in").

`onnx_to_module(path)` loads and checks the model and returns an `OnnxModule`: an nn.Module that
interprets the ONNX graph node by node with torch operators, plus example inputs. lrcc.compile
then sends that module through the ordinary pipeline (torch.export -> IR -> rules -> planner), so
an ONNX model is compressed exactly like a torch one.

How the graph becomes torch:

- Initializers become registered parameters (floating point) or buffers (the rest), at their
  ONNX names: a dotted name keeps its dots as submodule paths ("fc1.weight" -> module "fc1",
  parameter "weight") and characters not allowed in attribute names become "_"
  ("onnx::MatMul_101" -> "onnx__MatMul_101").
- Gemm and MatMul with a constant 2-D floating-point weight become `F.linear` calls on a parameter
  holding the weight in linear's (out, in) layout, named after the weight's initializer, so lrcc's
  rules see them as linear sites. Gemm's transA/transB/alpha/beta are folded into that parameter
  and the bias; a MatMul whose only user is an Add of a 1-D constant takes it as linear's bias.
- Nodes whose inputs are all constant are evaluated once, when the module is built.
- An operator without a converter that ONNX defines as a function of other operators (Attention,
  RotaryEmbedding, MeanVarianceNormalization, ...) is replaced by its function body first.
- Shape arithmetic (Shape -> Gather -> Concat -> Reshape, ...) runs on Python values while
  tracing: a Shape gives the tensor's actual sizes (symbolic sizes under torch.export), so
  Reshape and Expand receive sizes computed from the tensors, never numbers baked in from the
  example inputs. Inputs in such positions (a Reshape's shape, a Slice's starts, ...) must be
  constants or computed from shapes; one computed from the input data runs eagerly but cannot be
  traced by torch.export.

The operators with a converter are the keys of SUPPORTED_OPS; docs/onnx_conformance.md gives each
one's pass rate on the ONNX backend node tests (lrcc.ir.onnx_conformance runs them).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LrccError

Value = Any  # torch.Tensor | Static | None (an absent optional input)

# ---------------------------------------------------------------------------------------------
# element types

_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64,
}
_NP: dict[torch.dtype, Any] = {
    torch.float32: np.float32, torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
    torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_, torch.float16: np.float16,
    torch.float64: np.float64,
}
_FROM_NP: dict[Any, torch.dtype] = {np.dtype(v): k for k, v in _NP.items()}


def _torch_dtype(onnx_type: int, where: str) -> torch.dtype:
    if onnx_type not in _DTYPES:
        import onnx
        name = onnx.TensorProto.DataType.Name(onnx_type) if onnx_type in onnx.TensorProto.DataType.values() else onnx_type
        raise LrccError(f"{where}: element type {name} is not supported by lrcc's ONNX import "
                        f"(supported: float32/16/64, int8/16/32/64, uint8, bool)")
    return _DTYPES[onnx_type]


# ---------------------------------------------------------------------------------------------
# values known while tracing


class Static:
    """A value known while tracing: a numpy array (dtype object where it holds symbolic sizes),
    its torch dtype, and the registered tensor holding it, where the module has one."""

    __slots__ = ("array", "dtype", "tensor")

    def __init__(self, array: np.ndarray, dtype: torch.dtype, tensor: torch.Tensor | None = None) -> None:
        self.array = array
        self.dtype = dtype
        self.tensor = tensor

    def __repr__(self) -> str:
        return f"Static({self.array!r}, {self.dtype})"


def _is_symbolic(a: np.ndarray) -> bool:
    return a.dtype == object


def _static(values, dtype: torch.dtype) -> Static:
    """A Static from a numpy array or nested list whose elements may be SymInts/SymFloats."""
    a = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if a.dtype == object:
        flat = a.reshape(-1).tolist()
        if all(isinstance(v, (int, float, bool, np.generic)) for v in flat):
            a = np.asarray(flat, dtype=_NP[dtype]).reshape(a.shape)
    else:
        a = a.astype(_NP[dtype], copy=False)
    return Static(a, dtype)


def tensor(v: Value) -> torch.Tensor:
    """v as a torch tensor (a Static without a registered tensor is materialised)."""
    if isinstance(v, torch.Tensor):
        return v
    if not isinstance(v, Static):
        raise LrccError(f"expected a tensor, got {type(v).__name__}")
    if v.tensor is not None:
        return v.tensor
    a = v.array
    if _is_symbolic(a):
        parts = [torch.full((), x, dtype=v.dtype) for x in a.reshape(-1).tolist()]
        return torch.stack(parts).reshape(a.shape) if parts else torch.empty(a.shape, dtype=v.dtype)
    if a.size == 1:  # a scalar becomes an op argument (aten.full), not a constant tensor
        return torch.full(a.shape, a.reshape(-1)[0].item(), dtype=v.dtype)
    return torch.tensor(a.tolist(), dtype=v.dtype).reshape(a.shape)


def _data_dependent(node: "OnnxNode", what: str) -> LrccError:
    return LrccError(f"node {node.label}: its {what} is computed from the input data; torch.export needs it "
                     "constant or computed from tensor shapes")


def _values_unknown(t: torch.Tensor) -> bool:
    """While torch.export traces, tensors are fake: their values are unknown."""
    return torch.compiler.is_exporting() or type(t).__name__ == "FakeTensor"


def _ints(v: Value, what: str, node: "OnnxNode") -> list:
    """A constant or shape-derived integer input as a list of ints (SymInts while tracing)."""
    if isinstance(v, Static):
        return [int(x) if isinstance(x, (np.integer, bool)) else x for x in v.array.reshape(-1).tolist()]
    if _values_unknown(v):
        raise _data_dependent(node, what)
    return [int(x) for x in v.reshape(-1).tolist()]


def _scalar(v: Value, what: str, node: "OnnxNode"):
    """A one-element constant input (an axis, a count, a flag) as a Python number."""
    if isinstance(v, Static):
        vals = v.array.reshape(-1).tolist()
    elif _values_unknown(v):
        raise _data_dependent(node, what)
    else:
        vals = v.reshape(-1).tolist()
    if len(vals) != 1:
        raise LrccError(f"node {node.label}: its {what} must hold one value, got {len(vals)}")
    return vals[0]


# ---------------------------------------------------------------------------------------------
# nodes


@dataclass
class OnnxNode:
    """One ONNX node as the interpreter runs it."""

    index: int
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else f"#{self.index} ({self.op})"

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)


def _attr_value(a, where: str = "<model>") -> Any:
    import onnx
    v = onnx.helper.get_attribute_value(a)
    if a.type == onnx.AttributeProto.TENSOR:
        return _initializer_array(v, f"{where}: attribute {a.name!r}")
    if a.type == onnx.AttributeProto.STRING:
        return v.decode("utf-8", "replace")
    if a.type == onnx.AttributeProto.STRINGS:
        return [s.decode("utf-8", "replace") for s in v]
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR):
        return None
    return list(v) if isinstance(v, (list, tuple)) or type(v).__name__.startswith("Repeated") else v


Converter = Callable[[OnnxNode, list, "OnnxModule"], Any]

# op type -> converter(node, inputs, module) returning one value or a tuple of values
SUPPORTED_OPS: dict[str, Converter] = {}
# op type -> input positions that must be known while tracing (shapes, axes, sizes)
STATIC_INPUTS: dict[str, tuple[int, ...]] = {}
# op type -> evaluation on Statics (numpy), for shape arithmetic; returns NotImplemented to decline
_STATIC_IMPLS: dict[str, Callable[[OnnxNode, list], Any]] = {}


def _op(*names: str, static: tuple[int, ...] = ()):
    def register(fn: Converter) -> Converter:
        for name in names:
            SUPPORTED_OPS[name] = fn
            if static:
                STATIC_INPUTS[name] = static
        return fn
    return register


def _static_impl(*names: str):
    def register(fn):
        for name in names:
            _STATIC_IMPLS[name] = fn
        return fn
    return register


def _axis(axis: int, rank: int, inclusive: bool = False) -> int:
    """A possibly negative axis of a rank-`rank` tensor as 0..rank-1 (0..rank where the operator
    allows the end, as Flatten does); one out of range is the model's error."""
    top = rank + 1 if inclusive else rank
    if isinstance(axis, int) and not -rank <= axis < top:
        raise LrccError(f"axis {axis} is out of range for a tensor of rank {rank} "
                        f"(expected {-rank} <= axis {'<=' if inclusive else '<'} {rank})")
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------------------------------------
# elementwise


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Converter:
    return lambda n, xs, m: fn(tensor(xs[0]))


for _name, _fn in {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
    "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
    "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh,
    "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh, "Sign": torch.sign, "Round": torch.round,
    "Not": torch.logical_not, "IsNaN": torch.isnan, "Softsign": F.softsign, "Identity": lambda x: x,
    "HardSwish": F.hardswish, "Mish": F.mish,
}.items():
    SUPPORTED_OPS[_name] = _unary(_fn)


@_op("Softplus")
def _softplus(n, xs, m):
    x = tensor(xs[0])
    return torch.where(x > 20, x, torch.log1p(torch.exp(x)))


@_op("LeakyRelu")
def _leaky_relu(n, xs, m):
    return F.leaky_relu(tensor(xs[0]), float(n.attr("alpha", 0.01)))


@_op("Elu")
def _elu(n, xs, m):
    return F.elu(tensor(xs[0]), float(n.attr("alpha", 1.0)))


@_op("Celu")
def _celu(n, xs, m):
    return F.celu(tensor(xs[0]), float(n.attr("alpha", 1.0)))


@_op("Selu")
def _selu(n, xs, m):
    x = tensor(xs[0])
    alpha, gamma = float(n.attr("alpha", 1.67326319217681884765625)), float(n.attr("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@_op("ThresholdedRelu")
def _thresholded_relu(n, xs, m):
    x = tensor(xs[0])
    return torch.where(x > float(n.attr("alpha", 1.0)), x, torch.zeros_like(x))


@_op("HardSigmoid")
def _hard_sigmoid(n, xs, m):
    x = tensor(xs[0])
    return torch.clamp(float(n.attr("alpha", 0.2)) * x + float(n.attr("beta", 0.5)), 0, 1)


@_op("PRelu")
def _prelu(n, xs, m):
    x, slope = tensor(xs[0]), tensor(xs[1])
    return torch.where(x < 0, x * slope, x)


@_op("Gelu")
def _gelu(n, xs, m):
    return F.gelu(tensor(xs[0]), approximate=n.attr("approximate", "none"))


@_op("Clip")
def _clip(n, xs, m):
    x = tensor(xs[0])
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    else:
        lo = tensor(xs[1]) if len(xs) > 1 and xs[1] is not None else None
        hi = tensor(xs[2]) if len(xs) > 2 and xs[2] is not None else None
    if lo is not None:
        x = torch.maximum(x, lo) if isinstance(lo, torch.Tensor) else torch.clamp(x, min=lo)
    if hi is not None:
        x = torch.minimum(x, hi) if isinstance(hi, torch.Tensor) else torch.clamp(x, max=hi)
    return x


@_op("IsInf")
def _isinf(n, xs, m):
    x = tensor(xs[0])
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype.is_floating_point or b.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


_BINARY: dict[str, Callable] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div,
    "Equal": torch.eq, "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}
for _name, _fn in _BINARY.items():
    SUPPORTED_OPS[_name] = (lambda fn: lambda n, xs, m: fn(tensor(xs[0]), tensor(xs[1])))(_fn)


@_op("Pow")
def _pow(n, xs, m):
    x, y = tensor(xs[0]), tensor(xs[1])
    return torch.pow(x, y).to(x.dtype)


@_op("Mod")
def _mod(n, xs, m):
    a, b = tensor(xs[0]), tensor(xs[1])
    return torch.fmod(a, b) if n.attr("fmod", 0) else torch.remainder(a, b)


def _variadic(fn: Callable) -> Converter:
    def convert(n, xs, m):
        ts = [tensor(x) for x in xs if x is not None]
        out = ts[0]
        for t in ts[1:]:
            out = fn(out, t)
        return out
    return convert


SUPPORTED_OPS["Max"] = _variadic(torch.maximum)
SUPPORTED_OPS["Min"] = _variadic(torch.minimum)
SUPPORTED_OPS["Sum"] = _variadic(torch.add)


@_op("Mean")
def _mean(n, xs, m):
    ts = [tensor(x) for x in xs if x is not None]
    return _variadic(torch.add)(n, ts, m) / len(ts)


@_op("Where")
def _where(n, xs, m):
    return torch.where(tensor(xs[0]).bool(), tensor(xs[1]), tensor(xs[2]))


@_op("Cast")
def _cast(n, xs, m):
    return tensor(xs[0]).to(_torch_dtype(n.attr("to"), f"node {n.label}"))


@_op("CastLike")
def _cast_like(n, xs, m):
    return tensor(xs[0]).to(_value_dtype(xs[1]))


def _value_dtype(v: Value) -> torch.dtype:
    return v.dtype


# ---------------------------------------------------------------------------------------------
# products


@_op("MatMul")
def _matmul(n, xs, m):
    if "weight" in n.plan:
        return F.linear(tensor(xs[0]), m.get_parameter(n.plan["weight"]),
                        m.get_parameter(n.plan["bias"]) if n.plan.get("bias") else None)
    return torch.matmul(tensor(xs[0]), tensor(xs[1]))


@_op("Gemm")
def _gemm(n, xs, m):
    a = tensor(xs[0])
    if n.attr("transA", 0):
        a = a.t()
    c = xs[2] if len(xs) > 2 else None
    beta = float(n.attr("beta", 1.0))
    if "weight" in n.plan:
        y = F.linear(a, m.get_parameter(n.plan["weight"]),
                     m.get_parameter(n.plan["bias"]) if n.plan.get("bias") else None)
        if n.plan.get("bias") or c is None:
            return y
    else:
        b = tensor(xs[1])
        if n.attr("transB", 0):
            b = b.t()
        y = a @ b
        alpha = float(n.attr("alpha", 1.0))
        if alpha != 1.0:
            y = y * alpha
        if c is None:
            return y
    c = tensor(c)
    if not _values_unknown_now() and not _broadcasts_to(tuple(c.shape), tuple(y.shape)):
        raise LrccError(f"node {n.label}: Gemm's C of shape {list(c.shape)} does not broadcast to the "
                        f"product's shape {list(y.shape)}")
    return y + (c * beta if beta != 1.0 else c)


def _broadcasts_to(small: tuple, big: tuple) -> bool:
    """Whether `small` broadcasts to `big` one way (ONNX's unidirectional broadcasting)."""
    return len(small) <= len(big) and all(a == 1 or a == b for a, b in zip(reversed(small), reversed(big)))


@_op("Einsum")
def _einsum(n, xs, m):
    return torch.einsum(n.attr("equation").replace(" ", ""), *[tensor(x) for x in xs])


def _pads(n: OnnxNode, spatial: int) -> list[int]:
    pads = list(n.attr("pads", [0] * (2 * spatial)))
    return pads


def _auto_pads(n: OnnxNode, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """Explicit pads (begins..., ends...) for auto_pad SAME_UPPER / SAME_LOWER / VALID / NOTSET."""
    spatial = len(kernel)
    mode = n.attr("auto_pad", "NOTSET")
    if mode in ("NOTSET", ""):
        return _pads(n, spatial)
    if mode == "VALID":
        return [0] * (2 * spatial)
    begins, ends = [], []
    for i in range(spatial):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX pads (begins..., ends...) over the last dims -> F.pad's (last begin, last end, ...)."""
    k = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(k)):
        out += [pads[i], pads[k + i]]
    return out


@_op("Conv")
def _conv(n, xs, m):
    x, w = tensor(xs[0]), tensor(xs[1])
    b = tensor(xs[2]) if len(xs) > 2 and xs[2] is not None else None
    spatial = w.dim() - 2
    if spatial not in (1, 2, 3):
        raise LrccError(f"node {n.label}: Conv over {spatial} spatial dims is not supported (1, 2 or 3)")
    kernel = list(n.attr("kernel_shape", w.shape[2:]))
    strides = list(n.attr("strides", [1] * spatial))
    dilations = list(n.attr("dilations", [1] * spatial))
    pads = _auto_pads(n, x, kernel, strides, dilations)
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    if pads[:spatial] == pads[spatial:]:
        return conv(x, w, b, strides, pads[:spatial], dilations, int(n.attr("group", 1)))
    return conv(F.pad(x, _torch_pad(pads)), w, b, strides, 0, dilations, int(n.attr("group", 1)))


def _pool_args(n: OnnxNode, x: torch.Tensor):
    kernel = list(n.attr("kernel_shape"))
    spatial = len(kernel)
    if spatial not in (1, 2, 3):
        raise LrccError(f"node {n.label}: pooling over {spatial} spatial dims is not supported (1, 2 or 3)")
    strides = list(n.attr("strides", [1] * spatial))
    dilations = list(n.attr("dilations", [1] * spatial))
    pads = _auto_pads(n, x, kernel, strides, dilations)
    return kernel, strides, dilations, pads, spatial


@_op("MaxPool")
def _max_pool(n, xs, m):
    x = tensor(xs[0])
    kernel, strides, dilations, pads, spatial = _pool_args(n, x)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
    ceil = bool(n.attr("ceil_mode", 0))
    want_indices = len(n.outputs) > 1 and bool(n.outputs[1])
    symmetric = pads[:spatial] == pads[spatial:] and all(p <= k // 2 for p, k in zip(pads[:spatial], kernel))
    if want_indices:
        if not symmetric:
            raise LrccError(f"node {n.label}: MaxPool's Indices output with asymmetric or large pads is not supported")
        y, idx = pool(x, kernel, strides, pads[:spatial], dilations, ceil_mode=ceil, return_indices=True)
        return y, _onnx_pool_indices(n, x, idx, spatial)
    if symmetric:
        return pool(x, kernel, strides, pads[:spatial], dilations, ceil_mode=ceil)
    padded = F.pad(x, _torch_pad(pads), value=float("-inf")) if x.dtype.is_floating_point else F.pad(x, _torch_pad(pads))
    return pool(padded, kernel, strides, 0, dilations, ceil_mode=ceil)


def _onnx_pool_indices(n: OnnxNode, x: torch.Tensor, idx: torch.Tensor, spatial: int) -> torch.Tensor:
    """torch's per-plane flat indices -> ONNX's indices into the whole tensor (row- or column-major)."""
    plane = math.prod(x.shape[2:])
    if n.attr("storage_order", 0):
        if spatial != 2:
            raise LrccError(f"node {n.label}: MaxPool storage_order=1 is supported for 2-D pooling only")
        h, w = x.shape[2], x.shape[3]
        idx = (idx % w) * h + idx // w
    base = torch.arange(x.shape[0] * x.shape[1], dtype=torch.int64).reshape(x.shape[0], x.shape[1], *([1] * spatial))
    return idx + base * plane


@_op("AveragePool")
def _avg_pool(n, xs, m):
    x = tensor(xs[0])
    kernel, strides, dilations, pads, spatial = _pool_args(n, x)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
    ceil = bool(n.attr("ceil_mode", 0))
    include = bool(n.attr("count_include_pad", 0))
    symmetric = pads[:spatial] == pads[spatial:] and all(p <= k // 2 for p, k in zip(pads[:spatial], kernel))
    if symmetric and all(d == 1 for d in dilations):
        return pool(x, kernel, strides, pads[:spatial], ceil_mode=ceil, count_include_pad=include)
    return _avg_pool_by_conv(x, kernel, strides, dilations, pads, ceil, include)


def _avg_pool_by_conv(x: torch.Tensor, kernel, strides, dilations, pads, ceil: bool, include: bool) -> torch.Tensor:
    """Average pooling as a sum by convolution with a ones kernel over explicit pads, divided by
    the number of counted positions (pads count with count_include_pad; the extra right margin
    that ceil_mode adds never counts): covers dilations and asymmetric pads."""
    spatial = len(kernel)
    extra = []
    for i in range(spatial):
        size = x.shape[2 + i] + pads[i] + pads[spatial + i]
        span = (kernel[i] - 1) * dilations[i] + 1
        out = (size - span + (strides[i] - 1 if ceil else 0)) // strides[i] + 1
        if ceil and (out - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
            out -= 1  # the last window may not start in the right padding
        extra.append(max(0, (out - 1) * strides[i] + span - size))
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    ones = torch.ones((1, 1, *kernel), dtype=x.dtype)
    lead = x.shape[:2]
    flat = x.reshape(-1, 1, *x.shape[2:])
    full = _torch_pad(list(pads[:spatial]) + [p + e for p, e in zip(pads[spatial:], extra)])
    total = conv(F.pad(flat, full), ones, None, strides, 0, dilations)
    if include:
        counted = F.pad(torch.ones((1, 1, *[x.shape[2 + i] + pads[i] + pads[spatial + i] for i in range(spatial)]),
                                   dtype=x.dtype), _torch_pad([0] * spatial + extra))
    else:
        counted = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype), full)
    count = conv(counted, ones, None, strides, 0, dilations)
    return (total / count).reshape(*lead, *total.shape[2:])


@_op("GlobalAveragePool")
def _global_avg_pool(n, xs, m):
    x = tensor(xs[0])
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(n, xs, m):
    x = tensor(xs[0])
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ---------------------------------------------------------------------------------------------
# normalisation and softmax


@_op("Softmax", "LogSoftmax")
def _softmax(n, xs, m):
    x = tensor(xs[0])
    fn = torch.softmax if n.op == "Softmax" else torch.log_softmax
    if n.opset >= 13:
        return fn(x, dim=_axis(int(n.attr("axis", -1)), x.dim()))
    axis = _axis(int(n.attr("axis", 1)), x.dim())  # before opset 13: over the input flattened to 2-D at axis
    shape = x.shape
    rows = math.prod(shape[:axis])
    return fn(x.reshape(rows, -1), dim=1).reshape(shape)


@_op("LayerNormalization")
def _layer_norm(n, xs, m):
    x, scale = tensor(xs[0]), tensor(xs[1])
    bias = tensor(xs[2]) if len(xs) > 2 and xs[2] is not None else None
    axis = _axis(int(n.attr("axis", -1)), x.dim())
    eps = float(n.attr("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    want_stats = any(o for o in n.outputs[1:])
    if not want_stats and x.dtype in (torch.float32, torch.float64):
        exact = tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape)
        if exact:
            return F.layer_norm(x, shape, scale, bias, eps)
        y = F.layer_norm(x, shape, None, None, eps) * scale
        return y + bias if bias is not None else y
    stash = _torch_dtype(int(n.attr("stash_type", 1)), f"node {n.label}")
    xf = x.to(stash)
    dims = tuple(range(axis, x.dim()))
    mean = xf.mean(dim=dims, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(var + eps)
    y = ((xf - mean) * inv).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv


@_op("BatchNormalization")
def _batch_norm(n, xs, m):
    if n.attr("training_mode", 0) or (len(n.outputs) > 1 and any(n.outputs[1:])):
        raise LrccError(f"node {n.label}: BatchNormalization in training mode is not supported")
    x, scale, bias, mean, var = (tensor(v) for v in xs[:5])
    eps = float(n.attr("epsilon", 1e-5))
    if eps >= 0:
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    # F.batch_norm refuses a negative epsilon; ONNX computes with it (NaN where var + eps < 0)
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = torch.rsqrt(var + eps)
    return (x - mean.reshape(shape)) * (inv * scale).reshape(shape) + bias.reshape(shape)


@_op("InstanceNormalization")
def _instance_norm(n, xs, m):
    x, scale, bias = (tensor(v) for v in xs[:3])
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(n.attr("epsilon", 1e-5)))


def _reduce_axes(n: OnnxNode, xs: list, rank: int) -> list[int] | None:
    """The axes to reduce; None means every axis; [] with noop_with_empty_axes means none."""
    from_input = n.opset >= 18 or (n.op == "ReduceSum" and n.opset >= 13)
    if from_input:
        axes = _ints(xs[1], "axes", n) if len(xs) > 1 and xs[1] is not None else []
    else:
        axes = list(n.attr("axes", []))
    if not axes:
        return [] if n.attr("noop_with_empty_axes", 0) else None
    return sorted(_axis(int(a), rank) for a in axes)


_REDUCERS: dict[str, Callable] = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: (x * x).sum(dim=d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: x.sum(dim=d, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _identity(op: str, dtype: torch.dtype):
    """The identity element of ReduceMax / ReduceMin for a dtype (their value on an empty set)."""
    high = op == "ReduceMin"
    if dtype == torch.bool:
        return high
    if dtype.is_floating_point:
        return float("inf") if high else float("-inf")
    info = torch.iinfo(dtype)
    return info.max if high else info.min


def _prod(x: torch.Tensor, dims: tuple, keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def _reduce(n, xs, m):
    x = tensor(xs[0])
    axes = _reduce_axes(n, xs, x.dim())
    if axes == []:
        return x
    dims = tuple(range(x.dim())) if axes is None else tuple(axes)
    if not dims:
        return x
    keep = bool(n.attr("keepdims", 1))
    if n.op in ("ReduceMax", "ReduceMin") and any(isinstance(x.shape[d], int) and x.shape[d] == 0 for d in dims):
        shape = [1 if d in dims else x.shape[d] for d in range(x.dim())] if keep else \
            [x.shape[d] for d in range(x.dim()) if d not in dims]
        return torch.full(shape, _identity(n.op, x.dtype), dtype=x.dtype)  # the max of nothing: -inf
    out = _REDUCERS[n.op](x, dims, keep)
    return out.to(x.dtype) if out.dtype != x.dtype and not x.dtype.is_floating_point else out


for _name in _REDUCERS:
    SUPPORTED_OPS[_name] = _reduce
    STATIC_INPUTS[_name] = (1,)


@_op("ArgMax", "ArgMin")
def _argmax(n, xs, m):
    x = tensor(xs[0])
    axis = _axis(int(n.attr("axis", 0)), x.dim())
    keep = bool(n.attr("keepdims", 1))
    fn = torch.argmax if n.op == "ArgMax" else torch.argmin
    if n.attr("select_last_index", 0):
        return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
    return fn(x, dim=axis, keepdim=keep)


@_op("CumSum", static=(1,))
def _cumsum(n, xs, m):
    x = tensor(xs[0])
    axis = _axis(int(_scalar(xs[1], "axis", n)), x.dim())
    if n.attr("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, dim=axis).to(x.dtype)
    if n.attr("exclusive", 0):
        y = y - x
    return y.flip(axis) if n.attr("reverse", 0) else y


# ---------------------------------------------------------------------------------------------
# shapes and data movement


def _allowzero(n: OnnxNode) -> bool:
    """Reshape's allowzero: only 1 switches it on (as in onnxruntime and the ONNX reference)."""
    return n.attr("allowzero", 0) == 1


def _reshape_target(shape_in, target: list, allowzero: bool) -> list:
    return [shape_in[i] if (isinstance(t, int) and t == 0 and not allowzero) else t for i, t in enumerate(target)]


@_op("Reshape", static=(1,))
def _reshape(n, xs, m):
    x = tensor(xs[0])
    target = _reshape_target(x.shape, _ints(xs[1], "shape", n), _allowzero(n))
    return x.reshape(target)


@_op("Flatten")
def _flatten(n, xs, m):
    x = tensor(xs[0])
    axis = _axis(int(n.attr("axis", 1)), x.dim(), inclusive=True)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@_op("Transpose")
def _transpose(n, xs, m):
    x = tensor(xs[0])
    perm = n.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


def _unsqueeze_axes(n: OnnxNode, xs: list) -> list[int]:
    return _ints(xs[1], "axes", n) if n.opset >= 13 else list(n.attr("axes"))


def _squeeze_axes(n: OnnxNode, xs: list) -> list[int] | None:
    if n.opset >= 13:
        return _ints(xs[1], "axes", n) if len(xs) > 1 and xs[1] is not None else None
    axes = n.attr("axes")
    return list(axes) if axes else None


@_op("Unsqueeze", static=(1,))
def _unsqueeze(n, xs, m):
    x = tensor(xs[0])
    rank = x.dim() + len(_unsqueeze_axes(n, xs))
    for a in sorted(_axis(int(a), rank) for a in _unsqueeze_axes(n, xs)):
        x = x.unsqueeze(a)
    return x


@_op("Squeeze", static=(1,))
def _squeeze(n, xs, m):
    x = tensor(xs[0])
    axes = _squeeze_axes(n, xs)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(int(a), x.dim()) for a in axes)) if axes else x


@_op("Concat")
def _concat(n, xs, m):
    ts = [tensor(x) for x in xs if x is not None]
    return torch.cat(ts, dim=_axis(int(n.attr("axis")), ts[0].dim()))


@_op("Gather")
def _gather(n, xs, m):
    x = tensor(xs[0])
    axis = _axis(int(n.attr("axis", 0)), x.dim())
    idx = xs[1]
    if isinstance(idx, Static) and idx.array.ndim == 0 and not _is_symbolic(idx.array):
        i = int(idx.array)
        return x.select(axis, i)
    idx = tensor(idx).long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if axis == 0 and x.dim() == 2 and x.dtype.is_floating_point:
        return F.embedding(idx, x)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


@_op("GatherElements")
def _gather_elements(n, xs, m):
    x, idx = tensor(xs[0]), tensor(xs[1]).long()
    axis = _axis(int(n.attr("axis", 0)), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


@_op("GatherND")
def _gather_nd(n, xs, m):
    x, idx = tensor(xs[0]), tensor(xs[1]).long()
    b = int(n.attr("batch_dims", 0))
    k = idx.shape[-1]
    sizes = tensor(_static(np.asarray(list(x.shape[b:b + k]), dtype=object), torch.int64))
    idx = torch.where(idx < 0, idx + sizes, idx)
    out_shape = tuple(idx.shape[:-1]) + tuple(x.shape[b + k:])
    if b == 0:
        return x[tuple(idx[..., i] for i in range(k))].reshape(out_shape)
    xb = x.reshape(-1, *x.shape[b:])
    ib = idx.reshape(-1, *idx.shape[b:])
    rows = torch.arange(xb.shape[0]).reshape(-1, *([1] * (ib.dim() - 2)))
    return xb[(rows,) + tuple(ib[..., i] for i in range(k))].reshape(out_shape)


@_op("Shape")
def _shape(n, xs, m):
    return _STATIC_IMPLS["Shape"](n, xs)


@_op("Size")
def _size(n, xs, m):
    return _STATIC_IMPLS["Size"](n, xs)


def _slice_args(n: OnnxNode, xs: list, rank: int):
    if n.opset < 10:
        starts, ends = list(n.attr("starts")), list(n.attr("ends"))
        axes = list(n.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(xs[1], "starts", n), _ints(xs[2], "ends", n)
        axes = _ints(xs[3], "axes", n) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
        steps = _ints(xs[4], "steps", n) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise LrccError(f"node {n.label}: Slice needs one start, end, axis and step per sliced axis; got "
                        f"{len(starts)} start(s), {len(ends)} end(s), {len(axes)} axes and {len(steps)} step(s)")
    if any(isinstance(st, int) and st == 0 for st in steps):
        raise LrccError(f"node {n.label}: Slice with a step of 0")
    return [(_axis(int(a), rank), s, e, st) for a, s, e, st in zip(axes, starts, ends, steps)]


_BIG = 1 << 62


@_op("Slice", static=(1, 2, 3, 4))
def _slice(n, xs, m):
    x = tensor(xs[0])
    for axis, start, end, step in _slice_args(n, xs, x.dim()):
        size = x.shape[axis]
        # bounds past +-2^62 are ONNX's "to the end" idioms (INT64_MAX, INT64_MIN)
        start = size if start >= _BIG else (-size - 1 if start <= -_BIG else start)
        end = size if end >= _BIG else (-size - 1 if end <= -_BIG else end)
        index = [slice(None)] * x.dim()
        if step > 0:
            index[axis] = slice(max(start, -size), end if end >= -size else 0, step)
            x = x[tuple(index)]
            continue
        # a negative step walks the reversed axis forwards; ONNX clamps start to [0, size-1], end to [-1, size-1]
        first = max(0, min(start + size if start < 0 else start, size - 1))
        last = max(-1, min(end + size if end < 0 else end, size - 1))
        index[axis] = slice(size - 1 - first, size - 1 - last, -step)
        x = x.flip(axis)[tuple(index)]
    return x


MAX_ELEMENTS = 1 << 28  # the largest tensor shape arithmetic may ask for (Range, ConstantOfShape, Expand, Tile)


def _check_size(n: OnnxNode, shape: list) -> None:
    """Refuse to make a tensor whose size, computed from the model's constants or shapes, is
    negative or absurd: a bad model would otherwise take all memory before failing."""
    if not all(isinstance(d, int) for d in shape):
        return  # symbolic sizes while tracing
    if any(d < 0 for d in shape):
        raise LrccError(f"node {n.label}: {n.op} asks for a tensor of shape {shape}, with a negative size")
    if math.prod(shape) > MAX_ELEMENTS:
        raise LrccError(f"node {n.label}: {n.op} asks for a tensor of shape {shape} ({math.prod(shape):,} elements); "
                        f"lrcc makes at most {MAX_ELEMENTS:,} elements from shape arithmetic. Check the model's "
                        "constants")


@_op("Expand", static=(1,))
def _expand(n, xs, m):
    x = tensor(xs[0])
    shape = _ints(xs[1], "shape", n)
    rank = max(len(shape), x.dim())
    have = [1] * (rank - x.dim()) + list(x.shape)
    want = [1] * (rank - len(shape)) + list(shape)
    out = [a if (isinstance(b, int) and b == 1) else b for a, b in zip(have, want)]
    _check_size(n, out)
    return x.reshape(have).expand(out)


@_op("Tile", static=(1,))
def _tile(n, xs, m):
    x = tensor(xs[0])
    repeats = _ints(xs[1], "repeats", n)
    if len(repeats) != x.dim():
        raise LrccError(f"node {n.label}: Tile needs one repeat per input dim; got {len(repeats)} for rank {x.dim()}")
    _check_size(n, [a * b for a, b in zip(x.shape, repeats)] if all(isinstance(r, int) for r in repeats) else [])
    return x.repeat(*repeats)


@_op("Split", static=(1,))
def _split(n, xs, m):
    x = tensor(xs[0])
    axis = _axis(int(n.attr("axis", 0)), x.dim())
    if n.opset >= 13:
        sizes = _ints(xs[1], "split", n) if len(xs) > 1 and xs[1] is not None else None
    else:
        sizes = list(n.attr("split")) if n.attr("split") else None
    count = len(n.outputs)
    if sizes is None:
        parts = int(n.attr("num_outputs", count))
        step = -(-x.shape[axis] // parts)
        return tuple(torch.split(x, step, dim=axis))
    return tuple(torch.split(x, sizes, dim=axis))


@_op("Constant")
def _constant(n, xs, m):
    return _STATIC_IMPLS["Constant"](n, xs)


@_op("ConstantOfShape", static=(0,))
def _constant_of_shape(n, xs, m):
    shape = _ints(xs[0], "shape", n)
    _check_size(n, shape)
    value = n.attr("value")
    if value is None:
        return torch.zeros(shape, dtype=torch.float32)
    dtype = _FROM_NP.get(np.dtype(value.dtype))
    if dtype is None:
        raise LrccError(f"node {n.label}: ConstantOfShape of element type {value.dtype} is not supported")
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=dtype)


@_op("Range", static=(0, 1, 2))
def _range(n, xs, m):
    start, limit, delta = (_py(xs[i].array.reshape(-1)[0]) if isinstance(xs[i], Static) else _scalar(xs[i], "bound", n)
                           for i in range(3))
    dtype = _value_dtype(xs[0])
    if all(isinstance(v, (int, float)) for v in (start, limit, delta)):
        if delta == 0:
            raise LrccError(f"node {n.label}: Range with a delta of 0")
        count = (float(limit) - float(start)) / float(delta)
        if not math.isfinite(count):
            raise LrccError(f"node {n.label}: Range from {start} to {limit} by {delta} has no finite length")
        _check_size(n, [max(int(math.ceil(count)), 0)])
    if dtype.is_floating_point:
        count = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
        return (start + torch.arange(count, dtype=torch.float64) * delta).to(dtype)
    return torch.arange(start, limit, delta, dtype=dtype)


@_op("Pad", static=(1, 2, 3))
def _pad(n, xs, m):
    x = tensor(xs[0])
    mode = n.attr("mode", "constant")
    if n.opset < 11:
        pads, value, axes = list(n.attr("pads")), Static(np.asarray(n.attr("value", 0.0)), torch.float32), None
    else:
        pads = _ints(xs[1], "pads", n)
        value = xs[2] if len(xs) > 2 and xs[2] is not None else None
        axes = _ints(xs[3], "axes", n) if len(xs) > 3 and xs[3] is not None else None
    rank = x.dim()
    if axes is not None:
        full = [0] * (2 * rank)
        for i, a in enumerate(axes):
            a = _axis(int(a), rank)
            full[a], full[rank + a] = pads[i], pads[len(axes) + i]
        pads = full
    if len(pads) != 2 * rank:
        raise LrccError(f"node {n.label}: Pad needs {2 * rank} pads (a begin and an end per axis) for a rank-{rank} "
                        f"input, got {len(pads)}")
    if all(isinstance(p, int) for p in pads) and all(isinstance(d, int) for d in x.shape):
        _check_size(n, [max(d + pads[i] + pads[rank + i], 0) for i, d in enumerate(x.shape)])
    if mode == "constant":
        if value is None or (isinstance(value, Static) and not _is_symbolic(value.array)):
            fill = 0 if value is None else value.array.reshape(-1)[0].item()
            return F.pad(x, _torch_pad(pads), value=fill)
        fill = tensor(value).reshape(-1)[0].to(x.dtype)  # known only at run time
        padded = F.pad(x, _torch_pad(pads), value=0)
        mask = F.pad(torch.zeros_like(x, dtype=torch.bool), _torch_pad(pads), value=True)
        return torch.where(mask, fill, padded)
    # reflect / edge / wrap: F.pad handles the trailing dims of a batched tensor only
    lead = next((i for i in range(rank) if pads[i] or pads[rank + i]), rank)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise LrccError(f"node {n.label}: Pad mode {mode!r} is not supported")
    shape = x.shape
    batch = math.prod(shape[:lead])
    inner = x.reshape(1, batch, *shape[lead:]) if lead >= 0 else x
    out = F.pad(inner, _torch_pad(pads[lead:rank] + pads[rank + lead:]), mode=torch_mode)
    return out.reshape(*shape[:lead], *out.shape[2:])


@_op("Dropout", static=(1, 2))
def _dropout(n, xs, m):
    x = tensor(xs[0])
    training = bool(_scalar(xs[2], "training_mode", n)) if len(xs) > 2 and xs[2] is not None else False
    if training:
        raise LrccError(f"node {n.label}: Dropout in training mode is not supported (lrcc compiles inference graphs)")
    if len(n.outputs) > 1 and n.outputs[1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@_op("Trilu", static=(1,))
def _trilu(n, xs, m):
    x = tensor(xs[0])
    k = int(_scalar(xs[1], "k", n)) if len(xs) > 1 and xs[1] is not None else 0
    return torch.triu(x, k) if n.attr("upper", 1) else torch.tril(x, k)


@_op("RMSNormalization")
def _rms_norm(n, xs, m):
    x, scale = tensor(xs[0]), tensor(xs[1])
    axis = _axis(int(n.attr("axis", -1)), x.dim())
    stash = _torch_dtype(int(n.attr("stash_type", 1)), f"node {n.label}")
    xf = x.to(stash)
    dims = tuple(range(axis, x.dim()))
    y = xf * torch.rsqrt((xf * xf).mean(dim=dims, keepdim=True) + float(n.attr("epsilon", 1e-5)))
    return y.to(x.dtype) * scale


@_op("GroupNormalization")
def _group_norm(n, xs, m):
    x, scale, bias = (tensor(v) for v in xs[:3])
    groups = int(n.attr("num_groups"))
    stash = _torch_dtype(int(n.attr("stash_type", 1)), f"node {n.label}")
    xf = x.to(stash).reshape(x.shape[0], groups, -1)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xf - mean) * torch.rsqrt(var + float(n.attr("epsilon", 1e-5)))).reshape(x.shape).to(x.dtype)
    channels = x.shape[1]
    if scale.numel() != channels:  # opset 18: one scale and bias per group
        scale, bias = scale.repeat_interleave(channels // groups), bias.repeat_interleave(channels // groups)
    shape = [1, channels] + [1] * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


@_op("LpNormalization")
def _lp_norm(n, xs, m):
    x = tensor(xs[0])
    p = int(n.attr("p", 2))
    axis = _axis(int(n.attr("axis", -1)), x.dim())
    norm = x.abs().sum(dim=axis, keepdim=True) if p == 1 else (x * x).sum(dim=axis, keepdim=True).sqrt()
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)


@_op("LRN")
def _lrn(n, xs, m):
    x = tensor(xs[0])
    size = int(n.attr("size"))
    alpha, beta, bias = float(n.attr("alpha", 1e-4)), float(n.attr("beta", 0.75)), float(n.attr("bias", 1.0))
    sq = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2  # channels c - floor((size-1)/2) .. c + ceil((size-1)/2)
    window = F.avg_pool2d(F.pad(sq, (0, 0, lo, hi)), (size, 1), stride=1) * size
    return x / (bias + alpha / size * window.reshape(x.shape)) ** beta


@_op("Hardmax")
def _hardmax(n, xs, m):
    x = tensor(xs[0])
    if n.opset >= 13:
        axis = _axis(int(n.attr("axis", -1)), x.dim())
        moved = x.movedim(axis, -1)
        hot = F.one_hot(moved.argmax(dim=-1), moved.shape[-1]).to(x.dtype)
        return hot.movedim(-1, axis)
    axis = _axis(int(n.attr("axis", 1)), x.dim())
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return F.one_hot(flat.argmax(dim=1), flat.shape[1]).to(x.dtype).reshape(x.shape)


@_op("Shrink")
def _shrink(n, xs, m):
    x = tensor(xs[0])
    lambd, bias = float(n.attr("lambd", 0.5)), float(n.attr("bias", 0.0))
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@_op("Swish")
def _swish(n, xs, m):
    x = tensor(xs[0])
    return x * torch.sigmoid(float(n.attr("alpha", 1.0)) * x)


@_op("DepthToSpace")
def _depth_to_space(n, xs, m):
    x = tensor(xs[0])
    bs = int(n.attr("blocksize"))
    b, c, h, w = x.shape
    if n.attr("mode", "DCR") == "CRD":
        y = x.reshape(b, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(b, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(b, c // (bs * bs), h * bs, w * bs)


@_op("SpaceToDepth")
def _space_to_depth(n, xs, m):
    x = tensor(xs[0])
    bs = int(n.attr("blocksize"))
    b, c, h, w = x.shape
    y = x.reshape(b, c, h // bs, bs, w // bs, bs)
    y = y.permute(0, 1, 3, 5, 2, 4) if n.attr("mode", "DCR") == "CRD" else y.permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * bs * bs, h // bs, w // bs)


@_op("CumProd", static=(1,))
def _cumprod(n, xs, m):
    x = tensor(xs[0])
    axis = _axis(int(_scalar(xs[1], "axis", n)), x.dim())
    reverse, exclusive = bool(n.attr("reverse", 0)), bool(n.attr("exclusive", 0))
    if reverse:
        x = x.flip(axis)
    if exclusive:  # shift by one along the axis, starting from the identity
        x = torch.cat([torch.ones_like(x.narrow(axis, 0, 1)), x.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)
    y = torch.cumprod(x, dim=axis).to(x.dtype)
    return y.flip(axis) if reverse else y


@_op("EyeLike")
def _eye_like(n, xs, m):
    x = tensor(xs[0])
    dtype = _torch_dtype(n.attr("dtype"), f"node {n.label}") if n.attr("dtype") is not None else x.dtype
    rows = torch.arange(x.shape[0]).reshape(-1, 1)
    cols = torch.arange(x.shape[1]).reshape(1, -1)
    return (cols - rows == int(n.attr("k", 0))).to(dtype)


@_op("OneHot", static=(1,))
def _one_hot(n, xs, m):
    idx, values = tensor(xs[0]), tensor(xs[2])
    depth = int(_scalar(xs[1], "depth", n))
    idx = idx.long() if not idx.dtype.is_floating_point else idx.trunc().long()
    idx = torch.where(idx < 0, idx + depth, idx)
    hot = idx.unsqueeze(-1) == torch.arange(depth)
    out = torch.where(hot, values[1], values[0])
    return out.movedim(-1, _axis(int(n.attr("axis", -1)), out.dim()))


@_op("TopK", static=(1,))
def _topk(n, xs, m):
    x = tensor(xs[0])
    k = int(_scalar(xs[1], "K", n)) if n.opset >= 10 else int(n.attr("k"))
    axis = _axis(int(n.attr("axis", -1)), x.dim())
    largest = bool(n.attr("largest", 1))
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)  # ties: the lower index first
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_reduction(n: OnnxNode) -> str:
    reduction = n.attr("reduction", "none")
    if reduction != "none" and reduction not in _SCATTER_REDUCE:
        raise LrccError(f"node {n.label}: {n.op} reduction {reduction!r} is not one of 'none', "
                        f"{', '.join(repr(r) for r in _SCATTER_REDUCE)}")
    return reduction


@_op("ScatterElements", "Scatter")
def _scatter_elements(n, xs, m):
    x, idx, updates = tensor(xs[0]), tensor(xs[1]).long(), tensor(xs[2])
    axis = _axis(int(n.attr("axis", 0)), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    reduction = _scatter_reduction(n)
    if reduction == "none":
        return x.scatter(axis, idx, updates)
    return x.scatter_reduce(axis, idx, updates, _SCATTER_REDUCE[reduction], include_self=True)


@_op("ScatterND")
def _scatter_nd(n, xs, m):
    x, idx, updates = tensor(xs[0]), tensor(xs[1]).long(), tensor(xs[2])
    k = idx.shape[-1]
    sizes = list(x.shape[:k])
    linear = torch.zeros(idx.shape[:-1], dtype=torch.long)
    for i in range(k):
        part = idx[..., i]
        linear = linear * sizes[i] + torch.where(part < 0, part + sizes[i], part)
    flat = x.reshape(math.prod(sizes), -1)
    rows = updates.reshape(-1, flat.shape[1])
    where = linear.reshape(-1, 1).expand(-1, flat.shape[1])
    reduction = _scatter_reduction(n)
    if reduction == "none":
        return flat.scatter(0, where, rows).reshape(x.shape)
    return flat.scatter_reduce(0, where, rows, _SCATTER_REDUCE[reduction], include_self=True).reshape(x.shape)


for _name, _fn in {"BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
                   "BitwiseXor": torch.bitwise_xor}.items():
    SUPPORTED_OPS[_name] = (lambda fn: lambda n, xs, m: fn(tensor(xs[0]), tensor(xs[1])))(_fn)
SUPPORTED_OPS["BitwiseNot"] = _unary(torch.bitwise_not)


@_op("ConvTranspose")
def _conv_transpose(n, xs, m):
    x, w = tensor(xs[0]), tensor(xs[1])
    b = tensor(xs[2]) if len(xs) > 2 and xs[2] is not None else None
    spatial = w.dim() - 2
    if spatial not in (1, 2, 3):
        raise LrccError(f"node {n.label}: ConvTranspose over {spatial} spatial dims is not supported (1, 2 or 3)")
    kernel = list(n.attr("kernel_shape", w.shape[2:]))
    strides = list(n.attr("strides", [1] * spatial))
    dilations = list(n.attr("dilations", [1] * spatial))
    out_pad = list(n.attr("output_padding", [0] * spatial))
    group = int(n.attr("group", 1))
    mode = n.attr("auto_pad", "NOTSET")
    out_shape = n.attr("output_shape")
    if out_shape or mode in ("SAME_UPPER", "SAME_LOWER"):
        want = list(out_shape)[-spatial:] if out_shape else [x.shape[2 + i] * strides[i] for i in range(spatial)]
        begins, ends = [], []
        for i in range(spatial):
            total = strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 - want[i]
            half = total // 2  # as the ONNX reference implementation splits it
            begins.append(half if mode == "SAME_UPPER" else total - half)
            ends.append(total - half if mode == "SAME_UPPER" else half)
        pads = begins + ends
    elif mode == "VALID":
        pads = [0] * (2 * spatial)
    else:
        pads = list(n.attr("pads", [0] * (2 * spatial)))
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    full = conv(x, w, b, strides, 0, 0, group, dilations)
    # output_padding and pads: grow (bias only) or crop the full result at each end
    grow = []
    for i in reversed(range(spatial)):
        grow += [-pads[i], out_pad[i] - pads[spatial + i]]
    if any(g > 0 for g in grow) and b is not None:
        bias_shape = [1, -1] + [1] * spatial
        return F.pad(full - b.reshape(bias_shape), grow) + b.reshape(bias_shape)
    return F.pad(full, grow)


# ---------------------------------------------------------------------------------------------
# Static (numpy) evaluation: shape arithmetic while tracing, constant folding when built


def _py(v):
    return v.item() if isinstance(v, np.generic) else v


def _arr(v: Value) -> np.ndarray:
    return v.array


def _np_result(values, dtype: torch.dtype) -> Static:
    return _static(values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object), dtype)


@_static_impl("Shape")
def _s_shape(n, xs):
    x = xs[0]
    shape = list(x.shape) if isinstance(x, torch.Tensor) else list(x.array.shape)
    rank = len(shape)
    start = n.attr("start", 0)
    end = n.attr("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return _np_result(np.asarray(shape[start:end], dtype=object).reshape(-1), torch.int64)


@_static_impl("Size")
def _s_size(n, xs):
    x = xs[0]
    shape = list(x.shape) if isinstance(x, torch.Tensor) else list(x.array.shape)
    return _np_result(np.asarray(math.prod(shape), dtype=object), torch.int64)


@_static_impl("Constant")
def _s_constant(n, xs):
    attrs = n.attrs
    if attrs.get("value") is not None:
        a = np.asarray(attrs["value"])
        dtype = _FROM_NP.get(a.dtype)
        if dtype is None:
            raise LrccError(f"node {n.label}: a Constant of element type {a.dtype} is not supported")
        return Static(a, dtype)
    if "value_float" in attrs:
        return Static(np.asarray(attrs["value_float"], dtype=np.float32), torch.float32)
    if "value_floats" in attrs:
        return Static(np.asarray(attrs["value_floats"], dtype=np.float32), torch.float32)
    if "value_int" in attrs:
        return Static(np.asarray(attrs["value_int"], dtype=np.int64), torch.int64)
    if "value_ints" in attrs:
        return Static(np.asarray(attrs["value_ints"], dtype=np.int64), torch.int64)
    raise LrccError(f"node {n.label}: only numeric tensor Constants are supported (no strings or sparse tensors)")


@_static_impl("Identity")
def _s_identity(n, xs):
    return xs[0]


@_static_impl("Cast")
def _s_cast(n, xs):
    a = _arr(xs[0])
    dtype = _torch_dtype(n.attr("to"), f"node {n.label}")
    if not _is_symbolic(a):
        return Static(a.astype(_NP[dtype]), dtype)
    if dtype.is_floating_point:
        return _np_result(np.asarray([torch.sym_float(v) for v in a.reshape(-1).tolist()], dtype=object).reshape(a.shape), dtype)
    if dtype == torch.int64 or dtype == torch.int32:
        return _np_result(np.asarray([v if isinstance(v, (int, torch.SymInt)) else torch.sym_int(v)
                                      for v in a.reshape(-1).tolist()], dtype=object).reshape(a.shape), dtype)
    return NotImplemented


def _np_binary(fn_int, fn_sym=None):
    def impl(n, xs):
        a, b = _arr(xs[0]), _arr(xs[1])
        dtype = xs[0].dtype
        if _is_symbolic(a) or _is_symbolic(b):
            if fn_sym is None:
                return NotImplemented
            return _np_result(fn_sym(a.astype(object), b.astype(object)), dtype)
        with np.errstate(all="ignore"):
            return Static(np.asarray(fn_int(a, b)).astype(_NP[dtype], copy=False), dtype)
    return impl


def _np_div(a, b):
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return a / b
    q = np.abs(a) // np.where(b == 0, 1, np.abs(b))
    return q * np.sign(a) * np.sign(b)


def _sym_div(a, b):
    flat_a, flat_b = np.broadcast_arrays(a, b)
    out = [x / y if isinstance(x, (float, torch.SymFloat)) or isinstance(y, (float, torch.SymFloat)) else x // y
           for x, y in zip(flat_a.reshape(-1).tolist(), flat_b.reshape(-1).tolist())]
    return np.asarray(out, dtype=object).reshape(flat_a.shape)


_STATIC_IMPLS["Add"] = _np_binary(np.add, np.add)
_STATIC_IMPLS["Sub"] = _np_binary(np.subtract, np.subtract)
_STATIC_IMPLS["Mul"] = _np_binary(np.multiply, np.multiply)
_STATIC_IMPLS["Div"] = _np_binary(_np_div, _sym_div)


def _np_compare(fn):
    def impl(n, xs):
        a, b = _arr(xs[0]), _arr(xs[1])
        if _is_symbolic(a) or _is_symbolic(b):
            a, b = np.broadcast_arrays(a.astype(object), b.astype(object))
            out = [bool(fn(x, y)) for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())]
            return Static(np.asarray(out, dtype=np.bool_).reshape(a.shape), torch.bool)
        return Static(np.asarray(fn(a, b), dtype=np.bool_), torch.bool)
    return impl


_STATIC_IMPLS["Equal"] = _np_compare(lambda a, b: a == b)
_STATIC_IMPLS["Greater"] = _np_compare(lambda a, b: a > b)
_STATIC_IMPLS["Less"] = _np_compare(lambda a, b: a < b)


def _np_mod(n, xs):
    a, b = _arr(xs[0]), _arr(xs[1])
    if _is_symbolic(a) or _is_symbolic(b):
        if n.attr("fmod", 0):
            return NotImplemented
        return _np_result(np.mod(a.astype(object), b.astype(object)), xs[0].dtype)  # Python's %: divisor's sign
    with np.errstate(all="ignore"):
        out = np.fmod(a, b) if n.attr("fmod", 0) else np.mod(a, b)
    return Static(np.asarray(out).astype(_NP[xs[0].dtype], copy=False), xs[0].dtype)


_STATIC_IMPLS["Mod"] = _np_mod


def _np_logical(fn):
    def impl(n, xs):
        arrays = [_arr(x) for x in xs]
        if any(_is_symbolic(a) for a in arrays):
            return NotImplemented
        return Static(np.asarray(fn(*[a.astype(bool) for a in arrays])), torch.bool)
    return impl


_STATIC_IMPLS["And"] = _np_logical(np.logical_and)
_STATIC_IMPLS["Or"] = _np_logical(np.logical_or)
_STATIC_IMPLS["Xor"] = _np_logical(np.logical_xor)


def _np_unary(fn):
    """Numeric shape arithmetic on concrete values (symbolic ones run as tensors)."""
    def impl(n, xs):
        a = _arr(xs[0])
        if _is_symbolic(a):
            return NotImplemented
        with np.errstate(all="ignore"):
            return Static(np.asarray(fn(a)).astype(_NP[xs[0].dtype], copy=False), xs[0].dtype)
    return impl


for _name, _fn in {"Sqrt": np.sqrt, "Abs": np.abs, "Floor": np.floor, "Ceil": np.ceil, "Reciprocal": np.reciprocal,
                   "Exp": np.exp, "Log": np.log, "Sign": np.sign}.items():
    _STATIC_IMPLS[_name] = _np_unary(_fn)


@_static_impl("ConstantOfShape")
def _s_constant_of_shape(n, xs):
    shape = _ints(xs[0], "shape", n)
    if any(not isinstance(d, int) for d in shape) or math.prod(shape) > 4096:
        return NotImplemented
    value = n.attr("value")
    if value is None:
        return Static(np.zeros(shape, dtype=np.float32), torch.float32)
    dtype = _FROM_NP.get(np.dtype(value.dtype))
    if dtype is None:
        return NotImplemented
    return Static(np.full(shape, value.reshape(-1)[0], dtype=value.dtype), dtype)


@_static_impl("Neg")
def _s_neg(n, xs):
    return _np_result(-_arr(xs[0]), xs[0].dtype)


@_static_impl("Not")
def _s_not(n, xs):
    return Static(np.logical_not(_arr(xs[0]).astype(bool)), torch.bool)


@_static_impl("Where")
def _s_where(n, xs):
    c, a, b = _arr(xs[0]).astype(bool), _arr(xs[1]), _arr(xs[2])
    if _is_symbolic(a) or _is_symbolic(b):
        a, b = a.astype(object), b.astype(object)
    return _np_result(np.where(c, a, b), xs[1].dtype)


def _np_minmax(pick):
    def impl(n, xs):
        arrays = [_arr(x) for x in xs if x is not None]
        if any(_is_symbolic(a) for a in arrays):
            return NotImplemented
        out = arrays[0]
        for a in arrays[1:]:
            out = pick(out, a)
        return Static(out.astype(_NP[xs[0].dtype], copy=False), xs[0].dtype)
    return impl


_STATIC_IMPLS["Max"] = _np_minmax(np.maximum)
_STATIC_IMPLS["Min"] = _np_minmax(np.minimum)


@_static_impl("Gather")
def _s_gather(n, xs):
    a, idx = _arr(xs[0]), _arr(xs[1])
    if _is_symbolic(idx):
        return NotImplemented
    axis = _axis(int(n.attr("axis", 0)), a.ndim)
    return _np_result(np.take(a, idx.astype(np.int64), axis=axis), xs[0].dtype)


@_static_impl("Concat")
def _s_concat(n, xs):
    arrays = [_arr(x) for x in xs if x is not None]
    if any(a.ndim == 0 for a in arrays):
        return NotImplemented
    if any(_is_symbolic(a) for a in arrays):
        arrays = [a.astype(object) for a in arrays]
    axis = _axis(int(n.attr("axis")), arrays[0].ndim)
    return _np_result(np.concatenate(arrays, axis=axis), xs[0].dtype)


@_static_impl("Unsqueeze")
def _s_unsqueeze(n, xs):
    a = _arr(xs[0])
    axes = _unsqueeze_axes(n, xs)
    rank = a.ndim + len(axes)
    return _np_result(np.expand_dims(a, tuple(sorted(_axis(int(x), rank) for x in axes))), xs[0].dtype)


@_static_impl("Squeeze")
def _s_squeeze(n, xs):
    a = _arr(xs[0])
    axes = _squeeze_axes(n, xs)
    out = np.squeeze(a) if axes is None else np.squeeze(a, axis=tuple(_axis(int(x), a.ndim) for x in axes))
    return _np_result(np.asarray(out, dtype=a.dtype), xs[0].dtype)


@_static_impl("Reshape")
def _s_reshape(n, xs):
    a = _arr(xs[0])
    target = _reshape_target(a.shape, _ints(xs[1], "shape", n), _allowzero(n))
    if any(not isinstance(t, int) for t in target):
        return NotImplemented
    return _np_result(a.reshape(target), xs[0].dtype)


@_static_impl("Slice")
def _s_slice(n, xs):
    a = _arr(xs[0])
    args = _slice_args(n, xs, a.ndim)
    if any(not isinstance(v, int) for _, s, e, st in args for v in (s, e, st)):
        return NotImplemented
    index = [slice(None)] * a.ndim
    for axis, start, end, step in args:
        index[axis] = slice(start, end, step)
    return _np_result(a[tuple(index)], xs[0].dtype)


@_static_impl("Range")
def _s_range(n, xs):
    vals = [_arr(x).reshape(-1)[0] for x in xs[:3]]
    if any(isinstance(v, (torch.SymInt, torch.SymFloat)) for v in vals):
        return NotImplemented
    start, limit, delta = vals
    if float(delta) == 0 or not math.isfinite((float(limit) - float(start)) / float(delta)):
        return NotImplemented  # the converter says what is wrong
    count = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
    if count > 4096:
        return NotImplemented
    dtype = xs[0].dtype
    return Static((start + np.arange(count) * delta).astype(_NP[dtype]), dtype)


# ---------------------------------------------------------------------------------------------
# the module


_IDENT = re.compile(r"[^0-9A-Za-z_]")


_PROBE = nn.Module()

# what torch and numpy raise for operands of the wrong shape, element type or value; anything else
# out of a converter is a bug in lrcc and stays as it is
_OP_ERRORS = (RuntimeError, ValueError, IndexError, ZeroDivisionError, OverflowError, MemoryError)


def _values_unknown_now() -> bool:
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__


def _describe(xs: list) -> str:
    """Node inputs as element type and shape, e.g. (float32[2, 8], int64[3], -)."""
    parts = []
    for x in xs:
        if x is None:
            parts.append("-")
        elif isinstance(x, Static):
            parts.append(f"{str(x.dtype).removeprefix('torch.')}{list(x.array.shape)}")
        else:
            parts.append(f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}")
    return "(" + ", ".join(parts) + ")"


def _initializer_array(t, where: str) -> np.ndarray:
    """A TensorProto's values (an initializer, a Constant's value); a corrupt one, whose data does
    not fill its dims, is named by `where`."""
    from onnx import numpy_helper
    try:
        return np.asarray(numpy_helper.to_array(t))
    except (ValueError, TypeError, OverflowError, MemoryError) as e:
        raise LrccError(f"{where} (dims {list(t.dims)}): its data does not match its "
                        f"dims and element type ({_first_line(e)}); the file is corrupt or was edited by hand") from None


def _sanitize(part: str) -> str:
    s = _IDENT.sub("_", part)
    return s or "_"


class OnnxModule(nn.Module):
    """A torch module that computes an ONNX graph; forward takes the graph inputs in order and
    returns its output (a tuple when the graph has several)."""

    def __init__(self, model, source: str = "<model>") -> None:
        super().__init__()
        graph = model.graph
        self.source = source
        self._opset = onnx_opset(model, source)
        initializers = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        self._paths: dict[str, str] = {}
        self._taken: set[str] = set()
        self._tensors: dict[str, tuple[str, bool]] = {}  # value name -> (attribute path, is parameter)
        self._linear_cache: dict[tuple, str] = {}

        consts: dict[str, Static] = {}
        for name, t in initializers.items():
            dtype = _torch_dtype(t.data_type, f"{source}: initializer {name!r}")
            consts[name] = Static(_initializer_array(t, f"{source}: initializer {name!r}"), dtype)
        self._initializer_names = set(initializers)

        nodes = []
        for i, nd in enumerate(graph.node):
            label = f"{source}: node {nd.name!r}" if nd.name else f"{source}: node #{i} ({nd.op_type})"
            nodes.append(OnnxNode(i, nd.name, nd.op_type, list(nd.input), list(nd.output),
                                  {a.name: _attr_value(a, label) for a in nd.attribute}, self._opset))
        users: dict[str, list[tuple[OnnxNode, int]]] = {}
        for nd in nodes:
            for k, name in enumerate(nd.inputs):
                if name:
                    users.setdefault(name, []).append((nd, k))

        run: list[OnnxNode] = []
        fused: set[int] = set()
        needs_tensor: set[str] = set()  # constants a torch op reads: registered parameters / buffers
        read_static: set[str] = set()  # constants forward reads as values (shapes, axes, scalars)
        shape_values: set[str] = set()  # computed from shapes while tracing
        for nd in nodes:
            if nd.index in fused:
                continue
            present = [x for x in nd.inputs if x]
            if nd.op == "Constant" or (present and all(x in consts for x in present)):
                for name, v in zip(nd.outputs, self._fold(nd, [consts[x] if x else None for x in nd.inputs])):
                    if name:
                        consts[name] = v
                continue
            run.append(nd)
            if nd.op in _STATIC_IMPLS and (nd.op in ("Shape", "Size")
                                          or all(x in consts or x in shape_values for x in present)):
                shape_values.update(x for x in nd.outputs if x)
                read_static.update(x for x in present if x in consts)
                continue
            if nd.op in ("Gemm", "MatMul"):
                self._plan_linear(nd, consts, users, fused, set(self.output_names))
            static = set(STATIC_INPUTS.get(nd.op, ()))
            planned = {1, 2} if nd.plan.get("bias") and nd.op == "Gemm" else ({1} if "weight" in nd.plan else set())
            for k, name in enumerate(nd.inputs):
                if name not in consts or k in planned:
                    continue
                if k in static or consts[name].array.size == 1:  # scalars are passed as values (see tensor())
                    read_static.add(name)
                else:
                    needs_tensor.add(name)
        for name in self.output_names:
            if name in consts:
                (read_static if consts[name].array.size == 1 else needs_tensor).add(name)
        for name in sorted(needs_tensor):
            self._register(name, consts[name], param=name in initializers and consts[name].dtype.is_floating_point)
        # forward's view of the constants; a large one that it reads only as a registered tensor (or
        # never: a linear's weight, held by its parameter) keeps no numpy copy
        self._consts: dict[str, Static] = {}
        for name in {x for nd in run for x in nd.inputs if x in consts} | {x for x in self.output_names if x in consts}:
            c = consts[name]
            keep = name in read_static or c.array.size <= 1024
            self._consts[name] = c if keep else Static(np.empty((0,), dtype=c.array.dtype), c.dtype)
        self._nodes = run

    # -- building

    def _fold(self, nd: OnnxNode, xs: list) -> list[Static]:
        """Run one node on constant inputs now (numpy where it has an implementation, else torch)."""
        try:
            impl = _STATIC_IMPLS.get(nd.op)
            out = impl(nd, xs) if impl is not None else NotImplemented
            if out is NotImplemented:
                real = [torch.from_numpy(np.require(x.array, requirements=["C", "W"])).to(x.dtype)
                        if isinstance(x, Static) else x for x in xs]  # writable: torch warns on read-only buffers
                out = SUPPORTED_OPS[nd.op](nd, real, self)
        except LrccError as e:
            raise self._located(e, nd) from e
        except _OP_ERRORS as e:  # a torch or numpy error on the model's own constants
            raise LrccError(f"{self.source}: node {nd.label} ({nd.op}) fails on its constant inputs "
                            f"{_describe(xs)}: {_first_line(e)}") from e
        outs = out if isinstance(out, tuple) else (out,)
        return [v if isinstance(v, Static) else _static(v.detach().numpy(), v.dtype) for v in outs]

    def _located(self, e: LrccError, nd: OnnxNode) -> LrccError:
        """e, with the node and the model's file or name in front where its message lacks them."""
        msg = str(e)
        if f"node {nd.label}" not in msg:
            msg = f"node {nd.label} ({nd.op}): {msg}"
        if not msg.startswith(self.source):
            msg = f"{self.source}: {msg}"
        return e if msg == str(e) else type(e)(msg)

    def _path_for(self, name: str) -> str:
        parts = [_sanitize(p) for p in name.split(".")]
        path = ".".join(parts)
        clash = path in self._taken or any(t.startswith(path + ".") for t in self._taken) or any(
            ".".join(parts[:k]) in self._taken for k in range(1, len(parts)))
        reserved = any(hasattr(_PROBE, p) for p in parts) or parts[0] in self.__dict__
        if clash or reserved:
            flat = "onnx_" + _sanitize(name)
            path, k = flat, 2
            while path in self._taken or any(t.startswith(path + ".") for t in self._taken):
                path, k = f"{flat}_{k}", k + 1
        self._taken.add(path)
        return path

    def _register(self, name: str, value: Static, param: bool, array: np.ndarray | None = None) -> str:
        """Register a constant as a parameter or buffer named after its ONNX value; returns its path."""
        data = torch.from_numpy(np.array(value.array if array is None else array, copy=True, order="C")).to(value.dtype)
        path = self._path_for(name)
        owner: nn.Module = self
        *parents, leaf = path.split(".")
        for p in parents:
            if p not in owner._modules:
                owner.add_module(p, nn.Module())
            owner = owner._modules[p]
        if param:
            owner.register_parameter(leaf, nn.Parameter(data, requires_grad=False))
        else:
            owner.register_buffer(leaf, data)
        if array is None:
            self._tensors[name] = (path, param)
        return path

    def _plan_linear(self, nd: OnnxNode, consts: dict, users: dict, fused: set, outputs: set) -> None:
        """Gemm / MatMul with a constant 2-D float weight: an F.linear on a parameter (out, in)."""
        if len(nd.inputs) < 2 or nd.inputs[0] in consts or nd.inputs[1] not in consts:
            return
        w = consts[nd.inputs[1]]
        if w.array.ndim != 2 or not w.dtype.is_floating_point or _is_symbolic(w.array):
            return
        weight = w.array
        bias = None
        if nd.op == "Gemm":
            if not nd.attr("transB", 0):
                weight = weight.T
            alpha = float(nd.attr("alpha", 1.0))
            if alpha != 1.0:
                weight = weight * np.asarray(alpha, dtype=weight.dtype)
            c_name = nd.inputs[2] if len(nd.inputs) > 2 else ""
            if c_name and c_name in consts:
                c = consts[c_name].array
                out_features = weight.shape[0]
                if c.dtype == weight.dtype and (c.ndim == 0 or c.shape in ((out_features,), (1, out_features), (1,))):
                    beta = float(nd.attr("beta", 1.0))
                    b = np.broadcast_to(c.reshape(-1), (out_features,)) * np.asarray(beta, dtype=c.dtype)
                    bias = (c_name, ("gemm_bias", beta, c.shape), b)
            key = ("gemm", nd.attr("transB", 0), alpha)
        else:
            weight = weight.T
            key = ("matmul",)
            out = nd.outputs[0]
            consumers = users.get(out, [])
            if len(consumers) == 1 and out not in outputs and consumers[0][0].op == "Add":
                add = consumers[0][0]
                other = add.inputs[1 - consumers[0][1]]
                b = consts.get(other)
                if (b is not None and b.array.ndim == 1 and b.array.shape[0] == weight.shape[0]
                        and b.dtype == w.dtype and not _is_symbolic(b.array) and add.inputs[0] != add.inputs[1]):
                    bias = (other, ("bias",), b.array)
                    nd.outputs = list(add.outputs)
                    fused.add(add.index)
        nd.plan["weight"] = self._linear_param(nd.inputs[1], key, w, weight)
        if bias is not None:
            nd.plan["bias"] = self._linear_param(bias[0], bias[1], consts[bias[0]], bias[2])

    def _linear_param(self, name: str, key: tuple, value: Static, array: np.ndarray) -> str:
        cache_key = (name,) + key
        if cache_key not in self._linear_cache:
            self._linear_cache[cache_key] = self._register(name, value, param=True, array=np.ascontiguousarray(array))
        return self._linear_cache[cache_key]

    # -- running

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise LrccError(f"{self.source}: the model takes {len(self.input_names)} input(s) "
                            f"({', '.join(self.input_names)}), got {len(inputs)}")
        env: dict[str, Value] = dict(self._consts)
        for name, (path, is_param) in self._tensors.items():
            c = self._consts[name]
            env[name] = Static(c.array, c.dtype, self.get_parameter(path) if is_param else self.get_buffer(path))
        env.update(zip(self.input_names, inputs))
        for nd in self._nodes:
            xs = [env[x] if x else None for x in nd.inputs]
            out = self._run(nd, xs)
            if not isinstance(out, tuple):
                out = (out,)
            for name, v in zip(nd.outputs, out):
                if name:
                    env[name] = v
        results = tuple(tensor(env[name]) for name in self.output_names)
        return results[0] if len(results) == 1 else results

    def _run(self, nd: OnnxNode, xs: list):
        if _values_unknown_now():  # torch.export tracing: its own errors say more than ours
            return self._convert(nd, xs)
        try:
            return self._convert(nd, xs)
        except LrccError as e:
            raise self._located(e, nd) from e
        except _OP_ERRORS as e:  # a valid model whose shapes do not fit these inputs, or a bad model
            raise LrccError(f"{self.source}: node {nd.label} ({nd.op}) fails on inputs {_describe(xs)}: "
                            f"{_first_line(e)}; check the model with onnxruntime on the same inputs") from e

    def _convert(self, nd: OnnxNode, xs: list):
        impl = _STATIC_IMPLS.get(nd.op)
        if impl is not None and (nd.op in ("Shape", "Size") or all(x is None or isinstance(x, Static) for x in xs)):
            out = impl(nd, xs)
            if out is not NotImplemented:
                return out
        return SUPPORTED_OPS[nd.op](nd, xs, self)


# ---------------------------------------------------------------------------------------------
# loading, checking, example inputs


def _load(path_or_model) -> tuple[Any, str]:
    import onnx
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model, path_or_model.graph.name or "<ModelProto>"
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise LrccError(f"expected a path to an .onnx file or an onnx.ModelProto, got {type(path_or_model).__name__}")
    path = os.fspath(path_or_model)
    if not os.path.isfile(path):
        raise LrccError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError, missing external data, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LrccError(f"{path}: not a valid ONNX model (cannot parse it: {reason}); "
                        "is the file complete and written by an ONNX exporter?") from None
    return model, path


def onnx_opset(model, source: str = "<model>") -> int:
    """The version of the default ONNX operator set the model imports ("" and "ai.onnx" name it)."""
    versions = {o.version for o in model.opset_import if (o.domain or "") in ("", "ai.onnx")}
    if len(versions) > 1:
        raise LrccError(f"{source}: the model imports the ONNX operator set at several versions "
                        f"({', '.join(str(v) for v in sorted(versions))}, as domain '' and 'ai.onnx'); keep one")
    return versions.pop() if versions else 1


def _check(model, source: str):
    import onnx
    if not model.graph.node and not model.graph.output:
        raise LrccError(f"{source}: not a valid ONNX model (it has no graph); is the file complete?")
    if not model.graph.output:
        raise LrccError(f"{source}: the graph has no outputs; a model lrcc compiles computes at least one")
    opset = onnx_opset(model, source)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise LrccError(f"{source}: the model imports ONNX operator set {opset}, newer than the newest this "
                        f"onnx package knows ({newest}); upgrade onnx, or export the model at opset {newest} or below")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise LrccError(f"{source}: not a valid ONNX model (the ONNX checker says: {reason})") from None
    if model.functions:
        try:
            from onnx import inliner
            model = inliner.inline_local_functions(model)
        except Exception as e:
            raise LrccError(f"{source}: cannot inline the model's local functions ({type(e).__name__}: {e})") from None
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes are a convenience here; the module computes its own
        pass
    return model


def _infer_types(model, source: str):
    """ONNX's own type and shape inference, strict, once function operators are expanded: a model
    whose element types or static shapes contradict each other (a float16 scale on a float32
    LayerNormalization, a Conv bias of the wrong size, an Add of [2, 4] and [2, 3]) is refused
    here, naming the node, rather than failing inside torch later."""
    import onnx
    try:
        # no data_prop: ONNX's data propagation materialises a Range of 2**62 values (and runs out of memory)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as e:
        reason = " ".join(str(e).split())[:400] or type(e).__name__
        raise LrccError(f"{source}: not a valid ONNX model: its element types or shapes are inconsistent "
                        f"(ONNX shape inference says: {reason}); fix the model where it names the node") from None


def _function_body(node, opset: int, types: dict):
    """The FunctionProto ONNX defines for `node`'s operator at `opset`, or None."""
    import onnx
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:  # not an ONNX operator (or not at this opset)
        return None
    versions = [v for v in schema.function_opset_versions if v <= opset]
    dependent = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    try:
        if dependent and (not versions or max(dependent) >= max(versions)):
            input_types = [types.get(name, onnx.TypeProto()).SerializeToString() for name in node.input]
            text = schema.get_context_dependent_function_with_opset_version(max(dependent), node.SerializeToString(),
                                                                             input_types)
        elif versions:
            text = schema.get_function_with_opset_version(max(versions))
        else:
            return None
    except Exception:  # the body needs input types that shape inference could not give
        return None
    body = onnx.FunctionProto()
    body.ParseFromString(text)
    return body if body.node else None


def _inline_body(node, body, prefix: str) -> list:
    """`body`'s nodes computing `node`: inputs and outputs renamed to the node's, the rest prefixed,
    attribute references replaced by the node's attributes (or their schema defaults)."""
    import onnx
    rename = {formal: actual for formal, actual in zip(body.input, node.input)}
    rename.update({formal: "" for formal in list(body.input)[len(node.input):]})
    rename.update({formal: actual for formal, actual in zip(body.output, node.output)})
    attrs = {a.name: a for a in node.attribute}
    schema = onnx.defs.get_schema(node.op_type, domain="")
    for name, spec in schema.attributes.items():
        if name not in attrs and spec.default_value is not None and spec.default_value.type:
            attrs[name] = spec.default_value

    def new_name(x: str) -> str:
        return rename.get(x, prefix + x) if x else ""

    out = []
    for inner in body.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        del copy.input[:], copy.output[:], copy.attribute[:]
        copy.input.extend(new_name(x) for x in inner.input)
        copy.output.extend(new_name(x) for x in inner.output)
        copy.name = prefix + (inner.name or inner.op_type)
        for a in inner.attribute:
            if a.ref_attr_name:
                if a.ref_attr_name in attrs:
                    resolved = onnx.AttributeProto()
                    resolved.CopyFrom(attrs[a.ref_attr_name])
                    resolved.name = a.name
                    copy.attribute.append(resolved)
            else:
                copy.attribute.append(a)
        out.append(copy)
    return out


def has_function_body(op_type: str, opset: int) -> bool:
    """Whether ONNX defines `op_type` at `opset` as a function of other operators, which the import
    expands when lrcc has no converter of its own for it."""
    import onnx
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except Exception:
        return False
    return any(v <= opset for v in list(schema.function_opset_versions)
               + list(schema.context_dependent_function_opset_versions))


def _expand_function_ops(model, opset: int):
    """Replace nodes whose operator lrcc lacks, but which ONNX defines as a function of other
    operators (Attention, RotaryEmbedding, MeanVarianceNormalization, ...), by that function body;
    repeated, as a body may use other such operators."""
    import onnx
    for round_ in range(4):
        types = {vi.name: vi.type for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
        for t in model.graph.initializer:
            types[t.name] = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
        nodes, changed = [], False
        for i, node in enumerate(model.graph.node):
            if (node.domain or "") in ("", "ai.onnx") and node.op_type not in SUPPORTED_OPS:
                body = _function_body(node, opset, types)
                if body is not None:
                    nodes += _inline_body(node, body, f"{node.name or node.op_type}_{round_}_{i}/")
                    changed = True
                    continue
            nodes.append(node)
        if not changed:
            return model
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:
            pass
    return model


def unsupported_nodes(model, expand: bool = False) -> dict[str, list[str]]:
    """The operators of `model` lrcc cannot import, each with the names of the nodes using it;
    with expand=True, after expanding function operators (on a copy) as the import does."""
    if expand:
        import onnx
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        try:
            copy = onnx.shape_inference.infer_shapes(copy)
        except Exception:
            pass
        opset = onnx_opset(copy)
        model = _expand_function_ops(copy, opset)
    where: dict[str, list[str]] = {}
    for i, nd in enumerate(model.graph.node):
        domain = nd.domain or ""
        if domain not in ("", "ai.onnx") or nd.op_type not in SUPPORTED_OPS:
            key = nd.op_type if domain in ("", "ai.onnx") else f"{domain}.{nd.op_type}"
            where.setdefault(key, []).append(nd.name or f"#{i} (output {nd.output[0] if nd.output else '?'!r})")
    return where


def _unsupported(model, source: str) -> None:
    where = unsupported_nodes(model)
    if not where:
        return
    parts = []
    for op, names in sorted(where.items()):
        shown = ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else "")
        parts.append(f"{op} (nodes: {shown})")
    raise LrccError(f"{source}: unsupported ONNX operator(s): {'; '.join(parts)}. "
                    f"lrcc's ONNX import supports {len(SUPPORTED_OPS)} operators (lrcc.ir.from_onnx.SUPPORTED_OPS) and "
                    "the ONNX function operators whose bodies use only those; export the model with those, or "
                    "compile the torch model directly")


def _vocab_sizes(model) -> dict[str, int]:
    """Graph inputs used as Gather indices into a constant table: the table's size on that axis."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    out: dict[str, int] = {}
    for nd in model.graph.node:
        if nd.op_type == "Gather" and len(nd.input) > 1 and nd.input[0] in tables:
            axis = next((a.i for a in nd.attribute if a.name == "axis"), 0)
            dims = tables[nd.input[0]]
            if -len(dims) <= axis < len(dims):  # an axis out of range is the Gather's own error, later
                size = dims[axis if axis >= 0 else axis + len(dims)]
                out[nd.input[1]] = min(out.get(nd.input[1], size), size)
    return out


MAX_EXAMPLE_ELEMENTS = 1 << 28  # 1 GiB of float32 per input


def example_inputs_for(model, source: str = "<model>", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the graph inputs' shapes and element types.

    Symbolic or unknown dims get small concrete sizes: 2 for the first dim (the batch), 8 for the
    others. Floating-point inputs are standard normal; integer inputs (token ids) are uniform in
    [0, 100) (below the table size where the input indexes a constant table), and inputs whose
    name contains "mask" are 0/1 with the first position 1; bool inputs are random, True for masks.
    """
    gen = torch.Generator().manual_seed(seed)
    initializers = {t.name for t in model.graph.initializer}
    vocab = _vocab_sizes(model)
    out = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise LrccError(f"{source}: input {inp.name!r} is not a tensor; lrcc takes tensor inputs only")
        dtype = _torch_dtype(tt.elem_type, f"{source}: input {inp.name!r}")
        if not tt.HasField("shape"):
            raise LrccError(f"{source}: input {inp.name!r} has no shape in the model; pass example_inputs to lrcc.compile")
        shape = [d.dim_value if d.HasField("dim_value") else (2 if i == 0 else 8) for i, d in enumerate(tt.shape.dim)]
        if math.prod(shape) > MAX_EXAMPLE_ELEMENTS:
            raise LrccError(f"{source}: input {inp.name!r} has shape {shape} ({math.prod(shape):,} elements); lrcc makes "
                            f"example inputs of at most {MAX_EXAMPLE_ELEMENTS:,} elements. Check the model's input "
                            "shape, or export it with symbolic dims")
        is_mask = "mask" in inp.name.lower()
        if dtype.is_floating_point:
            x = torch.randn(shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            x = torch.ones(shape, dtype=torch.bool) if is_mask else torch.rand(shape, generator=gen) < 0.5
        elif is_mask:
            x = torch.randint(0, 2, shape, generator=gen).to(dtype)
            if x.dim() >= 1 and x.numel():
                x[..., 0] = 1
        else:
            high = max(1, min(100, vocab.get(inp.name, 100)))
            x = torch.randint(0, high, shape, generator=gen).to(dtype)
        out.append(x)
    return tuple(out)


def onnx_to_module(path_or_model) -> tuple[OnnxModule, tuple[torch.Tensor, ...]]:
    """Load, check and import an ONNX model (a path or an onnx.ModelProto).

    Returns an OnnxModule computing the graph with torch operators (forward takes the graph inputs
    in order) and example inputs for it: random tensors of the inputs' shapes and element types,
    with symbolic or unknown dims set to 2 (the first dim, the batch) or 8 (any other dim); integer
    inputs hold token ids in [0, 100), or 0/1 for inputs named like "mask".
    Raises LrccError for a missing or malformed file and lists every unsupported operator.
    """
    try:
        import onnx
    except ImportError:
        raise LrccError("ONNX import needs the onnx package: pip install 'lrcc[onnx]'") from None
    model, source = _load(path_or_model)
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)  # the import rewrites the graph; the caller's model stays as it was
    model = _check(model, source)
    opset = onnx_opset(model, source)
    model = _expand_function_ops(model, opset)
    _unsupported(model, source)
    model = _infer_types(model, source)
    module = OnnxModule(model, source).eval()
    return module, example_inputs_for(model, source)
