"""The coordinate convention (nir_lightning.coords) and identity warps (nir_lightning.core.resample)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nir_lightning import coords
from nir_lightning.coords import (
    identity_grid,
    lps_to_ras,
    normalized_to_voxel,
    normalized_to_voxel_displacement,
    normalized_to_voxel_scale,
    ras_to_lps,
    to_grid_sample,
    voxel_displacement_to_world,
    voxel_spacing,
    voxel_to_normalized,
    voxel_to_world,
    world_to_voxel,
)
from nir_lightning.core.resample import sample_image, warp_image

shapes = st.tuples(*[st.integers(min_value=2, max_value=40)] * 3)


def _random_affine(seed: int) -> np.ndarray:
    """Rotation x anisotropic scaling (0.5-3 mm, random axis flips) + translation."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    scale = rng.uniform(0.5, 3.0, 3) * rng.choice([-1.0, 1.0], 3)
    a = np.eye(4)
    a[:3, :3] = q @ np.diag(scale)
    a[:3, 3] = rng.uniform(-100, 100, 3)
    return a


# -- normalized <-> voxel <-> world -----------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_voxel_normalized_round_trip(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    vox = torch.rand(50, 3, generator=gen, dtype=torch.float64) * (torch.tensor(shape, dtype=torch.float64) - 1)
    x = voxel_to_normalized(vox, shape)
    assert float(x.abs().max()) <= 1.0 + 1e-12
    back = normalized_to_voxel(x, shape)
    assert torch.allclose(back, vox, atol=1e-9), float((back - vox).abs().max())
    # and the other way round
    x2 = torch.rand(50, 3, generator=gen, dtype=torch.float64) * 2 - 1
    assert torch.allclose(voxel_to_normalized(normalized_to_voxel(x2, shape), shape), x2, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_normalized_voxel_world_round_trip(shape, seed):
    affine = _random_affine(seed)
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.uniform(-1, 1, (40, 3)))
    vox = normalized_to_voxel(x, shape).numpy()
    world = voxel_to_world(vox, affine)
    # world = A [v, 1], written out by hand
    expected = np.c_[vox, np.ones(len(vox))] @ affine.T
    assert np.allclose(world, expected[:, :3], atol=1e-9)
    vox_back = world_to_voxel(world, affine)
    assert np.abs(vox_back - vox).max() < 1e-8
    x_back = voxel_to_normalized(torch.as_tensor(vox_back), shape)
    assert torch.allclose(x_back, x, atol=1e-8)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_voxel_displacement_to_world_is_the_difference_of_points(seed):
    affine = _random_affine(seed)
    rng = np.random.default_rng(seed)
    v = rng.uniform(0, 30, (20, 3))
    d = rng.normal(0, 3, (20, 3))
    got = voxel_displacement_to_world(d, affine)
    want = voxel_to_world(v + d, affine) - voxel_to_world(v, affine)
    assert np.allclose(got, want, atol=1e-9)


def test_voxel_displacement_to_world_is_numpys_float64_product():
    """The torch product gives numpy's float64 matmul (bit for bit on the dev machine for fields;
    both are BLAS kernels chosen per CPU, so only to rounding here)."""
    rng = np.random.default_rng(3)
    affine = _random_affine(3)
    for shape in [(3,), (7, 3), (5, 6, 7, 3)]:
        d = rng.normal(0, 3, shape).astype(np.float32)
        got = voxel_displacement_to_world(d, affine)
        assert got.dtype == np.float64 and got.shape == shape
        assert np.allclose(got, np.asarray(d, dtype=np.float64) @ affine[:3, :3].T, rtol=1e-14, atol=1e-13)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_voxel_spacing_is_the_column_norm(seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    scale = rng.uniform(0.3, 4.0, 3)
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag(scale)
    assert np.allclose(voxel_spacing(affine), scale, atol=1e-9)


def test_known_values():
    shape = (5, 9, 2)
    vox = torch.tensor([[0.0, 0.0, 0.0], [4.0, 8.0, 1.0], [2.0, 4.0, 0.5]])
    x = voxel_to_normalized(vox, shape)
    assert torch.allclose(x, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    # an axis of one voxel maps to 0 and back to voxel 0
    assert float(voxel_to_normalized(torch.tensor([[0.0, 0.0, 0.0]]), (1, 3, 3))[0, 0]) == 0.0
    assert float(normalized_to_voxel(torch.zeros(1, 3), (1, 3, 3))[0, 0]) == 0.0
    assert torch.allclose(normalized_to_voxel_scale((5, 9, 2)), torch.tensor([2.0, 4.0, 0.5]))


def test_non_3d_shape_raises():
    with pytest.raises(ValueError, match="3D"):
        voxel_to_normalized(torch.zeros(1, 3), (4, 4))


# -- identity grid ------------------------------------------------------------------------------
def test_identity_grid_corners_are_plus_minus_one():
    shape = (4, 7, 5)
    g = identity_grid(shape)
    assert g.shape == (*shape, 3)
    for corner in itertools.product((0, 1), repeat=3):
        idx = tuple(-1 if c else 0 for c in corner)
        want = torch.tensor([1.0 if c else -1.0 for c in corner])
        assert torch.equal(g[idx], want), (corner, g[idx])
    assert float(g.abs().max()) == 1.0


def test_identity_grid_axis_order():
    """Component a varies along array axis a only (array-axis order, not grid_sample's)."""
    g = identity_grid((4, 7, 5))
    for a in range(3):
        diffs = torch.diff(g[..., a], dim=a)
        assert bool((diffs > 0).all())
        for b in set(range(3)) - {a}:
            assert float(torch.diff(g[..., a], dim=b).abs().max()) == 0.0


def test_identity_grid_stride_and_offset():
    shape = (10, 9, 8)
    g = identity_grid(shape, stride=3, offset=(0, 1, 2))
    # ceil((n - o) / s)
    assert g.shape == (4, 3, 2, 3)
    vox = normalized_to_voxel(g, shape)
    assert torch.allclose(vox[:, 0, 0, 0], torch.tensor([0.0, 3.0, 6.0, 9.0]), atol=1e-5)
    assert torch.allclose(vox[0, :, 0, 1], torch.tensor([1.0, 4.0, 7.0]), atol=1e-5)
    assert torch.allclose(vox[0, 0, :, 2], torch.tensor([2.0, 5.0]), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_grid_is_voxel_to_normalized_of_every_voxel_bit_for_bit(dtype):
    """Built axis by axis, the grid holds exactly voxel_to_normalized of the stacked voxel indices
    (what it was computed as before 0.2.16), for strides, offsets, stops and singleton axes."""
    cases = [((7, 1, 5), 1, 0, None), ((12, 9, 10), (2, 3, 1), (1, 0, 2), None), ((11, 8, 9), 3, (0, 1, 2), (10, 8, 5)), ((40, 33, 1), 1, 0, None)]
    for shape, stride, offset, stop in cases:
        strides, offsets = coords._triple(stride), coords._triple(offset)
        stops = tuple(shape) if stop is None else stop
        axes = [torch.arange(o, n, st, dtype=dtype) for n, st, o in zip(stops, strides, offsets, strict=True)]
        want = voxel_to_normalized(torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1), shape)
        got = identity_grid(shape, stride=stride, offset=offset, stop=stop, dtype=dtype)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want), (shape, stride, offset, stop)


# -- grid_sample axis flip ------------------------------------------------------------------------
def test_to_grid_sample_flips_the_last_axis():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert torch.equal(to_grid_sample(x), torch.tensor([[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]))
    assert torch.equal(to_grid_sample(to_grid_sample(x)), x)


def test_sample_image_addresses_array_axes():
    """A point (x0, x1, x2) samples array index [i, j, k] of a non-cubic image."""
    shape = (5, 7, 6)
    img = torch.zeros(1, 1, *shape)
    img[0, 0, 1, 5, 2] = 1.0
    img[0, 0, 4, 0, 3] = 2.0
    vox = torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 3.0], [2.0, 5.0, 1.0]])
    pts = voxel_to_normalized(vox, shape).reshape(1, 3, 1, 1, 3)
    out = sample_image(img, pts).flatten()
    assert out.tolist() == [1.0, 2.0, 0.0]
    # half-way between two voxels along axis 1: trilinear average
    mid = voxel_to_normalized(torch.tensor([[1.0, 4.5, 2.0]]), shape).reshape(1, 1, 1, 1, 3)
    assert float(sample_image(img, mid)) == pytest.approx(0.5)


# -- RAS <-> LPS -------------------------------------------------------------------------------
def test_ras_to_lps_values_and_involution(rng):
    v = rng.normal(size=(6, 4, 3)).astype(np.float32)
    lps = ras_to_lps(v)
    assert lps.dtype == np.float32
    assert np.array_equal(lps[..., 0], -v[..., 0])
    assert np.array_equal(lps[..., 1], -v[..., 1])
    assert np.array_equal(lps[..., 2], v[..., 2])
    assert np.array_equal(ras_to_lps(lps), v)
    assert np.array_equal(lps_to_ras(lps), v)
    assert ras_to_lps(np.array([1.0, 2.0, 3.0])).tolist() == [-1.0, -2.0, 3.0]


# -- identity field: output equals input ---------------------------------------------------------
def test_identity_sampling_returns_the_image_exactly():
    gen = torch.Generator().manual_seed(0)
    shape = (6, 9, 7)
    img = torch.rand(1, 2, *shape, generator=gen)
    out = sample_image(img, identity_grid(shape)[None])
    assert out.shape == img.shape
    assert float((out - img).abs().max()) < 1e-6
    near = sample_image(img, identity_grid(shape)[None], mode="nearest")
    assert torch.equal(near, img)


@pytest.mark.parametrize("max_points", [2**20, 7 * 9])  # one slab, and one plane per slab
def test_warp_image_with_identity_phi(max_points):
    gen = torch.Generator().manual_seed(1)
    shape = (6, 9, 7)
    img = torch.rand(1, 1, *shape, generator=gen)
    phi = identity_grid(shape)
    out = warp_image(img, phi, max_points=max_points)
    assert out.shape == img.shape
    assert float((out - img).abs().max()) < 1e-6
    labels = torch.randint(0, 5, (1, 1, *shape), generator=gen).float()
    assert torch.equal(warp_image(labels, phi, mode="nearest", max_points=max_points), labels)
    assert float(normalized_to_voxel_displacement(phi, shape).abs().max()) < 1e-5


def test_warp_image_by_a_one_voxel_shift():
    """phi(x) = x + e_1 (one voxel along axis 1) pulls the image back: out[i, j] = img[i, j + 1]."""
    gen = torch.Generator().manual_seed(2)
    shape = (5, 8, 6)
    img = torch.rand(1, 1, *shape, generator=gen)
    vox = normalized_to_voxel(identity_grid(shape), shape) + torch.tensor([0.0, 1.0, 0.0])
    phi = voxel_to_normalized(vox, shape)
    out = warp_image(img, phi)
    assert float((out[..., :-1, :] - img[..., 1:, :]).abs().max()) < 1e-5
    assert float(out[..., -1, :].abs().max()) == 0.0  # outside the image: zero padding
    disp = normalized_to_voxel_displacement(phi, shape)
    assert torch.allclose(disp, torch.tensor([0.0, 1.0, 0.0]).expand_as(disp), atol=1e-5)
