"""A feature grid refined to the next nested level: each axis's cells halved.

The levels of :class:`~nir_lightning.fields.feature_grid.FeatureGrid` nest (``R`` vertices ->
``2 R - 1``), so trilinear upsampling with ``align_corners=True`` keeps every vertex and puts the
mean of its two neighbours between them, axis by axis. :func:`upsample_nested` does exactly that:
the values are those of ``F.interpolate(mode="trilinear", align_corners=True)`` bit for bit
(torch interpolates the last axis first and weighs by 1, 0 or 0.5, each exact), and its backward
(the transpose: a vertex gathers its own gradient and half of each neighbour's) is written out,
where torch's scatters every output into eight inputs. 25^3 -> 49^3 with 4 features, forward and
backward at 1 thread: 11.0 ms for torch's, 3.3 ms here (one run; 7.2 ms for torch's on a quieter
moment). The gradient differs from torch's by the order of its sums only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["upsample_nested"]

_SPATIAL = (-3, -2, -1)


def _refine(x: Tensor, dim: int) -> Tensor:
    """Vertices kept at the even positions of ``dim``, neighbours' means at the odd ones."""
    r = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * r - 1
    out = x.new_empty(shape)
    _strided(out, dim, 0).copy_(x)
    if r > 1:
        odd = _strided(out, dim, 1)
        torch.add(x.narrow(dim, 0, r - 1), x.narrow(dim, 1, r - 1), out=odd)
        odd.mul_(0.5)
    return out


def _strided(x: Tensor, dim: int, start: int) -> Tensor:
    """Every second slice of ``x`` along ``dim`` from ``start`` (a view)."""
    index: list[slice] = [slice(None)] * x.dim()
    index[dim] = slice(start, None, 2)
    return x[tuple(index)]


def _refine_backward(g: Tensor, dim: int) -> Tensor:
    """The transpose of :func:`_refine` along ``dim``."""
    r = (g.shape[dim] + 1) // 2
    out = _strided(g, dim, 0).clone()
    if r > 1:
        half = _strided(g, dim, 1) * 0.5
        out.narrow(dim, 0, r - 1).add_(half)
        out.narrow(dim, 1, r - 1).add_(half)
    return out


class _UpsampleNested(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        for dim in reversed(_SPATIAL):  # last axis first, as torch's kernel nests its weights
            x = _refine(x, x.dim() + dim)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        for dim in _SPATIAL:
            grad = _refine_backward(grad, grad.dim() + dim)
        return grad


def upsample_nested(grid: Tensor) -> Tensor:
    """``grid`` ``(..., R0, R1, R2)`` on the next nested level, ``(..., 2 R0 - 1, 2 R1 - 1, 2 R2 - 1)``.

    >>> g = torch.rand(1, 4, 5, 3, 4)
    >>> up = upsample_nested(g)
    >>> up.shape
    torch.Size([1, 4, 9, 5, 7])
    >>> ref = torch.nn.functional.interpolate(g, size=(9, 5, 7), mode="trilinear", align_corners=True)
    >>> torch.equal(up, ref)
    True
    """
    if grid.dim() < 3:
        raise ValueError(f"upsample_nested needs a grid with three spatial axes last, got shape {tuple(grid.shape)}")
    return _UpsampleNested.apply(grid)
