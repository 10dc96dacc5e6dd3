"""Budgets: what the user allows the compiled model to cost."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from .errors import BudgetError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2, "gb": 1024**3, "gib": 1024**3}


def parse_size(value: int | str, what: str) -> int:
    """An absolute byte count from an int or a string such as "320KB" or "1MB" (binary units)."""
    if isinstance(value, bool):
        raise BudgetError(f"budget {what}: expected a byte count such as 327680 or '320KB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise BudgetError(f"budget {what}: must be positive, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"budget {what}: expected a byte count such as 327680 or '320KB', got {value!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise BudgetError(f"budget {what}: cannot read {value!r} as a size; use e.g. '320KB', '1MB' or 327680")
    n = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if n <= 0 or not n.is_integer():
        raise BudgetError(f"budget {what}: {value!r} is not a positive whole number of bytes")
    return int(n)


def _fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"budget {what}: expected a fraction 0 < f <= 1, got {value!r}")
    f = float(value)
    if not math.isfinite(f) or not 0.0 < f <= 1.0:
        raise BudgetError(f"budget {what}: expected a fraction 0 < f <= 1, got {value!r}")
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
            e = self.max_error
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
                raise BudgetError(f"budget max_error: expected a positive number, got {e!r}")
            object.__setattr__(self, "max_error", float(e))

    @classmethod
    def coerce(cls, value: "Budget | float | str | dict | None") -> "Budget | None":
        """A Budget from a Budget, a bare float (params), a SPEC string or a dict; None stays None."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise BudgetError(f"budget: expected a Budget, a fraction or a string like 'params=0.5', got {value!r}")
        if isinstance(value, (int, float)):
            return cls(params=value)
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise BudgetError(f"budget: unknown field(s) {sorted(unknown, key=str)}; known: {[f.name for f in fields(cls)]}")
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
                raise BudgetError(f"budget: cannot read {part.strip()!r} in {spec!r}; expected key=value, e.g. 'params=0.5'")
            if key not in known:
                raise BudgetError(f"budget: unknown key {key!r} in {spec!r}; known keys: {', '.join(sorted(known))}")
            if key in values:
                raise BudgetError(f"budget: {key!r} given twice in {spec!r}")
            if key in ("sram", "flash"):
                values[key] = raw
            else:
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise BudgetError(f"budget {key}: {raw!r} is not a number (in {spec!r})") from None
        return cls(**values)

    def __str__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) is not None]
        return ",".join(parts) if parts else "(none)"
