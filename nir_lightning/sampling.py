"""Coordinate samplers: which fixed-image points one optimisation step looks at.

Each sampler returns a :class:`CoordinateSample`: normalized points shaped as a batch of
regular lattices ``(B, d0, d1, d2, 3)`` plus the lattice step in fixed voxels, which the
local-NCC loss and the finite-difference Jacobian need. Unstructured samples (``random``)
have ``spacing=None`` and are shaped ``(1, N, 1, 1, 3)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nir_lightning.coords import identity_grid, voxel_to_normalized
from nir_lightning.core.resample import sample_image
from nir_lightning.errors import InputError


@dataclass(frozen=True)
class CoordinateSample:
    """Sampled fixed-image points.

    Attributes:
        points: normalized coordinates ``(B, d0, d1, d2, 3)`` (array-axis order).
        spacing: lattice step along each axis in fixed voxels; ``None`` if the points
            form no lattice (then ``d1 = d2 = 1`` and the points are independent).
        sigma: Gaussian smoothing (fixed voxels) of both images this sample is compared on
            (coarse-to-fine; 0: the images as they are).
        levels: feature-grid levels of the field that take part (coarse-to-fine; ``None``: all).
        separable: each lattice of the batch is the product of one coordinate list per axis
            (:attr:`axes`), so a grid field can read it axis by axis.
        voxel_lattice: ``(offset, stride)`` when the points are exactly the voxel centres
            ``offset + stride * k`` of the fixed grid (one lattice): images are read there by
            slicing, not interpolation.
        voxel_stop: with ``voxel_lattice``, the exclusive end of the lattice per axis (voxels)
            when it covers a box of the image rather than all of it.
    """

    points: Tensor
    spacing: tuple[float, float, float] | None
    sigma: float = 0.0
    levels: int | None = None
    separable: bool = False
    voxel_lattice: tuple[tuple[int, int, int], int] | None = None
    voxel_stop: tuple[int, int, int] | None = None

    @property
    def is_grid(self) -> bool:
        return self.spacing is not None

    @property
    def num_points(self) -> int:
        return self.points[..., 0].numel()

    def read(self, image: Tensor, *, mode: str = "bilinear") -> Tensor:
        """``image`` ``(1, C, D0, D1, D2)`` on the fixed grid at the sampled points, ``(B, C, d0, d1, d2)``:
        a slice on a voxel lattice, else interpolation (:func:`~nir_lightning.core.resample.sample_image`)."""
        if self.voxel_lattice is not None:
            (o0, o1, o2), st = self.voxel_lattice
            e0, e1, e2 = self.voxel_stop if self.voxel_stop is not None else (None, None, None)
            return image[:, :, o0:e0:st, o1:e1:st, o2:e2:st]
        return sample_image(image, self.points, mode=mode)  # type: ignore[arg-type]

    @property
    def axes(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per-axis normalized coordinates ``(B, d_a)`` of separable lattices (read off :attr:`points`), else ``None``."""
        if not self.separable:
            return None
        p = self.points
        return p[:, :, 0, 0, 0], p[:, 0, :, 0, 1], p[:, 0, 0, :, 2]


class CoordinateSampler:
    """Base class of the samplers (the type of ``model.sampler`` in configs)."""

    def sample(
        self,
        shape: tuple[int, int, int],
        *,
        generator: torch.Generator,
        mask: Tensor | None = None,
        progress: float = 1.0,
    ) -> CoordinateSample:
        """Draw points for a fixed image of spatial ``shape``; ``mask`` ``(D0, D1, D2)``
        (bool, on the generator's device) marks the foreground where it matters; ``progress``
        in ``[0, 1]`` is how far the fit is (only coarse-to-fine samplers use it)."""
        raise NotImplementedError


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


def random_lattice(
    shape: Sequence[int],
    stride: int,
    generator: torch.Generator,
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
) -> tuple[Tensor, tuple[int, int, int]]:
    """The stride-``stride`` lattice of ``shape`` at a random offset per axis: normalized points
    ``(d0, d1, d2, 3)`` and its first voxel. With ``box = (lo, hi)`` (voxels, ``hi`` exclusive)
    the lattice starts at ``lo`` plus the offset and ends before ``hi``; the draw is the same.

    >>> grid, origin = random_lattice((9, 10, 11), 3, torch.Generator().manual_seed(0))
    >>> grid.shape[-1], all(0 <= o < 3 for o in origin)
    (3, True)
    """
    offset = torch.randint(0, stride, (3,), generator=generator, device=generator.device)
    lo, hi = ((0, 0, 0), tuple(shape)) if box is None else box
    origin = (lo[0] + int(offset[0]), lo[1] + int(offset[1]), lo[2] + int(offset[2]))
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


def _check_shape(shape: tuple[int, int, int], minimum: int, what: str) -> None:
    if len(shape) != 3 or any(int(s) < minimum for s in shape):
        raise InputError(
            f"{what} needs a 3D image of at least {minimum} voxels per axis, got shape {tuple(shape)}; "
            "use a smaller patch_size/stride (model.sampler.init_args) or a larger image."
        )


class RandomSampler(CoordinateSampler):
    """``num_points`` random voxels (with replacement), restricted to ``mask`` when given.

    >>> g = torch.Generator().manual_seed(0)
    >>> s = RandomSampler(num_points=100).sample((8, 9, 10), generator=g)
    >>> s.points.shape, s.spacing
    (torch.Size([1, 100, 1, 1, 3]), None)
    """

    def __init__(self, *, num_points: int = 2**16) -> None:
        if num_points < 2:
            raise InputError(f"RandomSampler.num_points must be >= 2, got {num_points}; use e.g. 65536 random points per step.", owner="RandomSampler", param="num_points", value=num_points)
        self.num_points = num_points

    def sample(
        self,
        shape: tuple[int, int, int],
        *,
        generator: torch.Generator,
        mask: Tensor | None = None,
        progress: float = 1.0,
    ) -> CoordinateSample:
        _check_shape(shape, 1, "RandomSampler")
        device = generator.device
        if mask is not None and bool(mask.any()):
            fg = foreground_index(mask)
            idx = torch.randint(0, fg.shape[0], (self.num_points,), generator=generator, device=device)
            vox = fg[idx].float()
        else:
            high = torch.tensor(shape, device=device, dtype=torch.float32)
            rand = torch.rand(self.num_points, 3, generator=generator, device=device)
            vox = torch.floor(rand * high)
        pts = voxel_to_normalized(vox, shape)
        return CoordinateSample(points=pts.reshape(1, -1, 1, 1, 3), spacing=None)

    def __repr__(self) -> str:
        return f"RandomSampler(num_points={self.num_points})"


class DownsizeSampler(CoordinateSampler):
    """A stride-``stride`` sub-lattice of the full fixed grid with a random offset per axis.

    Every voxel is visited once per ``stride**3`` steps on average, and the sample is still a
    regular grid (spacing ``stride`` voxels), so windowed losses apply.

    >>> g = torch.Generator().manual_seed(0)
    >>> s = DownsizeSampler(stride=3).sample((9, 10, 11), generator=g)
    >>> s.points.shape[-1], s.spacing
    (3, (3.0, 3.0, 3.0))
    """

    def __init__(self, *, stride: int = 3) -> None:
        if stride < 1:
            raise InputError(f"DownsizeSampler.stride must be >= 1 (1 = every voxel), got {stride}; use e.g. stride=3.", owner="DownsizeSampler", param="stride", value=stride)
        self.stride = stride

    def sample(
        self,
        shape: tuple[int, int, int],
        *,
        generator: torch.Generator,
        mask: Tensor | None = None,
        progress: float = 1.0,
    ) -> CoordinateSample:
        _check_shape(shape, self.stride, "DownsizeSampler")
        grid, _ = random_lattice(shape, self.stride, generator)
        s = float(self.stride)
        return CoordinateSample(points=grid.unsqueeze(0), spacing=(s, s, s), separable=True)

    def __repr__(self) -> str:
        return f"DownsizeSampler(stride={self.stride})"


class MinipatchSampler(CoordinateSampler):
    """``num_patches`` random full-resolution cubes of ``patch_size`` voxels per side.

    Patch centres are drawn from ``mask`` when given (patches of pure background teach
    the field nothing). Patches are clipped to lie inside the image.

    >>> g = torch.Generator().manual_seed(0)
    >>> s = MinipatchSampler(num_patches=2, patch_size=4).sample((8, 9, 10), generator=g)
    >>> s.points.shape, s.spacing
    (torch.Size([2, 4, 4, 4, 3]), (1.0, 1.0, 1.0))
    """

    def __init__(self, *, num_patches: int = 8, patch_size: int = 32) -> None:
        if num_patches < 1:
            raise InputError(f"MinipatchSampler.num_patches must be >= 1, got {num_patches}; use e.g. num_patches=8.", owner="MinipatchSampler", param="num_patches", value=num_patches)
        if patch_size < 2:
            raise InputError(f"MinipatchSampler.patch_size must be >= 2 voxels, got {patch_size}; use e.g. patch_size=32.", owner="MinipatchSampler", param="patch_size", value=patch_size)
        self.num_patches = num_patches
        self.patch_size = patch_size

    def sample(
        self,
        shape: tuple[int, int, int],
        *,
        generator: torch.Generator,
        mask: Tensor | None = None,
        progress: float = 1.0,
    ) -> CoordinateSample:
        p = self.patch_size
        _check_shape(shape, p, f"MinipatchSampler(patch_size={p})")
        device = generator.device
        high = torch.tensor([n - p for n in shape], device=device)
        if mask is not None and bool(mask.any()):
            fg = foreground_index(mask)
            idx = torch.randint(0, fg.shape[0], (self.num_patches,), generator=generator, device=device)
            corner = (fg[idx] - p // 2).clamp(min=0)
            corner = torch.minimum(corner, high)
        else:
            rand = torch.rand(self.num_patches, 3, generator=generator, device=device)
            corner = torch.floor(rand * (high + 1).float()).long()
        base = torch.stack(
            torch.meshgrid(*[torch.arange(p, device=device)] * 3, indexing="ij"), dim=-1
        )
        vox = (corner[:, None, None, None, :] + base).float()
        return CoordinateSample(points=voxel_to_normalized(vox, shape), spacing=(1.0, 1.0, 1.0), separable=True)

    def __repr__(self) -> str:
        return f"MinipatchSampler(num_patches={self.num_patches}, patch_size={self.patch_size})"


def budget_stride(shape: Sequence[int], stride: int, max_points: int) -> int:
    """The smallest lattice stride ``>= stride`` whose lattice of ``shape`` holds at most ``max_points``.

    >>> budget_stride((80, 96, 112), 2, 2**17), budget_stride((160, 192, 224), 2, 2**17)
    (2, 4)
    """
    s = max(1, stride)
    while math.prod(math.ceil(n / s) for n in shape) > max_points and s < max(shape):
        s += 1
    return s


class PyramidSampler(CoordinateSampler):
    """Coarse to fine: stage ``k`` covers the fraction ``fractions[k]`` of the fit and samples a
    stride-``strides[k]`` sub-lattice (random offset) of the pair smoothed by ``sigmas[k]``
    voxels, with the field's first ``levels[k]`` feature-grid levels.

    The point budget is fixed: where a stage's lattice would hold more than its ``max_points``
    (a finer image), its stride grows until it fits and its smoothing grows with it, so a
    step costs about the same at 1 mm as at 2 mm. A stage's sample is a regular lattice, so local
    NCC and the lattice det J apply as with :class:`DownsizeSampler`.

    Args:
        strides: lattice stride of each stage, in fixed voxels.
        sigmas: Gaussian smoothing of both images in each stage, in fixed voxels at the
            stage's own stride (scaled with it when the budget raises the stride).
        fractions: share of the fit of each stage (normalised to sum to 1).
        levels: feature-grid levels active in each stage (``null``: all, in every stage);
            fields without a feature grid ignore them.
        max_points: most lattice points per step, one per stage (or one for all).
        patch_size: a stage of stride 1 whose image exceeds its budget samples full-resolution
            mini-patches of this many voxels per side (centres in the foreground), as many as
            the budget holds, instead of a coarser lattice.
        crop: lattices span the bounding box of ``mask`` (the fixed foreground, or the user's
            fixed mask) grown by ``crop_margin`` lattice steps, not the whole image, and the
            budget counts the box. Lattice points far outside the anatomy compare background
            with background (local NCC ~0) and only add cost: a 2 mm brain's box is ~70 % of its
            grid, a raw scan's field of view often 3x its head.
        crop_margin: lattice steps kept around the box, so that windows at the anatomy's
            edge see its surroundings (half the default local NCC window of 5 steps).

    >>> s = PyramidSampler(strides=[4, 2], sigmas=[1.0, 0.0], fractions=[0.5, 0.5], levels=[3, 5], max_points=2**17)
    >>> g = torch.Generator().manual_seed(0)
    >>> a = s.sample((40, 48, 56), generator=g, progress=0.1)
    >>> a.spacing, a.sigma, a.levels
    ((4.0, 4.0, 4.0), 1.0, 3)
    >>> b = s.sample((40, 48, 56), generator=g, progress=0.9)
    >>> b.spacing, b.sigma, b.levels
    ((2.0, 2.0, 2.0), 0.0, 5)
    """

    def __init__(
        self,
        *,
        strides: Sequence[int] = (4, 3, 2),
        sigmas: Sequence[float] = (1.0, 0.0, 0.0),
        fractions: Sequence[float] = (0.4, 0.3, 0.3),
        levels: Sequence[int] | None = (4, 5, 5),
        max_points: int | Sequence[int] = (2**14, 2**16, 2**17),
        patch_size: int = 24,
        crop: bool = True,
        crop_margin: int = 2,
    ) -> None:
        n = len(strides)
        if n == 0:
            raise InputError("PyramidSampler.strides needs at least one stage, e.g. strides=[4, 2].")
        budgets = [int(max_points)] * n if isinstance(max_points, int) else [int(b) for b in max_points]
        for name, values in (("sigmas", sigmas), ("fractions", fractions), ("max_points", budgets)) + ((("levels", levels),) if levels is not None else ()):
            if len(values) != n:
                raise InputError(f"PyramidSampler.{name} has {len(values)} entries but strides has {n}; give one per stage.")
        if any(int(s) < 1 for s in strides):
            raise InputError(f"PyramidSampler.strides must be >= 1 voxel, got {list(strides)}.")
        if any(not (math.isfinite(x) and x >= 0) for x in sigmas):
            raise InputError(f"PyramidSampler.sigmas must be >= 0 voxels, got {list(sigmas)}.")
        if any(not (math.isfinite(f) and f > 0) for f in fractions):
            raise InputError(f"PyramidSampler.fractions must be > 0, got {list(fractions)}.")
        if levels is not None and any(int(v) < 1 for v in levels):
            raise InputError(f"PyramidSampler.levels must be >= 1, got {list(levels)}.")
        if any(b < 8 for b in budgets):
            raise InputError(f"PyramidSampler.max_points must be >= 8, got {max_points}; use e.g. 131072.")
        self.strides = [int(s) for s in strides]
        self.sigmas = [float(x) for x in sigmas]
        total = float(sum(fractions))
        self.fractions = [float(f) / total for f in fractions]
        self.levels = None if levels is None else [int(v) for v in levels]
        if patch_size < 2:
            raise InputError(f"PyramidSampler.patch_size must be >= 2 voxels, got {patch_size}; use e.g. 24.")
        if crop_margin < 0:
            raise InputError(f"PyramidSampler.crop_margin must be >= 0 lattice steps, got {crop_margin}; e.g. 2.")
        self.max_points = budgets
        self.patch_size = int(patch_size)
        self.crop = bool(crop)
        self.crop_margin = int(crop_margin)

    def stage(self, progress: float) -> int:
        """Index of the stage at ``progress`` in ``[0, 1]``."""
        edge = 0.0
        for k, f in enumerate(self.fractions):
            edge += f
            if progress < edge - 1e-12:
                return k
        return len(self.fractions) - 1

    def sample(
        self,
        shape: tuple[int, int, int],
        *,
        generator: torch.Generator,
        mask: Tensor | None = None,
        progress: float = 1.0,
    ) -> CoordinateSample:
        k = self.stage(progress)
        levels = None if self.levels is None else self.levels[k]
        if self.strides[k] == 1 and math.prod(shape) > self.max_points[k]:
            # Full resolution within the budget: foreground mini-patches rather than a coarser lattice.
            p = min(self.patch_size, *shape)
            patches = MinipatchSampler(num_patches=max(1, self.max_points[k] // p**3), patch_size=p)
            sample = patches.sample(shape, generator=generator, mask=mask)
            return CoordinateSample(points=sample.points, spacing=sample.spacing, sigma=self.sigmas[k], levels=levels, separable=True)
        box = None
        extent: Sequence[int] = shape
        if self.crop and mask is not None:
            # the margin in voxels depends on the stride, which the budget sets on the box: two passes
            tight = foreground_box(mask)
            stride = budget_stride([h - lo for lo, h in zip(*tight, strict=True)], min(self.strides[k], min(shape)), self.max_points[k])
            box = grown_box(tight, self.crop_margin * stride, shape)
            extent = [h - lo for lo, h in zip(*box, strict=True)]
        stride = budget_stride(extent, min(self.strides[k], min(shape)), self.max_points[k])
        grid, origin = random_lattice(shape, stride, generator, box)
        sigma = self.sigmas[k] * stride / self.strides[k]
        return CoordinateSample(
            points=grid.unsqueeze(0), spacing=(float(stride),) * 3, sigma=sigma, levels=levels, separable=True,
            voxel_lattice=(origin, stride), voxel_stop=None if box is None else box[1],
        )

    def __repr__(self) -> str:
        return (
            f"PyramidSampler(strides={self.strides}, sigmas={self.sigmas}, fractions={self.fractions}, "
            f"levels={self.levels}, max_points={self.max_points}, crop={self.crop}, crop_margin={self.crop_margin})"
        )
