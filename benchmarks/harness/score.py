"""The one evaluation path: any method's displacement field, scored by nir_lightning's metrics.

Every method (nir_lightning included) is scored here from its ``displacement.nii.gz`` (ITK/ANTs
convention, see :mod:`harness.convert`), never from the method's own warped outputs:

* the pair is loaded by ``nir_lightning.data.pair.load_pair`` (same grid handling, same labels list,
  same intensity scaling that defines the foreground mask ``nir_lightning.data.pair.ImagePair.foreground_mask``);
* the field (RAS mm) becomes a voxel displacement with the fixed affine, then nir_lightning's
  normalized ``phi``;
* ``phi`` is scored by ``nir_lightning.evaluation.scoring.score_transform``, the functions
  ``nir register`` writes ``metrics.json`` with, under the same key names: moving labels warped
  with **nearest neighbour** for ``dice_after`` / ``hd95_after`` (per label:
  ``dice_per_label``, ``hd95_per_label``; before registration: ``dice_before``,
  ``hd95_before``), ``folding_count`` / ``folding_percent`` (central-difference det J <= 0 in
  the fixed foreground), ``jacobian_det_min``, ``sdlogj`` (standard deviation of log det J in
  that foreground, det J clipped at 1e-9 as in Learn2Reg: ``score_deformation``'s, so it is the
  number ``metrics.json`` of ``nir register`` reports), ``displacement_mean_mm``; additionally
  (``onehot=True``) ``dice_onehot_linear``: **trilinear interpolation of one-hot maps** +
  arg-max, the protocol of the issue's reference numbers.

Harness-only keys: ``label_interpolation`` and, given the method's own warp of the labels,
``native_label_agreement`` and ``dice_native`` (a check of the conversion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch

from harness.convert import check_field_grid, field_to_phi
from nir_lightning.core.transform_chain import DisplacementStep, ResampleMode, Step, resample
from nir_lightning.data.pair import ImagePair, load_pair
from nir_lightning.evaluation.metrics import dice_per_label, mean_dice
from nir_lightning.evaluation.scoring import ScoredTransform, score_labels, score_transform
from nir_lightning.io import load_displacement_itk

__all__ = ["load_eval_pair", "load_field", "load_labels", "moving_labels_through", "score_field"]


def load_eval_pair(fixed: str, moving: str, fixed_labels: str, moving_labels: str, labels: str | None) -> ImagePair:
    """The pair as nir_lightning sees it (labels on the fixed grid, foreground from the fixed image),
    with the moving labels also on their own grid: a moving image on another grid is scored from
    there, through the method's field, with one interpolation (as ``antsApplyTransforms`` would)."""
    return load_pair(
        fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, labels=labels, keep_native=True
    )


def _on_fixed_grid(pair: ImagePair) -> bool:
    nat = pair.native
    return nat is None or (nat.shape == pair.shape and np.allclose(nat.affine, pair.fixed_affine, atol=1e-4))


@torch.no_grad()
def score_field(
    disp_ras_mm: np.ndarray,
    field_affine: np.ndarray,
    pair: ImagePair,
    *,
    hd95: bool = True,
    onehot: bool = True,
    native_labels: np.ndarray | None = None,
) -> ScoredTransform:
    """Score a RAS-mm field ``(X, Y, Z, 3)`` on the fixed grid of ``pair``.

    ``native_labels``: the method's *own* nearest-neighbour warp of the moving labels (ANTs'
    ``apply_transforms``, FireANTs' ``evaluate``, nir's ``warped_labels.nii.gz``), compared
    voxel-wise with ours as a run-time check of the conversion (``native_label_agreement``).
    """
    if not pair.has_labels:
        raise ValueError("scoring needs fixed and moving label maps")
    assert pair.fixed_labels is not None
    check_field_grid(disp_ras_mm.shape, field_affine, pair.shape, pair.fixed_affine, "displacement")
    phi, disp_vox = field_to_phi(disp_ras_mm, pair.fixed_affine)
    scored = score_transform(phi, pair, disp_vox=disp_vox, hd95=hd95, onehot=onehot)
    if not _on_fixed_grid(pair):
        # the moving labels from their own grid through the field, nearest neighbour (and label
        # interpolation for the one-hot column): one interpolation, not two
        assert pair.native is not None and pair.native.labels is not None
        steps = [DisplacementStep(disp_ras_mm=np.asarray(disp_ras_mm, dtype=np.float32), affine=field_affine)]
        before = through_identity(pair)
        scored.warped_labels = moving_labels_through(pair, steps, "nearest")
        scored.metrics.update(score_labels(scored.warped_labels, pair, hd95=hd95, before=before))
        if onehot:
            assert pair.fixed_labels is not None
            per = dice_per_label(moving_labels_through(pair, steps, "label"), pair.fixed_labels[0, 0].cpu(), pair.labels)
            scored.metrics["dice_onehot_linear"] = mean_dice(per)
    warped = scored.warped_labels
    assert warped is not None
    m = scored.metrics
    m["label_interpolation"] = "nearest"
    if native_labels is not None:
        fg = pair.foreground_mask()
        nat = torch.as_tensor(np.asarray(native_labels)).round().to(torch.int32)
        if tuple(nat.shape) != tuple(warped.shape):
            raise ValueError(f"native warped labels have shape {tuple(nat.shape)}, expected {tuple(warped.shape)}")
        same = (nat == warped)[fg] if bool(fg.any()) else (nat == warped)
        m["native_label_agreement"] = float(same.float().mean())
        m["dice_native"] = mean_dice(dice_per_label(nat, pair.fixed_labels[0, 0].cpu(), pair.labels))
    return scored


def moving_labels_through(pair: ImagePair, chain: Sequence[Step], mode: ResampleMode) -> torch.Tensor:
    """The moving labels on the fixed grid through ``chain``, with one interpolation: from their own
    grid where the pair kept it (``pair.native``), else from the fixed grid they were loaded onto."""
    if pair.native is not None and pair.native.labels is not None:
        src, affine = pair.native.labels[0].float(), pair.native.affine
    else:
        assert pair.moving_labels is not None
        src, affine = pair.moving_labels[0].float(), pair.fixed_affine
    return resample(src, affine, pair.shape, pair.fixed_affine, chain, mode=mode)[0].round().to(torch.int32)


def through_identity(pair: ImagePair) -> torch.Tensor:
    """The native moving labels on the fixed grid as the headers place them (nearest neighbour)."""
    assert pair.native is not None and pair.native.labels is not None
    return moving_labels_through(pair, [], "nearest")


def load_field(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A ``displacement.nii.gz`` (ITK convention) as RAS mm ``(X, Y, Z, 3)`` and its affine."""
    disp, aff = load_displacement_itk(path)
    return np.asarray(disp, dtype=np.float32), np.asarray(aff, dtype=np.float64)


def load_labels(path: str) -> np.ndarray:
    """A label map as an array, trailing singleton axes dropped."""
    img: Any = nib.load(path)  # a Nifti1Image
    arr = np.asarray(img.dataobj)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr
