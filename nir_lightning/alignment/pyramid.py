"""The image pyramid of the affine stage (:mod:`~nir_lightning.alignment.stage`).

Each level holds both images block-averaged towards a voxel size (``shrink`` times the fixed
image's finest), the matrices that take level-normalized fixed coordinates through a world
matrix to level-normalized moving ones, and the fixed voxels points are drawn from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nir_lightning.coords import voxel_spacing, voxel_to_normalized_matrix

__all__ = ["MIN_LEVEL_VOXELS", "Level", "build_level", "torch64"]

MIN_LEVEL_VOXELS = 16
"""Pyramid levels whose fixed image is smaller than this along an axis are skipped."""


@dataclass
class Level:
    """One pyramid level: both images downsampled, their affines and the sampling region."""

    shrink: int
    fixed: Tensor  # (1, 1, d0, d1, d2)
    fixed_shape: tuple[int, int, int]
    moving: Tensor
    moving_mask: Tensor | None  # (1, 1, ...) float fraction, or None
    region: Tensor  # flat indices of the fixed voxels to sample from
    left: Tensor  # N_m V_m^-1 (4x4 float64)
    right: Tensor  # V_f N_f^-1 (4x4 float64)


def _pool(image: Tensor, factors: tuple[int, int, int]) -> Tensor:
    if factors == (1, 1, 1):
        return image
    return F.avg_pool3d(image, kernel_size=factors, stride=factors)


def _grown(mask: Tensor, steps: Sequence[int]) -> Tensor:
    """``mask`` ``(D0, D1, D2)`` dilated by ``steps[a]`` voxels along each axis a (a box element).

    On the CPU by :func:`scipy.ndimage.maximum_filter1d` (a running maximum: its cost does not
    grow with the window; ``max_pool3d`` took 0.8 s at 1 mm for the same boolean mask).
    """
    if mask.device.type == "cpu":
        from scipy.ndimage import maximum_filter1d

        grown = mask.numpy().astype(np.uint8)
        for axis, k in enumerate(steps):
            if k > 0:
                grown = maximum_filter1d(grown, size=2 * k + 1, axis=axis, mode="constant", cval=0)
        return torch.from_numpy(grown > 0)
    return _grown_by_pooling(mask, steps)


def _grown_by_pooling(mask: Tensor, steps: Sequence[int]) -> Tensor:
    """:func:`_grown` on any device: ``max_pool3d`` with a ``2 k + 1`` window along each axis."""
    out = mask[None, None].to(torch.float32)
    for axis, k in enumerate(steps):
        if k > 0:
            size = [1, 1, 1]
            size[axis] = 2 * k + 1
            pad = [0, 0, 0]
            pad[axis] = k
            out = F.max_pool3d(out, kernel_size=tuple(size), stride=1, padding=tuple(pad))
    return out[0, 0] > 0


def _pooled_affine(affine: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Affine of a grid averaged in blocks of ``factors``: block ``u`` is centred on voxel ``f u + (f - 1) / 2``."""
    f = np.asarray(factors, dtype=np.float64)
    block = np.eye(4)
    block[:3, :3] = np.diag(f)
    block[:3, 3] = (f - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ block


def _factors(shape: Sequence[int], affine: np.ndarray, target_mm: float) -> tuple[int, int, int]:
    """Per-axis block sizes that bring the voxel size of ``affine`` closest to ``target_mm``."""
    out = [max(1, min(int(n), math.floor(target_mm / s + 0.5))) for n, s in zip(shape, voxel_spacing(affine), strict=True)]
    return (out[0], out[1], out[2])


def torch64(a: np.ndarray, device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)


def build_level(
    shrink: int,
    fixed: Tensor,
    fixed_affine: np.ndarray,
    moving: Tensor,
    moving_affine: np.ndarray,
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
    foreground: Tensor | None,
    margin: float,
) -> Level:
    """The pyramid level of ``shrink`` (voxel size ``shrink`` times the fixed image's finest):
    both images block-averaged towards it, their affines, and the fixed voxels points are drawn
    from (the fixed mask as given, else ``foreground`` grown by ``margin`` mm)."""
    device = fixed.device
    target = shrink * min(voxel_spacing(fixed_affine))
    ff = _factors(fixed.shape[2:], fixed_affine, target)
    mf = _factors(moving.shape[2:], moving_affine, target)
    f = _pool(fixed, ff)
    m = _pool(moving, mf)
    f_aff = _pooled_affine(fixed_affine, ff)
    m_aff = _pooled_affine(moving_affine, mf)
    mask = fixed_mask if fixed_mask is not None else foreground
    assert mask is not None
    frac = _pool(mask.to(device=device, dtype=fixed.dtype)[None, None], ff)[0, 0]
    region = frac >= 0.5
    if not bool(region.any()):
        region = frac > 0
    if fixed_mask is None:
        region = _grown(region, [math.ceil(margin / s - 1e-6) for s in voxel_spacing(f_aff)])
    mm = None
    if moving_mask is not None:
        mm = _pool(moving_mask.to(device=device, dtype=moving.dtype)[None, None], mf)
    fixed_shape = (int(f.shape[2]), int(f.shape[3]), int(f.shape[4]))
    moving_shape = (int(m.shape[2]), int(m.shape[3]), int(m.shape[4]))
    left = voxel_to_normalized_matrix(moving_shape) @ np.linalg.inv(m_aff)
    right = f_aff @ np.linalg.pinv(voxel_to_normalized_matrix(fixed_shape))
    return Level(
        shrink=shrink,
        fixed=f,
        fixed_shape=fixed_shape,
        moving=m,
        moving_mask=mm,
        region=region.reshape(-1).nonzero().reshape(-1),
        left=torch64(left, device),
        right=torch64(right, device),
    )
