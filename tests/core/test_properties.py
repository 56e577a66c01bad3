"""Property tests (hypothesis): the coordinate convention, the samplers, the folding metric.

Random shapes, affines, strides, patches and masks; each property is an identity that must hold
for all of them, not a number for one example.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nir_lightning.coords import (
    identity_grid,
    normalized_to_voxel,
    normalized_to_voxel_scale,
    ras_to_lps,
    voxel_displacement_to_world,
    voxel_spacing,
    voxel_to_normalized,
    voxel_to_world,
    world_to_voxel,
)
from nir_lightning.core.jacobian import chunked_jacobian_determinant, jacobian_determinant
from nir_lightning.errors import InputError
from nir_lightning.evaluation.metrics import folding
from nir_lightning.sampling import DownsizeSampler, MinipatchSampler, RandomSampler

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(*[st.integers(1, 64)] * 3)
shapes2 = st.tuples(*[st.integers(2, 24)] * 3)  # folding needs >= 2 voxels per axis
seeds = st.integers(0, 2**31 - 1)


@st.composite
def affines(draw: st.DrawFn) -> np.ndarray:
    """Rotation (any, incl. reflections) x anisotropic spacing + translation: what NIfTI headers hold."""
    rng = np.random.default_rng(draw(seeds))
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    spacing = np.array([draw(st.floats(0.2, 5.0)) for _ in range(3)])
    a = np.eye(4)
    a[:3, :3] = q * spacing
    a[:3, 3] = [draw(st.floats(-300, 300)) for _ in range(3)]
    return a


def _voxels(shape: tuple[int, int, int], rng: np.random.Generator, n: int = 50) -> np.ndarray:
    return rng.uniform(0, 1, size=(n, 3)) * (np.array(shape) - 1)


# -- coordinates ----------------------------------------------------------------------------------------
@SETTINGS
@given(shape=shapes, seed=seeds)
def test_voxel_normalized_round_trip(shape: tuple[int, int, int], seed: int) -> None:
    vox = torch.as_tensor(_voxels(shape, np.random.default_rng(seed)), dtype=torch.float64)
    x = voxel_to_normalized(vox, shape)
    assert bool((x.abs() <= 1 + 1e-12).all())
    assert torch.allclose(normalized_to_voxel(x, shape), vox, atol=1e-9)
    corners = torch.tensor([[0.0, 0.0, 0.0], [s - 1.0 for s in shape]], dtype=torch.float64)
    expected = torch.tensor([[-1.0 if s > 1 else 0.0 for s in shape], [1.0 if s > 1 else 0.0 for s in shape]], dtype=torch.float64)
    assert torch.allclose(voxel_to_normalized(corners, shape), expected, rtol=0, atol=1e-12)  # align_corners=True: end voxel centres


@SETTINGS
@given(shape=shapes, seed=seeds)
def test_identity_grid_is_the_normalized_voxel_lattice(shape: tuple[int, int, int], seed: int) -> None:
    grid = identity_grid(shape, dtype=torch.float64)
    vox = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), dim=-1)
    assert torch.allclose(grid, voxel_to_normalized(vox, shape), atol=1e-12)


@SETTINGS
@given(shape=shapes, seed=seeds)
def test_normalized_displacements_scale_to_voxels(shape: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.uniform(-1, 1, (20, 3)))
    dx = torch.as_tensor(rng.normal(0, 0.1, (20, 3)))
    moved = normalized_to_voxel(x + dx, shape) - normalized_to_voxel(x, shape)
    assert torch.allclose(moved, dx * normalized_to_voxel_scale(shape).double(), atol=1e-9)


@SETTINGS
@given(affine=affines(), shape=shapes, seed=seeds)
def test_voxel_world_round_trip(affine: np.ndarray, shape: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    vox = _voxels(shape, rng)
    world = voxel_to_world(vox, affine)
    assert np.allclose(world_to_voxel(world, affine), vox, atol=1e-8)
    # displacements: world(v + d) - world(v) = A3x3 d, whatever the translation
    d = rng.normal(size=vox.shape)
    assert np.allclose(voxel_to_world(vox + d, affine) - world, voxel_displacement_to_world(d, affine), atol=1e-8)
    assert np.allclose(voxel_spacing(affine), np.linalg.norm(affine[:3, :3], axis=0))


@SETTINGS
@given(v=arrays(np.float64, (7, 3), elements=st.floats(-1e3, 1e3)))
def test_ras_lps_flip_is_its_own_inverse(v: np.ndarray) -> None:
    lps = ras_to_lps(v)
    assert np.array_equal(lps[:, 2], v[:, 2]) and np.array_equal(lps[:, :2], -v[:, :2])
    assert np.array_equal(ras_to_lps(lps), v)


# -- samplers ---------------------------------------------------------------------------------------------
def _as_voxels(points: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    vox = normalized_to_voxel(points.double(), shape)
    assert torch.allclose(vox, vox.round(), atol=1e-4), "samples are voxel centres"
    return vox.round().long()


def _in_bounds(vox: torch.Tensor, shape: tuple[int, int, int]) -> bool:
    return bool(((vox >= 0) & (vox <= torch.tensor(shape) - 1)).all())


@st.composite
def masks(draw: st.DrawFn, shape: tuple[int, int, int]) -> torch.Tensor | None:
    if draw(st.booleans()):
        return None
    gen = torch.Generator().manual_seed(draw(seeds))
    mask = torch.rand(shape, generator=gen) < draw(st.floats(0.001, 0.5))
    mask[tuple(draw(st.integers(0, s - 1)) for s in shape)] = True  # never empty
    return mask


@SETTINGS
@given(data=st.data(), stride=st.integers(1, 5), seed=seeds)
def test_downsize_sampler_is_a_full_stride_lattice(data: st.DataObject, stride: int, seed: int) -> None:
    shape = data.draw(st.tuples(*[st.integers(stride, 40)] * 3))
    s = DownsizeSampler(stride=stride).sample(shape, generator=torch.Generator().manual_seed(seed))
    assert s.spacing == (float(stride),) * 3 and s.points.shape[0] == 1
    vox = _as_voxels(s.points[0], shape)
    assert _in_bounds(vox, shape)
    for axis in range(3):
        line = vox.movedim(axis, 0)[:, 0, 0, axis]
        offset = int(line[0])
        assert 0 <= offset < stride
        assert torch.equal(line, torch.arange(offset, shape[axis], stride))  # regular, and reaches the far end


@SETTINGS
@given(data=st.data(), patch=st.integers(2, 12), n=st.integers(1, 4), seed=seeds)
def test_minipatch_sampler_gives_whole_cubes_inside_the_image(data: st.DataObject, patch: int, n: int, seed: int) -> None:
    shape = data.draw(st.tuples(*[st.integers(patch, 30)] * 3))
    mask = data.draw(masks(shape))
    s = MinipatchSampler(num_patches=n, patch_size=patch).sample(shape, generator=torch.Generator().manual_seed(seed), mask=mask)
    assert s.spacing == (1.0, 1.0, 1.0) and tuple(s.points.shape) == (n, patch, patch, patch, 3)
    vox = _as_voxels(s.points, shape)
    assert _in_bounds(vox, shape)
    offsets = torch.stack(torch.meshgrid(*[torch.arange(patch)] * 3, indexing="ij"), dim=-1)
    for cube in vox:
        assert torch.equal(cube - cube[0, 0, 0], offsets)  # contiguous, full resolution
        if mask is not None:
            assert bool(mask[cube[..., 0], cube[..., 1], cube[..., 2]].any())  # centred on foreground


@SETTINGS
@given(data=st.data(), num=st.integers(2, 300), seed=seeds)
def test_random_sampler_stays_on_voxels_and_in_the_mask(data: st.DataObject, num: int, seed: int) -> None:
    shape = data.draw(shapes)
    mask = data.draw(masks(shape))
    s = RandomSampler(num_points=num).sample(shape, generator=torch.Generator().manual_seed(seed), mask=mask)
    assert s.spacing is None and tuple(s.points.shape) == (1, num, 1, 1, 3)
    vox = _as_voxels(s.points.reshape(-1, 3), shape)
    assert _in_bounds(vox, shape)
    if mask is not None:
        assert bool(mask[vox[:, 0], vox[:, 1], vox[:, 2]].all())


@SETTINGS
@given(patch=st.integers(3, 20), data=st.data())
def test_an_image_smaller_than_the_patch_is_a_clear_error(patch: int, data: st.DataObject) -> None:
    shape = data.draw(st.tuples(*[st.integers(1, 40)] * 3))
    assume(min(shape) < patch)
    with pytest.raises(InputError, match=rf"patch_size={patch}\) needs a 3D image of at least {patch} voxels .*smaller patch_size"):
        MinipatchSampler(patch_size=patch).sample(shape, generator=torch.Generator().manual_seed(0))


# -- folding -------------------------------------------------------------------------------------------------
@SETTINGS
@given(shape=shapes2, data=st.data())
def test_identity_has_unit_jacobian_and_no_folding(shape: tuple[int, int, int], data: st.DataObject) -> None:
    det = jacobian_determinant(torch.zeros(*shape, 3))
    assert torch.equal(det, torch.ones(shape))
    mask = data.draw(masks(shape))
    assert folding(det, mask) == (0, 0.0)


@SETTINGS
@given(shape=shapes2, affine=affines(), data=st.data())
def test_linear_maps_have_their_determinant_everywhere(shape: tuple[int, int, int], affine: np.ndarray, data: st.DataObject) -> None:
    """u(x) = (A - I) x: finite differences are exact, det J = det A; folded everywhere iff det A < 0."""
    a = affine[:3, :3] / np.abs(np.linalg.det(affine[:3, :3])) ** (1 / 3)  # det +-1, well scaled
    vox = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    disp = torch.as_tensor(vox @ (a - np.eye(3)).T)
    det = jacobian_determinant(disp)
    assert torch.allclose(det, torch.full(shape, float(np.linalg.det(a)), dtype=det.dtype), atol=1e-9)
    count, percent = folding(det)
    n = math.prod(shape)
    assert (count, percent) == ((n, 100.0) if np.linalg.det(a) < 0 else (0, 0.0))


@SETTINGS
@given(shape=st.tuples(*[st.integers(3, 24)] * 3), data=st.data())
def test_a_known_fold_is_counted_exactly(shape: tuple[int, int, int], data: st.DataObject) -> None:
    """Reflect axis ``k`` beyond voxel ``a`` (0 < a < n - 1): phi_k(i) = i for i < a, 2a - i after.
    Central differences give det J = 1 before ``a``, 0 at ``a``, -1 beyond: the slab i >= a folds."""
    k = data.draw(st.integers(0, 2))
    a = data.draw(st.integers(1, shape[k] - 2))
    i = np.arange(shape[k], dtype=np.float64)
    u_k = np.where(i < a, 0.0, 2 * a - 2 * i)
    disp = torch.zeros(*shape, 3, dtype=torch.float64)
    view = [1, 1, 1]
    view[k] = -1
    disp[..., k] = torch.as_tensor(u_k).reshape(view)
    det = jacobian_determinant(disp)
    folded = torch.zeros(shape, dtype=torch.bool)
    folded.narrow(k, a, shape[k] - a).fill_(True)
    assert torch.equal(det <= 0, folded)
    mask = data.draw(masks(shape))
    expected = int(folded.sum()) if mask is None else int((folded & mask).sum())
    assert folding(det, mask)[0] == expected


@SETTINGS
@given(shape=shapes2, max_points=st.integers(1, 2000), seed=seeds)
def test_chunked_jacobian_determinant_is_bitwise_the_dense_one(shape: tuple[int, int, int], max_points: int, seed: int) -> None:
    disp = torch.randn(*shape, 3, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(chunked_jacobian_determinant(disp, max_points=max_points), jacobian_determinant(disp))
