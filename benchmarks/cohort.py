#!/usr/bin/env python
"""A cohort through ``nir register-many``: one process against worker processes, same pairs.

    python benchmarks/cohort.py --pairs cohort.csv                       # --workers 1 (all threads) vs auto, twice each
    python benchmarks/cohort.py --pairs cohort.csv --modes 1,2,auto --threads 2 --repeat 3

``--pairs``: a ``register-many`` CSV (``fixed,moving[,fixed_labels,moving_labels,id]``, paths
relative to it). Each mode is one ``nir register-many`` subprocess, timed from spawn to exit, the
modes interleaved ``--repeat`` times: ``1`` is one process on ``--threads`` threads (default: every
usable core), ``N`` is ``--workers N``, ``auto`` is the default (``--workers auto``). Printed per
run: the workers and threads the command chose, the wall seconds, the sum of the pairs' fits
(``seconds_fit``) and of their totals (``seconds_total``), the mean Dice, the wall over the
one-process run of the same round, and whether every pair's NIfTI files and ``affine.mat`` are
those of the first one-process run, byte for byte (decompressed). The last lines check issue 25's
target: the wall within the sum of the one-process fits + 2 s a pair + one start-up.

Run it alone on an idle machine: the figures are wall-clock.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nir_lightning.app.host_load import StealMeter

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, help="register-many CSV")
    p.add_argument("--modes", default="1,auto", help="comma-separated: 1 (one process), N (--workers N), auto (default: 1,auto)")
    p.add_argument("--threads", type=int, default=None, help="threads of the one-process mode (default: every usable core)")
    p.add_argument("--repeat", type=int, default=2, help="rounds of the modes, interleaved (default 2)")
    p.add_argument("--out", default="/tmp/nir_cohort", help="output folder (one subfolder per run)")
    p.add_argument("--nir-args", default="", help="extra options of register-many, one string (e.g. '--trainer.max_steps=60')")
    return p.parse_args(argv)


def command(args: argparse.Namespace, mode: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "nir_lightning.cli", "register-many", "--pairs", str(Path(args.pairs).resolve()), "--output", str(out)]
    if mode == "1":
        threads = args.threads
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cmd += ["--workers", "1", "--threads", str(threads)]
    elif mode != "auto":
        cmd += ["--workers", mode]
    return cmd + args.nir_args.split()


def pair_metrics(out: Path) -> dict[str, dict[str, Any]]:
    with open(out / "summary.csv", newline="") as f:
        ids = [row["id"] for row in csv.DictReader(f) if row["status"] == "completed"]
    return {i: json.loads((out / i / "metrics.json").read_text()) for i in ids}


def same_files(a: Path, b: Path, ids: list[str]) -> bool:
    """Every ``*.nii.gz`` (decompressed) and ``affine.mat`` of each pair identical in ``a`` and ``b``."""
    for i in ids:
        names = sorted(p.name for p in (a / i).iterdir() if p.name.endswith(".nii.gz") or p.name == "affine.mat")
        if names != sorted(p.name for p in (b / i).iterdir() if p.name.endswith(".nii.gz") or p.name == "affine.mat"):
            return False
        if any(_content(a / i / name) != _content(b / i / name) for name in names):
            return False
    return True


def _content(path: Path) -> bytes:
    if path.name.endswith(".gz"):
        with gzip.open(path) as f:
            return f.read()
    return path.read_bytes()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m != "auto" and not m.isdigit()]
    if bad or not modes:
        sys.exit(f"--modes: each mode is 1, a worker count or auto; got {args.modes!r}")
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    rows: list[dict[str, Any]] = []
    reference: Path | None = None
    for rnd in range(1, args.repeat + 1):
        one_wall: float | None = None
        for mode in modes:
            out = root / f"{mode}_{rnd}"
            shutil.rmtree(out, ignore_errors=True)
            log = root / f"{mode}_{rnd}.log"
            t0 = time.perf_counter()
            with open(log, "w") as f, StealMeter() as steal:
                rc = subprocess.run(command(args, mode, out), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False).returncode
            wall = time.perf_counter() - t0
            text = log.read_text()
            chose = re.search(r"(\d+) worker processes of (\d+) thread", text)
            metrics = pair_metrics(out) if (out / "summary.csv").is_file() else {}
            threads = sorted({m.get("torch_threads") for m in metrics.values()})
            if mode == "1":
                one_wall = wall
                reference = reference or out
            dice = [m["dice_after"] for m in metrics.values() if m.get("dice_after") is not None]
            rows.append({
                "mode": mode, "round": rnd, "rc": rc, "workers": int(chose.group(1)) if chose else 1, "threads": threads,
                "wall": wall, "fits": sum(m["seconds_fit"] for m in metrics.values()),
                "totals": sum(m["seconds_total"] for m in metrics.values()), "pairs": len(metrics),
                "startup": min((m.get("seconds_startup", 0.0) for m in metrics.values()), default=0.0),
                "dice": sum(dice) / len(dice) if dice else float("nan"),
                "vs_one": wall / one_wall if one_wall else float("nan"),
                "same": same_files(reference, out, list(metrics)) if reference is not None else None,
                "steal": steal.percent,
            })
            r = rows[-1]
            print(f"round {rnd}, mode {mode}: {r['workers']} process(es), threads {threads}, wall {wall:.1f} s, rc {rc}", flush=True)
    print("\n| mode | round | processes x threads | wall s | fits summed | totals summed | mean Dice | wall / one process | files as one process | CPU steal % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = "-" if r["same"] is None else ("yes" if r["same"] else "**no**")
        print(f"| {r['mode']} | {r['round']} | {r['workers']} x {'/'.join(str(t) for t in r['threads'])} | {r['wall']:.1f} | {r['fits']:.1f} | "
              f"{r['totals']:.1f} | {r['dice']:.4f} | {r['vs_one']:.2f} | {same} | {'-' if r['steal'] is None else format(r['steal'], '.0f')} |")
    ones = [r for r in rows if r["mode"] == "1" and r["pairs"]]
    if ones:
        fits = sum(r["fits"] for r in ones) / len(ones)
        startup = sum(r["startup"] for r in ones) / len(ones)
        budget = fits + 2.0 * ones[0]["pairs"] + startup
        print(f"\nissue 25's register-many target: wall <= one-process fits {fits:.1f} + 2 s x {ones[0]['pairs']} pairs + start-up {startup:.1f} = {budget:.1f} s")
        for r in rows:
            print(f"  mode {r['mode']} round {r['round']}: {r['wall']:.1f} s {'<=' if r['wall'] <= budget else '>'} {budget:.1f}")
    return 0 if all(r["rc"] == rows[0]["rc"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
