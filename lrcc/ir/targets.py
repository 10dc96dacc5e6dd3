"""Names of opaque operators, to and from the callables that run them."""
from __future__ import annotations

import functools
import importlib
import operator

import torch

from ..errors import LrccError


def target_name(fn) -> str:
    """A stable, importable name for an FX call target ("aten.view.default", "operator.getitem")."""
    if isinstance(fn, torch._ops.OpOverload):
        ns = fn.namespace
        return f"{ns}.{fn._schema.name.split('::')[-1]}.{fn._overloadname}"
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return f"{fn._qualified_op_name.replace('::', '.')}"
    mod = getattr(fn, "__module__", None) or ""
    if mod in ("_operator", "operator"):
        return f"operator.{fn.__name__}"
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not qual:
        raise LrccError(f"IR import: cannot name the operator {fn!r}")
    return f"{mod}.{qual}"


@functools.lru_cache(maxsize=None)
def resolve_target(name: str):
    """The callable named by target_name()."""
    if name.startswith("operator."):
        return getattr(operator, name.split(".", 1)[1])
    parts = name.split(".")
    if parts[0] in ("aten", "prims", "quantized", "_quantized") or (len(parts) == 3 and not name.startswith("torch.")):
        ns, op, overload = parts[0], parts[1], parts[2] if len(parts) > 2 else "default"
        try:
            return getattr(getattr(getattr(torch.ops, ns), op), overload)
        except AttributeError:
            raise LrccError(f"IR: unknown operator {name!r}") from None
    for k in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        try:
            for attr in parts[k:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    raise LrccError(f"IR: cannot find the operator {name!r}")
