"""Coordinate MLPs: SIREN (sine activations) and a ReLU baseline."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn


class SineLayer(nn.Module):
    """``sin(omega0 * (W x + b))`` with the SIREN initialisation (Sitzmann et al. 2020).

    First layer: ``W ~ U(-1/n, 1/n)``; later layers: ``W ~ U(-sqrt(6/n)/omega0, +...)``, so
    pre-activations stay ~N(0, 1) through depth.
    """

    def __init__(self, in_features: int, out_features: int, *, omega0: float, first: bool) -> None:
        super().__init__()
        self.omega0 = omega0
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / in_features if first else math.sqrt(6.0 / in_features) / omega0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)
            self.linear.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.omega0 * self.linear(x))

    def extra_repr(self) -> str:
        return f"omega0={self.omega0}"


class CoordinateMLP(nn.Module):
    """MLP ``R^in -> R^out``: ``depth`` hidden layers of ``width``, then a linear output.

    The output layer starts near zero (``output_scale``), so a field built on it starts
    near the identity transform.

    >>> mlp = CoordinateMLP(in_features=6, out_features=3, width=16, depth=2)
    >>> mlp(torch.zeros(4, 6)).shape
    torch.Size([4, 3])
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int = 3,
        width: int = 256,
        depth: int = 3,
        activation: Literal["sine", "relu"] = "sine",
        omega0: float = 30.0,
        output_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        if activation not in ("sine", "relu"):
            raise ValueError(f"activation must be 'sine' or 'relu', got {activation!r}")
        if activation == "sine" and not omega0 > 0:
            raise ValueError(f"omega0 must be > 0, got {omega0}")
        layers: list[nn.Module] = []
        n_in = in_features
        for i in range(depth):
            if activation == "sine":
                layers.append(SineLayer(n_in, width, omega0=omega0, first=i == 0))
            else:
                layers += [nn.Linear(n_in, width), nn.ReLU()]
            n_in = width
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(width, out_features)
        with torch.no_grad():
            bound = output_scale * math.sqrt(6.0 / width)
            self.output.weight.uniform_(-bound, bound)
            self.output.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """``(M, in_features)`` -> ``(M, out_features)``."""
        return self.output(self.hidden(x))
