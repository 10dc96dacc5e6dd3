"""Attention-output error of the post-training attention forms on MiniLM's real attention inputs.

Real text from the offline corpus is packed into sequences of 512 tokens (MiniLM's longest); the
q, k, v of all 6 layers (12 heads each) are captured from the exact model, and each form's output
is compared with exact softmax attention: relative Frobenius error ||Y - Y*|| / ||Y*|| over all
layers, heads and sequences. Forms at equal budget b (keys or features per query): Performer with
b features, a local window of b keys, Scatterbrain with b/2 features + a window of b/2 keys, and
elu+1 linear attention (no budget). Writes the "attention-error" section of docs/benchmarks.md.

    python benchmarks/attention_error.py [--sequences 4] [--budgets 32 64 128] [--seeds 3] [--no-write]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_sections import write_section  # noqa: E402
from lrcc.rewrites import linear_attention as la  # noqa: E402
from lrcc.zoo import corpus, minilm  # noqa: E402


def packed_batch(n_sequences: int, length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of exactly `length` tokens of running corpus text ([CLS] ... [SEP])."""
    sentences, _ = corpus.splits(4000, 0)
    tok = minilm.tokenizer()
    rows, text = [], []
    for s in sentences:
        text.append(s)
        ids, _ = tok.encode([" ".join(text)], max_length=length)
        if ids.shape[1] >= length:
            rows.append(ids[0, :length])
            text = []
            if len(rows) == n_sequences:
                break
    ids = torch.stack(rows)
    return ids, torch.ones_like(ids)


def capture_qkv(model, ids, mask) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) [B, heads, L, d] of every layer, from hooks on its projections."""
    enc = model.encoder if hasattr(model, "encoder") else model
    out, hooks = [], []
    for layer in enc.layers:
        att = layer.attn
        box = {}
        for name in ("q", "k", "v"):
            hooks.append(getattr(att, name).register_forward_hook(
                lambda mod, inp, y, name=name, box=box, att=att: box.__setitem__(name, att._heads(y).detach())))
        out.append(box)
    with torch.no_grad():
        model(ids, mask)
    for h in hooks:
        h.remove()
    return [(b["q"], b["k"], b["v"]) for b in out]


def errors(qkv, budget: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    d = qkv[0][0].shape[-1]
    w_full = la.orthogonal_features(d, budget, gen)
    w_half = la.orthogonal_features(d, budget // 2, gen)
    forms = {
        "performer": lambda q, k, v: la.performer_attention(q, k, v, w_full),
        "local window": lambda q, k, v: la.local_attention(q, k, v, budget // 2),
        "scatterbrain": lambda q, k, v: la.scatterbrain_attention(q, k, v, w_half, budget // 4),
        "elu+1": lambda q, k, v: la.elu_attention(q, k, v),
    }
    sq = {name: 0.0 for name in forms}
    ref_sq = 0.0
    for q, k, v in qkv:
        exact = la.exact_attention(q, k, v)
        ref_sq += exact.pow(2).sum().item()
        for name, fn in forms.items():
            sq[name] += (fn(q, k, v) - exact).pow(2).sum().item()
    return {name: (s / ref_sq) ** 0.5 for name, s in sq.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = minilm.load_encoder("plain").eval()
    ids, mask = packed_batch(args.sequences)
    qkv = capture_qkv(model, ids, mask)
    lines = ["| budget b | Performer (b features) | local window (b keys) | Scatterbrain (b/2 + b/2) | elu+1 | "
             "Scatterbrain / Performer | Scatterbrain / window |", "|---|---|---|---|---|---|---|"]
    for b in args.budgets:
        runs = [errors(qkv, b, seed) for seed in range(args.seeds)]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        lines.append(f"| {b} | {mean['performer']:.3f} | {mean['local window']:.3f} | {mean['scatterbrain']:.3f} | "
                     f"{mean['elu+1']:.3f} | {mean['scatterbrain'] / mean['performer']:.2f} | "
                     f"{mean['scatterbrain'] / mean['local window']:.2f} |")
        print(lines[-1], flush=True)
    body = (f"`python benchmarks/attention_error.py` on all-MiniLM-L6-v2: {args.sequences} sequences of 512 tokens of "
            f"packed corpus text, all 6 layers x 12 heads; relative error of the attention output against exact "
            f"softmax attention, mean over {args.seeds} random-feature seeds. Performer and Scatterbrain use FAVOR+ "
            "orthogonal positive features; the window is centred on the query (b/2 keys either side for the "
            "window form, b/4 for Scatterbrain's sparse part).\n\n" + "\n".join(lines) + "\n")
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", "attention-error", body)


if __name__ == "__main__":
    main()
