"""Checks of :class:`~nir_lightning.alignment.stage.AffineStage`'s inputs: the images, masks and
affines given to ``fit`` (each failure an :class:`~nir_lightning.errors.InputError` naming the
parameter and the fix)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from nir_lightning.errors import InputError

__all__ = ["OWNER", "check_affine", "check_inputs", "is_int"]

OWNER = "AffineStage"


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_affine(affine: np.ndarray, param: str) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise InputError(f"{OWNER}.fit: {param} must be a finite, invertible 4x4 NIfTI affine, got {a.tolist()}.", owner=OWNER, param=param, value=affine)
    return a


def check_inputs(
    fixed: Tensor,
    fixed_affine: np.ndarray,
    moving: Tensor,
    moving_affine: np.ndarray,
    fixed_mask: Tensor | None,
    moving_mask: Tensor | None,
) -> tuple[np.ndarray, np.ndarray]:
    for param, image, mask in (("fixed", fixed, fixed_mask), ("moving", moving, moving_mask)):
        if image.dim() != 5 or image.shape[:2] != (1, 1) or not image.is_floating_point():
            raise InputError(f"{OWNER}.fit: {param} must be a float tensor (1, 1, D0, D1, D2), got {image.dtype} {tuple(image.shape)}.", owner=OWNER, param=param, value=tuple(image.shape))
        if float(image.detach().max()) <= 0:
            raise InputError(f"{OWNER}.fit: {param} has no positive intensity; is it empty?", owner=OWNER, param=param)
        if mask is not None:
            if tuple(mask.shape) != tuple(image.shape[2:]):
                raise InputError(f"{OWNER}.fit: {param}_mask must have the {param} image's shape {tuple(image.shape[2:])}, got {tuple(mask.shape)}.", owner=OWNER, param=f"{param}_mask", value=tuple(mask.shape))
            if not bool(mask.any()):
                raise InputError(f"{OWNER}.fit: {param}_mask is empty.", owner=OWNER, param=f"{param}_mask")
    return check_affine(fixed_affine, "fixed_affine"), check_affine(moving_affine, "moving_affine")
