"""torch modules for GPU targets: each compressed site calls its Triton kernel.

They hold the kernel layouts as buffers (made once, here, from the stored parts), so
``.to("cuda")`` / ``.half()`` move and cast them like any module; see kernels.py for where the
kernels run (GPU, interpreter, or the torch reference with one warning).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import LrccError
from . import kernels
from .layout import pack_for_kernel


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if t is None or t.dtype == like.dtype:
        return t
    return t.to(like.dtype)


class TritonLowRankLinear(nn.Module):
    """y = (x V^T) U^T + b through lowrank_linear.py.j2 (or two matmul.py.j2 passes for large ranks)."""

    def __init__(self, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, site: str) -> None:
        super().__init__()
        self.register_buffer("v", v.contiguous())
        self.register_buffer("u", u.contiguous())
        self.register_buffer("bias", bias)
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.lowrank_linear(x, _cast(self.v, x), _cast(self.u, x), self.bias, where=self.site)

    def kernel_calls(self) -> list[dict[str, Any]]:
        r, k = self.v.shape
        return [{"template": "lowrank_linear", "flags": {}, "shape": {"N": self.u.shape[0], "K": k, "R": r}}]


class TritonQuantLinear(nn.Module):
    """y = x W_q^T (+ (x V^T) U^T) + b through quant_matmul.py.j2, W_q dequantised in registers."""

    _TENSORS = ("codes", "scale", "zero", "in_scale", "bias")

    def __init__(self, parts: dict[str, torch.Tensor], attrs: dict[str, Any], site: str) -> None:
        super().__init__()
        from ...rewrites.quantize import unpack
        bits, cols, n_in = attrs["bits"], attrs["cols"], attrs["n"]
        codes = unpack(parts["codes"], bits, cols)
        packed = pack_for_kernel(codes, parts["scale"], parts["zero"], bits, attrs.get("group", 0), n_in,
                                 parts.get("in_scale"), parts.get("bias"), where=site)
        for key in self._TENSORS:
            self.register_buffer(key, packed[key])
        self.meta = {k: packed[k] for k in ("bits", "group", "n", "k", "block_k")}
        self.register_buffer("v", parts.get("v"))
        self.register_buffer("u", parts.get("u"))
        self.site = site

    def packed(self) -> dict[str, Any]:
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero, "in_scale": self.in_scale,
                "bias": self.bias, **self.meta}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quant_linear(x, self.packed(), _cast(self.v, x), _cast(self.u, x), where=self.site)

    def kernel_calls(self) -> list[dict[str, Any]]:
        rank = 0 if self.v is None else self.v.shape[0]
        return [{"template": "quant_matmul", "flags": {"lowrank": bool(rank)},
                 "shape": {"N": self.meta["n"], "K": self.meta["k"], "R": rank, "BITS": self.meta["bits"],
                           "BLOCK_K": self.meta["block_k"], "G": self.meta["group"]}}]


def gpu_site_module(op: str, parts: dict[str, torch.Tensor], attrs: dict[str, Any], site: str) -> nn.Module | None:
    """The kernel-backed module for a site, or None where the dense torch module is right (dense
    layers stay on cuBLAS)."""
    if op == "lowrank_linear":
        return TritonLowRankLinear(parts["v"], parts["u"], parts.get("bias"), site)
    if op != "compressed_linear":
        return None
    if "codes" in parts:
        return TritonQuantLinear(parts, attrs, site)
    if "values" in parts:
        from .sparse import TritonSparseLowRankLinear
        return TritonSparseLowRankLinear(parts, attrs, site)
    if "v" in parts:
        return TritonLowRankLinear(parts["v"], parts["u"], parts.get("bias"), site)
    raise LrccError(f"codegen triton: site {site!r} has no form the GPU kernels know (parts: {sorted(parts)})")
