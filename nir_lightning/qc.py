"""Visual quality control: mid-slices of a registration in three planes, as one figure.

Rows are the planes normal to array axes 0, 1 and 2 (through the middle voxel unless told
otherwise); columns are :data:`PANELS` (plus :data:`LABEL_PANEL` when the pair has label
maps). Only the slices are evaluated, never the whole volume, so a figure costs about
``3 * 3`` planes of field evaluations (a slab of three planes per row gives det J by the same
central differences as :func:`nir_lightning.metrics.jacobian_determinant`) and is cheap
enough to log during a fit.

Plain matplotlib on the Agg canvas (no ``pyplot``): no global figure state, no display.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from torch import Tensor

from nir_lightning.coords import normalized_to_voxel, voxel_to_normalized
from nir_lightning.io import atomic_path
from nir_lightning.jacobian import determinant, jacobian_central
from nir_lightning.pair import ImagePair
from nir_lightning.warp import sample_image

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
"""Strip under the panels for det J's colour bar; the figure is
``(3 * PANEL_INCHES + FOOTER_INCHES)`` by ``n_columns * PANEL_INCHES`` inches."""

Transform = Callable[[Tensor], Tensor]


@dataclass
class QCSlices:
    """Mid-slices of one registration; every list holds one entry per plane ``p = 0, 1, 2``.

    Plane ``p`` is normal to array axis ``p`` at voxel ``index[p]``; its in-plane axes are the
    other two array axes in increasing order, so entry ``p`` has shape ``(H_p, W_p)`` with
    ``(H_0, W_0) = (D1, D2)``, ``(H_1, W_1) = (D0, D2)``, ``(H_2, W_2) = (D0, D1)``.

    Attributes:
        fixed, moving, warped: intensities in [0, 1] (the pair's scaled images; ``moving`` on
            the fixed grid, ``warped`` = moving sampled at ``phi``).
        det: det of the Jacobian of ``phi`` (voxel units; <= 0 is a fold).
        phi_vox: ``(H_p, W_p, 3)`` ``phi`` of each slice voxel, in fixed voxels (all 3 axes).
        fixed_labels, warped_labels: int label slices, or ``None`` without label maps.
        index: the slice index along each axis.
        spacing: voxel size in mm along each array axis (for the aspect ratio).
    """

    fixed: list[np.ndarray]
    moving: list[np.ndarray]
    warped: list[np.ndarray]
    det: list[np.ndarray]
    phi_vox: list[np.ndarray]
    fixed_labels: list[np.ndarray] | None
    warped_labels: list[np.ndarray] | None
    index: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def has_labels(self) -> bool:
        return self.fixed_labels is not None and self.warped_labels is not None

    @property
    def folds(self) -> int:
        """Voxels with ``det <= 0`` over the three slices."""
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


def _take(t: Tensor, axis: int, i: int) -> Tensor:
    return t.select(axis, i)


@torch.no_grad()
def _evaluate_chunked(transform: Transform, points: Tensor, device: torch.device, max_points: int) -> Tensor:
    """``transform`` on normalized ``points`` ``(..., 3)``, in chunks; returns CPU float32."""
    flat = points.reshape(-1, 3)
    out = torch.empty_like(flat)
    for start in range(0, flat.shape[0], max_points):
        chunk = flat[start : start + max_points].to(device)
        # (1, N, 1, 1, 3): the lattice layout every field and sample_image accepts
        out[start : start + max_points] = transform(chunk.reshape(1, -1, 1, 1, 3)).reshape(-1, 3).float().cpu()
    return out.reshape(points.shape)


def _middle(shape: tuple[int, int, int], index: Sequence[int] | None) -> tuple[int, int, int]:
    if index is None:
        return (shape[0] // 2, shape[1] // 2, shape[2] // 2)
    idx = tuple(int(i) for i in index)
    if len(idx) != 3 or any(not 0 <= i < n for i, n in zip(idx, shape, strict=True)):
        raise ValueError(f"slice index must be 3 voxel indices inside the grid {shape}, got {tuple(index)}")
    return idx  # type: ignore[return-value]


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
        pair: the image pair (its scaled ``fixed``/``moving`` and label maps are shown).
        transform: ``phi`` as a callable on normalized points ``(..., 3)`` (a neural field,
            or :meth:`RegistrationModule.transform`); evaluated on the three slabs only.
        phi: alternatively the dense transform ``(D0, D1, D2, 3)`` in normalized coordinates
            (:attr:`nir_lightning.evaluate.Registration.phi`). Exactly one of the two.
        index: voxel index of the slice along each axis (default: the middle voxel).
        device: where ``transform`` runs (default: its parameters' device, else CPU).
        max_points: points per chunk of ``transform`` evaluation (bounds memory).

    >>> from nir_lightning.phantom import make_phantom
    >>> from nir_lightning.pair import ImagePair
    >>> p = make_phantom((12, 14, 10), seed=1)
    >>> img = torch.as_tensor(p.fixed)[None, None]
    >>> pair = ImagePair(fixed=img, moving=img, moving_raw=img, fixed_affine=p.affine)
    >>> s = qc_slices(pair, lambda x: x)  # the identity transform
    >>> [d.shape for d in s.det], s.folds, float(np.abs(s.det[0] - 1).max()) < 1e-4
    ([(14, 10), (12, 10), (12, 14)], 0, True)
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
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("fixed", "moving", "warped", "det", "phi_vox", "fl", "wl")}
    for axis in range(3):
        slab_vox, mid = _slab_voxels(shape, axis, idx[axis])
        if phi is not None:
            lo = idx[axis] - mid
            phi_slab = phi.detach().float().cpu().narrow(axis, lo, slab_vox.shape[axis])
        else:
            assert transform is not None
            phi_slab = _evaluate_chunked(transform, voxel_to_normalized(slab_vox, shape), torch.device(device), max_points)
        phi_slab_vox = normalized_to_voxel(phi_slab, shape)
        det = determinant(jacobian_central(phi_slab_vox.double()))
        phi_mid = _take(phi_slab, axis, mid)  # (H, W, 3) normalized
        pts = phi_mid.unsqueeze(0).unsqueeze(-2)  # (1, H, W, 1, 3)
        out["warped"].append(sample_image(moving, pts)[0, 0, :, :, 0].numpy())
        out["fixed"].append(_take(fixed[0, 0], axis, idx[axis]).numpy())
        out["moving"].append(_take(moving[0, 0], axis, idx[axis]).numpy())
        out["det"].append(_take(det, axis, mid).float().numpy())
        out["phi_vox"].append(_take(phi_slab_vox, axis, mid).numpy())
        if has_labels:
            assert pair.fixed_labels is not None and pair.moving_labels is not None
            ml = pair.moving_labels.detach().float().cpu()
            out["wl"].append(sample_image(ml, pts, mode="nearest")[0, 0, :, :, 0].round().to(torch.int32).numpy())
            out["fl"].append(_take(pair.fixed_labels[0, 0].detach().cpu(), axis, idx[axis]).to(torch.int32).numpy())
    return QCSlices(
        fixed=out["fixed"],
        moving=out["moving"],
        warped=out["warped"],
        det=out["det"],
        phi_vox=out["phi_vox"],
        fixed_labels=out["fl"] if has_labels else None,
        warped_labels=out["wl"] if has_labels else None,
        index=idx,
        spacing=pair.spacing,
    )


def checkerboard(a: np.ndarray, b: np.ndarray, *, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of ``a`` and ``b`` (same 2D shape); about ``tiles`` along the long side.

    >>> checkerboard(np.zeros((4, 4)), np.ones((4, 4)), tiles=2).astype(int).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    """
    if a.shape != b.shape:
        raise ValueError(f"checkerboard needs two images of one shape, got {a.shape} and {b.shape}")
    size = max(1, int(np.ceil(max(a.shape) / tiles)))
    ii, jj = np.meshgrid(np.arange(a.shape[0]) // size, np.arange(a.shape[1]) // size, indexing="ij")
    return np.where((ii + jj) % 2 == 0, a, b)


def _edges(labels: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)``: pixels whose label differs from a 4-neighbour's."""
    e = np.zeros(labels.shape, dtype=bool)
    e[1:, :] |= labels[1:, :] != labels[:-1, :]
    e[:-1, :] |= labels[1:, :] != labels[:-1, :]
    e[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    e[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    return e


def _in_plane(axis: int) -> tuple[int, int]:
    b, c = (a for a in range(3) if a != axis)
    return b, c


_FOLD_CMAP = ListedColormap(["#00ff00"])  # folds in a colour absent from the det J map
_EDGE_CMAP = ListedColormap(["#ffffff"])


def qc_figure(
    slices: QCSlices,
    *,
    title: str | None = None,
    panel_inches: float = PANEL_INCHES,
    dpi: int = 80,
    diff_max: float = 0.5,
    grid_lines: int = 16,
) -> Figure:
    """The QC figure: 3 rows (planes normal to axes 0, 1, 2) by :data:`PANELS` (+ labels).

    Images are drawn with array axis ``b`` (the first in-plane axis) horizontal and ``c``
    vertical, origin at the lower left, aspect from the voxel spacing. The deformed grid
    shows ``phi``'s in-plane components of every ``~n/grid_lines``-th row and column; the det J
    map runs 0 (blue) .. 1 (white) .. 2 (red) with folds (det <= 0) in green. The figure has
    ``3 * n_columns + 1`` axes (the last is det J's colour bar, under its column) and is
    ``((3 * panel_inches + FOOTER_INCHES) * dpi, n_columns * panel_inches * dpi)`` pixels.

    >>> from nir_lightning.phantom import make_phantom
    >>> p = make_phantom((12, 14, 10), seed=1)
    >>> img = torch.as_tensor(p.fixed)[None, None]
    >>> pair = ImagePair(fixed=img, moving=img, moving_raw=img, fixed_affine=p.affine)
    >>> fig = qc_figure(qc_slices(pair, lambda x: x))
    >>> len(fig.axes), [ax.get_title() for ax in fig.axes[:3]]
    (22, ['fixed', 'moving', 'warped'])
    """
    columns = list(PANELS) + ([LABEL_PANEL] if slices.has_labels else [])
    ncols = len(columns)
    height = 3 * panel_inches + FOOTER_INCHES
    fig = Figure(figsize=(ncols * panel_inches, height), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, ncols, squeeze=False)
    top = 1.0 - (0.45 if title else 0.22) / height  # room for the column titles (and the title)
    fig.subplots_adjust(left=0.1 / ncols, right=1 - 0.05 / ncols, bottom=FOOTER_INCHES / height, top=top, wspace=0.06, hspace=0.14)
    det_norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    det_image: AxesImage | None = None
    for axis in range(3):
        b, c = _in_plane(axis)
        aspect = slices.spacing[c] / slices.spacing[b]
        fixed, moving, warped = slices.fixed[axis], slices.moving[axis], slices.warped[axis]
        det = slices.det[axis]
        row = axes[axis]

        def show(ax: Axes, img: np.ndarray, aspect: float = aspect, **kw: Any) -> AxesImage:
            # transpose: rows of the display are axis c, columns axis b
            return ax.imshow(img.T, origin="lower", aspect=aspect, interpolation="nearest", **kw)

        show(row[0], fixed, cmap="gray", vmin=0, vmax=1)
        show(row[1], moving, cmap="gray", vmin=0, vmax=1)
        show(row[2], warped, cmap="gray", vmin=0, vmax=1)
        show(row[3], np.abs(fixed - warped), cmap="magma", vmin=0, vmax=diff_max)
        show(row[4], checkerboard(fixed, warped), cmap="gray", vmin=0, vmax=1)
        # deformed grid over the warped image: lines of constant b and of constant c
        show(row[5], warped, cmap="gray", vmin=0, vmax=1, alpha=0.35)
        pv = slices.phi_vox[axis]
        xy = np.stack([pv[..., b], pv[..., c]], axis=-1)  # (H, W, 2): display x = axis b, y = axis c
        step_h = max(1, int(np.ceil(xy.shape[0] / grid_lines)))
        step_w = max(1, int(np.ceil(xy.shape[1] / grid_lines)))
        lines = [xy[i, :, :] for i in range(0, xy.shape[0], step_h)] + [xy[:, j, :] for j in range(0, xy.shape[1], step_w)]
        row[5].add_collection(LineCollection(lines, colors="#1f77b4", linewidths=0.6))
        row[5].set_xlim(-0.5, xy.shape[0] - 0.5)
        row[5].set_ylim(-0.5, xy.shape[1] - 0.5)
        det_image = show(row[6], det, cmap="coolwarm", norm=det_norm)
        folds = det <= 0
        if folds.any():
            show(row[6], np.ma.masked_where(~folds, folds.astype(float)), cmap=_FOLD_CMAP, vmin=0, vmax=1)
        if slices.has_labels:
            assert slices.fixed_labels is not None and slices.warped_labels is not None
            wl, fl = slices.warped_labels[axis], slices.fixed_labels[axis]
            show(row[7], warped, cmap="gray", vmin=0, vmax=1)
            show(row[7], np.ma.masked_where(wl == 0, wl % 20), cmap="tab20", vmin=0, vmax=19, alpha=0.45)
            edges = _edges(fl)
            show(row[7], np.ma.masked_where(~edges, edges.astype(float)), cmap=_EDGE_CMAP, vmin=0, vmax=1, alpha=0.6)
        for col, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if axis == 0:
                ax.set_title(columns[col], fontsize=8)
        row[0].set_ylabel(f"axis {axis} = {slices.index[axis]}", fontsize=7)
        n_fold = int(folds.sum())
        row[6].set_xlabel(f"{n_fold} folded" if n_fold else "no folds", fontsize=7, labelpad=1, color="green" if n_fold else "black")
    assert det_image is not None
    pos = axes[2, 6].get_position()
    cax = fig.add_axes((pos.x0, 0.2 / height, pos.width, 0.07 / height))  # tick labels below it
    cbar = fig.colorbar(det_image, cax=cax, orientation="horizontal", ticks=[0, 1, 2])
    cbar.ax.tick_params(labelsize=6, length=2, pad=1)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.04 / height, va="top")
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an ``(H, W, 4)`` uint8 RGBA array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def qc_image(slices: QCSlices, **kwargs: object) -> np.ndarray:
    """:func:`qc_figure` rendered to an ``(H, W, 4)`` uint8 RGBA array (for W&B or PNG)."""
    return figure_to_array(qc_figure(slices, **kwargs))  # type: ignore[arg-type]


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an RGBA/RGB uint8 array as PNG atomically (no partial file on interruption)."""
    from matplotlib.image import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        imsave(tmp, image, format="png")
    return path


def save_qc_figure(
    pair: ImagePair,
    path: str | Path,
    *,
    transform: Transform | None = None,
    phi: Tensor | None = None,
    title: str | None = None,
    **kwargs: object,
) -> Path:
    """Render the QC figure of ``pair`` under ``transform`` or a dense ``phi`` to a PNG file."""
    slices = qc_slices(pair, transform, phi=phi)
    return save_png(qc_image(slices, title=title, **kwargs), path)
