"""Visual quality control: mid-slices of a registration in three anatomical planes, as one figure.

Rows are the axial, coronal and sagittal planes (:data:`PLANES`) through the middle voxel
(unless told otherwise), shown the way radiologists read them whatever the array layout
(LIA, RAS, ...): the fixed affine says which array axis runs along R/L, A/P and S/I, and each
slice is only transposed/flipped (never resampled) so that superior is up (coronal,
sagittal), anterior is up (axial), the patient's right is on the image's left (axial,
coronal) and anterior is on the left (sagittal). Columns are :data:`PANELS` (plus
:data:`LABEL_PANEL` when the pair has label maps). Only the slices are evaluated, never the
whole volume, so a figure costs about ``3 * 3`` planes of field evaluations (a slab of three
planes per row gives det J by the same central differences as
:func:`nir_lightning.core.jacobian.jacobian_determinant`) and is cheap enough to log during a fit.

The figure itself is drawn by :mod:`nir_lightning.evaluation.qc_figure` (matplotlib).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from nibabel.orientations import io_orientation
from torch import Tensor

from nir_lightning.coords import normalized_to_voxel, voxel_to_normalized
from nir_lightning.core.chunked import map_points
from nir_lightning.core.jacobian import determinant, jacobian_central
from nir_lightning.core.resample import sample_image
from nir_lightning.data.pair import ImagePair

PANELS: tuple[str, ...] = (
    "fixed",
    "moving",
    "warped",
    "|fixed - warped|",
    "checkerboard",
    "deformed grid",
    "det J",
)
"""Column titles of the QC figure, in order."""

LABEL_PANEL = "labels"
"""Extra last column when the pair has label maps: warped labels (fill) on fixed label edges."""

PANEL_INCHES = 1.8
"""Size of one panel in inches."""

FOOTER_INCHES = 0.5
"""Strip under the panels for det J's colour bar and the fold/Dice summary; the figure is
``(3 * PANEL_INCHES + FOOTER_INCHES)`` by ``n_columns * PANEL_INCHES`` inches."""

Transform = Callable[[Tensor], Tensor]

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
"""Row titles of the QC figure, in order."""

# plane -> (world axis normal to it, world axis down the rows, world axis along the columns,
#           letters at the left, right, top and bottom edge); world axes: 0 = R, 1 = A, 2 = S.
# Rows and columns always run toward the *negative* world direction (A/S at the top, the
# patient's right or anterior at the left), which keeps the flip rule below one line.
_LAYOUT: dict[str, tuple[int, int, int, tuple[str, str, str, str]]] = {
    "axial": (2, 1, 0, ("R", "L", "A", "P")),
    "coronal": (1, 2, 0, ("R", "L", "S", "I")),
    "sagittal": (0, 2, 1, ("A", "P", "S", "I")),
}


@dataclass(frozen=True)
class PlaneView:
    """How one anatomical plane of the fixed grid is shown.

    Attributes:
        name: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        axis: the array axis normal to the plane; ``index``: the slice index along it.
        row_axis, col_axis: the array axes running down the displayed rows / along the columns.
        flip_rows, flip_cols: displayed row ``r`` (column ``c``) is array index ``n - 1 - r``.
        shape: ``(rows, cols)`` of the displayed slice.
        sides: letters for the left, right, top and bottom edge (e.g. ``("R", "L", "A", "P")``).
    """

    name: str
    axis: int
    index: int
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    shape: tuple[int, int]
    sides: tuple[str, str, str, str]

    def orient(self, a: np.ndarray) -> np.ndarray:
        """A slice ``(n_b, n_c, ...)`` (in-plane array axes ``b < c``) as displayed: row 0 on top.

        Only transposes and flips, so values (and labels) are never interpolated.
        """
        if self.row_axis > self.col_axis:
            a = np.swapaxes(a, 0, 1)
        if self.flip_rows:
            a = a[::-1]
        if self.flip_cols:
            a = a[:, ::-1]
        return np.ascontiguousarray(a)

    def to_display(self, vox: np.ndarray) -> np.ndarray:
        """Fixed-grid voxel points ``(..., 3)`` -> display coordinates ``(..., 2)`` = ``(column, row)``."""
        n_r, n_c = self.shape
        r, c = vox[..., self.row_axis], vox[..., self.col_axis]
        return np.stack([n_c - 1 - c if self.flip_cols else c, n_r - 1 - r if self.flip_rows else r], axis=-1)

    def aspect(self, spacing: Sequence[float]) -> float:
        """Pixel height / width in mm (matplotlib's ``aspect``)."""
        return float(spacing[self.row_axis]) / float(spacing[self.col_axis])


def plane_views(affine: np.ndarray, shape: Sequence[int], index: Sequence[int]) -> list[PlaneView]:
    """The :data:`PLANES` of a grid with voxel-to-RAS ``affine``, sliced at voxel ``index``.

    An affine nibabel cannot orient (singular) is taken as RAS. For the LIA-oriented phantom,
    axial slices are normal to array axis 1 (I) and shown with A (array axis 2) up and R left:

    >>> from nir_lightning.data.phantom import make_phantom
    >>> ax = plane_views(make_phantom((12, 14, 10)).affine, (12, 14, 10), (6, 7, 5))[0]
    >>> ax.axis, ax.row_axis, ax.flip_rows, ax.col_axis, ax.flip_cols, ax.shape
    (1, 2, True, 0, False, (10, 12))
    """
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if not np.all(np.isfinite(ornt)):
        ornt = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    array_axis = {int(w): a for a, (w, _) in enumerate(ornt)}  # world axis -> array axis
    toward_plus = [bool(sign > 0) for _, sign in ornt]  # array index grows toward R / A / S
    views = []
    for name in PLANES:
        normal, row_w, col_w, sides = _LAYOUT[name]
        r, c = array_axis[row_w], array_axis[col_w]
        views.append(
            PlaneView(
                name=name,
                axis=array_axis[normal],
                index=int(index[array_axis[normal]]),
                row_axis=r,
                col_axis=c,
                flip_rows=toward_plus[r],
                flip_cols=toward_plus[c],
                shape=(int(shape[r]), int(shape[c])),
                sides=sides,
            )
        )
    return views


@dataclass
class QCSlices:
    """Mid-slices of one registration, as displayed; every list holds one entry per row of :attr:`planes`.

    Entry ``i`` shows ``planes[i]`` (axial, coronal, sagittal) with shape ``planes[i].shape``,
    row 0 on top, already oriented by :meth:`PlaneView.orient`.

    Attributes:
        fixed, moving, warped: intensities in [0, 1] (the pair's scaled images; ``moving`` on
            the fixed grid, ``warped`` = moving sampled at ``phi``).
        det: det of the Jacobian of ``phi`` (voxel units; <= 0 is a fold).
        phi_vox: ``(rows, cols, 3)`` ``phi`` of each slice pixel, in fixed voxels (all 3 array axes).
        fixed_labels, warped_labels: int label slices, or ``None`` without label maps.
        planes: how each row is sliced and oriented.
        index: the slice index along each array axis.
        spacing: voxel size in mm along each array axis (for the aspect ratio).
    """

    fixed: list[np.ndarray]
    moving: list[np.ndarray]
    warped: list[np.ndarray]
    det: list[np.ndarray]
    phi_vox: list[np.ndarray]
    fixed_labels: list[np.ndarray] | None
    warped_labels: list[np.ndarray] | None
    planes: list[PlaneView]
    index: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def has_labels(self) -> bool:
        return self.fixed_labels is not None and self.warped_labels is not None

    @property
    def folds(self) -> int:
        """Pixels with ``det <= 0`` over the three slices (not the whole volume)."""
        return int(sum(int((d <= 0).sum()) for d in self.det))


def _slab_voxels(shape: tuple[int, int, int], axis: int, index: int) -> tuple[Tensor, int]:
    """Voxel coordinates ``(n0, n1, n2, 3)`` of planes ``index - 1 .. index + 1`` normal to ``axis``.

    Returns the slab and the position of plane ``index`` inside it (the slab is clipped at the
    volume border, where the difference along ``axis`` becomes one-sided).
    """
    lo, hi = max(0, index - 1), min(shape[axis] - 1, index + 1)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    axes[axis] = torch.arange(lo, hi + 1, dtype=torch.float32)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1), index - lo


def _middle(shape: tuple[int, int, int], index: Sequence[int] | None) -> tuple[int, int, int]:
    if index is None:
        return (shape[0] // 2, shape[1] // 2, shape[2] // 2)
    idx = tuple(int(i) for i in index)
    if len(idx) != 3 or any(not 0 <= i < n for i, n in zip(idx, shape, strict=True)):
        raise ValueError(f"slice index must be 3 voxel indices inside the grid {shape}, got {tuple(index)}")
    return (idx[0], idx[1], idx[2])


@torch.no_grad()
def qc_slices(
    pair: ImagePair,
    transform: Transform | None = None,
    *,
    phi: Tensor | None = None,
    index: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    max_points: int = 2**16,
) -> QCSlices:
    """Mid-slices of the registration of ``pair`` by ``transform`` (or a dense ``phi``).

    Args:
        pair: the image pair (its scaled ``fixed``/``moving`` and label maps are shown; its
            ``fixed_affine`` orients the planes, see :func:`plane_views`).
        transform: ``phi`` as a callable on normalized points ``(..., 3)`` (a neural field,
            or :meth:`RegistrationModule.transform`); evaluated on the three slabs only.
        phi: alternatively the dense transform ``(D0, D1, D2, 3)`` in normalized coordinates
            (:attr:`nir_lightning.evaluation.evaluate.RegistrationResult.phi`). Exactly one of the two.
        index: voxel index of the slice along each array axis (default: the middle voxel).
        device: where ``transform`` runs (default: its parameters' device, else CPU).
        max_points: points per chunk of ``transform`` evaluation (bounds memory).

    >>> from nir_lightning.data.phantom import make_phantom
    >>> from nir_lightning.data.pair import ImagePair
    >>> p = make_phantom((12, 14, 10), seed=1)  # LIA-like affine
    >>> img = torch.as_tensor(p.fixed)[None, None]
    >>> pair = ImagePair(fixed=img, moving=img, moving_raw=img, fixed_affine=p.affine)
    >>> s = qc_slices(pair, lambda x: x)  # the identity transform
    >>> [v.name for v in s.planes], [d.shape for d in s.det], s.folds, float(np.abs(s.det[0] - 1).max()) < 1e-4
    (['axial', 'coronal', 'sagittal'], [(10, 12), (14, 12), (14, 10)], 0, True)
    """
    if (transform is None) == (phi is None):
        raise ValueError("give exactly one of transform (a callable) or phi (a dense (D0, D1, D2, 3) tensor)")
    shape = pair.shape
    if phi is not None and tuple(phi.shape) != (*shape, 3):
        raise ValueError(f"phi must have shape {(*shape, 3)} (the fixed grid), got {tuple(phi.shape)}")
    idx = _middle(shape, index)
    if transform is not None and device is None:
        params = list(getattr(transform, "parameters", list)())
        device = params[0].device if params else torch.device("cpu")
    fixed = pair.fixed.detach().float().cpu()
    moving = pair.moving.detach().float().cpu()
    has_labels = pair.has_labels
    planes = plane_views(pair.fixed_affine, shape, idx)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("fixed", "moving", "warped", "det", "phi_vox", "fl", "wl")}
    for view in planes:
        axis, i = view.axis, view.index
        slab_vox, mid = _slab_voxels(shape, axis, i)
        if phi is not None:
            phi_slab = phi.detach().float().cpu().narrow(axis, i - mid, slab_vox.shape[axis])
        else:
            assert transform is not None
            phi_slab = map_points(transform, voxel_to_normalized(slab_vox, shape), max_points=max_points, device=torch.device(device or "cpu"))
        phi_slab_vox = normalized_to_voxel(phi_slab, shape)
        det = determinant(jacobian_central(phi_slab_vox.double()))
        pts = phi_slab.select(axis, mid).unsqueeze(0).unsqueeze(-2)  # (1, H, W, 1, 3) normalized

        def put(key: str, a: Tensor, view: PlaneView = view) -> None:
            out[key].append(view.orient(a.numpy()))

        put("warped", sample_image(moving, pts)[0, 0, :, :, 0])
        put("fixed", fixed[0, 0].select(axis, i))
        put("moving", moving[0, 0].select(axis, i))
        put("det", det.select(axis, mid).float())
        put("phi_vox", phi_slab_vox.select(axis, mid))
        if has_labels:
            assert pair.fixed_labels is not None and pair.moving_labels is not None
            ml = pair.moving_labels.detach().float().cpu()
            put("wl", sample_image(ml, pts, mode="nearest")[0, 0, :, :, 0].round().to(torch.int32))
            put("fl", pair.fixed_labels[0, 0].detach().cpu().select(axis, i).to(torch.int32))
    return QCSlices(
        fixed=out["fixed"],
        moving=out["moving"],
        warped=out["warped"],
        det=out["det"],
        phi_vox=out["phi_vox"],
        fixed_labels=out["fl"] if has_labels else None,
        warped_labels=out["wl"] if has_labels else None,
        planes=planes,
        index=idx,
        spacing=pair.spacing,
    )
