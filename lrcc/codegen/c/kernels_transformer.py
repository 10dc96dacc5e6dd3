"""int8 kernels for transformer ops: layernorm, softmax, lookup tables, attention (see program.py)."""
from __future__ import annotations
