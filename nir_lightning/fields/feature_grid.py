"""Multiresolution feature grids: the coordinate encoding of the default field.

``levels`` dense 3-D grids of ``features`` learnable values, nested (each level has twice the
cells of the one before: ``(coarsest - 1) * 2**l + 1`` vertices per axis), spanning the
normalized cube ``[-1, 1]^3`` (array-axis order; vertex ``0`` at ``-1`` and the last at ``+1``,
as ``align_corners=True``; see :mod:`nir_lightning.coords`). A point's encoding is the sum over
levels of each level's trilinear interpolation: ``(M, 3) -> (M, features)``.

Because the grids nest, the sum of the coarser levels is itself one trilinear interpolant on
the second-finest active grid (a coarse cell's trilinear function, sampled at the finer
vertices, is re-interpolated exactly), so a step composes those once (upsample and add on small
grids) and reads two grids: that composition and the finest active level
(:meth:`FeatureGrid.reading_grids`). Composing the finest level too would upsample everything
to its size, and back-propagate through that, every step: on the default six levels (97^3
vertices) that cost more than the second read. Lattices are read axis by axis with one gather
of the two neighbouring slices per coordinate (:func:`~nir_lightning.fields.grid_reads.level_lattice_read`). Points are read
with a written-out gather of the eight corners instead of ``grid_sample`` where the Jacobian
is wanted, because the same corners give the exact derivative with respect to the point
(``grid_sample`` has no forward-mode derivative): :meth:`FeatureGrid.forward_with_jacobian`
returns the features and their Jacobian in one pass. That is what makes the folding penalty
cost one field evaluation per point instead of four to six.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from operator import add

import torch
from torch import Tensor, nn

from nir_lightning.core.resample import grid_sample_threads
from nir_lightning.errors import InputError
from nir_lightning.fields.grid_reads import dense_gradient, level_lattice_read, trilinear_with_jacobian
from nir_lightning.fields.grid_upsample import upsample_nested


def level_resolutions(levels: int, coarsest: int) -> list[int]:
    """Vertices per axis of each level: nested, each level twice the cells of the one before.

    >>> level_resolutions(4, 5)
    [5, 9, 17, 33]
    """
    return [(coarsest - 1) * 2**level + 1 for level in range(levels)]


class FeatureGrid(nn.Module):
    """Dense multiresolution feature grids, summed and trilinearly interpolated.

    Args:
        levels: number of grids.
        features: values per vertex (the encoding's width).
        coarsest: vertices per axis of the coarsest grid (>= 2); the finest has
            ``(coarsest - 1) * 2**(levels - 1) + 1``, e.g. 5 and 5 levels give 65, a cell of
            about 1.5 voxels on a 96-voxel axis.
        init_scale: values start uniform in ``[-init_scale, init_scale]`` (near zero, so the
            field starts near the identity).
        seed: seed of that initialisation (independent of the global RNG).

    Coarse to fine: :attr:`active_levels` (all by default) leaves the finer levels out of the
    sum; the coarse-to-fine schedule raises it during a fit.

    >>> enc = FeatureGrid(levels=3, features=2, coarsest=3)
    >>> x = torch.rand(5, 3) * 2 - 1
    >>> enc(x).shape
    torch.Size([5, 2])
    >>> feats, jac = enc.forward_with_jacobian(x)
    >>> jac.shape, bool(torch.allclose(feats, enc(x)))
    (torch.Size([5, 3, 2]), True)
    """

    domain: Tensor  # (2, 3) buffer: the low and high corners of the grids' box

    def __init__(
        self,
        *,
        levels: int = 5,
        features: int = 8,
        coarsest: int = 5,
        init_scale: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if levels < 1 or features < 1:
            raise InputError(f"FeatureGrid needs levels >= 1 and features >= 1, got levels={levels}, features={features}.")
        if coarsest < 2:
            raise InputError(f"FeatureGrid.coarsest must be >= 2 vertices per axis, got {coarsest}.")
        res = level_resolutions(levels, coarsest)
        if res[-1] > 257:
            raise InputError(
                f"FeatureGrid: levels={levels}, coarsest={coarsest} give a finest grid of {res[-1]} vertices per axis; "
                "use fewer levels or a smaller coarsest (finest <= 257)."
            )
        self.levels = levels
        self.features = features
        self.coarsest = coarsest
        self.resolutions = res
        gen = torch.Generator().manual_seed(seed)
        self.grids = nn.ParameterList(
            nn.Parameter((torch.rand(1, features, r, r, r, generator=gen) * 2 - 1) * init_scale) for r in res
        )
        self.active_levels = levels
        self.out_features = features
        self._cache: tuple[tuple, list[Tensor], bool] | None = None
        # The box of normalized coordinates the grids span (rows: low, high corner); the whole
        # image by default. Persistent, so a saved field reads its points as it was fitted.
        self.register_buffer("domain", torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
        self._whole_image = True  # kept with the buffer, so that a step does not read it back from a GPU

    def set_domain(self, low: Sequence[float], high: Sequence[float]) -> None:
        """Let the grids span the box ``[low, high]`` of normalized coordinates (array-axis order)
        instead of ``[-1, 1]^3``. Outside it the features keep their value at the box's face.

        A box around the anatomy gives cells of the same size in millimetres whatever the
        image's field of view (a raw scan's head fills half of it, a template-cropped one
        nearly all). Call before fitting; the grids' values are not moved.

        >>> enc = FeatureGrid(levels=1, features=1, coarsest=2, init_scale=0.0)
        >>> with torch.no_grad():
        ...     enc.grids[0][0, 0, 1] = 1.0  # the vertices at the high end of axis 0
        >>> enc.set_domain((0.0, -1.0, -1.0), (0.5, 1.0, 1.0))
        >>> enc(torch.tensor([[0.25, 0.0, 0.0], [1.0, 0.0, 0.0]])).flatten().tolist()
        [0.5, 1.0]
        """
        lo = torch.as_tensor(low, dtype=torch.float64).reshape(3)
        hi = torch.as_tensor(high, dtype=torch.float64).reshape(3)
        if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all()) and bool((hi > lo).all())):
            raise InputError(f"FeatureGrid.set_domain needs finite low < high on every axis, got low={lo.tolist()}, high={hi.tolist()}.")
        self.domain.copy_(torch.stack([lo, hi]).to(self.domain))
        self._whole_image = self._spans_image()

    def _spans_image(self) -> bool:
        return bool((self.domain[0] == -1).all() and (self.domain[1] == 1).all())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # fields saved before the domain existed spanned the whole image
        state_dict.setdefault(prefix + "domain", torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._whole_image = self._spans_image()

    def _into_domain(self, x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Points (or one axis's coordinates) in the grids' ``[-1, 1]``, and the derivative of
        that map (``None`` on the whole image, where it is the identity)."""
        if self._whole_image:
            return x, None
        lo, hi = self.domain.to(x.dtype)
        if axis is not None:
            lo, hi = lo[axis], hi[axis]
        half = (hi - lo) / 2
        t = (x - (lo + hi) / 2) / half
        inside = (t >= -1) & (t <= 1)
        return t.clamp(-1, 1), inside.to(x.dtype) / half

    def reading_grids(self) -> list[Tensor]:
        """The active levels as at most two grids ``(features, R, R, R)`` whose reads sum to the
        encoding: the coarser levels composed on the second-finest active grid, and the finest
        active level on its own. Composing every level on the finest grid (an upsampling of all
        of them to its size, and its backward, every step) costs more than a second read.

        Cached while the grids are unchanged (their version counters: an optimiser step bumps
        them), so the lattice and the det J points of one step share one composition and one
        graph."""
        key = self._key()
        if self._cache is not None and self._cache[0] == key and (self._cache[2] or not torch.is_grad_enabled()):
            return self._cache[1]  # a composition with its graph serves reads without one too
        active = min(self.active_levels, self.levels)
        # squeeze, not [0]: a select's backward fills a zero grid and copies into it (8 ms a step on 97^3);
        # dense_gradient: the det J points' sparse gradient is added into the lattice's dense one
        grids = [self.grids[0].squeeze(0)] if active == 1 else [self._compose(active - 1).squeeze(0), self.grids[active - 1].squeeze(0)]
        grids = [dense_gradient(g) for g in grids]
        self._cache = (key, grids, torch.is_grad_enabled())
        return grids

    def clear_cache(self) -> None:
        """Forget the cached composition (a new step: an optimiser that writes the grids in place
        without bumping their version counters, as fused Adam does, would leave it stale)."""
        self._cache = None

    def _key(self) -> tuple:
        return (
            self.active_levels,
            *((g._version, g.data_ptr(), g.requires_grad) for g in self.grids),
        )

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"] = None  # a graph is neither copied nor pickled
        return state

    def _compose(self, levels: int) -> Tensor:
        """The first ``levels`` levels summed on the grid of the last of them, ``(1, features, R, R, R)``."""
        grid = self.grids[0]
        for level in range(1, levels):  # nested: the next level's vertices are this one's refined
            grid = upsample_nested(grid) + self.grids[level]
        return grid

    def forward(self, x: Tensor) -> Tensor:
        """``(M, 3)`` normalized points -> ``(M, features)``.

        Without the Jacobian, ``grid_sample`` reads the points (the same trilinear values,
        faster on lattices of many points; ``border`` padding differs from the linear
        extension only outside ``[-1, 1]``)."""
        grids = self.reading_grids()
        x, _ = self._into_domain(x)
        pts = x.flip(-1).reshape(1, -1, 1, 1, 3).to(grids[0].dtype)  # grid_sample wants (x, y, z) = reversed axes
        out = reduce(add, (grid_sample_threads(g[None], pts, padding_mode="border") for g in grids))
        return out.reshape(self.features, -1).T

    def on_lattice(self, axes: tuple[Tensor, Tensor, Tensor], *, jacobian: bool = False) -> tuple[Tensor, Tensor | None]:
        """Features of separable lattices (per-axis coordinates ``(B, d_a)``): ``(B, d0, d1, d2, features)``
        and, with ``jacobian``, their derivative ``(B, d0, d1, d2, features, 3)``; the values of
        :meth:`forward` at the lattice's points, read axis by axis from each of
        :meth:`reading_grids` (:func:`~nir_lightning.fields.grid_reads.level_lattice_read`)."""
        mapped = [self._into_domain(axes[a], a) for a in range(3)]
        inner = (mapped[0][0], mapped[1][0], mapped[2][0])
        grids = self.reading_grids()
        feats = reduce(add, (level_lattice_read(g, inner) for g in grids)).permute(0, 2, 3, 4, 1)
        if not jacobian:
            return feats, None
        derivs = []
        for a in range(3):
            d = reduce(add, (level_lattice_read(g, inner, derivative=a) for g in grids)).permute(0, 2, 3, 4, 1)
            scale = mapped[a][1]
            if scale is not None:  # (B, d_a) -> broadcast along lattice axis a
                d = d * scale.reshape(scale.shape[0], *[-1 if b == a else 1 for b in range(3)], 1)
            derivs.append(d)
        return feats, torch.stack(derivs, dim=-1)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``(M, features)`` and their exact derivative with respect to the point,
        ``(M, 3, features)`` (tangent-major, as :meth:`CoordinateMLP.forward_with_jacobian` takes
        it; normalized units; piecewise trilinear), one gather of eight corners from each of
        :meth:`reading_grids`."""
        t, scale = self._into_domain(x)
        reads = [trilinear_with_jacobian(g, t, jacobian=True, channels_first=True, sparse_grad=True) for g in self.reading_grids()]
        feats = reduce(add, (r[0] for r in reads))
        jac = reduce(add, (r[1] for r in reads if r[1] is not None))
        if scale is not None:  # chain rule through the box map: row a times d t_a / d x_a
            jac = jac * scale[:, :, None]
        return feats, jac

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, features={self.features}, resolutions={self.resolutions}, active_levels={self.active_levels}"
            + ("" if self._whole_image else f", domain={[[round(v, 4) for v in row] for row in self.domain.tolist()]}")
        )


def set_active_levels(root: nn.Module, levels: int | None) -> int:
    """Let the first ``levels`` levels of every :class:`FeatureGrid` in ``root`` take part (``None``:
    all); returns how many finest levels are left out (the most of any grid; 0 without grids).

    >>> field = nn.ModuleList([FeatureGrid(levels=3, coarsest=3, features=2), FeatureGrid(levels=2, coarsest=3, features=2)])
    >>> set_active_levels(field, 1), [g.active_levels for g in field], set_active_levels(field, None)
    (2, [1, 1], 0)
    """
    missing = 0
    for module in root.modules():
        if isinstance(module, FeatureGrid):
            module.clear_cache()  # a fused optimiser step updates the grids without bumping their versions
            module.active_levels = module.levels if levels is None else max(1, min(levels, module.levels))
            missing = max(missing, module.levels - module.active_levels)
    return missing
