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

The modules: :mod:`.runs` reads the run folders and makes the table, :mod:`.curves` plots the
curves, :mod:`.pareto` the Dice-vs-SDlogJ scatter, and :mod:`.command` is ``nir compare``.
"""

from __future__ import annotations

from nir_lightning.app.compare.command import main
from nir_lightning.app.compare.curves import CURVES, plot_curves, run_styles
from nir_lightning.app.compare.pareto import (
    PARETO_PANELS,
    PARETO_X,
    ParetoPoint,
    check_pareto_folders,
    pareto_points,
    pareto_value,
    plot_pareto,
)
from nir_lightning.app.compare.runs import (
    COLUMNS,
    CONFIG_COLUMNS,
    EmptyRunFolderError,
    RunRecord,
    compare_table,
    format_table,
    load_run,
    load_runs,
    read_metrics_csv,
)

__all__ = [
    "COLUMNS",
    "CONFIG_COLUMNS",
    "CURVES",
    "PARETO_PANELS",
    "PARETO_X",
    "EmptyRunFolderError",
    "ParetoPoint",
    "RunRecord",
    "check_pareto_folders",
    "compare_table",
    "format_table",
    "load_run",
    "load_runs",
    "main",
    "pareto_points",
    "pareto_value",
    "plot_curves",
    "plot_pareto",
    "read_metrics_csv",
    "run_styles",
]
