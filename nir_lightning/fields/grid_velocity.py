"""Diffeomorphic mode on the default encoding: a feature-grid velocity integrated with torchdiffeq.

:class:`GridVelocityField` is :class:`~nir_lightning.fields.velocity.VelocityField` (flow, inverse,
the flow's own Jacobian) with the velocity ``scale * tanh(MLP(grid(x)))`` of the default
displacement field's feature grids; on a lattice it reads the first velocity evaluation axis by
axis (:meth:`GridVelocityField.on_lattice`).
"""

from __future__ import annotations

from torch import Tensor, nn

from nir_lightning.fields.base import NeuralField
from nir_lightning.fields.feature_grid import FeatureGrid
from nir_lightning.fields.grid_field import grid_network
from nir_lightning.fields.grid_reads import lattice_points
from nir_lightning.fields.mlp import Activation
from nir_lightning.fields.velocity import Negated, ODEMethod, StationaryVelocity, VelocityField

__all__ = ["GridVelocityField"]


class _KnownStart(nn.Module):
    """The torchdiffeq function ``func`` (``v``, or :class:`~nir_lightning.fields.velocity.Negated`
    ``-v``), except at the initial state ``y0`` itself, where ``f0`` (already computed) is returned.

    Every fixed-step solver of torchdiffeq evaluates the function at ``y0`` first, with the very
    tensor it was given; a lattice computes that first evaluation axis by axis instead
    (:meth:`GridVelocityField.on_lattice`). Any other argument, a copy of ``y0`` included, is
    evaluated as usual, so the result cannot depend on the shortcut being taken. Wraps without owning.
    """

    def __init__(self, func: nn.Module, y0: Tensor, f0: Tensor) -> None:
        super().__init__()
        self.inner = [func]
        self.y0, self.f0 = y0, f0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        if y is self.y0:
            return self.f0
        return self.inner[0](t, y)


class GridVelocityField(VelocityField):
    """Diffeomorphic field on the default encoding: ``v(x) = scale * tanh(MLP(grid(x)))``, integrated
    with torchdiffeq like :class:`VelocityField`.

    The velocity costs what the displacement field costs per evaluation, so a fit costs about
    ``evaluations per step`` times the displacement mode's field time (midpoint, one step: 2);
    the inverse, the flow's own Jacobian and every output are those of :class:`VelocityField`.
    Keyword arguments map one-to-one onto the CLI's ``model.field.init_args``.

    Args:
        levels, coarsest, features, width, depth, activation, init_scale, seed: the feature grid
            and MLP, as in :class:`~nir_lightning.fields.grid_field.GridDisplacementField`.
        scale, T, method, step_size, adjoint, rtol, atol: the integration, as in :class:`VelocityField`.

    >>> import torch
    >>> field = GridVelocityField(levels=2, coarsest=3, features=2, width=8)
    >>> x = torch.rand(4, 3) * 2 - 1
    >>> bool((field(x) - x).abs().max() < 1e-3), bool((field.inverse(field(x)) - x).abs().max() < 1e-5)
    (True, True)
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
        scale: float = 1.0,
        T: float = 1.0,
        method: ODEMethod = "midpoint",
        step_size: float | None = 1.0,
        adjoint: bool = False,
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> None:
        NeuralField.__init__(self)
        encoding, mlp = grid_network(
            levels=levels, coarsest=coarsest, features=features, width=width, depth=depth,
            activation=activation, init_scale=init_scale, seed=seed,
        )
        self._setup_flow(StationaryVelocity(encoding, mlp, scale=scale), scale=scale, T=T, method=method,
                         step_size=step_size, adjoint=adjoint, rtol=rtol, atol=atol)

    def on_lattice(self, axes: tuple[Tensor, Tensor, Tensor], *, inverse: bool = False) -> Tensor:
        """``phi`` on separable lattices given per axis (``(B, d_a)`` normalized coordinates):
        ``(B, d0, d1, d2, 3)``, the values of :meth:`forward` at their points (to rounding);
        with ``inverse``, ``phi^-1`` (the flow of ``-v``), the values of :meth:`inverse`.

        The first velocity evaluation, at the lattice points themselves, reads the grids axis
        by axis (:meth:`~nir_lightning.fields.feature_grid.FeatureGrid.on_lattice`); torchdiffeq
        integrates from there as in :meth:`forward` (midpoint with one step: half the point
        reads of a step). With ``adjoint`` (whose solver sees copies of the points) every
        evaluation reads points.

        >>> import torch
        >>> field = GridVelocityField(levels=2, coarsest=3, features=2, width=8, init_scale=0.5)
        >>> axes = tuple(torch.linspace(-1, 1, n)[None] for n in (3, 4, 5))
        >>> pts = torch.stack(torch.meshgrid(*(a[0] for a in axes), indexing="ij"), -1)[None]
        >>> bool(torch.allclose(field.on_lattice(axes), field(pts), atol=1e-6))
        True
        >>> bool(torch.allclose(field.on_lattice(axes, inverse=True), field.inverse(pts), atol=1e-6))
        True
        """
        ident = lattice_points(axes)
        flat = ident.reshape(-1, 3)
        func = Negated(self.velocity_net) if inverse else self.velocity_net
        if self.adjoint:
            return self._integrate(flat, func).reshape(ident.shape)
        encoding = self.velocity_net.encoding
        assert isinstance(encoding, FeatureGrid)
        feats, _ = encoding.on_lattice(axes)
        v0 = self.velocity_net.from_features(feats.reshape(-1, feats.shape[-1]))
        return self._integrate(flat, _KnownStart(func, flat, -v0 if inverse else v0)).reshape(ident.shape)
