"""The samplers: random voxels, a random stride-k lattice, mini-patches and the coarse-to-fine pyramid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from nir_lightning.coords import voxel_to_normalized
from nir_lightning.errors import InputError
from nir_lightning.sampling.domain import (
    budget_stride,
    check_shape,
    foreground_box,
    foreground_index,
    grown_box,
    random_lattice,
    random_sub_box,
)
from nir_lightning.sampling.sample import CoordinateSample, CoordinateSampler

__all__ = ["DownsizeSampler", "MinipatchSampler", "PyramidSampler", "RandomSampler"]


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
        step: int | None = None,
        seed: int = 0,
    ) -> CoordinateSample:
        check_shape(shape, 1, "RandomSampler")
        device = generator.device
        fg = foreground_index(mask) if mask is not None else None  # cached: no pass over the mask per step
        if fg is not None and fg.shape[0] > 0:
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

    Every voxel is visited once per ``stride**3`` steps (exactly, given the fit's ``step``:
    :func:`~nir_lightning.sampling.domain.lattice_offset`), and the sample is still a regular
    grid (spacing ``stride`` voxels), so windowed losses apply.

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
        step: int | None = None,
        seed: int = 0,
    ) -> CoordinateSample:
        check_shape(shape, self.stride, "DownsizeSampler")
        grid, _ = random_lattice(shape, self.stride, generator, step=step, seed=seed)
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
        step: int | None = None,
        seed: int = 0,
    ) -> CoordinateSample:
        p = self.patch_size
        check_shape(shape, p, f"MinipatchSampler(patch_size={p})")
        device = generator.device
        high = torch.tensor([n - p for n in shape], device=device)
        fg = foreground_index(mask) if mask is not None else None  # cached: no pass over the mask per step
        if fg is not None and fg.shape[0] > 0:
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


class PyramidSampler(CoordinateSampler):
    """Coarse to fine: stage ``k`` covers the fraction ``fractions[k]`` of the fit and samples a
    stride-``strides[k]`` sub-lattice (offsets stratified over steps) of the pair smoothed by ``sigmas[k]``
    voxels, with the field's first ``levels[k]`` feature-grid levels.

    The point budget is fixed: where a stage's lattice would hold more than its ``max_points``
    (a finer image), its stride grows until it fits and its smoothing grows with it, so a
    step costs about the same at 1 mm as at 2 mm. A stage's sample is a regular lattice, so local
    NCC and the lattice det J apply as with :class:`DownsizeSampler`.

    Args:
        strides: lattice stride of each stage, in fixed voxels.
        sigmas: Gaussian smoothing of both images in each stage, in fixed voxels at the
            stage's own stride (scaled with it when the budget raises the stride).
        fractions: share of the fit of each stage (normalised to sum to 1). The default,
            0.273 / 0.512 / 0.215, is 80 / 151 / 62 of the default 293 steps (0.2.25; was
            0.45 / 0.3 / 0.25 of 250): stride-3 steps are the cheapest Dice, and the stride-4
            stage loses nothing at 80 steps instead of 112 (benchmarks/README.md, 0.2.25).
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
        box_fractions: share of the stage's lattice box (the cropped box, or the whole image)
            that one step samples, one per stage (``null``: 1 in every stage; the default is
            ``[1, 0.5, 0.75]``, so a pyramid of other than three stages gives its own): below 1, each step
            takes a random sub-box of about that volume (every axis ``fraction ** (1/3)`` of its
            lattice steps, at least 6: :func:`~nir_lightning.sampling.domain.random_sub_box`),
            on the stage's own stride and stratified offsets, and the folding penalty's extra
            det J points are drawn inside it at their usual density (:attr:`CoordinateSample.focus`).
            A step then costs about ``fraction`` as much, less its fixed part (at half the box a stride-3
            step costs about 0.9x, a stride-2 step 0.7-0.9x). The default's parts pay for
            its stride-3 steps (0.2.25); ``[1, 1, 0.5]`` (``configs/sampler/pyramid_fast.yaml``)
            is quicker still for about 0.002 less Dice; the diffeomorphic config takes
            ``[1, 0.5, 0.5]`` (benchmarks/README.md, 0.2.17 and 0.2.25). A stage of mini-patches
            (stride 1 over its budget) ignores it.

    >>> s = PyramidSampler(strides=[4, 2], sigmas=[1.0, 0.0], fractions=[0.5, 0.5], levels=[3, 5], max_points=2**17, box_fractions=None)
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
        fractions: Sequence[float] = (0.273, 0.512, 0.215),
        levels: Sequence[int] | None = (4, 5, 6),
        max_points: int | Sequence[int] = (2**14, 2**16, 2**17),
        patch_size: int = 24,
        crop: bool = True,
        crop_margin: int = 2,
        box_fractions: Sequence[float] | None = (1.0, 0.5, 0.75),
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
        fractions_box = [1.0] * n if box_fractions is None else [float(f) for f in box_fractions]
        if len(fractions_box) != n:
            raise InputError(f"PyramidSampler.box_fractions has {len(fractions_box)} entries but strides has {n}; give one per stage (1: the whole box).")
        if any(not (math.isfinite(f) and 0 < f <= 1) for f in fractions_box):
            raise InputError(f"PyramidSampler.box_fractions must be in (0, 1] (the share of the lattice box a step samples), got {list(box_fractions or [])}; e.g. [1, 1, 0.5].")
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
        self.box_fractions = fractions_box

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
        step: int | None = None,
        seed: int = 0,
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
        focus = None
        if self.box_fractions[k] < 1:  # a part of the box this step; the stride is the whole box's
            whole = box if box is not None else ((0, 0, 0), (int(shape[0]), int(shape[1]), int(shape[2])))
            box = focus = random_sub_box(whole, stride, self.box_fractions[k], generator)
        grid, origin = random_lattice(shape, stride, generator, box, step=step, seed=seed)
        sigma = self.sigmas[k] * stride / self.strides[k]
        return CoordinateSample(
            points=grid.unsqueeze(0), spacing=(float(stride),) * 3, sigma=sigma, levels=levels, separable=True,
            voxel_lattice=(origin, stride), voxel_stop=None if box is None else box[1], focus=focus,
        )

    def __repr__(self) -> str:
        return (
            f"PyramidSampler(strides={self.strides}, sigmas={self.sigmas}, fractions={self.fractions}, "
            f"levels={self.levels}, max_points={self.max_points}, crop={self.crop}, crop_margin={self.crop_margin}"
            + (f", box_fractions={self.box_fractions})" if any(f < 1 for f in self.box_fractions) else ")")
        )
