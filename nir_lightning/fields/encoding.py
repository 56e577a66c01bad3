"""Coordinate encodings: what the MLP sees of a point."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierFeatures(nn.Module):
    """Gaussian Fourier features ``[sin(pi x B^T), cos(pi x B^T)]`` with ``B ~ N(0, sigma^2)``.

    ``num_frequencies=0`` is the identity encoding (the raw coordinates). ``B`` is a
    buffer, so it is saved in checkpoints and a resumed run sees the same encoding.

    Args:
        num_frequencies: rows of ``B``; the output has ``2 * num_frequencies`` features.
        sigma: standard deviation of ``B``; larger values let the field bend on finer scales.
        in_features: coordinate dimension.
        seed: seed of ``B`` (independent of the global RNG, so the encoding is reproducible).

    >>> enc = FourierFeatures(num_frequencies=8, sigma=2.0)
    >>> enc(torch.zeros(5, 3)).shape
    torch.Size([5, 16])
    >>> FourierFeatures(num_frequencies=0)(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """

    matrix: Tensor  # (num_frequencies, in_features) buffer: follows the module's device

    def __init__(
        self,
        *,
        num_frequencies: int = 64,
        sigma: float = 2.0,
        in_features: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_frequencies < 0:
            raise ValueError(f"num_frequencies must be >= 0, got {num_frequencies}")
        if num_frequencies > 0 and not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.num_frequencies = num_frequencies
        self.sigma = sigma
        self.in_features = in_features
        gen = torch.Generator().manual_seed(seed)
        matrix = torch.randn(num_frequencies, in_features, generator=gen) * sigma
        self.register_buffer("matrix", matrix)
        self.out_features = 2 * num_frequencies if num_frequencies else in_features

    def forward(self, x: Tensor) -> Tensor:
        """``(M, in_features)`` -> ``(M, out_features)``."""
        if self.num_frequencies == 0:
            return x
        proj = math.pi * (x @ self.matrix.T)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``(M, out_features)`` and their derivative with respect to ``x``,
        ``(M, in_features, out_features)`` (tangent-major)."""
        if self.num_frequencies == 0:
            return x, torch.eye(self.in_features, dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
        proj = math.pi * (x @ self.matrix.T)
        dproj = math.pi * self.matrix.T  # (in, F)
        feats = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
        jac = torch.cat([torch.cos(proj)[:, None, :] * dproj, -torch.sin(proj)[:, None, :] * dproj], dim=-1)
        return feats, jac

    def extra_repr(self) -> str:
        return f"num_frequencies={self.num_frequencies}, sigma={self.sigma}"
