"""Registration metrics: Dice, HD95, Jacobian determinants and folding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from nir_lightning.core.jacobian import jacobian_determinant

__all__ = ["dice_per_label", "folding", "hd95_per_label", "jacobian_determinant", "mean_dice"]


def dice_per_label(
    prediction: np.ndarray | Tensor, target: np.ndarray | Tensor, labels: Sequence[int]
) -> dict[int, float]:
    """Dice of each label between two integer label maps of the same shape.

    A label absent from both maps gets NaN (it is not evidence either way).

    >>> a = np.array([0, 1, 1, 2]); b = np.array([0, 1, 2, 2])
    >>> dice_per_label(a, b, [1, 2])
    {1: 0.6666666666666666, 2: 0.6666666666666666}
    """
    p = torch.as_tensor(np.asarray(prediction)).reshape(-1)
    t = torch.as_tensor(np.asarray(target)).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"label maps differ in size: {tuple(p.shape)} vs {tuple(t.shape)}")
    out: dict[int, float] = {}
    for lab in labels:
        pm, tm = p == lab, t == lab
        denom = int(pm.sum()) + int(tm.sum())
        out[int(lab)] = float("nan") if denom == 0 else 2.0 * int((pm & tm).sum()) / denom
    return out


def mean_dice(per_label: dict[int, float]) -> float:
    """Mean over labels, ignoring NaN entries."""
    vals = [v for v in per_label.values() if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def hd95_per_label(
    prediction: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    labels: Sequence[int],
    *,
    spacing: Sequence[float],
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance (mm) per label, via MONAI.

    NaN where the label is missing from either map.
    """
    from monai.metrics import compute_hausdorff_distance

    p = torch.as_tensor(np.asarray(prediction))
    t = torch.as_tensor(np.asarray(target))
    out: dict[int, float] = {}
    for lab in labels:
        pm, tm = p == lab, t == lab
        if not bool(pm.any()) or not bool(tm.any()):
            out[int(lab)] = float("nan")
            continue
        hd = compute_hausdorff_distance(
            pm[None, None], tm[None, None], percentile=95, spacing=list(spacing)
        )
        out[int(lab)] = float(hd.item())
    return out


def folding(det: Tensor, mask: Tensor | None = None) -> tuple[int, float]:
    """Count and percentage of voxels with ``det <= 0`` (inside ``mask`` when given).

    >>> folding(torch.tensor([1.0, -1.0, 0.0, 2.0]))
    (2, 50.0)
    """
    vals = det[mask] if mask is not None else det.reshape(-1)
    if vals.numel() == 0:
        return 0, 0.0
    count = int((vals <= 0).sum())
    return count, 100.0 * count / vals.numel()
