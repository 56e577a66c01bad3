"""Accuracy against regularity: mean Dice against SDlogJ, one point per run or setting (:func:`plot_pareto`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nir_lightning.app.compare.runs import RunRecord, _is_number
from nir_lightning.errors import InputError

PARETO_X = "sdlogj"
"""x of the Pareto scatter: the standard deviation of log det J (lower = more regular)."""

PARETO_PANELS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("dice_after",), "Dice (nearest neighbour)"),
    (("dice_after_label", "dice_onehot_linear"), "Dice (label interpolation)"),
)
"""Panels of the Pareto scatter: the y keys (the first a point has is used: ``nir register``
writes ``dice_after_label``, the benchmark harness ``dice_onehot_linear``) and the y label."""

_MARKERS = "osD^v<>ph*"


@dataclass
class ParetoPoint:
    """One point of :func:`plot_pareto`.

    Attributes:
        group: points of one group share a colour and marker; its Pareto front is joined in SDlogJ
            order (a method's regularisation settings); a group of one is a lone point.
        label: the annotation next to the point.
        values: ``sdlogj`` and the Dice keys of :data:`PARETO_PANELS` (missing keys: not drawn).
    """

    group: str
    label: str
    values: dict[str, float]


def pareto_value(values: dict[str, Any], keys: Sequence[str]) -> float | None:
    """The first of ``keys`` that ``values`` holds as a finite number, else ``None``."""
    for k in keys:
        if _is_number(values.get(k)):
            return float(values[k])
    return None


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points on the Pareto front (lower SDlogJ ``xs`` and higher Dice ``ys`` better),
    in ``xs`` order: a point is left out when another is at most as rough and at least as accurate.

    >>> pareto_front([0.1, 0.15, 0.2, 0.2], [0.80, 0.70, 0.84, 0.83])
    [0, 2]
    """
    front: list[int] = []
    for i in sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i])):
        if not front or ys[i] > ys[front[-1]]:
            front.append(i)
    return front


def plot_pareto(
    points: Sequence[ParetoPoint],
    path: str | Path | None = None,
    *,
    title: str = "",
    panel_inches: float = 4.2,
    dpi: int = 110,
) -> tuple[Figure, list[str]]:
    """Dice against SDlogJ, one panel per :data:`PARETO_PANELS` entry some point has; returns the figure and notes.

    Each group's line joins its Pareto front (:func:`pareto_front`); a setting that another of the
    group beats in both SDlogJ and Dice is drawn hollow, off the line.

    The notes name each panel left out because no point has its Dice (e.g. a benchmark run with
    ``--no-onehot``). Raises :class:`InputError` when no point has both SDlogJ and a Dice.
    Saves a PNG to ``path`` when given.
    """
    panels, notes = [], []
    for keys, ylabel in PARETO_PANELS:
        drawn = [p for p in points if _is_number(p.values.get(PARETO_X)) and pareto_value(p.values, keys) is not None]
        if drawn:
            panels.append((keys, ylabel, drawn))
        else:
            notes.append(f"panel '{ylabel} vs SDlogJ' left out: no result has {PARETO_X} and {' or '.join(keys)}")
    if not panels:
        raise InputError("nothing to plot against SDlogJ: " + "; ".join(notes))
    groups = list(dict.fromkeys(p.group for p in points))
    palette = [to_hex(c) for c in colormaps["tab10"].colors]  # type: ignore[attr-defined]
    style = {g: {"color": palette[i % len(palette)], "marker": _MARKERS[i % len(_MARKERS)]} for i, g in enumerate(groups)}
    fig = Figure(figsize=(panel_inches * len(panels), panel_inches * 0.85), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    handles: dict[str, Line2D] = {}
    for ax, (keys, ylabel, drawn) in zip(axes, panels, strict=True):
        labels: dict[tuple[float, float], list[tuple[str, str]]] = {}  # one annotation per spot: same-result settings
        for g in groups:
            pts = sorted((p for p in drawn if p.group == g), key=lambda p: p.values[PARETO_X])
            if not pts:
                continue
            xs = [p.values[PARETO_X] for p in pts]
            ys = [pareto_value(p.values, keys) or 0.0 for p in pts]  # never None: `drawn` holds the points that have one
            front = pareto_front(xs, ys)
            fx, fy = [xs[i] for i in front], [ys[i] for i in front]
            (line,) = ax.plot(fx, fy, linestyle="-" if len(front) > 1 else "none", markersize=6, label=g, **style[g])
            handles.setdefault(g, line)
            others = [i for i in range(len(pts)) if i not in front]
            if others:  # dominated settings: hollow, off the line
                ax.plot([xs[i] for i in others], [ys[i] for i in others], linestyle="none", markersize=6, markerfacecolor="none",
                        label="_dominated", **style[g])  # fmt: skip
            for p, xv, yv in zip(pts, xs, ys, strict=True):
                labels.setdefault((round(xv, 6), round(yv, 6)), []).append((p.label, style[g]["color"]))
        for (xv, yv), texts in labels.items():
            label = " / ".join(dict.fromkeys(t for t, _ in texts))
            ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(4, 3), fontsize=7, color=texts[0][1])
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
        ax.set_xlabel("SDlogJ (std of log det J; lower = more regular)", fontsize=8)
        ax.set_ylabel(f"mean {ylabel}", fontsize=8)
        ax.set_title(f"{ylabel} vs SDlogJ", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.86 if title else 0.9))
    order = [g for g in groups if g in handles]
    fig.legend([handles[g] for g in order], order, loc="upper center", ncol=max(1, min(len(order), 5)), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.94 if title else 1.0))  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        from nir_lightning.evaluation.qc_figure import figure_to_array, save_png

        save_png(figure_to_array(fig), path)
    return fig, notes


def check_pareto_folders(paths: Sequence[str | Path]) -> None:
    """Every folder given with ``--pareto`` must exist and hold a ``metrics.json``.

    A folder left out of the scatter with only a warning would make the figure claim more than
    it shows, so this raises :class:`InputError` naming the folder instead.
    """
    for p in paths:
        folder = Path(p)
        if not folder.is_dir():
            raise InputError(f"run folder not found: '{folder}'.")
        if not (folder / "metrics.json").is_file():
            raise InputError(
                f"--pareto reads each folder's metrics.json (a nir register output or a benchmark result folder); "
                f"'{folder}' has none. Leave that folder out or drop --pareto."
            )


def pareto_points(paths: Sequence[str | Path], runs: Sequence[RunRecord]) -> list[ParetoPoint]:
    """One point per listed folder (in the order given), labelled with its run name.

    Raises :class:`InputError` naming the ``metrics.json`` that lacks ``sdlogj`` or a Dice, or
    the folder :func:`load_runs` skipped (a ``metrics.json`` without numbers).
    """
    check_pareto_folders(paths)
    by_path = {r.path.resolve(): r for r in runs}
    dice_keys = [k for keys, _ in PARETO_PANELS for k in keys]
    points = []
    for p in paths:
        rec = by_path.get(Path(p).resolve())
        if rec is None or not _is_number(rec.final.get(PARETO_X)) or pareto_value(rec.final, dice_keys) is None:
            raise InputError(
                f"'{Path(p) / 'metrics.json'}' lacks {PARETO_X} or a Dice ({', '.join(dice_keys)}); "
                "nir register writes Dice only when given --fixed-labels and --moving-labels; leave that folder out or re-run with them."
            )
        points.append(ParetoPoint(group=rec.name, label=rec.name, values=dict(rec.final)))
    return points
