"""Models for the command-line tests, importable as tests.cli_models:factory."""
import torch
from torch import nn


def factory() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()


not_a_model = 42
