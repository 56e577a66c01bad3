"""Coordinate MLPs: SIREN (sine activations), ReLU, and SiLU hidden layers."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Activation = Literal["sine", "relu", "silu"]
ACTIVATIONS: tuple[str, ...] = ("sine", "relu", "silu")


def _silu_derivative(pre: Tensor) -> Tensor:
    """d/dx of ``x sigmoid(x)`` at ``pre``."""
    s = torch.sigmoid(pre)
    return s * (1 + pre * (1 - s))


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

    def forward_with_jacobian(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        """Values ``(M, out)`` and tangents ``(M, K, out)`` from ``x`` ``(M, in)`` and ``dx`` ``(M, K, in)``."""
        pre = self.omega0 * self.linear(x)
        dpre = self.omega0 * (dx @ self.linear.weight.T)
        return torch.sin(pre), torch.cos(pre)[:, None, :] * dpre

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
        activation: Activation = "sine",
        omega0: float = 30.0,
        output_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if activation == "sine" and not omega0 > 0:
            raise ValueError(f"omega0 must be > 0, got {omega0}")
        layers: list[nn.Module] = []
        n_in = in_features
        for i in range(depth):
            if activation == "sine":
                layers.append(SineLayer(n_in, width, omega0=omega0, first=i == 0))
            else:
                layers += [nn.Linear(n_in, width), nn.ReLU() if activation == "relu" else nn.SiLU()]
            n_in = width
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(width, out_features)
        with torch.no_grad():
            bound = output_scale * math.sqrt(6.0 / width)
            self.output.weight.uniform_(-bound, bound)
            self.output.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """``(M, in_features)`` -> ``(M, out_features)``.

        Features read from the grids come channels-first, so ``x`` is often a column-major view
        (``x.t()`` contiguous): then every layer runs as ``W @ x`` on that layout and the output
        is column-major too. A row-major product on a column-major input, and above all its
        backward, cost about 1.5x as much on a CPU (a 90000-point lattice: 25 -> 16 ms).

        >>> mlp = CoordinateMLP(in_features=4, out_features=3, width=8, depth=2, activation="relu", output_scale=1.0)
        >>> x = torch.randn(4, 50)
        >>> bool(torch.allclose(mlp(x.t()), mlp(x.t().contiguous()), atol=1e-6))
        True
        """
        if x.dim() == 2 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride(0) == 1 and x.t().is_contiguous():
            return self._forward_channels_first(x.t()).t()
        return self.output(self.hidden(x))

    def _forward_channels_first(self, h: Tensor) -> Tensor:
        """``(in_features, M)`` -> ``(out_features, M)``: the layers as ``addmm(b, W, h)``."""
        for layer in self.hidden:
            if isinstance(layer, SineLayer):
                h = torch.sin(layer.omega0 * torch.addmm(layer.linear.bias[:, None], layer.linear.weight, h))
            elif isinstance(layer, nn.Linear):
                h = torch.addmm(layer.bias[:, None], layer.weight, h)
            else:  # the activation, elementwise
                h = layer(h)
        return torch.addmm(self.output.bias[:, None], self.output.weight, h)

    def forward_with_jacobian(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        """Forward mode by hand: the output ``(M, out_features)`` and its tangents ``(M, K, out_features)``
        from the input ``(M, in_features)`` and its tangents ``dx`` ``(M, K, in_features)``
        (tangent-major, so each layer is one matrix product; ``K = 3`` for the Jacobian with
        respect to the point). Written out because it is differentiated again (the folding
        penalty's gradient), once per step.

        >>> mlp = CoordinateMLP(in_features=2, out_features=1, width=4, depth=1, activation="relu")
        >>> y, dy = mlp.forward_with_jacobian(torch.ones(3, 2), torch.eye(2).expand(3, 2, 2))
        >>> dy.shape
        torch.Size([3, 2, 1])
        """
        for layer in self.hidden:
            if isinstance(layer, SineLayer):
                x, dx = layer.forward_with_jacobian(x, dx)
            elif isinstance(layer, nn.Linear):
                x, dx = layer(x), dx @ layer.weight.T
            elif isinstance(layer, nn.ReLU):  # its derivative from the output: the same mask
                x = layer(x)
                dx = dx * (x > 0).to(dx.dtype)[:, None, :]
            else:  # SiLU
                dx = dx * _silu_derivative(x)[:, None, :]
                x = layer(x)
        return self.output(x), dx @ self.output.weight.T
