"""The int8 program: what the C backend emits and the reference executor runs.

An lrcc Graph (after planning) is lowered to a Program: a schedule of integer operators over int8
tensors, each tensor with asymmetric per-tensor quantisation (real = scale * (q - zero_point)).
Weights are symmetric per-output-channel int8, biases int32 in units of (input scale x weight
scale), requantisation by (mult, shift) pairs (see fixedpoint.py). Batch is 1: tensor shapes leave
the batch dim out.

Operator catalogue (``Op.kind``; ``Op.attrs`` holds ints, int lists and numpy arrays). "x_zp" etc.
are the zero points of the op's input/output tensors, copied into attrs by the lowering so a kernel
needs nothing else. Every op clamps its output to [act_min, act_max] where it has them (fused
ReLU: act_min = y_zp), else to [-128, 127].

- ``linear``   x (rows, n) -> y (rows, m). weight int8 (m, n), bias int32 (m), mult/shift int32 (m).
               acc = bias[o] + sum_i (x[r,i] - x_zp) * weight[o,i];
               y = clamp(y_zp + requantize(acc, mult[o], shift[o]), act_min, act_max).
               Optional attr ``bits`` = 4: weight is packed two per byte (low nibble = even column,
               signed 4-bit two's complement), shape (m, ceil(n/2)).
- ``conv2d``   x (C, H, W) -> y (M, OH, OW), NCHW. weight int8 (M, C/groups, KH, KW), bias, mult,
               shift as linear; stride [sh, sw], pad [top, left, bottom, right] (padded inputs are
               x_zp, i.e. real 0), groups. Optional ``pool`` = 2: a 2x2 stride-2 max pool fused after
               the activation (y is the pooled shape; pooling max commutes with the monotonic
               requantisation, so this equals the unfused ops exactly).
- ``maxpool2d`` x (C, H, W) -> y (C, OH, OW): kernel [kh, kw], stride [sh, sw], pad
               [top, left, bottom, right] (padding never wins the max); same qparams in and out.
- ``mean``     x viewed as (outer, count, inner) -> y (outer, inner): attrs outer, count, inner,
               mult, shift (scalars; real = x_scale / (y_scale * count)).
               y = clamp(y_zp + requantize(sum_k (x - x_zp), mult, shift)).
- ``add``      a, b (same number of elements; b may be a const tensor) -> y.
               y = clamp(y_zp + rshift_round((a - a_zp) * mult_a + (b - b_zp) * mult_b, shift)).
- ``relu``     y = max(x, x_zp); y has x's qparams (the lowering fuses it into producers it can).
- ``lut``      y = table[x + 128]; table int8 (256). GELU and other elementwise functions.
- ``requant``  y = clamp(y_zp + requantize(x - x_zp, mult, shift)) (scalars).
- ``layernorm`` x (rows, n) -> y (rows, n) over the last dim:
               d_i = x_i - x_zp; s = sum d_i; ss = sum d_i^2 (int64);
               den = isqrt64(n*ss - s*s + eps_q)  (eps_q int64 >= 1 ~ eps * n^2 / x_scale^2);
               t_i = round_div((n*d_i - s) * gamma_q[i], den)   (gamma_q int32 ~ gamma_i / y_scale * 2^16);
               y_i = clamp(y_zp + rshift_round(t_i + beta_q[i], 16))   (beta_q int32 ~ beta_i / y_scale * 2^16).
- ``softmax``  x (rows, n) over the last dim, y scale 1/256 zero point -128:
               e_i = exp_table[max_j x_j - x_i] (exp_table int32 (256) ~ 2^16 exp(-d x_scale));
               y_i = min(127, round_div(e_i * 256, sum_j e_j) - 128).
- ``attention`` q (Nq, H*D), k (Nk, H*D), v (Nk, H*D) -> y (Nq, H*D), head h in columns
               [h*D, (h+1)*D), computed head by head, one query row at a time:
               raw_j = sum_c (q - q_zp)(k_j - k_zp); dist_j = min(255, requantize(max_j raw - raw_j,
               score_mult, score_shift)) (score_mult/shift ~ q_scale k_scale softmax_scale * 16);
               e_j = exp_table[dist_j] (int32 (256) ~ 2^16 exp(-d / 16)); s = sum_j e_j;
               o_c = round_div((sum_j e_j (v_jc - v_zp)) * 256, s);
               y_c = clamp(y_zp + requantize(o_c, out_mult, out_shift)) (~ v_scale / (256 y_scale)).
               Scratch: Nk int32 per call. Optional ``causal`` = 1: query i sees keys j <= i.
- ``permute``  x of shape ``in_shape`` (up to 4 dims) -> y = x.permute(perm), contiguous copy;
               same qparams.

Reshapes of contiguous tensors are not ops: the lowering aliases their buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OP_KINDS = ("linear", "conv2d", "maxpool2d", "mean", "add", "relu", "lut", "requant", "layernorm", "softmax",
            "attention", "permute")


@dataclass
class QTensor:
    """An int8 tensor of the program: shape without batch, quantisation, and (constants) values."""

    name: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    const: np.ndarray | None = None  # int8 values of a constant operand (in flash)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class Op:
    """One integer operator: kind (see the module docstring), the IR node it came from, its input
    and output tensor names, and its attributes."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    scratch_bytes: int = 0  # temporary arena bytes the kernel needs during this op


@dataclass
class Program:
    """A schedule of ops over tensors; ``aliases`` maps a reshaped tensor to the one whose buffer it
    shares; ``input``/``output`` name the model's input and output tensors."""

    tensors: dict[str, QTensor]
    ops: list[Op]
    input: str
    output: str
    aliases: dict[str, str] = field(default_factory=dict)

    def storage(self, name: str) -> str:
        """The tensor whose buffer holds `name` (following reshape aliases)."""
        while name in self.aliases:
            name = self.aliases[name]
        return name
