#!/usr/bin/env python
"""Merge the results of several ``run_benchmark.py`` runs into one report (tables, Pareto figure).

ANTs SyN takes 5-10 minutes a pair on 2 cores, so a sweep is often run as several invocations
(e.g. ANTs in one, nir and FireANTs in another). This reads their ``results.csv`` files, keeps
the rows of the methods asked for, and writes what ``run_benchmark.py`` writes for one run:
``results.csv``, ``summary.csv``, ``pareto.csv``, ``pareto.png``, ``results.md``. Means are over
the pairs every kept method finished, as in one run. Seconds from different invocations are only
comparable when the machine was equally idle: say so when quoting them.

    python benchmarks/merge_results.py OUT RUN_DIR [RUN_DIR ...] [--methods 'nir,ants,...'] [--pairs 's15-s16,...']
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def _value(text: str) -> Any:
    """A CSV cell as the number it holds, else the text (empty: ``None``).

    >>> _value("3"), _value("0.5"), _value(""), _value("ok")
    (3, 0.5, None, 'ok')
    """
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_rows(folders: list[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for folder in folders:
        path = folder / "results.csv"
        if not path.is_file():
            sys.exit(f"merge_results: {path} not found (a run_benchmark.py output folder holds results.csv)")
        with open(path, newline="") as f:
            rows += [{k: _value(v) for k, v in r.items()} | {"source": str(folder)} for r in csv.DictReader(f)]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="merge_results.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder")
    p.add_argument("runs", nargs="+", help="run_benchmark.py output folders")
    p.add_argument("--methods", help="comma-separated methods to keep (default: all)")
    p.add_argument("--pairs", help="comma-separated pairs to keep (default: all)")
    args = p.parse_args(argv)
    from harness.report import (
        add_ratios,
        markdown,
        pareto,
        plot_pareto,
        summarize,
        write_csv,
        write_pareto,
        write_summary,
    )

    rows = read_rows([Path(r) for r in args.runs])
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        rows = [r for r in rows if r["method"] in keep]
    if args.pairs:
        keep = {x.strip() for x in args.pairs.split(",")}
        rows = [r for r in rows if r["pair"] in keep]
    seen: set[tuple[str, str]] = set()
    for r in rows:  # one row per pair and method: a later run does not silently replace an earlier one
        key = (str(r["pair"]), str(r["method"]))
        if key in seen:
            sys.exit(f"merge_results: pair {key[0]} / method {key[1]} appears in two runs; keep one with --methods/--pairs")
        seen.add(key)
    if not rows:
        sys.exit("merge_results: no rows left to merge")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    add_ratios(rows)
    import datetime as dt

    header = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M") + " (merged)", "command": "python benchmarks/merge_results.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "data": "runs " + ", ".join(args.runs) + " (merged from several invocations: compare seconds only within one)"}
    write_csv(out / "results.csv", rows)
    write_summary(out / "summary.csv", summarize(rows))
    result = pareto(rows)
    write_pareto(out / "pareto.csv", result)
    plot_pareto(out / "pareto.png", result)
    md = markdown(rows, header, {})
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
