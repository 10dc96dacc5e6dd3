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
               signed 4-bit two's complement), shape (m, ceil(n/2)). With ``bits`` = 4 and an attr
               ``zero`` int32 (m), the nibbles are unsigned codes and weight[o,i] = code - zero[o]
               (quantize_linear's per-channel int4 layout, run as stored).
- ``conv2d``   x (C, H, W) -> y (M, OH, OW), NCHW. weight int8 (M, C/groups, KH, KW), bias, mult,
               shift as linear; stride [sh, sw], pad [top, left, bottom, right] (padded inputs are
               x_zp, i.e. real 0), groups. Optional ``pool`` = 2: a 2x2 stride-2 max pool fused after
               the activation (y is the pooled shape; pooling max commutes with the monotonic
               requantisation, so this equals the unfused ops exactly).
               Attrs weight, bias, mult, shift, c, h, w, m, kh, kw, stride, pad, groups, oh, ow (the
               conv's size before the pool: oh = floor((h + top + bottom - kh) / sh) + 1), pool (0 or
               2; pooled size floor(oh / 2) x floor(ow / 2), like torch), x_zp, y_zp, act_min, act_max.
               acc is int32: the build clips bias[o] to +-(2^31 - 1 - taps * max|x - x_zp| * max|w[o]|)
               (taps = C/groups*KH*KW) and refuses convs whose taps alone could overflow.
- ``maxpool2d`` x (C, H, W) -> y (C, OH, OW): kernel [kh, kw], stride [sh, sw], pad
               [top, left, bottom, right] (padding never wins the max; a window wholly in the padding
               gives -128); same qparams in and out. Attrs c, h, w, kernel, stride, pad, oh, ow (floor,
               like torch), x_zp = y_zp.
- ``avgpool2d`` x (C, H, W) -> y (C, OH, OW): kernel, stride, no padding; mult/shift (real =
               x_scale / (y_scale kh kw)); y = clamp(y_zp + requantize(sum over the window of (x - x_zp))).
- ``mean``     x viewed as (outer, count, inner) -> y (outer, inner): attrs outer, count, inner,
               mult, shift (scalars; real = x_scale / (y_scale * count)).
               y = clamp(y_zp + requantize(sum_k (x - x_zp), mult, shift)); attrs also x_zp, y_zp.
               The sum is int32 (the build checks count * max|x - x_zp| fits).
- ``add``      a, b (same number of elements; b may be a const tensor) -> y.
               y = clamp(y_zp + rshift_round((a - a_zp) * mult_a + (b - b_zp) * mult_b, shift)) (int64);
               attrs n, a_zp, b_zp, y_zp, mult_a, mult_b, shift (scalars: fixedpoint.shared_shift of
               a_scale / y_scale and b_scale / y_scale), act_min, act_max (fused ReLU).
- ``relu``     y = max(x, x_zp); y has x's qparams (the lowering fuses it into producers it can).
               Attrs n (element count), x_zp = y_zp.
- ``lut``      y = table[x + 128]; table int8 (256), n (element count). GELU and other elementwise
               functions: table[q + 128] = quantize(f(dequantize(q))), exactly rounded.
- ``requant``  y = clamp(y_zp + requantize(x - x_zp, mult, shift)) (scalars); attrs n, x_zp, y_zp,
               mult, shift (~ x_scale / y_scale), act_min, act_max.
- ``layernorm`` x (rows, n) -> y (rows, n) over the last dim (attrs rows, n, x_zp, y_zp, eps_q, sqrt_shift):
               d_i = x_i - x_zp; s = sum d_i; ss = sum d_i^2 (int64);
               den = isqrt64(((n*ss - s*s) << 2*sqrt_shift) + eps_q)
                   (n*ss - s*s = n^2 var; sqrt_shift k in [0, 12]: den carries k fractional bits;
                    eps_q int64 >= 1 ~ eps * n^2 * 4^k / x_scale^2);
               t_i = round_div((n*d_i - s) * gamma_q[i], den)   (gamma_q int32 ~ gamma_i / y_scale * 2^(16+k));
               y_i = sat8(y_zp + rshift_round(t_i + beta_q[i], 16))   (beta_q int32 ~ beta_i / y_scale * 2^16).
               k is the largest (<= 12) keeping gamma_q in int32 and the shifted variance below 2^62.
- ``softmax``  x (rows, n) over the last dim, y scale 1/256 zero point -128 (attrs rows, n, x_zp, y_zp = -128):
               e_i = exp_table[max_j x_j - x_i] (exp_table int32 (256) = round(2^16 exp(-d x_scale)));
               y_i = min(127, round_div(e_i * 256, sum_j e_j) - 128)   (sum in int64).
- ``attention`` q (Nq, H*D), k (Nk, H*D), v (Nk, H*D) -> y (Nq, H*D), head h in columns
               [h*D, (h+1)*D), computed head by head, one query row at a time (attrs heads, nq, nk, d,
               q_zp, k_zp, v_zp, y_zp, score_mult, score_shift, out_mult, out_shift, causal):
               raw_j = sum_c (q_c - q_zp)(k_jc - k_zp) (int32) over the visible keys j;
               dist_j = min(4095, requantize(max_j raw - raw_j, score_mult, score_shift))
                   (score_mult/shift ~ q_scale k_scale softmax_scale * 256: dist in 1/256 nats);
               e_j = rshift_round(exp_hi[dist_j >> 6] * exp_lo[dist_j & 63], 16)
                   (exp_hi int32 (64) = round(2^16 exp(-h / 4)), exp_lo int32 (64) = round(2^16 exp(-l / 256)));
               s = sum_j e_j (int64); o_c = round_div((sum_j e_j (v_jc - v_zp)) * 256, s) (int64);
               y_c = sat8(y_zp + requantize(o_c, out_mult, out_shift)) (~ v_scale / (256 y_scale)).
               softmax_scale defaults to 1/sqrt(D). Scratch: Nk int32 per call (op.scratch_bytes =
               4 Nk, 4-byte aligned). ``causal`` = 1: query i sees keys j <= i (torch's is_causal,
               top-left aligned).
- ``permute``  x of shape ``in_shape`` -> y = x.permute(perm), contiguous copy; same qparams; attrs
               in_shape, perm. The copy runs as at most 4 loops after dropping dims of size 1 and
               merging dims adjacent in both x and y (any permutation of up to 4 dims; more where they
               merge).

Reshapes of contiguous tensors are not ops: the lowering aliases their buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OP_KINDS = ("linear", "conv2d", "maxpool2d", "avgpool2d", "mean", "add", "relu", "lut", "requant", "layernorm", "softmax",
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
