"""int8 kernels for convolutional and elementwise ops (see program.py for their arithmetic).

conv2d, maxpool2d, mean, add, relu, requant and permute: each class has the numpy reference (the
exact integers the C computes), the C call, and ``build``, which makes the Op from float
parameters and the (scale, zero_point) pairs of its tensors. Every number the C needs (quantised
weights, multipliers, bounds) is decided here; the templates only loop.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ...errors import LrccError
from . import fixedpoint as fx
from .kernels import act_range, c_int, kernel
from .program import Op

INT32_MAX = 2**31 - 1


def _pair(v, what: str) -> tuple[int, int]:
    """(a, b) from an int or a one- or two-element sequence."""
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        if len(v) == 2:
            return int(v[0]), int(v[1])
        raise LrccError(f"C backend: {what} {v!r} must be an int or a pair")
    return int(v), int(v)


def _pads(pad, what: str) -> tuple[int, int, int, int]:
    """[top, left, bottom, right] from an int, a pair (h, w) or four ints."""
    if isinstance(pad, (list, tuple)) and len(pad) == 4:
        p = tuple(int(v) for v in pad)
    else:
        ph, pw = _pair(pad, what)
        p = (ph, pw, ph, pw)
    if min(p) < 0:
        raise LrccError(f"C backend: {what} {pad!r} must not be negative")
    return p  # type: ignore[return-value]


def _x_span(x_zp: int) -> int:
    """The largest |x - x_zp| over int8 x."""
    return max(127 - int(x_zp), int(x_zp) + 128)


def _out_size(size: int, k: int, pad_lo: int, pad_hi: int, stride: int) -> int:
    """floor((size + pads - k) / stride) + 1 (torch's output size without ceil mode)."""
    return (size + pad_lo + pad_hi - k) // stride + 1


# --------------------------------------------------------------------------------------------
@kernel("conv2d")
class Conv2d:
    template = "conv2d.c.j2"

    @staticmethod
    def out_shape(op: Op) -> tuple[int, int, int]:
        a = op.attrs
        step = 2 if int(a["pool"]) == 2 else 1
        return int(a["m"]), int(a["oh"]) // step, int(a["ow"]) // step

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        a = op.attrs
        c, h, w, m = int(a["c"]), int(a["h"]), int(a["w"]), int(a["m"])
        kh, kw = int(a["kh"]), int(a["kw"])
        sh, sw = (int(v) for v in a["stride"])
        top, left, bottom, right = (int(v) for v in a["pad"])
        groups, oh, ow = int(a["groups"]), int(a["oh"]), int(a["ow"])
        cg, mg = c // groups, m // groups
        x = xs[0].reshape(c, h, w).astype(np.int64) - int(a["x_zp"])
        xp = np.pad(x, ((0, 0), (top, bottom), (left, right)))  # zeros: padded inputs are x_zp
        wq = a["weight"].astype(np.int64).reshape(m, cg, kh, kw)
        acc = np.empty((m, oh, ow), dtype=np.int64)
        for g in range(groups):
            win = np.lib.stride_tricks.sliding_window_view(xp[g * cg:(g + 1) * cg], (kh, kw), axis=(1, 2))
            win = win[:, ::sh, ::sw][:, :oh, :ow]  # (cg, oh, ow, kh, kw)
            acc[g * mg:(g + 1) * mg] = np.tensordot(wq[g * mg:(g + 1) * mg], win, axes=([1, 2, 3], [0, 3, 4]))
        acc += a["bias"].astype(np.int64)[:, None, None]
        y = int(a["y_zp"]) + fx.requantize(acc, a["mult"][:, None, None], a["shift"][:, None, None])
        lo, hi = act_range(op)
        y = np.clip(y, lo, hi)
        if int(a["pool"]) == 2:
            ph, pw = oh // 2, ow // 2
            y = y[:, :2 * ph, :2 * pw].reshape(m, ph, 2, pw, 2).max(axis=(2, 4))
        return fx.sat8(y)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        a = op.attrs
        lo, hi = act_range(op)
        sh, sw = (int(v) for v in a["stride"])
        top, left = int(a["pad"][0]), int(a["pad"][1])
        return (f"lrcc_conv2d_s8({ins[0]}, {out}, {sym('weight')}, {sym('bias')}, {sym('mult')}, {sym('shift')}, "
                f"{int(a['c'])}, {int(a['h'])}, {int(a['w'])}, {int(a['m'])}, {int(a['kh'])}, {int(a['kw'])}, "
                f"{sh}, {sw}, {top}, {left}, {int(a['groups'])}, {int(a['oh'])}, {int(a['ow'])}, {int(a['pool'])}, "
                f"{c_int(a['x_zp'])}, {c_int(a['y_zp'])}, {lo}, {hi})")

    @staticmethod
    def build(name: str, weight: np.ndarray, bias: np.ndarray | None, x_shape: Sequence[int],
              x_q: tuple[float, int], y_q: tuple[float, int], stride=(1, 1), pad=(0, 0, 0, 0), groups: int = 1,
              relu: bool = False, pool: int = 0) -> Op:
        """A conv2d op from float weight (M, C/groups, KH, KW) and bias (M) over x of shape (C, H, W):
        symmetric per-output-channel int8 weights, int32 bias in units of x_scale * w_scale[o]
        (clipped so the int32 accumulator cannot overflow), per-channel requantisation; `pad` is an
        int, (h, w) or [top, left, bottom, right]; `pool` = 2 fuses a 2x2 stride-2 max pool."""
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim != 4:
            raise LrccError(f"C backend: conv {name}: weight of shape {w.shape}; expected (M, C/groups, KH, KW)")
        m, cg, kh, kw = (int(s) for s in w.shape)
        if len(x_shape) != 3:
            raise LrccError(f"C backend: conv {name}: input of shape {tuple(x_shape)}; expected (C, H, W) (batch 1)")
        c, h, wd = (int(s) for s in x_shape)
        groups = int(groups)
        if groups < 1 or c % groups or m % groups or c // groups != cg:
            raise LrccError(f"C backend: conv {name}: {c} input and {m} output channels do not split into {groups} "
                            f"groups of {cg} input channels (weight {w.shape})")
        sh, sw = _pair(stride, f"conv {name}: stride")
        if sh < 1 or sw < 1:
            raise LrccError(f"C backend: conv {name}: stride {stride!r} must be positive")
        top, left, bottom, right = _pads(pad, f"conv {name}: padding")
        oh, ow = _out_size(h, kh, top, bottom, sh), _out_size(wd, kw, left, right, sw)
        pool = int(pool)
        if pool not in (0, 2):
            raise LrccError(f"C backend: conv {name}: fused pool {pool}; only 0 (none) or 2 (2x2 stride 2) is supported")
        need = 2 if pool else 1
        if oh < need or ow < need:
            raise LrccError(f"C backend: conv {name}: output of {oh}x{ow} from input {h}x{wd}, kernel {kh}x{kw}, "
                            f"stride {sh}x{sw}, padding {[top, left, bottom, right]} is empty"
                            + (" after the 2x2 pool" if pool else ""))
        w_scale = np.abs(w).reshape(m, -1).max(axis=1) / 127.0
        w_scale = np.where(w_scale > 0, w_scale, 1.0)
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        (xs, xz), (ys, yz) = x_q, y_q
        # |sum of taps| <= taps * max|x - x_zp| * max|w[o]|; the bias gets what is left of int32
        taps_bound = cg * kh * kw * _x_span(xz) * np.abs(wq.astype(np.int64)).reshape(m, -1).max(axis=1)
        if (taps_bound > INT32_MAX).any():
            raise LrccError(f"C backend: conv {name}: {cg * kh * kw} taps per output can overflow the int32 "
                            "accumulator; split the channels into groups or use a smaller kernel")
        room = INT32_MAX - taps_bound
        b = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64).reshape(m)
        bias_q = np.clip(np.round(b / (xs * w_scale)), -room, room).astype(np.int32)
        mult, shift = fx.quantize_multipliers(xs * w_scale / ys, f"conv {name}: requantisation")
        attrs = {"weight": wq, "bias": bias_q, "mult": mult, "shift": shift, "c": c, "h": h, "w": wd, "m": m,
                 "kh": kh, "kw": kw, "stride": [sh, sw], "pad": [top, left, bottom, right], "groups": groups,
                 "oh": int(oh), "ow": int(ow), "pool": pool, "x_zp": int(xz), "y_zp": int(yz),
                 "act_min": int(yz) if relu else -128, "act_max": 127}
        return Op("conv2d", name, [], "", attrs)


# --------------------------------------------------------------------------------------------
def _pool_geometry(what: str, x_shape: Sequence[int], kernel, stride, pad) -> dict:
    """The attrs a pool's window walk needs (c, h, w, kernel, stride, pad, oh, ow) for x of shape
    (C, H, W): kernel and stride (default: the kernel) ints or pairs, pad an int, (h, w) or
    [top, left, bottom, right]; output sizes floor like torch."""
    if len(x_shape) != 3:
        raise LrccError(f"C backend: {what}: input of shape {tuple(x_shape)}; expected (C, H, W)")
    c, h, w = (int(s) for s in x_shape)
    kh, kw = _pair(kernel, f"{what}: kernel")
    sh, sw = _pair(kernel if stride is None or stride == [] else stride, f"{what}: stride")
    top, left, bottom, right = _pads(pad, f"{what}: padding")
    if min(kh, kw, sh, sw) < 1:
        raise LrccError(f"C backend: {what}: kernel {kernel!r} and stride {stride!r} must be positive")
    oh, ow = _out_size(h, kh, top, bottom, sh), _out_size(w, kw, left, right, sw)
    if oh < 1 or ow < 1:
        raise LrccError(f"C backend: {what}: empty output from input {h}x{w} and kernel {kh}x{kw}")
    return {"c": c, "h": h, "w": w, "kernel": [kh, kw], "stride": [sh, sw], "pad": [top, left, bottom, right],
            "oh": int(oh), "ow": int(ow)}


def _pool_windows(a: dict, x: np.ndarray, fill: int) -> np.ndarray:
    """x's pooling windows, (C, OH, OW, KH, KW), padding filled with `fill`."""
    c, h, w = int(a["c"]), int(a["h"]), int(a["w"])
    kh, kw = (int(v) for v in a["kernel"])
    sh, sw = (int(v) for v in a["stride"])
    top, left, bottom, right = (int(v) for v in a["pad"])
    xp = np.pad(x.reshape(c, h, w), ((0, 0), (top, bottom), (left, right)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
    return win[:, :int(a["oh"]), :int(a["ow"])]


@kernel("maxpool2d")
class MaxPool2d:
    template = "maxpool2d.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        return _pool_windows(op.attrs, xs[0], -128).max(axis=(3, 4)).astype(np.int8)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        a = op.attrs
        kh, kw = (int(v) for v in a["kernel"])
        sh, sw = (int(v) for v in a["stride"])
        return (f"lrcc_maxpool2d_s8({ins[0]}, {out}, {int(a['c'])}, {int(a['h'])}, {int(a['w'])}, {kh}, {kw}, "
                f"{sh}, {sw}, {int(a['pad'][0])}, {int(a['pad'][1])}, {int(a['oh'])}, {int(a['ow'])})")

    @staticmethod
    def build(name: str, x_shape: Sequence[int], x_q: tuple[float, int], kernel, stride=None,
              pad=(0, 0, 0, 0)) -> Op:
        """A max pool over x of shape (C, H, W): `kernel` and `stride` (default: the kernel) ints
        or pairs, `pad` an int, (h, w) or [top, left, bottom, right]; output sizes floor like torch."""
        attrs = _pool_geometry(f"max pool {name}", x_shape, kernel, stride, pad)
        zp = int(x_q[1])
        attrs.update(x_zp=zp, y_zp=zp)
        return Op("maxpool2d", name, [], "", attrs)


# --------------------------------------------------------------------------------------------
@kernel("mean")
class Mean:
    template = "mean.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        a = op.attrs
        outer, count, inner = int(a["outer"]), int(a["count"]), int(a["inner"])
        x = xs[0].reshape(outer, count, inner).astype(np.int64) - int(a["x_zp"])
        y = int(a["y_zp"]) + fx.requantize(x.sum(axis=1), int(a["mult"]), int(a["shift"]))
        lo, hi = act_range(op)
        return fx.sat8(y, lo, hi)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        a = op.attrs
        lo, hi = act_range(op)
        return (f"lrcc_mean_s8({ins[0]}, {out}, {int(a['outer'])}, {int(a['count'])}, {int(a['inner'])}, "
                f"{c_int(a['x_zp'])}, {c_int(a['y_zp'])}, {c_int(a['mult'])}, {c_int(a['shift'])}, {lo}, {hi})")

    @staticmethod
    def build(name: str, outer: int, count: int, inner: int, x_q: tuple[float, int], y_q: tuple[float, int]) -> Op:
        """The mean over the middle dim of x viewed as (outer, count, inner)."""
        outer, count, inner = int(outer), int(count), int(inner)
        if min(outer, count, inner) < 1:
            raise LrccError(f"C backend: mean {name}: empty view ({outer}, {count}, {inner})")
        (xs, xz), (ys, yz) = x_q, y_q
        if count * _x_span(xz) > INT32_MAX:
            raise LrccError(f"C backend: mean {name}: a sum of {count} values can overflow int32")
        mult, shift = fx.quantize_multiplier(xs / (ys * count), f"mean {name}: requantisation")
        attrs = {"outer": outer, "count": count, "inner": inner, "mult": int(mult), "shift": int(shift),
                 "x_zp": int(xz), "y_zp": int(yz)}
        return Op("mean", name, [], "", attrs)


# --------------------------------------------------------------------------------------------
@kernel("add")
class Add:
    template = "add.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        a = op.attrs
        n = int(a["n"])
        qa = xs[0].reshape(n).astype(np.int64) - int(a["a_zp"])
        qb = xs[1].reshape(n).astype(np.int64) - int(a["b_zp"])
        v = qa * int(a["mult_a"]) + qb * int(a["mult_b"])
        y = int(a["y_zp"]) + fx.rshift_round(v, int(a["shift"]))
        lo, hi = act_range(op)
        return fx.sat8(y, lo, hi).reshape(xs[0].shape)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        a = op.attrs
        lo, hi = act_range(op)
        return (f"lrcc_add_s8({ins[0]}, {ins[1]}, {out}, {int(a['n'])}, {c_int(a['a_zp'])}, {c_int(a['b_zp'])}, "
                f"{c_int(a['y_zp'])}, {c_int(a['mult_a'])}, {c_int(a['mult_b'])}, {c_int(a['shift'])}, {lo}, {hi})")

    @staticmethod
    def build(name: str, n: int, a_q: tuple[float, int], b_q: tuple[float, int], y_q: tuple[float, int],
              relu: bool = False) -> Op:
        """Element-wise a + b over n values (relu: fused ReLU), both multipliers over one shift."""
        (sa, za), (sb, zb), (sy, zy) = a_q, b_q, y_q
        mult, shift = fx.shared_shift([sa / sy, sb / sy], f"add {name}: requantisation")
        attrs = {"n": int(n), "a_zp": int(za), "b_zp": int(zb), "y_zp": int(zy), "mult_a": int(mult[0]),
                 "mult_b": int(mult[1]), "shift": int(shift), "act_min": int(zy) if relu else -128, "act_max": 127}
        return Op("add", name, [], "", attrs)


# --------------------------------------------------------------------------------------------
@kernel("relu")
class Relu:
    template = "relu.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        return np.maximum(xs[0], np.int8(op.attrs["x_zp"])).astype(np.int8)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        return f"lrcc_relu_s8({ins[0]}, {out}, {int(op.attrs['n'])}, {c_int(op.attrs['x_zp'])})"

    @staticmethod
    def build(name: str, n: int, x_q: tuple[float, int]) -> Op:
        """max(x, x_zp) over n values; the output keeps x's quantisation."""
        zp = int(x_q[1])
        return Op("relu", name, [], "", {"n": int(n), "x_zp": zp, "y_zp": zp})


# --------------------------------------------------------------------------------------------
@kernel("requant")
class Requant:
    template = "requant.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        a = op.attrs
        x = xs[0].astype(np.int64) - int(a["x_zp"])
        y = int(a["y_zp"]) + fx.requantize(x, int(a["mult"]), int(a["shift"]))
        lo, hi = act_range(op)
        return fx.sat8(y, lo, hi)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        a = op.attrs
        lo, hi = act_range(op)
        return (f"lrcc_requant_s8({ins[0]}, {out}, {int(a['n'])}, {c_int(a['x_zp'])}, {c_int(a['y_zp'])}, "
                f"{c_int(a['mult'])}, {c_int(a['shift'])}, {lo}, {hi})")

    @staticmethod
    def build(name: str, n: int, x_q: tuple[float, int], y_q: tuple[float, int], relu: bool = False) -> Op:
        """n values moved from x's quantisation to y's (relu: fused ReLU)."""
        (xs, xz), (ys, yz) = x_q, y_q
        mult, shift = fx.quantize_multiplier(xs / ys, f"requant {name}: requantisation")
        attrs = {"n": int(n), "x_zp": int(xz), "y_zp": int(yz), "mult": int(mult), "shift": int(shift),
                 "act_min": int(yz) if relu else -128, "act_max": 127}
        return Op("requant", name, [], "", attrs)


# --------------------------------------------------------------------------------------------
def permute_loops(in_shape: Sequence[int], perm: Sequence[int]) -> list[tuple[int, int]]:
    """The copy loops of x.permute(perm), outermost first, as (size, input stride): dims of size 1
    dropped, output-adjacent dims that are also input-adjacent merged into one loop."""
    shape = [int(s) for s in in_shape]
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    loops: list[tuple[int, int]] = []
    for p in perm:
        size, stride = shape[p], strides[p]
        if size == 1:
            continue
        if loops and loops[-1][1] == size * stride:
            loops[-1] = (loops[-1][0] * size, stride)
        else:
            loops.append((size, stride))
    return loops


@kernel("permute")
class Permute:
    template = "permute.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        shape = tuple(int(s) for s in op.attrs["in_shape"])
        perm = tuple(int(p) for p in op.attrs["perm"])
        return np.ascontiguousarray(xs[0].reshape(shape).transpose(perm))

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        loops = permute_loops(op.attrs["in_shape"], op.attrs["perm"])
        loops = [(1, 0)] * (4 - len(loops)) + loops
        dims = ", ".join(str(d) for d, _ in loops)
        strides = ", ".join(str(s) for _, s in loops)
        return f"lrcc_permute_s8({ins[0]}, {out}, {dims}, {strides})"

    @staticmethod
    def build(name: str, in_shape: Sequence[int], perm: Sequence[int]) -> Op:
        """A contiguous copy of x (shape `in_shape`) permuted by `perm`; quantisation unchanged."""
        shape = [int(s) for s in in_shape]
        perm = [int(p) for p in perm]
        if sorted(perm) != list(range(len(shape))):
            raise LrccError(f"C backend: permute {name}: {perm} is not a permutation of {len(shape)} dims")
        if len(permute_loops(shape, perm)) > 4:
            raise LrccError(f"C backend: permute {name}: permuting {shape} by {perm} needs more than 4 loops; "
                            "at most 4 dims (after merging adjacent ones) are supported")
        if math.prod(shape) > INT32_MAX:
            raise LrccError(f"C backend: permute {name}: {math.prod(shape)} values is too many")
        return Op("permute", name, [], "", {"in_shape": shape, "perm": perm})


# --------------------------------------------------------------------------------------------
@kernel("avgpool2d")
class AvgPool2d:
    """Average pool without padding: y = clamp(y_zp + requantize(sum of (x - x_zp) over the window,
    mult, shift)), real multiplier x_scale / (y_scale * kh * kw)."""

    template = "avgpool2d.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        a = op.attrs
        win = _pool_windows(a, xs[0].astype(np.int64) - int(a["x_zp"]), 0)
        y = int(a["y_zp"]) + fx.requantize(win.sum(axis=(3, 4)), int(a["mult"]), int(a["shift"]))
        return fx.sat8(y)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        a = op.attrs
        kh, kw = (int(v) for v in a["kernel"])
        sh, sw = (int(v) for v in a["stride"])
        return (f"lrcc_avgpool2d_s8({ins[0]}, {out}, {int(a['c'])}, {int(a['h'])}, {int(a['w'])}, {kh}, {kw}, "
                f"{sh}, {sw}, {int(a['oh'])}, {int(a['ow'])}, {c_int(a['x_zp'])}, {c_int(a['y_zp'])}, "
                f"{c_int(a['mult'])}, {c_int(a['shift'])})")

    @staticmethod
    def build(name: str, x_shape: Sequence[int], x_q: tuple[float, int], y_q: tuple[float, int], kernel,
              stride=None) -> Op:
        """An average pool over x of shape (C, H, W) without padding; output sizes floor like torch."""
        attrs = _pool_geometry(f"avg pool {name}", x_shape, kernel, stride, 0)
        kh, kw = attrs["kernel"]
        (xs, xz), (ys, yz) = x_q, y_q
        mult, shift = fx.quantize_multiplier(xs / (ys * kh * kw), f"avg pool {name}: requantisation")
        attrs.update(x_zp=int(xz), y_zp=int(yz), mult=int(mult), shift=int(shift))
        return Op("avgpool2d", name, [], "", attrs)
