"""ITK/ANTs affine files: ``save_itk_affine`` / ``load_itk_affine`` against SimpleITK.

The world matrix ``W`` maps fixed RAS mm to moving RAS mm; ITK maps LPS points, so a point
``p`` (RAS) must go to ``ras_to_lps(W p)`` when SimpleITK applies the file to ``ras_to_lps(p)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import SimpleITK as sitk

from nir_lightning.coords import ras_to_lps
from nir_lightning.errors import InputError
from nir_lightning.io import load_itk_affine, save_itk_affine


def world_matrix(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = np.eye(4)
    w[:3, :3] += 0.15 * rng.normal(size=(3, 3))
    w[:3, 3] = rng.uniform(-10, 10, size=3)
    return w


def apply(w: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ w[:3, :3].T + w[:3, 3]


POINTS = np.random.default_rng(1).uniform(-80, 80, size=(20, 3))


def test_round_trip_is_exact_and_the_file_is_what_ants_writes(tmp_path: Path) -> None:
    w = world_matrix()
    path = tmp_path / "affine.mat"
    save_itk_affine(w, path)
    np.testing.assert_array_equal(load_itk_affine(path), w)  # sign flips only: bit-exact
    data = scipy.io.loadmat(str(path))
    assert data["AffineTransform_double_3_3"].shape == (12, 1)
    np.testing.assert_array_equal(data["fixed"], np.zeros((3, 1)))
    assert [p.name for p in tmp_path.iterdir()] == ["affine.mat"]  # no temporary left behind


def test_simpleitk_reads_the_file_and_maps_points_like_w(tmp_path: Path) -> None:
    w = world_matrix(2)
    save_itk_affine(w, tmp_path / "affine.mat")
    t = sitk.ReadTransform(str(tmp_path / "affine.mat"))
    for p in POINTS:
        got = np.array(t.TransformPoint(tuple(ras_to_lps(p))))
        np.testing.assert_allclose(got, ras_to_lps(apply(w, p)), atol=1e-9)


@pytest.mark.parametrize("suffix", [".mat", ".txt", ".tfm"])
def test_simpleitk_written_affine_with_a_centre_loads_to_the_same_mapping(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(3)
    a = sitk.AffineTransform(3)
    a.SetMatrix(tuple((np.eye(3) + 0.2 * rng.normal(size=(3, 3))).reshape(-1)))
    a.SetTranslation((1.5, -2.0, 3.25))
    a.SetCenter((12.0, -30.0, 7.5))  # non-zero: must be folded into the translation
    path = tmp_path / f"t{suffix}"
    sitk.WriteTransform(a, str(path))
    w = load_itk_affine(path)
    for p in POINTS:
        np.testing.assert_allclose(ras_to_lps(apply(w, p)), a.TransformPoint(tuple(ras_to_lps(p))), atol=1e-9)


def test_anything_else_is_refused_naming_the_file(tmp_path: Path) -> None:
    euler = tmp_path / "euler.txt"
    sitk.WriteTransform(sitk.Euler3DTransform(), str(euler))
    with pytest.raises(InputError, match=r"euler\.txt.*Euler3DTransform.*not an affine"):
        load_itk_affine(euler)
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"not a matlab file at all")
    with pytest.raises(InputError, match=r"junk\.mat"):
        load_itk_affine(junk)
    with pytest.raises(InputError, match=r"missing\.mat' not found"):
        load_itk_affine(tmp_path / "missing.mat")
    composite = tmp_path / "two.txt"
    ct = sitk.CompositeTransform([sitk.AffineTransform(3), sitk.TranslationTransform(3)])
    sitk.WriteTransform(ct, str(composite))
    with pytest.raises(InputError, match=r"two\.txt' holds 2 ITK transforms"):
        load_itk_affine(composite)
