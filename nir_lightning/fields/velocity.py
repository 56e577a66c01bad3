"""Diffeomorphic mode: a stationary neural velocity field integrated with torchdiffeq.

``phi(x)`` is the flow of ``dy/dt = v(y)`` from ``y(0) = x`` to ``t = T``; its inverse is the
flow of ``-v`` over the same time. Points are normalized coordinates ``(..., 3)`` in
array-axis order (see :mod:`nir_lightning.coords`), like every other field.

Training integrates the sampled points directly (no dense grid); the folding penalty is
taken by finite differences on the integrated points, so it also works with
``adjoint=True`` (``odeint_adjoint`` cannot be differentiated twice).
:func:`scaling_and_squaring` computes the same transform from ``v`` sampled on the dense
grid, as an inference-time cross-check of the ODE result.

Two different det J describe the result, and metrics report both (see
:func:`~nir_lightning.evaluation.evaluate.evaluate`):

* ``folding_count`` / ``jacobian_det_min``: central finite differences of the dense
  displacement on the voxel grid (ANTs' ``CreateJacobianDeterminantImage``). An *estimate*: it
  can read det <= 0 where ``v`` varies on a two-voxel scale although the flow is a
  diffeomorphism, and whether a borderline voxel reads 0 or 1 fold depends on rounding (CPU,
  threads), so it is not a guarantee for this mode.
* ``flow_jacobian_det_min`` (:func:`flow_jacobian_determinant`): the flow's own Jacobian
  ``J = D phi``, integrated alongside the points by the variational equation
  ``dJ/dt = Dv(y) J``, ``J(0) = I``. For the exact flow ``det J = exp(int_0^T div v(y(t)) dt) > 0``
  (Liouville); with a fixed-step Runge-Kutta method the same scheme on ``(y, J)`` gives exactly
  the Jacobian of the map the solver computes (Runge-Kutta steps commute with differentiation),
  so this is the det J of the transform actually applied, positive while the step resolves ``v``.
  Not by construction: where training makes ``v`` steep (a flow compressing ~50x within a few
  voxels), a coarse step gives a computed map that is not locally invertible (measured: midpoint
  with 2 steps over ``T = 0.2``, det J down to -0.55 at a dozen voxels where central differences
  read no fold; rk4 with 4 steps matches a 5x finer rk4 to 7 %). A value <= 0 asks for a smaller
  ``step_size`` (or ``dopri5``), not for a stronger folding penalty.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from nir_lightning.coords import identity_grid, normalized_to_voxel_scale
from nir_lightning.core.chunked import DEFAULT_MAX_POINTS, evaluate_on_grid, grid_chunks
from nir_lightning.core.jacobian import determinant
from nir_lightning.errors import InputError
from nir_lightning.fields.base import ComposedField, NeuralField
from nir_lightning.fields.displacement import coordinate_network
from nir_lightning.fields.encoding import FourierFeatures
from nir_lightning.fields.feature_grid import FeatureGrid
from nir_lightning.fields.mlp import Activation, CoordinateMLP

ODEMethod = Literal["euler", "midpoint", "rk4", "dopri5"]
FIXED_STEP_METHODS: tuple[str, ...] = ("euler", "midpoint", "rk4")
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5",)


class StationaryVelocity(nn.Module):
    """``v(x) = scale * tanh(MLP(gamma(x)))`` in normalized units per unit time.

    ``forward(t, y)`` has the signature torchdiffeq expects (``t`` is ignored: the field
    is stationary); ``y`` is ``(M, 3)``.
    """

    def __init__(self, encoding: FourierFeatures | FeatureGrid, mlp: CoordinateMLP, *, scale: float) -> None:
        super().__init__()
        self.encoding = encoding
        self.mlp = mlp
        self.scale = scale

    def velocity(self, y: Tensor) -> Tensor:
        return self.from_features(self.encoding(y))

    def from_features(self, feats: Tensor) -> Tensor:
        """``v`` from encoded points ``(M, C)`` -> ``(M, 3)``."""
        return self.scale * torch.tanh(self.mlp(feats))

    def velocity_with_jacobian(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``v(y)`` ``(M, 3)`` and ``Dv(y)`` ``(M, 3, 3)`` by hand-written forward mode."""
        feats, dfeats = self.encoding.forward_with_jacobian(y)
        out, dout = self.mlp.forward_with_jacobian(feats, dfeats)
        th = torch.tanh(out)
        return self.scale * th, (self.scale * (1 - th * th))[..., None] * dout.transpose(1, 2)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.velocity(y)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Negated(nn.Module):
    """``-v``: its flow over ``[0, T]`` is the inverse of ``v``'s. Wraps without owning."""

    def __init__(self, velocity: StationaryVelocity) -> None:
        super().__init__()
        self.inner = [velocity]  # a list, so the velocity is not registered twice

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return -self.inner[0].velocity(y)


class _Variational(nn.Module):
    """``d/dt (y, J) = (v(y), Dv(y) J)``: the flow and its Jacobian, for torchdiffeq. Wraps without owning.

    ``y`` is ``(M, 3)``, ``J`` is ``(M, 3, 3)`` with ``J[m, i, a] = d y_i / d x_a``. ``Dv(y) J``
    is three forward-mode products (one per column of ``J``), exact to rounding.
    """

    def __init__(self, velocity: StationaryVelocity) -> None:
        super().__init__()
        self.inner = [velocity]

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        y, jac = state
        if isinstance(getattr(self.inner[0], "encoding", None), FeatureGrid):  # no forward-mode AD through grids
            vel, dv = self.inner[0].velocity_with_jacobian(y)
            return vel, dv @ jac
        velocity = self.inner[0].velocity

        def column(tangent: Tensor) -> tuple[Tensor, Tensor]:
            out = torch.func.jvp(velocity, (y,), (tangent,))
            return out[0], out[1]

        # vmap over the three columns of J: one forward-mode pass that also yields v(y)
        # (broadcast to the three columns); tangents (3, M, 3) -> Dv J (M, 3, 3)
        vel, dv_jac = torch.func.vmap(column)(jac.movedim(-1, 0))
        return vel[0], dv_jac.movedim(0, -1)


class VelocityField(NeuralField):
    """Diffeomorphic field ``phi = exp(T v)``: the flow of a stationary neural velocity.

    ``v(x) = scale * tanh(MLP(gamma(x)))`` (so ``|v_a| < scale`` per axis and the
    displacement is bounded by ``scale * T`` normalized units), integrated with
    torchdiffeq from ``t = 0`` to ``T``. The MLP starts near zero, so ``phi`` starts near
    the identity. Keyword arguments map one-to-one onto the CLI's
    ``model.field.init_args``.

    Args:
        num_frequencies, sigma, width, depth, activation, omega0, encoding_seed: the
            coordinate network, as in :class:`~nir_lightning.fields.displacement.DisplacementField`.
        scale: bound of each velocity component (normalized units per unit time).
        T: integration time.
        method: ``"euler"``, ``"midpoint"``, ``"rk4"`` (fixed steps) or ``"dopri5"`` (adaptive).
        step_size: step of the fixed-step methods (required for them; must be unset for
            ``dopri5``). The step used is ``T / ceil(T / step_size)`` so the last step lands
            exactly on ``T``.
        adjoint: integrate with ``odeint_adjoint`` (memory O(1) in the number of steps,
            about twice the compute; no second derivatives).
        rtol, atol: tolerances of ``dopri5``.

    >>> field = VelocityField(width=16, depth=2, num_frequencies=4, method="euler", step_size=0.1)
    >>> x = torch.zeros(2, 5, 3)
    >>> field(x).shape
    torch.Size([2, 5, 3])
    >>> bool((field.inverse(field(x)) - x).abs().max() < 1e-4)
    True
    >>> VelocityField(method="rk4", step_size=None)
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: model.field.init_args.step_size is required for the fixed-step method 'rk4' (without it torchdiffeq takes one single step over [0, T]); e.g. step_size=0.05.
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
        scale: float = 1.0,
        T: float = 0.2,
        method: ODEMethod = "rk4",
        step_size: float | None = 0.05,
        adjoint: bool = False,
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> None:
        super().__init__()
        encoding, mlp = coordinate_network(
            num_frequencies=num_frequencies,
            sigma=sigma,
            width=width,
            depth=depth,
            activation=activation,
            omega0=omega0,
            encoding_seed=encoding_seed,
        )
        self._setup_flow(StationaryVelocity(encoding, mlp, scale=scale), scale=scale, T=T, method=method,
                         step_size=step_size, adjoint=adjoint, rtol=rtol, atol=atol)

    def _setup_flow(
        self,
        velocity_net: StationaryVelocity,
        *,
        scale: float,
        T: float,
        method: ODEMethod,
        step_size: float | None,
        adjoint: bool,
        rtol: float,
        atol: float,
    ) -> None:
        """Check the integration options and keep them with the velocity network."""
        prefix = "model.field.init_args"
        if method not in FIXED_STEP_METHODS + ADAPTIVE_METHODS:
            raise InputError(f"{prefix}.method must be one of {FIXED_STEP_METHODS + ADAPTIVE_METHODS}, got {method!r}.")
        if not (math.isfinite(T) and T > 0):
            raise InputError(f"{prefix}.T (integration time) must be > 0, got {T}.")
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"{prefix}.scale (velocity bound) must be > 0, got {scale}.")
        if method in FIXED_STEP_METHODS:
            if step_size is None:
                raise InputError(
                    f"{prefix}.step_size is required for the fixed-step method {method!r} "
                    "(without it torchdiffeq takes one single step over [0, T]); e.g. step_size=0.05."
                )
            if not (math.isfinite(step_size) and 0 < step_size <= T):
                raise InputError(f"{prefix}.step_size must be in (0, T={T}], got {step_size}.")
        else:
            if step_size is not None:
                raise InputError(
                    f"{prefix}.step_size applies to fixed-step methods only; {method!r} chooses its own "
                    "steps from rtol/atol. Set step_size to null (--model.field.init_args.step_size=null)."
                )
            if not (rtol > 0 and atol > 0):
                raise InputError(f"{prefix}.rtol and atol must be > 0, got rtol={rtol}, atol={atol}.")
        self.velocity_net = velocity_net
        self.scale = scale
        self.T = T
        self.method = method
        self.step_size = step_size
        self.adjoint = adjoint
        self.rtol = rtol
        self.atol = atol
        self.num_steps = math.ceil(T / step_size - 1e-9) if step_size is not None else None

    # -- the velocity ----------------------------------------------------------------------
    def velocity(self, x: Tensor) -> Tensor:
        """``v(x)`` in normalized units per unit time, same shape as ``x``."""
        flat = x.reshape(-1, x.shape[-1])
        return self.velocity_net.velocity(flat).reshape(x.shape)

    # -- integration -----------------------------------------------------------------------
    def _times(self, like: Tensor) -> Tensor:
        if self.num_steps is not None:
            # Fixed-step solvers step from one given time to the next: these are the steps.
            return torch.linspace(0.0, self.T, self.num_steps + 1, dtype=like.dtype, device=like.device)
        return torch.tensor([0.0, self.T], dtype=like.dtype, device=like.device)

    def _flow(self, x: Tensor, func: nn.Module) -> Tensor:
        return self._integrate(x.reshape(-1, x.shape[-1]), func).reshape(x.shape)

    def _integrate(self, flat: Tensor, func: nn.Module) -> Tensor:
        """The flow of ``func`` from the points ``flat`` ``(M, 3)`` over ``[0, T]``."""
        t = self._times(flat)
        kwargs: dict = {"method": self.method}
        if self.method in ADAPTIVE_METHODS:
            kwargs.update(rtol=self.rtol, atol=self.atol)
        if self.adjoint:
            params = tuple(self.velocity_net.parameters())
            out = odeint_adjoint(func, flat, t, adjoint_params=params, **kwargs)
        else:
            out = odeint(func, flat, t, **kwargs)
        return out[-1]

    def forward(self, x: Tensor) -> Tensor:
        """``phi(x)``: the flow of ``v`` from ``x`` over ``[0, T]``."""
        return self._flow(x, self.velocity_net)

    def flow_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``phi(x)`` and its Jacobian, integrated together (the variational equation).

        Same solver, steps and tolerances as :meth:`forward`, always without the adjoint (an
        inference-time measurement). For fixed-step methods ``J`` is the exact Jacobian of the
        computed map ``x -> phi(x)``; with ``dopri5`` the error control also sees ``J``, so its
        steps (and ``phi``, within tolerance) can differ slightly from :meth:`forward`'s.

        Args:
            x: ``(..., 3)`` normalized points.

        Returns:
            ``phi`` ``(..., 3)`` and ``J`` ``(..., 3, 3)`` with ``J[..., i, a] = d phi_i / d x_a``
            in normalized units (its determinant is the same in voxel units: the per-axis
            voxel scale is a similarity ``S J S^-1``).

        >>> field = VelocityField(width=16, depth=2, num_frequencies=4, method="euler", step_size=0.1)
        >>> phi, jac = field.flow_with_jacobian(torch.zeros(2, 5, 3))
        >>> phi.shape, jac.shape, bool(torch.allclose(phi, field(torch.zeros(2, 5, 3))))
        (torch.Size([2, 5, 3]), torch.Size([2, 5, 3, 3]), True)
        """
        flat = x.reshape(-1, x.shape[-1])
        eye = torch.eye(flat.shape[-1], dtype=flat.dtype, device=flat.device).expand(flat.shape[0], -1, -1)
        kwargs: dict = {"method": self.method}
        if self.method in ADAPTIVE_METHODS:
            kwargs.update(rtol=self.rtol, atol=self.atol)
        ys, jacs = odeint(_Variational(self.velocity_net), (flat, eye.contiguous()), self._times(flat), **kwargs)
        return ys[-1].reshape(x.shape), jacs[-1].reshape(*x.shape, x.shape[-1])

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`flow_with_jacobian` (the interface of :class:`~nir_lightning.fields.base.NeuralField`)."""
        return self.flow_with_jacobian(x)

    def inverse(self, y: Tensor) -> Tensor:
        """``phi^-1(y)``: the flow of ``-v`` over ``[0, T]``."""
        return self._flow(y, Negated(self.velocity_net))

    invertible = True

    def extra_repr(self) -> str:
        step = f", step_size={self.step_size}" if self.step_size is not None else f", rtol={self.rtol}, atol={self.atol}"
        return f"T={self.T}, method={self.method!r}{step}, adjoint={self.adjoint}"


@torch.no_grad()
def dense_velocity(field: VelocityField, shape: tuple[int, int, int], *, max_points: int = DEFAULT_MAX_POINTS) -> Tensor:
    """``v`` on every voxel of the fixed grid, ``(D0, D1, D2, 3)`` normalized units per unit time."""
    return evaluate_on_grid(field.velocity, shape, max_points=max_points, device=next(field.parameters()).device)


@torch.no_grad()
def scaling_and_squaring(
    field: VelocityField,
    shape: tuple[int, int, int],
    *,
    num_steps: int = 7,
    inverse: bool = False,
    max_points: int = DEFAULT_MAX_POINTS,
) -> Tensor:
    """``phi = exp(T v)`` on the dense fixed grid by scaling and squaring (MONAI ``DVF2DDF``).

    ``T v`` is sampled on the grid, converted to voxel units (MONAI's ``Warp`` convention:
    channels in array-axis order, ``align_corners=True``), halved ``num_steps`` times and
    composed with itself as often (trilinear, border padding). An independent estimate of
    what the ODE solver computes; the two differ by interpolation error and near the border
    (where trajectories leaving the grid see a clamped velocity here).

    Returns normalized coordinates ``(D0, D1, D2, 3)``, like
    :func:`nir_lightning.core.resample.dense_field`.
    """
    v = dense_velocity(field, shape, max_points=max_points) * field.T
    if inverse:
        v = -v
    scale = normalized_to_voxel_scale(shape).to(v)
    dvf = (v * scale).permute(3, 0, 1, 2).unsqueeze(0)
    from monai.networks.blocks import DVF2DDF  # MONAI only for this cross-check

    ddf = DVF2DDF(num_steps=num_steps, mode="bilinear", padding_mode="border")(dvf)
    disp = ddf[0].permute(1, 2, 3, 0) / scale.clamp(min=1e-12)
    return identity_grid(shape, device=v.device, dtype=v.dtype) + disp


def has_flow_jacobian(field: NeuralField) -> bool:
    """Whether :func:`flow_with_jacobian` knows ``field``'s exact Jacobian."""
    if isinstance(field, ComposedField):
        return has_flow_jacobian(field.first) and has_flow_jacobian(field.second)
    return isinstance(field, VelocityField)


def flow_with_jacobian(field: NeuralField, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``phi(x)`` ``(..., 3)`` and its exact Jacobian ``(..., 3, 3)`` (normalized units), or ``None``.

    For a :class:`VelocityField` (:meth:`VelocityField.flow_with_jacobian`) and a
    :class:`~nir_lightning.fields.ComposedField` of such fields (the chain rule,
    ``D(phi2 o phi1)(x) = D phi2(phi1(x)) D phi1(x)``); ``None`` for any other field, whose
    det J is only known by finite differences.
    """
    if isinstance(field, VelocityField):
        return field.flow_with_jacobian(x)
    if isinstance(field, ComposedField):
        first = flow_with_jacobian(field.first, x)
        if first is None:
            return None
        second = flow_with_jacobian(field.second, first[0])
        if second is None:
            return None
        return second[0], second[1] @ first[1]
    return None


@torch.no_grad()
def flow_jacobian_determinant(
    field: NeuralField,
    shape: tuple[int, int, int],
    *,
    mask: Tensor | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
) -> Tensor | None:
    """det of the flow's own Jacobian at the voxel centres of the fixed grid, or ``None``.

    Not a finite-difference estimate (that is :func:`~nir_lightning.core.jacobian.jacobian_determinant`,
    which ``folding_count`` counts): the Jacobian integrated with the points
    (:func:`flow_with_jacobian`): positive exactly where the computed transform is locally
    invertible; <= 0 where the solver's step does not resolve ``v`` (see the module docstring).
    ``None`` for fields without an exact Jacobian (see :func:`flow_with_jacobian`).

    Args:
        field: the fitted field.
        shape: the fixed grid ``(D0, D1, D2)``.
        mask: optional ``(D0, D1, D2)`` bool; only these voxels are integrated (the rest read NaN).
        max_points: points per slab of the field's own passes; the Jacobian passes carry four
            times the activations (the point and three tangents), so they take a quarter.

    Returns:
        ``(D0, D1, D2)`` float64 det J on the CPU.

    >>> field = VelocityField(width=16, depth=2, num_frequencies=4, method="euler", step_size=0.1)
    >>> det = flow_jacobian_determinant(field, (4, 5, 6))
    >>> det.shape, bool((det - 1).abs().max() < 0.1)  # near the identity at initialisation
    (torch.Size([4, 5, 6]), True)
    """
    if not has_flow_jacobian(field):
        return None
    device = next(field.parameters()).device
    out = torch.full(shape, math.nan, dtype=torch.float64)
    for sl, pts in grid_chunks(shape, max_points=max(1, max_points // 4), device=device):
        sel = torch.ones(pts.shape[1:4], dtype=torch.bool) if mask is None else mask[sl].cpu().bool()
        if not bool(sel.any()):
            continue
        result = flow_with_jacobian(field, pts[0][sel.to(device)])
        assert result is not None
        det = determinant(result[1].double()).cpu()
        view = out[sl]
        view[sel] = det
    return out
