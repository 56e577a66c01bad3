"""Run folders read back (:func:`load_runs`) and their table of final values (:func:`compare_table`).

No plotting here: the table needs no matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from nir_lightning.errors import InputError

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
        final: final scalar metrics (see :mod:`nir_lightning.app.compare` for precedence).
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
    """Read one run folder (see :mod:`nir_lightning.app.compare` for the layouts understood).

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

