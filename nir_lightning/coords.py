"""The one coordinate convention of nir_lightning.

Every module that touches coordinates imports from here; nothing else re-derives
these formulas.

Convention
----------
* **Axis order.** Images are tensors ``(B, C, D0, D1, D2)`` whose spatial axes are the
  *array axes* of the NIfTI data (``nibabel.load(f).get_fdata()[i, j, k]``). A point is a
  vector ``(x0, x1, x2)`` in that same array-axis order, stored in the last dimension.
  (``torch.nn.functional.grid_sample`` wants the reverse order, ``(x2, x1, x0)``;
  :func:`to_grid_sample` is the only place where that flip happens.)
* **Normalized coordinates.** ``x_a = 2 * v_a / (n_a - 1) - 1`` for voxel index ``v_a`` on
  an axis of ``n_a`` voxels, so voxel centres ``0`` and ``n_a - 1`` map to ``-1`` and
  ``+1``. This is ``align_corners=True`` (:data:`ALIGN_CORNERS`); an axis with one voxel
  maps to ``0``.
* **World coordinates.** Millimetres in the NIfTI RAS+ frame through the *fixed* image's
  4x4 affine: ``world = A @ [v, 1]``.
* **Fields.** A field maps a fixed-image point ``x`` to ``phi(x) = x + u(x)`` in normalized
  coordinates; the moving image is sampled at ``phi(x)`` (a pull-back, as in ITK/ANTs).
* **Exported displacements** (``displacement.nii.gz``) follow ITK/ANTs: world-space
  millimetres in **LPS** (``d_LPS = (-d_R, -d_A, d_S)`` of the RAS vector), shape
  ``(X, Y, Z, 1, 3)``, NIfTI intent ``vector``; ``p_fixed + d(p_fixed)`` is the matching
  point in the moving image. See :func:`ras_to_lps`.
* **Composition** (ANTs' order, for an affine part ``A`` and a deformable part ``u``): the
  displacement acts in the fixed space first, then the affine maps to the moving space,
  ``phi(p) = A(p + u(p))`` in world coordinates; ANTs applies the same chain as
  ``antsApplyTransforms -t displacement.nii.gz -t affine.mat``.
  Here ``A`` is the 4x4 *world matrix* ``W`` (fixed-world RAS mm -> moving-world RAS mm,
  :func:`world_matrix_to_itk` writes it in ITK's LPS), ``u`` the deformable displacement on
  the fixed grid. On the arrays the chain is
  ``v_fixed -> p = V_f [v, 1] -> p + u(p) -> W (p + u(p)) -> V_m^-1 (...) = v_moving``
  (``V_f``, ``V_m``: the NIfTI affines); in normalized coordinates the affine part is the
  single 4x4 matrix :func:`normalized_chain_matrix`. ``W = I`` means "aligned by the
  headers", which is what a pair on one grid, or registered with ``--affine none``, gets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

ALIGN_CORNERS: bool = True
"""Normalized coordinates address voxel centres: -1 and +1 are the first and last
voxel centres of an axis (``align_corners=True`` in ``grid_sample``)."""

SPATIAL_DIMS: int = 3

_RAS_TO_LPS = (-1.0, -1.0, 1.0)


def _shape_tensor(shape: Sequence[int], like: Tensor) -> Tensor:
    if len(shape) != SPATIAL_DIMS:
        raise ValueError(f"expected a 3D spatial shape, got {tuple(shape)}")
    return torch.as_tensor([float(s) for s in shape], dtype=like.dtype, device=like.device)


def voxel_to_normalized(voxel: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel indices ``(..., 3)`` (array-axis order) to normalized ``[-1, 1]`` coordinates.

    >>> voxel_to_normalized(torch.tensor([[0.0, 4.0, 9.0]]), (5, 5, 10))
    tensor([[-1.,  1.,  1.]])
    """
    n = _shape_tensor(shape, voxel)
    scale = torch.where(n > 1, 2.0 / (n - 1).clamp(min=1), torch.zeros_like(n))
    return voxel * scale - (n > 1).to(voxel.dtype)


def inside_grid(x: Tensor) -> Tensor:
    """Whether normalized points ``(..., 3)`` lie within the grid's voxel centres, ``|x| <= 1`` on
    every axis: where a sample reads the image, not the zero padding beyond its field of view
    (``(...)`` bool; the affine stage's and the fit's test of the moving field of view).

    >>> inside_grid(torch.tensor([[0.0, 1.0, -1.0], [0.0, 1.01, 0.0]])).tolist()
    [True, False]
    """
    return (x.abs() <= 1.0).all(dim=-1)


def normalized_to_voxel(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Normalized coordinates ``(..., 3)`` to (fractional) voxel indices.

    >>> normalized_to_voxel(torch.tensor([[-1.0, 0.0, 1.0]]), (5, 5, 5))
    tensor([[0., 2., 4.]])
    """
    n = _shape_tensor(shape, x)
    return (x + 1.0) * (n - 1) / 2.0


def normalized_to_voxel_scale(shape: Sequence[int]) -> Tensor:
    """Per-axis factor that turns a normalized *displacement* into voxels, ``(n - 1) / 2``."""
    return torch.as_tensor([(s - 1) / 2.0 for s in shape], dtype=torch.float32)


def identity_grid(
    shape: Sequence[int],
    *,
    stride: Sequence[int] | int = 1,
    offset: Sequence[int] | int = 0,
    stop: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Normalized coordinates of the lattice ``offset + stride * k`` of a grid of ``shape``,
    below ``stop`` (voxels, exclusive, per axis; default ``shape``).

    Returns ``(d0, d1, d2, 3)`` with ``d_a = ceil((stop_a - offset_a) / stride_a)``.

    >>> identity_grid((3, 4, 5)).shape
    torch.Size([3, 4, 5, 3])
    >>> identity_grid((5, 5, 5), stride=2)[..., 0].unique()
    tensor([-1.,  0.,  1.])
    """
    strides = _triple(stride)
    offsets = _triple(offset)
    stops = tuple(shape) if stop is None else tuple(stop)
    # axis by axis, broadcast into the grid: no (d0, d1, d2, 3) grid of voxel indices first
    axes = [
        normalized_axis(shape, a, o, n, stride=s, device=device, dtype=dtype)
        for a, (n, s, o) in enumerate(zip(stops, strides, offsets, strict=True))
    ]
    out = torch.empty(*(len(ax) for ax in axes), SPATIAL_DIMS, device=device, dtype=axes[0].dtype)
    for a, ax in enumerate(axes):
        view = [1, 1, 1]
        view[a] = -1
        out[..., a] = ax.reshape(view)
    return out


def normalized_axis(
    shape: Sequence[int],
    axis: int,
    start: int = 0,
    stop: int | None = None,
    *,
    stride: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Normalized coordinates ``(d,)`` along ``axis`` of voxels ``start, start + stride, ...`` below
    ``stop`` (default ``shape[axis]``) of a grid of ``shape``: :func:`voxel_to_normalized`'s
    arithmetic on that axis alone, bit for bit (the axes of a separable lattice read).

    >>> normalized_axis((3, 5, 9), 1)
    tensor([-1.0000, -0.5000,  0.0000,  0.5000,  1.0000])
    >>> normalized_axis((3, 5, 9), 2, 2, 7, stride=2)
    tensor([-0.5000,  0.0000,  0.5000])
    """
    ax = torch.arange(start, int(shape[axis]) if stop is None else stop, stride, device=device, dtype=dtype)
    n = _shape_tensor(shape, ax)
    scale = torch.where(n > 1, 2.0 / (n - 1).clamp(min=1), torch.zeros_like(n))
    return ax * scale[axis] - (n > 1).to(ax.dtype)[axis]


def to_grid_sample(x: Tensor) -> Tensor:
    """Reorder points ``(..., 3)`` from array-axis order to ``grid_sample``'s ``(x2, x1, x0)``."""
    return x.flip(-1)


def voxel_to_world(voxel: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel indices ``(..., 3)`` to world millimetres (RAS+) through a 4x4 ``affine``.

    >>> voxel_to_world(np.array([1.0, 0.0, 0.0]), np.diag([2.0, 2.0, 2.0, 1.0]))
    array([2., 0., 0.])
    """
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(voxel, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World millimetres (RAS+) ``(..., 3)`` to fractional voxel indices of ``affine``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return np.asarray(world, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]


def voxel_displacement_to_world(disp_voxel: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A displacement in voxels ``(..., 3)`` to RAS millimetres (rotation/scaling only): float64.

    The product runs in torch: numpy's goes through OpenBLAS, whose first large product in a
    process took 0.3-0.5 s (1 mm dense field, 2 threads; 0.12 s once warm), torch's 0.12 s each
    time. The float64 values were the same bit for bit on the dev machine (both are BLAS kernels
    chosen per CPU, so elsewhere equal to rounding).

    >>> voxel_displacement_to_world(np.array([1.0, 2.0, 3.0]), np.diag([2.0, 2.0, 2.0, 1.0]))
    array([2., 4., 6.])
    """
    d = np.asarray(disp_voxel, dtype=np.float64)
    rot_t = torch.as_tensor(np.asarray(affine, dtype=np.float64)[:3, :3].T)
    return (torch.from_numpy(np.ascontiguousarray(d).reshape(-1, 3)) @ rot_t).numpy().reshape(d.shape)


def world_displacement_to_voxel(disp_ras_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS millimetre displacements ``(..., 3)`` to voxels of the grid of ``affine``.

    The inverse of :func:`voxel_displacement_to_world` (linear part only).

    >>> a = np.diag([2.0, 3.0, 4.0, 1.0])
    >>> world_displacement_to_voxel(voxel_displacement_to_world(np.array([1.0, 1.0, 1.0]), a), a)
    array([1., 1., 1.])
    """
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.asarray(disp_ras_mm, dtype=np.float64) @ np.linalg.inv(rot).T


def normalized_to_voxel_displacement(phi: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Dense ``phi`` ``(D0, D1, D2, 3)`` (normalized) to its displacement in voxels, same shape.

    >>> phi = identity_grid((3, 3, 3)) + 1.0  # one normalized unit = (n - 1) / 2 = 1 voxel here
    >>> normalized_to_voxel_displacement(phi, (3, 3, 3))[0, 0, 0].tolist()
    [1.0, 1.0, 1.0]
    """
    ident = identity_grid(shape, device=phi.device, dtype=phi.dtype)
    return (phi - ident) * normalized_to_voxel_scale(shape).to(phi)


def ras_to_lps(vectors: np.ndarray) -> np.ndarray:
    """Flip the first two components: RAS+ vectors ``(..., 3)`` to ITK's LPS (and back)."""
    return np.asarray(vectors) * np.asarray(_RAS_TO_LPS, dtype=np.asarray(vectors).dtype)


lps_to_ras = ras_to_lps


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in millimetres along each array axis (column norms of the affine)."""
    cols = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(cols[0]), float(cols[1]), float(cols[2]))


def voxel_to_normalized_matrix(shape: Sequence[int]) -> np.ndarray:
    """4x4 ``N`` with ``x_norm = N @ [v, 1]`` (:func:`voxel_to_normalized` as a matrix).

    >>> voxel_to_normalized_matrix((5, 5, 3)) @ np.array([4.0, 0.0, 1.0, 1.0])
    array([ 1., -1.,  0.,  1.])
    """
    n = np.asarray([float(s) for s in shape])
    if n.shape != (SPATIAL_DIMS,):
        raise ValueError(f"expected a 3D spatial shape, got {tuple(shape)}")
    scale = np.where(n > 1, 2.0 / np.maximum(n - 1, 1), 0.0)
    out = np.eye(4)
    out[:3, :3] = np.diag(scale)
    out[:3, 3] = -(n > 1).astype(np.float64)
    return out


def normalized_chain_matrix(
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    moving_shape: Sequence[int],
    moving_affine: np.ndarray,
    world: np.ndarray | None = None,
) -> np.ndarray:
    """4x4 matrix from fixed normalized to moving normalized coordinates through ``world``.

    ``N_m V_m^-1 W V_f N_f^-1`` (float64), for the world matrix ``W`` (fixed RAS mm -> moving
    RAS mm; identity when ``None``). A point ``x`` after the deformable part, ``phi(x)``, is
    sampled in the moving image at ``M @ [phi(x), 1]``.

    >>> a = np.diag([2.0, 2.0, 2.0, 1.0])
    >>> np.allclose(normalized_chain_matrix((5, 5, 5), a, (5, 5, 5), a), np.eye(4))
    True
    """
    w = np.eye(4) if world is None else np.asarray(world, dtype=np.float64)
    n_f = voxel_to_normalized_matrix(fixed_shape)
    n_m = voxel_to_normalized_matrix(moving_shape)
    fixed_vox_from_norm = np.linalg.pinv(n_f)  # pinv: an axis of one voxel maps everything to 0
    return n_m @ np.linalg.inv(np.asarray(moving_affine, dtype=np.float64)) @ w @ np.asarray(fixed_affine, dtype=np.float64) @ fixed_vox_from_norm


def apply_matrix(points: Tensor, matrix: np.ndarray | Tensor) -> Tensor:
    """``matrix[:3, :3] @ p + matrix[:3, 3]`` for points ``(..., 3)`` (computed in the points' dtype).

    >>> apply_matrix(torch.zeros(2, 3), np.diag([2.0, 2.0, 2.0, 1.0])).shape
    torch.Size([2, 3])
    """
    m = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, Tensor) else matrix).to(points)
    return points @ m[:3, :3].T + m[:3, 3]


def world_matrix_to_itk(world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The world matrix ``W`` (RAS, fixed -> moving) as ITK's ``(matrix, translation)`` in LPS.

    ITK's ``AffineTransform`` with centre 0 maps a fixed LPS point ``p`` to ``M p + t``.
    ``F = diag(-1, -1, 1)`` flips RAS and LPS, so ``M = F W_3x3 F`` and ``t = F W_t``.

    >>> m, t = world_matrix_to_itk(np.eye(4))
    >>> m.tolist() == np.eye(3).tolist(), t.tolist()
    (True, [0.0, 0.0, 0.0])
    """
    w = np.asarray(world, dtype=np.float64)
    flip = np.diag(_RAS_TO_LPS)
    return flip @ w[:3, :3] @ flip, flip @ w[:3, 3] + 0.0


def itk_to_world_matrix(matrix: np.ndarray, translation: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """ITK ``(matrix, translation, center)`` in LPS back to the RAS world matrix ``W`` (4x4).

    ITK maps ``p -> M (p - c) + c + t``; the inverse of :func:`world_matrix_to_itk`.

    >>> w = np.eye(4); w[:3, 3] = [1.0, 2.0, 3.0]
    >>> np.allclose(itk_to_world_matrix(*world_matrix_to_itk(w)), w)
    True
    """
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    c = np.zeros(3) if center is None else np.asarray(center, dtype=np.float64)
    t = np.asarray(translation, dtype=np.float64) + c - m @ c
    flip = np.diag(_RAS_TO_LPS)
    out = np.eye(4)
    out[:3, :3] = flip @ m @ flip
    out[:3, 3] = flip @ t
    return out


def _triple(value: Sequence[int] | int) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != SPATIAL_DIMS:
        raise ValueError(f"expected one value or three values, got {value!r}")
    return out  # type: ignore[return-value]
