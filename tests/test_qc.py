"""QC figure: slice values against known transforms, panel layout and image size."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection

from nir_lightning.coords import identity_grid
from nir_lightning.metrics import jacobian_determinant
from nir_lightning.pair import ImagePair, load_pair
from nir_lightning.qc import (
    FOOTER_INCHES,
    LABEL_PANEL,
    PANEL_INCHES,
    PANELS,
    checkerboard,
    qc_figure,
    qc_image,
    qc_slices,
    save_qc_figure,
)
from nir_lightning.warp import normalized_to_voxel_displacement

SHAPE = (24, 26, 22)  # conftest.TINY_SHAPE
PLANE_SHAPES = [(26, 22), (24, 22), (24, 26)]


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


def test_identity_slices_are_the_images(pair: ImagePair) -> None:
    s = qc_slices(pair, lambda x: x)
    assert s.index == (12, 13, 11)
    assert [d.shape for d in s.det] == PLANE_SHAPES
    assert [p.shape for p in s.phi_vox] == [(*ps, 3) for ps in PLANE_SHAPES]
    mov = pair.moving[0, 0].numpy()
    for axis in range(3):
        np.testing.assert_allclose(s.warped[axis], np.take(mov, s.index[axis], axis=axis), atol=1e-5)
        np.testing.assert_allclose(s.det[axis], 1.0, atol=1e-4)
        assert s.warped_labels is not None and s.fixed_labels is not None
        ml = pair.moving_labels[0, 0].numpy()  # type: ignore[index]
        np.testing.assert_array_equal(s.warped_labels[axis], np.take(ml, s.index[axis], axis=axis))
    # phi in voxels on plane 0 is (index0, j, k)
    np.testing.assert_allclose(s.phi_vox[0][..., 0], 12.0, atol=1e-4)
    np.testing.assert_allclose(s.phi_vox[0][5, 7, 1:], [5.0, 7.0], atol=1e-4)
    assert s.folds == 0


def test_mirror_folds_every_slice_voxel(pair: ImagePair) -> None:
    s = qc_slices(pair, flip0)
    assert s.folds == sum(a * b for a, b in PLANE_SHAPES)
    for axis in range(3):
        np.testing.assert_allclose(s.det[axis], -1.0, atol=1e-4)
    mov = pair.moving[0, 0].numpy()
    # plane normal to axis 1: the image is mirrored along axis 0 (its first in-plane axis)
    np.testing.assert_allclose(s.warped[1], np.take(mov, 13, axis=1)[::-1], atol=1e-5)


def wave(x: torch.Tensor) -> torch.Tensor:
    """A smooth transform whose det J varies (about 0.7 .. 1.1 on the tiny grid)."""
    return x + 0.15 * torch.sin(4.0 * x[..., [1, 2, 0]])


def test_dense_phi_matches_transform_and_dense_det(pair: ImagePair) -> None:
    phi = wave(identity_grid(SHAPE))
    det = jacobian_determinant(normalized_to_voxel_displacement(phi, SHAPE)).numpy()
    index = (3, 20, 0)  # plane 2 on the border: one-sided differences, as in the dense det
    a = qc_slices(pair, wave, index=index)
    b = qc_slices(pair, phi=phi, index=index)
    for axis, idx in enumerate(index):
        np.testing.assert_allclose(a.phi_vox[axis], b.phi_vox[axis], atol=1e-4)
        np.testing.assert_allclose(a.det[axis], b.det[axis], atol=1e-3)
        np.testing.assert_allclose(b.det[axis], np.take(det, idx, axis=axis), atol=1e-3)
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
    assert [ax.get_xlabel() for ax in grid[:, 6]] == [f"{a * b} folded" for a, b in PLANE_SHAPES]
    # deformed grid: every ceil(n/16)-th line of each in-plane axis
    segs = [len(next(c for c in ax.collections if isinstance(c, LineCollection)).get_segments()) for ax in grid[:, 5]]
    assert segs == [int(np.ceil(h / 2)) + int(np.ceil(w / 2)) for h, w in PLANE_SHAPES]
    img = qc_image(qc_slices(p, lambda x: x), dpi=dpi)
    assert img.dtype == np.uint8
    assert img.shape == (round((3 * PANEL_INCHES + FOOTER_INCHES) * dpi), round(ncols * PANEL_INCHES * dpi), 4)


def test_identity_figure_has_no_fold_overlay(pair: ImagePair) -> None:
    fig = qc_figure(qc_slices(pair, lambda x: x), dpi=30)
    det_axes = [fig.axes[r * 8 + 6] for r in range(3)]
    assert [len(ax.images) for ax in det_axes] == [1, 1, 1]
    assert [ax.get_xlabel() for ax in det_axes] == ["no folds"] * 3


def test_save_png_round_trip(pair: ImagePair, tmp_path: Path) -> None:
    path = save_qc_figure(pair, tmp_path / "sub" / "qc.png", transform=lambda x: x, dpi=40)
    img = mpimg.imread(path)
    assert img.shape[:2] == (round((3 * PANEL_INCHES + FOOTER_INCHES) * 40), round(8 * PANEL_INCHES * 40))
    assert not list(path.parent.glob(".qc.png*"))  # atomic write leaves no temporary file


def test_checkerboard_alternates() -> None:
    a, b = np.zeros((6, 9)), np.ones((6, 9))
    cb = checkerboard(a, b, tiles=3)  # tiles of ceil(9/3) = 3 pixels
    assert cb[0, 0] == 0 and cb[0, 3] == 1 and cb[3, 0] == 1 and cb[3, 3] == 0
    assert cb.mean() == pytest.approx(27 / 54)
    with pytest.raises(ValueError, match="one shape"):
        checkerboard(a, np.ones((5, 9)))
