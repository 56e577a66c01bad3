"""Differentiable rigid and affine parameterisations of the world matrix.

Both produce ``W = W0 @ D`` (4x4, float64): ``W0`` is the starting world matrix (from the
initialisation or the previous stage) and ``D`` an update acting in the fixed world space
*about a centre* ``c`` (the fixed centre of mass), ``D p = L (p - c) + c + s t``. Rotating
about the centre of the anatomy, rather than the scanner origin, keeps rotation and
translation decoupled: a rotation does not move the centre.

Scaling, so that one Adam learning rate suits every parameter: all parameters are
dimensionless and move a point at distance ``s`` from the centre by about ``s`` times their
value, with ``s`` the *radius* of the anatomy (the RMS distance of the fixed foreground from
its centre, tens of mm): the rotation vector in radians, the linear update ``L - I``, and the
translation in units of ``s`` mm. A step of 0.01 then moves the anatomy by about 1 % of its
radius whichever parameter takes it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["AffineParameters", "RigidParameters", "rotation_matrix", "skew"]


def skew(v: Tensor) -> Tensor:
    """The 3x3 skew-symmetric matrix ``[v]_x`` with ``[v]_x u = v x u``.

    >>> skew(torch.tensor([1.0, 2.0, 3.0])) @ torch.tensor([0.0, 0.0, 1.0])
    tensor([ 2., -1.,  0.])
    """
    z = torch.zeros((), dtype=v.dtype, device=v.device)
    return torch.stack(
        [
            torch.stack([z, -v[2], v[1]]),
            torch.stack([v[2], z, -v[0]]),
            torch.stack([-v[1], v[0], z]),
        ]
    )


def rotation_matrix(rotvec: Tensor) -> Tensor:
    """Rotation ``(3, 3)`` for a rotation vector ``(3,)`` (axis times angle in radians), ``exp([v]_x)``.

    >>> r = rotation_matrix(torch.tensor([0.0, 0.0, torch.pi / 2], dtype=torch.float64))
    >>> (r @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).round(decimals=6).tolist()
    [0.0, 1.0, 0.0]
    """
    return torch.linalg.matrix_exp(skew(rotvec))


class _CentredUpdate(nn.Module):
    def __init__(
        self,
        center: np.ndarray,
        scale: float,
        base: np.ndarray | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0 mm, got {scale}")
        base_np = np.eye(4) if base is None else np.asarray(base, dtype=np.float64)
        self.scale = float(scale)
        self.register_buffer("center", torch.as_tensor(np.asarray(center, dtype=np.float64), device=device))
        self.register_buffer("base", torch.as_tensor(base_np, device=device))
        self.translation = nn.Parameter(torch.zeros(3, dtype=torch.float64, device=device))

    def linear(self) -> Tensor:
        raise NotImplementedError

    def matrix(self) -> Tensor:
        """The world matrix ``W = W0 @ D`` ``(4, 4)``, float64, differentiable in the parameters."""
        lin = self.linear()
        c: Tensor = self.center  # type: ignore[assignment]
        base: Tensor = self.base  # type: ignore[assignment]
        offset = c + self.scale * self.translation - lin @ c
        top = torch.cat([lin, offset[:, None]], dim=1)
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=top.dtype, device=top.device)
        return base @ torch.cat([top, bottom], dim=0)

    def forward(self) -> Tensor:
        return self.matrix()

    def numpy(self) -> np.ndarray:
        """:meth:`matrix` as a detached numpy array."""
        return self.matrix().detach().cpu().numpy()


class RigidParameters(_CentredUpdate):
    """``W = W0 @ D``, ``D p = R (p - c) + c + s t`` with ``R = exp([r]_x)``.

    Parameters: ``rotation`` ``r`` (radians) and ``translation`` ``t`` (units of ``scale`` mm);
    both start at 0, so ``W`` starts at ``base``.

    >>> p = RigidParameters(np.array([10.0, 0.0, 0.0]), scale=50.0)
    >>> with torch.no_grad():
    ...     _ = p.rotation.copy_(torch.tensor([0.0, 0.0, 0.3]))
    >>> (p.numpy() @ np.array([10.0, 0.0, 0.0, 1.0])).round(6).tolist()  # the centre stays
    [10.0, 0.0, 0.0, 1.0]
    """

    def __init__(
        self,
        center: np.ndarray,
        *,
        scale: float,
        base: np.ndarray | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(center, scale, base, device)
        self.rotation = nn.Parameter(torch.zeros(3, dtype=torch.float64, device=device))

    def linear(self) -> Tensor:
        return rotation_matrix(self.rotation)


class AffineParameters(_CentredUpdate):
    """``W = W0 @ D``, ``D p = (I + L) (p - c) + c + s t`` with a general 3x3 ``L``.

    Started from the rigid result as ``base`` with ``L = 0`` and ``t = 0``; ``L`` carries the
    scales and shears (and any remaining rotation).

    >>> p = AffineParameters(np.zeros(3), scale=50.0)
    >>> bool(np.allclose(p.numpy(), np.eye(4)))
    True
    """

    def __init__(
        self,
        center: np.ndarray,
        *,
        scale: float,
        base: np.ndarray | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(center, scale, base, device)
        self.delta = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64, device=device))

    def linear(self) -> Tensor:
        return torch.eye(3, dtype=self.delta.dtype, device=self.delta.device) + self.delta
