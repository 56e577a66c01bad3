"""The cohort table in W&B: one ``wandb.Table`` with the report's rows, QC figures and flags.

``wandb`` is imported when a table is logged, never at module import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nir_lightning.app.report.cohort import load_cohort
from nir_lightning.app.report.flags import cohort_flags, worst_first
from nir_lightning.app.report.table import METRIC_COLUMNS, cohort_rows

TABLE_KEY = "cohort/pairs"
"""Key of the table in the W&B run."""
TABLE_COLUMNS: tuple[str, ...] = ("id", "status", "severity", "flags", "fixed", "moving", *(c.key for c in METRIC_COLUMNS), "version", "message", "qc")


def _run_of(run_or_logger: Any) -> Any | None:
    """The W&B run of a ``WandbLogger`` (its ``experiment``) or a run; ``None`` for a disabled run."""
    run = getattr(run_or_logger, "experiment", run_or_logger)
    if run is None or getattr(run, "disabled", False):
        return None
    return run


def log_cohort_table(folder: str | Path, run_or_logger: Any, *, key: str = TABLE_KEY, images: bool = True) -> int:
    """Log the cohort of ``folder`` (see :func:`~nir_lightning.app.report.cohort.load_cohort`) as one
    W&B table, worst pairs first, to a W&B run or a Lightning ``WandbLogger``; returns the rows logged
    (0 when the run is disabled). With ``images`` the QC figure is an image column.

    Offline runs (``WANDB_MODE=offline``) write the table into the run folder for ``wandb sync``.
    """
    run = _run_of(run_or_logger)
    if run is None:
        return 0
    import wandb

    cohort = load_cohort(folder)
    flags = cohort_flags(cohort)
    rows = cohort_rows(cohort, flags, worst_first(cohort, flags))
    table = wandb.Table(columns=list(TABLE_COLUMNS))
    for r in rows:
        values: list[Any] = []
        for col in TABLE_COLUMNS:
            if col == "flags":
                values.append("\n".join(r["flag_text"]))
            elif col == "fixed":
                values.append(r["fixed_full"])
            elif col == "moving":
                values.append(r["moving_full"])
            elif col == "qc":
                values.append(wandb.Image(str(r["qc"])) if images and r["qc"] is not None else None)
            else:
                values.append(r[col])
        table.add_data(*values)
    run.log({key: table})
    return len(rows)
