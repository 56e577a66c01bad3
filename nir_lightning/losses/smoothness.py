"""Smoothness priors of the objective: how much the deformation's Jacobian varies, not only whether it folds.

The folding penalty (:mod:`nir_lightning.losses.folding`) is a barrier: it says nothing to a
field whose det J is spread wide above it, and that spread is what SDlogJ (the std of log det J
that Learn2Reg ranks beside Dice) reads. These priors act on the Jacobian ``J = d phi / d x`` in
millimetres along the fixed image's array axes (``J[..., i, a] = d phi_i / d x_a``, array-axis
order, :mod:`nir_lightning.coords`; dimensionless, so the same as in voxels where voxels are
isotropic):

* ``"bending"``: squared change of ``J`` between neighbouring lattice points, per millimetre of
  distance (a bending energy, in mm^-2: zero for every affine map, so the prior costs no accuracy
  where the anatomy asks for a large, smooth deformation). Per millimetre, not per voxel, so that
  one ``alpha`` asks for the same smoothness of the same anatomy at 1 mm as at 2 mm (per voxel,
  a 1 mm image would get a prior 4 times weaker);
* ``"diffusion"``: ``||J - I||^2`` (the classic diffusion regulariser; zero only for translations);
* ``"logdet"``: ``(log det J)^2`` (zero for volume-preserving maps; acts on the volume change
  that SDlogJ measures, nothing else).

Each is a mean over points, so its weight does not depend on how many points a step samples.
The lattice terms use the forward-difference Jacobian at the lattice step, which the
coarse-to-fine sampler's lattices give for free; unstructured samples have no neighbours, so
``"bending"`` reads nothing there (``"diffusion"`` and ``"logdet"`` do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from nir_lightning.core.jacobian import determinant, jacobian_forward
from nir_lightning.errors import InputError

SmoothnessKind = Literal["none", "bending", "diffusion", "logdet"]
SMOOTHNESS_KINDS: tuple[str, ...] = ("none", "bending", "diffusion", "logdet")

_DET_FLOOR = 1e-3  # log det J of a fold is undefined: the folding barrier handles det J <= 0


def diffusion_energy(jac: Tensor) -> Tensor:
    """Mean of ``||J - I||_F^2`` over Jacobians ``(..., 3, 3)``.

    >>> float(diffusion_energy(torch.eye(3).expand(4, 3, 3)))
    0.0
    >>> float(diffusion_energy(2 * torch.eye(3)[None]))  # a uniform scaling by 2
    3.0
    """
    eye = torch.eye(3, dtype=jac.dtype, device=jac.device)
    return (jac - eye).square().sum((-2, -1)).mean()


def log_det_energy(jac: Tensor) -> Tensor:
    """Mean of ``(log det J)^2`` over Jacobians ``(..., 3, 3)`` (det J floored at 1e-3).

    >>> float(log_det_energy(torch.diag(torch.tensor([2.0, 0.5, 1.0]))[None]))  # volume kept
    0.0
    >>> round(float(log_det_energy(2 * torch.eye(3)[None])), 4)  # (3 log 2)^2
    4.3241
    """
    return torch.log(determinant(jac).clamp(min=_DET_FLOOR)).square().mean()


def bending_energy_lattice(jac: Tensor, spacing: tuple[float, float, float]) -> Tensor:
    """Mean squared change of the Jacobian between lattice neighbours, per unit of distance.

    ``jac`` ``(B, d0, d1, d2, 3, 3)`` on a lattice of step ``spacing`` (the unit of distance): the sum over
    the three axes of ``||(J(x + h_a) - J(x)) / h_a||_F^2``, each axis its own mean. Zero for
    affine maps; for ``phi(x) = x + A sin(w x_0) e_0`` it is ``A^2 w^4 / 2`` on average.

    >>> x = torch.stack(torch.meshgrid(*[torch.arange(6.0)] * 3, indexing="ij"), -1)[None]
    >>> jac = jacobian_forward(x @ torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.0, 0.0, 1.1]]).T, (1, 1, 1))
    >>> float(bending_energy_lattice(jac, (1.0, 1.0, 1.0))) < 1e-10  # affine
    True
    """
    total = jac.new_zeros(())
    for a in range(3):
        if jac.shape[1 + a] < 2:
            continue
        d = torch.diff(jac, dim=1 + a) / spacing[a]
        total = total + d.square().sum((-2, -1)).mean()
    return total


@dataclass(frozen=True)
class SmoothnessPenalty:
    """The smoothness term of the objective (weighted by ``alpha`` there).

    Args:
        kind: ``"bending"``, ``"diffusion"``, ``"logdet"`` or ``"none"`` (see the module).

    >>> SmoothnessPenalty("elastic")
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: smoothness must be one of 'none', 'bending', 'diffusion', 'logdet', got 'elastic'
    """

    kind: SmoothnessKind = "bending"

    def __post_init__(self) -> None:
        if self.kind not in SMOOTHNESS_KINDS:
            raise InputError(f"smoothness must be one of {', '.join(repr(k) for k in SMOOTHNESS_KINDS)}, got {self.kind!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def lattice(
        self,
        phi_vox: Tensor,
        spacing: tuple[float, float, float],
        voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
        jac_vox: Tensor | None = None,
    ) -> Tensor:
        """The prior on a lattice sample, from its transformed points ``phi_vox`` ``(B, d0, d1, d2, 3)``
        (fixed voxels), its step ``spacing`` (fixed voxels) and the fixed image's ``voxel_size``
        (mm along each array axis: the prior is taken in millimetres; ``(1, 1, 1)``: in voxels).
        ``jac_vox``: ``jacobian_forward(phi_vox, spacing)`` when the caller has it (the folding
        barrier's), so that the lattice's Jacobian is taken once a step."""
        if not self.active or min(phi_vox.shape[1:4]) < 2:
            return phi_vox.new_zeros(())
        jac = jacobian_forward(phi_vox, spacing) if jac_vox is None else jac_vox
        if voxel_size != (1.0, 1.0, 1.0):
            # in mm: d(phi_i vs_i) / d(x_a vs_a), i.e. row i times vs_i, column a over vs_a
            vs = jac.new_tensor(voxel_size)
            jac = jac * (vs[:, None] / vs[None, :])
            spacing = (spacing[0] * voxel_size[0], spacing[1] * voxel_size[1], spacing[2] * voxel_size[2])
        if self.kind == "bending":
            return bending_energy_lattice(jac, spacing)
        return self.points(jac)

    def points(self, jac: Tensor) -> Tensor:
        """The prior at unstructured points from their Jacobians ``(..., 3, 3)`` in fixed voxels
        (``"bending"`` needs neighbours: zero here)."""
        if self.kind == "diffusion":
            return diffusion_energy(jac)
        if self.kind == "logdet":
            return log_det_energy(jac)
        return jac.new_zeros(())
