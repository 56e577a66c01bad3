"""The default field: ``phi(x) = x + u(x)`` with ``u = MLP(grid(x))`` on multiresolution feature grids.

The grids (:class:`~nir_lightning.fields.feature_grid.FeatureGrid`) hold the detail; a small
MLP turns a point's features into its displacement. A point costs one gather and a few
small matrix products instead of the SIREN's 128-wide layers, and its Jacobian comes in the
same pass (:meth:`GridDisplacementField.forward_with_jacobian`). Points are normalized
coordinates ``(..., 3)`` in array-axis order (see :mod:`nir_lightning.coords`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nir_lightning.fields.base import NeuralField
from nir_lightning.fields.feature_grid import FeatureGrid
from nir_lightning.fields.grid_reads import lattice_points
from nir_lightning.fields.mlp import Activation, CoordinateMLP


def grid_network(
    *,
    levels: int,
    coarsest: int,
    features: int,
    width: int,
    depth: int,
    activation: Activation,
    init_scale: float,
    seed: int,
) -> tuple[FeatureGrid, CoordinateMLP]:
    """The feature grids and the MLP of the grid fields: ``(..., 3) -> (..., 3)`` as ``mlp(grid(x))``.

    Zero hidden biases make the MLP vanish with the grids (ReLU and SiLU are 0 at 0): the field
    starts at the identity, and its output layer can start at full scale.

    >>> grid, mlp = grid_network(levels=2, coarsest=3, features=2, width=8, depth=1, activation="relu", init_scale=0.0, seed=0)
    >>> mlp(grid(torch.zeros(2, 3))).abs().max().item()
    0.0
    """
    encoding = FeatureGrid(levels=levels, features=features, coarsest=coarsest, init_scale=init_scale, seed=seed)
    mlp = CoordinateMLP(
        in_features=features, out_features=3, width=width, depth=depth, activation=activation, omega0=1.0, output_scale=1.0
    )
    with torch.no_grad():
        for module in mlp.hidden.modules():
            if isinstance(module, nn.Linear):
                module.bias.zero_()
    return encoding, mlp


class GridDisplacementField(NeuralField):
    """General deformable field ``phi(x) = x + MLP(grid(x))``.

    Keyword arguments map one-to-one onto the CLI's ``model.field.init_args``.

    Args:
        levels: feature-grid levels (each twice as fine as the one before).
        coarsest: vertices per axis of the coarsest level.
        features: features per vertex.
        width: hidden units of the MLP.
        depth: hidden layers of the MLP.
        activation: of the MLP's hidden layers: ``"relu"``, ``"silu"`` (smooth: the field's
            Jacobian does not jump where a hidden unit switches; measured in 0.2.12 and not the
            default: the same Dice and SDlogJ as ReLU on the report pairs, ~5-10 % more fit time,
            benchmarks/README.md) or ``"sine"``.
        init_scale: the grids start uniform in ``[-init_scale, init_scale]``.
        seed: seed of the grids' initialisation.

    >>> field = GridDisplacementField(levels=3, coarsest=3, features=4, width=8, depth=1)
    >>> x = torch.rand(2, 5, 3) * 2 - 1
    >>> field(x).shape
    torch.Size([2, 5, 3])
    >>> bool((field(x) - x).abs().max() < 1e-3)  # starts at the identity
    True
    >>> phi, jac = field.forward_with_jacobian(x)
    >>> jac.shape, bool(torch.allclose(phi, field(x)))
    (torch.Size([2, 5, 3, 3]), True)
    """

    def __init__(
        self,
        *,
        levels: int = 6,
        coarsest: int = 4,
        features: int = 4,
        width: int = 32,
        depth: int = 1,
        activation: Activation = "relu",
        init_scale: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.encoding, self.mlp = grid_network(
            levels=levels, coarsest=coarsest, features=features, width=width, depth=depth,
            activation=activation, init_scale=init_scale, seed=seed,
        )

    def displacement(self, x: Tensor) -> Tensor:
        """``u(x)`` in normalized units, same shape as ``x``."""
        flat = x.reshape(-1, x.shape[-1])
        return self.mlp(self.encoding(flat)).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.displacement(x)

    def on_lattice(self, axes: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """``phi`` on separable lattices given per axis (``(B, d_a)`` normalized coordinates):
        ``(B, d0, d1, d2, 3)``, the values of :meth:`forward` at their points, faster."""
        feats, _ = self.encoding.on_lattice(axes)
        u = self.mlp(feats.reshape(-1, feats.shape[-1])).reshape(*feats.shape[:-1], 3)
        ident = lattice_points(axes)
        return ident + u

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``phi(x)`` ``(..., 3)`` and its exact Jacobian ``(..., 3, 3)``, ``J[..., i, a] = d phi_i / d x_a``
        (normalized units; the determinant is the same in voxels)."""
        flat = x.reshape(-1, x.shape[-1])
        feats, dfeats = self.encoding.forward_with_jacobian(flat)
        u, du = self.mlp.forward_with_jacobian(feats, dfeats)
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        return x + u.reshape(x.shape), (du.transpose(1, 2) + eye).reshape(*x.shape, 3)
