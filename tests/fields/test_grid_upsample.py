"""The nested levels' refinement: torch's trilinear upsampling bit for bit, its gradient written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nir_lightning.fields import FeatureGrid
from nir_lightning.fields.grid_upsample import upsample_nested


@pytest.mark.parametrize("shape", [(1, 4, 4, 4, 4), (1, 4, 25, 25, 25), (2, 3, 5, 1, 6), (1, 1, 2, 3, 4), (3, 7, 2, 2)])
def test_the_values_are_torchs_trilinear_upsampling_bit_for_bit(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    size = tuple(2 * r - 1 for r in shape[-3:])
    batched = x if x.dim() == 5 else x[None]
    want = F.interpolate(batched, size=size, mode="trilinear", align_corners=True)
    assert torch.equal(upsample_nested(batched), want)
    if x.dim() == 4:  # any leading axes
        assert torch.equal(upsample_nested(x), want[0])


def test_vertices_are_kept_and_midpoints_are_the_neighbours_mean() -> None:
    x = torch.arange(8.0).reshape(1, 1, 2, 2, 2)  # value = 4 i0 + 2 i1 + i2: linear, so refined exactly
    up = upsample_nested(x)
    i = torch.stack(torch.meshgrid(*(torch.arange(3.0) / 2,) * 3, indexing="ij"))
    assert torch.equal(up[0, 0], 4 * i[0] + 2 * i[1] + i[2])
    assert torch.equal(up[..., ::2, ::2, ::2], x)


def test_the_gradient_is_the_transpose() -> None:
    x = torch.randn(2, 2, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(upsample_nested, (x,))
    y = torch.randn(1, 4, 13, 13, 13, requires_grad=True)
    g = torch.randn(1, 4, 25, 25, 25)
    want = torch.autograd.grad(F.interpolate(y, size=(25,) * 3, mode="trilinear", align_corners=True), y, g)[0]
    got = torch.autograd.grad(upsample_nested(y), y, g)[0]
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))  # the order of the sums only


def test_a_grid_with_fewer_than_three_axes_is_refused() -> None:
    with pytest.raises(ValueError, match="three spatial axes"):
        upsample_nested(torch.zeros(3, 3))


def test_the_feature_grids_compose_their_levels_with_it() -> None:
    enc = FeatureGrid(levels=4, features=2, coarsest=3, init_scale=0.5)
    composed = enc._compose(4)
    want = enc.grids[0]
    for level in range(1, 4):
        r = enc.resolutions[level]
        want = F.interpolate(want, size=(r, r, r), mode="trilinear", align_corners=True) + enc.grids[level]
    assert torch.equal(composed, want)
