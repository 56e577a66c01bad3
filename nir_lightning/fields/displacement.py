"""The general deformable field ``phi(x) = x + u(x)`` and the coordinate network every field uses.

All points are normalized coordinates ``(..., 3)`` in array-axis order (see
:mod:`nir_lightning.coords`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nir_lightning.fields.base import NeuralField
from nir_lightning.fields.encoding import FourierFeatures
from nir_lightning.fields.mlp import Activation, CoordinateMLP


def coordinate_network(
    *,
    num_frequencies: int,
    sigma: float,
    width: int,
    depth: int,
    activation: Activation,
    omega0: float,
    encoding_seed: int,
) -> tuple[FourierFeatures, CoordinateMLP]:
    """The encoding ``gamma`` and the MLP of every field: ``(..., 3) -> (..., 3)`` as ``mlp(gamma(x))``.

    >>> import torch
    >>> enc, mlp = coordinate_network(num_frequencies=4, sigma=1.0, width=8, depth=1,
    ...                               activation="sine", omega0=30.0, encoding_seed=0)
    >>> mlp(enc(torch.zeros(2, 3))).shape
    torch.Size([2, 3])
    """
    encoding = FourierFeatures(num_frequencies=num_frequencies, sigma=sigma, seed=encoding_seed)
    mlp = CoordinateMLP(
        in_features=encoding.out_features,
        out_features=3,
        width=width,
        depth=depth,
        activation=activation,
        omega0=omega0,
    )
    return encoding, mlp


class DisplacementField(NeuralField):
    """General deformable field ``phi(x) = x + u(x)``, ``u = MLP(gamma(x))``.

    Keyword arguments map one-to-one onto the CLI's ``model.field.init_args``.

    Args:
        num_frequencies: Gaussian Fourier features of the coordinate (0 = raw coordinates).
        sigma: scale of the Fourier frequencies.
        width: hidden units per layer.
        depth: hidden layers.
        activation: ``"sine"`` (SIREN) or ``"relu"``.
        omega0: SIREN frequency factor.
        encoding_seed: seed of the Fourier matrix.

    >>> import torch
    >>> field = DisplacementField(width=16, depth=2, num_frequencies=4)
    >>> x = torch.zeros(2, 5, 3)
    >>> field(x).shape
    torch.Size([2, 5, 3])
    >>> bool((field(x) - x).abs().max() < 0.05)  # starts near the identity
    True
    """

    def __init__(
        self,
        *,
        num_frequencies: int = 64,
        sigma: float = 2.0,
        width: int = 128,
        depth: int = 3,
        activation: Activation = "sine",
        omega0: float = 30.0,
        encoding_seed: int = 0,
    ) -> None:
        super().__init__()
        self.encoding, self.mlp = coordinate_network(
            num_frequencies=num_frequencies,
            sigma=sigma,
            width=width,
            depth=depth,
            activation=activation,
            omega0=omega0,
            encoding_seed=encoding_seed,
        )

    def displacement(self, x: Tensor) -> Tensor:
        """``u(x)`` in normalized units, same shape as ``x``."""
        flat = x.reshape(-1, x.shape[-1])
        return self.mlp(self.encoding(flat)).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.displacement(x)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``phi(x)`` and its exact Jacobian ``(..., 3, 3)`` by forward mode through the encoding and MLP."""
        flat = x.reshape(-1, x.shape[-1])
        feats, dfeats = self.encoding.forward_with_jacobian(flat)
        u, du = self.mlp.forward_with_jacobian(feats, dfeats)
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        return x + u.reshape(x.shape), (du.transpose(1, 2) + eye).reshape(*x.shape, 3)
