"""Coordinate samplers: which fixed-image points one optimisation step looks at.

Each sampler returns a :class:`CoordinateSample`: normalized points shaped as a batch of
regular lattices ``(B, d0, d1, d2, 3)`` plus the lattice step in fixed voxels, which the
local-NCC loss and the finite-difference Jacobian need. Unstructured samples (``random``)
have ``spacing=None`` and are shaped ``(1, N, 1, 1, 3)``.

The package: :mod:`~nir_lightning.sampling.sample` (what a sampler returns, the base class),
:mod:`~nir_lightning.sampling.domain` (foreground index and box, grown boxes, the feature
grids' domain, lattices and budgets) and :mod:`~nir_lightning.sampling.samplers` (the samplers).
Everything is importable from ``nir_lightning.sampling`` as before.
"""

from __future__ import annotations

from nir_lightning.sampling.domain import (
    budget_stride,
    foreground_box,
    foreground_domain,
    foreground_index,
    grown_box,
    points_in_box,
    random_lattice,
    random_sub_box,
)
from nir_lightning.sampling.sample import CoordinateSample, CoordinateSampler
from nir_lightning.sampling.samplers import DownsizeSampler, MinipatchSampler, PyramidSampler, RandomSampler

__all__ = [
    "CoordinateSample",
    "CoordinateSampler",
    "DownsizeSampler",
    "MinipatchSampler",
    "PyramidSampler",
    "RandomSampler",
    "budget_stride",
    "foreground_box",
    "foreground_domain",
    "foreground_index",
    "grown_box",
    "points_in_box",
    "random_lattice",
    "random_sub_box",
]
