"""QC figure: slice values against known transforms, anatomical orientation, panel layout and image size."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from nibabel.orientations import axcodes2ornt, ornt_transform

from nir_lightning.coords import identity_grid, normalized_to_voxel_displacement
from nir_lightning.core.jacobian import jacobian_determinant
from nir_lightning.data.pair import ImagePair, load_pair
from nir_lightning.evaluation.qc import FOOTER_INCHES, LABEL_PANEL, PANEL_INCHES, PANELS, PLANES, plane_views, qc_slices
from nir_lightning.evaluation.qc_figure import checkerboard, qc_figure, qc_image, save_qc_figure, volume_summary

SHAPE = (24, 26, 22)  # conftest.TINY_SHAPE
LIA = np.array([[-2.0, 0, 0, 24.0], [0, 0, 2.0, -22.0], [0, -2.0, 0, 26.0], [0, 0, 0, 1.0]])  # axis 0 L, 1 I, 2 A
# displayed (rows, cols): axial = (A->P: axis 2 flipped, R->L: axis 0), coronal = (axis 1, axis 0),
# sagittal = (axis 1, A->P: axis 2 flipped)
PLANE_SHAPES = [(22, 24), (26, 24), (26, 22)]
NORMALS = [1, 2, 0]


@pytest.fixture(scope="module")
def pair(tiny_pair: dict[str, Path]) -> ImagePair:
    return load_pair(
        tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=tiny_pair["fixed_labels"], moving_labels=tiny_pair["moving_labels"]
    )


def _no_labels(pair: ImagePair) -> ImagePair:
    return ImagePair(fixed=pair.fixed, moving=pair.moving, moving_raw=pair.moving_raw, fixed_affine=pair.fixed_affine)


def flip0(x: torch.Tensor) -> torch.Tensor:
    """Mirror along axis 0: det J = -1 everywhere (every voxel folded)."""
    return x * torch.tensor([-1.0, 1.0, 1.0])


def test_plane_views_follow_the_affine() -> None:
    lia = plane_views(LIA, SHAPE, (12, 13, 11))
    assert [v.name for v in lia] == list(PLANES) == ["axial", "coronal", "sagittal"]
    got = [(v.axis, v.index, v.row_axis, v.flip_rows, v.col_axis, v.flip_cols, v.shape) for v in lia]
    assert got == [(1, 13, 2, True, 0, False, (22, 24)), (2, 11, 1, False, 0, False, (26, 24)), (0, 12, 1, False, 2, True, (26, 22))]
    ras = plane_views(np.diag([1.0, 1.0, 1.0, 1.0]), SHAPE, (12, 13, 11))  # every display axis runs toward -R/-A/-S
    got = [(v.axis, v.row_axis, v.flip_rows, v.col_axis, v.flip_cols) for v in ras]
    assert got == [(2, 1, True, 0, True), (1, 2, True, 0, True), (0, 2, True, 1, True)]
    assert [v.sides for v in ras] == [("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I")]
    assert [v.axis for v in plane_views(np.zeros((4, 4)), SHAPE, (0, 0, 0))] == [2, 1, 0]  # unorientable: taken as RAS


def test_identity_slices_are_the_images(pair: ImagePair) -> None:
    s = qc_slices(pair, lambda x: x)
    assert s.index == (12, 13, 11)
    assert [v.name for v in s.planes] == ["axial", "coronal", "sagittal"] and [v.axis for v in s.planes] == NORMALS
    assert [d.shape for d in s.det] == PLANE_SHAPES
    assert [p.shape for p in s.phi_vox] == [(*ps, 3) for ps in PLANE_SHAPES]
    mov = pair.moving[0, 0].numpy()
    # axial by hand: the slice normal to axis 1, axis 2 (A) up the rows, axis 0 (toward L) along the columns
    np.testing.assert_allclose(s.warped[0], np.take(mov, 13, axis=1).T[::-1], atol=1e-5)
    assert s.warped_labels is not None and s.fixed_labels is not None
    ml = pair.moving_labels[0, 0].numpy()  # type: ignore[index]
    for r, view in enumerate(s.planes):
        np.testing.assert_allclose(s.warped[r], view.orient(np.take(mov, view.index, axis=view.axis)), atol=1e-5)
        np.testing.assert_allclose(s.det[r], 1.0, atol=1e-4)
        np.testing.assert_array_equal(s.warped_labels[r], view.orient(np.take(ml, view.index, axis=view.axis)))
        # identity phi lands on its own pixel: display (column, row) of pixel (i, j) is (j, i)
        rows, cols = np.meshgrid(np.arange(view.shape[0]), np.arange(view.shape[1]), indexing="ij")
        np.testing.assert_allclose(view.to_display(s.phi_vox[r]), np.stack([cols, rows], axis=-1), atol=1e-4)
        np.testing.assert_allclose(s.phi_vox[r][..., view.axis], view.index, atol=1e-4)
    assert s.folds == 0


def test_mirror_folds_every_slice_voxel(pair: ImagePair) -> None:
    s = qc_slices(pair, flip0)
    assert s.folds == sum(a * b for a, b in PLANE_SHAPES)
    for r in range(3):
        np.testing.assert_allclose(s.det[r], -1.0, atol=1e-4)
    # axis 0 runs along the axial and coronal columns: the warped slice is the moving one left-right mirrored
    np.testing.assert_allclose(s.warped[0], s.moving[0][:, ::-1], atol=1e-5)
    np.testing.assert_allclose(s.warped[1], s.moving[1][:, ::-1], atol=1e-5)


ODD = (9, 11, 7)  # odd sizes: the middle voxel is the same anatomical point whichever way an axis runs


def _ras_to_lia(x: torch.Tensor) -> torch.Tensor:
    """Normalized RAS-array point -> the same anatomical point in the LIA array (flips are exact: -x)."""
    return torch.stack([-x[..., 0], -x[..., 2], x[..., 1]], dim=-1)


def _lia_to_ras(y: torch.Tensor) -> torch.Tensor:
    return torch.stack([-y[..., 0], y[..., 2], -y[..., 1]], dim=-1)


def _anatomical_wave(x: torch.Tensor) -> torch.Tensor:
    """A smooth non-symmetric transform in RAS-array normalized coordinates (det J varies)."""
    return x + 0.15 * torch.sin(3.0 * x + 0.5) + 0.05 * torch.sin(2.0 * x[..., [2, 0, 1]]) + torch.tensor([0.05, -0.1, 0.15])


def _ras_and_lia_pairs() -> tuple[ImagePair, ImagePair]:
    """One anatomy stored RAS (anisotropic 1 x 2 x 3 mm) and LIA, with markers at known corners."""
    gen = np.random.default_rng(0)
    fixed = gen.random(ODD).astype(np.float32)
    moving = gen.random(ODD).astype(np.float32)
    fixed[ODD[0] - 1, ODD[1] - 1, ODD[2] // 2] = 5.0  # right, anterior, mid S: top-left of the axial slice
    fixed[ODD[0] - 1, ODD[1] // 2, ODD[2] - 1] = 6.0  # right, mid A, superior: top-left of the coronal slice
    fixed[ODD[0] // 2, ODD[1] - 1, ODD[2] - 1] = 7.0  # mid R/L, anterior, superior: top-left of the sagittal slice
    labels = gen.integers(0, 4, ODD).astype(np.int32)
    ras_affine = np.diag([1.0, 2.0, 3.0, 1.0])
    to_lia = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("LIA"))
    out = []
    for flip in (False, True):
        vols = [fixed, moving, labels, labels[::-1].copy()]
        affine = ras_affine
        if flip:
            imgs = [nib.Nifti1Image(v, ras_affine).as_reoriented(to_lia) for v in vols]
            vols, affine = [np.asarray(i.dataobj) for i in imgs], imgs[0].affine
            assert nib.aff2axcodes(affine) == ("L", "I", "A")
        t = [torch.as_tensor(np.ascontiguousarray(v))[None, None] for v in vols]
        out.append(ImagePair(fixed=t[0], moving=t[1], moving_raw=t[1], fixed_affine=affine, fixed_labels=t[2], moving_labels=t[3]))
    return out[0], out[1]


def test_same_anatomy_in_lia_and_ras_is_displayed_the_same() -> None:
    ras, lia = _ras_and_lia_pairs()
    a = qc_slices(ras, _anatomical_wave)
    b = qc_slices(lia, lambda y: _ras_to_lia(_anatomical_wave(_lia_to_ras(y))))
    assert a.index != b.index  # different array slices ...
    for r, (va, vb) in enumerate(zip(a.planes, b.planes, strict=True)):
        assert (va.name, va.shape, va.sides) == (vb.name, vb.shape, vb.sides)
        assert va.aspect(a.spacing) == vb.aspect(b.spacing)  # ... the same mm per pixel
        for key in ("fixed", "moving", "fixed_labels", "warped_labels"):  # copied voxels: exactly equal
            np.testing.assert_array_equal(getattr(a, key)[r], getattr(b, key)[r], err_msg=f"{va.name} {key}")
        np.testing.assert_allclose(a.warped[r], b.warped[r], atol=1e-6)  # interpolated: float rounding only
        np.testing.assert_allclose(a.det[r], b.det[r], atol=1e-4)
        np.testing.assert_allclose(va.to_display(a.phi_vox[r]), vb.to_display(b.phi_vox[r]), atol=1e-4)
    assert np.ptp(np.concatenate([d.ravel() for d in a.det])) > 0.3  # the wave is not a trivial field
    for s in (a, b):  # the markers sit at the top-left: R (axial, coronal) / A (sagittal) left, A / S up
        assert [float(f[0, 0]) for f in s.fixed] == [5.0, 6.0, 7.0]


def test_side_letters_and_row_names() -> None:
    ras, lia = _ras_and_lia_pairs()
    for p in (ras, lia):
        fig = qc_figure(qc_slices(p, lambda x: x), dpi=30)
        grid = np.array(fig.axes[:24], dtype=object).reshape(3, 8)
        assert [ax.get_ylabel().split(" ")[0] for ax in grid[:, 0]] == ["axial", "coronal", "sagittal"]
        for ax, (left, right, top, bottom) in zip(grid[:, 0], [("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I")], strict=True):
            at = {t.get_text(): t.get_position() for t in ax.texts}  # axes fractions: (0, 0) lower left
            assert set(at) == {left, right, top, bottom}
            assert at[left][0] < 0.1 and at[right][0] > 0.9 and at[top][1] > 0.9 and at[bottom][1] < 0.1
        # the images are drawn with row 0 at the top (the marker pixel (0, 0) at the upper left)
        assert all(ax.images[0].origin == "upper" for ax in grid.flat)


def wave(x: torch.Tensor) -> torch.Tensor:
    """A smooth transform whose det J varies (about 0.7 .. 1.1 on the tiny grid)."""
    return x + 0.15 * torch.sin(4.0 * x[..., [1, 2, 0]])


def test_dense_phi_matches_transform_and_dense_det(pair: ImagePair) -> None:
    phi = wave(identity_grid(SHAPE))
    det = jacobian_determinant(normalized_to_voxel_displacement(phi, SHAPE)).numpy()
    index = (3, 20, 0)  # the coronal plane (normal to axis 2) on the border: one-sided differences, as in the dense det
    a = qc_slices(pair, wave, index=index)
    b = qc_slices(pair, phi=phi, index=index)
    assert [v.index for v in b.planes] == [20, 0, 3]
    for r, view in enumerate(b.planes):
        np.testing.assert_allclose(a.phi_vox[r], b.phi_vox[r], atol=1e-4)
        np.testing.assert_allclose(a.det[r], b.det[r], atol=1e-3)
        np.testing.assert_allclose(b.det[r], view.orient(np.take(det, view.index, axis=view.axis)), atol=1e-3)
    assert np.ptp(np.concatenate([d.ravel() for d in b.det])) > 0.3  # not a trivial (constant) det


def test_bad_arguments_are_refused(pair: ImagePair) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        qc_slices(pair)
    with pytest.raises(ValueError, match="exactly one"):
        qc_slices(pair, lambda x: x, phi=torch.zeros(*SHAPE, 3))
    with pytest.raises(ValueError, match=r"phi must have shape \(24, 26, 22, 3\)"):
        qc_slices(pair, phi=torch.zeros(4, 4, 4, 3))
    with pytest.raises(ValueError, match="inside the grid"):
        qc_slices(pair, lambda x: x, index=(0, 26, 0))


@pytest.mark.parametrize("labels", [True, False])
def test_figure_panels_and_size(pair: ImagePair, labels: bool) -> None:
    p = pair if labels else _no_labels(pair)
    columns = [*PANELS, LABEL_PANEL] if labels else list(PANELS)
    dpi = 50
    fig = qc_figure(qc_slices(p, flip0), title="t", dpi=dpi)
    ncols = len(columns)
    assert len(fig.axes) == 3 * ncols + 1  # 3 planes x panels + det J colour bar
    assert [ax.get_title() for ax in fig.axes[:ncols]] == columns
    grid = np.array(fig.axes[: 3 * ncols], dtype=object).reshape(3, ncols)
    # every panel shows an image; det J panels carry the fold overlay (folds everywhere)
    assert all(len(ax.images) >= 1 for ax in grid.flat)
    assert [len(ax.images) for ax in grid[:, 6]] == [2, 2, 2]
    assert [ax.get_xlabel() for ax in grid[:, 6]] == [f"{a * b} folded in this slice" for a, b in PLANE_SHAPES]
    # deformed grid: every ceil(n/16)-th displayed row and column, in display pixels
    segs = [next(c for c in ax.collections if isinstance(c, LineCollection)).get_segments() for ax in grid[:, 5]]
    assert [len(g) for g in segs] == [int(np.ceil(h / 2)) + int(np.ceil(w / 2)) for h, w in PLANE_SHAPES]
    h, w = PLANE_SHAPES[0]  # axial: flip0 mirrors the columns, so displayed row 0 runs from column w - 1 to 0
    np.testing.assert_allclose(segs[0][0], np.stack([np.arange(w)[::-1], np.zeros(w)], axis=-1), atol=1e-4)
    assert grid[0, 5].get_xlim() == (-0.5, w - 0.5) and grid[0, 5].get_ylim() == (h - 0.5, -0.5)
    img = qc_image(qc_slices(p, lambda x: x), dpi=dpi)
    assert img.dtype == np.uint8
    assert img.shape == (round((3 * PANEL_INCHES + FOOTER_INCHES) * dpi), round(ncols * PANEL_INCHES * dpi), 4)


def test_identity_figure_has_no_fold_overlay(pair: ImagePair) -> None:
    fig = qc_figure(qc_slices(pair, lambda x: x), dpi=30)
    det_axes = [fig.axes[r * 8 + 6] for r in range(3)]
    assert [len(ax.images) for ax in det_axes] == [1, 1, 1]
    assert [ax.get_xlabel() for ax in det_axes] == ["no folds in this slice"] * 3
    assert fig._suptitle is None  # no title and no metrics: no heading
    assert [t.get_text() for t in fig.texts] == ["det J ≤ 0: 0 folds in these 3 slices"]


def test_whole_volume_metrics_and_slice_folds_are_on_the_figure(pair: ImagePair) -> None:
    s = qc_slices(pair, flip0)
    metrics = {"folding_count": 11, "folding_percent": 0.0123, "dice_before": 0.61, "dice_after": 0.8, "hd95_after": 2.0}
    fig = qc_figure(s, title="out: 200 steps", metrics=metrics, dpi=30)
    heading = fig._suptitle.get_text()
    assert heading == "out: 200 steps | Dice 0.610 → 0.800 · whole volume: 11 folded voxels (0.0123 % of foreground)"
    assert [t.get_text() for t in fig.texts if t is not fig._suptitle] == [f"det J ≤ 0: {s.folds} folds in these 3 slices"]
    assert s.folds == 1724  # 22*24 + 26*24 + 26*22: every slice pixel, not the whole-volume count
    # no label maps: no Dice; missing, NaN or None values are left out
    assert volume_summary(metrics, labels=False) == "whole volume: 11 folded voxels (0.0123 % of foreground)"
    assert volume_summary({"folding_count": 1, "dice_before": None, "dice_after": 0.5}) == "Dice 0.500 · whole volume: 1 folded voxel"
    assert volume_summary({"dice_after": float("nan")}) == volume_summary(None) == ""
    no_labels = qc_figure(qc_slices(_no_labels(pair), lambda x: x), metrics=metrics, dpi=30)
    assert no_labels._suptitle.get_text() == "whole volume: 11 folded voxels (0.0123 % of foreground)"


def test_save_png_round_trip_is_deterministic(pair: ImagePair, tmp_path: Path) -> None:
    metrics = {"folding_count": 3, "folding_percent": 0.5}
    path = save_qc_figure(pair, tmp_path / "sub" / "qc.png", transform=wave, metrics=metrics, dpi=40)
    img = mpimg.imread(path)
    assert img.shape[:2] == (round((3 * PANEL_INCHES + FOOTER_INCHES) * 40), round(8 * PANEL_INCHES * 40))
    assert not list(path.parent.glob(".qc.png*"))  # atomic write leaves no temporary file
    again = save_qc_figure(pair, tmp_path / "again.png", transform=wave, metrics=metrics, dpi=40)
    np.testing.assert_array_equal(mpimg.imread(again), img)


def test_checkerboard_alternates() -> None:
    a, b = np.zeros((6, 9)), np.ones((6, 9))
    cb = checkerboard(a, b, tiles=3)  # tiles of ceil(9/3) = 3 pixels
    assert cb[0, 0] == 0 and cb[0, 3] == 1 and cb[3, 0] == 1 and cb[3, 3] == 0
    assert cb.mean() == pytest.approx(27 / 54)
    with pytest.raises(ValueError, match="one shape"):
        checkerboard(a, np.ones((5, 9)))


def test_outputs_with_the_figure_on_a_thread_and_the_timings(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    """write_outputs renders qc.png beside the NIfTI files (a thread), writes metrics.json last
    with seconds_outputs (and seconds_total from ``started``, the outputs included), and evaluate's
    metrics carry seconds_evaluate >= seconds_scoring > 0."""
    import json

    from nir_lightning.evaluation.evaluate import evaluate
    from nir_lightning.evaluation.outputs import write_outputs
    from nir_lightning.fields import GridDisplacementField

    p = load_pair(tiny_pair["fixed"], tiny_pair["moving"], fixed_labels=tiny_pair["fixed_labels"], moving_labels=tiny_pair["moving_labels"])
    reg = evaluate(GridDisplacementField(), p)
    assert reg.metrics["seconds_evaluate"] >= reg.metrics["seconds_scoring"] > 0
    started = time.perf_counter() - 5.0
    metrics = write_outputs(reg, p, tmp_path / "out", qc_title="tiny", started=started)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["seconds_outputs"] == pytest.approx(metrics["seconds_outputs"]) and metrics["seconds_outputs"] > 0
    assert written["seconds_total"] >= 5.0 + written["seconds_outputs"]
    assert mpimg.imread(tmp_path / "out" / "qc.png").shape[0] > 100
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz", "jacobian_det.nii.gz", "affine.mat"):
        assert (tmp_path / "out" / name).stat().st_size > 0
