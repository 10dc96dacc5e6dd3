"""A generated Llama-style decoder (RMSNorm, rotary positions, SwiGLU), for compiling at scale.

Its weights are random but not white: each weight is diag(a) G diag(b) / sqrt(n) with G Gaussian and
a, b decaying like a power law, so its spectrum decays the way trained layers' do and a low-rank
factorisation has something to find. `write_checkpoint` writes them one block at a time as
safetensors shards with an index, so a checkpoint of many GB is made without holding it in memory.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 1024
    dim: int = 256
    ffn: int = 688
    heads: int = 4
    blocks: int = 4

    def block_params(self) -> int:
        return 4 * self.dim * self.dim + 3 * self.dim * self.ffn + 2 * self.dim

    def params(self) -> int:
        return self.blocks * self.block_params() + 2 * self.vocab * self.dim + self.dim


#: Llama-7B's layer shapes (dim 4096, SwiGLU 11008, 32 heads): 202M parameters, 809 MB a block
LLAMA7B_SHAPES = dict(dim=4096, ffn=11008, heads=32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [B, H, L, D] (computed, not stored: no buffers)."""
    b, h, n, d = x.shape
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = torch.arange(n, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        y = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """token ids [B, L] -> logits [B, L, vocab]."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def _weight(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """m x n: diag(a) G diag(b) / sqrt(n), a and b power laws in a random order."""
    g = torch.randn(m, n, generator=gen)
    a = (torch.arange(1, m + 1, dtype=torch.float32) ** -0.5)[torch.randperm(m, generator=gen)] * math.sqrt(m) ** 0.5
    b = (torch.arange(1, n + 1, dtype=torch.float32) ** -0.5)[torch.randperm(n, generator=gen)] * math.sqrt(n) ** 0.5
    g.mul_(a[:, None]).mul_(b[None, :]).div_(math.sqrt(n))
    return g


def weight_groups(cfg: DecoderConfig, seed: int = 0) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """The model's weights, a group (embedding, one block, the head) at a time: (shard name, tensors)."""
    gen = torch.Generator().manual_seed(seed)
    yield "embed", {"embed.weight": torch.randn(cfg.vocab, cfg.dim, generator=gen)}
    for i in range(cfg.blocks):
        p = f"layers.{i}."
        t = {p + "norm1.weight": 1 + 0.1 * torch.randn(cfg.dim, generator=gen),
             p + "norm2.weight": 1 + 0.1 * torch.randn(cfg.dim, generator=gen)}
        for name in ("q", "k", "v", "o"):
            t[p + f"attn.{name}.weight"] = _weight(cfg.dim, cfg.dim, gen)
        t[p + "mlp.gate.weight"] = _weight(cfg.ffn, cfg.dim, gen)
        t[p + "mlp.up.weight"] = _weight(cfg.ffn, cfg.dim, gen)
        t[p + "mlp.down.weight"] = _weight(cfg.dim, cfg.ffn, gen)
        yield f"block-{i:05d}", t
    yield "head", {"norm.weight": 1 + 0.1 * torch.randn(cfg.dim, generator=gen),
                   "head.weight": _weight(cfg.vocab, cfg.dim, gen)}


def build(cfg: DecoderConfig, seed: int | None = 0) -> Decoder:
    """The decoder in memory with weight_groups' weights; seed=None leaves it on the meta device."""
    if seed is None:
        with torch.device("meta"):
            return Decoder(cfg).eval()
    model = Decoder(cfg)
    state = {}
    for _, tensors in weight_groups(cfg, seed):
        state.update(tensors)
    model.load_state_dict(state)
    return model.eval()


def write_checkpoint(cfg: DecoderConfig, path: str | Path, seed: int = 0) -> Path:
    """Write the decoder's weights as safetensors shards (one per block) with an index, holding one
    group in memory at a time; also config.json. Returns the directory."""
    from safetensors.torch import save_file
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, tensors in weight_groups(cfg, seed):
        save_file(tensors, str(out / f"{shard}.safetensors"))
        weight_map.update({k: f"{shard}.safetensors" for k in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 4 * cfg.params()},
                                                                 "weight_map": dict(sorted(weight_map.items()))},
                                                                indent=1))
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return out


def load_config(path: str | Path) -> DecoderConfig:
    return DecoderConfig(**json.loads((Path(path) / "config.json").read_text()))


def calibration(cfg: DecoderConfig, batches: int = 8, batch: int = 2, length: int = 64, seed: int = 1) -> list[tuple]:
    """Random token-id batches (the weights are random too: there is no real text to prefer)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, cfg.vocab, (batch, length), generator=gen),) for _ in range(batches)]
