"""int8 kernels for convolutional and elementwise ops (see program.py for their arithmetic)."""
from __future__ import annotations
