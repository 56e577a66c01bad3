"""The fold barrier and the bending prior of a lattice sample in one pass, with a written-out gradient.

A lattice sample's transformed points ``phi`` ``(B, d0, d1, d2, 3)`` (fixed voxels) give its
forward-difference Jacobian, and from it the two lattice terms of the objective:

* the barrier ``mean(ReLU(margin - det J))`` (:func:`~nir_lightning.losses.folding.jacobian_penalty`,
  ``"jedt"``);
* the bending prior ``sum_a mean ||(J(x + h_a) - J(x)) / h_a||_F^2`` with ``J`` and ``h`` in
  millimetres (:func:`~nir_lightning.losses.smoothness.bending_energy_lattice` after
  :meth:`~nir_lightning.losses.smoothness.SmoothnessPenalty.lattice`'s change of units).

The same values as those functions (the Jacobian and det J bit for bit), computed component-major:
the nine entries of ``J`` are nine contiguous arrays instead of a ``(..., 3, 3)`` tail, so each
product runs over contiguous memory, and the gradient is written out (the cofactors for det J, a
difference of differences for the bending term, and the forward differences' transpose) instead
of autograd's chain of strided products: on a lattice of the default finest stage at 2 mm
(38 x 46 x 52 points, one thread) 12 ms forward and backward instead of 28 (`benchmarks/README.md`,
0.2.23). The objective takes this path where its terms are that pair
(:func:`~nir_lightning.losses.objective.registration_objective`), the two-term one otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nir_lightning.core.jacobian import det_of_entries

__all__ = ["lattice_barrier_and_bending"]


def lattice_barrier_and_bending(
    phi_vox: Tensor,
    spacing: tuple[float, float, float],
    *,
    margin: float,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    bending: bool = True,
) -> tuple[Tensor, Tensor]:
    """The fold barrier and the bending prior of a lattice sample: two scalars.

    Args:
        phi_vox: ``(B, d0, d1, d2, 3)`` transformed lattice points in fixed voxels, every
            ``d_a >= 2``.
        spacing: the lattice step along each array axis, in fixed voxels.
        margin: the barrier's det J floor.
        voxel_size: the fixed image's voxel size in mm (the bending prior is per millimetre).
        bending: compute the bending prior (``False``: it is returned as 0).

    Returns:
        ``(barrier, bending)``: ``mean(ReLU(margin - det J))`` over the ``(d0-1)(d1-1)(d2-1)``
        forward-difference Jacobians, and the bending energy in mm^-2.

    >>> x = torch.stack(torch.meshgrid(*[torch.arange(5.0)] * 3, indexing="ij"), -1)[None]
    >>> barrier, bend = lattice_barrier_and_bending(x * 0.2, (1.0, 1.0, 1.0), margin=0.35)
    >>> round(float(barrier), 4), round(float(bend), 9)  # det J = 0.008 everywhere; an affine map does not bend
    (0.342, 0.0)
    """
    if min(phi_vox.shape[1:4]) < 2:
        raise ValueError(f"lattice_barrier_and_bending needs at least 2 points along each lattice axis, got {tuple(phi_vox.shape[1:4])}")
    h = tuple(float(s) for s in spacing)
    vs = tuple(float(v) for v in voxel_size)
    out = _LatticeTerms.apply(phi_vox, h, vs, float(margin), bool(bending))
    return out[0], out[1]


def _cofactors(j: Tensor) -> list[Tensor]:
    """The nine cofactors ``d det / d J_ia`` of component-major Jacobians ``(3, 3, ...)`` (row ``i``, column ``a``)."""
    a, b, c = j[0, 0], j[0, 1], j[0, 2]
    d, e, f = j[1, 0], j[1, 1], j[1, 2]
    g, h, i = j[2, 0], j[2, 1], j[2, 2]
    return [e * i - f * h, f * g - d * i, d * h - e * g,
            c * h - b * i, a * i - c * g, b * g - a * h,
            b * f - c * e, c * d - a * f, a * e - b * d]  # fmt: skip


class _LatticeTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, phi_vox: Tensor, h: tuple[float, float, float], vs: tuple[float, float, float], margin: float, bending: bool) -> Tensor:
        p = phi_vox.detach().movedim(-1, 0)  # (3, B, d0, d1, d2): component i first
        base = p[:, :, :-1, :-1, :-1]
        jac = torch.stack(
            [(p[:, :, 1:, :-1, :-1] - base) / h[0], (p[:, :, :-1, 1:, :-1] - base) / h[1], (p[:, :, :-1, :-1, 1:] - base) / h[2]], dim=1
        )  # (3 rows i, 3 columns a, B, n0, n1, n2): J_ia = d phi_i / d x_a, as jacobian_forward
        det = det_of_entries(*jac.reshape(9, *jac.shape[2:]).unbind(0))
        barrier = torch.relu(margin - det).mean()
        bend = det.new_zeros(())
        ratio = None
        diffs: list[Tensor | None] = [None, None, None]  # J's change (mm) along each lattice axis, kept for the backward
        if bending:
            ratio = jac.new_tensor([[vs[r] / vs[col] for col in range(3)] for r in range(3)]).reshape(3, 3, 1, 1, 1, 1)
            jmm = jac * ratio
            for ax in range(3):
                if jmm.shape[3 + ax] < 2:
                    continue
                diffs[ax] = diff = torch.diff(jmm, dim=3 + ax)
                scaled = diff / (h[ax] * vs[ax])
                bend = bend + scaled.square().sum() / (diff.numel() // 9)
        ctx.save_for_backward(jac, det)
        ctx.consts = (h, vs, margin, ratio, diffs, tuple(phi_vox.shape))
        return torch.stack([barrier, bend])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        jac, det = ctx.saved_tensors
        h, vs, margin, ratio, diffs, shape = ctx.consts
        g_barrier, g_bend = grad[0], grad[1]
        # barrier: d/d det of mean(ReLU(margin - det)) is -1/N where margin - det > 0
        weight = (margin - det > 0).to(det.dtype) * (-g_barrier / det.numel())
        g_jac = torch.stack([weight * cof for cof in _cofactors(jac)]).reshape(jac.shape)
        if ratio is not None:
            g_mm = torch.zeros_like(jac)
            for ax, diff in enumerate(diffs):
                if diff is None:
                    continue
                n = jac.shape[3 + ax]
                s = h[ax] * vs[ax]
                coeff = 2 * g_bend / ((diff.numel() // 9) * s * s)
                step = diff * coeff  # d/d diff of sum(diff^2 / s^2) / N_ax, before the difference's transpose
                g_mm.narrow(3 + ax, 1, n - 1).add_(step)
                g_mm.narrow(3 + ax, 0, n - 1).sub_(step)
            g_jac = g_jac + g_mm * ratio
        # the forward differences' transpose: J_ia = (phi_i(x + e_a) - phi_i(x)) / h_a
        g_p = jac.new_zeros((3, *shape[:4]))
        base = g_p[:, :, :-1, :-1, :-1]
        for ax, region in enumerate((g_p[:, :, 1:, :-1, :-1], g_p[:, :, :-1, 1:, :-1], g_p[:, :, :-1, :-1, 1:])):
            col = g_jac[:, ax] / h[ax]
            region.add_(col)
            base.sub_(col)
        return g_p.movedim(0, -1), None, None, None, None
