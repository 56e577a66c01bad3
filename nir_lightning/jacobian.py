"""Jacobians of sampled transforms by finite differences, in voxel units."""

from __future__ import annotations

import torch
from torch import Tensor


def jacobian_forward(phi_vox: Tensor, spacing: tuple[float, float, float]) -> Tensor:
    """Forward-difference Jacobian of a transform sampled on a lattice.

    Args:
        phi_vox: ``(B, d0, d1, d2, 3)`` transformed positions in fixed voxels.
        spacing: lattice step along each axis in fixed voxels.

    Returns:
        ``(B, d0-1, d1-1, d2-1, 3, 3)``; ``J[..., i, a] = d phi_i / d x_a``.
    """
    d0 = (phi_vox[:, 1:, :-1, :-1] - phi_vox[:, :-1, :-1, :-1]) / spacing[0]
    d1 = (phi_vox[:, :-1, 1:, :-1] - phi_vox[:, :-1, :-1, :-1]) / spacing[1]
    d2 = (phi_vox[:, :-1, :-1, 1:] - phi_vox[:, :-1, :-1, :-1]) / spacing[2]
    return torch.stack([d0, d1, d2], dim=-1)


def jacobian_central(phi_vox: Tensor) -> Tensor:
    """Central-difference Jacobian (one-sided at the border) of a transform on a one-voxel lattice.

    The stencil of the dense det J that ``folding_percent`` counts: it reads a fold where the
    transform oscillates two voxels wide, which forward differences cannot see.

    Args:
        phi_vox: ``(..., D0, D1, D2, 3)`` transformed positions in voxels, on the full grid or
            on lattices of step one voxel (e.g. a batch of mini-patches).

    Returns:
        ``(..., D0, D1, D2, 3, 3)``; same convention as :func:`jacobian_forward`.

    >>> x = torch.stack(torch.meshgrid(*[torch.arange(4.0)] * 3, indexing="ij"), dim=-1)
    >>> jac = jacobian_central(2 * x.expand(5, 4, 4, 4, 3))
    >>> jac.shape, float(determinant(jac).min())
    (torch.Size([5, 4, 4, 4, 3, 3]), 8.0)
    """
    grads = torch.gradient(phi_vox, dim=(-4, -3, -2))
    return torch.stack(grads, dim=-1)


def determinant(jac: Tensor) -> Tensor:
    """Determinant of ``(..., 3, 3)`` matrices (explicit formula: fast and twice differentiable).

    >>> determinant(torch.eye(3).expand(2, 3, 3)).tolist()
    [1.0, 1.0]
    """
    a, b, c = jac[..., 0, 0], jac[..., 0, 1], jac[..., 0, 2]
    d, e, f = jac[..., 1, 0], jac[..., 1, 1], jac[..., 1, 2]
    g, h, i = jac[..., 2, 0], jac[..., 2, 1], jac[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
