"""ANTs-like chains of transforms on world points, and resampling an image through them.

A chain is a sequence of steps applied to world points (RAS mm, :mod:`nir_lightning.coords`)
in order. Resampling an image onto a reference grid walks, for every reference voxel ``v``::

    p = V_ref [v, 1]  ->  step_1(p)  ->  ...  ->  step_n(...) = r  ->  image at V_img^-1 [r, 1]

which is ``antsApplyTransforms -r reference -i image -t step_1 ... -t step_n``: ANTs lists the
transform that acts on the points first, first (``-t displacement.nii.gz -t affine.mat`` maps a
fixed point ``p`` to ``W (p + u(p))``, the composition of :mod:`nir_lightning.coords`).

Boundaries follow ITK, so results agree with ANTs/SimpleITK up to the edge voxels: a point is
inside a grid of ``n`` voxels along an axis when its continuous index lies in ``[-0.5, n - 0.5)``;
inside, interpolation clamps to the border voxels; outside, a displacement is zero and an image
takes the ``fill`` value.

Point arithmetic and interpolation weights are float64 (ITK computes in double too); only the
image and field values are float32. Trilinear and nearest are computed from float64 voxel
indices rather than through ``grid_sample``'s float32 normalized coordinates, so an identity
chain and integer voxel shifts reproduce the image exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from nir_lightning.coords import apply_matrix
from nir_lightning.core.chunked import DEFAULT_MAX_POINTS, slabs

ResampleMode = Literal["linear", "nearest", "label"]
RESAMPLE_MODES: tuple[str, ...] = get_args(ResampleMode)

GRID_ATOL_MM = 1e-6
"""Two grids with the same shape whose affines differ by at most this are the same grid (the fast path)."""


def _matrix(value: np.ndarray, what: str) -> np.ndarray:
    m = np.array(value, dtype=np.float64)  # a copy: a frozen step must not change under its caller
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"{what} must be a finite 4x4 matrix, got shape {m.shape}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError(f"{what} is singular: {m.tolist()}")
    m.setflags(write=False)
    return m


@dataclass(frozen=True, eq=False)
class MatrixStep:
    """A world matrix: the point ``p`` (RAS mm) maps to ``world[:3, :3] @ p + world[:3, 3]``.

    ``world`` is 4x4 (stored as a read-only float64 copy).

    >>> step = MatrixStep(np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> float(step.inverse().world[0, 0])
    0.5
    """

    world: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "world", _matrix(self.world, "MatrixStep.world"))

    def inverse(self) -> MatrixStep:
        """The step that undoes this one, ``W^-1``."""
        return MatrixStep(np.linalg.inv(self.world))

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.world, np.eye(4)))


@dataclass(frozen=True, eq=False)
class DisplacementStep:
    """A dense displacement: the point ``p`` maps to ``p + d(p)``.

    ``disp_ras_mm`` is ``(D0, D1, D2, 3)`` float32, RAS millimetres, on the grid of the 4x4
    ``affine``; ``d(p)`` is trilinear at ``p``, and zero outside the grid (ITK's
    ``DisplacementFieldTransform``: inside means within half a voxel of the border voxels).

    >>> DisplacementStep(np.zeros((2, 3, 4, 3), np.float32), np.eye(4)).shape
    (2, 3, 4)
    """

    disp_ras_mm: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        disp = np.asarray(self.disp_ras_mm, dtype=np.float32)  # no copy for float32 input: fields are large
        if disp.ndim != 4 or disp.shape[3] != 3 or min(disp.shape[:3]) < 1:
            raise ValueError(f"DisplacementStep.disp_ras_mm must be (D0, D1, D2, 3), got {disp.shape}")
        object.__setattr__(self, "disp_ras_mm", disp)
        object.__setattr__(self, "affine", _matrix(self.affine, "DisplacementStep.affine"))

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.disp_ras_mm.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    def on_grid(self, shape: Sequence[int], affine: np.ndarray) -> bool:
        """Whether the field lies on the grid ``(shape, affine)`` (affines within :data:`GRID_ATOL_MM`)."""
        return tuple(int(s) for s in shape) == self.shape and bool(
            np.allclose(self.affine, np.asarray(affine, dtype=np.float64), rtol=0.0, atol=GRID_ATOL_MM)
        )


Step = MatrixStep | DisplacementStep


class _Grid:
    """A grid of ``shape`` with a 4x4 ``affine``: world points to voxels, ITK's inside test, and
    the interpolation stencils, all from float64 voxel coordinates (no ``grid_sample``: an
    identity chain and integer shifts reproduce the image exactly)."""

    def __init__(self, shape: Sequence[int], affine: np.ndarray, device: torch.device) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.voxel_from_world = torch.as_tensor(np.linalg.inv(affine), dtype=torch.float64, device=device)
        n = torch.as_tensor(self.shape, dtype=torch.float64, device=device)
        self.upper = n - 0.5
        self.last = n - 1
        self.last_index = self.last.to(torch.long)
        self.strides = (self.shape[1] * self.shape[2], self.shape[2], 1)  # of the flat (C-order) voxel array

    def locate(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """World points ``(P, 3)`` float64 to ``(voxel (P, 3) float64, inside (P,) bool)``.

        Inside: every continuous index in ``[-0.5, n - 0.5)`` (ITK). Points outside (or NaN)
        get voxel 0, so the index arithmetic that follows stays in range.
        """
        vox = apply_matrix(points, self.voxel_from_world)
        inside = ((vox >= -0.5) & (vox < self.upper)).all(dim=-1)
        return torch.where(inside[:, None], vox, torch.zeros_like(vox)), inside

    def corners(self, vox: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Trilinear stencil of voxels ``(P, 3)``: 8 ``(flat index (P,), weight (P,) float64)``.

        Like ITK's linear interpolator, indices are clamped to the border voxels (which is
        what a point in the half-voxel band outside them gets).
        """
        axes = self._axes(vox)
        return [
            (i0 + i1 + i2, w0 * w1 * w2)
            for i0, w0 in axes[0]
            for i1, w1 in axes[1]
            for i2, w2 in axes[2]
        ]

    def corner_indices(self, vox: Tensor) -> list[Tensor]:
        """The 8 flat indices of :meth:`corners`, in its order, without the weights."""
        axes = self._axes(vox)
        return [i0 + i1 + i2 for i0, _ in axes[0] for i1, _ in axes[1] for i2, _ in axes[2]]

    def _axes(self, vox: Tensor) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        v = torch.minimum(vox.clamp(min=0.0), self.last)
        base = torch.minimum(v.floor().to(torch.long), (self.last_index - 1).clamp(min=0))
        frac = v - base.to(v.dtype)
        # per axis: (offset into the flat array, weight) of the lower and the upper neighbour
        axes = []
        for a in range(3):
            lo = base[:, a]
            hi = torch.minimum(lo + 1, self.last_index[a])
            axes.append(((lo * self.strides[a], 1.0 - frac[:, a]), (hi * self.strides[a], frac[:, a])))
        return axes

    def nearest(self, vox: Tensor) -> Tensor:
        """Flat index ``(P,)`` of the nearest voxel (halves round up, as ITK's ``RoundHalfIntegerUp``)."""
        idx = torch.minimum((vox + 0.5).floor().to(torch.long).clamp(min=0), self.last_index)
        return idx[:, 0] * self.strides[0] + idx[:, 1] * self.strides[1] + idx[:, 2]


def _linear(values: Tensor, grid: _Grid, vox: Tensor, stencil: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """Trilinear samples of ``values`` ``(N, K)`` (flat voxels of ``grid``) at ``vox``: ``(P, K)`` float64.
    ``stencil``: ``grid.corners(vox)`` when the caller has it already."""
    acc = torch.zeros(vox.shape[0], values.shape[1], dtype=torch.float64, device=vox.device)
    for idx, weight in grid.corners(vox) if stencil is None else stencil:
        acc += values[idx].double() * weight[:, None]
    return acc


class _Field:
    """A :class:`DisplacementStep` ready to be sampled on ``device``."""

    def __init__(self, step: DisplacementStep, device: torch.device) -> None:
        self.grid = _Grid(step.shape, step.affine, device)
        self.values = torch.from_numpy(step.disp_ras_mm).to(device).reshape(-1, 3)  # (N, 3), a view on the CPU

    def displace(self, points: Tensor) -> Tensor:
        vox, inside = self.grid.locate(points)
        d = _linear(self.values, self.grid, vox)
        return points + torch.where(inside[:, None], d, torch.zeros_like(d))


def _label(values: Tensor, grid: _Grid, vox: Tensor, stencil: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """Label interpolation of ``values`` ``(N, C)`` at voxels ``vox`` ``(P, 3)``: ``(P, C)``.

    Every label's indicator interpolated trilinearly, then the arg-max; ties go to the smaller
    label. Only the (at most 8) labels at the corners of a point's cell can score above zero, and
    the trilinear indicator of a label is the sum of the weights of the corners carrying it, so
    the loop runs over the 8 corners keeping a running best: the result of a loop over all
    labels, at a cost and memory independent of the number of labels. A point whose 8 corners
    carry one label takes it (the loop's result there: every corner scores the same sum, and
    the first one wins), so the loop runs only over the points of a cell that a label edge crosses.
    """
    indices = grid.corner_indices(vox) if stencil is None else [idx for idx, _ in stencil]
    labels = [values[idx] for idx in indices]  # 8 x (P, C)
    uniform = labels[0] == labels[1]
    for j in range(2, 8):
        uniform &= labels[0] == labels[j]
    mixed = torch.nonzero(~uniform.all(dim=1)).squeeze(1)  # points with a label edge in their cell
    if mixed.numel() == 0:
        return labels[0]
    out = labels[0].clone()
    # elementwise: the weights of the whole stencil at these points (the same numbers either way)
    weights = [w for _, w in grid.corners(vox[mixed])] if stencil is None else [w[mixed] for _, w in stencil]
    out[mixed] = _label_argmax([lab[mixed] for lab in labels], weights)
    return out


def _label_argmax(labels: list[Tensor], corner_weights: list[Tensor]) -> Tensor:
    """The arg-max of :func:`_label` for corner labels ``8 x (P, C)`` and weights ``8 x (P,)``."""
    weights = [w[:, None] for w in corner_weights]  # 8 x (P, 1)
    best_score = torch.full(labels[0].shape, -1.0, dtype=torch.float64, device=labels[0].device)
    best_label = torch.zeros_like(labels[0])
    for k in range(8):
        # corner k's label scores the summed weights of the corners carrying it; the sum runs in
        # the same order for every k, so corners with one label get bit-identical scores
        score = torch.zeros_like(best_score)
        for j in range(8):
            score += torch.where(labels[j] == labels[k], weights[j], 0.0)
        take = (score > best_score) | ((score == best_score) & (labels[k] < best_label))
        best_score = torch.where(take, score, best_score)
        best_label = torch.where(take, labels[k], best_label)
    return best_label


def _prepare(chain: Sequence[Step], device: torch.device) -> list[Tensor | _Field]:
    for i, step in enumerate(chain):
        if not isinstance(step, (MatrixStep, DisplacementStep)):
            raise TypeError(f"chain[{i}] must be a MatrixStep or a DisplacementStep, got {type(step).__name__}")
    return [
        _Field(step, device) if isinstance(step, DisplacementStep) else torch.tensor(step.world, dtype=torch.float64, device=device)
        for step in chain
        if not (isinstance(step, MatrixStep) and step.is_identity)  # exact no-op: skipping it changes no bit
    ]


def _run(ops: Sequence[Tensor | _Field], points: Tensor) -> Tensor:
    for op in ops:
        points = op.displace(points) if isinstance(op, _Field) else apply_matrix(points, op)
    return points


@torch.no_grad()
def transform_points(points: Tensor | np.ndarray, chain: Sequence[Step]) -> Tensor:
    """World points ``(..., 3)`` (RAS mm) through the steps of ``chain`` in order: float64, same shape.

    What :func:`resample` does to every reference voxel's point (landmarks, TRE).

    >>> w = np.eye(4); w[:3, 3] = [1.0, 2.0, 3.0]
    >>> transform_points(np.zeros((1, 3)), [MatrixStep(w), MatrixStep(w)]).tolist()
    [[2.0, 4.0, 6.0]]
    """
    pts = torch.as_tensor(np.asarray(points) if not isinstance(points, Tensor) else points, dtype=torch.float64)
    if pts.shape[-1:] != (3,):
        raise ValueError(f"points must be (..., 3), got {tuple(pts.shape)}")
    return _run(_prepare(chain, pts.device), pts.reshape(-1, 3)).reshape(pts.shape)


@torch.no_grad()
def resample(
    image: Tensor,
    image_affine: np.ndarray,
    reference_shape: tuple[int, int, int],
    reference_affine: np.ndarray,
    chain: Sequence[Step],
    *,
    mode: ResampleMode = "linear",
    max_points: int = DEFAULT_MAX_POINTS,
    fill: float = 0.0,
) -> Tensor:
    """Resample ``image`` ``(C, I0, I1, I2)`` onto a reference grid through ``chain``.

    Each reference voxel ``v`` goes to ``p = V_ref [v, 1]`` (``reference_affine``), through the
    steps in order, and is sampled in ``image`` at ``V_img^-1`` of the result (``image_affine``).
    ``mode``: ``"linear"`` (trilinear), ``"nearest"``, or ``"label"`` (integer label maps: each
    label's indicator trilinear, then the arg-max, ties to the smaller label; background 0 is a
    label too; like ANTs' ``genericLabel`` with a trilinear instead of a Gaussian kernel).
    Points outside the image get ``fill``. Works slab by slab along reference axis 0
    (``max_points`` reference voxels at a time), on ``image``'s device.

    A :class:`DisplacementStep` first in the chain that lies on the reference grid is read at
    the voxels directly (no interpolation): a registration's own displacement.

    Returns ``(C, D0, D1, D2)`` float32: intensities for ``"linear"``; for ``"nearest"`` and
    ``"label"`` values of ``image`` (integers stay exact below 2**24; the caller casts).

    >>> img = torch.arange(24.0).reshape(1, 2, 3, 4)
    >>> out = resample(img, np.eye(4), (2, 3, 4), np.eye(4), [MatrixStep(np.eye(4))])
    >>> bool(torch.equal(out, img))
    True
    >>> shift = np.eye(4); shift[1, 3] = 0.5  # half a voxel along axis 1; 2.5 lies outside [-0.5, 2.5)
    >>> resample(img, np.eye(4), (2, 3, 4), np.eye(4), [MatrixStep(shift)])[0, 0, :, 0].tolist()
    [2.0, 6.0, 0.0]
    """
    return resample_many([(image, mode)], image_affine, reference_shape, reference_affine, chain, max_points=max_points, fill=fill)[0]


@torch.no_grad()
def resample_many(
    images: Sequence[tuple[Tensor, ResampleMode]],
    image_affine: np.ndarray,
    reference_shape: tuple[int, int, int],
    reference_affine: np.ndarray,
    chain: Sequence[Step],
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    fill: float = 0.0,
) -> list[Tensor]:
    """:func:`resample` of several images on one grid through one chain, each with its own mode.

    ``images``: ``(image (C, I0, I1, I2), mode)`` pairs whose images share ``(I0, I1, I2)`` and
    ``image_affine`` (an image and its label map). Every reference voxel goes through the chain
    once for all of them (a slab at a time); each result is bit for bit what :func:`resample`
    returns for that image alone (it is the same computation).

    >>> img = torch.arange(24.0).reshape(1, 2, 3, 4)
    >>> shift = np.eye(4); shift[2, 3] = 0.5
    >>> lin, near = resample_many([(img, "linear"), (img, "nearest")], np.eye(4), (2, 3, 4), np.eye(4), [MatrixStep(shift)])
    >>> lin[0, 0, 0].tolist(), near[0, 0, 0].tolist()
    ([0.5, 1.5, 2.5, 0.0], [1.0, 2.0, 3.0, 0.0])
    """
    if not images:
        raise ValueError("images is empty: give at least one (image, mode) pair")
    for i, (image, mode) in enumerate(images):
        if image.dim() != 4:
            raise ValueError(f"image must be (C, I0, I1, I2), got {tuple(image.shape)}")
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
        if image.shape[1:] != images[0][0].shape[1:]:
            raise ValueError(f"images[{i}] is {tuple(image.shape[1:])} voxels, images[0] {tuple(images[0][0].shape[1:])}: one grid for all")
    ref_shape = tuple(int(s) for s in reference_shape)
    if len(ref_shape) != 3 or min(ref_shape) < 1:
        raise ValueError(f"reference_shape must be three positive sizes, got {reference_shape!r}")
    ref_affine = _matrix(reference_affine, "reference_affine")
    img_affine = _matrix(image_affine, "image_affine")
    device = images[0][0].device
    # (N, C): one row per voxel, for gathers; one copy per distinct image (an image in two modes shares it)
    copies: dict[int, Tensor] = {}
    for image, _ in images:
        if id(image) not in copies:
            copies[id(image)] = image.to(torch.float32).reshape(image.shape[0], -1).T.contiguous()
    flats = [copies[id(image)] for image, _ in images]
    img_grid = _Grid(images[0][0].shape[1:], img_affine, device)
    ref_to_world = torch.tensor(ref_affine, dtype=torch.float64, device=device)
    # A first displacement on the reference grid is read at the voxels (the registration's own).
    first = chain[0] if chain else None
    direct_disp = None
    if isinstance(first, DisplacementStep) and first.on_grid(ref_shape, ref_affine):
        direct_disp = torch.from_numpy(first.disp_ras_mm)
        chain = chain[1:]
    ops = _prepare(chain, device)

    outs = [torch.empty(flat.shape[1], *ref_shape, dtype=torch.float32, device=device) for flat in flats]
    # the trilinear stencil once a slab for its linear and label jobs (each reads what it would compute)
    share_stencil = sum(mode != "nearest" for _, mode in images) > 1
    plane = ref_shape[1] * ref_shape[2]
    axes12 = [torch.arange(n, dtype=torch.float64, device=device) for n in ref_shape[1:]]
    for sl in slabs(ref_shape[0], plane, max_points=max_points):
        axis0 = torch.arange(sl.start, sl.stop, dtype=torch.float64, device=device)
        vox = torch.stack(torch.meshgrid(axis0, *axes12, indexing="ij"), dim=-1).reshape(-1, 3)
        points = apply_matrix(vox, ref_to_world)
        if direct_disp is not None:
            points = points + direct_disp[sl].reshape(-1, 3).to(device=device, dtype=torch.float64)
        points = _run(ops, points)
        src, inside = img_grid.locate(points)
        stencil = img_grid.corners(src) if share_stencil else None
        for flat, (_, mode), out in zip(flats, images, outs, strict=True):
            if mode == "linear":
                sampled = _linear(flat, img_grid, src, stencil).float()
            elif mode == "nearest":
                sampled = flat[img_grid.nearest(src)]
            else:
                sampled = _label(flat, img_grid, src, stencil)
            sampled = torch.where(inside[:, None], sampled, torch.full_like(sampled, fill))
            out[:, sl] = sampled.T.reshape(flat.shape[1], sl.stop - sl.start, *ref_shape[1:])
    return outs
