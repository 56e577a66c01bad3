"""The curves of runs (loss, Dice, folding, NCC against step or fit time) in one figure: :func:`plot_curves`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nir_lightning.app.compare.runs import RunRecord
from nir_lightning.errors import InputError

CURVES: tuple[str, ...] = ("train/loss", "val/dice", "val/folding_percent", "val/lncc")
"""Curves plotted by default (those that no run logged are left out)."""


def _time_of(rec: RunRecord, steps: np.ndarray) -> np.ndarray | None:
    from nir_lightning.training.tracking import TIME_KEY

    if TIME_KEY not in rec.curves:
        return None
    ts, tv = rec.curves[TIME_KEY]
    return np.interp(steps, ts, tv)  # val rows carry no time: interpolate the train-row clock


_LINESTYLES = ("-", "--", ":", "-.")


def run_styles(runs: Sequence[RunRecord]) -> dict[str, dict[str, str]]:
    """Colour (and line style) of each run, by run order: one look per run in every panel.

    Fixed ``tab10`` colours (not the global style's cycle, so plots are reproducible); runs
    11-20 reuse them dashed, and so on.

    >>> run_styles([RunRecord(Path("a"), "a"), RunRecord(Path("b"), "b")])["b"]
    {'color': '#ff7f0e', 'linestyle': '-'}
    """
    palette = [to_hex(c) for c in colormaps["tab10"].colors]  # type: ignore[attr-defined]
    return {
        r.name: {"color": palette[i % len(palette)], "linestyle": _LINESTYLES[(i // len(palette)) % len(_LINESTYLES)]}
        for i, r in enumerate(runs)
    }


def plot_curves(
    runs: Sequence[RunRecord],
    path: str | Path | None = None,
    *,
    metrics: Sequence[str] | None = None,
    x: Literal["step", "time"] = "step",
    panel_inches: float = 3.2,
    dpi: int = 100,
) -> Figure:
    """One panel per metric (default :data:`CURVES` that some run has), one line per run; returns the figure.

    Each run keeps its colour from :func:`run_styles` in every panel (a run without a curve
    leaves its colour unused there), and the one legend shows the same colours, in run order.
    ``x="time"`` plots against fit seconds (``time/seconds`` from
    :class:`~nir_lightning.training.QCLogger`; runs without it are left out).
    Saves a PNG to ``path`` when given.
    """
    if x not in ("step", "time"):
        raise InputError(f"x must be 'step' or 'time', got {x!r}")
    names = list(metrics) if metrics is not None else [m for m in CURVES if any(m in r.curves for r in runs)]
    if not names:
        raise InputError("none of the runs logged any of the curves " + ", ".join(metrics or CURVES))
    fig = Figure(figsize=(panel_inches * len(names), panel_inches * 0.8), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    styles = run_styles(runs)
    handles: dict[str, Line2D] = {}  # run -> its first line, for the one legend of all panels
    for ax, name in zip(axes, names, strict=True):
        for rec in runs:
            if name not in rec.curves:
                continue
            steps, values = rec.curves[name]
            xs = steps if x == "step" else _time_of(rec, steps)
            if xs is None:
                continue
            (line,) = ax.plot(xs, values, marker="o" if len(values) < 20 else None, markersize=3, label=rec.name, **styles[rec.name])
            handles.setdefault(rec.name, line)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step" if x == "step" else "fit seconds", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    order = [r.name for r in runs if r.name in handles]
    fig.legend([handles[n] for n in order], order, loc="upper center", ncol=max(1, min(len(order), 6)), fontsize=7, frameon=False)
    if path is not None:
        from nir_lightning.evaluation.qc_figure import figure_to_array, save_png

        save_png(figure_to_array(fig), path)
    return fig
