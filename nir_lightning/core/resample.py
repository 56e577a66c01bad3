"""Intensity sampling and dense evaluation of transforms, in the convention of :mod:`nir_lightning.coords`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nir_lightning.coords import ALIGN_CORNERS, to_grid_sample
from nir_lightning.core.chunked import DEFAULT_MAX_POINTS, evaluate_on_grid, slabs

Interpolation = Literal["bilinear", "nearest"]


def sample_image(
    image: Tensor,
    points: Tensor,
    *,
    mode: Interpolation = "bilinear",
    padding_mode: Literal["zeros", "border"] = "zeros",
) -> Tensor:
    """Sample ``image`` ``(1, C, D0, D1, D2)`` at normalized ``points`` ``(B, d0, d1, d2, 3)``.

    ``"bilinear"`` is trilinear in 3D. Returns ``(B, C, d0, d1, d2)``.

    >>> img = torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    >>> pts = torch.tensor([[-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]).reshape(1, 2, 1, 1, 3)
    >>> sample_image(img, pts).flatten().tolist()  # voxels (0,0,1) and (1,1,1)
    [1.0, 7.0]
    """
    if image.dim() != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, D0, D1, D2), got {tuple(image.shape)}")
    b, d0, d1, d2, _ = points.shape
    grid = to_grid_sample(points).reshape(1, b * d0 * d1 * d2, 1, 1, 3).to(image.dtype)
    out = grid_sample_threads(image, grid, mode=mode, padding_mode=padding_mode)
    c = image.shape[1]
    return out.reshape(c, b, d0, d1, d2).transpose(0, 1)


_GRAD_SPLIT_MAX = 1 << 26
"""Largest ``image.numel() * threads`` that :func:`grid_sample_threads` splits when the image needs
its gradient: each batch item gets a gradient buffer of the image's size (a 97^3 grid of 4 features
at 2 threads: 7.3 million floats), summed afterwards."""


def grid_sample_threads(image: Tensor, grid: Tensor, *, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """``F.grid_sample(image, grid, align_corners=True)`` for ``image`` ``(1, C, D0, D1, D2)`` and
    ``grid`` ``(1, n, 1, 1, 3)``: ``(1, C, n, 1, 1)``, on all of torch's threads.

    torch's 3-D CPU kernel (forward and backward) runs one thread per batch item, so a single
    image sampled at many points ran on one core. On the CPU the points are split into one batch
    item per thread over the same (expanded, not copied) image: every point's value and its
    gradient with respect to ``grid`` are computed exactly as before (bit for bit), in parallel.
    Where ``image`` needs its gradient (a feature grid read off its lattice during a fit), each
    item's gradient is accumulated on its own and the items' are summed: the same gradient up to
    the order of that sum (float rounding), 1.7-2x faster forward and backward at 2 threads (a
    97^3 grid of 4 features, 10^5 to 4*10^5 points); only up to ``_GRAD_SPLIT_MAX`` elements of
    gradient buffers. Elsewhere it is ``grid_sample`` itself.

    >>> img = torch.rand(1, 2, 4, 5, 6)
    >>> pts = torch.rand(1, 4096, 1, 1, 3) * 2 - 1
    >>> threads = torch.get_num_threads()
    >>> torch.set_num_threads(2)
    >>> torch.equal(grid_sample_threads(img, pts), F.grid_sample(img, pts, align_corners=True))
    True
    >>> torch.set_num_threads(threads)
    """
    n = grid.shape[1]
    k = torch.get_num_threads()
    grad_image = image.requires_grad and torch.is_grad_enabled()
    if image.device.type != "cpu" or k < 2 or n < 4096 or n % k or (grad_image and image.numel() * k > _GRAD_SPLIT_MAX):
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
    out = F.grid_sample(image.expand(k, -1, -1, -1, -1), grid.reshape(k, n // k, 1, 1, 3),
                        mode=mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
    return out.transpose(0, 1).reshape(1, image.shape[1], n, 1, 1)


@torch.no_grad()
def dense_field(
    transform: Callable[[Tensor], Tensor],
    shape: tuple[int, int, int],
    *,
    max_points: int = DEFAULT_MAX_POINTS,
) -> Tensor:
    """Evaluate ``phi`` on every voxel of the fixed grid, slab by slab (bounded memory).

    ``transform`` is a field (an ``nn.Module``: evaluated on its parameters' device) or any
    callable on normalized points. Returns normalized coordinates ``(D0, D1, D2, 3)``.

    >>> dense_field(lambda x: x, (2, 3, 4)).shape
    torch.Size([2, 3, 4, 3])
    """
    device = None
    if isinstance(transform, nn.Module):
        device = next(transform.parameters()).device
    return evaluate_on_grid(transform, shape, max_points=max_points, device=device)


@torch.no_grad()
def warp_image(
    image: Tensor,
    phi: Tensor,
    *,
    mode: Interpolation = "bilinear",
    max_points: int = 2**20,
) -> Tensor:
    """Warp ``image`` ``(1, C, D0, D1, D2)`` by a dense ``phi`` ``(D0', D1', D2', 3)``.

    Evaluated slab by slab; returns ``(1, C, D0', D1', D2')``.

    >>> img = torch.rand(1, 1, 3, 4, 5)
    >>> from nir_lightning.coords import identity_grid
    >>> bool(torch.allclose(warp_image(img, identity_grid((3, 4, 5))), img, atol=1e-6))
    True
    """
    shape = phi.shape[:3]
    out = torch.empty(1, image.shape[1], *shape, dtype=image.dtype, device=image.device)
    for sl in slabs(shape[0], shape[1] * shape[2], max_points=max_points):
        out[:, :, sl] = sample_image(image, phi[sl].unsqueeze(0).to(image.device), mode=mode)
    return out
