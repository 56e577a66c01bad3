"""``nir compare RUN_DIR ...``: compare runs from their logged files, without the W&B web UI.

A run folder is any of:

* a ``nir register`` output folder (``metrics.json``, curves in ``logs/version_*/metrics.csv``);
* a ``CSVLogger`` version folder (``runs/nir/version_3``: ``metrics.csv``, ``config.yaml`` and,
  with :class:`~nir_lightning.training.QCLogger`, ``summary.json``);
* a folder above those (``runs/nir``): its most recently written ``metrics.csv`` is used;
* a folder with only ``summary.json`` (final values, no curves).

A listed folder that holds none of these (an empty leftover of an interrupted run) is skipped
with a warning on stderr; ``nir compare`` fails only when no listed folder holds a run.

Final values are the last logged value of each curve, overridden by ``summary.json`` and then
by ``metrics.json`` (dense metrics of the written result). The table is printed; the curves
(loss, Dice, folding, NCC against step or fit time) are plotted into one PNG, each run in one
colour in every panel.

``--pareto PNG`` draws accuracy against regularity instead (issue 24): mean Dice (nearest
neighbour; label interpolation) against SDlogJ, one labelled point per folder, from each
folder's ``metrics.json`` (a ``nir register`` output or a benchmark result folder). The
benchmark harness draws its sweep with the same :func:`plot_pareto`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nir_lightning.errors import InputError

CURVES: tuple[str, ...] = ("train/loss", "val/dice", "val/folding_percent", "val/lncc")
"""Curves plotted by default (those that no run logged are left out)."""

COLUMNS: tuple[str, ...] = (
    "steps",
    "seconds_fit",
    "train/loss",
    "val/lncc",
    "val/dice",
    "val/folding_percent",
    "dice_before",
    "dice_affine",
    "dice_after",
    "dice_after_label",
    "dice_onehot_linear",
    "folding_percent",
    "folding_count",
    "sdlogj",
    "hd95_after",
    "seconds_reg",
)
"""Metric columns of the table, in order (columns that no run has are left out)."""

CONFIG_COLUMNS: dict[str, tuple[str, ...]] = {
    "field": ("model", "field", "class_path"),
    "sampler": ("model", "sampler", "class_path"),
    "lam": ("model", "lam"),
    "lr": ("model", "lr"),
    "similarity": ("model", "similarity"),
    "affine": ("data", "affine", "kind"),
}
"""Config columns: name -> path in the resolved config (class paths shown by class name)."""


@dataclass
class RunRecord:
    """One run read back from its files.

    Attributes:
        path: the folder given by the user.
        name: a short unique name (set by :func:`load_runs`).
        curves: metric -> ``(steps, values)`` float arrays, in step order, NaNs dropped.
        final: final scalar metrics (see the module docstring for precedence).
        config: the resolved config (``config.yaml`` or ``metrics.json["config"]``), or ``{}``.
    """

    path: Path
    name: str
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def config_value(self, keys: Sequence[str]) -> Any:
        node: Any = self.config
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_metrics_csv(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Curves of a ``CSVLogger`` ``metrics.csv``: metric -> ``(steps, values)``, empty cells dropped."""
    rows: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = _float(row.get("step", ""))
            for key, text in row.items():
                if key in ("step", "epoch") or key is None or text in ("", None):
                    continue
                value = _float(text)
                if math.isfinite(value) and math.isfinite(step):
                    rows.setdefault(key, []).append((step, value))
    out = {}
    for key, pairs in rows.items():
        pairs.sort(key=lambda p: p[0])  # stable: same-step rows keep file order
        arr = np.asarray(pairs, dtype=np.float64)
        out[key] = (arr[:, 0], arr[:, 1])
    return out


def _find_metrics_csv(folder: Path) -> Path | None:
    if (folder / "metrics.csv").is_file():
        return folder / "metrics.csv"
    found = [p for p in folder.rglob("metrics.csv") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"could not read '{path}': {exc}") from exc
    return data if isinstance(data, dict) else {}


class EmptyRunFolderError(InputError):
    """A folder that exists but holds no run files (skipped by :func:`load_runs`)."""


def load_run(path: str | Path) -> RunRecord:
    """Read one run folder (see the module docstring for the layouts understood).

    Raises :class:`EmptyRunFolderError` for a folder with no ``metrics.csv``, ``metrics.json``
    or ``summary.json`` (or only empty ones), :class:`InputError` for a path that is no folder.
    """
    # imported here: Lightning is slow to import and plot_pareto (the benchmark's figure) needs none of it
    from nir_lightning.training.tracking import SUMMARY_FILE, TIME_KEY

    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"run folder not found: '{folder}'.")
    metrics_csv = _find_metrics_csv(folder)
    metrics_json = folder / "metrics.json"
    log_dir = metrics_csv.parent if metrics_csv is not None else folder  # where summary.json and config.yaml live
    if metrics_csv is None and not metrics_json.is_file() and not (log_dir / SUMMARY_FILE).is_file():
        raise EmptyRunFolderError(
            f"'{folder}' holds no metrics.csv (CSV logger), metrics.json (nir register) or {SUMMARY_FILE} (QCLogger); is it a run folder?"
        )
    rec = RunRecord(path=folder, name=folder.name)
    if metrics_csv is not None:
        rec.curves = read_metrics_csv(metrics_csv)
        rec.final = {k: float(v[-1]) for k, (_, v) in rec.curves.items() if len(v)}
        if rec.curves:
            rec.final["steps"] = float(max(s.max() for s, _ in rec.curves.values()) + 1)  # steps are 0-based
        if TIME_KEY in rec.curves:
            rec.final["seconds_fit"] = float(rec.curves[TIME_KEY][1][-1])
    if (log_dir / SUMMARY_FILE).is_file():
        rec.final.update({k: float(v) for k, v in _read_json(log_dir / SUMMARY_FILE).items() if _is_number(v)})
    if (log_dir / "config.yaml").is_file():
        rec.config = yaml.safe_load((log_dir / "config.yaml").read_text()) or {}
    if metrics_json.is_file():
        data = _read_json(metrics_json)
        rec.final.update({k: float(v) for k, v in data.items() if _is_number(v)})
        if isinstance(data.get("config"), dict):
            rec.config = data["config"]
    if not rec.curves and not rec.final:  # e.g. a header-only metrics.csv of a run killed at once
        raise EmptyRunFolderError(f"'{folder}' holds run files but no logged values (killed before the first step?)")
    return rec


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Shortest path suffixes that tell the runs apart (``a/version_0``, ``b/version_0``)."""
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_runs(paths: Sequence[str | Path]) -> list[RunRecord]:
    """:func:`load_run` for each folder, named by their shortest distinct path suffixes.

    Folders without run files are skipped with a warning on stderr (``nir compare runs/*``
    should not fail on one empty leftover); an error only if none holds a run.
    """
    if not paths:
        raise InputError("nir compare needs at least one run folder.")
    runs: list[RunRecord] = []
    empty: list[str] = []
    for p in paths:
        try:
            runs.append(load_run(p))
        except EmptyRunFolderError as exc:
            empty.append(str(exc))
    if not runs:
        raise InputError("none of the listed folders holds a run: " + "; ".join(empty))
    for msg in empty:
        print(f"nir compare: warning: skipping a folder: {msg}", file=sys.stderr, flush=True)
    for rec, name in zip(runs, _unique_names([r.path for r in runs]), strict=True):
        rec.name = name
    return runs


def compare_table(runs: Sequence[RunRecord], *, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per run: ``run``, config columns, then metric columns (``None`` where missing).

    Columns that no run has are dropped.
    """
    metric_cols = list(columns) if columns is not None else [c for c in COLUMNS if any(c in r.final for r in runs)]
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name}
        for name, keys in CONFIG_COLUMNS.items():
            value = r.config_value(keys)
            row[name] = value.rsplit(".", 1)[-1] if isinstance(value, str) and "." in value and name in ("field", "sampler") else value
        for c in metric_cols:
            row[c] = r.final.get(c)
        rows.append(row)
    config_cols = [n for n in CONFIG_COLUMNS if any(row[n] is not None for row in rows)]
    keep = ["run", *config_cols, *metric_cols]
    return [{k: row[k] for k in keep} for row in rows]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table with aligned columns (numbers to 4 significant digits).

    >>> print(format_table([{"run": "a", "val/dice": 0.81234}, {"run": "bb", "val/dice": None}]))
    run  val/dice
    a      0.8123
    bb          -
    """
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[_fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True))).rstrip()]
    for line in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))).rstrip())
    return "\n".join(lines)


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
        group: points of one group share a colour and marker and are joined in SDlogJ order
            (a method's regularisation settings); a group of one is a lone point.
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


def plot_pareto(
    points: Sequence[ParetoPoint],
    path: str | Path | None = None,
    *,
    title: str = "",
    panel_inches: float = 4.2,
    dpi: int = 110,
) -> tuple[Figure, list[str]]:
    """Dice against SDlogJ, one panel per :data:`PARETO_PANELS` entry some point has; returns the figure and notes.

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
            ys = [pareto_value(p.values, keys) for p in pts]
            (line,) = ax.plot(xs, ys, linestyle="-" if len(pts) > 1 else "none", markersize=6, label=g, **style[g])
            handles.setdefault(g, line)
            for p, xv, yv in zip(pts, xs, ys, strict=True):
                labels.setdefault((round(xv, 6), round(yv or 0.0, 6)), []).append((p.label, style[g]["color"]))
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nir compare",
        description="Compare runs from their logged files: print a table of final metrics and plot loss/Dice/folding curves.",
    )
    p.add_argument("runs", nargs="+", help="run folders: nir register outputs, CSV logger version folders, or folders above them "
                   "(folders without run files are skipped with a warning)")
    p.add_argument("--plot", default=None, help="PNG of the curves (default: compare.png, none with --pareto; '' for none)")
    p.add_argument("--pareto", help="PNG of mean Dice (nearest neighbour; label interpolation) against SDlogJ, one labelled "
                   "point per folder, from each folder's metrics.json (every folder must have one)")
    p.add_argument("--x", choices=("step", "time"), default="step", help="x axis of the curves (default: step)")
    p.add_argument("--metrics", help="curves to plot, comma-separated (default: " + ",".join(CURVES) + ")")
    p.add_argument("--columns", help="table metric columns, comma-separated (default: all of " + ",".join(COLUMNS) + " present)")
    p.add_argument("--csv", help="also write the table as CSV to this file")
    return p


def main(argv: Sequence[str]) -> int:
    """``nir compare``: print the table, write the plot (and the CSV table); returns 0.

    Raises :class:`InputError` (exit 2) for a missing folder or when no listed folder holds a run;
    with ``--pareto``, also for a folder without ``metrics.json`` (or without SDlogJ and a Dice in it).
    """
    args = _parser().parse_args(list(argv))
    if args.plot is None:
        args.plot = "" if args.pareto else "compare.png"
    if args.pareto:
        check_pareto_folders(args.runs)  # before load_runs, which would skip a folder without run files
    runs = load_runs(args.runs)
    columns = args.columns.split(",") if args.columns else None
    if args.pareto and columns is not None:  # the table shows what the scatter plots, and the folds
        columns += [c for c in ("dice_after", "sdlogj", "folding_count") if c not in columns]
    rows = compare_table(runs, columns=columns)
    print(format_table(rows), flush=True)
    if args.csv:
        from nir_lightning.io import atomic_path

        with atomic_path(args.csv) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot_curves(runs, args.plot, metrics=args.metrics.split(",") if args.metrics else None, x=args.x)
        print(f"nir compare: curves written to {args.plot}", flush=True)
    if args.pareto:
        _, notes = plot_pareto(pareto_points(args.runs, runs), args.pareto, title="Dice vs SDlogJ")
        for note in notes:
            print(f"nir compare: {note}", file=sys.stderr, flush=True)
        print(f"nir compare: Dice vs SDlogJ written to {args.pareto}", flush=True)
    return 0
