"""One slab helper for every dense pass over a volume: bounded memory, whatever the image size.

Every dense evaluation (the field on the fixed grid, warping an image, det J, the inverse
consistency error, QC slices) walks the volume in slabs along array axis 0 of at most
``max_points`` voxels (never less than one plane), so peak memory does not grow with the
volume (``tests/core/test_memory.py`` checks the bound).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from nir_lightning.coords import identity_grid

DEFAULT_MAX_POINTS = 2**18
"""Points per slab of dense inference unless told otherwise (~100 MB of activations at width 128)."""


def slab_step(plane: int, max_points: int) -> int:
    """Planes per slab: as many as fit in ``max_points`` points, at least one.

    >>> slab_step(100, 1000), slab_step(100, 10)
    (10, 1)
    """
    return max(1, int(max_points) // max(1, int(plane)))


def slabs(n0: int, plane: int, *, max_points: int = DEFAULT_MAX_POINTS) -> Iterator[slice]:
    """Slices ``start:stop`` along axis 0 covering ``0 .. n0`` in slabs of :func:`slab_step` planes.

    >>> list(slabs(5, 4, max_points=8))
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    step = slab_step(plane, max_points)
    for start in range(0, int(n0), step):
        yield slice(start, min(int(n0), start + step))


def grid_chunks(
    shape: tuple[int, int, int],
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(slice, points)`` slabs along axis 0 covering the whole fixed grid.

    ``points`` is ``(1, s, D1, D2, 3)`` normalized coordinates with
    ``s * D1 * D2 <= max(max_points, D1 * D2)``.

    >>> [sl for sl, _ in grid_chunks((4, 2, 2), max_points=8)]
    [slice(0, 2, None), slice(2, 4, None)]
    """
    for sl in slabs(shape[0], shape[1] * shape[2], max_points=max_points):
        # the slab's rows of the whole grid's identity_grid (the same numbers, built axis by axis)
        yield sl, identity_grid(shape, offset=(sl.start, 0, 0), stop=(sl.stop, shape[1], shape[2]), device=device).unsqueeze(0)


@torch.no_grad()
def evaluate_on_grid(
    fn: Callable[[Tensor], Tensor],
    shape: tuple[int, int, int],
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
) -> Tensor:
    """``fn`` of every fixed voxel's normalized point, slab by slab: ``(D0, D1, D2, 3)`` float32 on ``device``.

    ``fn`` maps ``(1, s, D1, D2, 3)`` points to a tensor of the same shape (a field, a velocity).

    >>> evaluate_on_grid(lambda x: 2 * x, (3, 2, 2), max_points=4)[:, 0, 0, 0].tolist()
    [-2.0, 0.0, 2.0]
    """
    out = torch.empty(*shape, 3, device=device)
    for sl, pts in grid_chunks(shape, max_points=max_points, device=device):
        out[sl] = fn(pts)[0].float()
    return out


@torch.no_grad()
def map_slabs(
    fn: Callable[[slice], Tensor],
    out: Tensor,
    *,
    plane: int,
    max_points: int = DEFAULT_MAX_POINTS,
) -> Tensor:
    """Fill ``out[sl] = fn(sl)`` for the slabs of ``out``'s axis 0; returns ``out``.

    >>> buf = torch.empty(5)
    >>> map_slabs(lambda sl: torch.arange(sl.start, sl.stop).float(), buf, plane=1, max_points=2).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0]
    """
    for sl in slabs(out.shape[0], plane, max_points=max_points):
        out[sl] = fn(sl)
    return out


@torch.no_grad()
def map_points(
    fn: Callable[[Tensor], Tensor],
    points: Tensor,
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
) -> Tensor:
    """``fn`` on any normalized ``points`` ``(..., 3)``, ``max_points`` at a time, as
    ``(1, n, 1, 1, 3)`` lattices; returns CPU float32 of ``points``' shape.

    >>> map_points(lambda x: x + 1, torch.zeros(2, 5, 3), max_points=4).sum().item()
    30.0
    """
    flat = points.reshape(-1, 3)
    out = torch.empty_like(flat)
    for sl in slabs(flat.shape[0], 1, max_points=max_points):
        chunk = flat[sl].to(device) if device is not None else flat[sl]
        out[sl] = fn(chunk.reshape(1, -1, 1, 1, 3)).reshape(-1, 3).float().cpu()
    return out.reshape(points.shape)
