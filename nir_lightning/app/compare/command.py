"""The ``nir compare`` command: :func:`main`."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence

from nir_lightning.app.compare.curves import CURVES, plot_curves
from nir_lightning.app.compare.pareto import check_pareto_folders, pareto_points, plot_pareto
from nir_lightning.app.compare.runs import COLUMNS, compare_table, format_table, load_runs


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
