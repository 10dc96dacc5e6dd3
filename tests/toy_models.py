"""Small models shared by several test files."""
import torch
from torch import nn


class NearlyLowRank(nn.Module):
    """Two linears whose weights are rank 8 plus a little noise: compressible, so budgets have room."""

    def __init__(self, hidden: int = 64, out: int = 16) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.a, self.b = nn.Linear(64, hidden), nn.Linear(hidden, out)
        with torch.no_grad():
            for lin in (self.a, self.b):
                m, n = lin.weight.shape
                low = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen) / n
                lin.weight.copy_(low + 1e-3 * torch.randn(m, n, generator=gen))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def nearly_low_rank_batches() -> list[tuple[torch.Tensor]]:
    """Eight calibration batches of different sizes for NearlyLowRank."""
    gen = torch.Generator().manual_seed(6)
    return [(torch.randn(b, 64, generator=gen),) for b in (40, 32, 48, 40, 36, 44, 40, 32)]
