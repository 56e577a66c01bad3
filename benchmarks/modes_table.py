"""Displacement vs diffeomorphic x random / downsize / minipatch / hybrid on the shared brain pair.

Every row is one :func:`nir_lightning.register_pair` run (what ``nir register`` runs: same
configs, same outputs) with the same step budget; the hybrid rows switch from downsize to mini-patches halfway. Prints a
Markdown table of Dice, HD95, folding, inverse consistency and seconds, and writes it with the
raw metrics to ``--output`` (``results.md``, ``results.json``; each row's outputs in a subfolder).

    python benchmarks/modes_table.py --steps 400                      # the full table (slow on CPU)
    python benchmarks/modes_table.py --steps 5 --rows displacement/downsize,diffeomorphic/hybrid
    python benchmarks/modes_table.py --model.lam=20                   # any config override, every row

Run it alone on an idle machine: the seconds column is wall-clock time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # harness.methods.overrides_from_args
DATA = REPO.parent / "shared" / "data" / "brain-pair"
MODES = ("displacement", "diffeomorphic")
SAMPLERS = ("random", "downsize", "minipatch", "hybrid")


def row_configs(mode: str, sampler: str) -> list[str]:
    """Config files of one row. The displacement config always comes first, so the loss and
    optimiser settings are identical across rows and only the field / sampler / schedule change."""
    cfg = REPO / "configs"
    files = [cfg / "model" / "displacement.yaml"]
    if sampler == "hybrid":
        files.append(cfg / "model" / ("hybrid.yaml" if mode == "displacement" else "hybrid_diffeomorphic.yaml"))
    else:
        if mode == "diffeomorphic":
            files.append(cfg / "model" / "diffeomorphic.yaml")
        files.append(cfg / "sampler" / f"{sampler}.yaml")
    files.append(cfg / "trainer" / "cpu.yaml")
    return [str(f) for f in files]


def run_row(
    mode: str, sampler: str, *, steps: int, out: Path, seed: int, overrides: dict[str, str], threads: int | None
) -> dict[str, Any]:
    """One row: :func:`nir_lightning.register_pair` on the 2 mm brain pair; returns its metrics
    (``metrics.json``) plus ``seconds_row``."""
    from nir_lightning import register_pair

    pair = DATA / "2mm"
    t0 = time.perf_counter()
    result = register_pair(
        pair / "subjA_t1.nii.gz",
        pair / "subjB_t1.nii.gz",
        fixed_labels=pair / "subjA_aseg.nii.gz",
        moving_labels=pair / "subjB_aseg.nii.gz",
        labels=str(DATA / "labels30.tsv"),
        config=row_configs(mode, sampler),
        output=out / f"{mode}_{sampler}",
        overrides={"trainer.max_steps": steps, **overrides},
        seed=seed,
        threads=threads,
        overwrite=True,
    )
    metrics = dict(result.metrics)
    metrics["seconds_row"] = time.perf_counter() - t0
    return metrics


def _fmt(value: object, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[tuple[str, str, dict[str, Any]]], steps: int) -> str:
    lines = [
        "| field | sampler | Dice | HD95 (mm) | folding % | folding voxels | inverse consistency (mm) | fit s | total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, sampler, m in rows:
        lines.append(
            f"| {mode} | {sampler} | {_fmt(m.get('dice_after'), '.3f')} | {_fmt(m.get('hd95_after'), '.2f')} "
            f"| {_fmt(m.get('folding_percent'), '.3f')} | {_fmt(m.get('folding_count'), 'd')} "
            f"| {_fmt(m.get('inverse_consistency_mm'), '.4f')} | {_fmt(m.get('seconds_fit'), '.0f')} "
            f"| {_fmt(m.get('seconds_row'), '.0f')} |"
        )
    if rows:
        m = rows[0][2]
        lines.append("")
        lines.append(
            f"{steps} steps per row (hybrid: half downsize, half mini-patch); Dice before "
            f"{_fmt(m.get('dice_before'), '.3f')}, HD95 before {_fmt(m.get('hd95_before'), '.2f')} mm; "
            f"device {m.get('device')}, torch {m.get('torch_version')}, {os.cpu_count()} CPUs, "
            f"{_num_threads()} torch threads."
        )
    return "\n".join(lines)


def _num_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="optimisation steps per row (default 400, the default config)")
    p.add_argument("--rows", default="all", help="'all' or comma-separated MODE/SAMPLER, e.g. displacement/downsize,diffeomorphic/hybrid")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "modes"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as nir register chooses)")
    args, extra = p.parse_known_args(argv)
    from harness.methods import overrides_from_args

    try:
        overrides = overrides_from_args(extra)  # e.g. --model.lam=20: config overrides for every row
    except ValueError as exc:
        p.error(str(exc))
    if args.rows == "all":
        todo = [(m, s) for m in MODES for s in SAMPLERS]
    else:
        todo = []
        for item in args.rows.split(","):
            mode, _, sampler = item.strip().partition("/")
            if mode not in MODES or sampler not in SAMPLERS:
                p.error(f"unknown row {item!r}; modes {MODES}, samplers {SAMPLERS}")
            todo.append((mode, sampler))
    if not (DATA / "2mm" / "subjA_t1.nii.gz").exists():
        p.error(f"brain pair not found under {DATA}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from nir_lightning.io import write_json_atomic

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for mode, sampler in todo:
        print(f"== {mode} / {sampler}: {args.steps} steps", flush=True)
        metrics = run_row(mode, sampler, steps=args.steps, out=out, seed=args.seed, overrides=overrides, threads=args.threads)
        rows.append((mode, sampler, metrics))
        table = markdown(rows, args.steps)
        (out / "results.md").write_text(table + "\n")
        write_json_atomic(out / "results.json", [{"mode": m, "sampler": s, **{k: v for k, v in r.items() if k != "config"}} for m, s, r in rows])
    print()
    print(markdown(rows, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
