"""The benchmark's conversion of peer results to nir_lightning's displacement convention is right.

A peer scored wrongly is worse than no peer, so for each peer the field we convert and then
apply with nir_lightning's own warp code (``nir_lightning.core.resample``) must reproduce what the peer
itself produces with its own resampler:

* ANTs: a known synthetic displacement written as an ANTs warp, composed with a known affine
  ``.mat`` (the ``fwdtransforms`` list order ``[warp, affine]``), against ``ants.apply_transforms``
  and against the analytic composition; then a real ``SyNOnly`` CC registration.
* FireANTs: greedy and SyN registrations against FireANTs' own ``evaluate``.

Small phantoms (40x44x38, non-RAS (LSA) affine so axis and sign mistakes show) and few iterations keep
this fast. Skipped when antspyx / fireants are not installed (``pip install -e .[bench]``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")  # before ants is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness.convert import (
    ConversionError,
    ants_transforms_to_field,
    field_to_phi,
    fireants_coords_to_field,
    warp_with_field,
)
from harness.score import load_eval_pair, load_field, score_field

from nir_lightning.coords import ras_to_lps, voxel_displacement_to_world, voxel_to_world, world_displacement_to_voxel
from nir_lightning.data.phantom import write_demo_pair
from nir_lightning.io import save_displacement_itk

# make_phantom's bias field pads circularly by 36 voxels, so every axis needs >= 37 voxels.
SHAPE = (40, 44, 38)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    files = write_demo_pair(tmp_path_factory.mktemp("phantom"), shape=SHAPE, seed=3)
    return {k: str(v) for k, v in files.items()}


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.get_fdata(), dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _interior(disp_ras: np.ndarray, affine: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """Voxels whose moving point lies >= ``margin`` voxels inside the grid (where ITK's and
    grid_sample's border handling cannot differ)."""
    phi, _ = field_to_phi(disp_ras, affine)
    lim = 1.0 - 2.0 * margin / (np.asarray(disp_ras.shape[:3], dtype=np.float64) - 1.0)
    return (np.abs(phi.numpy()) <= lim).all(-1)


def _smooth_field_ras(shape: tuple[int, int, int], affine: np.ndarray, amplitude_mm: float = 3.0) -> np.ndarray:
    """A smooth, clearly anisotropic displacement (RAS mm) on the grid, different per component."""
    i, j, k = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    vox = np.stack([np.sin(i) * np.cos(0.5 * j), 0.6 * np.sin(2 * j + 0.3) * np.sin(k), 0.8 * np.cos(k) * np.sin(i + 0.2)], -1)
    return (voxel_displacement_to_world(vox, affine) * amplitude_mm / 2.0).astype(np.float32)


# -- no peer needed -------------------------------------------------------------------------


def test_world_voxel_round_trip_and_zero_field_scores_as_before(pair: dict[str, str], tmp_path: Path) -> None:
    _, affine = _load(pair["fixed"])
    true_vox = nib.load(pair["true_displacement_vox"]).get_fdata(dtype=np.float32)
    ras = voxel_displacement_to_world(true_vox, affine)
    np.testing.assert_allclose(world_displacement_to_voxel(ras, affine), true_vox, atol=1e-5)
    # written as nir does (ITK file), read back, turned into nir's phi/voxel displacement
    save_displacement_itk(ras.astype(np.float32), affine, tmp_path / "d.nii.gz")
    back, aff2 = load_field(str(tmp_path / "d.nii.gz"))
    _, disp_vox = field_to_phi(back, aff2)
    np.testing.assert_allclose(disp_vox.numpy(), true_vox, atol=1e-4)
    ev = load_eval_pair(pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"], None)
    zero = score_field(np.zeros((*SHAPE, 3), np.float32), affine, ev, hd95=False, onehot=True)
    assert zero.metrics["dice_after"] == pytest.approx(zero.metrics["dice_before"])
    assert zero.metrics["dice_onehot_linear"] == pytest.approx(zero.metrics["dice_before"])
    assert zero.metrics["folding_count"] == 0 and zero.metrics["folding_percent"] == 0.0
    truth = score_field(back, aff2, ev, hd95=False, onehot=False)
    assert truth.metrics["dice_after"] > zero.metrics["dice_after"] + 0.2  # the known transform aligns the labels
    assert "hd95_after" not in truth.metrics and "dice_onehot_linear" not in truth.metrics
    with pytest.raises(ConversionError):
        score_field(back, np.diag([2.0, 2.0, 2.0, 1.0]), ev, hd95=False, onehot=False)  # wrong grid: refused


def test_harness_scores_a_field_as_evaluate_does_with_the_same_keys(pair: dict[str, str], tmp_path: Path) -> None:
    """One scoring path: a nir field written as ``displacement.nii.gz`` and scored by the harness
    gives evaluate()'s (so metrics.json's) numbers under the same key names."""
    from nir_lightning.evaluation.evaluate import evaluate
    from nir_lightning.fields import DisplacementField

    torch.manual_seed(0)
    field = DisplacementField(width=32, num_frequencies=8)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ev = load_eval_pair(pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"], None)
    reference = evaluate(field.eval(), ev, hd95=True)
    ras = voxel_displacement_to_world(reference.disp_vox.numpy(), ev.fixed_affine).astype(np.float32)
    save_displacement_itk(ras, ev.fixed_affine, tmp_path / "displacement.nii.gz")
    disp, aff = load_field(str(tmp_path / "displacement.nii.gz"))
    assert reference.warped_labels_nearest is not None
    scored = score_field(disp, aff, ev, hd95=True, onehot=False, native_labels=reference.warped_labels_nearest.numpy())
    m, ref = scored.metrics, reference.metrics
    shared = {"labels", "dice_before", "dice_after", "dice_per_label", "dice_per_label_before", "hd95_before",
              "hd95_after", "hd95_per_label", "folding_count", "folding_percent", "jacobian_det_min",
              "jacobian_det_std", "foreground_voxels", "displacement_mean_mm"}
    assert shared <= set(m) and shared <= set(ref)
    assert ref["folding_count"] > 0 and ref["dice_after"] != ref["dice_before"]  # the test has power
    for key in ("labels", "dice_before", "dice_per_label_before", "hd95_before", "foreground_voxels"):
        assert m[key] == ref[key], key  # untouched by the field's round trip through the file
    assert m["dice_after"] == pytest.approx(ref["dice_after"], abs=2e-3)
    assert m["hd95_after"] == pytest.approx(ref["hd95_after"], rel=0.05)
    assert m["folding_count"] == pytest.approx(ref["folding_count"], rel=0.02)
    assert m["displacement_mean_mm"] == pytest.approx(ref["displacement_mean_mm"], rel=1e-4)
    assert m["native_label_agreement"] > 0.99


# -- ANTs -----------------------------------------------------------------------------------


def test_ants_known_warp_and_affine_compose(pair: dict[str, str], tmp_path: Path) -> None:
    ants = pytest.importorskip("ants")
    moving, affine = _load(pair["moving"])
    fixed_img = ants.image_read(pair["fixed"])
    moving_img = ants.image_read(pair["moving"])
    known = _smooth_field_ras(SHAPE, affine)
    warp = tmp_path / "1Warp.nii.gz"
    save_displacement_itk(known, affine, warp)  # ITK/LPS on disk: what ANTs writes and reads

    # 1) the warp alone: conversion returns exactly the field, and warps like ANTs does
    d = ants_transforms_to_field(fixed_img, moving_img, [str(warp)], tmp_path, SHAPE, affine)
    np.testing.assert_allclose(d, known, atol=1e-4)
    ref = ants.apply_transforms(fixed_img, moving_img, [str(warp)]).numpy()
    ours = warp_with_field(moving, d, affine)
    inside = _interior(d, affine)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-4 * float(np.abs(moving).max()))
    wrong = warp_with_field(moving, ras_to_lps(d), affine)  # LPS read as RAS: must be detected
    assert np.abs(wrong - ref)[inside].max() > 0.05 * float(np.abs(moving).max())

    # 2) warp + affine, in the fwdtransforms order [warp, affine]
    rot = np.array([[0.996, -0.087, 0.0], [0.087, 0.996, 0.0], [0.0, 0.0, 1.0]]) * np.array([1.03, 0.97, 1.0])
    trans = np.array([2.5, -1.5, 3.0])  # mm, LPS (ITK physical space)
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=rot, translation=trans, center=(0.0, 0.0, 0.0))
    mat = tmp_path / "0GenericAffine.mat"
    ants.write_transform(tx, str(mat))
    d2 = ants_transforms_to_field(fixed_img, moving_img, [str(warp), str(mat)], tmp_path, SHAPE, affine)
    # analytic: the warp acts first on the fixed point, then the affine: q = A(p + w(p)) (ITK LPS)
    vox = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)
    p = ras_to_lps(voxel_to_world(vox, affine))
    q = (p + ras_to_lps(known.astype(np.float64))) @ rot.T + trans
    np.testing.assert_allclose(d2, ras_to_lps(q - p), atol=2e-3)
    ref2 = ants.apply_transforms(fixed_img, moving_img, [str(warp), str(mat)]).numpy()
    ours2 = warp_with_field(moving, d2, affine)
    inside2 = _interior(d2, affine)
    assert inside2.mean() > 0.4
    np.testing.assert_allclose(ours2[inside2], ref2[inside2], atol=1e-4 * float(np.abs(moving).max()))


def test_ants_syn_registration_matches_ants_apply_transforms(pair: dict[str, str], tmp_path: Path) -> None:
    ants = pytest.importorskip("ants")
    moving, affine = _load(pair["moving"])
    labels, _ = _load(pair["moving_labels"])
    fixed_img = ants.image_read(pair["fixed"])
    moving_img = ants.image_read(pair["moving"])
    reg = ants.registration(fixed_img, moving_img, type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=2,
                            reg_iterations=(10, 5, 0), outprefix=str(tmp_path / "reg_"))
    fwd = reg["fwdtransforms"]
    assert any(f.endswith("Warp.nii.gz") for f in fwd)
    d = ants_transforms_to_field(fixed_img, moving_img, fwd, tmp_path, SHAPE, affine)
    assert np.abs(d).max() > 0.5  # it moved something
    inside = _interior(d, affine)
    ref = ants.apply_transforms(fixed_img, moving_img, fwd).numpy()
    np.testing.assert_allclose(warp_with_field(moving, d, affine)[inside], ref[inside], atol=1e-4 * float(moving.max()))
    np.testing.assert_allclose(ref, reg["warpedmovout"].numpy(), atol=1e-3 * float(moving.max()))  # = its own output
    nn_ref = ants.apply_transforms(fixed_img, ants.image_read(pair["moving_labels"]), fwd, interpolator="nearestNeighbor").numpy()
    nn_ours = warp_with_field(labels, d, affine, mode="nearest")
    assert (nn_ours == nn_ref).mean() > 0.999


# -- FireANTs -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["greedy", "syn"])
def test_fireants_matches_its_own_evaluate(pair: dict[str, str], kind: str) -> None:
    pytest.importorskip("fireants")
    from fireants.io.image import BatchedImages, Image

    if kind == "syn":
        from fireants.registration.syn import SyNRegistration as Registration
    else:
        from fireants.registration.greedy import GreedyRegistration as Registration

    torch.manual_seed(0)
    moving, affine = _load(pair["moving"])
    labels, _ = _load(pair["moving_labels"])
    fixed_b = BatchedImages([Image.load_file(pair["fixed"], device="cpu")])
    moving_b = BatchedImages([Image.load_file(pair["moving"], device="cpu")])
    reg = Registration(scales=[2, 1], iterations=[10, 5], fixed_images=fixed_b, moving_images=moving_b, loss_type="cc",
                       cc_kernel_size=5, optimizer="Adam", optimizer_lr=0.5, progress_bar=False)
    reg.optimize()
    with torch.no_grad():
        coords = reg.get_warped_coordinates(fixed_b, moving_b)
        ref = reg.evaluate(fixed_b, moving_b)[0, 0].permute(2, 1, 0).numpy()  # SimpleITK (k, j, i) -> nibabel (i, j, k)
        label_b = BatchedImages([Image.load_file(pair["moving_labels"], device="cpu")])
        label_b.interpolate_mode = "nearest"
        nn_ref = reg.evaluate(fixed_b, label_b)[0, 0].permute(2, 1, 0).numpy()
    d = fireants_coords_to_field(coords, SHAPE, affine, SHAPE, affine)
    assert np.abs(d).max() > 0.5
    ours = warp_with_field(moving, d, affine)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * float(moving.max()))  # same (zeros) padding: whole grid
    assert (warp_with_field(labels, d, affine, mode="nearest") == nn_ref).mean() > 0.999
    # the test has power: the field with LPS/RAS confused does not reproduce FireANTs
    wrong = warp_with_field(moving, ras_to_lps(d), affine)
    assert np.abs(wrong - ref).max() > 0.05 * float(moving.max())


# -- the harness end to end (slow: several subprocesses) ------------------------------------


@pytest.mark.slow
def test_harness_quick_demo_end_to_end(tmp_path: Path) -> None:
    import csv
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench"
    cmd = [sys.executable, str(repo / "benchmarks" / "run_benchmark.py"), "--demo", "--quick", "--threads", "1",
           "--methods", "nir,ants,fireants-greedy", "--nir-args=--trainer.max_steps=5", "--no-hd95", "--out", str(out)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=repo)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("results.csv", "per_structure.csv", "results.md", "dice_vs_seconds.png", "run.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["nir", "ants", "fireants-greedy"]
    for r in rows:
        if r["status"] == "skipped":  # a missing peer is announced, never silent
            assert f"SKIP {r['method']}:" in res.stdout
            continue
        assert r["status"] == "ok", r
        assert 0.0 <= float(r["dice_after"]) <= 1.0 and float(r["seconds_reg"]) > 0 and float(r["peak_rss_mb"]) > 0
        assert float(r["native_label_agreement"]) > 0.99  # our warp of the converted field = the method's own
    nir = rows[0]
    assert float(nir["dice_after"]) == pytest.approx(float(nir["dice_self_reported"]), abs=2e-3)  # same path as nir register
