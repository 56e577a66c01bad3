"""``nir register`` end to end: outputs, and re-applying the written transform independently.

One registration of a small phantom pair runs once for the module; the tests then check the
files against each other and against nibabel + SciPy and SimpleITK re-implementations of the
ITK/ANTs displacement-field convention (pull-back, LPS millimetres, shape (X, Y, Z, 1, 3)).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from nir_lightning.cli import main
from nir_lightning.evaluation.output_files import OUTPUT_FILES
from nir_lightning.io import load_itk_affine

SHAPE = (32, 36, 30)
STEPS = 30

METRIC_KEYS = {
    "dice_before", "dice_after", "dice_per_label", "folding_percent", "folding_count",
    "hd95_after", "seconds_fit", "seconds_total", "steps", "device",
}


def register_argv(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "register",
        "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
        "--fixed-labels", str(files["fixed_labels"]), "--moving-labels", str(files["moving_labels"]),
        "--output", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def reg(tmp_path_factory, pair_writer):
    root = tmp_path_factory.mktemp("register")
    files = pair_writer(root / "inputs", SHAPE, seed=0)
    out = root / "out"
    rc = main(register_argv(files, out, f"--trainer.max_steps={STEPS}"))
    assert rc == 0
    fixed = nib.load(str(files["fixed"]))
    moving = nib.load(str(files["moving"]))
    disp_img = nib.load(str(out / "displacement.nii.gz"))
    d_lps = np.asarray(disp_img.dataobj, dtype=np.float64)[:, :, :, 0, :]
    d_ras = d_lps * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
    # every fixed voxel v: p = A v, q = W (p + d(p)) (ANTs' order: displacement, then affine.mat),
    # moving voxel = inv(A_moving) q
    w = load_itk_affine(out / "affine.mat")
    v = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).astype(np.float64)
    a = fixed.affine
    p = v @ a[:3, :3].T + a[:3, 3]
    q = (p + d_ras) @ w[:3, :3].T + w[:3, 3]
    inv = np.linalg.inv(moving.affine)
    mvox = q @ inv[:3, :3].T + inv[:3, 3]
    interior = np.all((mvox >= 0) & (mvox <= np.array(moving.shape) - 1), axis=-1)
    return SimpleNamespace(
        files=files, out=out, fixed=fixed, moving=moving, d_ras=d_ras, mvox=mvox, interior=interior,
        metrics=json.loads((out / "metrics.json").read_text()),
        warped=nib.load(str(out / "warped.nii.gz")).get_fdata(),
    )


# A displacement field has no inverse; the diffeomorphic outputs are tested in test_velocity.
# composed_displacement.nii.gz is written on request only (--composed; see test_raw_inputs).
EXPECTED = tuple(n for n in OUTPUT_FILES if n not in ("inverse_displacement.nii.gz", "composed_displacement.nii.gz"))


def test_all_outputs_exist_on_the_fixed_grid(reg):
    assert not (reg.out / "inverse_displacement.nii.gz").exists()
    for name in EXPECTED:
        assert (reg.out / name).is_file(), name
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "jacobian_det.nii.gz", "displacement.nii.gz"):
        img = nib.load(str(reg.out / name))
        assert np.allclose(img.affine, reg.fixed.affine, atol=1e-5), name
        assert img.shape[:3] == SHAPE, name
    disp = nib.load(str(reg.out / "displacement.nii.gz"))
    assert disp.shape == (*SHAPE, 1, 3)
    assert disp.get_data_dtype() == np.float32
    assert disp.header.get_intent()[0] == "vector"
    labels = nib.load(str(reg.out / "warped_labels.nii.gz")).get_fdata()
    assert np.array_equal(labels, np.round(labels))
    csvs = list((reg.out / "logs").rglob("metrics.csv"))
    assert csvs and "train/loss" in csvs[0].read_text().splitlines()[0]
    assert not [p.name for p in reg.out.iterdir() if p.name.startswith(".")]  # no temp files


def test_metrics_json(reg):
    m = reg.metrics
    missing = METRIC_KEYS - set(m)
    assert not missing, missing
    assert m["steps"] == STEPS
    assert m["device"] == "cpu"
    assert 0 < m["seconds_fit"] <= m["seconds_total"]
    assert m["seconds_fit"] + m["seconds_evaluate"] + m["seconds_outputs"] <= m["seconds_total"]  # the outputs included
    fixed_labels = nib.load(str(reg.files["fixed_labels"])).get_fdata()
    assert set(m["dice_per_label"]) == {str(int(v)) for v in np.unique(fixed_labels) if v != 0}
    vals = [v for v in m["dice_per_label"].values() if v is not None]
    assert m["dice_after"] == pytest.approx(float(np.mean(vals)))
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert m["folding_percent"] == pytest.approx(100.0 * m["folding_count"] / m["foreground_voxels"])
    assert math.isfinite(m["hd95_after"]) and m["hd95_after"] >= 0
    assert m["hd95_after"] < m["hd95_before"]


def test_dice_improves(reg):
    m = reg.metrics
    assert m["dice_after"] > m["dice_before"] + 0.05, (m["dice_before"], m["dice_after"])


def test_field_is_not_trivial(reg):
    """The round-trip checks below only mean something if the transform actually moves points."""
    norm = np.linalg.norm(reg.d_ras, axis=-1)
    assert norm.mean() > 0.5, norm.mean()  # mm
    assert reg.interior.mean() > 0.6


def test_warped_equals_nibabel_scipy_resampling(reg):
    moving = reg.moving.get_fdata()
    ref = ndi.map_coordinates(moving, np.moveaxis(reg.mvox, -1, 0), order=1, mode="constant", cval=0.0)
    diff = np.abs(ref - reg.warped)[reg.interior]
    tol = 1e-3 * np.ptp(moving)
    assert diff.max() < tol, f"max |scipy - warped| = {diff.max():.3g} (tolerance {tol:.3g})"
    # sanity: the identity would not pass (the check can fail)
    ident = np.abs(moving - reg.warped)[reg.interior]
    assert ident.max() > 100 * tol


def test_warped_equals_simpleitk_resampling(reg):
    sitk = pytest.importorskip("SimpleITK")
    field = sitk.ReadImage(str(reg.out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetDimension() == 3
    tx = sitk.CompositeTransform(3)  # applies the last-added transform first: ANTs' -t disp -t affine
    tx.AddTransform(sitk.ReadTransform(str(reg.out / "affine.mat")))
    tx.AddTransform(sitk.DisplacementFieldTransform(field))
    fixed = sitk.ReadImage(str(reg.files["fixed"]))
    moving = sitk.ReadImage(str(reg.files["moving"]), sitk.sitkFloat64)
    res = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    arr = sitk.GetArrayFromImage(res).transpose(2, 1, 0)  # ITK arrays are (z, y, x)
    diff = np.abs(arr - reg.warped)[reg.interior]
    tol = 1e-3 * np.ptp(reg.moving.get_fdata())
    assert diff.max() < tol, f"max |SimpleITK - warped| = {diff.max():.3g} (tolerance {tol:.3g})"


def test_warped_labels_are_label_interpolated(reg):
    """Each label's indicator resampled trilinearly by SciPy, then the arg-max (ties: smaller label)."""
    labels = nib.load(str(reg.files["moving_labels"])).get_fdata()
    coords = np.moveaxis(reg.mvox, -1, 0)
    best = np.zeros(labels.shape[:0] + reg.mvox.shape[:3])
    ref = np.zeros(reg.mvox.shape[:3])
    for lab in np.unique(labels):
        p = ndi.map_coordinates((labels == lab).astype(np.float64), coords, order=1, mode="nearest")
        take = p > best
        best, ref = np.where(take, p, best), np.where(take, lab, ref)
    warped = nib.load(str(reg.out / "warped_labels.nii.gz")).get_fdata()
    agree = (ref == warped)[reg.interior]
    assert agree.mean() > 0.995, agree.mean()
    nearest = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    assert 0.9 < (nearest == warped)[reg.interior].mean() < 1.0  # not nearest neighbour, but close to it
    assert abs(reg.metrics["dice_after_label"] - reg.metrics["dice_after"]) < 0.08


def test_jacobian_det_file_matches_the_displacement(reg):
    """det J of x -> x + u(x), u in fixed voxels (central differences), is what was written."""
    a = reg.fixed.affine[:3, :3]
    u_vox = reg.d_ras @ np.linalg.inv(a).T
    jac = np.stack(np.gradient(u_vox, axis=(0, 1, 2)), axis=-1) + np.eye(3)
    det = np.linalg.det(jac)
    written = nib.load(str(reg.out / "jacobian_det.nii.gz")).get_fdata()
    assert np.abs(det - written).max() < 1e-3
    from nir_lightning.data.pair import load_pair

    fg = load_pair(reg.files["fixed"], reg.files["moving"]).fixed[0, 0].numpy() > 0.01
    assert int(fg.sum()) == reg.metrics["foreground_voxels"]
    assert int((written[fg] <= 0).sum()) == reg.metrics["folding_count"]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {n: ((folder / n).stat().st_mtime_ns, (folder / n).read_bytes()) for n in OUTPUT_FILES if (folder / n).exists()}


def test_existing_output_is_refused_then_overwritten(reg, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reg.out, out)
    before = _snapshot(out)
    assert len(before) == len(EXPECTED)
    capsys.readouterr()
    rc = main(register_argv(reg.files, out, "--trainer.max_steps=2"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "nir: error:" in err and "--overwrite" in err and str(out) in err
    assert _snapshot(out) == before  # untouched: same bytes and modification times
    rc = main(register_argv(reg.files, out, "--trainer.max_steps=2", "--overwrite"))
    assert rc == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    after = _snapshot(out)
    assert set(after) == set(before)
    for name in EXPECTED:
        assert after[name][0] != before[name][0], name


def test_a_single_leftover_output_is_enough_to_refuse(tmp_path, reg, capsys):
    out = tmp_path / "partial"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert main(register_argv(reg.files, out, "--trainer.max_steps=1")) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "{}"
