"""Input checks, label lists, atomic writes and the ITK displacement format."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nir_lightning.data.checks import check_affine, parse_labels
from nir_lightning.data.pair import load_pair
from nir_lightning.errors import InputError
from nir_lightning.io import atomic_path, load_displacement_itk, save_displacement_itk, save_nifti, write_text_atomic


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def named(path: Path) -> str:
    """Regex that the error message names ``path`` (its file name at least)."""
    return re.escape(path.name)


@pytest.fixture
def fixed(tiny_pair) -> nib.Nifti1Image:
    return nib.load(str(tiny_pair["fixed"]))


# -- label lists ------------------------------------------------------------------------------
def test_parse_labels_tsv_with_header(tmp_path):
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("label\tname\n2\tLeft-WM\n3\tLeft-Cortex\n# a comment\n\n41\tRight-WM\n")
    assert parse_labels(str(tsv)) == [2, 3, 41]


def test_parse_labels_csv_and_headerless_txt(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("id,name\n10,thalamus\n49,thalamus-r\n")
    assert parse_labels(str(csv)) == [10, 49]
    txt = tmp_path / "labels.txt"
    txt.write_text("7\n8\n")
    assert parse_labels(str(txt)) == [7, 8]


def test_parse_labels_comma_list_and_sequences():
    assert parse_labels("2, 3,41") == [2, 3, 41]
    assert parse_labels("17") == [17]
    assert parse_labels([4, 5]) == [4, 5]
    assert parse_labels((np.int64(6),)) == [6]
    assert parse_labels(None) is None


def test_parse_labels_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        parse_labels(str(tmp_path / "missing.tsv"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tname\n2\tWM\nx\toops\n")
    with pytest.raises(InputError, match=r"line 3.*'x'"):
        parse_labels(str(bad))
    header_only = tmp_path / "empty.tsv"
    header_only.write_text("label\tname\n")
    with pytest.raises(InputError, match="names no labels"):
        parse_labels(str(header_only))
    with pytest.raises(InputError, match="comma-separated"):
        parse_labels("2,x,4")
    with pytest.raises(InputError, match="names no labels"):
        parse_labels(",,")


# -- atomic writes ---------------------------------------------------------------------------------
def test_save_nifti_is_atomic_and_keeps_the_affine(tmp_path):
    affine = np.array([[-2.0, 0, 0, 10], [0, 0, 2, -5], [0, -2, 0, 7], [0, 0, 0, 1]])
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    target = tmp_path / "out" / "img.nii.gz"
    save_nifti(data, affine, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["img.nii.gz"]  # no temp file left
    img = nib.load(str(target))
    assert np.array_equal(img.get_fdata(), data)
    assert np.allclose(img.affine, affine)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    save_nifti(data * 2, affine, target)  # replacing works too
    assert np.array_equal(nib.load(str(target)).get_fdata(), data * 2)
    assert sorted(p.name for p in target.parent.iterdir()) == ["img.nii.gz"]


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    """Outputs should be readable like any file the user creates (umask), not 0600 like mkstemp's."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    write_text_atomic(atomic, "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode), (
        oct(stat.S_IMODE(atomic.stat().st_mode)),
        oct(stat.S_IMODE(plain.stat().st_mode)),
    )


# -- ITK displacement files ---------------------------------------------------------------------------
def test_displacement_itk_round_trip_and_layout(tmp_path, rng):
    affine = np.array([[-2.0, 0, 0, 10], [0, 0, 2, -5], [0, -2, 0, 7], [0, 0, 0, 1]])
    ras = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
    path = tmp_path / "displacement.nii.gz"
    save_displacement_itk(ras, affine, path)
    img = nib.load(str(path))
    assert img.shape == (4, 5, 6, 1, 3)
    assert img.get_data_dtype() == np.float32
    assert img.header.get_intent()[0] == "vector"
    assert np.allclose(img.affine, affine)
    on_disk = np.asarray(img.dataobj)[:, :, :, 0, :]
    assert np.array_equal(on_disk[..., 0], -ras[..., 0])  # LPS: R -> L
    assert np.array_equal(on_disk[..., 1], -ras[..., 1])  # A -> P
    assert np.array_equal(on_disk[..., 2], ras[..., 2])  # S unchanged
    back, aff = load_displacement_itk(path)
    assert np.array_equal(back, ras)
    assert np.allclose(aff, affine)


def test_fields_are_stored_without_deflation_and_images_with_it(tmp_path, rng):
    """Displacements go to gzip at level 0 (FIELD_COMPRESSLEVEL): the same header and voxels as at
    nibabel's level 1, read back by nibabel and SimpleITK, the same bytes on every write; an image
    that compresses still is."""
    import gzip
    import os

    import SimpleITK as sitk

    ras = rng.normal(size=(10, 11, 12, 3)).astype(np.float32)
    stored, deflated = tmp_path / "stored.nii.gz", tmp_path / "deflated.nii.gz"
    save_displacement_itk(ras, np.eye(4), stored)
    lps = ras * np.array([-1, -1, 1], np.float32)
    save_nifti(lps[:, :, :, None, :], np.eye(4), deflated, intent="vector")  # nibabel's default level
    raw = gzip.decompress(stored.read_bytes())
    assert raw == gzip.decompress(deflated.read_bytes())  # header and data identical; only the deflate stream differs
    assert os.path.getsize(stored) > len(raw) > os.path.getsize(deflated)  # level 0: stored blocks
    assert np.array_equal(load_displacement_itk(stored)[0], ras)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(stored))).shape == (12, 11, 10, 3)  # a vector image
    again = tmp_path / "again.nii.gz"
    save_displacement_itk(ras, np.eye(4), again)
    assert again.read_bytes() == stored.read_bytes()  # no time stamp: reproducible files
    mask = np.zeros((10, 11, 12), np.float32)
    mask[2:6] = 1.0
    save_nifti(mask, np.eye(4), tmp_path / "mask.nii.gz")
    assert os.path.getsize(tmp_path / "mask.nii.gz") < mask.nbytes / 10  # images keep nibabel's deflation


def test_load_displacement_itk_rejects_a_plain_image(tmp_path, rng):
    path = save(rng.random((4, 5, 6)).astype(np.float32), np.eye(4), tmp_path / "img.nii.gz")
    with pytest.raises(InputError, match=r"\(X, Y, Z, 1, 3\)"):
        load_displacement_itk(path)


# -- load_pair: good input ------------------------------------------------------------------------------
def test_load_pair_on_the_phantom(tiny_pair, fixed):
    pair = load_pair(
        tiny_pair["fixed"], tiny_pair["moving"],
        fixed_labels=tiny_pair["fixed_labels"], moving_labels=tiny_pair["moving_labels"],
    )
    shape = fixed.shape
    assert pair.shape == shape
    for t in (pair.fixed, pair.moving, pair.moving_raw):
        assert tuple(t.shape) == (1, 1, *shape)
    assert float(pair.fixed.min()) == 0.0 and float(pair.fixed.max()) == pytest.approx(1.0)
    assert float(pair.moving.min()) == 0.0 and float(pair.moving.max()) == pytest.approx(1.0)
    moving = nib.load(str(tiny_pair["moving"])).get_fdata()
    assert np.allclose(pair.moving_raw[0, 0].numpy(), moving, atol=1e-6)  # original intensities
    assert np.allclose(pair.fixed_affine, fixed.affine)
    fl = nib.load(str(tiny_pair["fixed_labels"])).get_fdata()
    ml = nib.load(str(tiny_pair["moving_labels"])).get_fdata()
    assert np.array_equal(pair.fixed_labels[0, 0].numpy(), fl)
    common = sorted((set(np.unique(fl)) & set(np.unique(ml))) - {0})
    assert pair.labels == [int(v) for v in common] and len(common) >= 10
    assert pair.notes == []
    assert pair.spacing == pytest.approx((2.0, 2.0, 2.0))


def test_load_pair_with_a_label_subset(tiny_pair, tmp_path):
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("label\tname\n2\tWM\n41\tWM-r\n999\tnot-there\n")
    pair = load_pair(
        tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=tiny_pair["fixed_labels"],
        moving_labels=tiny_pair["moving_labels"], labels=str(tsv),
    )
    assert pair.labels == [2, 41, 999]
    assert any("999" in n for n in pair.notes)


def test_load_pair_squeezes_a_trailing_singleton_axis(tiny_pair, fixed, tmp_path):
    moving = nib.load(str(tiny_pair["moving"]))
    path = save(moving.get_fdata(dtype=np.float32)[..., None], moving.affine, tmp_path / "moving4d.nii.gz")
    pair = load_pair(tiny_pair["fixed"], path)
    assert pair.shape == fixed.shape


def test_load_pair_resamples_a_moving_image_on_another_grid(tiny_pair, fixed, tmp_path):
    moving = nib.load(str(tiny_pair["moving"]))
    data = moving.get_fdata(dtype=np.float32)
    coarse = data[::2, ::2, ::2]  # voxel (i, j, k) of coarse = voxel (2i, 2j, 2k) of the original
    aff = moving.affine.copy()
    aff[:3, :3] *= 2
    path = save(coarse, aff, tmp_path / "moving_coarse.nii.gz")
    pair = load_pair(tiny_pair["fixed"], path)
    assert pair.shape == fixed.shape
    assert any("resampled" in n and "moving_coarse.nii.gz" in n for n in pair.notes)
    raw = pair.moving_raw[0, 0].numpy()
    assert np.allclose(raw[::2, ::2, ::2][:-1, :-1, :-1], coarse[:-1, :-1, :-1], atol=1e-4)


# -- load_pair: bad input --------------------------------------------------------------------------------
def test_missing_path(tiny_pair, tmp_path):
    missing = tmp_path / "no_such_moving.nii.gz"
    with pytest.raises(InputError, match=f"moving image not found: .*{named(missing)}"):
        load_pair(tiny_pair["fixed"], missing)
    with pytest.raises(InputError, match=f"fixed image not found: .*{named(missing)}"):
        load_pair(missing, tiny_pair["moving"])


def test_not_a_nifti_file(tiny_pair, tmp_path):
    txt = tmp_path / "moving.txt"
    txt.write_text("not an image")
    with pytest.raises(InputError, match=f"{named(txt)}.*not a NIfTI"):
        load_pair(tiny_pair["fixed"], txt)
    with pytest.raises(InputError, match="directory"):
        load_pair(tiny_pair["fixed"], tmp_path)


def test_corrupted_nifti(tiny_pair, tmp_path):
    raw = Path(tiny_pair["moving"]).read_bytes()
    head = tmp_path / "head_only.nii.gz"
    head.write_bytes(raw[:200])
    with pytest.raises(InputError, match=named(head)):
        load_pair(tiny_pair["fixed"], head)
    body = tmp_path / "truncated.nii.gz"
    body.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=named(body)):
        load_pair(tiny_pair["fixed"], body)


def test_multi_channel_4d(tiny_pair, fixed, tmp_path):
    data = fixed.get_fdata(dtype=np.float32)
    path = save(np.stack([data, data], axis=-1), fixed.affine, tmp_path / "two_channels.nii.gz")
    with pytest.raises(InputError, match=f"{named(path)}.*3D volume is expected"):
        load_pair(tiny_pair["fixed"], path)


def test_nan_voxels(tiny_pair, fixed, tmp_path):
    data = fixed.get_fdata(dtype=np.float32)
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    path = save(data, fixed.affine, tmp_path / "with_nan.nii.gz")
    with pytest.raises(InputError, match=f"{named(path)}.* 2 NaN/Inf voxels"):
        load_pair(path, tiny_pair["moving"])


def test_constant_image(tiny_pair, fixed, tmp_path):
    path = save(np.full(fixed.shape, 7.0, dtype=np.float32), fixed.affine, tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match=f"{named(path)}.*constant"):
        load_pair(tiny_pair["fixed"], path)


def test_too_thin_image(tiny_pair, fixed, tmp_path):
    path = save(np.random.default_rng(0).random((10, 1, 10)).astype(np.float32), fixed.affine, tmp_path / "thin.nii.gz")
    with pytest.raises(InputError, match=f"{named(path)}.*at least 2 voxels"):
        load_pair(tiny_pair["fixed"], path)


def test_singular_affine(tiny_pair, fixed, tmp_path):
    # columns 0 and 2 collinear; pixdim consistent with the sform so no reader "repairs" it
    aff = np.array([[2.0, 0, 2, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(fixed.get_fdata(dtype=np.float32), None)
    img.header.set_sform(aff, code=1)
    img.header.set_qform(None, code=0)
    img.header.set_zooms((2.0, 2.0, 2.0))
    path = tmp_path / "singular.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(InputError, match=f"{named(path)}.*singular affine"):
        load_pair(tiny_pair["fixed"], path)


def test_check_affine_direct():
    with pytest.raises(InputError, match="singular"):
        check_affine(np.diag([2.0, 0.0, 2.0, 1.0]), "fixed", "f.nii.gz")
    with pytest.raises(InputError, match="non-finite"):
        check_affine(np.full((4, 4), np.nan), "fixed", "f.nii.gz")
    assert np.array_equal(check_affine(np.eye(4), "fixed", "f.nii.gz"), np.eye(4))


def test_float_non_integer_label_map(tiny_pair, fixed, tmp_path):
    labels = nib.load(str(tiny_pair["moving_labels"])).get_fdata().astype(np.float32)
    labels[labels == 2] = 2.5
    path = save(labels, fixed.affine, tmp_path / "prob_labels.nii.gz")
    with pytest.raises(InputError, match=f"{named(path)}.*not integer-valued"):
        load_pair(tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=tiny_pair["fixed_labels"], moving_labels=path)


def test_float_integer_valued_label_map_is_fine(tiny_pair, fixed, tmp_path):
    labels = nib.load(str(tiny_pair["moving_labels"])).get_fdata().astype(np.float32)
    path = save(labels, fixed.affine, tmp_path / "float_labels.nii.gz")
    pair = load_pair(tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=tiny_pair["fixed_labels"], moving_labels=path)
    assert np.array_equal(pair.moving_labels[0, 0].numpy(), labels.astype(np.int32))


def test_empty_and_disjoint_label_maps(tiny_pair, fixed, tmp_path):
    empty = save(np.zeros(fixed.shape, dtype=np.int16), fixed.affine, tmp_path / "empty_labels.nii.gz")
    with pytest.raises(InputError, match=f"{named(empty)}.*empty"):
        load_pair(tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=empty, moving_labels=tiny_pair["moving_labels"])
    other = nib.load(str(tiny_pair["moving_labels"])).get_fdata().astype(np.int16)
    other[other > 0] += 1000
    disjoint = save(other, fixed.affine, tmp_path / "other_atlas.nii.gz")
    with pytest.raises(InputError, match="share no label"):
        load_pair(tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=tiny_pair["fixed_labels"], moving_labels=disjoint)


def test_label_map_on_another_grid(tiny_pair, fixed, tmp_path):
    labels = nib.load(str(tiny_pair["fixed_labels"])).get_fdata().astype(np.int16)
    path = save(labels[:-2], fixed.affine, tmp_path / "cropped_labels.nii.gz")
    with pytest.raises(InputError, match=f"{named(path)}.*not on the fixed image's grid"):
        load_pair(tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=path, moving_labels=tiny_pair["moving_labels"])


def test_label_option_errors(tiny_pair):
    with pytest.raises(InputError, match="both"):
        load_pair(tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=tiny_pair["fixed_labels"])
    with pytest.raises(InputError, match="without --fixed-labels"):
        load_pair(tiny_pair["fixed"], tiny_pair["moving"], labels="2,3")
    with pytest.raises(InputError, match="none of the requested labels"):
        load_pair(
            tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=tiny_pair["fixed_labels"],
            moving_labels=tiny_pair["moving_labels"], labels="998,999",
        )
    with pytest.raises(InputError, match="percentiles"):
        load_pair(tiny_pair["fixed"], tiny_pair["moving"], percentiles=(50.0, 10.0))


def test_load_pair_does_not_touch_its_inputs(tiny_pair, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(Path(tiny_pair["fixed"]).parent, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    load_pair(copy / "fixed.nii.gz", copy / "moving.nii.gz", fixed_labels=copy / "fixed_labels.nii.gz", moving_labels=copy / "moving_labels.nii.gz")
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_present_labels_are_torch_unique_for_any_label_values():
    """The bincount path (small non-negative labels) and the sorting path agree with torch.unique."""
    from nir_lightning.data.pair import present_labels

    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 40, (6, 7, 8), generator=gen, dtype=torch.int32)
    small[small == 13] = 2035  # a FreeSurfer-style large label
    large = small.clone()
    large[0, 0, 0] = -4  # negative values take the torch.unique path
    large[0, 0, 1] = 2**21
    for labels in (small, large, torch.zeros(2, 2, 2, dtype=torch.int32)):
        assert present_labels(labels) == set(torch.unique(labels).tolist())
