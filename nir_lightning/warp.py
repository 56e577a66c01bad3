"""Intensity sampling and dense evaluation of fields, in the convention of :mod:`coords`."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from nir_lightning.coords import (
    ALIGN_CORNERS,
    normalized_to_voxel_scale,
    to_grid_sample,
)
from nir_lightning.fields import NeuralField
from nir_lightning.sampling import full_grid_chunks

Interpolation = Literal["bilinear", "nearest"]


def sample_image(
    image: Tensor,
    points: Tensor,
    *,
    mode: Interpolation = "bilinear",
    padding_mode: Literal["zeros", "border"] = "zeros",
) -> Tensor:
    """Sample ``image`` ``(1, C, D0, D1, D2)`` at normalized ``points`` ``(B, d0, d1, d2, 3)``.

    ``"bilinear"`` is trilinear in 3D. Returns ``(B, C, d0, d1, d2)``.

    >>> img = torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    >>> pts = torch.tensor([[-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]).reshape(1, 2, 1, 1, 3)
    >>> sample_image(img, pts).flatten().tolist()  # voxels (0,0,1) and (1,1,1)
    [1.0, 7.0]
    """
    if image.dim() != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, D0, D1, D2), got {tuple(image.shape)}")
    b, d0, d1, d2, _ = points.shape
    grid = to_grid_sample(points).reshape(1, b * d0, d1, d2, 3).to(image.dtype)
    out = F.grid_sample(
        image, grid, mode=mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS
    )
    c = image.shape[1]
    return out.reshape(c, b, d0, d1, d2).transpose(0, 1)


@torch.no_grad()
def dense_field(
    field: NeuralField, shape: tuple[int, int, int], *, max_points: int = 2**18
) -> Tensor:
    """Evaluate ``phi`` on every voxel of the fixed grid, slab by slab (bounded memory).

    Returns normalized coordinates ``(D0, D1, D2, 3)`` on the field's device.
    """
    device = next(field.parameters()).device
    out = torch.empty(*shape, 3, device=device)
    for sl, pts in full_grid_chunks(shape, max_points=max_points, device=device):
        out[sl] = field(pts)[0].float()
    return out


def normalized_to_voxel_displacement(phi: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Dense ``phi`` ``(D0, D1, D2, 3)`` (normalized) to a displacement in voxels, same shape."""
    from nir_lightning.coords import identity_grid

    ident = identity_grid(shape, device=phi.device, dtype=phi.dtype)
    return (phi - ident) * normalized_to_voxel_scale(shape).to(phi)


@torch.no_grad()
def warp_image(
    image: Tensor,
    phi: Tensor,
    *,
    mode: Interpolation = "bilinear",
    max_points: int = 2**20,
) -> Tensor:
    """Warp ``image`` ``(1, C, D0, D1, D2)`` by a dense ``phi`` ``(D0', D1', D2', 3)``.

    Evaluated slab by slab; returns ``(1, C, D0', D1', D2')``.
    """
    shape = phi.shape[:3]
    out = torch.empty(1, image.shape[1], *shape, dtype=image.dtype, device=image.device)
    step = max(1, max_points // (shape[1] * shape[2]))
    for start in range(0, shape[0], step):
        sl = slice(start, min(shape[0], start + step))
        out[:, :, sl] = sample_image(image, phi[sl].unsqueeze(0).to(image.device), mode=mode)
    return out
