"""Fixed-point arithmetic shared by the int8 reference executor and the generated C.

Every function here has a C twin in ``templates/c/lrcc_ops.h.j2`` with the same name prefixed
``lrcc_``; both compute exactly the same integers (tests compare them bit for bit).

- A real multiplier r > 0 is stored as (mult, shift): r ~= mult / 2**shift, mult an int32 in
  [2**30, 2**31) where the range allows, shift in [1, 62].
- ``rshift_round(v, s)`` = floor((v + 2**(s-1)) / 2**s): round half up, on int64 values.
- ``round_div(a, b)`` (b > 0) = a / b rounded half away from zero.
- ``sat8(v)`` clamps to [-128, 127].
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import LrccError

MIN_SHIFT, MAX_SHIFT = 1, 62


def quantize_multiplier(real: float, what: str = "multiplier") -> tuple[int, int]:
    """(mult, shift) with real ~= mult / 2**shift; mult < 2**31, 1 <= shift <= 62."""
    if not math.isfinite(real) or real < 0:
        raise LrccError(f"fixed point: {what} {real!r} must be a finite non-negative number")
    if real == 0:
        return 0, MIN_SHIFT
    e = math.floor(math.log2(real))
    shift = 30 - e
    if shift > MAX_SHIFT:
        shift = MAX_SHIFT
    if shift < MIN_SHIFT:
        raise LrccError(f"fixed point: {what} {real:.4g} is too large to represent (over 2**30); "
                        "the calibrated ranges are degenerate")
    mult = int(round(real * 2.0 ** shift))
    if mult >= 2**31:  # rounding carried into the next power of two
        mult //= 2
        shift -= 1
        if shift < MIN_SHIFT:
            raise LrccError(f"fixed point: {what} {real:.4g} is too large to represent")
    return mult, shift


def quantize_multipliers(reals, what: str = "multiplier") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel quantize_multiplier: int32 arrays (mult, shift)."""
    pairs = [quantize_multiplier(float(r), f"{what}[{i}]") for i, r in enumerate(np.asarray(reals, dtype=np.float64).ravel())]
    mult = np.array([p[0] for p in pairs], dtype=np.int32)
    shift = np.array([p[1] for p in pairs], dtype=np.int32)
    return mult, shift


def shared_shift(reals, what: str = "multiplier") -> tuple[np.ndarray, int]:
    """Several multipliers over one shift (for sums such as add's a*ma + b*mb): the largest gets
    mult in [2**30, 2**31), the others share its shift."""
    reals = np.asarray(reals, dtype=np.float64)
    _, shift = quantize_multiplier(float(reals.max()), what)
    mult = np.array([int(round(float(r) * 2.0 ** shift)) for r in reals], dtype=np.int64)
    if (mult >= 2**31).any():
        shift -= 1
        mult = np.array([int(round(float(r) * 2.0 ** shift)) for r in reals], dtype=np.int64)
    return mult.astype(np.int32), int(shift)


def rshift_round(v, shift):
    """floor((v + 2**(shift-1)) / 2**shift) on int64 (arrays broadcast)."""
    v = np.asarray(v, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    return (v + (np.int64(1) << (shift - 1))) >> shift


def requantize(acc, mult, shift):
    """rshift_round(acc * mult, shift): acc an int32 range value, mult < 2**31 (int64 product)."""
    return rshift_round(np.asarray(acc, dtype=np.int64) * np.asarray(mult, dtype=np.int64), shift)


def round_div(a, b):
    """a / b rounded half away from zero, b > 0 (int64 arrays broadcast)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    half = b // 2
    pos = (a + half) // b
    neg = -((-a + half) // b)
    return np.where(a >= 0, pos, neg)


def sat8(v, lo: int = -128, hi: int = 127) -> np.ndarray:
    """Clamp to [lo, hi] (default the int8 range) and return int8."""
    return np.clip(np.asarray(v, dtype=np.int64), lo, hi).astype(np.int8)


def isqrt64(v) -> np.ndarray:
    """floor(sqrt(v)) of non-negative int64 values, exactly (C: lrcc_isqrt64)."""
    flat = np.asarray(v, dtype=np.int64).ravel()
    out = np.array([math.isqrt(int(x)) for x in flat], dtype=np.int64)
    return out.reshape(np.shape(v))


def quantize_real(x, scale: float, zero_point: int) -> np.ndarray:
    """Float values to int8: clamp(round_half_away(x / scale) + zero_point)."""
    q = np.asarray(x, dtype=np.float64) / scale
    q = np.where(q >= 0, np.floor(q + 0.5), -np.floor(-q + 0.5))
    return sat8(q + zero_point)


def dequantize(q, scale: float, zero_point: int) -> np.ndarray:
    """int8 values to float32: scale * (q - zero_point)."""
    return (scale * (np.asarray(q, dtype=np.float64) - zero_point)).astype(np.float32)


def choose_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero_point) covering [min(lo, 0), max(hi, 0)] (0 exactly representable)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise LrccError(f"quantisation: non-finite activation range [{lo}, {hi}] in the calibration data")
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zp = int(round(-128 - lo / scale))
    return scale, max(-128, min(127, zp))
