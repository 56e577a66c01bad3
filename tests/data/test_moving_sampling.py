"""The fit samples the native moving image through the affine chain (one interpolation)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from nir_lightning.coords import apply_matrix, identity_grid
from nir_lightning.core.resample import sample_image
from nir_lightning.data.pair import load_pair
from nir_lightning.losses import FoldingPenalty, Similarity, registration_objective
from nir_lightning.sampling import DownsizeSampler

SHAPE = (12, 14, 16)


def _blob(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """A smooth anatomy defined in world millimetres, so both grids show the same object."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    p = idx @ affine[:3, :3].T + affine[:3, 3]
    r2 = (p[..., 0] / 9.0) ** 2 + (p[..., 1] / 11.0) ** 2 + (p[..., 2] / 13.0) ** 2
    return (np.exp(-r2) * (1.0 + 0.3 * np.sin(p[..., 0] / 2.0) * np.cos(p[..., 2] / 3.0))).astype(np.float32)


def _write(tmp_path, moving_affine: np.ndarray, moving_shape: tuple[int, int, int]):
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = -(np.asarray(SHAPE) - 1)
    f, m = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(_blob(SHAPE, fixed_affine), fixed_affine), str(f))
    nib.save(nib.Nifti1Image(_blob(moving_shape, moving_affine), moving_affine), str(m))
    return f, m


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    w = np.eye(4)
    w[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    w[:3, 3] = [1.5, -1.0, 0.5]
    return w


def test_same_grid_without_affine_part_samples_the_loaded_image(tmp_path):
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = -(np.asarray(SHAPE) - 1)
    f, m = _write(tmp_path, fixed_affine, SHAPE)
    pair = load_pair(f, m, keep_native=True)
    source, chain = pair.moving_sampling()
    assert chain is None and source is pair.moving


def test_native_moving_through_the_chain_equals_the_aligned_copy(tmp_path):
    moving_affine = np.diag([1.5, 1.7, 1.6, 1.0])
    moving_affine[:3, 3] = [-10.0, -12.0, -13.0]
    f, m = _write(tmp_path, moving_affine, (15, 15, 18))
    pair = load_pair(f, m, keep_native=True)
    pair.align(_rotation(8.0))
    source, chain = pair.moving_sampling()
    assert chain is not None and pair.native is not None
    assert source is pair.native.image and tuple(source.shape[2:]) == (15, 15, 18)
    pts = apply_matrix(identity_grid(pair.shape, dtype=torch.float64), chain).float()[None]
    torch.testing.assert_close(sample_image(source, pts), pair.moving, atol=1e-5, rtol=0)

    # the objective sees the same images either way at phi = identity; at phi != identity the
    # chained read interpolates the native voxels once, the aligned copy twice
    sample = DownsizeSampler(stride=1).sample(pair.shape, generator=torch.Generator().manual_seed(0))
    sim, folding = Similarity("lncc", window=3), FoldingPenalty()
    direct = registration_objective(lambda x: x, pair.fixed, pair.moving, sample, similarity=sim, folding=folding, lam=0.0)
    chained = registration_objective(lambda x: x, pair.fixed, source, sample, similarity=sim, folding=folding, lam=0.0,
                                     moving_chain=torch.as_tensor(chain, dtype=torch.float32))
    assert abs(float(direct["sim"]) - float(chained["sim"])) < 1e-4
    assert float(chained["sim"]) < -0.2  # the anatomy overlaps: the chain maps into the native grid


def test_coverage_of_a_box_inside_the_moving_grid_is_read_off_its_corners(tmp_path, monkeypatch):
    """A moving grid turned and larger than the fixed anatomy: the foreground box's 8 corners
    land inside it, so moving_coverage is 1 without mapping every voxel (the per-voxel count gives
    1 too); a moving grid shifted half out falls back to the count (below 1)."""
    from nir_lightning.data import grids
    from nir_lightning.data import pair as pair_module

    a = np.deg2rad(8.0)
    turned = np.array([[np.cos(a), -np.sin(a), 0, 1.0], [np.sin(a), np.cos(a), 0, -1.0], [0, 0, 1, 0.5], [0, 0, 0, 1]])
    turned[:3, :3] *= 2.0
    turned[:3, 3] -= turned[:3, :3] @ (np.asarray((20, 22, 24)) - 1) / 2
    (tmp_path / "inside").mkdir()
    (tmp_path / "half").mkdir()
    f, m = _write(tmp_path / "inside", turned, (20, 22, 24))
    inside = load_pair(f, m, keep_native=True)
    shifted = turned.copy()
    shifted[0, 3] += 16.0
    f, m = _write(tmp_path / "half", shifted, (20, 22, 24))
    half = load_pair(f, m, keep_native=True)
    _, chain = inside.moving_sampling()
    assert chain is not None and grids.box_maps_inside(inside.foreground_mask(), inside.shape, chain)
    fast = inside.moving_coverage()
    monkeypatch.setattr(pair_module, "box_maps_inside", lambda *args: False)
    assert fast == inside.moving_coverage() == 1.0
    assert 0.2 < half.moving_coverage() < 1.0
