"""Entry points that run each compressed form through its Triton kernel.

Where the kernels run:
- on a CUDA tensor: the GPU (JIT-compiled on first use, autotuned once per shape bucket);
- on a CPU tensor in a process started with TRITON_INTERPRET=1: Triton's interpreter (slow, exact
  to the kernel's arithmetic; how CI checks the kernels without a GPU);
- otherwise: the form's torch reference, with one warning per process.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch

from ...errors import LrccError
from . import configs
from .render import interpreting, load, render

_TUNED: dict[tuple, dict] = {}
_MODULES: dict[tuple, Any] = {}
_WARNED: set[str] = set()


def mode(x: torch.Tensor) -> str:
    """'cuda', 'interpret' or 'reference' for an input tensor."""
    if x.is_cuda:
        return "cuda"
    if interpreting():
        return "interpret"
    return "reference"


def warn_reference(what: str) -> None:
    """Say once per process that the torch reference runs instead of the kernels."""
    if "reference" in _WARNED:
        return
    _WARNED.add("reference")
    warnings.warn(f"lrcc: no CUDA device and TRITON_INTERPRET is not set: {what} and the other GPU "
                  "kernels run as their torch reference (set TRITON_INTERPRET=1 before starting "
                  "Python to run the Triton kernels in the interpreter)", RuntimeWarning, stacklevel=3)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a nominal 108, an A100's, off the GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 108


def kernel(template: str, **flags: Any):
    """The loaded kernel module for a template and its render flags (cached: this is on the hot path)."""
    key = (template, tuple(sorted(flags.items())))
    mod = _MODULES.get(key)
    if mod is None:
        mod = _MODULES[key] = load(render(template, **flags))
    return mod


def _bucket(M: int) -> int:
    return configs.pow2(M, lo=1, hi=8192)


def tune(key: tuple, candidates: Callable[[], list[dict]], run: Callable[[dict], torch.Tensor],
         device: torch.device, graphs: bool = False) -> dict:
    """The fastest candidate config for `key` on a GPU (timed once, then cached); the first
    candidate elsewhere, or with LRCC_AUTOTUNE=0. graphs: time replays of a CUDA graph instead of
    launches (for calls of a few microseconds, whose launch overhead would otherwise decide, and
    would favour configs with fewer launches rather than faster ones)."""
    if key in _TUNED:
        return _TUNED[key]
    candidates = candidates()
    if device.type != "cuda" or len(candidates) == 1 or os.environ.get("LRCC_AUTOTUNE", "1") == "0":
        _TUNED[key] = candidates[0]
        return candidates[0]
    from triton.testing import do_bench, do_bench_cudagraph
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            if graphs:  # its first call, outside the capture, compiles the kernel (and fails there if it must)
                ms = do_bench_cudagraph(lambda: run(cfg), rep=20, return_mode="median")
            else:
                ms = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a config that does not fit this GPU (shared memory, registers): skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise LrccError(f"no kernel config ran for {key[0]} at shape {key[1:]}")
    _TUNED[key] = best
    return best


def _rows(x: torch.Tensor, k: int, where: str) -> torch.Tensor:
    if x.shape[-1] != k:
        raise LrccError(f"{where}: input has {x.shape[-1]} features, the layer expects {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cfg: dict) -> torch.Tensor:
    """y = x w^T + bias with matmul.py.j2, or matmul_persistent.py.j2 where cfg says PERSISTENT."""
    return kernel("matmul_persistent" if cfg.get("PERSISTENT") else "matmul").launch(x, w, bias, cfg)


def lowrank_linear(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
                   where: str = "low-rank layer") -> torch.Tensor:
    """y = (x v^T) u^T + bias with the fused kernel (or two matmul passes for large ranks)."""
    R, K = v.shape
    N = u.shape[0]
    x2 = _rows(x, K, where)
    how = mode(x2)
    if how == "reference":
        warn_reference("low-rank layers")
        return torch.nn.functional.linear(torch.nn.functional.linear(x, v.to(x.dtype)), u.to(x.dtype),
                                          None if bias is None else bias.to(x.dtype))
    M = x2.shape[0]
    cands = lambda: configs.lowrank_configs(M, N, K, R, sm_count(x2.device))

    def run(cfg: dict) -> torch.Tensor:
        if cfg["strategy"] == "fused":
            return kernel("lowrank_linear").launch(x2, v, u, bias, cfg)
        return matmul(matmul(x2, v, None, cfg["first"]), u, bias, cfg["second"])

    cfg = tune(("lowrank_linear", _bucket(M), N, K, R, x2.dtype), cands, run, x2.device, graphs=M <= configs.SMALL_M)
    return run(cfg).reshape(*x.shape[:-1], N)


def quant_linear(x: torch.Tensor, w: dict[str, Any], v: torch.Tensor | None = None, u: torch.Tensor | None = None,
                 where: str = "quantised layer") -> torch.Tensor:
    """y = x W_q^T (+ (x v^T) u^T) + bias with the quantised kernels (the GEMV one, the tensor-core
    one, or dequantise-then-matmul, as the config says: autotuned on a GPU); w from
    layout.pack_for_kernel."""
    K, N = w["k"], w["n"]
    x2 = _rows(x, K, where)
    how = mode(x2)
    lowrank = v is not None
    if how == "reference":
        warn_reference("quantised layers")
        y = torch.nn.functional.linear(x2, reference_weight(w).to(x2.dtype),
                                       None if w["bias"] is None else w["bias"].to(x2.dtype))
        if lowrank:
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(x2, v.to(x2.dtype)), u.to(x2.dtype))
        return y.reshape(*x.shape[:-1], N)
    M = x2.shape[0]
    rank = v.shape[0] if lowrank else 0
    cands = lambda: configs.quant_configs(M, N, K, w["block_k"], sm_count(x2.device), rank, bits=w["bits"])

    def run(cfg: dict) -> torch.Tensor:
        if cfg["strategy"] == "dequant_matmul":
            wt = kernel("dequantize").launch(w, x2.dtype, cfg["dequant"])  # W^T, K x N
            if not lowrank:
                return matmul(x2, wt.t(), w["bias"], cfg["matmul"])
            t = matmul(x2, v, None, cfg["first"])
            return kernel("matmul", lowrank=True).launch(x2, wt.t(), w["bias"], cfg["matmul"], t, u)
        mod = kernel("quant_gemv" if cfg["strategy"] == "gemv" else "quant_matmul", lowrank=lowrank)
        return mod.launch(x2, w, v, u, cfg) if lowrank else mod.launch(x2, w, cfg)

    cfg = tune(("quant_matmul", lowrank, w["bits"], w["group"], _bucket(M), N, K, rank, x2.dtype), cands, run,
               x2.device, graphs=M <= configs.SMALL_M)
    return run(cfg).reshape(*x.shape[:-1], N)


def reference_weight(w: dict[str, Any]) -> torch.Tensor:
    """The float weight (N x K) a packed quantised weight stands for (the kernel's torch reference)."""
    bits, block_k, n, k = w["bits"], w["block_k"], w["n"], w["k"]
    per_byte = 8 // bits
    sub = block_k // per_byte
    packed = w["codes"].t().to(torch.int32).reshape(-1, sub, n)  # codes are [N, K_pad / per_byte]
    codes = torch.stack([(packed >> (i * bits)) & ((1 << bits) - 1) for i in range(per_byte)], dim=1)
    codes = codes.reshape(-1, n).float()  # [K_pad, N]
    g = torch.arange(codes.shape[0], device=codes.device) // w["group"]
    wt = (codes - w["zero"].float()[g]) * w["scale"].float()[g]
    wt = wt[:k]
    if w["in_scale"] is not None:
        wt = wt / w["in_scale"].float()[:, None]
    return wt.t()
