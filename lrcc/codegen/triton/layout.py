"""Weight layouts the Triton kernels read, made once from lrcc's stored parts at lowering time."""
from __future__ import annotations

from typing import Any

import torch

from ...errors import LrccError

KERNEL_BITS = (2, 4, 8)  # code widths that pack whole codes into bytes
MIN_DOT = 16             # smallest K extent of a tensor-core product (tl.dot)
MAX_SUB = 64             # rows per dequantised sub-tile: larger tiles cost registers, smaller add loop trips


def sub_rows(group: int) -> int:
    """Rows per sub-tile: divides the quantisation group (so one scale row serves the sub-tile)."""
    if group == 0:
        return MAX_SUB
    sub = min(group, MAX_SUB)
    if group % sub or sub < MIN_DOT:
        raise LrccError(f"group size {group} is not supported by the Triton kernels: use a multiple of "
                        f"{MIN_DOT} (32, 64 or 128)")
    return sub


def pack_for_kernel(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                    n_in: int, in_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    where: str = "weight") -> dict[str, Any]:
    """Repack a quantised weight for quant_matmul.py.j2.

    codes: uint8 m x cols, one code per byte (unpacked; cols = n_in padded to the group); scale,
    zero: m x groups (fp16). Returns codes as uint8 [m, K_pad / per_byte], each output feature's
    bytes contiguous (K-major, as F.linear's weight), with the sub-tile interleave the kernels
    unpack: in each block of block_k input rows, byte j of the block holds rows j + i * sub at bits
    i * bits. scale and zero as [groups_pad, m] fp16, and the metadata the launchers need.
    """
    if bits not in KERNEL_BITS:
        raise LrccError(f"{where}: int{bits} weights have no Triton kernel (supported: "
                        f"{', '.join(f'int{b}' for b in KERNEL_BITS)}); plan without them for GPU targets")
    m, cols = codes.shape
    sub = sub_rows(group)
    per_byte = 8 // bits
    block_k = sub * per_byte
    k_pad = -(-n_in // block_k) * block_k
    c = codes.t().contiguous()  # [cols, m]: the kernel reads whole rows of output features
    if c.shape[0] < k_pad:
        c = torch.nn.functional.pad(c, (0, 0, 0, k_pad - c.shape[0]))
    c = c[:k_pad].to(torch.int32).reshape(k_pad // block_k, per_byte, sub, m)
    packed = torch.zeros((k_pad // block_k, sub, m), dtype=torch.int32)
    for i in range(per_byte):
        packed |= c[:, i] << (i * bits)
    g = k_pad if group == 0 else group
    groups_pad = -(-k_pad // g)
    s = torch.zeros((groups_pad, m), dtype=torch.float16)
    z = torch.zeros((groups_pad, m), dtype=torch.float16)
    s[: scale.shape[1]] = scale.t().half()
    z[: zero.shape[1]] = zero.t().half()
    return {"codes": packed.reshape(-1, m).t().to(torch.uint8).contiguous(), "scale": s.contiguous(),
            "zero": z.contiguous(), "in_scale": None if in_scale is None else in_scale.half().contiguous(),
            "bias": None if bias is None else bias.contiguous(), "bits": bits, "group": g, "n": m, "k": n_in,
            "block_k": block_k}


def to_device(w: dict[str, Any], device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The packed weight's tensors on `device` (bias in `dtype` when given)."""
    out = {}
    for key, val in w.items():
        if isinstance(val, torch.Tensor):
            val = val.to(device)
            if key == "bias" and dtype is not None:
                val = val.to(dtype)
        out[key] = val
    return out
