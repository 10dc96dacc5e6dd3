"""The reference executor: runs a Program with exactly the generated C's integer arithmetic."""
from __future__ import annotations

import numpy as np
import torch

from ...errors import LrccError
from . import fixedpoint as fx
from . import kernels
from .program import Program


def run_program(prog: Program, x: np.ndarray) -> np.ndarray:
    """The program's int8 output for one int8 input (shaped like the input tensor or flat)."""
    env: dict[str, np.ndarray] = {}
    inp = prog.tensors[prog.input]
    x = np.asarray(x)
    if x.dtype != np.int8 or x.size != inp.size:
        raise LrccError(f"C model: expected {inp.size} int8 input values (shape {inp.shape}), got {x.size} of {x.dtype}")
    env[prog.storage(prog.input)] = x.reshape(-1)

    def value(name: str) -> np.ndarray:
        t = prog.tensors[name]
        if t.const is not None:
            return t.const.reshape(t.shape)
        key = prog.storage(name)
        if key not in env:
            raise LrccError(f"C model: tensor {name!r} is read before it is written")
        return env[key].reshape(t.shape)

    for op in prog.ops:
        y = kernels.reference(op, [value(i) for i in op.inputs])
        out = prog.tensors[op.output]
        if y.size != out.size:
            raise LrccError(f"C model: op {op.name} ({op.kind}) made {y.size} values for {op.output!r} of shape {out.shape}")
        env[prog.storage(op.output)] = np.asarray(y, dtype=np.int8).reshape(-1)
    return value(prog.output)


class ProgramModule(torch.nn.Module):
    """cm(x) for MCU targets: float tensors in and out, int8 inside, bit-exact with the C.

    The input is quantised with the program's input (scale, zero point), each batch row runs
    through the reference executor, and the int8 output is dequantised."""

    def __init__(self, prog: Program, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.prog = prog
        self.out_shape = tuple(out_shape)

    def quantize_input(self, x: torch.Tensor) -> np.ndarray:
        t = self.prog.tensors[self.prog.input]
        return fx.quantize_real(x.detach().double().cpu().numpy(), t.scale, t.zero_point)

    def run_int8(self, q: np.ndarray) -> np.ndarray:
        """int8 outputs (batch, ...) for int8 inputs (batch, ...)."""
        return np.stack([run_program(self.prog, row) for row in q]) if len(q) else np.zeros((0,) + self.out_shape, np.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.prog.tensors[self.prog.input]
        if x.dim() != len(inp.shape) + 1 or tuple(x.shape[1:]) != inp.shape:
            raise LrccError(f"C model: expected input of shape (batch, {', '.join(map(str, inp.shape))}), got {tuple(x.shape)}")
        q = self.run_int8(self.quantize_input(x))
        out = self.prog.tensors[self.prog.output]
        y = fx.dequantize(q, out.scale, out.zero_point)
        return torch.from_numpy(y).reshape((x.shape[0],) + self.out_shape)
