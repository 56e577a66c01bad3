"""Image moments in world millimetres and the initial world matrix they suggest.

Moments are intensity-weighted: a voxel counts with its intensity (negative values count 0)
inside the mask, or everywhere when there is no mask, so a skull-stripped brain or a phantom
on a zero background needs no mask. They are computed from the 1D and 2D projections of the
weights, so the cost is one pass over the image and memory does not grow beyond it.

The world matrix ``W`` maps a fixed-image world point (RAS mm) to the matching moving-image
world point (``moving(W p) ~ fixed(p)``), see :mod:`nir_lightning.coords`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

InitMode = Literal["none", "com", "moments"]

__all__ = ["InitMode", "Moments", "center_of_mass", "image_moments", "initial_world_matrix", "principal_axes", "rotation_candidates"]


def _weights(image: Tensor, mask: Tensor | None) -> Tensor:
    if image.dim() != 3:
        raise ValueError(f"image must be (D0, D1, D2), got {tuple(image.shape)}")
    w = image.detach().to(torch.float64).clamp(min=0)
    if mask is not None:
        if mask.shape != image.shape:
            raise ValueError(f"mask must have the image's shape {tuple(image.shape)}, got {tuple(mask.shape)}")
        w = w * mask.to(device=w.device, dtype=torch.float64)
    if float(w.sum()) <= 0:
        raise ValueError("the image has no positive intensity inside the mask: its moments are undefined")
    return w


def _voxel_moments(w: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean ``(3,)`` and covariance ``(3, 3)`` of the voxel indices, from projections."""
    total = w.sum()
    idx = [torch.arange(n, dtype=torch.float64, device=w.device) for n in w.shape]
    marg = [w.sum(dim=tuple(a for a in range(3) if a != b)) for b in range(3)]
    mean = torch.stack([(idx[a] * marg[a]).sum() for a in range(3)]) / total
    cov = torch.zeros(3, 3, dtype=torch.float64, device=w.device)
    for a in range(3):
        d = idx[a] - mean[a]
        cov[a, a] = (d * d * marg[a]).sum() / total
    for a, b in itertools.combinations(range(3), 2):
        other = 3 - a - b
        plane = w.sum(dim=other)  # axes (a, b) in increasing order
        da, db = idx[a] - mean[a], idx[b] - mean[b]
        cov[a, b] = cov[b, a] = (da[:, None] * db[None, :] * plane).sum() / total
    return mean.cpu().numpy(), cov.cpu().numpy()


@dataclass(frozen=True)
class Moments:
    """An image's intensity-weighted moments in world coordinates (:func:`image_moments`).

    Attributes:
        centre: the centre of mass ``(3,)``, RAS mm.
        values: eigenvalues ``(3,)`` of the second central moments (ascending, mm^2).
        axes: their eigenvectors ``(3, 3)`` (columns, unit, RAS).
    """

    centre: np.ndarray
    values: np.ndarray
    axes: np.ndarray


def image_moments(image: Tensor, affine: np.ndarray, mask: Tensor | None = None) -> Moments:
    """:func:`center_of_mass` and :func:`principal_axes` of ``image`` ``(D0, D1, D2)`` from one pass
    over it (the same numbers: on a 1 mm brain each pass costs ~0.1 s).

    >>> img = torch.zeros(9, 9, 9); img[1:8, 4, 4] = 1.0
    >>> m = image_moments(img, np.eye(4))
    >>> m.centre.tolist(), np.abs(m.axes[:, 2]).round(6).tolist()
    ([4.0, 4.0, 4.0], [1.0, 0.0, 0.0])
    """
    mean, cov = _voxel_moments(_weights(image, mask))
    lin = np.asarray(affine, dtype=np.float64)
    world = lin[:3, :3] @ cov @ lin[:3, :3].T
    vals, vecs = np.linalg.eigh(0.5 * (world + world.T))
    return Moments(centre=lin[:3, :3] @ mean + lin[:3, 3], values=vals, axes=vecs)


def center_of_mass(image: Tensor, affine: np.ndarray, mask: Tensor | None = None) -> np.ndarray:
    """Intensity-weighted centre of mass of ``image`` ``(D0, D1, D2)`` in world mm ``(3,)``.

    ``affine`` is the image's 4x4 NIfTI affine (voxel -> RAS mm); ``mask`` (bool, the image's
    shape) restricts the weights.

    >>> img = torch.zeros(5, 5, 5); img[3, 1, 2] = 1.0
    >>> center_of_mass(img, np.diag([2.0, 2.0, 2.0, 1.0])).tolist()
    [6.0, 2.0, 4.0]
    """
    return image_moments(image, affine, mask).centre


def principal_axes(image: Tensor, affine: np.ndarray, mask: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues ``(3,)`` (ascending, mm^2) and eigenvectors ``(3, 3)`` (columns, unit, RAS)
    of the intensity-weighted second central moments of ``image`` in world coordinates.

    >>> img = torch.zeros(9, 9, 9); img[1:8, 4, 4] = 1.0  # a rod along array axis 0
    >>> vals, vecs = principal_axes(img, np.diag([1.0, 1.0, 1.0, 1.0]))
    >>> np.abs(vecs[:, 2]).round(6).tolist()  # the largest axis
    [1.0, 0.0, 0.0]
    """
    m = image_moments(image, affine, mask)
    return m.values, m.axes


def rotation_candidates(fixed_axes: np.ndarray, moving_axes: np.ndarray) -> list[np.ndarray]:
    """The 4 proper rotations ``R`` (3x3) taking the fixed principal axes onto the moving ones.

    ``R = E_m S E_f^T`` for the sign choices ``S = diag(+-1, +-1, +-1)`` with ``det R = +1``:
    moments fix each axis only up to its sign.

    >>> len(rotation_candidates(np.eye(3), np.eye(3)))
    4
    """
    out = []
    for signs in itertools.product((1.0, -1.0), repeat=3):
        r = moving_axes @ np.diag(signs) @ fixed_axes.T
        if np.linalg.det(r) > 0:
            out.append(r)
    return out


def _about(rotation: np.ndarray, fixed_centre: np.ndarray, moving_centre: np.ndarray) -> np.ndarray:
    """``p -> R (p - c_f) + c_m`` as a 4x4 matrix."""
    w = np.eye(4)
    w[:3, :3] = rotation
    w[:3, 3] = moving_centre - rotation @ fixed_centre
    return w


def initial_world_matrix(
    fixed: Tensor,
    fixed_affine: np.ndarray,
    moving: Tensor,
    moving_affine: np.ndarray,
    *,
    mode: InitMode,
    similarity_fn: Callable[[list[np.ndarray]], Sequence[float]] | None = None,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    fixed_moments: Moments | None = None,
) -> np.ndarray:
    """A starting world matrix ``W`` (4x4 float64, fixed RAS mm -> moving RAS mm).

    ``fixed``/``moving`` are ``(1, 1, D0, D1, D2)`` (or ``(D0, D1, D2)``) on their own grids,
    with their NIfTI affines; masks are bool on their image's grid. ``fixed_moments``: the fixed
    image's :func:`image_moments` (with ``fixed_mask``) when the caller has them already.

    * ``"none"``: the identity (aligned by the headers).
    * ``"com"``: the translation that maps the fixed centre of mass onto the moving one.
    * ``"moments"``: the 4 principal-axes rotations (:func:`rotation_candidates`) about the
      centres of mass, plus the ``"com"`` translation and the identity; the candidate with
      the lowest score wins, ``similarity_fn(candidates)`` giving one score (a loss) per
      candidate (all at once, so that a caller can refine them together). The similarity resolves the sign
      ambiguity of the axes, and since ``"com"`` and the headers are candidates, the result is
      never worse than either by that measure (principal axes mislead when the fields of view
      differ, e.g. a scan with the neck against a cropped brain).

    >>> img = torch.zeros(1, 1, 8, 8, 8); img[..., 2:4, 2:4, 2:4] = 1.0
    >>> initial_world_matrix(img, np.eye(4), img, np.eye(4), mode="com")[:3, 3].tolist()
    [0.0, 0.0, 0.0]
    """
    if mode not in ("none", "com", "moments"):
        raise ValueError(f"mode must be 'none', 'com' or 'moments', got {mode!r}")
    if mode == "none":
        return np.eye(4)
    f = fixed.reshape(fixed.shape[-3:])
    m = moving.reshape(moving.shape[-3:])
    fm = fixed_moments if fixed_moments is not None else image_moments(f, fixed_affine, fixed_mask)
    mm = image_moments(m, moving_affine, moving_mask)
    com = _about(np.eye(3), fm.centre, mm.centre)
    if mode == "com":
        return com
    if similarity_fn is None:
        raise ValueError("mode 'moments' needs a similarity_fn to choose among the rotation candidates")
    candidates = [np.eye(4), com] + [_about(r, fm.centre, mm.centre) for r in rotation_candidates(fm.axes, mm.axes)]
    scores = [float(v) for v in similarity_fn(candidates)]
    if len(scores) != len(candidates):
        raise ValueError(f"similarity_fn returned {len(scores)} scores for {len(candidates)} candidates")
    return candidates[int(np.argmin(scores))]
