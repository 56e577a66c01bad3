"""Coordinate samplers: which fixed-image points one optimisation step looks at.

Each sampler returns a :class:`CoordinateSample`: normalized points shaped as a batch of
regular lattices ``(B, d0, d1, d2, 3)`` plus the lattice step in fixed voxels, which the
local-NCC loss and the finite-difference Jacobian need. Unstructured samples (``random``)
have ``spacing=None`` and are shaped ``(1, N, 1, 1, 3)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nir_lightning.coords import identity_grid, voxel_to_normalized
from nir_lightning.errors import InputError


@dataclass(frozen=True)
class CoordinateSample:
    """Sampled fixed-image points.

    Attributes:
        points: normalized coordinates ``(B, d0, d1, d2, 3)`` (array-axis order).
        spacing: lattice step along each axis in fixed voxels; ``None`` if the points
            form no lattice (then ``d1 = d2 = 1`` and the points are independent).
    """

    points: Tensor
    spacing: tuple[float, float, float] | None

    @property
    def is_grid(self) -> bool:
        return self.spacing is not None

    @property
    def num_points(self) -> int:
        return self.points[..., 0].numel()


class CoordinateSampler:
    """Base class of the samplers (the type of ``model.sampler`` in configs)."""

    def sample(
        self,
        shape: tuple[int, int, int],
        *,
        generator: torch.Generator,
        mask: Tensor | None = None,
    ) -> CoordinateSample:
        """Draw points for a fixed image of spatial ``shape``; ``mask`` ``(D0, D1, D2)``
        (bool, on the generator's device) marks the foreground where it matters."""
        raise NotImplementedError


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
    ) -> CoordinateSample:
        _check_shape(shape, 1, "RandomSampler")
        device = generator.device
        if mask is not None and bool(mask.any()):
            fg = mask.nonzero()
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
    ) -> CoordinateSample:
        _check_shape(shape, self.stride, "DownsizeSampler")
        offset = torch.randint(0, self.stride, (3,), generator=generator, device=generator.device)
        grid = identity_grid(
            shape, stride=self.stride, offset=[int(o) for o in offset.tolist()], device=generator.device
        )
        s = float(self.stride)
        return CoordinateSample(points=grid.unsqueeze(0), spacing=(s, s, s))

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
    ) -> CoordinateSample:
        p = self.patch_size
        _check_shape(shape, p, f"MinipatchSampler(patch_size={p})")
        device = generator.device
        high = torch.tensor([n - p for n in shape], device=device)
        if mask is not None and bool(mask.any()):
            fg = mask.nonzero()
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
        return CoordinateSample(points=voxel_to_normalized(vox, shape), spacing=(1.0, 1.0, 1.0))

    def __repr__(self) -> str:
        return f"MinipatchSampler(num_patches={self.num_patches}, patch_size={self.patch_size})"
