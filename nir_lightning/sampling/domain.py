"""Where samplers draw: the foreground's index and box (cached per mask), boxes grown by a
margin, the feature grids' domain, random lattices and the stride that fits a point budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from nir_lightning.coords import identity_grid, normalized_to_voxel, voxel_to_normalized
from nir_lightning.errors import InputError

__all__ = [
    "budget_stride",
    "check_shape",
    "foreground_box",
    "foreground_domain",
    "foreground_index",
    "grown_box",
    "lattice_offset",
    "points_in_box",
    "random_lattice",
    "random_sub_box",
]

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # voxels (lo, hi), hi exclusive


_MASK_CACHE: list[tuple[Tensor, int, dict[str, Any]]] = []  # (mask, its version, what was derived from it)


def _derived(mask: Tensor, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` for ``mask``, cached for the last few masks (a fit passes the same mask every
    step). The cache holds the mask itself, so it is recognised by identity and version, never
    by a reused address."""
    for held, version, derived in _MASK_CACHE:
        if held is mask and version == mask._version:
            break
    else:
        derived = {}
        _MASK_CACHE.insert(0, (mask, mask._version, derived))
        del _MASK_CACHE[4:]
    if key not in derived:
        derived[key] = compute()
    return derived[key]


def foreground_index(mask: Tensor) -> Tensor:
    """``mask.nonzero()`` ``(N, 3)``, cached (``nonzero`` costs about a millisecond per step on a 2 mm brain).

    >>> m = torch.zeros(2, 2, 2, dtype=torch.bool); m[1, 0, 1] = True
    >>> foreground_index(m).tolist()
    [[1, 0, 1]]
    """
    return _derived(mask, "index", mask.nonzero)


def lattice_offset(stride: int, generator: torch.Generator, *, step: int | None = None, seed: int = 0) -> tuple[int, int, int]:
    """The offset of a stride-``stride`` lattice (voxels per axis, each in ``[0, stride)``).

    Without ``step``: uniform at random. With ``step`` (a fit's global step): stratified, each
    cycle of ``stride**3`` consecutive steps takes every offset once, in an order shuffled per
    cycle from ``(seed, stride, cycle)``, so the offset is a function of ``(seed, step)`` and a
    resumed fit draws what an uninterrupted one does. I.i.d. offsets visit some sub-lattices far
    more often than others (the 62 stride-2 steps of the finest stage, 8 offsets: 3 to 14 visits
    with seed 0), and which ones depends on the seed alone, the same for every pair. ``generator`` is drawn from either way,
    so the step's later draws (the det J points) do not depend on the choice.

    >>> offsets = [lattice_offset(2, torch.Generator().manual_seed(t), step=t) for t in range(16)]
    >>> len(set(offsets[:8])), len(set(offsets[8:]))  # two cycles, every offset once in each
    (8, 8)
    """
    draw = torch.randint(0, stride, (3,), generator=generator, device=generator.device)
    if step is None:
        return (int(draw[0]), int(draw[1]), int(draw[2]))
    n = stride**3
    cycle, position = divmod(int(step), n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_cycle_seed(seed, stride, cycle)))
    k = int(order[position])
    return (k // (stride * stride), (k // stride) % stride, k % stride)


def _cycle_seed(seed: int, stride: int, cycle: int) -> int:
    """One seed per ``(seed, stride, cycle)``, within ``torch.Generator``'s 64 bits."""
    return ((int(seed) * 1_000_003 + int(stride)) * 1_000_033 + int(cycle)) % (2**63)


def random_lattice(
    shape: Sequence[int],
    stride: int,
    generator: torch.Generator,
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
    *,
    step: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, tuple[int, int, int]]:
    """The stride-``stride`` lattice of ``shape`` at an offset per axis (:func:`lattice_offset`:
    random, or stratified over the steps of a fit with ``step`` and ``seed``): normalized points
    ``(d0, d1, d2, 3)`` and its first voxel. With ``box = (lo, hi)`` (voxels, ``hi`` exclusive)
    the lattice starts at ``lo`` plus the offset and ends before ``hi``; the draw is the same.

    >>> grid, origin = random_lattice((9, 10, 11), 3, torch.Generator().manual_seed(0))
    >>> grid.shape[-1], all(0 <= o < 3 for o in origin)
    (3, True)
    """
    offset = lattice_offset(stride, generator, step=step, seed=seed)
    lo, hi = ((0, 0, 0), tuple(shape)) if box is None else box
    origin = (lo[0] + offset[0], lo[1] + offset[1], lo[2] + offset[2])
    return identity_grid(shape, stride=stride, offset=origin, stop=hi, device=generator.device), origin


def foreground_box(mask: Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The bounding box ``(lo, hi)`` of ``mask`` ``(D0, D1, D2)`` (voxels, ``hi`` exclusive); the
    whole grid for an empty mask. Cached like :func:`foreground_index`.

    >>> m = torch.zeros(5, 6, 7, dtype=torch.bool); m[1:3, 2, 4:6] = True
    >>> foreground_box(m)
    ((1, 2, 4), (3, 3, 6))
    """

    def compute() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        index = foreground_index(mask)
        if index.shape[0] == 0:
            d0, d1, d2 = (int(n) for n in mask.shape)
            return ((0, 0, 0), (d0, d1, d2))
        lo, hi = index.min(dim=0).values.tolist(), (index.max(dim=0).values + 1).tolist()
        return ((lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]))

    box: tuple[tuple[int, int, int], tuple[int, int, int]] = _derived(mask, "box", compute)
    return box


def random_sub_box(box: Box, stride: int, fraction: float, generator: torch.Generator, *, min_steps: int = 6) -> Box:
    """A random box inside ``box`` holding about ``fraction`` of its volume, on its stride-``stride`` lattice.

    Each axis keeps ``fraction ** (1/3)`` of its lattice steps (at least ``min_steps``, an LNCC
    window and more; at most all of them), at a uniformly drawn whole number of steps from
    ``box``'s low corner, so the sub-box's lattice is a part of ``box``'s lattice at any offset.
    Draws once from ``generator`` (on its device), whatever ``fraction``: ``1`` gives ``box``
    back. The middle of ``box`` lies in every sub-box, its faces in fewer (about one in
    ``steps - kept + 1``): measured against cutting ``box`` into halves along an axis in turn
    (every voxel equally often), these sub-boxes reached a higher Dice (benchmarks/README.md, 0.2.17).

    >>> g = torch.Generator().manual_seed(0)
    >>> (lo, hi) = random_sub_box(((2, 0, 0), (82, 96, 112)), 2, 0.5, g)
    >>> [(h - l) // 2 for l, h in zip(lo, hi)], all((l - b) % 2 == 0 for l, b in zip(lo, (2, 0, 0)))
    ([32, 38, 44], True)
    >>> random_sub_box(((0, 0, 0), (8, 9, 10)), 1, 1.0, g)
    ((0, 0, 0), (8, 9, 10))
    """
    lo, hi = box
    draw = torch.rand(3, generator=generator, device=generator.device, dtype=torch.float64).tolist()
    side = fraction ** (1.0 / 3.0)
    new_lo, new_hi = [], []
    for a in range(3):
        steps = max(1, -(-(hi[a] - lo[a]) // stride))  # lattice points along the axis at offset 0: ceil(extent / stride)
        keep = min(steps, max(min_steps, round(steps * side)))
        start = lo[a] + stride * min(steps - keep, int(draw[a] * (steps - keep + 1)))
        new_lo.append(start)
        new_hi.append(hi[a] if keep == steps else min(hi[a], start + stride * keep))
    return (new_lo[0], new_lo[1], new_lo[2]), (new_hi[0], new_hi[1], new_hi[2])


def points_in_box(points: Tensor, shape: Sequence[int], box: Box) -> Tensor:
    """The points of an unstructured sample ``(1, N, 1, 1, 3)`` (normalized voxel centres of a
    grid of ``shape``) whose voxel lies in ``box``, in their order: ``(1, M, 1, 1, 3)``.

    >>> pts = voxel_to_normalized(torch.tensor([[0.0, 0, 0], [2, 3, 4], [5, 5, 5]]), (6, 7, 8)).reshape(1, -1, 1, 1, 3)
    >>> normalized_to_voxel(points_in_box(pts, (6, 7, 8), ((1, 1, 1), (5, 6, 7))), (6, 7, 8)).reshape(-1, 3).round().tolist()
    [[2.0, 3.0, 4.0]]
    """
    vox = normalized_to_voxel(points.reshape(-1, 3).double(), tuple(int(n) for n in shape)).round()
    lo = torch.tensor(box[0], device=vox.device, dtype=vox.dtype)
    hi = torch.tensor(box[1], device=vox.device, dtype=vox.dtype)
    return points.reshape(-1, 3)[((vox >= lo) & (vox < hi)).all(dim=1)].reshape(1, -1, 1, 1, 3)


def grown_box(
    box: tuple[tuple[int, int, int], tuple[int, int, int]], margin: int, shape: Sequence[int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``box`` grown by ``margin`` voxels on every side, clipped to ``shape``.

    >>> grown_box(((1, 2, 4), (3, 3, 6)), 2, (5, 6, 7))
    ((0, 0, 2), (5, 5, 7))
    """
    (l0, l1, l2), (h0, h1, h2) = box
    n0, n1, n2 = (int(n) for n in shape)
    return (
        (max(0, l0 - margin), max(0, l1 - margin), max(0, l2 - margin)),
        (min(n0, h0 + margin), min(n1, h1 + margin), min(n2, h2 + margin)),
    )


def foreground_domain(
    mask: Tensor, spacing: Sequence[float], margin: float
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The box of normalized coordinates (low, high corners) that holds ``mask``'s bounding box
    grown by ``margin`` millimetres (``spacing``: mm per voxel, array-axis order), clipped to
    the image: where the feature grids of a field are spread (``FeatureGrid.set_domain``).

    >>> m = torch.zeros(11, 11, 11, dtype=torch.bool); m[3:8, 5, :] = True
    >>> low, high = foreground_domain(m, (1.0, 1.0, 2.0), 2.0)  # voxels 1..9, 3..7, 0..10
    >>> [round(v, 3) for v in low], [round(v, 3) for v in high]
    ([-0.8, -0.4, -1.0], [0.8, 0.4, 1.0])
    """
    shape = tuple(int(n) for n in mask.shape)
    (l0, l1, l2), (h0, h1, h2) = foreground_box(mask)
    grow = torch.tensor([margin / s for s in spacing], dtype=torch.float64)  # voxels per axis
    lo = torch.tensor([l0, l1, l2], dtype=torch.float64) - grow
    hi = torch.tensor([h0 - 1, h1 - 1, h2 - 1], dtype=torch.float64) + grow
    low = voxel_to_normalized(lo.clamp(min=0), shape)
    high = voxel_to_normalized(torch.minimum(hi, torch.tensor(shape, dtype=torch.float64) - 1), shape)
    # an axis of one voxel (or a one-voxel-thick mask) keeps its whole extent
    flat = high <= low
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    return (
        (float(low[0]), float(low[1]), float(low[2])),
        (float(high[0]), float(high[1]), float(high[2])),
    )


def check_shape(shape: tuple[int, int, int], minimum: int, what: str) -> None:
    if len(shape) != 3 or any(int(s) < minimum for s in shape):
        raise InputError(
            f"{what} needs a 3D image of at least {minimum} voxels per axis, got shape {tuple(shape)}; "
            "use a smaller patch_size/stride (model.sampler.init_args) or a larger image."
        )


def budget_stride(shape: Sequence[int], stride: int, max_points: int) -> int:
    """The smallest lattice stride ``>= stride`` whose lattice of ``shape`` holds at most ``max_points``.

    >>> budget_stride((80, 96, 112), 2, 2**17), budget_stride((160, 192, 224), 2, 2**17)
    (2, 4)
    """
    s = max(1, stride)
    while math.prod(math.ceil(n / s) for n in shape) > max_points and s < max(shape):
        s += 1
    return s
