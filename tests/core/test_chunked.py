"""The one slab helper: every voxel once, never more than ``max_points`` per slab, results independent of the slab size."""

from __future__ import annotations

import pytest
import torch

from nir_lightning.coords import identity_grid
from nir_lightning.core.chunked import evaluate_on_grid, grid_chunks, map_points, slabs
from nir_lightning.core.jacobian import chunked_jacobian_determinant, jacobian_determinant
from nir_lightning.core.resample import warp_image

SHAPE = (7, 5, 6)


@pytest.mark.parametrize("max_points", [1, 29, 30, 31, 10_000])
def test_slabs_cover_every_plane_once_within_the_bound(max_points: int) -> None:
    plane = SHAPE[1] * SHAPE[2]
    seen = [i for sl in slabs(SHAPE[0], plane, max_points=max_points) for i in range(sl.start, sl.stop)]
    assert seen == list(range(SHAPE[0]))
    for sl in slabs(SHAPE[0], plane, max_points=max_points):
        assert (sl.stop - sl.start) * plane <= max(max_points, plane)


@pytest.mark.parametrize("max_points", [1, 30, 77, 10_000])
def test_grid_chunks_are_the_identity_grid(max_points: int) -> None:
    full = identity_grid(SHAPE)
    got = torch.cat([pts[0] for _, pts in grid_chunks(SHAPE, max_points=max_points)])
    assert torch.equal(got, full)


def test_every_dense_pass_is_independent_of_the_slab_size() -> None:
    g = torch.Generator().manual_seed(0)
    disp = torch.randn(*SHAPE, 3, generator=g) * 0.3
    assert torch.equal(chunked_jacobian_determinant(disp, max_points=31), jacobian_determinant(disp))
    phi = identity_grid(SHAPE) + 0.05 * torch.randn(*SHAPE, 3, generator=g)
    image = torch.rand(1, 2, *SHAPE, generator=g)
    assert torch.equal(warp_image(image, phi, max_points=30), warp_image(image, phi, max_points=10**6))
    fn = lambda x: torch.sin(3 * x)  # a pointwise stand-in for a field
    assert torch.equal(evaluate_on_grid(fn, SHAPE, max_points=30), fn(identity_grid(SHAPE)))
    pts = torch.rand(4, 9, 3, generator=g)
    assert torch.equal(map_points(fn, pts, max_points=5), fn(pts))


def test_dense_det_j_is_the_determinant_of_the_central_difference_jacobian_bit_for_bit() -> None:
    """The dense det J reads J's entries from the gradients directly; it must be the 3x3 formula on
    ``jacobian_central(u) + I`` exactly (float64), zero and signed-zero regions included."""
    from nir_lightning.core.jacobian import determinant, jacobian_central

    g = torch.Generator().manual_seed(1)
    disp = torch.randn(9, 8, 7, 3, generator=g) * 0.6
    disp[1:4] = 0.0  # plane 2 sees zeros on both sides
    disp[5, :, :, 1] = -0.0
    expected = determinant(jacobian_central(disp.double()) + torch.eye(3, dtype=torch.float64)).float()
    got = jacobian_determinant(disp)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert float(got[2].min()) == float(got[2].max()) == 1.0
    assert bool((got[4:] != 1.0).any())
