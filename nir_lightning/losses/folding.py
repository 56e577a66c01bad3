"""Every det J penalty of the training objective: on the sample's own lattice and on extra points.

The folding metric (``folding_percent``, ANTs' ``CreateJacobianDeterminantImage``) counts
central-difference det J <= 0 on the voxel grid. A sample sees folds only at its own
resolution, so :class:`FoldingPenalty` combines

* the sample's own det J: forward differences at the lattice step (one voxel for random points
  and mini-patches, ``stride`` voxels on the downsize lattice);
* ``jacobian_points`` extra random foreground points with a one-voxel stencil, where the
  sample misses folds (lattices coarser than one voxel; always with ``stencil="central"``,
  since every sample's own stencil is a forward one);
* with ``stencil="central"`` on one-voxel lattices, the central det J of their interior points
  (no extra field evaluations).

Each part is its own mean: folds between lattice points must not be diluted by the lattice.
Transforms are callables on normalized points (``(B, d0, d1, d2, 3)``), positions ``phi_vox``
are in fixed voxels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from nir_lightning.coords import normalized_to_voxel, normalized_to_voxel_scale
from nir_lightning.core.jacobian import determinant, jacobian_central, jacobian_forward
from nir_lightning.errors import InputError
from nir_lightning.sampling import CoordinateSample, RandomSampler, points_in_box
from nir_lightning.sampling.domain import Box

Transform = Callable[[Tensor], Tensor]
PenaltyKind = Literal["jedt", "unit"]
Stencil = Literal["forward", "central", "analytic"]
JacobianTransform = Callable[[Tensor], tuple[Tensor, Tensor]]


def _mean_voxel_mm(voxel_size: tuple[float, float, float]) -> float:
    """The geometric mean of the voxel's sides in mm: the one size the resolution rules below scale with."""
    return float((voxel_size[0] * voxel_size[1] * voxel_size[2]) ** (1 / 3))


def scaled_jacobian_points(points: int, voxel_size: tuple[float, float, float]) -> int:
    """Det J points per step for an image of ``voxel_size`` mm, from ``points`` at 2 mm:
    ``(2 / mean voxel size)^2`` times as many, the factor kept within ``[1/4, 4]``.

    >>> scaled_jacobian_points(16384, (2.0, 2.0, 2.0)), scaled_jacobian_points(16384, (1.0, 1.0, 1.0))
    (16384, 65536)
    >>> scaled_jacobian_points(16384, (0.5, 0.5, 0.5)), scaled_jacobian_points(0, (1.0, 1.0, 1.0))
    (65536, 0)
    """
    factor = min(4.0, max(0.25, (2.0 / _mean_voxel_mm(voxel_size)) ** 2))
    return round(points * factor)


DEFAULT_MARGIN_FLOORS = (0.35, 0.5)
"""The barrier's det J floor at 2 mm and at 1 mm when ``model.margin`` is ``null`` (0.2.6, 0.2.7)."""


def scaled_margin(
    voxel_size: tuple[float, float, float], *, at_2mm: float = DEFAULT_MARGIN_FLOORS[0], at_1mm: float = DEFAULT_MARGIN_FLOORS[1]
) -> float:
    """The det J floor of the barrier for an image of ``voxel_size`` mm: ``at_2mm`` at 2 mm and
    coarser, ``at_1mm`` at 1 mm and finer, linear in the (geometric) mean voxel size between.

    Why a higher floor on finer images: det J read at every 1 mm voxel also sees how it varies
    inside the feature grids' finest cells (about 2 mm, whatever the image), which 2 mm voxels
    hardly resolve, so the same field has a wider det J distribution there; raising the floor lifts
    its lower tail. On two choosing pairs at 1 mm (0.2.7): SDlogJ 0.41 -> 0.34 and 1-2 -> 0 folded
    voxels for 0.009 of Dice, still 0.01 above the same pairs at 2 mm.

    >>> scaled_margin((2.0, 2.0, 2.0)), scaled_margin((1.0, 1.0, 1.0)), scaled_margin((3.0, 3.0, 3.0))
    (0.35, 0.5, 0.35)
    >>> round(scaled_margin((1.5, 1.5, 1.5)), 3), scaled_margin((0.5, 0.5, 0.5))
    (0.425, 0.5)
    """
    t = min(1.0, max(0.0, 2.0 - _mean_voxel_mm(voxel_size)))  # 0 at >= 2 mm, 1 at <= 1 mm
    return at_2mm + (at_1mm - at_2mm) * t


def coarse_jacobian_points(points: int, missing: int, ratio: float = 0.25) -> int:
    """Det J points of a step whose fields leave their ``missing`` finest feature-grid levels out:
    ``points * ratio ** missing`` (at least one point where ``points > 0``).

    With the default ``ratio`` of a quarter: a level twice as coarse bends over cells twice as
    wide, so the folds it can make are twice as wide along each axis, and a quarter of the points
    finds them as the full count finds the finest level's (the rule of
    :func:`scaled_jacobian_points` across voxel sizes). On the default pyramid (6 levels; stages
    with 4, 5 and 6) that is 1024, 4096 and 16384 points at 2 mm.

    >>> coarse_jacobian_points(16384, 0), coarse_jacobian_points(16384, 1), coarse_jacobian_points(16384, 2)
    (16384, 4096, 1024)
    >>> coarse_jacobian_points(100, 5), coarse_jacobian_points(0, 2), coarse_jacobian_points(4096, 2, ratio=1.0)
    (1, 0, 4096)
    """
    if points <= 0 or missing <= 0:
        return max(points, 0)
    return max(1, round(points * ratio**missing))


def jacobian_penalty(det: Tensor, *, kind: PenaltyKind = "jedt", margin: float = 0.0) -> Tensor:
    """Folding penalty on Jacobian determinants.

    ``"jedt"``: ``mean(ReLU(margin - det))``, zero unless det J falls below ``margin``
    (``margin=0`` is the NIR default: folds only). A small positive margin keeps det J away
    from 0, where a finite-difference estimate on a finer grid would already read a fold.
    ``"unit"``: ``mean(|det - 1|)``, also penalises any volume change.

    >>> float(jacobian_penalty(torch.tensor([1.0, -0.5, 2.0])))
    0.1666666716337204
    >>> float(jacobian_penalty(torch.tensor([1.0, 0.1]), margin=0.2))
    0.05000000074505806

    No determinants (a lattice one point thick along an axis has no forward difference there)
    cost nothing, rather than the NaN of a mean over nothing:

    >>> float(jacobian_penalty(torch.empty(1, 4, 0, 2)))
    0.0
    """
    if det.numel() == 0:
        return det.new_zeros(())
    if kind == "jedt":
        return F.relu(margin - det).mean()
    if kind == "unit":
        return (det - 1.0).abs().mean()
    raise ValueError(f"unknown jacobian penalty {kind!r}; use 'jedt' or 'unit'")


def voxel_offsets(shape: tuple[int, int, int], like: Tensor) -> Tensor:
    """``(3, 3)``: row ``a`` is one fixed voxel along axis ``a``, in normalized units."""
    return torch.diag((1.0 / normalized_to_voxel_scale(shape)).to(like))


def forward_stencil_jacobian(transform: Transform, pts: Tensor, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """``phi`` at ``pts`` ``(1, N, 1, 1, 3)`` in fixed voxels, and its Jacobian ``(1, N, 1, 1, 3, 3)``
    (fixed voxels) by one-voxel forward differences (4 evaluations per point)."""
    offsets = voxel_offsets(shape, pts)
    stencil = torch.cat([pts] + [pts + offsets[a] for a in range(3)], dim=0)
    out_vox = normalized_to_voxel(transform(stencil), shape)
    return out_vox[:1], torch.stack([out_vox[a + 1] - out_vox[0] for a in range(3)], dim=-1)


def forward_stencil_det(transform: Transform, pts: Tensor, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """``phi`` at ``pts`` ``(1, N, 1, 1, 3)`` in fixed voxels, and det J by one-voxel forward
    differences (4 evaluations per point)."""
    phi_vox, jac = forward_stencil_jacobian(transform, pts, shape)
    return phi_vox, determinant(jac)


def analytic_det(transform_with_jacobian: JacobianTransform, pts: Tensor) -> Tensor:
    """det J at ``pts`` ``(..., 3)`` from the field's own Jacobian (one evaluation per point)."""
    return determinant(transform_with_jacobian(pts)[1])


def analytic_barrier(transform_with_jacobian: JacobianTransform, pts: Tensor, margin: float) -> Tensor:
    """``mean(ReLU(margin - det J))`` over ``pts`` ``(..., 3)`` (the ``"jedt"`` penalty of
    :func:`analytic_det`), with a graph through the points below ``margin`` only.

    A point above the floor has no gradient, and in a fit nearly all are (1-4 % of them below it
    in the finest stage on the 2 mm brains), so every point's det J is read without a graph and
    only those below are read again with one: the same value and gradient (up to the order of the
    sum), with a backward over a few hundred points instead of all of them. On the diffeomorphic
    config's flow, whose Jacobian is integrated along each point's path, that was most of a step.

    >>> phi = lambda x: (x, torch.diag_embed(torch.stack([x[..., 0] + 1, torch.ones_like(x[..., 0]), torch.ones_like(x[..., 0])], -1)))
    >>> x = torch.tensor([[-0.9, 0.0, 0.0], [0.5, 0.0, 0.0]], requires_grad=True)  # det J 0.1, 1.5
    >>> out = analytic_barrier(phi, x, 0.3)
    >>> round(float(out), 6), torch.autograd.grad(out, x)[0][:, 0].tolist()
    (0.1, [-0.5, 0.0])
    """
    if not torch.is_grad_enabled():
        return jacobian_penalty(analytic_det(transform_with_jacobian, pts), margin=margin)
    with torch.no_grad():
        low = analytic_det(transform_with_jacobian, pts) < margin
    if not bool(low.any()):  # none below (or no points): no gradient, nothing to read again
        return pts.new_zeros(())
    det = analytic_det(transform_with_jacobian, pts[low])
    return F.relu(margin - det).sum() / low.numel()


def central_stencil_det(transform: Transform, pts: Tensor, shape: tuple[int, int, int], *, voxels: Tensor | None = None) -> Tensor:
    """det J at ``pts`` ``(1, N, 1, 1, 3)`` by one-voxel central differences (6 evaluations per point): ``(N, 1, 1)``.

    ``voxels``: the points' fixed-grid indices ``(N, 3)``, when they are voxel centres: on the
    image's border faces the difference is then one-sided, as the folding metric takes it
    (:func:`~nir_lightning.core.jacobian.jacobian_determinant`); inside, the same arithmetic.

    >>> vox = torch.tensor([[0, 1, 1], [1, 1, 1]])
    >>> pts = (vox.float() - 1).reshape(1, -1, 1, 1, 3)  # a 3^3 grid: voxel v at v - 1
    >>> central_stencil_det(lambda x: x * 0.5, pts, (3, 3, 3), voxels=vox).flatten().tolist()
    [0.125, 0.125]
    """
    offsets = voxel_offsets(shape, pts)
    if voxels is None:
        ups, downs = [pts + offsets[a] for a in range(3)], [pts - offsets[a] for a in range(3)]
        steps: list[Tensor | int] = [2, 2, 2]
    else:
        top = (voxels >= torch.tensor(shape, device=voxels.device) - 1).to(pts.dtype).reshape(1, -1, 1, 1, 3)
        bottom = (voxels <= 0).to(pts.dtype).reshape(1, -1, 1, 1, 3)
        ups = [torch.where(top[..., a : a + 1] > 0, pts, pts + offsets[a]) for a in range(3)]
        downs = [torch.where(bottom[..., a : a + 1] > 0, pts, pts - offsets[a]) for a in range(3)]
        apart = (2 - top - bottom)[0]  # (N, 1, 1, 3): voxels between the two points read
        steps = [apart[..., a : a + 1] for a in range(3)]
    out_vox = normalized_to_voxel(transform(torch.cat(ups + downs, dim=0)), shape)
    jac = torch.stack([(out_vox[a] - out_vox[a + 3]) / steps[a] for a in range(3)], dim=-1)
    return determinant(jac)


@dataclass(frozen=True)
class FoldingPenalty:
    """The folding term of the objective (weighted by ``lam`` there).

    Args:
        kind: ``"jedt"`` (penalise det J < ``margin`` only) or ``"unit"`` (|det - 1|).
        margin: det J floor of ``"jedt"`` (0: folds only, as in NIR).
        jacobian_points: random foreground points per step with a one-voxel stencil.
        stencil: ``"forward"`` (4 evaluations per extra point), ``"central"`` (6; the
            stencil of the folding metric, which also sees oscillations two voxels wide) or
            ``"analytic"`` (the field's exact Jacobian: one evaluation, for fields that have
            ``forward_with_jacobian``; it sees any local fold, at any scale).

    >>> FoldingPenalty(stencil="sideways")
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: jacobian_stencil must be 'forward', 'central' or 'analytic', got 'sideways'
    """

    kind: PenaltyKind = "jedt"
    margin: float = 0.3
    jacobian_points: int = 4096
    stencil: Stencil = "forward"

    def __post_init__(self) -> None:
        if self.kind not in ("jedt", "unit"):
            raise InputError(f"regularizer must be 'jedt' or 'unit', got {self.kind!r}")
        if not 0 <= self.margin < 1:
            raise InputError(f"margin must be in [0, 1) (a det J floor), got {self.margin}")
        if self.jacobian_points < 0:
            raise InputError(f"jacobian_points must be >= 0, got {self.jacobian_points}")
        if self.stencil not in ("forward", "central", "analytic"):
            raise InputError(f"jacobian_stencil must be 'forward', 'central' or 'analytic', got {self.stencil!r}")

    def __call__(self, det: Tensor) -> Tensor:
        return jacobian_penalty(det, kind=self.kind, margin=self.margin)

    def needs_extra_points(self, sample: CoordinateSample) -> bool:
        """Whether ``sample``'s own det J misses folds that the extra points would see: on
        lattices coarser than one voxel, and always with the central stencil."""
        coarse = sample.is_grid and max(sample.spacing or (1, 1, 1)) > 1
        return self.jacobian_points > 0 and (coarse or self.stencil != "forward")

    def lattice(self, sample: CoordinateSample, phi_vox: Tensor, jac_vox: Tensor | None = None) -> Tensor:
        """Penalty of a lattice sample's own det J, from the transformed lattice ``phi_vox``
        ``(B, d0, d1, d2, 3)``: forward differences at the lattice step (``jac_vox``, when the
        caller has taken them: ``jacobian_forward(phi_vox, sample.spacing)``); with the central
        stencil on a one-voxel lattice, plus (a separate mean) central differences at its
        interior points. A lattice one point thick along an axis (a thin image, a coarse stride)
        has no det J of its own: its penalty is 0 (:func:`jacobian_penalty`), and the extra points
        (:meth:`extra`) hold the barrier alone."""
        assert sample.spacing is not None
        jac = jacobian_forward(phi_vox, sample.spacing) if jac_vox is None else jac_vox
        reg = self(determinant(jac))
        if self.stencil == "central" and tuple(sample.spacing) == (1, 1, 1) and min(phi_vox.shape[1:4]) >= 3:
            reg = reg + self(determinant(jacobian_central(phi_vox)[:, 1:-1, 1:-1, 1:-1]))
        return reg

    def extra(
        self,
        transform: Transform,
        shape: tuple[int, int, int],
        mask: Tensor | None,
        generator: torch.Generator,
        transform_with_jacobian: JacobianTransform | None = None,
        focus: Box | None = None,
    ) -> Tensor:
        """Penalty on ``jacobian_points`` random foreground points (drawn from ``generator``).

        The analytic stencil needs ``transform_with_jacobian``. Its points are jittered inside
        their voxel: an exact Jacobian is a point value, and a fold between voxel centres
        must be found too. ``focus``: the voxel box the step samples (:attr:`CoordinateSample.focus`):
        only the drawn points that fall in it are kept (the usual density there; none: 0)."""
        points = RandomSampler(num_points=self.jacobian_points).sample(shape, generator=generator, mask=mask).points
        if focus is not None:
            points = points_in_box(points, shape, focus)
            if points.shape[1] == 0:
                return points.new_zeros(())
        if self.stencil == "analytic":
            if transform_with_jacobian is None:
                raise InputError("jacobian_stencil='analytic' needs a field with an exact Jacobian (forward_with_jacobian)")
            half = voxel_offsets(shape, points).diagonal() / 2
            jittered = points + (torch.rand(points.shape, generator=generator, device=generator.device) * 2 - 1) * half
            if self.kind == "jedt":
                return analytic_barrier(transform_with_jacobian, jittered, self.margin)
            return self(analytic_det(transform_with_jacobian, jittered))
        if self.stencil == "central":
            return self(central_stencil_det(transform, points, shape))
        return self(forward_stencil_det(transform, points, shape)[1])
