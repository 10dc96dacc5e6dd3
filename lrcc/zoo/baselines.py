"""Uniform-rank baselines: every site gets the same parameter fraction (plain or whitened SVD)."""
from __future__ import annotations

import math

from ..codegen.torch_module import lower_to_torch
from ..ir.from_torch import import_module
from ..planner.calibrate import collect_input_stats
from ..rewrites.low_rank import breakeven_rank, replace_with_lowrank, svd_spectrum, whitened_spectrum


def uniform_lowrank(model, example_inputs, keep: float, method: str, calibration=None):
    """The model with every linear site factorised to keep `keep` of its weight parameters."""
    g, _ = import_module(model, example_inputs)
    sites = g.sites()
    stats = None
    if method == "whitened":
        stats = collect_input_stats(lower_to_torch(g), list(calibration), [n.attrs["site"] for n in sites])
    new = g.copy()
    for n in sites:
        w = g.tensor(n.inputs[1])
        r = max(1, int(math.floor(keep * breakeven_rank(*w.shape))))
        spec = svd_spectrum(w) if method == "svd" else whitened_spectrum(w, stats.xtx(n.attrs["site"]), n.attrs["site"])
        v, u = spec.factors(r)
        replace_with_lowrank(new, n.name, v, u)
    new.remove_unused_params()
    return lower_to_torch(new)


def uniform_quant(model, example_inputs, bits: int, group: int):
    """The model with every linear site quantised round-to-nearest (asymmetric, fp16 scale and zero).

    Returns (module, fraction of the sites' fp32 bytes).
    """
    from ..rewrites.quantize import QuantSpec, padded_columns, quant_parts, quantize_rtn
    from ..rewrites.rule import replace_site
    g, _ = import_module(model, example_inputs)
    new = g.copy()
    before = after = 0
    spec = QuantSpec(bits, group)
    for n in g.sites():
        w = g.tensor(n.inputs[1])
        m, k = w.shape
        parts = quant_parts(*quantize_rtn(w, spec), spec)
        replace_site(new, n.name, parts, {"m": m, "n": k, "bits": bits, "group": group, "cols": padded_columns(k, group)})
        bias = 4 * m if len(n.inputs) > 2 else 0
        before += 4 * w.numel() + bias
        after += sum(t.numel() * t.element_size() for t in parts.values()) + bias
    new.remove_unused_params()
    return lower_to_torch(new), after / before
