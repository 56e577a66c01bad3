"""What ``nir register-many`` reads and writes around the registrations: a pair's folder (complete,
failed, running or pending; cleared before a pair is redone), the summary rows and
``summary.csv`` (written under its lock), and the closing line. No torch, no Lightning.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nir_lightning.app.lock import folder_lock_path, holder_alive, lock_file, read_lock
from nir_lightning.app.pairs_csv import PairSpec
from nir_lightning.evaluation.output_files import CORE_FILES, LOG_DIR, OUTPUT_FILES
from nir_lightning.io import finite_or_none, remove_stale_temporaries, write_text_atomic

__all__ = [
    "ERROR_FILE", "SUMMARY_FIELDS", "aggregate_line", "clear_pair", "complete_metrics", "disk_row", "snapshot",
    "summary_row", "write_merged_summary", "write_summary",
]

SUMMARY_FIELDS = ("id", "status", "dice_before", "dice_after", "folding_percent", "seconds", "error")
ERROR_FILE = "error.txt"


# ----------------------------------------------------------------------------- a pair's folder


def complete_metrics(pair_dir: Path, spec: PairSpec) -> dict[str, Any] | None:
    """The pair's ``metrics.json`` if its results are complete (see module docstring), else ``None``."""
    try:
        metrics = json.loads((pair_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict):
        return None
    if metrics.get("fixed") != spec.fixed or metrics.get("moving") != spec.moving:
        return None  # results of another pair under this id (the CSV changed)
    required = CORE_FILES + (("warped_labels.nii.gz",) if spec.has_labels else ())
    if not all((pair_dir / name).is_file() for name in required):
        return None
    return metrics


def _identity(path: Path) -> tuple[int, int] | None:
    """Inode and mtime of ``path`` (an atomic rewrite changes both), ``None`` if absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def snapshot(pair_dir: Path) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """What this job saw of a pair's ``metrics.json`` and ``error.txt`` when it started."""
    return _identity(pair_dir / "metrics.json"), _identity(pair_dir / ERROR_FILE)


def _error_message(pair_dir: Path) -> str:
    """The last line of a failed pair's ``error.txt`` (the exception and its message)."""
    try:
        lines = [ln for ln in (pair_dir / ERROR_FILE).read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def disk_row(spec: PairSpec, output: Path) -> dict[str, Any]:
    """The row of a pair this process did not (yet) do, from its folder: ``completed``,
    ``running`` (locked by a live process), ``failed`` (``error.txt``) or ``pending``."""
    pair_dir = output / spec.id
    metrics = complete_metrics(pair_dir, spec)
    if metrics is not None:
        return summary_row(spec, "completed", metrics)
    holder = read_lock(folder_lock_path(pair_dir))
    if holder is not None and holder_alive(holder):  # a dead holder's pair is incomplete: pending
        return summary_row(spec, "running", seconds=None, error=f"being registered by {holder.describe()}")
    if (pair_dir / ERROR_FILE).is_file():
        return summary_row(spec, "failed", seconds=None, error=_error_message(pair_dir))
    return summary_row(spec, "pending", seconds=None)


def clear_pair(pair_dir: Path) -> None:
    """Remove an earlier attempt's outputs; ``metrics.json`` first so the folder is never complete meanwhile."""
    ordered = ["metrics.json"] + [n for n in OUTPUT_FILES if n != "metrics.json"] + [ERROR_FILE]
    for name in ordered:
        with contextlib.suppress(FileNotFoundError):
            (pair_dir / name).unlink()
    remove_stale_temporaries(pair_dir, OUTPUT_FILES)  # temporaries of atomic writes cut short
    shutil.rmtree(pair_dir / LOG_DIR, ignore_errors=True)


def summary_row(spec: PairSpec, status: str, metrics: dict[str, Any] | None = None, seconds: float | None = None, error: str = "") -> dict[str, Any]:
    m = metrics or {}
    return {
        "id": spec.id,
        "status": status,
        "dice_before": finite_or_none(m.get("dice_before")),
        "dice_after": finite_or_none(m.get("dice_after")),
        "folding_percent": finite_or_none(m.get("folding_percent")),
        "seconds": finite_or_none(m.get("seconds_total")) if seconds is None else seconds,
        "error": " ".join(error.split()),
    }


# ----------------------------------------------------------------------------- summary


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_summary(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as ``summary.csv`` (atomically)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_FIELDS)
    for row in rows:
        writer.writerow([_cell(row.get(k)) for k in SUMMARY_FIELDS])
    write_text_atomic(path, buf.getvalue())


def write_merged_summary(path: Path, specs: Sequence[PairSpec], done: dict[int, dict[str, Any]], results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Write ``summary.csv`` under its lock: one row per CSV row, this job's rows where it has
    them, else what the pair's folder says (another job may have done it); returns the rows."""
    with lock_file(path, what=f"summary '{path}'", wait_s=120.0):
        rows = _merged(specs, done, results, path.parent)
        write_summary(path, rows)
    return rows


def aggregate_line(rows: Sequence[dict[str, Any]], skipped: int, summary: Path) -> str:
    done = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] == "failed"]
    running = [r for r in rows if r["status"] == "running"]
    others = sum(bool(r.get("by_other")) for r in rows)
    parts = [f"{len(done)}/{len(rows)} pairs completed ({skipped} already complete, skipped), {len(failed)} failed"]
    if others:
        parts[0] += f", {others} of them done by another job meanwhile"
    if running:
        parts[0] += f", {len(running)} still running in another process"
    for key in ("dice_after", "dice_before"):
        vals = [r[key] for r in done if r.get(key) is not None]
        if vals:
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            parts.append(f"{key.replace('_', ' ')} {statistics.fmean(vals):.3f} ± {sd:.3f} (n={len(vals)})")
    fold = [r["folding_percent"] for r in done if r.get("folding_percent") is not None]
    if fold:
        parts.append(f"folding {statistics.fmean(fold):.4f}% mean")
    if failed:
        parts.append("failed: " + ", ".join(r["id"] for r in failed[:10]) + (" ..." if len(failed) > 10 else ""))
    return f"nir register-many: {'; '.join(parts)}; summary in {summary}"


def _merged(specs: Sequence[PairSpec], done: dict[int, dict[str, Any]], results: dict[int, dict[str, Any]], output: Path) -> list[dict[str, Any]]:
    """One row per CSV row, in CSV order: this job's row when it has a final one, else the
    pair's folder's (:func:`disk_row`: done by another job, running there, or pending)."""
    rows = []
    for i, spec in enumerate(specs):
        row = done.get(i) or results.get(i)
        if row is None or row["status"] not in ("completed", "failed"):
            row = disk_row(spec, output)
            row["by_other"] = row["status"] in ("completed", "failed")
        rows.append(row)
    return rows
