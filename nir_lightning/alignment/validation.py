"""Checks of :class:`~nir_lightning.alignment.stage.AffineStage`: its options, and the images, masks
and affines given to ``fit`` (each failure an :class:`~nir_lightning.errors.InputError` naming the
parameter and the fix)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from nir_lightning.errors import InputError

__all__ = ["OWNER", "check_affine", "check_inputs", "check_stage_options", "is_int"]

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


def check_stage_options(stage: Any) -> None:
    """Raise for the first option of the (frozen dataclass) ``stage`` out of range; its lists become tuples."""

    def bad(param: str, message: str) -> InputError:
        value = getattr(stage, param)
        return InputError(f"{OWNER}.{param} {message}", owner=OWNER, param=param, value=value)

    choices = {"kind": ("none", "rigid", "affine"), "init": ("none", "com", "moments"), "similarity": ("mi", "ncc")}
    for param, allowed in choices.items():
        if getattr(stage, param) not in allowed:
            listed = ", ".join(repr(a) for a in allowed)
            raise bad(param, f"must be one of {listed}, got {getattr(stage, param)!r}.")
    if not is_int(stage.num_bins) or stage.num_bins < 4:
        raise bad("num_bins", f"must be an integer >= 4, got {stage.num_bins!r}; 32 bins suit images scaled to [0, 1].")
    for param in ("shrink_factors", "rigid_iterations", "affine_iterations"):
        value = getattr(stage, param)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
            raise bad(param, f"must be a non-empty list of integers, got {value!r}.")
        if not all(is_int(v) for v in value):
            raise bad(param, f"must be a list of integers, got {value!r}.")
        object.__setattr__(stage, param, tuple(int(v) for v in value))
    if any(s < 1 for s in stage.shrink_factors):
        raise bad("shrink_factors", f"must all be >= 1 (1 = the fixed image's voxel size), got {list(stage.shrink_factors)}; e.g. [4, 2, 1].")
    for param in ("rigid_iterations", "affine_iterations"):
        value = getattr(stage, param)
        if len(value) != len(stage.shrink_factors):
            raise bad(param, f"needs one entry per shrink factor ({len(stage.shrink_factors)}: {list(stage.shrink_factors)}), got {list(value)}.")
        if any(v < 0 for v in value):
            raise bad(param, f"must all be >= 0, got {list(value)}.")
    if not is_int(stage.num_points) or stage.num_points < 64:
        raise bad("num_points", f"must be an integer >= 64, got {stage.num_points!r}; e.g. 8192 points per step.")
    if isinstance(stage.margin, bool) or not isinstance(stage.margin, (int, float)) or not 0 <= stage.margin < math.inf:
        raise bad("margin", f"must be a number of millimetres >= 0, got {stage.margin!r}; e.g. 10.")
    if isinstance(stage.lr, bool) or not isinstance(stage.lr, (int, float)) or not math.isfinite(stage.lr) or not 0 < stage.lr <= 1:
        raise bad("lr", f"must be a number in (0, 1], got {stage.lr!r}; e.g. 0.02.")
    if not is_int(stage.seed):
        raise bad("seed", f"must be an integer, got {stage.seed!r}.")
    if not isinstance(stage.early_stop, bool):
        raise bad("early_stop", f"must be true or false, got {stage.early_stop!r}.")
