#!/usr/bin/env python
"""The whole command, not just the fit: ``nir register`` and FireANTs greedy's whole script, each
as a subprocess timed from spawn to exit, on the same pairs and threads.

    python benchmarks/whole_command.py                          # the shared 2 mm pair
    python benchmarks/whole_command.py --pairs pairs.csv --threads 2 --out /tmp/whole
    python benchmarks/whole_command.py --mb /work/cache/mb/2mm  # consecutive mindboggle subjects, 2 mm

``--pairs``: a CSV with ``name,fixed,moving,fixed_labels,moving_labels[,labels]`` (paths relative
to the CSV), as for ``run_benchmark.py``. ``--mb DIR``: pairs of consecutive
``*_t1.nii.gz`` / ``*_labels.nii.gz`` files of a folder (``--mb-pairs`` of them).

Rows (seconds): ``wall`` of the subprocess; for nir, from its ``metrics.json``: ``startup``
(process start to the first fit step less the affine stage, or less the wait for it: imports,
parsing, loading), ``affine`` (the stage's own seconds), ``wait`` (when a second process ran the
stage during the imports, ``nir_lightning/app/early_affine.py``: how long the command waited for it), ``fit``, ``evaluate`` (the dense pass, warps, det J and scoring; ``scoring`` is its
label part: label warps, Dice, HD95), ``outputs`` (files and QC figure), ``total``
(``seconds_total``: from the call of ``register_pair`` to ``metrics.json``, the outputs
included), and ``wall - fit``, the price of the command
around the fit. FireANTs greedy: ``benchmarks/harness/methods.py``'s ``run_fireants`` in a fresh
interpreter (load both images, register with the harness settings, write the warp, warp the
labels), raw intensities, as ``run_benchmark.py --methods fireants-greedy`` runs it. The last
column is nir's wall over FireANTs' (target <= 0.5).

Run it alone on an idle machine (wall seconds); ``--threads`` fixes torch's and OpenMP's threads
in both subprocesses. On a shared machine, ``--cpus 1 --threads 1`` pins every subprocess to
core 1 (``taskset``). ``--before DIR`` also times ``nir register`` from another checkout (e.g.
``git worktree add /tmp/before <commit>``), interleaved with this one, ``--repeat`` times each:

    python benchmarks/whole_command.py --cpus 1 --threads 1 --no-fireants --before /tmp/before --repeat 2
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared" / "data" / "brain-pair"

NIR_KEYS = {
    "startup": "seconds_startup", "affine": "seconds_affine", "wait": "seconds_affine_wait", "fit": "seconds_fit", "evaluate": "seconds_evaluate",
    "scoring": "seconds_scoring", "outputs": "seconds_outputs",
}
COLUMNS = ["pair", "method", "wall", "startup", "affine", "wait", "fit", "evaluate", "scoring", "outputs", "total", "wall-fit", "wall/fireants", "steal %"]

FIREANTS_SCRIPT = """
import sys, torch
from pathlib import Path
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from harness.methods import run_fireants
run_fireants({spec!r}, Path({out!r}), syn=False)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", help="CSV: name,fixed,moving,fixed_labels,moving_labels[,labels] (default: the shared 2 mm pair)")
    p.add_argument("--mb", help="folder of *_t1.nii.gz / *_labels.nii.gz: pairs of consecutive subjects")
    p.add_argument("--mb-pairs", type=int, default=2, help="how many pairs --mb makes (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of both subprocesses (default 2)")
    p.add_argument("--out", default="/tmp/whole_command", help="output folder (results and whole_command.csv)")
    p.add_argument("--nir-args", default="", help="extra options of nir register, one string (e.g. '--trainer.max_steps=60')")
    p.add_argument("--no-fireants", action="store_true", help="time nir register only")
    p.add_argument("--before", help="a checkout of another commit: its nir register is timed too, interleaved with this one's")
    p.add_argument("--repeat", type=int, default=1, help="runs of nir register per pair (and per checkout); means in the last rows")
    p.add_argument("--cpus", help="run every subprocess under `taskset -c CPUS` (e.g. 1)")
    return p.parse_args(argv)


def read_pairs(args: argparse.Namespace) -> list[dict[str, str]]:
    """The pairs to run, each ``name, fixed, moving, fixed_labels, moving_labels, labels`` (labels may be '')."""
    if args.pairs:
        base = Path(args.pairs).resolve().parent
        with open(args.pairs, newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: (str((base / v).resolve()) if v and k in ("fixed", "moving", "fixed_labels", "moving_labels", "labels") else v or "")
                 for k, v in row.items() if k in ("name", "fixed", "moving", "fixed_labels", "moving_labels", "labels")} for row in rows]
    if args.mb:
        folder = Path(args.mb)
        subjects = sorted(p.name[: -len("_t1.nii.gz")] for p in folder.glob("*_t1.nii.gz"))
        return [{"name": f"{a}_{b}", "fixed": str(folder / f"{a}_t1.nii.gz"), "moving": str(folder / f"{b}_t1.nii.gz"),
                 "fixed_labels": str(folder / f"{a}_labels.nii.gz"), "moving_labels": str(folder / f"{b}_labels.nii.gz"), "labels": ""}
                for a, b in itertools.pairwise(subjects[: args.mb_pairs + 1])]
    d = SHARED / "2mm"
    return [{"name": "shared-2mm", "fixed": str(d / "subjA_t1.nii.gz"), "moving": str(d / "subjB_t1.nii.gz"),
             "fixed_labels": str(d / "subjA_aseg.nii.gz"), "moving_labels": str(d / "subjB_aseg.nii.gz"), "labels": str(SHARED / "labels30.tsv")}]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def timed(cmd: list[str], env: dict[str, str], log: Path, *, cwd: Path = REPO, cpus: str | None = None) -> tuple[float, float | None]:
    """Wall seconds of ``cmd`` from spawn to exit (its output into ``log``) and the CPU steal (%)
    meanwhile (:mod:`nir_lightning.app.host_load`; ``None`` off Linux); raises if it fails."""
    from nir_lightning.app.host_load import StealMeter

    log.parent.mkdir(parents=True, exist_ok=True)
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    with open(log, "w") as f, StealMeter() as steal:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
        wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({rc}); see {log}")
    return wall, steal.percent


def run_nir(pair: dict[str, str], out: Path, args: argparse.Namespace, *, tree: Path | None = None, run: int = 0) -> dict[str, Any]:
    """One ``nir register`` of ``pair``: from this checkout, or from ``tree`` (another one)."""
    tag = ("before" if tree is not None else "nir") + (f"_{run}" if args.repeat > 1 else "")
    folder = out / tag / pair["name"]
    env = child_env(args.threads)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "nir_lightning.cli", "register", "--fixed", pair["fixed"], "--moving", pair["moving"],
           "--output", str(folder), "--overwrite", "--threads", str(args.threads), "--progress", "line"]
    if pair.get("fixed_labels"):
        cmd += ["--fixed-labels", pair["fixed_labels"], "--moving-labels", pair["moving_labels"]]
    if pair.get("labels"):
        cmd += ["--labels", pair["labels"]]
    cmd += shlex.split(args.nir_args)
    wall, steal = timed(cmd, env, out / "logs" / f"{tag}_{pair['name']}.log", cwd=tree or REPO, cpus=args.cpus)
    m = json.loads((folder / "metrics.json").read_text())
    method = "nir register" + (" (before)" if tree is not None else "")
    row: dict[str, Any] = {"pair": pair["name"], "method": method, "wall": wall, "steal %": steal}
    row.update({col: m.get(key) for col, key in NIR_KEYS.items()})
    row["total"] = m["seconds_total"]
    row["wall-fit"] = wall - m["seconds_fit"]
    row["dice_after"] = m.get("dice_after")
    return row


def run_fireants(pair: dict[str, str], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    folder = out / "fireants-greedy" / pair["name"]
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"fixed": pair["fixed"], "moving": pair["moving"], "moving_labels": pair["moving_labels"], "device": "cpu"}
    script = FIREANTS_SCRIPT.format(bench=str(BENCH), threads=args.threads, spec=spec, out=str(folder))
    wall, steal = timed([sys.executable, "-c", script], child_env(args.threads), out / "logs" / f"fireants_{pair['name']}.log", cpus=args.cpus)
    return {"pair": pair["name"], "method": "FireANTs greedy (whole script)", "wall": wall, "steal %": steal}


def mean_row(runs: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """The mean of ``method``'s runs, column by column."""
    mine = [r for r in runs if r["method"] == method]
    row: dict[str, Any] = {"pair": mine[0]["pair"], "method": f"{method}, mean of {len(mine)}"}
    for col in [*COLUMNS[2:], "dice_after"]:
        if col == "wall/fireants":
            continue
        values = [r.get(col) for r in mine]
        row[col] = None if any(v is None for v in values) else sum(values) / len(values)
    return row


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    before = Path(args.before).resolve() if args.before else None
    for pair in read_pairs(args):
        runs: list[dict[str, Any]] = []
        for run in range(args.repeat):  # interleaved: before, this checkout, before, ...
            if before is not None:
                runs.append(run_nir(pair, out, args, tree=before, run=run))
            runs.append(run_nir(pair, out, args, run=run))
            print(table(runs[-2:] if before is not None else runs[-1:]), flush=True)
        if args.repeat > 1:
            runs += [mean_row(runs, method) for method in dict.fromkeys(r["method"] for r in runs)]
        rows += runs
        if not args.no_fireants and pair.get("moving_labels"):
            fa = run_fireants(pair, out, args)
            for r in runs:
                r["wall/fireants"] = r["wall"] / fa["wall"]
            rows.append(fa)
            print(table([fa]), flush=True)
    with open(out / "whole_command.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "dice_after"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads, `python benchmarks/whole_command.py "
          f"{shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(table(rows))
    print(f"\nwrote {out / 'whole_command.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
