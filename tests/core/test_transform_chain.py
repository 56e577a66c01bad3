"""``core.transform_chain``: chains of world matrices and displacements, against SimpleITK.

SimpleITK reads the same files ANTs would (NIfTI images, the ITK displacement field, the ITK
affine .mat), so agreement here means ``antsApplyTransforms`` semantics: composition order,
LPS/RAS, the half-voxel inside test and border clamping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from nir_lightning.coords import ras_to_lps, voxel_to_world, world_to_voxel
from nir_lightning.core.transform_chain import DisplacementStep, MatrixStep, Step, resample, transform_points
from nir_lightning.io import load_displacement_itk, save_displacement_itk, save_itk_affine, save_nifti

MOVING_SHAPE = (14, 15, 16)
REF_SHAPE = (12, 13, 11)


def oblique(spacing: tuple[float, float, float], angles: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


MOVING_AFFINE = oblique((1.2, 1.0, 0.9), (5, -7, 3), (-8, -9, -7))
REF_AFFINE = oblique((1.1, 1.3, 1.0), (-4, 2, 6), (-6, -8, -5))
FIELD_AFFINE = oblique((2.5, 2.4, 2.6), (2, 3, -1), (-7, -9, -6))  # a coarse grid of its own


def world() -> np.ndarray:
    w = np.eye(4)
    w[:3, :3] = 1.03 * Rotation.from_euler("xyz", (3, -2, 4), degrees=True).as_matrix()
    w[:3, 3] = (0.7, -0.4, 0.5)
    return w


def smooth_image(shape: tuple[int, int, int]) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (np.sin(i / 3.0) + np.cos(j / 4.0) * np.sin(k / 2.5 + 1)).astype(np.float32)  # values in [-2, 2]


def random_field(shape: tuple[int, int, int], scale: float = 1.5, seed: int = 0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=(*shape, 3))).astype(np.float32)


def ref_voxel_points() -> np.ndarray:
    v = np.stack(np.meshgrid(*[np.arange(n) for n in REF_SHAPE], indexing="ij"), axis=-1).astype(np.float64)
    return voxel_to_world(v, REF_AFFINE)


def off_boundary(chain: list[Step], margin: float = 1e-3) -> np.ndarray:
    """Reference voxels whose point in the moving image is not within ``margin`` voxels of the
    inside/outside boundary ``-0.5`` / ``n - 0.5`` (float rounding may put those either side)."""
    p = transform_points(ref_voxel_points().reshape(-1, 3), chain).numpy()
    mv = world_to_voxel(p, MOVING_AFFINE).reshape(*REF_SHAPE, 3)
    n = np.asarray(MOVING_SHAPE)
    return np.minimum(np.abs(mv + 0.5), np.abs(mv - (n - 0.5))).min(axis=-1) > margin


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    save_nifti(smooth_image(MOVING_SHAPE), MOVING_AFFINE, tmp_path / "moving.nii.gz")
    save_nifti(np.zeros(REF_SHAPE, np.float32), REF_AFFINE, tmp_path / "fixed.nii.gz")
    save_itk_affine(world(), tmp_path / "affine.mat")
    save_displacement_itk(random_field((6, 7, 5)), FIELD_AFFINE, tmp_path / "coarse.nii.gz")
    save_displacement_itk(random_field(REF_SHAPE, 1.0, seed=1), REF_AFFINE, tmp_path / "on_grid.nii.gz")
    return {p.name.split(".")[0]: p for p in tmp_path.iterdir()}


def sitk_resample(files: dict[str, Path], transform: sitk.Transform, interpolator: int = sitk.sitkLinear) -> np.ndarray:
    moving, fixed = sitk.ReadImage(str(files["moving"])), sitk.ReadImage(str(files["fixed"]))
    out = sitk.Resample(moving, fixed, transform, interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # SimpleITK arrays are (k, j, i)


def sitk_field(path: Path) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))


def ours(chain: list[Step], mode: str = "linear") -> np.ndarray:
    img = torch.from_numpy(smooth_image(MOVING_SHAPE))[None]
    return resample(img, MOVING_AFFINE, REF_SHAPE, REF_AFFINE, chain, mode=mode, max_points=300)[0].numpy()  # type: ignore[arg-type]


def test_identity_chain_reproduces_the_image() -> None:
    img = torch.from_numpy(smooth_image(REF_SHAPE))[None]
    zero_field = DisplacementStep(np.zeros((4, 5, 6, 3), np.float32), FIELD_AFFINE)  # off-grid: interpolated
    for chain in ([], [MatrixStep(np.eye(4))], [zero_field], [DisplacementStep(np.zeros((*REF_SHAPE, 3), np.float32), REF_AFFINE)]):
        for mode in ("linear", "nearest", "label"):
            out = resample(img, REF_AFFINE, REF_SHAPE, REF_AFFINE, chain, mode=mode)
            # float64 voxel indices within ~1e-15 of integers: exact up to float32 rounding
            torch.testing.assert_close(out, img, atol=2e-7, rtol=0)
    ident = resample(img, np.eye(4), REF_SHAPE, np.eye(4), [MatrixStep(np.eye(4))])
    assert torch.equal(ident, img)  # no interpolation error at all on an identity affine


def test_a_world_matrix_matches_simpleitk(files: dict[str, Path]) -> None:
    chain: list[Step] = [MatrixStep(world())]
    theirs = sitk_resample(files, sitk.ReadTransform(str(files["affine"])))
    mine = ours(chain)
    keep = off_boundary(chain)
    assert keep.mean() > 0.99 and np.count_nonzero(mine) > 0.7 * mine.size  # most voxels land inside
    # everywhere, edge voxels included (same half-voxel rule and border clamping as ITK);
    # measured max 1.8e-7 on values in [-2, 2]
    np.testing.assert_allclose(mine[keep], theirs[keep], atol=1e-5, rtol=0)


def test_displacement_then_matrix_matches_a_simpleitk_composite(files: dict[str, Path]) -> None:
    """The composition-order test: ``p -> W (p + u(p))``, ANTs' ``-t displacement -t affine``.

    SimpleITK's (ITK's) CompositeTransform is a stack: the transform added *last* acts on the
    point *first*, ``T(p) = T_0(T_1(p))``. ANTs builds it the same way from ``-t displacement
    -t affine`` (the affine added first), so the displacement is added after the affine here.
    The assertion just below pins that order down.
    """
    affine, field = sitk.ReadTransform(str(files["affine"])), sitk_field(files["coarse"])
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(field)
    p = (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(composite.TransformPoint(p), affine.TransformPoint(field.TransformPoint(p)))
    assert not np.allclose(composite.TransformPoint(p), field.TransformPoint(affine.TransformPoint(p)), atol=1e-3)

    disp, _ = _field_of(files["coarse"])
    chain: list[Step] = [DisplacementStep(disp, FIELD_AFFINE), MatrixStep(world())]
    # points: inside, in the half-voxel band and outside the field's grid alike
    pts = np.random.default_rng(5).uniform(-14, 14, size=(500, 3))
    theirs_pts = np.array([ras_to_lps(np.array(composite.TransformPoint(tuple(ras_to_lps(q))))) for q in pts])
    np.testing.assert_allclose(transform_points(pts, chain).numpy(), theirs_pts, atol=1e-5)  # measured 1.1e-6 mm

    keep = off_boundary(chain)
    np.testing.assert_allclose(ours(chain)[keep], sitk_resample(files, composite)[keep], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours(chain, "nearest")[keep], sitk_resample(files, composite, sitk.sitkNearestNeighbor)[keep])


def test_a_displacement_on_the_reference_grid_is_read_directly(files: dict[str, Path]) -> None:
    disp, aff = _field_of(files["on_grid"])
    step = DisplacementStep(disp, aff)
    assert step.on_grid(REF_SHAPE, REF_AFFINE)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(files["affine"])))
    composite.AddTransform(sitk_field(files["on_grid"]))
    chain: list[Step] = [step, MatrixStep(world())]
    keep = off_boundary(chain)
    np.testing.assert_allclose(ours(chain)[keep], sitk_resample(files, composite)[keep], atol=1e-5, rtol=0)
    # the direct read and the interpolation agree (the interpolated path sits on the voxels)
    interpolated: list[Step] = [MatrixStep(np.eye(4)), step, MatrixStep(world())]  # not first: interpolated
    np.testing.assert_allclose(ours(interpolated)[keep], ours(chain)[keep], atol=1e-5, rtol=0)  # measured 1.3e-6


def _field_of(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_displacement_itk(path)


# -- labels ---------------------------------------------------------------------------------
LABELS = (0, 2, 5, 7)


def label_map(shape: tuple[int, int, int] = (10, 11, 9), seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    coarse = rng.choice(LABELS, size=(4, 4, 4))
    idx = [np.minimum(np.arange(n) * 4 // n, 3) for n in shape]
    return torch.from_numpy(coarse[np.ix_(*idx)].astype(np.float32))[None]  # blocks: label edges


def label_chain(shape: tuple[int, int, int]) -> list[Step]:
    return [DisplacementStep(random_field((4, 4, 4), 0.8, seed=3), np.diag([3.0, 3.0, 3.0, 1.0])), MatrixStep(world())]


def test_label_mode_keeps_labels_and_is_the_one_hot_arg_max() -> None:
    labels = label_map()
    shape = tuple(labels.shape[1:])
    chain = label_chain(shape)  # type: ignore[arg-type]
    out = resample(labels, np.eye(4), shape, np.eye(4), chain, mode="label", max_points=200)  # type: ignore[arg-type]
    assert set(out.unique().tolist()) <= set(LABELS)
    # reference: every label's indicator through the linear mode, then the arg-max (ties -> smaller label)
    onehot = torch.cat([(labels == lab).float() for lab in LABELS])
    prob = resample(onehot, np.eye(4), shape, np.eye(4), chain, mode="linear")  # type: ignore[arg-type]
    top2 = prob.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5  # not a (near) tie
    expected = torch.tensor(LABELS, dtype=torch.float32)[prob.argmax(dim=0)]
    outside = prob.amax(dim=0) == 0  # mapped outside the label map: the fill value
    assert clear.float().mean() > 0.6 and outside.any()
    assert torch.equal(out[0][clear], expected[clear]) and torch.all(out[0][outside] == 0)
    # an exact tie (half a voxel between two labels) goes to the smaller label
    two = torch.tensor([5.0, 2.0]).reshape(1, 2, 1, 1)
    half = np.eye(4)
    half[0, 3] = 0.5
    assert resample(two, np.eye(4), (1, 1, 1), np.eye(4), [MatrixStep(half)], mode="label").item() == 2.0


def test_label_mode_equals_nearest_on_an_identity_chain() -> None:
    labels = label_map(seed=1)
    shape = tuple(labels.shape[1:])
    a = oblique((1.0, 1.2, 0.8), (10, 0, -5), (3, 4, 5))
    lab = resample(labels, a, shape, a, [MatrixStep(np.eye(4))], mode="label")  # type: ignore[arg-type]
    near = resample(labels, a, shape, a, [], mode="nearest")  # type: ignore[arg-type]
    assert torch.equal(lab, near) and torch.equal(lab, labels)


def test_label_mode_skips_only_cells_of_one_label_bit_for_bit() -> None:
    """The arg-max loop runs only where a cell's 8 corners disagree; everywhere the result is the
    loop's own, bit for bit (2 channels, half-voxel shifts: many ties)."""
    from nir_lightning.core.transform_chain import _Grid, _label, _label_argmax

    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 3, (9 * 10 * 11, 2), generator=gen).float()
    values[: 9 * 10 * 5] = 1.0  # a block of one label: cells whose corners agree
    grid = _Grid((9, 10, 11), np.eye(4), torch.device("cpu"))
    vox = torch.rand(4000, 3, generator=gen, dtype=torch.float64) * torch.tensor([8.0, 9.0, 10.0])
    vox[:1000] = vox[:1000].floor() + 0.5  # exact ties between corners
    stencil = grid.corners(vox)
    everywhere = _label_argmax([values[idx] for idx, _ in stencil], [w for _, w in stencil])
    assert torch.equal(_label(values, grid, vox), everywhere)


def test_label_mode_follows_a_staircase_edge_better_than_nearest() -> None:
    """A tilted plane sampled on voxels is a staircase. Shifted by half a voxel on every axis,
    nearest moves it by a whole voxel (halves round up, as in ITK); the interpolated one-hot
    follows the true plane. Measured: 720 vs 247 wrong voxels of 13824."""
    n = 24
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64)] * 3, indexing="ij")

    def plane(s: float) -> np.ndarray:
        return ((i + s) + 0.6 * (j + s) + 0.3 * (k + s) < 20.3).astype(np.float32)

    shift = np.eye(4)
    shift[:3, 3] = 0.5
    labels = torch.from_numpy(plane(0.0))[None]
    truth = torch.from_numpy(plane(0.5))
    wrong = {
        mode: int((resample(labels, np.eye(4), (n, n, n), np.eye(4), [MatrixStep(shift)], mode=mode)[0] != truth).sum())
        for mode in ("nearest", "label")
    }
    assert wrong["label"] < 0.5 * wrong["nearest"], wrong


def test_chunking_does_not_change_the_result() -> None:
    labels = label_map()
    shape = tuple(labels.shape[1:])
    chain = label_chain(shape)  # type: ignore[arg-type]
    for mode in ("linear", "nearest", "label"):
        a = resample(labels, np.eye(4), shape, np.eye(4), chain, mode=mode, max_points=1)  # type: ignore[arg-type]
        b = resample(labels, np.eye(4), shape, np.eye(4), chain, mode=mode)  # type: ignore[arg-type]
        assert torch.equal(a, b)


def test_one_pass_of_several_images_gives_each_ones_own_result_bit_for_bit() -> None:
    """resample_many (evaluate's image, nearest labels and label interpolation in one pass, the
    trilinear stencil shared by the linear and label jobs) equals resample of each alone."""
    from nir_lightning.core.transform_chain import resample_many

    labels = label_map(seed=2)
    shape = tuple(labels.shape[1:])
    chain = label_chain(shape)  # type: ignore[arg-type]
    image = torch.rand(labels.shape, generator=torch.Generator().manual_seed(4)) * 100
    jobs = [(image, "linear"), (labels, "nearest"), (labels, "label")]
    together = resample_many(jobs, np.eye(4), shape, np.eye(4), chain, max_points=97)  # type: ignore[arg-type]
    for (img, mode), got in zip(jobs, together, strict=True):
        alone = resample(img, np.eye(4), shape, np.eye(4), chain, mode=mode)  # type: ignore[arg-type]
        assert torch.equal(got, alone), mode
    assert not torch.equal(together[1], together[2])  # the two label modes differ somewhere: both were exercised


def test_outside_gets_fill_and_bad_arguments_are_refused() -> None:
    img = torch.ones(1, 3, 3, 3)
    far = np.eye(4)
    far[:3, 3] = 100.0
    assert torch.all(resample(img, np.eye(4), (2, 2, 2), np.eye(4), [MatrixStep(far)], fill=-3.0) == -3.0)
    with pytest.raises(ValueError, match="image must be"):
        resample(img[0], np.eye(4), (2, 2, 2), np.eye(4), [])
    with pytest.raises(ValueError, match="mode must be"):
        resample(img, np.eye(4), (2, 2, 2), np.eye(4), [], mode="cubic")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"chain\[0\]"):
        resample(img, np.eye(4), (2, 2, 2), np.eye(4), [np.eye(4)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="singular"):
        MatrixStep(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"\(D0, D1, D2, 3\)"):
        DisplacementStep(np.zeros((2, 2, 2)), np.eye(4))
