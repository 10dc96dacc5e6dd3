"""int8 kernels for transformer ops: layernorm, softmax, lookup tables, attention (see program.py).

Each kernel's ``reference`` computes exactly the integers its C template computes; ``build`` makes
the op from float parameters and (scale, zero_point) pairs, deciding every table and multiplier
here so the C only does integer arithmetic. layernorm, softmax and lut may run in place (y == x):
their C writes y[i] only after everything that needs x[i] has been read.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ...errors import LrccError
from . import fixedpoint as fx
from .kernels import c_int, kernel
from .program import Op

QPair = tuple[float, int]

INT32_MAX = 2**31 - 1
INT64_LIMIT = 2**62  # keep every int64 intermediate below this


# --------------------------------------------------------------------------------------------
@kernel("lut")
class Lut:
    """y = table[x + 128]: any elementwise function of one int8 tensor (GELU, ...)."""

    template = "lut.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        x = np.asarray(xs[0])
        return op.attrs["table"][x.astype(np.int64) + 128].astype(np.int8)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        return f"lrcc_lut_s8({ins[0]}, {out}, {sym('table')}, {c_int(op.attrs['n'])})"

    @staticmethod
    def build(name: str, n: int, fn: Callable[[np.ndarray], np.ndarray], x_q: QPair, y_q: QPair) -> Op:
        """A lut op over n values tabulating the float function `fn` (numpy float64 array in, array
        out) at the 256 int8 inputs: table[q + 128] = quantize(fn(dequantize(q, x_q)), y_q), exactly
        rounded."""
        xs_, xz = x_q
        ys_, yz = y_q
        grid = fx.dequantize(np.arange(-128, 128), xs_, xz).astype(np.float64)
        vals = np.asarray(fn(grid), dtype=np.float64).reshape(-1)
        if vals.shape != (256,) or not np.isfinite(vals).all():
            raise LrccError(f"C backend: lut {name}: the function must return 256 finite values for 256 inputs")
        table = fx.quantize_real(vals, ys_, yz)
        return Op("lut", name, [], "", {"table": table, "n": int(n), "x_zp": int(xz), "y_zp": int(yz)})


# --------------------------------------------------------------------------------------------
@kernel("softmax")
class Softmax:
    """Softmax over the last dim; output scale 1/256, zero point -128."""

    template = "softmax.c.j2"
    Y_Q: QPair = (1.0 / 256.0, -128)

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        x = np.asarray(xs[0])
        n = int(op.attrs["n"])
        rows = x.reshape(-1, n).astype(np.int64)
        e = op.attrs["exp_table"].astype(np.int64)[rows.max(axis=1, keepdims=True) - rows]
        total = e.sum(axis=1, keepdims=True)
        y = np.minimum(127, fx.round_div(e * 256, total) - 128)
        return fx.sat8(y).reshape(x.shape)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        return (f"lrcc_softmax_s8({ins[0]}, {out}, {sym('exp_table')}, {c_int(op.attrs['rows'])}, "
                f"{c_int(op.attrs['n'])})")

    @staticmethod
    def build(name: str, rows: int, n: int, x_q: QPair) -> Op:
        """A softmax op over rows of n values with input quantisation x_q; the output's
        quantisation is fixed, Softmax.Y_Q = (1/256, -128)."""
        xs_, xz = x_q
        if n < 1 or rows < 0:
            raise LrccError(f"C backend: softmax {name}: bad shape rows={rows}, n={n}")
        if n > 2**20:
            raise LrccError(f"C backend: softmax {name}: rows of {n} values are too long (at most 2**20)")
        d = np.arange(256, dtype=np.float64)
        table = np.round(65536.0 * np.exp(-d * float(xs_))).astype(np.int32)
        attrs = {"exp_table": table, "rows": int(rows), "n": int(n), "x_zp": int(xz), "y_zp": Softmax.Y_Q[1]}
        return Op("softmax", name, [], "", attrs)


# --------------------------------------------------------------------------------------------
LN_OUT_SHIFT = 16      # t and beta_q carry 16 fractional bits of the output step
LN_MAX_SQRT_SHIFT = 12  # den carries up to 12 fractional bits


@kernel("layernorm")
class LayerNorm:
    """Layer norm over the last dim (rows, n), with per-column gamma and beta."""

    template = "layernorm.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        x = np.asarray(xs[0])
        a = op.attrs
        n = int(a["n"])
        k = int(a["sqrt_shift"])
        d = x.reshape(-1, n).astype(np.int64) - int(a["x_zp"])
        s = d.sum(axis=1, keepdims=True)
        ss = (d * d).sum(axis=1, keepdims=True)
        den = fx.isqrt64(((n * ss - s * s) << (2 * k)) + int(a["eps_q"]))
        t = fx.round_div((n * d - s) * a["gamma_q"].astype(np.int64), den)
        y = int(a["y_zp"]) + fx.rshift_round(t + a["beta_q"].astype(np.int64), LN_OUT_SHIFT)
        return fx.sat8(y).reshape(x.shape)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        a = op.attrs
        return (f"lrcc_layernorm_s8({ins[0]}, {out}, {sym('gamma_q')}, {sym('beta_q')}, {c_int(a['rows'])}, "
                f"{c_int(a['n'])}, {c_int(a['x_zp'])}, {c_int(a['y_zp'])}, {c_int(a['eps_q'])}, "
                f"{c_int(a['sqrt_shift'])})")

    @staticmethod
    def build(name: str, rows: int, n: int, gamma, beta, eps: float, x_q: QPair, y_q: QPair) -> Op:
        """A layernorm op over rows of n values: y = (x - mean) / sqrt(var + eps) * gamma + beta
        (biased variance, as torch), gamma/beta float arrays of n (None: ones/zeros)."""
        xs_, xz = x_q
        ys_, yz = y_q
        if n < 1 or rows < 0:
            raise LrccError(f"C backend: layernorm {name}: bad shape rows={rows}, n={n}")
        if n > 2**20:
            raise LrccError(f"C backend: layernorm {name}: rows of {n} values are too long (at most 2**20)")
        g = np.ones(n) if gamma is None else np.asarray(gamma, dtype=np.float64).reshape(-1)
        b = np.zeros(n) if beta is None else np.asarray(beta, dtype=np.float64).reshape(-1)
        if g.shape != (n,) or b.shape != (n,):
            raise LrccError(f"C backend: layernorm {name}: gamma/beta have {g.size}/{b.size} values, expected {n}")
        if not (np.isfinite(g).all() and np.isfinite(b).all() and math.isfinite(eps) and eps >= 0):
            raise LrccError(f"C backend: layernorm {name}: gamma, beta and eps must be finite (eps >= 0)")
        # n*ss - s*s = n^2 * var(d) <= n^2 * 255^2 / 4 (Popoviciu), so var_bound << 2k plus eps_q
        # must stay below 2**62; gamma_q = gamma / ys * 2^(16+k) must fit int32
        var_bound = n * n * 16257
        g_ratio = float(np.abs(g).max()) / ys_
        k = LN_MAX_SQRT_SHIFT
        if g_ratio > 0:
            k = min(k, max(0, math.floor(math.log2(INT32_MAX / (g_ratio * 2.0**LN_OUT_SHIFT)))))
        eps_real = float(eps) * n * n / (xs_ * xs_)

        while k > 0 and (var_bound << (2 * k)) + eps_real * 4.0**k >= INT64_LIMIT:
            k -= 1
        # only a degenerate input scale (eps / x_scale^2 ~ 2^61 / n^2) clips eps_q; the output is then beta
        eps_q = max(1, min(INT64_LIMIT // 2, round(eps_real * 4.0**k)))
        gamma_q = np.clip(np.round(g / ys_ * 2.0**(LN_OUT_SHIFT + k)), -INT32_MAX, INT32_MAX).astype(np.int32)
        beta_q = np.clip(np.round(b / ys_ * 2.0**LN_OUT_SHIFT), -INT32_MAX, INT32_MAX).astype(np.int32)
        attrs = {"gamma_q": gamma_q, "beta_q": beta_q, "rows": int(rows), "n": int(n), "x_zp": int(xz),
                 "y_zp": int(yz), "eps_q": int(eps_q), "sqrt_shift": int(k)}
        return Op("layernorm", name, [], "", attrs)


# --------------------------------------------------------------------------------------------
ATT_DIST_FRAC = 8      # dist counts 1/256 nats
ATT_DIST_MAX = 4095    # 16 nats: 2^16 exp(-16) < 0.01 rounds to 0
ATT_LO_BITS = 6        # e = exp_hi[dist >> 6] * exp_lo[dist & 63] >> 16


@kernel("attention")
class Attention:
    """Fused softmax(q k^T * scale) v, head by head, one query row at a time."""

    template = "attention.c.j2"

    @staticmethod
    def reference(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        a = op.attrs
        heads, nq, nk, d = (int(a[key]) for key in ("heads", "nq", "nk", "d"))
        q = np.asarray(xs[0]).reshape(nq, heads, d).astype(np.int64) - int(a["q_zp"])
        k = np.asarray(xs[1]).reshape(nk, heads, d).astype(np.int64) - int(a["k_zp"])
        v = np.asarray(xs[2]).reshape(nk, heads, d).astype(np.int64) - int(a["v_zp"])
        visible = np.ones((nq, nk), dtype=bool)
        if int(a.get("causal", 0)):
            visible = np.arange(nk)[None, :] <= np.arange(nq)[:, None]
        exp_hi = a["exp_hi"].astype(np.int64)
        exp_lo = a["exp_lo"].astype(np.int64)
        y = np.zeros((nq, heads, d), dtype=np.int64)
        for h in range(heads):
            raw = q[:, h] @ k[:, h].T  # (nq, nk)
            best = np.where(visible, raw, np.iinfo(np.int64).min).max(axis=1, keepdims=True)
            dist = np.minimum(ATT_DIST_MAX, fx.requantize(np.where(visible, best - raw, 0), a["score_mult"],
                                                          a["score_shift"]))
            e = fx.rshift_round(exp_hi[dist >> ATT_LO_BITS] * exp_lo[dist & ((1 << ATT_LO_BITS) - 1)], 16)
            e = np.where(visible, e, 0)
            total = e.sum(axis=1, keepdims=True)
            o = fx.round_div((e @ v[:, h]) * 256, total)
            y[:, h] = int(a["y_zp"]) + fx.requantize(o, a["out_mult"], a["out_shift"])
        return fx.sat8(y).reshape(nq, heads * d)

    @staticmethod
    def call(op: Op, ins: list[str], out: str, scratch: str, sym: Callable[[str], str]) -> str:
        a = op.attrs
        scalars = ", ".join(c_int(a[key]) for key in ("heads", "nq", "nk", "d", "q_zp", "k_zp", "v_zp", "y_zp",
                                                       "score_mult", "score_shift", "out_mult", "out_shift",
                                                       "causal"))
        return (f"lrcc_attention_s8({ins[0]}, {ins[1]}, {ins[2]}, {out}, {scratch}, {sym('exp_hi')}, "
                f"{sym('exp_lo')}, {scalars})")

    @staticmethod
    def build(name: str, heads: int, nq: int, nk: int, d: int, q_q: QPair, k_q: QPair, v_q: QPair, y_q: QPair,
              scale: float | None = None, causal: bool = False) -> Op:
        """An attention op: y = softmax(q k^T * scale [causal mask]) v per head, q (nq, heads*d),
        k and v (nk, heads*d); scale defaults to 1/sqrt(d) (torch's SDPA). Needs 4*nk bytes of
        int32-aligned scratch (op.scratch_bytes)."""
        if min(heads, nq, nk, d) < 1:
            raise LrccError(f"C backend: attention {name}: bad shape heads={heads}, nq={nq}, nk={nk}, d={d}")
        if d > 16384 or nk > 2**24:
            raise LrccError(f"C backend: attention {name}: head dim {d} / {nk} keys overflow the int32 scores "
                            "(at most 16384 / 2**24)")
        sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        if not (math.isfinite(sm_scale) and sm_scale >= 0):
            raise LrccError(f"C backend: attention {name}: softmax scale {sm_scale} must be finite and >= 0")
        (qs, qz), (ks, kz), (vs, vz), (ys_, yz) = q_q, k_q, v_q, y_q
        score_mult, score_shift = fx.quantize_multiplier(qs * ks * sm_scale * 2.0**ATT_DIST_FRAC,
                                                         f"attention {name}: score scale")
        out_mult, out_shift = fx.quantize_multiplier(vs / (256.0 * ys_), f"attention {name}: output scale")
        lo = 1 << ATT_LO_BITS
        hi = (ATT_DIST_MAX >> ATT_LO_BITS) + 1
        step = 2.0**-ATT_DIST_FRAC
        exp_hi = np.round(65536.0 * np.exp(-np.arange(hi) * lo * step)).astype(np.int32)
        exp_lo = np.round(65536.0 * np.exp(-np.arange(lo) * step)).astype(np.int32)
        attrs = {"exp_hi": exp_hi, "exp_lo": exp_lo, "heads": int(heads), "nq": int(nq), "nk": int(nk), "d": int(d),
                 "q_zp": int(qz), "k_zp": int(kz), "v_zp": int(vz), "y_zp": int(yz), "score_mult": int(score_mult),
                 "score_shift": int(score_shift), "out_mult": int(out_mult), "out_shift": int(out_shift),
                 "causal": int(bool(causal))}
        return Op("attention", name, [], "", attrs, scratch_bytes=4 * int(nk))
