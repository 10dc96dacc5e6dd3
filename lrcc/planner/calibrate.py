"""Calibration: run the model on calibration inputs and collect what the planner needs.

- input statistics per site: A = sum_t x_t x_t^T (for activation-aware factorisation);
- output sensitivity: how much each candidate would change the model's *output*, by first-order
  expansion: dy = J_site dY_site, estimated with random output probes z: the gradient
  g = d(z . y)/dY_site gives z . dy = sum_t g_t . (dW x_t), whose square is, in expectation
  over z, ||J_site dW x||^2. For a truncation family dW = -sum_{i>=r} s_i l_i r_i^T this is
  sum over samples of (sum_{i>=r} c_i)^2 with c_i = s_i sum_t (g_t . l_i)(x_t . r_i),
  so one backward pass prices every rank of every site at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import CalibrationError
from ..rewrites.rule import Delta, Spectrum


DELTA_GROUP = 4  # samples per group when pricing explicit weight changes (see collect_sensitivity)


def check_batches(batches: list[tuple], num_inputs: int, what: str = "calibration") -> list[tuple]:
    """Validate calibration batches: tuples of tensors, matching arity, finite floats."""
    out = []
    for b, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        if not isinstance(batch, (tuple, list)):
            raise CalibrationError(f"{what} batch {b}: expected a tuple of tensors, got {type(batch).__name__}")
        if len(batch) != num_inputs:
            raise CalibrationError(f"{what} batch {b}: has {len(batch)} inputs, the model takes {num_inputs}")
        for i, x in enumerate(batch):
            if not isinstance(x, torch.Tensor):
                raise CalibrationError(f"{what} batch {b} input {i}: expected a tensor, got {type(x).__name__}")
            if x.dtype.is_floating_point and not torch.isfinite(x).all():
                raise CalibrationError(f"{what} batch {b} input {i}: contains {int(torch.isnan(x).sum())} NaN and "
                                       f"{int(torch.isinf(x).sum())} Inf value(s); clean or drop that batch")
        out.append(tuple(batch))
    if not out:
        raise CalibrationError(f"{what}: no batches given")
    return out


def split_holdout(batches: list[tuple], holdout: float) -> tuple[list[tuple], list[tuple], str]:
    """(fit, held-out, a description of the held-out data): every round(1/holdout)-th batch is held
    out; with fewer than 2 batches both are the whole list, and the description says so."""
    if len(batches) < 2:
        return batches, batches, "the calibration data itself (too few batches to hold any out)"
    stride = max(2, int(round(1 / holdout)))
    held = [b for i, b in enumerate(batches) if i % stride == stride - 1]
    fit = [b for i, b in enumerate(batches) if i % stride != stride - 1]
    if not held:
        held, fit = fit[-1:], fit[:-1]
    return fit, held, f"{len(held)} held-out calibration batch(es) (every {stride}th)"


def take_samples(batches: list[tuple], n: int) -> list[tuple]:
    """About n samples' worth of batches, spread evenly over the list (not just its head)."""
    sizes = [b[0].shape[0] if b[0].dim() else 1 for b in batches]
    total = sum(sizes)
    if total <= n:
        return list(batches)
    k = max(1, round(len(batches) * n / total))
    step = len(batches) / k
    return [batches[int(i * step)] for i in range(k)]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@dataclass
class InputStats:
    """Per-site sums of x x^T over calibration tokens (float64)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, repr=False)

    attention: dict[str, tuple] = field(default_factory=dict)  # site -> (q, k, mask) of a few sequences

    def xtx(self, site: str) -> torch.Tensor:
        return self.sums[site]

    def attention_inputs(self, site: str) -> tuple:
        """(q [N, H, L, d], k, key mask or None) captured at attention site `site` (collect_attention_inputs)."""
        if site not in self.attention:
            raise CalibrationError(f"attention {site}: no calibration inputs were captured there")
        return self.attention[site]

    def memo(self, key, fn):
        """fn() computed once per key for these statistics (e.g. a site's whitened spectrum, which
        several rules build on)."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


def collect_input_stats(lowered, batches: list[tuple], sites: list[str], progress: Callable[[str], None] | None = None) -> InputStats:
    """One forward pass over the batches, summing x^T x at the input of every site."""
    stats = InputStats()
    hooks = []

    last: dict[str, object] = {"x": None, "acc": None}  # sites fed by one tensor (q, k, v) share its sums

    def make_hook(site: str):
        def hook(module, args, output):
            x = args[0]  # compared by identity: detach() would make a new object each call
            if last["x"] is not x:
                rows = _rows(x.detach()).float()
                if not torch.isfinite(rows).all():
                    raise CalibrationError(f"layer {site}: its input on calibration data contains NaN or Inf")
                last["x"], last["acc"] = x, (rows.T @ rows).double()
            acc = last["acc"]
            if site in stats.sums:
                stats.sums[site] += acc
            else:
                stats.sums[site] = acc.clone()
            stats.tokens[site] = stats.tokens.get(site, 0) + x.numel() // x.shape[-1]
        return hook

    for site in sites:
        hooks.append(lowered.site(site).register_forward_hook(make_hook(site)))
    try:
        with torch.no_grad():
            for k, batch in enumerate(batches):
                lowered(*batch)
                last["x"] = last["acc"] = None
                if progress:
                    progress(f"input statistics: batch {k + 1}/{len(batches)}")
    finally:
        for h in hooks:
            h.remove()
    return stats


def collect_attention_inputs(lowered, batches: list[tuple], sites: list[str], stats: InputStats,
                             sequences: int = 16) -> None:
    """Capture q, k and the mask at each attention site for the first `sequences` calibration
    sequences (for fits that need them, e.g. Linformer's segments), into stats.attention."""
    got: dict[str, list[tuple]] = {s: [] for s in sites}
    seen = 0

    def make_hook(site: str):
        def hook(module, args, output):
            q, k = args[0].detach(), args[1].detach()
            mask = args[3].detach() if len(args) > 3 and isinstance(args[3], torch.Tensor) else None
            if mask is not None:
                while mask.dim() < 4:
                    mask = mask.unsqueeze(0)
                mask = mask.expand(q.shape[0], *mask.shape[1:])
            got[site].append((q.float(), k.float(), mask))
        return hook

    hooks = [lowered.site(s).register_forward_hook(make_hook(s)) for s in sites]
    try:
        with torch.no_grad():
            for batch in batches:
                if seen >= sequences:
                    break
                lowered(*batch)
                seen += batch[0].shape[0] if batch[0].dim() else 1
    finally:
        for h in hooks:
            h.remove()
    for site, parts in got.items():
        if not parts:
            continue
        lengths = {p[0].shape[2] for p in parts}
        if len(lengths) > 1:
            raise CalibrationError(f"attention {site}: calibration sequences have lengths {sorted(lengths)}; a "
                                   "fixed-length form (Linformer) needs them all of one length")
        q = torch.cat([p[0] for p in parts])[:sequences]
        k = torch.cat([p[1] for p in parts])[:sequences]
        mask = None if parts[0][2] is None else torch.cat([p[2] for p in parts])[:sequences]
        stats.attention[site] = (q, k, mask)


def flat_outputs(out) -> torch.Tensor:
    """The model's float outputs as one [batch, features] matrix."""
    from torch.utils import _pytree as pytree
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
    if not leaves:
        raise CalibrationError("the model returns no floating-point tensor: lrcc measures error on float outputs")
    b = leaves[0].shape[0] if leaves[0].dim() else 1
    return torch.cat([t.reshape(b, -1) if t.dim() else t.reshape(1, 1).expand(b, 1) for t in leaves], dim=1)


@dataclass
class Sensitivity:
    """Per family: per-sample contributions c[probe*sample, i]; per site: output metric S = sum g g^T."""

    contributions: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    out_metric: dict[str, torch.Tensor] = field(default_factory=dict)
    output_energy: float = 0.0   # sum over samples of ||y||^2 (per probe)
    samples: int = 0
    probes: int = 1

    def truncation_errors(self, family: str) -> torch.Tensor:
        """err[r] = predicted sum over samples of ||dy||^2 / sum ||y||^2 when keeping the first r terms."""
        c = torch.cat(self.contributions[family], dim=0).double()  # (P*S) x k
        tail = c.flip(1).cumsum(1).flip(1)  # tail[:, r] = sum_{i>=r} c_i
        err = (tail ** 2).sum(0) / self.probes
        err = torch.cat([err, torch.zeros(1, dtype=err.dtype)])
        return (err / max(self.output_energy, 1e-30)).float()


def collect_sensitivity(lowered, batches: list[tuple], families: dict[str, tuple[str, "Spectrum | Delta"]], probes: int = 2,
                        seed: int = 0, progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Forward + backward with random output probes; prices every truncation of every family.

    families: family key -> (site, Spectrum).
    """
    sens = Sensitivity(probes=probes)
    by_site: dict[str, list[tuple[str, Spectrum]]] = {}
    for fam, (site, spec) in families.items():
        by_site.setdefault(site, []).append((fam, spec))
    gen = torch.Generator().manual_seed(seed)
    saved: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(site: str):
        def hook(module, args, output):
            x = args[0].detach()
            saved[site] = x
            if site in attention:  # an attention site: its changes need all its inputs and its output
                saved[site] = (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), output.detach())
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)

            def on_grad(g: torch.Tensor):
                if site in attention:
                    inputs, exact = saved[site]
                    for fam, spec in by_site.get(site, []):
                        c = spec.contributions_at(inputs, exact, g.detach())
                        sens.contributions.setdefault(fam, []).append(c.detach())
                    return None
                xs = saved[site]
                bsz = g.shape[0]
                gf = g.detach().reshape(bsz, -1, g.shape[-1]).float()
                xf = xs.reshape(bsz, -1, xs.shape[-1]).float()
                gr = _rows(gf)
                acc = (gr.T @ gr).double()
                sens.out_metric[site] = sens.out_metric[site] + acc if site in sens.out_metric else acc
                for fam, spec in by_site.get(site, []):
                    if not spec.needs_wgrad:
                        c = spec.contributions(xf, gf)  # bsz x k
                        sens.contributions.setdefault(fam, []).append(c.detach())
                if site in deltas:
                    # explicit dW: <dW, G_s> with G_s = sum_t g_t x_t^T, for all of the site's candidates
                    # in one product (bsz x mn) @ (mn x C)
                    # Samples are taken in groups of DELTA_GROUP: the probes z are independent across
                    # samples, so cross terms inside a group vanish in expectation (unbiased, a little
                    # noisier), and the per-group gradients cost DELTA_GROUP times less memory traffic.
                    names, stacked = deltas[site]
                    k = DELTA_GROUP
                    pad = (-bsz) % k
                    gp = torch.nn.functional.pad(gf, (0, 0, 0, 0, 0, pad)) if pad else gf
                    xp = torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, pad)) if pad else xf
                    groups = gp.shape[0] // k
                    gp = gp.reshape(groups, -1, gp.shape[-1])
                    xp = xp.reshape(groups, -1, xp.shape[-1])
                    wgrad = torch.bmm(gp.transpose(1, 2), xp).reshape(groups, -1)
                    c_all = wgrad @ stacked
                    for j, fam in enumerate(names):
                        sens.contributions.setdefault(fam, []).append(c_all[:, j:j + 1].detach())
                return None

            output.register_hook(on_grad)
            return output
        return hook

    deltas: dict[str, tuple[list[str], torch.Tensor]] = {}
    attention = {site for site, fams in by_site.items() if any(getattr(s, "kind", None) == "attention" for _, s in fams)}
    for site, fams in by_site.items():
        explicit = [(fam, spec) for fam, spec in fams if spec.needs_wgrad]
        if explicit:
            deltas[site] = ([f for f, _ in explicit], torch.stack([spec.dw.reshape(-1).float() for _, spec in explicit], dim=1))
    for site in by_site:
        hooks.append(lowered.site(site).register_forward_hook(make_hook(site)))
    try:
        for k, batch in enumerate(batches):
            # one forward pass, one backward pass per probe
            with torch.enable_grad():
                y = flat_outputs(lowered(*batch))
                for p in range(probes):
                    z = torch.randn(y.shape, generator=gen, dtype=y.dtype)
                    if y.requires_grad:
                        (y * z).sum().backward(retain_graph=p < probes - 1)
            saved.clear()
            sens.output_energy += probes * float((y.detach().double() ** 2).sum())
            sens.samples += y.shape[0]
            if progress:
                progress(f"output sensitivity: batch {k + 1}/{len(batches)}")
    finally:
        for h in hooks:
            h.remove()
        saved.clear()
    if sens.output_energy == 0 or not math.isfinite(sens.output_energy):
        raise CalibrationError("the model's outputs on calibration data are all zero or non-finite")
    sens.output_energy /= probes
    return sens


def output_error(reference, candidate, batches: list[tuple]) -> dict[str, float]:
    """Relative squared error sum||y'-y||^2/sum||y||^2 and per-sample cosine of the outputs."""
    num = den = 0.0
    cos: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in batches:
            y = flat_outputs(reference(*batch)).double()
            y2 = flat_outputs(candidate(*batch)).double()
            num += float(((y2 - y) ** 2).sum())
            den += float((y ** 2).sum())
            cos.append(torch.nn.functional.cosine_similarity(y, y2, dim=1))
    c = torch.cat(cos)
    return {
        "rel_error": num / max(den, 1e-30),
        "cosine_mean": float(c.mean()),
        "cosine_p5": float(torch.quantile(c, 0.05)) if c.numel() > 1 else float(c.mean()),
        "samples": int(c.numel()),
    }
