"""The rigid -> affine stage recovers known world matrices of the phantom.

Convention under test: the world matrix ``W`` maps a fixed world point (RAS mm) to the
moving world point with the same anatomy, ``moving(W p) = fixed(p)``. Two ways to build a
moving image with a known ``W_true``:

* header only: the fixed voxels with the header ``A_m = W_true @ A_f``; voxel ``v`` then sits
  at ``W_true A_f v``, the image of its fixed position ``A_f v``;
* resampled: ``moving(q) = fixed(W_true^-1 q)`` on another grid (spacing 2.5 mm instead of
  2 mm, another orientation, a field of view that cuts part of the phantom off).

Tolerances (stated here, asserted below): rotation error (of the orthogonal polar factor of
``W W_true^-1``) < 1 degree; translation error at the phantom centre < 1 mm; every entry of the
3x3 part within 0.02. The fits use 4096 points per step (instead of the default 8192) to stay fast.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.ndimage import affine_transform

from nir_lightning.alignment import (
    AffineParameters,
    AffineStage,
    RigidParameters,
    center_of_mass,
    initial_world_matrix,
    principal_axes,
)
from nir_lightning.alignment.parameters import rotation_matrix
from nir_lightning.alignment.pyramid import build_level
from nir_lightning.errors import InputError

MAX_ROTATION_DEG = 1.0
MAX_TRANSLATION_MM = 1.0
MAX_ENTRY = 0.02
FAST = {"num_points": 4096}
# Moving grid of the resampled cases: 2.5 mm, axes permuted and flipped against the phantom's
# LSA, and a field of view that cuts the top of the moved phantom off.
MOVING_AFFINE = np.array([[0, 2.5, 0, -60], [2.5, 0, 0, -75], [0, 0, -2.5, 40], [0, 0, 0, 1.0]])
MOVING_SHAPE = (50, 50, 36)


def rodrigues(degrees: float, axis: tuple[float, float, float]) -> np.ndarray:
    v = torch.tensor(axis, dtype=torch.float64)
    return rotation_matrix(v / v.norm() * np.deg2rad(degrees)).numpy()


def true_rigid() -> np.ndarray:
    """17 degrees about an oblique axis, 20 mm translation."""
    w = np.eye(4)
    w[:3, :3] = rodrigues(17.0, (1.0, 2.0, -1.0))
    w[:3, 3] = [12.0, -10.0, 12.5]
    return w


def true_affine() -> np.ndarray:
    """The rigid one with scales 0.92 / 1.08 / 1.03 and a shear of 0.05."""
    w = true_rigid()
    stretch = np.diag([0.92, 1.08, 1.03])
    stretch[0, 1] = 0.05
    w[:3, :3] = w[:3, :3] @ stretch
    return w


def tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]


def resample(image: np.ndarray, affine: np.ndarray, world: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """``moving(q) = fixed(W^-1 q)`` on the grid ``out_affine``: moving voxel u -> fixed voxel ``A_f^-1 W^-1 A_m u``."""
    m = np.linalg.inv(affine) @ np.linalg.inv(world) @ out_affine
    return affine_transform(image, m[:3, :3], m[:3, 3], output_shape=out_shape, order=1)


def moving_for(how: str, image: np.ndarray, affine: np.ndarray, world: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    if how == "header":
        return tensor(image), world @ affine
    return tensor(resample(image, affine, world, MOVING_AFFINE, MOVING_SHAPE)), MOVING_AFFINE


def rotation_error_deg(world: np.ndarray, truth: np.ndarray) -> float:
    u, _, vt = np.linalg.svd(world[:3, :3] @ np.linalg.inv(truth[:3, :3]))
    r = u @ vt
    return float(np.rad2deg(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def translation_error_mm(world: np.ndarray, truth: np.ndarray, centre: np.ndarray) -> float:
    c = np.append(centre, 1.0)
    return float(np.linalg.norm((world @ c - truth @ c)[:3]))


# -- recovery of known transforms --------------------------------------------------------------
@pytest.mark.parametrize("how", ["header", "resampled"])
@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_recovers_a_known_world_matrix(phantom, kind, how):
    image, affine, centre = phantom
    truth = true_rigid() if kind == "rigid" else true_affine()
    moving, moving_affine = moving_for(how, image, affine, truth)
    result = AffineStage(kind=kind, **FAST).fit(tensor(image), affine, moving, moving_affine)
    assert result.world.shape == (4, 4) and result.world.dtype == np.float64
    assert rotation_error_deg(result.world, truth) < MAX_ROTATION_DEG
    assert translation_error_mm(result.world, truth, centre) < MAX_TRANSLATION_MM
    assert np.abs(result.world[:3, :3] - truth[:3, :3]).max() < MAX_ENTRY
    assert result.similarity_after < result.similarity_before - 0.5
    assert result.kind == kind and result.seconds > 0
    stages = [h.stage for h in result.history]  # levels too small to steer (< 16 voxels) are skipped
    expected = ["rigid", "affine"] if kind == "affine" else ["rigid"]
    assert sorted(set(stages), key=expected.index) == expected and stages == sorted(stages, key=expected.index)


@pytest.mark.parametrize("how", ["header", "resampled"])
def test_moments_initialisation_recovers_the_translation(phantom, how):
    """Principal axes + centres of mass alone (no optimisation) put the centre within 2 mm."""
    image, affine, centre = phantom
    truth = true_rigid()
    if how == "header":
        moving, moving_affine = moving_for(how, image, affine, truth)
    else:  # the orientation and spacing of MOVING_AFFINE, with a field of view that holds the
        # whole moved fixed grid, so that the centre of mass is not biased by a cut
        big = MOVING_AFFINE.copy()
        big[:3, 3] = [-55.0, -70.0, 85.0]
        moving, moving_affine = tensor(resample(image, affine, truth, big, (48, 55, 60))), big
    stage = AffineStage(kind="rigid", init="moments", rigid_iterations=(0, 0, 0), **FAST)
    result = stage.fit(tensor(image), affine, moving, moving_affine)
    assert translation_error_mm(result.initial, truth, centre) < 2.0
    np.testing.assert_array_equal(result.world, result.initial)  # no iterations: no change
    assert rotation_error_deg(result.initial, truth) < 5.0  # the right sign choice won


def test_com_initialisation_is_a_translation(phantom):
    image, affine, _ = phantom
    truth = true_rigid()
    moving, moving_affine = moving_for("header", image, affine, truth)
    w = initial_world_matrix(tensor(image), affine, moving, moving_affine, mode="com")
    np.testing.assert_allclose(w[:3, :3], np.eye(3))
    c_f = center_of_mass(tensor(image)[0, 0], affine)
    np.testing.assert_allclose(w[:3, 3] + c_f, truth[:3, :3] @ c_f + truth[:3, 3], atol=1e-6)
    assert initial_world_matrix(tensor(image), affine, moving, moving_affine, mode="none").tolist() == np.eye(4).tolist()


# -- options, determinism, errors ---------------------------------------------------------------
def test_kind_none_is_the_identity_without_optimising(phantom):
    image, affine, _ = phantom
    moving, moving_affine = moving_for("header", image, affine, true_rigid())
    result = AffineStage(kind="none").fit(tensor(image), affine, moving, moving_affine)
    assert result.world.tolist() == np.eye(4).tolist()
    assert result.history == () and result.kind == "none"


def test_fixed_seed_is_deterministic(phantom):
    image, affine, _ = phantom
    moving, moving_affine = moving_for("header", image, affine, true_rigid())
    stage = AffineStage(kind="affine", init="com", rigid_iterations=(5, 3, 2), affine_iterations=(5, 3, 2), num_points=512)
    a = stage.fit(tensor(image), affine, moving, moving_affine).world
    b = stage.fit(tensor(image), affine, moving, moving_affine).world
    c = dataclasses.replace(stage, seed=1).fit(tensor(image), affine, moving, moving_affine).world
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ncc_and_masks(phantom):
    """NCC on the same contrast; masks restrict where points are drawn and which count."""
    image, affine, centre = phantom
    truth = true_rigid()
    moving, moving_affine = moving_for("header", image, affine, truth)
    mask = torch.from_numpy(image > 0.1)
    stage = AffineStage(kind="rigid", similarity="ncc", init="com", **FAST)
    result = stage.fit(tensor(image), affine, moving, moving_affine, fixed_mask=mask, moving_mask=mask)
    assert translation_error_mm(result.world, truth, centre) < MAX_TRANSLATION_MM
    assert rotation_error_deg(result.world, truth) < MAX_ROTATION_DEG
    assert -1.0 <= result.similarity_after < -0.9


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "similarity"),
        ("init", "pca"),
        ("similarity", "lncc"),
        ("num_bins", 1),
        ("num_bins", 32.0),
        ("shrink_factors", ()),
        ("shrink_factors", (4, 0)),
        ("rigid_iterations", (10, 10)),
        ("affine_iterations", (10, -1, 10)),
        ("num_points", 10),
        ("margin", -1.0),
        ("margin", float("inf")),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("seed", "zero"),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(InputError) as info:
        AffineStage(**{field: value})
    assert info.value.owner == "AffineStage" and info.value.param == field
    assert str(info.value).startswith(f"AffineStage.{field} ")


def test_points_come_from_the_foreground_grown_by_the_margin_or_from_the_mask_as_given(phantom):
    """Without a mask the sampling region is the foreground grown by ``margin`` mm (a box of
    3 voxels of 2 mm each way for 6 mm), so both sides of the anatomy's edge are sampled; a
    user's mask is used as given, and ``margin=0`` leaves the foreground as it is."""
    from scipy.ndimage import binary_dilation

    image, affine, _ = phantom
    fixed = tensor(image)
    fg = torch.from_numpy(image > 0.1)

    def region(stage: AffineStage, fixed_mask, foreground) -> np.ndarray:
        level = build_level(1, fixed, affine, fixed, affine, fixed_mask, None, foreground, stage.margin)
        out = np.zeros(int(np.prod(level.fixed_shape)), dtype=bool)
        out[level.region.numpy()] = True
        return out.reshape(level.fixed_shape)

    grown = region(AffineStage(margin=6.0), None, fg)
    expected = binary_dilation(fg.numpy(), structure=np.ones((7, 7, 7), dtype=bool))
    assert expected.sum() > 1.2 * fg.sum()  # the shell is there to be found
    np.testing.assert_array_equal(grown, expected)
    np.testing.assert_array_equal(region(AffineStage(margin=6.0), fg, None), fg.numpy())
    np.testing.assert_array_equal(region(AffineStage(margin=0.0), None, fg), fg.numpy())


def test_lists_from_a_config_become_tuples():
    stage = AffineStage(shrink_factors=[2, 1], rigid_iterations=[3, 2], affine_iterations=[1, 1])  # type: ignore[arg-type]
    assert stage.shrink_factors == (2, 1) and stage.rigid_iterations == (3, 2)


def test_bad_inputs_to_fit(phantom):
    image, affine, _ = phantom
    stage = AffineStage()
    with pytest.raises(InputError, match="fixed_mask"):
        stage.fit(tensor(image), affine, tensor(image), affine, fixed_mask=torch.ones(3, 3, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="moving_affine"):
        stage.fit(tensor(image), affine, tensor(image), np.zeros((4, 4)))
    with pytest.raises(InputError, match=r"\(1, 1, D0, D1, D2\)"):
        stage.fit(tensor(image)[0], affine, tensor(image), affine)


# -- building blocks ------------------------------------------------------------------------------
def test_parameters_rotate_about_the_centre_and_start_at_the_base():
    base = true_rigid()
    centre = np.array([5.0, -3.0, 8.0])
    rigid = RigidParameters(centre, scale=50.0, base=base)
    np.testing.assert_allclose(rigid.numpy(), base, atol=1e-12)
    with torch.no_grad():
        rigid.rotation.copy_(torch.tensor([0.1, -0.2, 0.3]))
    w = rigid.numpy()
    np.testing.assert_allclose(w @ np.append(centre, 1.0), base @ np.append(centre, 1.0), atol=1e-9)
    delta = np.linalg.inv(base) @ w
    np.testing.assert_allclose(delta[:3, :3] @ delta[:3, :3].T, np.eye(3), atol=1e-12)
    affine = AffineParameters(centre, scale=50.0, base=w)
    np.testing.assert_allclose(affine.numpy(), w, atol=1e-12)
    affine.matrix().sum().backward()
    assert affine.delta.grad is not None and affine.translation.grad is not None


def test_moments_follow_the_header(phantom):
    """The centre of mass and principal axes are world quantities: a rotated header moves them."""
    image, affine, _ = phantom
    truth = true_rigid()
    img = tensor(image)[0, 0]
    c = center_of_mass(img, affine)
    np.testing.assert_allclose(center_of_mass(img, truth @ affine), truth[:3, :3] @ c + truth[:3, 3], atol=1e-6)
    vals, vecs = principal_axes(img, affine)
    vals2, vecs2 = principal_axes(img, truth @ affine)
    np.testing.assert_allclose(vals2, vals, rtol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(vecs2 * (truth[:3, :3] @ vecs), axis=0)), 1.0, atol=1e-6)


# -- early stop ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_early_stop_ends_flat_levels_and_keeps_misaligned_results(phantom):
    """An aligned pair (moving = fixed) stops every long level early (well under the 350-step
    budget), and stays at the identity; on a misaligned pair the matrix found with early stop is
    within the recovery tolerances of the full budget's. ``early_stop=False`` runs every step."""
    image, affine, centre = phantom
    aligned = AffineStage(kind="affine", init="none", **FAST).fit(tensor(image), affine, tensor(image), affine)
    budget = sum(AffineStage().rigid_iterations) + sum(AffineStage().affine_iterations)
    assert sum(h.iterations for h in aligned.history) < 0.75 * budget
    assert translation_error_mm(aligned.world, np.eye(4), centre) < MAX_TRANSLATION_MM
    assert np.abs(aligned.world[:3, :3] - np.eye(3)).max() < MAX_ENTRY
    full = AffineStage(kind="affine", init="none", early_stop=False, **FAST).fit(tensor(image), affine, tensor(image), affine)
    assert sum(h.iterations for h in full.history) == budget  # a skipped coarse level's steps run at the next

    truth = true_affine()
    moving, moving_affine = moving_for("header", image, affine, truth)
    early = AffineStage(kind="affine", **FAST).fit(tensor(image), affine, moving, moving_affine)
    whole = AffineStage(kind="affine", early_stop=False, **FAST).fit(tensor(image), affine, moving, moving_affine)
    assert translation_error_mm(early.world, whole.world, centre) < MAX_TRANSLATION_MM
    assert rotation_error_deg(early.world, whole.world) < MAX_ROTATION_DEG
    assert np.abs(early.world[:3, :3] - whole.world[:3, :3]).max() < MAX_ENTRY


def test_the_grown_region_is_the_same_by_running_maximum_and_by_pooling():
    """The CPU dilation (scipy's running maximum) equals ``max_pool3d``'s, voxel for voxel."""
    from nir_lightning.alignment.pyramid import _grown, _grown_by_pooling

    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(17, 12, 9, generator=gen) > 0.93
    for steps in ([0, 0, 0], [1, 2, 3], [5, 0, 11], [20, 20, 20]):
        want = _grown_by_pooling(mask, steps)
        got = _grown(mask, steps)
        assert got.dtype == torch.bool and torch.equal(got, want)
    assert int(_grown(mask, [1, 1, 1]).sum()) > int(mask.sum()) > 0


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_starts_refined_together_take_the_steps_each_would_take_alone(phantom, kind):
    """The ``init="moments"`` probes run as one batch: each start's parameters after the batch
    equal, bit for bit, those of its own refinement (same draws, its own loss and Adam state)."""
    image, affine, centre = phantom
    moving, moving_affine = moving_for("resampled", image, affine, true_rigid())
    stage = AffineStage(kind=kind, **FAST)
    fixed = tensor(image)
    level = build_level(4, fixed, affine, moving, moving_affine, None, None, fixed[0, 0] > 0, stage.margin)
    starts = [np.eye(4), true_rigid(), np.linalg.inv(true_rigid())]
    make = AffineParameters if kind == "affine" else RigidParameters

    def fresh() -> list:
        return [make(centre, scale=40.0, base=w, device="cpu") for w in starts]

    together = fresh()
    stage._refine_together(level, together, 12, 0.04, torch.Generator().manual_seed(5), 1024)
    for start, refined in zip(fresh(), together, strict=True):
        stage._optimise("probe", level, start, 12, 0.04, torch.Generator().manual_seed(5), num_points=1024)
        np.testing.assert_array_equal(refined.numpy(), start.numpy())
    moved = [p.numpy() for p in together]
    assert not np.array_equal(moved[0], starts[0])  # the refinement moved them
