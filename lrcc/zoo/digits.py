"""Small models for microcontroller targets, trained on scikit-learn's digits in seconds.

The digits (1797 8x8 grey images, 10 classes, shipped with scikit-learn, no download) are used at
three input shapes: flat 64 values (MLP), 1x32x32 (CNN, nearest-neighbour upscaled) and 3x32x32
(ViT, the grey image repeated over 3 channels). Every model is written with ordinary torch modules
so that the C backend sees what users write: nn.Linear, nn.Conv2d, nn.LayerNorm, GELU,
F.scaled_dot_product_attention with heads split by view/transpose.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Digits:
    """The digits split into train and held-out test sets, as float tensors and labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(shape: str = "flat", test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """The digits as "flat" (N, 64), "image" (N, 1, 32, 32) or "rgb" (N, 3, 32, 32), scaled to
    [0, 1]; a fixed, seeded split into train and test."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (N, 8, 8), values 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    if shape == "flat":
        x = x.reshape(-1, 64)
    elif shape in ("image", "rgb"):
        x = x[:, None].repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (N, 1, 32, 32)
        if shape == "rgb":
            x = x.repeat(1, 3, 1, 1)
    else:
        raise ValueError(f"unknown digits shape {shape!r}; use 'flat', 'image' or 'rgb'")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


class MLP(nn.Module):
    """64-256-128-10 with ReLU."""

    def __init__(self, sizes: tuple[int, ...] = (64, 256, 128, 10)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class CNN(nn.Module):
    """1x32x32 -> conv 16 -> pool -> conv 32 -> pool -> conv 64 -> global average pool -> dense 10
    (3x3 convolutions, padding 1, ReLU, 2x2 max pools)."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, c // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A tiny vision transformer: patch embedding (a strided convolution), learned position
    embedding, pre-norm blocks, mean pooling over tokens, a final norm and a linear head."""

    def __init__(self, image: int = 32, channels: int = 3, patch: int = 4, dim: int = 64, heads: int = 4,
                 depth: int = 2, mlp_ratio: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x.mean(dim=1)))


def train(model: nn.Module, data: Digits, epochs: int = 20, lr: float = 3e-3, batch: int = 64, seed: int = 0,
          weight_decay: float = 1e-4) -> float:
    """Train with AdamW and a cosine schedule; returns the held-out accuracy (0..1)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(data.y_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.y_train), generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return accuracy(model, data.x_test, data.y_test)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy of model on (x, y)."""
    hits = 0
    for i in range(0, len(y), batch):
        hits += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return hits / len(y)


def trained(name: str, seed: int = 0, epochs: int | None = None) -> tuple[nn.Module, Digits, float]:
    """A freshly trained "mlp", "cnn" or "vit" with its data and held-out float accuracy."""
    torch.manual_seed(seed)
    if name == "mlp":
        model, data, ep, lr = MLP(), load_digits("flat", seed=seed), 30, 3e-3
    elif name == "cnn":
        model, data, ep, lr = CNN(), load_digits("image", seed=seed), 12, 1e-2
    elif name == "vit":
        model, data, ep, lr = ViT(), load_digits("rgb", seed=seed), 30, 3e-3
    else:
        raise ValueError(f"unknown digits model {name!r}; use 'mlp', 'cnn' or 'vit'")
    acc = train(model, data, epochs=epochs or ep, lr=lr, seed=seed)
    return model, data, acc
