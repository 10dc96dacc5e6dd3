"""Weight-only quantisation of linear layers: int8 per output channel, int4 / int2 group-wise.

Laws:
- Asymmetric round-to-nearest (RTN) per group of g input columns: q = clamp(round(w / s) + z,
  0, 2^b - 1), w' = (q - z) s with s = (max - min) / (2^b - 1) and z = round(-min / s); the scale
  and zero are stored in fp16, and w' is computed from the stored values, so what lrcc measures is
  exactly what runs. A row that does not divide into groups is padded with zero columns.
- GPTQ (Frantar et al. 2022, arXiv:2210.17323): quantising column by column and spreading each
  column's error over the not-yet-quantised columns through the inverse of H = X^T X minimises
  ||X (W - W')^T|| far better than RTN; it needs calibration inputs.
- AWQ-style scaling (Lin et al. 2023, arXiv:2306.00978): x W^T = (x / s)(W diag s)^T exactly, and
  scaling up the input channels that carry large activations before quantising protects them;
  s = mean|x|^alpha with alpha searched on calibration data.
Storage: codes packed densely (8 codes in b bytes: two int4 per byte), fp16 scale and zero per group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantSpec:
    """Bits per weight and group size (group = 0 means one group per output row)."""

    bits: int
    group: int

    def label(self) -> str:
        return f"int{self.bits} per channel" if self.group == 0 else f"int{self.bits} g{self.group}"


def padded_columns(n: int, group: int) -> int:
    return n if group == 0 else int(math.ceil(n / group) * group)


def quant_bytes(m: int, n: int, spec: QuantSpec) -> int:
    """Storage of one quantised m x n weight: packed codes plus fp16 scale and zero per group."""
    cols = padded_columns(n, spec.group)
    groups = 1 if spec.group == 0 else cols // spec.group
    code_bytes = cols if spec.bits == 8 else int(math.ceil(cols / 8)) * spec.bits
    return m * code_bytes + m * groups * 4


def _group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-exact scale and zero for each row of w (rows are groups), asymmetric.

    At 3 bits and below the range is also shrunk towards zero where that lowers the row's squared
    rounding error (clipping a few outliers buys finer steps for every other weight), as in the
    MSE-optimal grid search of GPTQ's reference implementation and AWQ's clipping search.
    """
    qmax = (1 << bits) - 1
    lo0 = w.min(dim=1).values.clamp(max=0)
    hi0 = w.max(dim=1).values.clamp(min=0)
    shrinks = (1.0,) if bits > 3 else (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    best_err = best_scale = best_zero = None
    for f in shrinks:
        lo, hi = lo0 * f, hi0 * f
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        scale = scale.half().float().clamp(min=float(torch.finfo(torch.float16).tiny))
        zero = torch.round(-lo / scale).clamp(0, qmax)
        if len(shrinks) == 1:
            return scale, zero
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, qmax)
        err = ((q - zero[:, None]) * scale[:, None] - w).pow(2).sum(1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w (m x n) padded and reshaped to (m * groups) x g."""
    m, n = w.shape
    cols = padded_columns(n, spec.group)
    if cols != n:
        w = torch.nn.functional.pad(w, (0, cols - n))
    g = cols if spec.group == 0 else spec.group
    return w.reshape(m * (cols // g), g)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes m x cols as uint8, scale m x groups, zero m x groups)."""
    m = w.shape[0]
    wg = _grouped(w.float(), spec)
    scale, zero = _group_params(wg, spec.bits)
    q = torch.clamp(torch.round(wg / scale[:, None]) + zero[:, None], 0, (1 << spec.bits) - 1)
    return q.to(torch.uint8).reshape(m, -1), scale.reshape(m, -1), zero.reshape(m, -1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int) -> torch.Tensor:
    """The float weight (m x n) the stored codes stand for."""
    m, cols = codes.shape
    groups = scale.shape[1]
    g = cols // groups
    w = (codes.float().reshape(m, groups, g) - zero.float()[:, :, None]) * scale.float()[:, :, None]
    return w.reshape(m, cols)[:, :n]


def quantize_gptq(w: torch.Tensor, xtx: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  block: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ with group-wise asymmetric scales; returns the same (codes, scale, zero) layout as
    quantize_rtn.

    act_order: quantise columns in order of decreasing H diagonal (the loudest inputs first, while
    the most columns are left to absorb their error), with each group's scale and zero fixed up
    front from the original weights ("static groups", so the stored layout is unchanged). Off by
    default: on correlated inputs the fixed low-bit grids cost more than the ordering gains.
    Without it, a group's scale and zero are computed when its first column is reached, on the
    weights as updated so far.
    """
    m, n = w.shape
    cols = padded_columns(n, spec.group)
    g = cols if spec.group == 0 else spec.group
    qmax = (1 << spec.bits) - 1
    wk = torch.nn.functional.pad(w.double(), (0, cols - n)) if cols != n else w.double().clone()
    h = torch.zeros(cols, cols, dtype=torch.float64)
    h[:n, :n] = xtx.double()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    wk[:, dead] = 0.0
    codes = torch.zeros(m, cols, dtype=torch.uint8)
    scales = torch.zeros(m, cols // g)
    zeros = torch.zeros(m, cols // g)
    if act_order:
        for gi in range(cols // g):
            scales[:, gi], zeros[:, gi] = _group_params(wk[:, gi * g:(gi + 1) * g].float(), spec.bits)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(cols)
    wk = wk[:, perm]
    h = h[perm][:, perm]
    group_of = (perm // g).tolist()
    h += damp * float(h.diagonal().mean()) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    wk = wk.float()
    qcols = torch.zeros(m, cols, dtype=torch.uint8)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = wk[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            gi = group_of[col]
            if not act_order and col % g == 0:
                grp = torch.cat([wb[:, j:], wk[:, b1:]], dim=1)[:, :g].float()
                scales[:, gi], zeros[:, gi] = _group_params(grp, spec.bits)
            s, z = scales[:, gi], zeros[:, gi]
            q = torch.clamp(torch.round(wb[:, j] / s) + z, 0, qmax)
            qcols[:, col] = q.to(torch.uint8)
            e = (wb[:, j] - (q - z) * s) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        wk[:, b1:] -= err @ hinv[b0:b1, b1:]
    codes[:, perm] = qcols
    return codes, scales, zeros


def awq_scales(w: torch.Tensor, xtx: torch.Tensor, tokens: int, spec: QuantSpec,
               alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)) -> tuple[torch.Tensor, float]:
    """Per-input-channel scales s = rms(x)^alpha, alpha chosen to minimise tr(dW A dW^T)."""
    a = xtx.double()
    act = (a.diagonal() / max(tokens, 1)).sqrt().clamp(min=1e-8)
    best, best_err, best_alpha = torch.ones(w.shape[1]), float("inf"), 0.0
    for alpha in alphas:
        s = (act ** alpha).float()
        s = s / s.mean()  # keeps the weights' range comparable
        s = s.half().float().clamp(min=1e-4)
        codes, scale, zero = quantize_rtn(w * s, spec)
        dw = dequantize(codes, scale, zero, w.shape[1]) / s - w
        err = float(torch.einsum("ij,jk,ik->", dw.double(), a, dw.double()))
        if err < best_err:
            best, best_err, best_alpha = s, err, alpha
    return best, best_alpha


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (values < 2^bits) densely along the last dim: every 8 codes take `bits`
    bytes (two int4 per byte, eight int3 in three bytes); rows are padded to a multiple of 8."""
    if bits == 8:
        return codes.contiguous()
    m, cols = codes.shape
    pad = (-cols) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    c = codes.reshape(m, -1, 8).to(torch.int64)
    word = torch.zeros(c.shape[:2], dtype=torch.int64)
    for k in range(8):
        word |= c[:, :, k] << (bits * k)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=-1)
    return out.reshape(m, -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack: uint8 codes m x cols."""
    if bits == 8:
        return packed[:, :cols]
    m = packed.shape[0]
    p = packed.reshape(m, -1, bits).to(torch.int64)
    word = torch.zeros(p.shape[:2], dtype=torch.int64)
    for j in range(bits):
        word |= p[:, :, j] << (8 * j)
    mask = (1 << bits) - 1
    codes = torch.stack([(word >> (bits * k)) & mask for k in range(8)], dim=-1)
    return codes.reshape(m, -1)[:, :cols].to(torch.uint8)


# --- rules -------------------------------------------------------------------------------
from typing import Any  # noqa: E402

from ..ir.graph import Graph, Node  # noqa: E402
from .rule import Candidate, Delta, Rule  # noqa: E402

QUANT_SPECS = (QuantSpec(8, 0), QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 128), QuantSpec(3, 64),
               QuantSpec(3, 128), QuantSpec(2, 32), QuantSpec(2, 64))
AWQ_SPECS = (QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 128))
LQ_CONFIGS = ((QuantSpec(2, 64), (16, 32, 64)), (QuantSpec(4, 128), (16, 32, 64)))


def quant_parts(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The stored tensors of a quantised weight: packed codes, fp16 scale and zero."""
    return {"codes": pack(codes, spec.bits), "scale": scale.half(), "zero": zero.half()}


def stored_weight(parts: dict[str, torch.Tensor], attrs: dict[str, Any]) -> torch.Tensor:
    """The weight a compressed_linear's stored parts compute with (main part plus low-rank)."""
    from ..codegen.torch_module import CompressedLinear
    mod = CompressedLinear(parts, attrs["m"], attrs["n"], attrs.get("bits"), attrs.get("cols"))
    w = mod.main_weight()
    if "v" in parts:
        low = parts["u"].float() @ parts["v"].float()
        w = low if w is None else w + low
    return w


def parts_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _guard(g: Graph, n: Node) -> str | None:
    w = g.tensor(n.inputs[1])
    if not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype} is not floating point"
    if sum(1 for m in g.nodes if n.inputs[1] in m.inputs) > 1:
        return "weight is shared with other nodes (tied weights)"
    if min(w.shape) < 8:
        return f"weight {tuple(w.shape)} too small to quantise group-wise"
    return None


def site_weight(g: Graph, n: Node) -> tuple[torch.Tensor, int, int, str, int]:
    """A linear site's weight (fp32), its shape, its site name and its bias bytes."""
    w = g.tensor(n.inputs[1]).float()
    m, k = w.shape
    return w, m, k, n.attrs["site"], (4 * m if len(n.inputs) > 2 else 0)


def _delta_family(w: torch.Tensor, parts_fn, attrs: dict[str, Any]):
    box: dict[str, Delta] = {}

    def get(stats):
        if "d" not in box:
            parts = parts_fn(stats)
            box["d"] = Delta(stored_weight(parts, attrs) - w.float(), parts, attrs)
        return box["d"]
    return get


def _allowed(specs, options: dict[str, Any]):
    """The specs whose bit width the target can run (option quant_bits; GPU targets set it to the
    widths their kernels unpack)."""
    bits = options.get("quant_bits")
    return [s for s in specs if bits is None or s.bits in bits]


def _offer_quant(g: Graph, n: Node, options: dict[str, Any]) -> list[Candidate]:
    w, m, k, site, bias = site_weight(g, n)
    out: list[Candidate] = []
    methods = options.get("quant_methods", ("gptq", "awq"))
    for method in methods:
        specs = QUANT_SPECS if method == "gptq" else AWQ_SPECS
        specs = options.get("quant_specs", specs)  # a target may allow only the layouts its code runs
        for spec in _allowed(specs, options):
            cols = padded_columns(k, spec.group)
            attrs = {"m": m, "n": k, "bits": spec.bits, "group": spec.group, "cols": cols}
            if method == "gptq":
                fn = lambda stats, spec=spec: quant_parts(*quantize_gptq(w, stats.xtx(site), spec), spec)
            else:
                def fn(stats, spec=spec):
                    s, _ = awq_scales(w, stats.xtx(site), stats.tokens[site], spec)
                    return {**quant_parts(*quantize_rtn(w * s, spec), spec), "in_scale": s.half()}
            nbytes = quant_bytes(m, k, spec) + bias + (2 * k if method == "awq" else 0)
            label = "GPTQ" if method == "gptq" else "AWQ-scaled RTN"
            out.append(Candidate(site=site, node=n.name, rule="quantize_linear", choice=f"{spec.label()}, {label}",
                                 form="quant", knobs={"bits": spec.bits, "group": spec.group, "method": method},
                                 params=m * k + (m if bias else 0), bytes=nbytes, weight_shapes=[(m, k)],
                                 family=f"{site}:{method}:{spec.label()}", spectrum=_delta_family(w, fn, attrs),
                                 needs_calibration=True, error_index=0, refit="quant" if method == "gptq" else "none"))
    return out


def _offer_lq(g: Graph, n: Node, options: dict[str, Any]) -> list[Candidate]:
    from .low_rank import whitened_for
    w, m, k, site, bias = site_weight(g, n)
    spectrum = lambda stats: whitened_for(stats, w, site)

    out: list[Candidate] = []
    for spec, ranks in options.get("lq_configs", LQ_CONFIGS):
        if spec.bits not in options.get("quant_bits", (spec.bits,)):
            continue
        for r in ranks:
            if r >= min(m, k) // 2:
                continue
            cols = padded_columns(k, spec.group)
            attrs = {"m": m, "n": k, "bits": spec.bits, "group": spec.group, "cols": cols, "rank": r}

            def fn(stats, spec=spec, r=r):
                v, u = spectrum(stats).factors(r)
                v, u = v.half(), u.half()
                residual = w - u.float() @ v.float()
                return {**quant_parts(*quantize_rtn(residual, spec), spec), "v": v, "u": u}
            nbytes = quant_bytes(m, k, spec) + 2 * r * (m + k) + bias
            out.append(Candidate(site=site, node=n.name, rule="quantize_lowrank",
                                 choice=f"{spec.label()} + rank {r} fp16 (LQ)", form="quant+lowrank",
                                 knobs={"bits": spec.bits, "group": spec.group, "rank": r},
                                 params=m * k + r * (m + k) + (m if bias else 0), bytes=nbytes,
                                 weight_shapes=[(m, k), (r, k), (m, r)], family=f"{site}:lq:{spec.label()}:{r}",
                                 spectrum=_delta_family(w, fn, attrs), needs_calibration=True, error_index=0, refit="lq"))
    return out


quantize_linear = Rule(
    name="quantize_linear",
    pattern="linear",
    guard=_guard,
    offer=_offer_quant,
    law="W ~ (Q - z) s per group of columns: RTN, GPTQ (arXiv:2210.17323) or AWQ scaling "
        "x W^T = (x/s)(W diag s)^T (arXiv:2306.00978)",
)

quantize_lowrank = Rule(
    name="quantize_lowrank",
    pattern="linear",
    guard=_guard,
    offer=_offer_lq,
    law="W = Q(W - U V) + U V with U V in fp16 (LQ-LoRA, arXiv:2311.12023; SVDQuant, arXiv:2411.05007)",
)
