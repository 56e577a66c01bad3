"""Dense evaluation of a fitted field: warped images, world-space displacement, metrics.

Plain PyTorch/numpy; the Lightning predict step and ``nir register`` both call these.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nir_lightning.coords import voxel_displacement_to_world
from nir_lightning.fields import NeuralField
from nir_lightning.io import save_displacement_itk, save_nifti, write_text_atomic
from nir_lightning.metrics import (
    dice_per_label,
    folding,
    hd95_per_label,
    jacobian_determinant,
    mean_dice,
)
from nir_lightning.pair import ImagePair
from nir_lightning.warp import dense_field, normalized_to_voxel_displacement, warp_image

OUTPUT_FILES = (
    "warped.nii.gz",
    "warped_labels.nii.gz",
    "displacement.nii.gz",
    "jacobian_det.nii.gz",
    "metrics.json",
)


@dataclass
class Registration:
    """Dense results on the fixed grid (CPU tensors).

    Attributes:
        phi: ``(D0, D1, D2, 3)`` normalized moving-image coordinates of each fixed voxel.
        disp_vox: ``(D0, D1, D2, 3)`` displacement in voxels (array-axis order).
        det: ``(D0, D1, D2)`` Jacobian determinant of ``phi``.
        warped: ``(D0, D1, D2)`` moving image (original intensities) resampled by ``phi``.
        warped_labels: ``(D0, D1, D2)`` int32 moving labels (nearest), or ``None``.
        metrics: JSON-ready numbers.
    """

    phi: Tensor
    disp_vox: Tensor
    det: Tensor
    warped: Tensor
    warped_labels: Tensor | None
    metrics: dict[str, Any] = field(default_factory=dict)


def foreground_mask(pair: ImagePair) -> Tensor:
    """Fixed-image foreground ``(D0, D1, D2)``: voxels above 1 % of the scaled intensity range."""
    return pair.fixed[0, 0].cpu() > 0.01


def _finite_or_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


@torch.no_grad()
def evaluate(
    field_: NeuralField,
    pair: ImagePair,
    *,
    max_points: int = 2**18,
    hd95: bool = True,
) -> Registration:
    """Evaluate ``field_`` densely on ``pair``'s fixed grid and score it."""
    shape = pair.shape
    phi = dense_field(field_, shape, max_points=max_points).cpu()
    if not bool(torch.isfinite(phi).all()):
        raise FloatingPointError("the fitted field has non-finite values; refusing to write it (lower the learning rate or check the inputs).")
    disp = normalized_to_voxel_displacement(phi, shape)
    det = jacobian_determinant(disp)
    warped = warp_image(pair.moving_raw.cpu(), phi)[0, 0]
    fg = foreground_mask(pair)
    count, percent = folding(det, fg)
    metrics: dict[str, Any] = {
        "folding_count": count,
        "folding_percent": percent,
        "jacobian_det_min": float(det[fg].min()) if bool(fg.any()) else float(det.min()),
        "jacobian_det_std": float(det[fg].std()) if bool(fg.any()) else float(det.std()),
        "foreground_voxels": int(fg.sum()),
        "displacement_mean_mm": float(
            np.linalg.norm(voxel_displacement_to_world(disp[fg].numpy(), pair.fixed_affine), axis=-1).mean()
        ) if bool(fg.any()) else 0.0,
    }
    if pair.reference_disp_vox is not None:
        true = pair.reference_disp_vox.cpu()
        metrics["epe_before_vox"] = float(true[fg].norm(dim=-1).mean())
        metrics["epe_after_vox"] = float((disp - true)[fg].norm(dim=-1).mean())
    warped_labels = None
    if pair.has_labels:
        assert pair.fixed_labels is not None and pair.moving_labels is not None
        warped_labels = warp_image(pair.moving_labels.float().cpu(), phi, mode="nearest")[0, 0].round().to(torch.int32)
        fixed_labels = pair.fixed_labels[0, 0].cpu()
        moving_labels = pair.moving_labels[0, 0].cpu()
        before = dice_per_label(moving_labels, fixed_labels, pair.labels)
        after = dice_per_label(warped_labels, fixed_labels, pair.labels)
        metrics.update(
            labels=list(pair.labels),
            dice_before=mean_dice(before),
            dice_after=mean_dice(after),
            dice_per_label={str(k): _finite_or_none(v) for k, v in after.items()},
            dice_per_label_before={str(k): _finite_or_none(v) for k, v in before.items()},
        )
        if hd95:
            hd_after = hd95_per_label(warped_labels, fixed_labels, pair.labels, spacing=pair.spacing)
            hd_before = hd95_per_label(moving_labels, fixed_labels, pair.labels, spacing=pair.spacing)
            metrics.update(
                hd95_before=float(np.nanmean(list(hd_before.values()))),
                hd95_after=float(np.nanmean(list(hd_after.values()))),
                hd95_per_label={str(k): _finite_or_none(v) for k, v in hd_after.items()},
            )
    return Registration(phi=phi, disp_vox=disp, det=det, warped=warped, warped_labels=warped_labels, metrics=metrics)


def displacement_world(reg: Registration, affine: np.ndarray) -> np.ndarray:
    """The displacement as RAS millimetres ``(D0, D1, D2, 3)``."""
    return voxel_displacement_to_world(reg.disp_vox.numpy(), affine).astype(np.float32)


def write_outputs(reg: Registration, pair: ImagePair, output_dir: str | Path, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the NIfTI outputs (fixed affine) and ``metrics.json`` atomically; returns the metrics."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    aff = pair.fixed_affine
    save_nifti(reg.warped.numpy().astype(np.float32), aff, out / "warped.nii.gz")
    if reg.warped_labels is not None:
        save_nifti(reg.warped_labels.numpy(), aff, out / "warped_labels.nii.gz")
    save_displacement_itk(displacement_world(reg, aff), aff, out / "displacement.nii.gz")
    save_nifti(reg.det.numpy().astype(np.float32), aff, out / "jacobian_det.nii.gz")
    metrics = dict(reg.metrics)
    if pair.notes:
        metrics["notes"] = list(pair.notes)
    metrics.update(extra or {})
    write_metrics(out / "metrics.json", metrics)
    return metrics


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """JSON with NaN/Inf written as ``null`` (strict JSON readers reject NaN)."""
    text = json.dumps(_sanitize(metrics), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    write_text_atomic(path, text + "\n")


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_default(obj: object) -> object:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return _finite_or_none(float(obj))
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
