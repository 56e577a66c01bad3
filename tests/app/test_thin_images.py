"""Thin volumes (a few slices) and tiny ones register instead of failing with a NaN loss.

A lattice with one point along an axis (3 slices at the coarse stride 3-4) has no forward
difference along it, so it has no det J of its own; the folding barrier once took the mean over
no cells (NaN) and the fit stopped with "non-finite loss ... lower model.lr", which named the
wrong cause.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nir_lightning.app.register import register_pair
from nir_lightning.losses.folding import FoldingPenalty
from nir_lightning.sampling import CoordinateSample, DownsizeSampler


def _blob_pair(shape: tuple[int, int, int], shift: int) -> tuple[nib.Nifti1Image, ...]:
    """A smooth ellipsoid (and its label) and the same moved by ``shift`` voxels along axis 0."""
    axes = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")

    def blob(c0: float) -> np.ndarray:
        r2 = ((axes[0] - c0) / (shape[0] / 4)) ** 2 + ((axes[1] - shape[1] / 2) / (shape[1] / 3)) ** 2
        return np.exp(-2.0 * r2)

    fixed, moving = blob(shape[0] / 2), blob(shape[0] / 2 + shift)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])

    def img(a: np.ndarray, dtype: type) -> nib.Nifti1Image:
        return nib.Nifti1Image(a.astype(dtype), aff)

    return img(100 * fixed, np.float32), img(100 * moving, np.float32), img(fixed > 0.5, np.int16), img(moving > 0.5, np.int16)


def test_a_lattice_one_point_thick_has_no_det_j_of_its_own_and_no_nan() -> None:
    shape = (12, 12, 3)
    sample = DownsizeSampler(stride=3).sample(shape, generator=torch.Generator().manual_seed(0))
    assert sample.points.shape[3] == 1  # one point along the 3-voxel axis
    phi_vox = torch.randn(*sample.points.shape)
    penalty = FoldingPenalty(margin=0.3).lattice(sample, phi_vox)
    assert float(penalty) == 0.0
    # two points along every axis: the forward differences exist, and a folded lattice is penalised
    thick = CoordinateSample(points=torch.zeros(1, 2, 2, 2, 3), spacing=(1.0, 1.0, 1.0))
    folded = torch.stack(torch.meshgrid(*[torch.arange(2.0)] * 3, indexing="ij"), dim=-1)[None]
    folded[..., 0] = -folded[..., 0]  # mirrored along axis 0: det J = -1 everywhere
    assert float(FoldingPenalty(margin=0.3).lattice(thick, folded)) == pytest.approx(1.3)


@pytest.mark.parametrize("shape", [(32, 32, 3), (6, 6, 6)], ids=["3 slices", "6 voxels a side"])
def test_thin_and_tiny_volumes_register_without_a_nan_loss(shape: tuple[int, int, int], tmp_path: Path) -> None:
    fixed, moving, fixed_labels, moving_labels = _blob_pair(shape, shift=2 if shape[0] > 10 else 1)
    result = register_pair(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, output=tmp_path / "out",
                           affine="none", overrides={"trainer.max_steps": 100}, checkpoint_every=0, threads=1, quiet=True)
    m = result.metrics
    # 100 steps: the default pyramid's stride-4 stage has 27 % of them since 0.2.25 (16 of 60 left the
    # 6-voxel pair's one-voxel shift unrecovered, Dice 0 -> 0; 27 of 100 recover it, Dice 0 -> 1)
    assert m["steps"] == 100  # a NaN loss stops the fit at step 0 with an error
    assert m["folding_count"] == 0
    assert m["dice_after"] > m["dice_before"] + 0.05, (m["dice_before"], m["dice_after"])
    assert (tmp_path / "out" / "displacement.nii.gz").is_file()
