"""The rows of the cohort table, shared by the HTML page and the W&B table."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nir_lightning.app.report.cohort import Cohort, PairResult
from nir_lightning.app.report.flags import Flag, affine_shape, severity


@dataclass(frozen=True)
class Column:
    """A metric column: ``key`` in a row, its ``header``, the number format and a tooltip."""

    key: str
    header: str
    fmt: str
    help: str


METRIC_COLUMNS: tuple[Column, ...] = (
    Column("dice_before", "Dice before", ".3f", "mean Dice of the label maps before registration"),
    Column("dice_affine", "Dice affine", ".3f", "mean Dice after the affine stage"),
    Column("dice_after", "Dice after", ".3f", "mean Dice after the neural field"),
    Column("hd95_after", "HD95 mm", ".2f", "mean 95th-percentile Hausdorff distance after, mm"),
    Column("folding_percent", "folds %", ".3g", "share of the foreground with det J <= 0"),
    Column("sdlogj", "SDlogJ", ".3f", "standard deviation of log det J in the foreground"),
    Column("affine_scale", "affine scale", ".3f", "geometric mean of the affine's singular values (1: no scaling)"),
    Column("seconds", "seconds", ".0f", "wall time of the pair (affine stage, fit and outputs)"),
)
"""Numeric columns, in order; summary statistics are given for the first six and seconds."""


def common_prefix(paths: Sequence[str]) -> str:
    """The folder all ``paths`` share (``""`` when fewer than two or none), to show shorter inputs.

    >>> common_prefix(["/d/sub-1/t1.nii.gz", "/d/sub-2/t1.nii.gz"])
    '/d/'
    """
    paths = [p for p in paths if p]
    if len(paths) < 2:
        return ""
    prefix = os.path.commonpath(paths)
    return prefix.rstrip("/") + "/" if prefix not in ("", "/") else ""


def pair_row(p: PairResult, flags: Sequence[Flag], *, prefix: str = "") -> dict[str, Any]:
    """One table row: id, status, inputs, the metric columns (``None`` when absent), flags."""
    m = p.metrics
    shape = affine_shape((m.get("affine") or {}).get("world")) if isinstance(m.get("affine"), dict) else None

    def short(key: str) -> str:
        v = m.get(key)
        s = str(v) if v else ""
        return s[len(prefix):] if prefix and s.startswith(prefix) else s

    row: dict[str, Any] = {
        "id": p.id,
        "status": p.status,
        "fixed": short("fixed"),
        "moving": short("moving"),
        "fixed_full": str(m.get("fixed") or ""),
        "moving_full": str(m.get("moving") or ""),
        "version": p.version or "",
    }
    for col in METRIC_COLUMNS:
        if col.key == "affine_scale":
            row[col.key] = math.exp(shape[0]) if shape else None
        elif col.key == "seconds":
            row[col.key] = p.number("seconds_total")
        else:
            row[col.key] = p.number(col.key)
    row["severity"] = severity(flags)
    row["flags"] = [f.kind for f in flags]
    row["flag_text"] = [f.text for f in flags]
    row["message"] = p.error or p.detail
    row["folder"] = p.folder
    row["qc"] = p.qc
    return row


def cohort_rows(cohort: Cohort, flags: dict[str, list[Flag]], order: Sequence[PairResult]) -> list[dict[str, Any]]:
    """:func:`pair_row` of every pair in ``order``, input paths shortened by their common folder."""
    prefix = common_prefix([str(p.metrics.get(k) or "") for p in cohort.completed for k in ("fixed", "moving")])
    return [pair_row(p, flags[p.id], prefix=prefix) for p in order]


def describe(values: Sequence[float]) -> dict[str, float]:
    """``n``, ``mean``, ``sd`` (0 for one value) and ``median``.

    >>> describe([1.0, 2.0, 3.0])
    {'n': 3, 'mean': 2.0, 'sd': 1.0, 'median': 2.0}
    """
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "median": statistics.median(values),
    }


def relative_link(target: Path | None, page: Path) -> str | None:
    """``target`` relative to the page's folder, in URL form (``None`` for ``None``)."""
    if target is None:
        return None
    from urllib.parse import quote

    return quote(Path(os.path.relpath(target, page.parent)).as_posix())
