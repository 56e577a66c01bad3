"""The QC figure (matplotlib, Agg canvas, no ``pyplot``): the slices of :mod:`nir_lightning.evaluation.qc` as one picture.

No global figure state, no display: safe in batch jobs, notebooks and callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from torch import Tensor

from nir_lightning.data.pair import ImagePair
from nir_lightning.evaluation.qc import FOOTER_INCHES, LABEL_PANEL, PANEL_INCHES, PANELS, QCSlices, Transform, qc_slices
from nir_lightning.io import atomic_path


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


_FOLD_CMAP = ListedColormap(["#00ff00"])  # folds in a colour absent from the det J map
_EDGE_CMAP = ListedColormap(["#ffffff"])
_SIDE_COLOR = "#ffd54f"  # orientation letters: readable on black background and grey tissue


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def volume_summary(metrics: Mapping[str, Any] | None, *, labels: bool = True) -> str:
    """Whole-volume figures of ``metrics`` (as in ``metrics.json``) for the figure title; ``""`` if none.

    >>> volume_summary({"folding_count": 11, "folding_percent": 0.0123, "dice_before": 0.61, "dice_after": 0.8})
    'Dice 0.610 → 0.800 · whole volume: 11 folded voxels (0.0123 % of foreground)'
    """
    if not metrics:
        return ""
    parts = []
    before, after = _number(metrics, "dice_before"), _number(metrics, "dice_after")
    if labels and after is not None:
        parts.append(f"Dice {before:.3f} → {after:.3f}" if before is not None else f"Dice {after:.3f}")
    count, percent = _number(metrics, "folding_count"), _number(metrics, "folding_percent")
    if count is not None:
        share = f" ({percent:.3g} % of foreground)" if percent is not None else ""
        parts.append(f"whole volume: {int(count)} folded voxel{'' if count == 1 else 's'}{share}")
    return " · ".join(parts)


def slice_summary(slices: QCSlices) -> str:
    """The fold count the det J panels show, labelled as a count over the three slices only."""
    k = slices.folds
    return f"det J ≤ 0: {k} fold{'' if k == 1 else 's'} in these 3 slices"


def _mark_sides(ax: Axes, sides: tuple[str, str, str, str]) -> None:
    """Letters at the left, right, top and bottom edge of ``ax`` (axes coordinates)."""
    outline = [patheffects.withStroke(linewidth=1.5, foreground="black")]  # legible on white matter too
    kw: dict[str, Any] = {"transform": ax.transAxes, "fontsize": 7, "fontweight": "bold", "color": _SIDE_COLOR, "path_effects": outline}
    left, right, top, bottom = sides
    ax.text(0.03, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.97, 0.5, right, ha="right", va="center", **kw)
    ax.text(0.5, 0.97, top, ha="center", va="top", **kw)
    ax.text(0.5, 0.03, bottom, ha="center", va="bottom", **kw)


def qc_figure(
    slices: QCSlices,
    *,
    title: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    panel_inches: float = PANEL_INCHES,
    dpi: int = 80,
    diff_max: float = 0.5,
    grid_lines: int = 16,
) -> Figure:
    """The QC figure: 3 rows (axial, coronal, sagittal; see :class:`QCSlices`) by :data:`PANELS` (+ labels).

    Each row is drawn as oriented by its :class:`PlaneView` (row 0 on top; aspect from the
    voxel spacing) with the side letters on its first panel. The deformed grid shows
    ``phi``'s in-plane components of every ``~n/grid_lines``-th row and column; the det J map
    runs 0 (blue) .. 1 (white) .. 2 (red) with folds (det <= 0) in green, each panel counting
    its own slice. ``metrics`` (``metrics.json``'s ``folding_count``, ``folding_percent``,
    ``dice_before``, ``dice_after``) puts the whole-volume figures in the title; the footer
    says how many folds the three slices show. The figure has ``3 * n_columns + 1`` axes (the
    last is det J's colour bar, under its column) and is
    ``((3 * panel_inches + FOOTER_INCHES) * dpi, n_columns * panel_inches * dpi)`` pixels.

    >>> import torch
    >>> from nir_lightning.data.phantom import make_phantom
    >>> p = make_phantom((12, 14, 10), seed=1)
    >>> img = torch.as_tensor(p.fixed)[None, None]
    >>> pair = ImagePair(fixed=img, moving=img, moving_raw=img, fixed_affine=p.affine)
    >>> fig = qc_figure(qc_slices(pair, lambda x: x))
    >>> len(fig.axes), [ax.get_title() for ax in fig.axes[:3]], fig.axes[7].get_ylabel()
    (22, ['fixed', 'moving', 'warped'], 'coronal · slice 5')
    """
    columns = list(PANELS) + ([LABEL_PANEL] if slices.has_labels else [])
    ncols = len(columns)
    height = 3 * panel_inches + FOOTER_INCHES
    fig = Figure(figsize=(ncols * panel_inches, height), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, ncols, squeeze=False)
    heading = " | ".join(t for t in (title, volume_summary(metrics, labels=slices.has_labels)) if t)
    top = 1.0 - (0.45 if heading else 0.22) / height  # room for the column titles (and the heading)
    fig.subplots_adjust(left=0.1 / ncols, right=1 - 0.05 / ncols, bottom=FOOTER_INCHES / height, top=top, wspace=0.06, hspace=0.14)
    det_norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    det_image: AxesImage | None = None
    for r, view in enumerate(slices.planes):
        aspect = view.aspect(slices.spacing)
        fixed, moving, warped = slices.fixed[r], slices.moving[r], slices.warped[r]
        det = slices.det[r]
        row = axes[r]

        def show(ax: Axes, img: np.ndarray, aspect: float = aspect, **kw: Any) -> AxesImage:
            # slices are already oriented: array row 0 is the top of the panel
            return ax.imshow(img, origin="upper", aspect=aspect, interpolation="nearest", **kw)

        show(row[0], fixed, cmap="gray", vmin=0, vmax=1)
        show(row[1], moving, cmap="gray", vmin=0, vmax=1)
        show(row[2], warped, cmap="gray", vmin=0, vmax=1)
        show(row[3], np.abs(fixed - warped), cmap="magma", vmin=0, vmax=diff_max)
        show(row[4], checkerboard(fixed, warped), cmap="gray", vmin=0, vmax=1)
        # deformed grid over the warped image: phi of every few displayed rows and columns
        show(row[5], warped, cmap="gray", vmin=0, vmax=1, alpha=0.35)
        xy = view.to_display(slices.phi_vox[r])  # (H, W, 2) as (column, row), like the pixels
        step_h = max(1, int(np.ceil(xy.shape[0] / grid_lines)))
        step_w = max(1, int(np.ceil(xy.shape[1] / grid_lines)))
        lines = [xy[i, :, :] for i in range(0, xy.shape[0], step_h)] + [xy[:, j, :] for j in range(0, xy.shape[1], step_w)]
        row[5].add_collection(LineCollection(lines, colors="#1f77b4", linewidths=0.6))
        row[5].set_xlim(-0.5, xy.shape[1] - 0.5)
        row[5].set_ylim(xy.shape[0] - 0.5, -0.5)
        det_image = show(row[6], det, cmap="coolwarm", norm=det_norm)
        folds = det <= 0
        if folds.any():
            show(row[6], np.ma.masked_where(~folds, folds.astype(float)), cmap=_FOLD_CMAP, vmin=0, vmax=1)
        if slices.has_labels:
            assert slices.fixed_labels is not None and slices.warped_labels is not None
            wl, fl = slices.warped_labels[r], slices.fixed_labels[r]
            show(row[7], warped, cmap="gray", vmin=0, vmax=1)
            show(row[7], np.ma.masked_where(wl == 0, wl % 20), cmap="tab20", vmin=0, vmax=19, alpha=0.45)
            edges = _edges(fl)
            show(row[7], np.ma.masked_where(~edges, edges.astype(float)), cmap=_EDGE_CMAP, vmin=0, vmax=1, alpha=0.6)
        for col, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[col], fontsize=8)
        row[0].set_ylabel(f"{view.name} · slice {view.index}", fontsize=7)
        _mark_sides(row[0], view.sides)
        n_fold = int(folds.sum())
        text = f"{n_fold} folded in this slice" if n_fold else "no folds in this slice"
        row[6].set_xlabel(text, fontsize=7, labelpad=1, color="green" if n_fold else "black")
    assert det_image is not None
    pos = axes[2, 6].get_position()
    cax = fig.add_axes((pos.x0, 0.2 / height, pos.width, 0.07 / height))  # tick labels below it
    cbar = fig.colorbar(det_image, cax=cax, orientation="horizontal", ticks=[0, 1, 2])
    cbar.ax.tick_params(labelsize=6, length=2, pad=1)
    fig.text(axes[2, 0].get_position().x0, 0.15 / height, slice_summary(slices), fontsize=7, ha="left", va="bottom")
    if heading:
        fig.suptitle(heading, fontsize=9, y=1.0 - 0.04 / height, va="top")
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
    metrics: Mapping[str, Any] | None = None,
    **kwargs: object,
) -> Path:
    """Render the QC figure of ``pair`` under ``transform`` or a dense ``phi`` to a PNG file (atomically).

    ``metrics``: the registration's whole-volume metrics (``metrics.json``), shown in the title.
    """
    slices = qc_slices(pair, transform, phi=phi)
    return save_png(qc_image(slices, title=title, metrics=metrics, **kwargs), path)
