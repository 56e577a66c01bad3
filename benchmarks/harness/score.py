"""The one evaluation path: any method's displacement field, scored by nir_lightning's metrics.

Every method (nir_lightning included) is scored here from its ``displacement.nii.gz`` (ITK/ANTs
convention, see :mod:`harness.convert`), never from the method's own warped outputs:

* the pair is loaded by ``nir_lightning.pair.load_pair`` (same grid handling, same labels list,
  same intensity scaling that defines the foreground mask ``nir_lightning.evaluate.foreground_mask``);
* the field (RAS mm) becomes a voxel displacement with the fixed affine, then nir_lightning's
  normalized ``phi``;
* moving labels are warped with **nearest neighbour** (``nir_lightning.warp.warp_image(mode="nearest")``,
  as ``nir register`` does) for Dice/HD95; additionally (``onehot=True``) with **trilinear
  interpolation of one-hot maps** + arg-max, the protocol of the issue's reference numbers;
* Dice (``dice_per_label``/``mean_dice``), HD95 (``hd95_per_label``, MONAI), det J
  (``jacobian_determinant`` on the voxel displacement, central differences) and folding
  (``folding``: det J <= 0 in the fixed foreground) are nir_lightning's own functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from harness.convert import check_field_grid, field_to_phi
from nir_lightning.evaluate import foreground_mask
from nir_lightning.io import load_displacement_itk
from nir_lightning.metrics import (
    dice_per_label,
    folding,
    hd95_per_label,
    jacobian_determinant,
    mean_dice,
)
from nir_lightning.pair import ImagePair, load_pair
from nir_lightning.warp import warp_image


@dataclass
class Scored:
    metrics: dict[str, Any]
    warped_labels: Tensor  # (X, Y, Z) int32, nearest neighbour
    det: Tensor  # (X, Y, Z)


def load_eval_pair(fixed: str, moving: str, fixed_labels: str, moving_labels: str, labels: str | None) -> ImagePair:
    """The pair as nir_lightning sees it (labels on the fixed grid, foreground from the fixed image)."""
    return load_pair(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, labels=labels)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@torch.no_grad()
def onehot_linear_labels(moving_labels: Tensor, phi: Tensor) -> Tensor:
    """Warp every label's indicator trilinearly and take the arg-max (ties keep the earlier label).

    Labels are processed one at a time (bounded memory); background 0 is a label too, so a voxel
    mapped outside the moving image gets 0.
    """
    ml = moving_labels[0, 0] if moving_labels.dim() == 5 else moving_labels
    best = torch.zeros(phi.shape[:3])
    out = torch.zeros(phi.shape[:3], dtype=torch.int32)
    for lab in torch.unique(ml).tolist():
        p = warp_image((ml == lab).float()[None, None], phi, mode="bilinear")[0, 0]
        take = p > best
        best = torch.where(take, p, best)
        out = torch.where(take, torch.tensor(int(lab), dtype=torch.int32), out)
    return out


@torch.no_grad()
def score_field(
    disp_ras_mm: np.ndarray,
    field_affine: np.ndarray,
    pair: ImagePair,
    *,
    hd95: bool = True,
    onehot: bool = True,
    native_labels: np.ndarray | None = None,
) -> Scored:
    """Score a RAS-mm field ``(X, Y, Z, 3)`` on the fixed grid of ``pair``.

    ``native_labels``: the method's *own* nearest-neighbour warp of the moving labels (ANTs'
    ``apply_transforms``, FireANTs' ``evaluate``, nir's ``warped_labels.nii.gz``), compared
    voxel-wise with ours as a run-time check of the conversion (``native_label_agreement``).
    """
    if not pair.has_labels:
        raise ValueError("scoring needs fixed and moving label maps")
    assert pair.fixed_labels is not None and pair.moving_labels is not None
    check_field_grid(disp_ras_mm.shape, field_affine, pair.shape, pair.fixed_affine, "displacement")
    phi, disp_vox = field_to_phi(disp_ras_mm, pair.fixed_affine)
    det = jacobian_determinant(disp_vox)
    fg = foreground_mask(pair)
    count, percent = folding(det, fg)
    fixed_labels = pair.fixed_labels[0, 0].cpu()
    moving_labels = pair.moving_labels[0, 0].cpu()
    warped = warp_image(moving_labels.float()[None, None], phi, mode="nearest")[0, 0].round().to(torch.int32)
    before = dice_per_label(moving_labels, fixed_labels, pair.labels)
    after = dice_per_label(warped, fixed_labels, pair.labels)
    m: dict[str, Any] = {
        "labels": list(pair.labels),
        "dice_before": mean_dice(before),
        "dice": mean_dice(after),
        "dice_per_label": {str(k): _nan_to_none(v) for k, v in after.items()},
        "folding_count": count,
        "folding_percent": percent,
        "jacobian_det_min": float(det[fg].min()) if bool(fg.any()) else float(det.min()),
        "foreground_voxels": int(fg.sum()),
        "displacement_mean_mm": float(np.linalg.norm(disp_ras_mm[fg.numpy()], axis=-1).mean()) if bool(fg.any()) else 0.0,
        "label_interpolation": "nearest",
    }
    if hd95:
        hd = hd95_per_label(warped, fixed_labels, pair.labels, spacing=pair.spacing)
        m["hd95"] = float(np.nanmean(list(hd.values()))) if any(not math.isnan(v) for v in hd.values()) else float("nan")
        m["hd95_per_label"] = {str(k): _nan_to_none(v) for k, v in hd.items()}
    if onehot:
        lin = onehot_linear_labels(moving_labels, phi)
        per = dice_per_label(lin, fixed_labels, pair.labels)
        m["dice_onehot_linear"] = mean_dice(per)
        m["dice_onehot_linear_per_label"] = {str(k): _nan_to_none(v) for k, v in per.items()}
    if native_labels is not None:
        nat = torch.as_tensor(np.asarray(native_labels)).round().to(torch.int32)
        if tuple(nat.shape) != tuple(warped.shape):
            raise ValueError(f"native warped labels have shape {tuple(nat.shape)}, expected {tuple(warped.shape)}")
        m["native_label_agreement"] = float((nat == warped)[fg].float().mean()) if bool(fg.any()) else float((nat == warped).float().mean())
        m["dice_native"] = mean_dice(dice_per_label(nat, fixed_labels, pair.labels))
    return Scored(metrics=m, warped_labels=warped, det=det)


def load_field(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A ``displacement.nii.gz`` (ITK convention) as RAS mm ``(X, Y, Z, 3)`` and its affine."""
    disp, aff = load_displacement_itk(path)
    return np.asarray(disp, dtype=np.float32), np.asarray(aff, dtype=np.float64)


def load_labels(path: str) -> np.ndarray:
    arr = np.asarray(nib.load(path).dataobj)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr
