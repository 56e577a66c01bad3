"""``data.pair``'s reading and intensity scaling equal MONAI's ``LoadImage`` (nibabel reader) and
``ScaleIntensityRangePercentiles`` bit for bit: ``load_pair`` used those until 0.2.7, and no longer
imports MONAI for them (0.4 s of ``nir register``'s start-up)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nir_lightning.data.pair import _read, scale_percentiles


def _files(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.2, 2.0, 1.0])
    aff[:3, 3] = (-10.0, 4.0, 7.0)
    files = {}
    scaled = nib.Nifti1Image(rng.integers(-200, 3000, (9, 10, 11)).astype(np.int16), aff)
    scaled.header.set_slope_inter(0.37, 12.5)  # the voxels come out as float64 after the slope
    files["int16_slope"] = scaled
    files["big_endian"] = nib.Nifti1Image(rng.normal(size=(9, 10, 11)).astype(">f4"), aff)
    files["uint8_4d_singleton"] = nib.Nifti1Image(rng.integers(0, 5, (9, 10, 11, 1)).astype(np.uint8), aff)
    odd = nib.Nifti1Image(rng.normal(size=(9, 10, 11)).astype(np.float32), aff)
    odd.header.set_zooms((1.0, 1.0, 1.0))  # voxel sizes that disagree with the affine: MONAI's correction
    files["zooms_off"] = odd
    out = {}
    for name, img in files.items():
        out[name] = folder / f"{name}.nii.gz"
        nib.save(img, str(out[name]))
    return out


def test_read_equals_monai_load_image(tmp_path: Path) -> None:
    from monai.transforms import LoadImage

    for name, path in _files(tmp_path).items():
        vol = _read(path)
        ref = LoadImage(image_only=True, dtype=None)(str(path))
        expected = np.asarray(ref)
        assert vol.array.dtype == expected.dtype and np.array_equal(vol.array, expected), name
        assert vol.array.flags.c_contiguous and np.array_equal(vol.affine, np.asarray(ref.affine, dtype=np.float64)), name


@pytest.mark.parametrize("shape", [(1, 40, 50, 60), (1, 110, 100, 100)], ids=["torch.quantile", "np.percentile (over a million voxels)"])
def test_scale_percentiles_equals_monai(shape: tuple[int, ...]) -> None:
    from monai.transforms import ScaleIntensityRangePercentiles

    image = torch.from_numpy(np.random.default_rng(1).gamma(2.0, 50.0, shape).astype(np.float32))
    expected = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(image)
    out = scale_percentiles(image, 0.5, 99.5)
    assert out.dtype == torch.float32 and torch.equal(out, torch.as_tensor(expected))
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    flat = torch.full(shape, 3.0)  # one value: no range to scale, MONAI's shift only
    assert torch.equal(scale_percentiles(flat, 0.5, 99.5), torch.zeros(shape))
