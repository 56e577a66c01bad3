"""Score a dense transform against a pair: the one set of metric functions and key names.

:func:`~nir_lightning.evaluation.evaluate.evaluate` (so ``metrics.json`` of ``nir register``)
and the benchmark harness (``benchmarks/harness/score.py``, which scores every method's
displacement field, nir_lightning's included) both call these, so a key means the same number
wherever it appears:

* labels (:func:`score_labels`, its part before registration :func:`score_before`): ``labels``, ``dice_before``, ``dice_after``,
  ``dice_per_label``, ``dice_per_label_before`` and, with ``hd95``, ``hd95_before``,
  ``hd95_after``, ``hd95_per_label``; moving labels warped with nearest neighbour
  (:func:`warp_labels_nearest`);
* the deformation (:func:`score_deformation`): ``folding_count``, ``folding_percent``
  (det J <= 0 in the fixed foreground, :meth:`~nir_lightning.data.pair.ImagePair.foreground_mask`),
  ``jacobian_det_min``, ``jacobian_det_std``, ``sdlogj``, ``foreground_voxels``, ``displacement_mean_mm``;
* optionally (:func:`score_onehot_linear`) ``dice_onehot_linear`` and
  ``dice_onehot_linear_per_label``: each label's indicator warped trilinearly, then arg-max.

Per-label dicts have string keys and ``None`` for NaN (:func:`nir_lightning.io.finite_or_none`),
ready for strict JSON. Plain torch/numpy: no Lightning, no field; the transform is given densely
as ``phi`` ``(D0, D1, D2, 3)`` (normalized moving coordinates of every fixed voxel, CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nir_lightning.coords import normalized_to_voxel_displacement, voxel_displacement_to_world
from nir_lightning.core.chunked import DEFAULT_MAX_POINTS
from nir_lightning.core.jacobian import chunked_jacobian_determinant
from nir_lightning.core.resample import warp_image
from nir_lightning.data.pair import ImagePair
from nir_lightning.evaluation.metrics import dice_per_label, folding, hd95_per_label, mean_dice, mean_over_labels
from nir_lightning.io import finite_or_none

__all__ = [
    "ScoredTransform",
    "onehot_linear_labels",
    "score_before",
    "score_deformation",
    "score_labels",
    "score_onehot_linear",
    "score_transform",
    "warp_labels_nearest",
]


@dataclass
class ScoredTransform:
    """What :func:`score_transform` returns.

    Attributes:
        metrics: the package's metric keys (see the module docstring).
        det: ``(D0, D1, D2)`` Jacobian determinant of the transform (central differences).
        warped_labels: ``(D0, D1, D2)`` int32 moving labels warped with nearest neighbour, or
            ``None`` without label maps.
    """

    metrics: dict[str, Any]
    det: Tensor
    warped_labels: Tensor | None


def _labels_of(pair: ImagePair) -> tuple[Tensor, Tensor]:
    if pair.fixed_labels is None or pair.moving_labels is None:
        raise ValueError("scoring labels needs the fixed and the moving label maps")
    return pair.fixed_labels[0, 0].cpu(), pair.moving_labels[0, 0].cpu()


@torch.no_grad()
def warp_labels_nearest(pair: ImagePair, phi: Tensor) -> Tensor:
    """``pair``'s moving labels resampled by ``phi`` with nearest neighbour: ``(D0, D1, D2)`` int32
    (0 outside the moving image)."""
    if pair.moving_labels is None:
        raise ValueError("warping labels needs the moving label map")
    return warp_image(pair.moving_labels.float().cpu(), phi, mode="nearest")[0, 0].round().to(torch.int32)


@torch.no_grad()
def score_before(before: Tensor, pair: ImagePair, *, hd95: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Dice (and HD95) of the moving labels before registration, ``before`` ``(D0, D1, D2)`` on the
    fixed grid, against the fixed labels: ``dice_before``, ``dice_per_label_before`` and, with
    ``hd95``, ``hd95_before`` (the values :func:`score_labels` reports; ``workers``: threads of
    HD95's KD-tree queries, as in :func:`~nir_lightning.evaluation.metrics.hd95_per_label`).

    >>> import torch
    >>> from nir_lightning.data.pair import ImagePair
    >>> lab = torch.zeros(1, 1, 6, 6, 6, dtype=torch.int32); lab[..., 1:4, 1:4, 1:4] = 1
    >>> pair = ImagePair(fixed=lab.float(), moving=lab.float(), moving_raw=lab.float(), fixed_affine=np.eye(4),
    ...                  fixed_labels=lab, moving_labels=lab, labels=[1])
    >>> score_before(lab[0, 0], pair)
    {'dice_before': 1.0, 'dice_per_label_before': {'1': 1.0}, 'hd95_before': 0.0}
    """
    fixed_labels, _ = _labels_of(pair)
    dice = dice_per_label(before.cpu(), fixed_labels, pair.labels)
    out: dict[str, Any] = {
        "dice_before": mean_dice(dice),
        "dice_per_label_before": {str(k): finite_or_none(v) for k, v in dice.items()},
    }
    if hd95:
        hd = hd95_per_label(before.cpu(), fixed_labels, pair.labels, spacing=pair.spacing, workers=workers)
        out["hd95_before"] = mean_over_labels(hd)
    return out


def score_labels(
    warped_labels: Tensor,
    pair: ImagePair,
    *,
    hd95: bool = True,
    before: Tensor | None = None,
    before_scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Dice (and HD95) of the warped moving labels against the fixed labels, and before registration.

    ``before``: the moving labels on the fixed grid as the headers place them ``(D0, D1, D2)``;
    by default ``pair.moving_labels`` (which an affine stage has already aligned).
    ``before_scores``: :func:`score_before` of them, when already computed (then ``before`` is
    not read).

    Dice is averaged over ``pair.labels`` ignoring labels absent from both maps (NaN); HD95
    (mm, MONAI) is the NaN-ignoring mean over the labels present in both maps.

    Returns:
        ``labels``, ``dice_before``, ``dice_after``, ``dice_per_label`` (after),
        ``dice_per_label_before`` and, with ``hd95``, ``hd95_before``, ``hd95_after``,
        ``hd95_per_label`` (after).
    """
    fixed_labels, moving_labels = _labels_of(pair)
    if before_scores is None or (hd95 and "hd95_before" not in before_scores):
        before_scores = score_before(moving_labels if before is None else before, pair, hd95=hd95)
    after = dice_per_label(warped_labels, fixed_labels, pair.labels)
    metrics: dict[str, Any] = {
        "labels": list(pair.labels),
        "dice_before": before_scores["dice_before"],
        "dice_after": mean_dice(after),
        "dice_per_label": {str(k): finite_or_none(v) for k, v in after.items()},
        "dice_per_label_before": before_scores["dice_per_label_before"],
    }
    if hd95:
        hd_after = hd95_per_label(warped_labels, fixed_labels, pair.labels, spacing=pair.spacing)
        metrics.update(
            hd95_before=before_scores["hd95_before"],
            hd95_after=mean_over_labels(hd_after),
            hd95_per_label={str(k): finite_or_none(v) for k, v in hd_after.items()},
        )
    return metrics


@torch.no_grad()
def score_deformation(det: Tensor, disp_vox: Tensor, pair: ImagePair) -> dict[str, Any]:
    """Folding and size of a transform, in the fixed foreground (the whole grid if it is empty).

    Args:
        det: ``(D0, D1, D2)`` Jacobian determinant.
        disp_vox: ``(D0, D1, D2, 3)`` displacement in fixed voxels (CPU).
        pair: gives the foreground and the fixed affine (for millimetres).

    Returns:
        ``folding_count`` / ``folding_percent`` (det J <= 0), ``jacobian_det_min``,
        ``jacobian_det_std``, ``sdlogj`` (standard deviation of ``log det J``, det J clipped
        at 1e-9 as in Learn2Reg), ``foreground_voxels``, ``displacement_mean_mm``.
    """
    fg = pair.foreground_mask()
    any_fg = bool(fg.any())
    sel = det[fg] if any_fg else det.reshape(-1)  # selected once: the same elements in the same order for each number
    count, percent = folding(sel) if any_fg else (0, 0.0)
    return {
        "sdlogj": float(sel.double().clamp_(min=1e-9).log_().std()),  # in place: one float64 copy of the foreground
        "folding_count": count,
        "folding_percent": percent,
        "jacobian_det_min": float(sel.min()),
        "jacobian_det_std": float(sel.std()),
        "foreground_voxels": int(fg.sum()),
        "displacement_mean_mm": _mean_norm_mm(disp_vox[fg], pair.fixed_affine) if any_fg else 0.0,
    }


def _mean_norm_mm(disp_vox: Tensor, affine: np.ndarray, chunk: int = 1 << 18) -> float:
    """Mean length in mm of the voxel displacements ``disp_vox`` ``(P, 3)``: each length as
    ``np.linalg.norm`` of its world vector, the mean over all of them at once (the numbers of
    one whole-array pass), converting ``chunk`` rows at a time: the float64 copies of a 1 mm
    brain's foreground were this scoring's peak memory."""
    lengths = np.empty(int(disp_vox.shape[0]), dtype=np.float64)
    for start in range(0, lengths.size, chunk):
        rows = disp_vox[start : start + chunk].numpy()
        lengths[start : start + chunk] = np.linalg.norm(voxel_displacement_to_world(rows, affine), axis=-1)
    return float(lengths.mean())


@torch.no_grad()
def onehot_linear_labels(moving_labels: Tensor, phi: Tensor) -> Tensor:
    """Warp every label's indicator trilinearly and take the arg-max (ties keep the earlier label).

    ``moving_labels`` is ``(D0, D1, D2)`` or ``(1, 1, D0, D1, D2)``. Labels are processed one at
    a time (bounded memory); background 0 is a label too, so a voxel mapped outside the moving
    image gets 0. Returns ``(D0, D1, D2)`` int32 on ``phi``'s grid.
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
def score_onehot_linear(pair: ImagePair, phi: Tensor) -> dict[str, Any]:
    """Dice with the moving labels warped by :func:`onehot_linear_labels` instead of nearest
    neighbour (the label interpolation ANTs and FireANTs results are often quoted with).

    Returns:
        ``dice_onehot_linear`` (mean) and ``dice_onehot_linear_per_label``.
    """
    fixed_labels, moving_labels = _labels_of(pair)
    per = dice_per_label(onehot_linear_labels(moving_labels, phi), fixed_labels, pair.labels)
    return {
        "dice_onehot_linear": mean_dice(per),
        "dice_onehot_linear_per_label": {str(k): finite_or_none(v) for k, v in per.items()},
    }


@torch.no_grad()
def score_transform(
    phi: Tensor,
    pair: ImagePair,
    *,
    disp_vox: Tensor | None = None,
    hd95: bool = True,
    onehot: bool = False,
    max_points: int = DEFAULT_MAX_POINTS,
) -> ScoredTransform:
    """Score the dense transform ``phi`` ``(D0, D1, D2, 3)`` (normalized, on ``pair``'s fixed grid).

    The metrics of :func:`score_deformation` and, when the pair has label maps, of
    :func:`score_labels` (moving labels warped by :func:`warp_labels_nearest`) and, with
    ``onehot``, of :func:`score_onehot_linear`. det J is taken slab by slab (``max_points``
    voxels at a time) by central differences, as in :func:`~nir_lightning.evaluation.evaluate.evaluate`.
    ``disp_vox``: the same transform as a displacement in fixed voxels ``(D0, D1, D2, 3)``
    when the caller has it exactly (e.g. converted from a field file); by default it is
    derived from ``phi``.

    >>> from nir_lightning.coords import identity_grid
    >>> lab = torch.zeros(1, 1, 6, 6, 6, dtype=torch.int32); lab[..., 1:4, 1:4, 1:4] = 1
    >>> pair = ImagePair(fixed=lab.float(), moving=lab.float(), moving_raw=lab.float(), fixed_affine=np.eye(4),
    ...                  fixed_labels=lab, moving_labels=lab, labels=[1])
    >>> m = score_transform(identity_grid((6, 6, 6)), pair, hd95=False, onehot=True).metrics
    >>> m["dice_before"], m["dice_after"], m["dice_onehot_linear"], m["folding_count"], m["foreground_voxels"]
    (1.0, 1.0, 1.0, 0, 27)
    """
    phi = phi.cpu()
    if tuple(phi.shape) != (*pair.shape, 3):
        raise ValueError(f"phi has shape {tuple(phi.shape)}, expected {(*pair.shape, 3)} (the fixed grid)")
    disp = normalized_to_voxel_displacement(phi, pair.shape) if disp_vox is None else disp_vox.cpu()
    if tuple(disp.shape) != tuple(phi.shape):
        raise ValueError(f"disp_vox has shape {tuple(disp.shape)}, expected {tuple(phi.shape)}")
    det = chunked_jacobian_determinant(disp, max_points=max_points)
    metrics = score_deformation(det, disp, pair)
    warped_labels = None
    if pair.has_labels:
        warped_labels = warp_labels_nearest(pair, phi)
        metrics.update(score_labels(warped_labels, pair, hd95=hd95))
        if onehot:
            metrics.update(score_onehot_linear(pair, phi))
    return ScoredTransform(metrics=metrics, det=det, warped_labels=warped_labels)
