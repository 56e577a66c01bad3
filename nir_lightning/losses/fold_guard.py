"""The fold guard: the folding metric's own det J, checked on every voxel late in a fit, and the
barrier held at the voxels where it ran low.

Why: the barrier (:class:`~nir_lightning.losses.folding.FoldingPenalty`) sees det J at random
points (the field's exact Jacobian) and on each step's lattice; the folding metric
(``folding_count``, ANTs' ``CreateJacobianDeterminantImage``) reads central differences at every
voxel of the fixed grid. A voxel can fold in the metric's eyes between the two in the last steps
of a fit: 1 of 21 fits of the displacement default on the choosing pairs (seeds 1-3), 1 of 12
report pairs on an Intel machine (benchmarks/README.md, 0.2.19). At a few steps late in the fit
(``at``, fractions of ``trainer.max_steps``) the guard computes the metric's det J densely (the
fixed foreground's box, on the field's fast lattice read where it has one) and keeps the voxels
below ``threshold``; every later step adds the barrier at exactly those voxels, with the metric's
stencil, each weighing as one of the step's random det J points. A fit whose det J never runs
that low is not touched at all.

Voxels are fixed-grid indices ``(K, 3)`` (array-axis order, :mod:`nir_lightning.coords`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nir_lightning.coords import normalized_axis, normalized_to_voxel, voxel_to_normalized
from nir_lightning.core.chunked import DEFAULT_MAX_POINTS, slab_step
from nir_lightning.core.jacobian import chunked_jacobian_determinant
from nir_lightning.errors import InputError
from nir_lightning.fields.grid_reads import lattice_points
from nir_lightning.losses.folding import central_stencil_det
from nir_lightning.sampling.domain import foreground_box, grown_box

__all__ = ["DEFAULT_FOLD_GUARD", "FoldGuard", "low_det_voxels", "metric_det_in_box"]

Transform = Callable[[Tensor], Tensor]
Lattice = Callable[[tuple[Tensor, Tensor, Tensor]], Tensor]

DEFAULT_FOLD_GUARD = (0.9, 0.96)
"""The checks of the displacement default: in its last stage (the pyramid's last 25 %), where the
finest grid level makes the folds, the last one 10 steps before the end of a 250-step fit (steps
225 and 240). A third at 0.8 protected no more on the choosing pairs and costs about 0.9 s of a
1 mm fit (0.1 s at 2 mm)."""


@torch.no_grad()
def metric_det_in_box(
    transform: Transform,
    shape: tuple[int, int, int],
    box: tuple[slice, slice, slice],
    *,
    lattice: Lattice | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
) -> Tensor:
    """The folding metric's det J of ``phi`` (central differences in fixed voxels, one-sided at the
    image's border: :func:`~nir_lightning.core.jacobian.jacobian_determinant`, slab by slab) at the voxels of
    ``box`` (slices of the fixed grid ``shape``): ``(b0, b1, b2)``, float64.

    ``phi`` is read on the box grown by one voxel, so that the box's faces get central
    differences, with ``lattice`` (a field's separable-lattice read) where given, slab by slab,
    else with ``transform`` on the points. The values are the metric's where ``phi`` is read the
    same way (a lattice read agrees with the point read to float32 rounding). ``device``: where
    ``phi`` is read (the field's); the det J is taken on the CPU.

    >>> det = metric_det_in_box(lambda x: x * 0.5, (6, 7, 8), (slice(1, 5), slice(0, 7), slice(2, 4)))
    >>> det.shape, round(float(det.min()), 6), round(float(det.max()), 6)
    (torch.Size([4, 7, 2]), 0.125, 0.125)
    """
    lo, hi = grown_box(((box[0].start, box[1].start, box[2].start), (box[0].stop, box[1].stop, box[2].stop)), 1, shape)
    axes = [normalized_axis(shape, a, lo[a], hi[a], device=device)[None] for a in range(3)]
    grown = tuple(h - l for l, h in zip(lo, hi))
    phi = torch.empty(*grown, 3)
    step = slab_step(grown[1] * grown[2], max_points)
    for start in range(0, grown[0], step):
        sl = slice(start, min(grown[0], start + step))
        ax = (axes[0][:, sl], axes[1], axes[2])
        phi[sl] = (lattice(ax) if lattice is not None else transform(lattice_points(ax)))[0].float().cpu()
    ident = torch.stack(torch.meshgrid(*(torch.arange(l, h, dtype=torch.float32) for l, h in zip(lo, hi)), indexing="ij"), dim=-1)
    det = chunked_jacobian_determinant(normalized_to_voxel(phi, shape) - ident, max_points=max_points)  # slabs: 3x quicker at 1 mm
    inner = tuple(slice(s.start - l, s.stop - l) for s, l in zip(box, lo))
    return det[inner]


def low_det_voxels(det: Tensor, mask: Tensor, threshold: float, *, previous: Tensor | None = None, max_voxels: int = 4096) -> Tensor:
    """Voxels ``(K, 3)`` (long) of ``mask`` where ``det`` (both ``(D0, D1, D2)``) is below
    ``threshold``, joined with ``previous`` (sorted, each once); beyond ``max_voxels``, those of
    lowest ``det`` now.

    >>> det = torch.ones(3, 3, 3); det[0, 1, 2] = 0.05; det[2, 2, 2] = -0.3
    >>> low_det_voxels(det, torch.ones(3, 3, 3, dtype=torch.bool), 0.1).tolist()
    [[0, 1, 2], [2, 2, 2]]
    >>> low_det_voxels(det, torch.ones(3, 3, 3, dtype=torch.bool), 0.1, previous=torch.tensor([[1, 1, 1]]), max_voxels=2).tolist()
    [[0, 1, 2], [2, 2, 2]]
    """
    found = (mask & (det < threshold)).nonzero()
    if previous is not None and previous.numel():
        found = torch.cat([previous.to(found), found])
    found = torch.unique(found, dim=0)
    if found.shape[0] > max_voxels:
        values = det[found[:, 0], found[:, 1], found[:, 2]]
        keep = torch.sort(torch.argsort(values, stable=True)[:max_voxels]).values
        found = found[keep]
    return found


@dataclass(frozen=True)
class FoldGuard:
    """The fold guard's settings and its two parts: the dense check and the penalty.

    Args:
        at: fractions of the fit's steps at which the metric's det J is checked (each in (0, 1]).
        threshold: voxels whose det J is below this at a check are guarded from then on.
        max_voxels: at most this many guarded voxels (those of lowest det J).

    >>> FoldGuard(at=(0.9,)).check_steps(250)
    frozenset({225})
    >>> FoldGuard(at=(1.5,))
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: fold_guard must list fractions of the fit's steps in (0, 1], got [1.5]; e.g. [0.9, 0.96], or null to switch the guard off.
    """

    at: tuple[float, ...] = DEFAULT_FOLD_GUARD
    threshold: float = 0.15
    max_voxels: int = 4096

    def __post_init__(self) -> None:
        if not self.at or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a <= 1 for a in self.at):
            raise InputError(
                f"fold_guard must list fractions of the fit's steps in (0, 1], got {list(self.at)}; "
                "e.g. [0.9, 0.96], or null to switch the guard off."
            )

    @classmethod
    def from_option(cls, at: Sequence[float] | None) -> FoldGuard | None:
        """``model.fold_guard`` as a guard (``None``: off)."""
        if at is None:
            return None
        if isinstance(at, (str, bytes)) or not isinstance(at, Sequence):
            raise InputError(
                f"fold_guard must be a list of fractions of the fit's steps, got {at!r}; e.g. [0.9, 0.96], or null to switch the guard off."
            )
        return cls(at=tuple(at))

    def check_steps(self, total_steps: int) -> frozenset[int]:
        """The global steps (0-based) whose start runs a check, for a fit of ``total_steps``."""
        return frozenset(min(total_steps - 1, round(a * total_steps)) for a in self.at) if total_steps > 0 else frozenset()

    def check(
        self,
        transform: Transform,
        mask: Tensor,
        previous: Tensor | None,
        *,
        lattice: Lattice | None = None,
        max_points: int = DEFAULT_MAX_POINTS,
    ) -> tuple[Tensor, float]:
        """The guarded voxels after a check of ``phi`` in the fixed foreground ``mask``
        ``(D0, D1, D2)`` (bool; ``previous`` voxels lie in it), and the smallest det J found there
        (``inf`` for an empty mask). Computed in the foreground's box, ``phi`` read on ``mask``'s device."""
        shape = (int(mask.shape[0]), int(mask.shape[1]), int(mask.shape[2]))
        lo, hi = foreground_box(mask)
        inside = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].cpu()
        if not bool(inside.any()):
            return (previous if previous is not None else torch.zeros(0, 3, dtype=torch.long)), float("inf")
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        det = metric_det_in_box(transform, shape, box, lattice=lattice, max_points=max_points, device=mask.device)
        offset = torch.tensor(lo)
        voxels = low_det_voxels(
            det, inside, self.threshold, previous=None if previous is None else previous.cpu() - offset, max_voxels=self.max_voxels,
        )
        return voxels + offset, float(det[inside].min())

    @staticmethod
    def penalty(transform: Transform, voxels: Tensor, shape: tuple[int, int, int], *, margin: float, per: int) -> Tensor:
        """``sum(ReLU(margin - det J)) / per`` over the guarded ``voxels`` ``(K, 3)``, det J by the
        metric's stencil (:func:`~nir_lightning.losses.folding.central_stencil_det`, one-sided on
        the image's border): each voxel weighs as one of a step's ``per`` random det J points, but
        is there at every step. (Weighed as their own mean instead, a handful of voxels took Adam's
        scale of the MLP's weights from the similarity: -0.008 to -0.016 of Dice on the choosing pairs.)

        >>> FoldGuard.penalty(lambda x: x, torch.tensor([[1, 1, 1]]), (3, 3, 3), margin=0.35, per=4)
        tensor(0.)
        """
        pts = voxel_to_normalized(voxels.float(), shape).reshape(1, -1, 1, 1, 3)
        return F.relu(margin - central_stencil_det(transform, pts, shape, voxels=voxels)).sum() / max(1, per)
