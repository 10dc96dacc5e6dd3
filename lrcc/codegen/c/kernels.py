"""The int8 kernels: for each op kind, its reference (numpy, exact integers) and its C.

A kernel is registered with ``@kernel(kind)`` on a class with:

- ``reference(op, xs)``: the output (int8 numpy array shaped like the op's output tensor) from the
  input arrays ``xs`` (int8, shaped like the input tensors), with exactly the integer arithmetic
  documented in program.py;
- ``template``: the file under templates/c/ (``<kind>.c.j2``) that defines the C function(s);
- ``call(op, ins, out, scratch, sym)``: the C statement that runs the op: ``ins``/``out`` are C
  pointer expressions, ``scratch`` a pointer expression into the arena (or "NULL"), ``sym(key)``
  the name of the const array holding ``op.attrs[key]`` (emitted by the model writer).

Array attrs (numpy) become const arrays in flash; scalar attrs are written into the call as
literals. The C functions return LRCC_OK; the model returns the first non-zero status.
A kernel may define ``flags(ops)``: the template's flags given every op of its kind in a program
(e.g. which variants to emit); without it the template renders with no flags.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import jinja2
import numpy as np

from ...errors import LrccError
from . import fixedpoint as fx
from .program import Op

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "c"
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)

KERNELS: dict[str, type] = {}


def kernel(kind: str):
    """Register a kernel class for op kind `kind`."""
    def deco(cls):
        KERNELS[kind] = cls
        return cls
    return deco


def get(kind: str):
    try:
        return KERNELS[kind]
    except KeyError:
        raise LrccError(f"C backend: no kernel for op kind {kind!r}; known: {', '.join(sorted(KERNELS))}") from None


def render(template: str, **flags) -> str:
    """templates/c/<template> rendered with flags (StrictUndefined)."""
    try:
        return _ENV.get_template(template).render(**flags)
    except jinja2.TemplateNotFound:
        raise LrccError(f"C backend: no template {template!r} in templates/c") from None


def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
    """Run one op with the reference arithmetic."""
    return get(op.kind).reference(op, xs)


def c_int(v) -> str:
    """A C integer literal for v (int64 values get an LL suffix; INT32_MIN spelled safely)."""
    v = int(v)
    if v == -2**31:
        return "(-2147483647 - 1)"
    if -2**31 < v < 2**31:
        return str(v)
    return f"{v}LL" if v != -2**63 else "(-9223372036854775807LL - 1)"


def act_range(op: Op) -> tuple[int, int]:
    return int(op.attrs.get("act_min", -128)), int(op.attrs.get("act_max", 127))


# --------------------------------------------------------------------------------------------
@kernel("linear")
class Linear:
    template = "linear.c.j2"

    @staticmethod
    def flags(ops: list[Op]) -> dict:
        bits = {int(op.attrs.get("bits", 8)) for op in ops if "zero" not in op.attrs}
        return {"bits8": 8 in bits, "bits4": 4 in bits, "bits4z": any("zero" in op.attrs for op in ops)}

    @staticmethod
    def weight(op: Op) -> np.ndarray:
        """The (m, n) int8 weight, unpacking 4-bit storage."""
        w = op.attrs["weight"]
        if "zero" in op.attrs:  # unsigned 4-bit codes minus a zero point per row
            n = int(op.attrs["n"])
            u = w.view(np.uint8).astype(np.int32)
            full = np.stack([u & 0xF, u >> 4], axis=-1).reshape(w.shape[0], -1)[:, :n]
            return full - op.attrs["zero"].astype(np.int32)[:, None]
        if int(op.attrs.get("bits", 8)) == 4:
            n = int(op.attrs["n"])
            lo = ((w.astype(np.int32) & 0xF) ^ 8) - 8
            hi = ((w.astype(np.int32) >> 4 & 0xF) ^ 8) - 8
            full = np.stack([lo, hi], axis=-1).reshape(w.shape[0], -1)[:, :n]
            return full.astype(np.int8)
        return w

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        x = xs[0]
        w = Linear.weight(op).astype(np.int64)
        n = w.shape[1]
        rows = x.reshape(-1, n).astype(np.int64) - int(op.attrs["x_zp"])
        acc = rows @ w.T + op.attrs["bias"].astype(np.int64)
        y = int(op.attrs["y_zp"]) + fx.requantize(acc, op.attrs["mult"], op.attrs["shift"])
        lo, hi = act_range(op)
        return fx.sat8(y, lo, hi).reshape(x.shape[:-1] + (w.shape[0],))

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        m = int(op.attrs["m"])
        n = int(op.attrs["n"])
        rows = int(op.attrs["rows"])
        lo, hi = act_range(op)
        if "zero" in op.attrs:
            return (f"lrcc_linear_u4z({ins[0]}, {out}, {sym('weight')}, {sym('zero')}, {sym('bias')}, {sym('mult')}, "
                    f"{sym('shift')}, {rows}, {n}, {m}, {c_int(op.attrs['x_zp'])}, {c_int(op.attrs['y_zp'])}, {lo}, {hi})")
        fn = "lrcc_linear_s4" if int(op.attrs.get("bits", 8)) == 4 else "lrcc_linear_s8"
        return (f"{fn}({ins[0]}, {out}, {sym('weight')}, {sym('bias')}, {sym('mult')}, {sym('shift')}, "
                f"{rows}, {n}, {m}, {c_int(op.attrs['x_zp'])}, {c_int(op.attrs['y_zp'])}, {lo}, {hi})")

    @staticmethod
    def build(name: str, weight: np.ndarray, bias: np.ndarray | None, rows: int, x_q: tuple[float, int],
              y_q: tuple[float, int], relu: bool = False, bits: int = 8) -> Op:
        """A linear op from float weight (m, n) and bias (m): symmetric per-output-channel int8
        (or int4) weights, int32 bias in units of x_scale * w_scale[o], per-channel requantisation."""
        w = np.asarray(weight, dtype=np.float64)
        m, n = w.shape
        qmax = 7 if bits == 4 else 127
        w_scale = np.abs(w).max(axis=1) / qmax
        w_scale = np.where(w_scale > 0, w_scale, 1.0)
        wq = np.clip(np.round(w / w_scale[:, None]), -qmax - (1 if bits == 4 else 0), qmax).astype(np.int8)
        (xs, xz), (ys, yz) = x_q, y_q
        b = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
        # the int32 accumulator holds bias + n products of at most 255 * max|w|: clip the bias so no
        # input can overflow it (only absurd biases are affected)
        headroom = 2**31 - 1 - n * 255 * np.abs(wq.astype(np.int64)).max(axis=1)
        if (headroom <= 0).any():
            raise LrccError(f"layer {name}: {n} inputs could overflow the int32 accumulator")
        bias_q = np.clip(np.round(b / (xs * w_scale)), -headroom, headroom).astype(np.int32)
        mult, shift = fx.quantize_multipliers(xs * w_scale / ys, f"layer {name}: requantisation")
        stored = wq
        if bits == 4:
            pad = np.zeros((m, n + (n & 1)), dtype=np.int32)
            pad[:, :n] = wq
            stored = ((pad[:, 0::2] & 15) | ((pad[:, 1::2] & 15) << 4)).astype(np.uint8).view(np.int8)
        attrs = {"weight": stored, "bias": bias_q, "mult": mult, "shift": shift, "rows": int(rows), "n": int(n),
                 "m": int(m), "x_zp": int(xz), "y_zp": int(yz), "act_min": int(yz) if relu else -128, "act_max": 127,
                 "bits": int(bits)}
        return Op("linear", name, [], "", attrs)

    @staticmethod
    def build_u4z(name: str, codes: np.ndarray, zero: np.ndarray, scale: np.ndarray, bias: np.ndarray | None,
                  rows: int, x_q: tuple[float, int], y_q: tuple[float, int], relu: bool = False) -> Op:
        """A linear op from 4-bit asymmetric per-channel codes (m, n) in 0..15 with a zero point and
        scale per output row (W = (codes - zero) * scale, as quantize_linear stores it with group 0):
        the C uses the codes and zero points as they are, so it computes exactly the planned weight."""
        q = np.asarray(codes, dtype=np.int32)
        m, n = q.shape
        if q.min() < 0 or q.max() > 15:
            raise LrccError(f"layer {name}: 4-bit codes out of range [0, 15]")
        z = np.asarray(zero, dtype=np.float64)
        if not np.array_equal(z, np.round(z)) or z.min() < 0 or z.max() > 15:
            raise LrccError(f"layer {name}: zero points must be whole numbers in [0, 15]")
        s = np.asarray(scale, dtype=np.float64)
        (xs, xz), (ys, yz) = x_q, y_q
        b = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
        headroom = 2**31 - 1 - n * 255 * 15 * 2
        bias_q = np.clip(np.round(b / (xs * s)), -headroom, headroom).astype(np.int32)
        mult, shift = fx.quantize_multipliers(xs * s / ys, f"layer {name}: requantisation")
        pad = np.zeros((m, n + (n & 1)), dtype=np.int32)
        pad[:, :n] = q
        packed = (pad[:, 0::2] | (pad[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
        attrs = {"weight": packed, "zero": z.astype(np.int32), "bias": bias_q, "mult": mult, "shift": shift,
                 "rows": int(rows), "n": int(n), "m": int(m), "x_zp": int(xz), "y_zp": int(yz),
                 "act_min": int(yz) if relu else -128, "act_max": 127, "bits": 4}
        return Op("linear", name, [], "", attrs)


# the other kernels register themselves on import
from . import kernels_dense, kernels_transformer  # noqa: E402,F401
