"""``nir report DIR``: one self-contained HTML page over a cohort of registrations, bad ones on top.

* :func:`write_report` writes ``DIR/report.html`` (``nir register-many`` calls it at the end);
* :func:`log_cohort_table` logs the same rows to a W&B run;
* :func:`main` is the command.

The modules: :mod:`.cohort` reads the folders, :mod:`.flags` judges the pairs, :mod:`.table`
makes the rows, :mod:`.plots` the SVG plots, :mod:`.page` and :mod:`.assets` the page.
"""

from __future__ import annotations

from nir_lightning.app.report.cohort import Cohort, PairResult, load_cohort
from nir_lightning.app.report.command import REPORT_FILE, main, parser, write_report
from nir_lightning.app.report.flags import Flag, cohort_flags
from nir_lightning.app.report.wandb_table import log_cohort_table

__all__ = ["REPORT_FILE", "Cohort", "Flag", "PairResult", "cohort_flags", "load_cohort", "log_cohort_table", "main", "parser", "write_report"]
