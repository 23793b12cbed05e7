"""LayerScale: per-channel learned scaling of a residual branch."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiplies its input by the learned vector `gamma` (shape [dim])."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
