"""The words of load_pair's messages about grids and masks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from nir_lightning.data.grids import grid_differences
from nir_lightning.data.pair import load_pair
from nir_lightning.errors import InputError


def _meta(shape: tuple[int, int, int], affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))


def test_grid_differences_names_spacing_without_calling_it_a_rotation() -> None:
    a = np.diag([-2.0, 2.0, 2.0, 1.0])
    b = a.copy()
    b[:3, :3] *= 1.3
    words = grid_differences(_meta((4, 5, 6), b), _meta((4, 5, 6), a))
    assert words[0] == "spacing (2.6, 2.6, 2.6) vs (2, 2, 2) mm"
    assert not any("rotated" in w for w in words), words
    c = a.copy()
    c[:3, :3] = a[:3, :3] @ np.array([[1.0, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    assert "axes rotated" in grid_differences(_meta((4, 5, 6), c), _meta((4, 5, 6), a))  # the check can fail


def test_an_empty_mask_is_named_as_the_fixed_mask(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    img = nib.load(str(tiny_pair["fixed"]))
    path = tmp_path / "empty_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(path))
    with pytest.raises(InputError, match=r"^fixed mask '.*empty_mask\.nii\.gz' is empty"):
        load_pair(tiny_pair["fixed"], tiny_pair["moving"], fixed_mask=path)
