"""The field interface and the fields built from others (composition, inverse).

A field maps normalized fixed-image points ``x`` ``(..., 3)`` (array-axis order, see
:mod:`nir_lightning.coords`) to the moving-image points ``phi(x)``, same shape. Whether a
field can be inverted is declared (:attr:`NeuralField.invertible`), never guessed.
"""

from __future__ import annotations

from torch import Tensor, nn


class NeuralField(nn.Module):
    """Base class: ``forward(x) -> phi(x)`` for points ``x`` of shape ``(..., 3)``.

    Subclasses that can be inverted set :attr:`invertible` and implement :meth:`inverse`.
    """

    @property
    def invertible(self) -> bool:
        """Whether :meth:`inverse` is available (diffeomorphic fields)."""
        return False

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def has_jacobian(self) -> bool:
        """Whether :meth:`forward_with_jacobian` gives the exact Jacobian in one pass."""
        return type(self).forward_with_jacobian is not NeuralField.forward_with_jacobian

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``phi(x)`` ``(..., 3)`` and its Jacobian ``(..., 3, 3)``, ``J[..., i, a] = d phi_i / d x_a``
        (normalized units; det J is the same in voxels); only when :attr:`has_jacobian`."""
        raise TypeError(
            f"{type(self).__name__} has no analytic Jacobian; use model.jacobian_stencil=forward or central with it."
        )

    def inverse(self, y: Tensor) -> Tensor:
        """``phi^-1(y)`` for points ``y`` ``(..., 3)``; only when :attr:`invertible`."""
        raise TypeError(f"{type(self).__name__} is not invertible (invertible=False); use a VelocityField for an inverse.")


class ComposedField(NeuralField):
    """``phi(x) = second(first(x))``; invertible when both parts are.

    >>> import torch
    >>> from nir_lightning.fields.displacement import DisplacementField
    >>> a, b = DisplacementField(width=8, depth=1), DisplacementField(width=8, depth=1)
    >>> x = torch.zeros(4, 3)
    >>> bool(torch.equal(ComposedField(a, b)(x), b(a(x))))
    True
    >>> ComposedField(a, b).invertible
    False
    """

    def __init__(self, first: NeuralField, second: NeuralField) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @property
    def has_jacobian(self) -> bool:
        return self.first.has_jacobian and self.second.has_jacobian

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The chain rule: ``D(second o first)(x) = D second(first(x)) D first(x)``."""
        y, j1 = self.first.forward_with_jacobian(x)
        z, j2 = self.second.forward_with_jacobian(y)
        return z, j2 @ j1

    @property
    def invertible(self) -> bool:
        return self.first.invertible and self.second.invertible

    def inverse(self, y: Tensor) -> Tensor:
        """``phi^-1 = first^-1 o second^-1``."""
        if not self.invertible:
            raise TypeError("ComposedField.inverse needs two invertible fields (e.g. two VelocityFields)")
        return self.first.inverse(self.second.inverse(y))


class InverseField(NeuralField):
    """``phi^-1`` of an invertible field as a field of its own (for dense evaluation)."""

    def __init__(self, field: NeuralField) -> None:
        super().__init__()
        if not field.invertible:
            raise TypeError(f"{type(field).__name__} has no inverse")
        self.field = field

    def forward(self, x: Tensor) -> Tensor:
        return self.field.inverse(x)

    @property
    def invertible(self) -> bool:
        return True

    def inverse(self, y: Tensor) -> Tensor:
        return self.field(y)
