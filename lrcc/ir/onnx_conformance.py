"""Conformance of lrcc's ONNX import against the ONNX backend node tests.

The onnx package ships its operator tests as generators (`onnx.backend.test.case.node`): each case
is a small model (one node, or a function op expanded into several) with input and expected output
arrays. For every case whose nodes are all in SUPPORTED_OPS, `run_conformance` imports the model
(`onnx_to_module`), sends it through lrcc's own front and back end (`import_module`: torch.export
into the IR; `lower_to_torch`) and compares the lowered module's outputs with the expected ones:
rtol = atol = 1e-4 for float32/float64 (1e-3, one ulp, for float16), exactly for integers and
booleans, same shapes and element types.

Graph inputs that a node reads as a shape argument (a Reshape's shape, a Slice's starts, the axes
of a reduction: STATIC_INPUTS) are frozen to the test's values first: in a model exported from a
framework these are constants or computed from shapes, and torch.export cannot trace a shape
taken from the input data.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import LrccError

RTOL = ATOL = 1e-4
RTOL_FP16 = ATOL_FP16 = 1e-3  # one float16 ulp near 1 is 9.8e-4

_CASES: list | None = None


def node_test_cases() -> list:
    """All the ONNX backend node test cases (collected once per process; takes a few seconds)."""
    global _CASES
    if _CASES is None:
        from onnx.backend.test.case.node import collect_testcases
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            _CASES = list(collect_testcases(None))
    return _CASES


def _snake(op: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op).lower()


# case-name stems that do not spell their operator
_ALIASES = {"greater_equal": "GreaterOrEqual", "less_equal": "LessOrEqual", "nllloss": "NegativeLogLikelihoodLoss",
            "sce": "SoftmaxCrossEntropyLoss", "mvn": "MeanVarianceNormalization",
            "rms_normalization": "RMSNormalization"}


def case_op(case) -> str:
    """The operator a case tests: its node's op type, or "<Op> (expanded)" for a function op
    written out as several nodes (the op guessed from the case name)."""
    nodes = case.model.graph.node
    if len(nodes) == 1:
        return nodes[0].op_type
    import onnx
    stem = case.name.removeprefix("test_").split("_expanded")[0]
    for prefix, op in _ALIASES.items():
        if stem == prefix or stem.startswith(prefix + "_"):
            return f"{op} (expanded)"
    best = ""
    for schema in onnx.defs.get_all_schemas():
        snake = _snake(schema.name)
        for form in (snake, schema.name.lower()):
            if (stem == form or stem.startswith(form + "_")) and len(schema.name) > len(best):
                best = schema.name
    return f"{best or stem} (expanded)"


@dataclass
class CaseResult:
    name: str
    op: str
    passed: bool
    reason: str = ""
    seconds: float = 0.0
    how: str = "export"  # "export": through torch.export and lowering; "eager": a model without inputs, run directly

    @property
    def element_type(self) -> bool:
        """Failed only because lrcc does not take one of the case's element types (bfloat16, uint16, float8, ...)."""
        return not self.passed and "element type" in self.reason


@dataclass
class Conformance:
    """Per-case results; `per_op` sums them by operator."""

    results: list[CaseResult] = field(default_factory=list)
    skipped: int = 0  # cases with an operator outside SUPPORTED_OPS

    @property
    def per_op(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for r in self.results:
            row = out.setdefault(r.op, {"cases": 0, "passed": 0, "failed": 0, "element_type": 0, "first_failure": ""})
            row["cases"] += 1
            if r.passed:
                row["passed"] += 1
                continue
            row["failed"] += 1
            row["element_type"] += r.element_type
        for op, row in out.items():  # the first failure for another reason than an element type, else the first
            fails = [r for r in self.results if r.op == op and not r.passed]
            pick = next((r for r in fails if not r.element_type), fails[0] if fails else None)
            row["first_failure"] = f"{pick.name}: {pick.reason}" if pick else ""
        return dict(sorted(out.items()))

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        return sum(not r.passed for r in self.results)


def supported(case) -> bool:
    """Whether every node of the case's model is an operator lrcc's ONNX import claims: one in
    SUPPORTED_OPS, or one that ONNX defines by a function body, which the import expands."""
    from .from_onnx import SUPPORTED_OPS, has_function_body, unsupported_nodes
    nodes = case.model.graph.node
    if all((n.domain or "") in ("", "ai.onnx") and n.op_type in SUPPORTED_OPS for n in nodes):
        return True
    opset = next((o.version for o in case.model.opset_import if (o.domain or "") in ("", "ai.onnx")), 1)
    if not all((n.domain or "") in ("", "ai.onnx") and (n.op_type in SUPPORTED_OPS or has_function_body(n.op_type, opset))
               for n in nodes):
        return False
    return not unsupported_nodes(case.model, expand=True)  # the function bodies use supported operators only


def _freeze_shape_inputs(model, inputs: list) -> tuple[object, list]:
    """Turn graph inputs used as shape arguments into initializers holding the test's values."""
    import onnx
    from onnx import numpy_helper

    from .from_onnx import STATIC_INPUTS
    static_names = {name for n in model.graph.node for k, name in enumerate(n.input)
                    if name and k in STATIC_INPUTS.get(n.op_type, ())}
    graph_inputs = [i.name for i in model.graph.input]
    if not static_names & set(graph_inputs):
        return model, inputs
    model = onnx.ModelProto.FromString(model.SerializeToString())
    keep_values, keep_inputs = [], []
    for vi, value in zip(list(model.graph.input), inputs):
        if vi.name in static_names and isinstance(value, np.ndarray):
            model.graph.initializer.append(numpy_helper.from_array(value, vi.name))
        else:
            keep_inputs.append(vi)
            keep_values.append(value)
    del model.graph.input[:]
    model.graph.input.extend(keep_inputs)
    return model, keep_values


def _first_line(e: BaseException, limit: int = 240) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line[:limit]


def _export_reason(e: BaseException) -> str:
    """The core of import_module's message: the last attempt's reason, without the advice."""
    line = _first_line(e, 1000)
    line = line.split(" failed: ")[-1] if " failed: " in line else line
    return line.split(". Check that forward runs")[0][:240]


def _as_array(v) -> np.ndarray | None:
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, np.generic):
        return np.asarray(v)
    from onnx import TensorProto, numpy_helper
    if isinstance(v, TensorProto):
        try:
            return numpy_helper.to_array(v)
        except Exception:
            return None
    return None


def _compare(got, want: np.ndarray, k: int) -> str:
    if not isinstance(got, torch.Tensor):
        return f"output {k} is a {type(got).__name__}, not a tensor"
    g = got.detach()
    if tuple(g.shape) != tuple(want.shape):
        return f"output {k} has shape {tuple(g.shape)}, expected {tuple(want.shape)}"
    want_dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                  np.dtype(np.float16): torch.float16, np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                  np.dtype(np.int16): torch.int16, np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8,
                  np.dtype(np.bool_): torch.bool}.get(want.dtype)
    if want_dtype is None:
        return f"output {k} has element type {want.dtype}, which lrcc does not support"
    if g.dtype != want_dtype:
        return f"output {k} has element type {g.dtype}, expected {want_dtype}"
    a = g.numpy()
    if want.dtype.kind == "f":
        tol = RTOL_FP16 if want.dtype == np.float16 else RTOL
        if np.allclose(a.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol, equal_nan=True):
            return ""
        bad = np.abs(a.astype(np.float64) - want.astype(np.float64))
        bad = np.where(np.isnan(bad), np.inf, bad)
        return f"output {k} differs: max abs error {bad.max():.3g}"
    if np.array_equal(a, want):
        return ""
    return f"output {k} differs in {(a != want).sum()} of {a.size} elements"


def run_case(case) -> CaseResult:
    """Import, export, lower and run one test case; compare with its expected outputs."""
    from ..codegen.torch_module import lower_to_torch
    from .from_onnx import onnx_to_module
    from .from_torch import import_module
    t0 = time.perf_counter()
    op = case_op(case)

    def fail(reason: str) -> CaseResult:
        return CaseResult(case.name, op, False, reason, time.perf_counter() - t0)

    inputs, expected = case.data_sets[0]
    arrays = [_as_array(v) for v in inputs]
    if any(a is None for a in arrays):
        return fail("an input is not a plain tensor (a sequence, an optional or an unsupported element type)")
    outputs = [_as_array(v) for v in expected]
    if any(a is None for a in outputs):
        return fail("an expected output is not a plain tensor (a sequence, an optional or an unsupported element type)")
    model, arrays = _freeze_shape_inputs(case.model, arrays)
    try:
        module, _ = onnx_to_module(model)
    except LrccError as e:
        return fail(f"import: {_first_line(e)}")
    except Exception as e:  # an lrcc bug: record it rather than stop the run
        return fail(f"import crashed: {type(e).__name__}: {_first_line(e)}")
    try:
        tensors = tuple(torch.from_numpy(np.array(a, copy=True)) for a in arrays)
    except TypeError as e:
        return fail(f"input element type not supported by torch: {_first_line(e)}")
    if not tensors:  # every input was a shape argument: nothing to export; check the imported module itself
        try:
            got = module()
        except Exception as e:
            return fail(f"the imported module failed: {type(e).__name__}: {_first_line(e)}")
        return _check_outputs(got, outputs, fail) or CaseResult(case.name, op, True, "", time.perf_counter() - t0, "eager")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph, _ = import_module(module, tensors)
            lowered = lower_to_torch(graph)
            got = lowered(*tensors)
    except LrccError as e:
        return fail(f"torch.export / IR: {_export_reason(e)}")
    except Exception as e:
        return fail(f"lowered module failed: {type(e).__name__}: {_first_line(e)}")
    return _check_outputs(got, outputs, fail) or CaseResult(case.name, op, True, "", time.perf_counter() - t0)


def _check_outputs(got, outputs: list, fail) -> CaseResult | None:
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    if len(got) != len(outputs):
        return fail(f"{len(got)} outputs, expected {len(outputs)}")
    for k, (g, want) in enumerate(zip(got, outputs)):
        why = _compare(g, want, k)
        if why:
            return fail(why)
    return None


def run_conformance(ops: Iterable[str] | None = None, names: Iterable[str] | None = None,
                    progress: Callable[[CaseResult], None] | None = None) -> Conformance:
    """Run every supported node test case (only those of `ops`, as case_op names them, or only
    those named in `names`, when given); returns per-case results and per-op counts."""
    import logging
    logging.getLogger("torch._export").setLevel(logging.ERROR)  # "0/1 specialized" notes on every tiny input
    logging.getLogger("torch.export").setLevel(logging.ERROR)
    wanted_ops = set(ops) if ops is not None else None
    wanted_names = set(names) if names is not None else None
    result = Conformance()
    for case in node_test_cases():
        if wanted_names is not None and case.name not in wanted_names:
            continue
        if wanted_ops is not None and case_op(case) not in wanted_ops:
            continue
        if not supported(case):
            result.skipped += 1
            continue
        r = run_case(case)
        result.results.append(r)
        if progress is not None:
            progress(r)
    return result
