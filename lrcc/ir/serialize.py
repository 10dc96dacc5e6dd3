"""The IR to and from JSON (tensors travel separately, in safetensors)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import sympy
import torch

from ..errors import LrccError
from .graph import Graph, Node, Ref

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


def _enc(a: Any) -> Any:
    if isinstance(a, Ref):
        return {"ref": a.name}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, dict):
        # pairs, not a JSON object: key order (kwargs) must survive json.dumps(sort_keys=True)
        return {"dict": [[k, _enc(v)] for k, v in a.items()]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, float) and not math.isfinite(a):
        return {"float": repr(a)}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise LrccError(f"IR serialize: cannot store an argument of type {type(a).__name__}: {a!r}")


def _dec(a: Any) -> Any:
    if isinstance(a, list):
        return [_dec(x) for x in a]
    if not isinstance(a, dict):
        return a
    (key, val), = a.items()
    if key == "ref":
        return Ref(val)
    if key == "tuple":
        return tuple(_dec(x) for x in val)
    if key == "dict":
        pairs = val.items() if isinstance(val, dict) else val  # older plans stored an object
        return {k: _dec(v) for k, v in pairs}
    if key == "dtype":
        return _DTYPES[val]
    if key == "device":
        return torch.device(val)
    if key == "layout":
        return getattr(torch, val)
    if key == "memory_format":
        return getattr(torch, val)
    if key == "float":
        return float(val)
    raise LrccError(f"IR deserialize: unknown argument tag {key!r}")


def _shape_enc(shape):
    return None if shape is None else [str(d) for d in shape]


def _shape_dec(shape, syms):
    return None if shape is None else tuple(sympy.sympify(d, locals=syms) for d in shape)


def graph_to_json(g: Graph) -> dict:
    """A JSON-able dict of the graph's structure; tensor data is not included."""
    nodes = []
    for n in g.nodes:
        attrs = {k: _enc(v) for k, v in n.attrs.items()}
        nodes.append({"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": attrs,
                      "shape": _shape_enc(n.shape), "dtype": None if n.dtype is None else str(n.dtype).removeprefix("torch.")})
    return {"version": 1, "nodes": nodes, "symbols": {k: list(v) for k, v in g.symbols.items()}, "meta": g.meta}


def graph_from_json(data: dict, tensors: dict[str, torch.Tensor]) -> Graph:
    """Rebuild a Graph from graph_to_json's output and its tensors."""
    if data.get("version") != 1:
        raise LrccError(f"IR deserialize: unsupported format version {data.get('version')!r}")
    syms = {k: sympy.Symbol(k, integer=True, positive=True) for k in data.get("symbols", {})}
    nodes = []
    for d in data["nodes"]:
        attrs = {k: _dec(v) for k, v in d["attrs"].items()}
        dtype = None if d["dtype"] is None else _DTYPES[d["dtype"]]
        nodes.append(Node(d["name"], d["op"], list(d["inputs"]), attrs, _shape_dec(d["shape"], syms), dtype))
    g = Graph(nodes, dict(tensors), {k: tuple(v) for k, v in data.get("symbols", {}).items()}, dict(data.get("meta", {})))
    return g


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with the header's metadata in sorted order: safetensors keeps it in
    a hash map whose order changes from run to run, and the file should not."""
    import struct

    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # the same keys reordered: the same length; pad as safetensors does
            f.seek(8)
            f.write(text.ljust(n, b" "))
            return
        rest = f.read()
    text = text.ljust(-(-len(text) // 8) * 8, b" ")  # the tensor data starts 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(text)) + text + rest)
