"""Budgets: what the user allows the compiled model to cost."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields
from fractions import Fraction

from .errors import BudgetError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2, "gb": 1024**3, "gib": 1024**3}


def _short(value) -> str:
    """repr(value), cut short: a budget message names the value, not ten thousand digits of it."""
    if isinstance(value, int) and value.bit_length() > 256:  # repr() of a huge int is slow, or refused
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:  # e.g. a Fraction beyond Python's int-to-string digit limit
        return f"a {type(value).__name__} too large to print"
    return text if len(text) <= 60 else text[:40] + f"...({len(text)} characters)"


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool is no bool subclass


_MAX_BYTES = 1 << 64  # 16 EiB: anything larger is a typo, not a memory


def parse_size(value: int | str, what: str) -> int:
    """An absolute byte count from an int or a string such as "320KB" or "1MB" (binary units)."""
    n = _size(value, what)
    if n > _MAX_BYTES:
        raise BudgetError(f"budget {what}: {_short(value)} is more than 2**64 bytes; use e.g. '320KB', '1MB' or 327680")
    return n


def _size(value, what: str) -> int:
    if _is_bool(value):
        raise BudgetError(f"budget {what}: expected a byte count such as 327680 or '320KB', got {value!r}")
    if isinstance(value, numbers.Integral):
        if value <= 0:
            raise BudgetError(f"budget {what}: must be positive, got {_short(value)}")
        return int(value)
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"budget {what}: expected a byte count such as 327680 or '320KB', got {_short(value)}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise BudgetError(f"budget {what}: cannot read {_short(value)} as a size; use e.g. '320KB', '1MB' or 327680")
    try:
        n = Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]  # exact: no float rounding of large counts
    except ValueError:  # more digits than Python converts to an int
        raise BudgetError(f"budget {what}: {_short(value)} has too many digits for a byte count") from None
    if n <= 0 or n.denominator != 1:
        raise BudgetError(f"budget {what}: {_short(value)} is not a positive whole number of bytes")
    return int(n)


def _real(value, what: str, expected: str) -> float:
    """value as a finite float, for any real number type (int, float, numpy scalars, Fraction)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise BudgetError(f"budget {what}: expected {expected}, got {_short(value)}")
    try:
        f = float(value)
    except (OverflowError, ValueError):  # an int or Fraction beyond float's range
        raise BudgetError(f"budget {what}: expected {expected}, got {_short(value)}") from None
    if not math.isfinite(f):
        raise BudgetError(f"budget {what}: expected {expected}, got {_short(value)}")
    return f


def _fraction(value, what: str) -> float:
    f = _real(value, what, "a fraction 0 < f <= 1")
    if not 0.0 < f <= 1.0:
        raise BudgetError(f"budget {what}: expected a fraction 0 < f <= 1, got {_short(value)}")
    return f


@dataclass(frozen=True)
class Budget:
    """What the compiled model may cost; every field is optional.

    params, bytes, latency: fractions of the original (0 < f <= 1) over the sites lrcc may
    rewrite (latency: of the whole model's estimated latency on the target). sram, flash:
    absolute bytes. max_error: largest accepted output error on held-out calibration inputs.
    """

    params: float | None = None
    bytes: float | None = None
    latency: float | None = None
    sram: int | str | None = None
    flash: int | str | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        for name in ("params", "bytes", "latency"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, _fraction(v, name))
        for name in ("sram", "flash"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, parse_size(v, name))
        if self.max_error is not None:
            e = _real(self.max_error, "max_error", "a positive number")
            if e <= 0:
                raise BudgetError(f"budget max_error: expected a positive number, got {_short(self.max_error)}")
            object.__setattr__(self, "max_error", e)

    @classmethod
    def coerce(cls, value: "Budget | float | str | dict | None") -> "Budget | None":
        """A Budget from a Budget, a bare float (params), a SPEC string or a dict; None stays None."""
        if value is None or isinstance(value, Budget):
            return value
        if _is_bool(value):
            raise BudgetError(f"budget: expected a Budget, a fraction or a string like 'params=0.5', got {value!r}")
        if isinstance(value, numbers.Real):
            return cls(params=value)
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise BudgetError(f"budget: unknown field(s) {_short(sorted(unknown, key=str))}; "
                                  f"known: {[f.name for f in fields(cls)]}")
            return cls(**value)
        raise BudgetError(f"budget: expected a Budget, a fraction or a string like 'params=0.5', got {type(value).__name__}")

    @classmethod
    def parse(cls, spec: str) -> "Budget":
        """Read a SPEC such as 'params=0.5', 'bytes=0.125,max_error=0.02' or 'sram=320KB,flash=1MB'."""
        if not isinstance(spec, str) or not spec.strip():
            raise BudgetError("budget: empty budget string; use e.g. 'params=0.5'")
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {}
        for part in spec.split(","):
            key, sep, raw = part.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not key or not raw:
                raise BudgetError(f"budget: cannot read {_short(part.strip())} in {_short(spec)}; expected key=value, "
                                  "e.g. 'params=0.5'")
            if key not in known:
                raise BudgetError(f"budget: unknown key {_short(key)} in {_short(spec)}; known keys: {', '.join(sorted(known))}")
            if key in values:
                raise BudgetError(f"budget: {key!r} given twice in {_short(spec)}")
            if key in ("sram", "flash"):
                values[key] = raw
            else:
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise BudgetError(f"budget {key}: {_short(raw)} is not a number (in {_short(spec)})") from None
        return cls(**values)

    def __str__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) is not None]
        return ",".join(parts) if parts else "(none)"
