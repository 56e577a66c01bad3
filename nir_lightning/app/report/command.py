"""The ``nir report`` command and :func:`write_report`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from nir_lightning.app.report.cohort import load_cohort
from nir_lightning.app.report.flags import cohort_flags
from nir_lightning.app.report.page import render
from nir_lightning.errors import InputError
from nir_lightning.io import write_text_atomic

REPORT_FILE = "report.html"


def write_report(folder: str | Path, *, labels_tsv: str | Path | None = None, output: str | Path | None = None) -> Path:
    """Write the cohort report of ``folder`` (a register-many output, or a folder of ``nir register``
    results) to ``output`` (default ``folder/report.html``), atomically; returns its path.

    ``labels_tsv`` names the structures of the per-structure plot (default: the ``--labels`` TSV
    the runs were given, if it is still there). Raises :class:`InputError` for a missing folder or
    one without any result.
    """
    cohort = load_cohort(folder)
    page = Path(output) if output is not None else cohort.folder / REPORT_FILE
    if page.is_dir():
        raise InputError(f"--output '{page}' is a folder; give the HTML file to write, e.g. '{page / REPORT_FILE}'.")
    if not page.parent.is_dir():
        raise InputError(f"--output '{page}': its folder '{page.parent}' does not exist.")
    html = render(cohort, cohort_flags(cohort), page=page, labels_tsv=labels_tsv)
    write_text_atomic(page, html)
    return page


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nir report",
        description="Write one self-contained HTML report (summary, flagged pairs worst first, plots, a sortable table with QC figures) "
        "over a `nir register-many` output folder or any folder of `nir register` results. Works while register-many is still running: "
        "unfinished pairs are shown as pending.",
        epilog="Exit status: 0 written, 2 bad input (missing folder, no results).",
        allow_abbrev=False,
    )
    p.add_argument("folder", help="register-many --output folder (or a folder of nir register outputs)")
    p.add_argument("--labels", help="TSV naming the labels (first column the label value, second its name) for the per-structure plot")
    p.add_argument("--output", help="HTML file to write (default FOLDER/report.html)")
    return p


def main(argv: Sequence[str]) -> int:
    """Entry for ``nir report``."""
    args = parser().parse_args(list(argv))
    if not Path(args.folder).is_dir():
        what = "does not exist" if not Path(args.folder).exists() else "is not a folder"
        raise InputError(f"report folder '{args.folder}' {what}: give the --output folder of `nir register-many` (or a folder of `nir register` results).")
    if args.labels is not None and not Path(args.labels).is_file():
        raise InputError(f"--labels '{args.labels}' not found: give a TSV whose first column is the label value and second its name.")
    page = write_report(args.folder, labels_tsv=args.labels, output=args.output)
    print(f"nir report: {page}", flush=True)
    return 0
