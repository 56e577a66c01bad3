"""How the grids of two loaded images relate: the same grid, their differences in words, overlap.

The images are MONAI MetaTensors ``(C, D0, D1, D2)`` with their voxel-to-world ``affine``
(:mod:`nir_lightning.coords`); :func:`~nir_lightning.data.pair.load_pair` uses these to decide
whether to resample and to word its notes and errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch

from nir_lightning.coords import apply_matrix, voxel_spacing, voxel_to_normalized
from nir_lightning.errors import InputError
from nir_lightning.sampling.domain import foreground_box

if TYPE_CHECKING:  # MONAI (seconds to import): only its type here
    from monai.data import MetaTensor
    from torch import Tensor

__all__ = ["box_maps_inside", "fov_coverage", "grid_differences", "refuse_without_overlap", "same_grid"]


def same_grid(a: MetaTensor, b: MetaTensor) -> bool:
    """The same shape and the same affine (to 1e-4): one grid, nothing to resample."""
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and np.allclose(
        np.asarray(a.affine), np.asarray(b.affine), atol=1e-4
    )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def grid_differences(a: MetaTensor, b: MetaTensor) -> list[str]:
    """How the grids of two MetaTensors ``(C, D0, D1, D2)`` differ, in words (``a`` first)."""
    aff_a, aff_b = np.asarray(a.affine, dtype=np.float64), np.asarray(b.affine, dtype=np.float64)
    out: list[str] = []
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        out.append(f"shape {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    sp_a, sp_b = voxel_spacing(aff_a), voxel_spacing(aff_b)
    if not np.allclose(sp_a, sp_b, atol=1e-4):
        out.append(f"spacing {_fmt(sp_a)} vs {_fmt(sp_b)} mm")
    ax_a, ax_b = "".join(nib.aff2axcodes(aff_a)), "".join(nib.aff2axcodes(aff_b))
    if ax_a != ax_b:
        out.append(f"orientation {ax_a} vs {ax_b}")
    elif not np.allclose(aff_a[:3, :3] / sp_a, aff_b[:3, :3] / sp_b, atol=1e-4):  # directions, not spacing
        out.append("axes rotated")
    centre_a = aff_a[:3, :3] @ ((np.asarray(a.shape[1:]) - 1) / 2) + aff_a[:3, 3]
    centre_b = aff_b[:3, :3] @ ((np.asarray(b.shape[1:]) - 1) / 2) + aff_b[:3, 3]
    shift = float(np.linalg.norm(centre_a - centre_b))
    if shift > 1e-3:
        out.append(f"centres {shift:.1f} mm apart")
    return out


def fov_coverage(moving: MetaTensor, fixed: MetaTensor, step: int = 4) -> float:
    """Fraction of (a stride-``step`` subset of) the fixed grid inside the moving field of view."""
    axes = [np.arange(0, n, step, dtype=np.float64) for n in fixed.shape[1:]]
    vox = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    to_moving = np.linalg.inv(np.asarray(moving.affine, dtype=np.float64)) @ np.asarray(fixed.affine, dtype=np.float64)
    mv = vox @ to_moving[:3, :3].T + to_moving[:3, 3]
    inside = np.all((mv >= -0.5) & (mv <= np.asarray(moving.shape[1:]) - 0.5), axis=1)
    return float(inside.mean())


def refuse_without_overlap(data: Mapping[str, MetaTensor], paths: Mapping[str, Path]) -> float:
    """The fraction of the fixed grid inside the moving field of view (:func:`fov_coverage`); an
    :class:`InputError` when it is 0 (nothing to compare where the headers place the pair)."""
    coverage = fov_coverage(data["moving"], data["fixed"])
    if coverage == 0.0:
        raise InputError(
            f"moving image '{paths['moving']}' does not overlap the fixed image '{paths['fixed']}' in world space "
            f"(their affines place them apart: {'; '.join(grid_differences(data['moving'], data['fixed']))}). "
            "Check the NIfTI headers (qform/sform), or let the affine stage align them (--affine rigid or affine: "
            "it starts from the centres of mass)."
        )
    return coverage


def box_maps_inside(mask: Tensor, shape: tuple[int, int, int], chain: np.ndarray) -> bool:
    """Whether the 8 corners of ``mask``'s bounding box map, through the normalized ``chain``
    matrix, strictly inside the moving grid (by a margin far above float64 rounding): then every
    voxel of the box does (an affine map of a box is the convex hull of its corners' images).

    >>> import torch
    >>> m = torch.zeros(4, 4, 4, dtype=torch.bool); m[1:3, 1:3, 1:3] = True
    >>> box_maps_inside(m, (4, 4, 4), np.eye(4)), box_maps_inside(m, (4, 4, 4), np.diag([3.0, 1.0, 1.0, 1.0]))
    (True, False)
    """
    if not bool(mask.any()):
        return False
    # the box the samplers and the feature grids' domain read too (cached with the mask: found once)
    low, high = foreground_box(mask)
    lows, highs = [float(v) for v in low], [float(v - 1) for v in high]
    corners = torch.tensor([[hi if bit else lo for bit, lo, hi in zip(bits, lows, highs, strict=True)] for bits in np.ndindex(2, 2, 2)], dtype=torch.float64)
    at = apply_matrix(voxel_to_normalized(corners, shape), torch.as_tensor(chain, dtype=torch.float64))
    return bool((at.abs() <= 1.0 - 1e-9).all())
