"""Convert each method's result to one displacement field convention, and apply it.

The common convention is nir_lightning's ``displacement.nii.gz`` (see ``nir_lightning.coords``):
a field on the **fixed** grid whose vectors, in **LPS millimetres** on disk, take a fixed
physical point ``p`` to the matching moving point ``p + d(p)``. In memory this module keeps
fields as RAS millimetres ``(X, Y, Z, 3)`` in the array-axis order of the fixed NIfTI file
(``nir_lightning.io.load_displacement_itk`` reads disk files into that form).

Nothing here imports ``ants`` or ``fireants`` at module level: the peers are optional.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from nir_lightning.coords import (
    identity_grid,
    normalized_to_voxel_scale,
    voxel_to_world,
    world_displacement_to_voxel,
)
from nir_lightning.core.resample import warp_image
from nir_lightning.io import load_displacement_itk

AFFINE_ATOL = 1e-3  # mm; headers written by ITK and nibabel agree to float32 precision


class ConversionError(RuntimeError):
    """A peer's output does not fit the fixed grid: refuse to score it."""


# -- generic -----------------------------------------------------------------------------


def field_to_phi(disp_ras_mm: np.ndarray, affine: np.ndarray) -> tuple[Tensor, Tensor]:
    """A dense RAS-mm field on the fixed grid to ``(phi, disp_vox)``, both ``(X, Y, Z, 3)`` float32.

    ``phi`` is in nir_lightning's normalized coordinates (``align_corners=True``), ready for
    :func:`nir_lightning.core.resample.warp_image` and
    :func:`nir_lightning.evaluation.scoring.score_transform`; ``disp_vox`` is the displacement
    in fixed voxels (:func:`nir_lightning.coords.world_displacement_to_voxel`).
    """
    shape = tuple(int(s) for s in disp_ras_mm.shape[:3])
    disp_vox = torch.as_tensor(world_displacement_to_voxel(disp_ras_mm, affine), dtype=torch.float32)
    scale = normalized_to_voxel_scale(shape)
    if bool((scale == 0).any()):
        raise ConversionError(f"grid {shape} has an axis of one voxel; 3D registration needs >= 2 voxels per axis")
    phi = identity_grid(shape) + disp_vox / scale
    return phi, disp_vox


def warp_with_field(
    image: np.ndarray | Tensor, disp_ras_mm: np.ndarray, affine: np.ndarray, *, mode: str = "bilinear"
) -> np.ndarray:
    """Resample ``image`` (moving, on the fixed grid) by the field with nir_lightning's warp code.

    ``mode`` is ``"bilinear"`` (trilinear) or ``"nearest"``; outside the image is 0.
    """
    phi, _ = field_to_phi(disp_ras_mm, affine)
    img = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    return warp_image(img, phi, mode=mode)[0, 0].numpy()  # type: ignore[arg-type]


def check_field_grid(shape: Sequence[int], affine: np.ndarray, fixed_shape: Sequence[int], fixed_affine: np.ndarray, what: str) -> None:
    """Raise :class:`ConversionError` unless a field lies on the fixed grid."""
    if tuple(int(s) for s in shape[:3]) != tuple(int(s) for s in fixed_shape[:3]):
        raise ConversionError(f"{what}: field shape {tuple(shape[:3])} differs from the fixed grid {tuple(fixed_shape[:3])}")
    if not np.allclose(np.asarray(affine, dtype=np.float64), np.asarray(fixed_affine, dtype=np.float64), atol=AFFINE_ATOL):
        raise ConversionError(f"{what}: field affine\n{np.round(affine, 4)}\ndiffers from the fixed image's\n{np.round(fixed_affine, 4)}")


# -- ANTs ----------------------------------------------------------------------------------


def ants_transforms_to_field(
    fixed_img: object,
    moving_img: object,
    transformlist: Sequence[str],
    workdir: str | os.PathLike[str],
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
) -> np.ndarray:
    """ANTs' forward transform list (``reg["fwdtransforms"]``) to one RAS-mm field on the fixed grid.

    The list (e.g. ``[1Warp.nii.gz, 0GenericAffine.mat]`` of ``SyNOnly``, whose affine is the
    identity; any affine stages compose the same way) is collapsed by ANTs itself
    (``antsApplyTransforms -o [composite.nii.gz,1]`` via ``ants.apply_transforms(compose=...)``)
    into a single displacement field in ITK's convention on the fixed grid, which is exactly
    our on-disk convention; we read it with nibabel and check its grid.
    """
    import ants

    prefix = str(Path(workdir) / "composed_")
    path = ants.apply_transforms(fixed=fixed_img, moving=moving_img, transformlist=list(transformlist), compose=prefix)
    if not isinstance(path, str) or not Path(path).is_file():
        raise ConversionError(f"ants.apply_transforms(compose=...) did not write a composite field (returned {path!r})")
    img: Any = nib.load(path)  # a Nifti1Image
    check_field_grid(img.shape, img.affine, fixed_shape, fixed_affine, "ANTs composite field")
    disp_ras, _ = load_displacement_itk(path)
    return disp_ras.astype(np.float32)


# -- FireANTs ------------------------------------------------------------------------------


def fireants_coords_to_field(
    coords: Tensor,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    moving_shape: Sequence[int],
    moving_affine: np.ndarray,
) -> np.ndarray:
    """FireANTs' ``reg.get_warped_coordinates(fixed, moving)`` to a RAS-mm field on the fixed grid.

    FireANTs holds an image as the SimpleITK array, i.e. spatial axes reversed relative to the
    NIfTI/nibabel array (``(k, j, i)``), and returns ``grid_sample`` coordinates
    ``(1, K, J, I, 3)`` normalized with ``align_corners=True`` *in the moving image's index
    space*; the last axis is ``(i, j, k)`` (grid_sample's x indexes the last array axis). So:
    transpose to ``(I, J, K, 3)``, un-normalize to moving voxels, map voxels to RAS millimetres
    with the moving and fixed NIfTI affines, subtract. Any affine FireANTs composed (its
    ``init_affine``) is already inside ``coords``.
    """
    ct = coords.detach().to("cpu", torch.float64)
    if ct.dim() != 5 or ct.shape[0] != 1 or ct.shape[-1] != 3:
        raise ConversionError(f"FireANTs coordinates must be (1, K, J, I, 3), got {tuple(ct.shape)}")
    c = ct[0].permute(2, 1, 0, 3).numpy()  # (I, J, K, 3), components (i, j, k)
    if tuple(c.shape[:3]) != tuple(int(s) for s in fixed_shape):
        raise ConversionError(f"FireANTs coordinates on grid {c.shape[:3]}, fixed grid is {tuple(fixed_shape)}")
    n_m = np.asarray([float(s) for s in moving_shape])
    moving_vox = (c + 1.0) * (n_m - 1.0) / 2.0
    fixed_vox = np.stack(np.meshgrid(*[np.arange(int(s), dtype=np.float64) for s in fixed_shape], indexing="ij"), axis=-1)
    disp = voxel_to_world(moving_vox, moving_affine) - voxel_to_world(fixed_vox, fixed_affine)
    return disp.astype(np.float32)


def max_displacement_mm(disp_ras_mm: np.ndarray) -> float:
    """Largest displacement length (mm), for log lines."""
    return float(np.linalg.norm(disp_ras_mm, axis=-1).max())
