"""What a sampler returns (:class:`CoordinateSample`) and the samplers' base class."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nir_lightning.core.resample import sample_image
from nir_lightning.sampling.domain import Box

__all__ = ["CoordinateSample", "CoordinateSampler"]


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
        focus: the voxel box ``(lo, hi)`` (``hi`` exclusive) that this step samples when it is
            a part of the region the sampler covers over the steps (:class:`~nir_lightning.sampling.PyramidSampler`'s
            ``box_fractions``): the folding penalty draws its extra det J points inside it too,
            at the density it would over the whole foreground. ``None``: no such part.
    """

    points: Tensor
    spacing: tuple[float, float, float] | None
    sigma: float = 0.0
    levels: int | None = None
    separable: bool = False
    voxel_lattice: tuple[tuple[int, int, int], int] | None = None
    voxel_stop: tuple[int, int, int] | None = None
    focus: Box | None = None

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
        step: int | None = None,
        seed: int = 0,
    ) -> CoordinateSample:
        """Draw points for a fixed image of spatial ``shape``; ``mask`` ``(D0, D1, D2)``
        (bool, on the generator's device) marks the foreground where it matters; ``progress``
        in ``[0, 1]`` is how far the fit is (only coarse-to-fine samplers use it); ``step`` and
        ``seed``, the fit's global step and seed, let lattice samplers stratify their offsets
        over consecutive steps (:func:`~nir_lightning.sampling.domain.lattice_offset`;
        ``None``: independent draws). A sampler of one's own accepts both keywords."""
        raise NotImplementedError
