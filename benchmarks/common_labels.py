#!/usr/bin/env python
"""Score the fields of several ``run_benchmark.py`` runs on one set of label maps.

A run at 2 mm is scored on 2 mm label maps and a run at 1 mm on 1 mm ones, so their Dice are not
comparable: a block-majority 2 mm label map has fewer, larger boundary voxels, and the same
deformation scores higher on it (more so with label interpolation). This script takes each run's
``displacement.nii.gz`` (the ITK convention the harness scores, affine stage included), reads it in
world space on whatever grid it lies, and warps the label maps of ``--pairs`` (for example the 1 mm
ones) through it with one interpolation, as ``antsApplyTransforms`` would: nearest neighbour and
label interpolation (each label's indicator trilinear, then the arg-max). Dice is the harness's
(:func:`nir_lightning.evaluation.metrics.mean_dice` over the labels both subjects share, or the
``labels`` column's list).

    python benchmarks/common_labels.py --pairs rp1mm.csv --method nir RUN_2MM RUN_1MM

``RUN`` is a ``run_benchmark.py`` output folder (``RUN/PAIR/METHOD/displacement.nii.gz``). A pair
``s15-s16_1mm`` of ``--pairs`` is looked up in a run as ``s15-s16_1mm``, else as ``s15-s16`` (the
name up to its last ``_``). Prints one row per pair and run, then the means, as a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

if TYPE_CHECKING:
    from nir_lightning.data.pair import ImagePair

__all__ = ["find_result", "find_results", "score_on_labels"]


def find_result(run: Path, pair: str, method: str) -> Path:
    """The folder of ``method``'s result for ``pair`` in ``run``: ``run/pair/method``, else the
    pair's name without its last ``_`` suffix (``s15-s16_1mm`` -> ``s15-s16``).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); (d / "s1-s2" / "nir").mkdir(parents=True)
    >>> find_result(d, "s1-s2_1mm", "nir").relative_to(d).as_posix()
    's1-s2/nir'
    """
    folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
    names = [pair] + ([pair.rsplit("_", 1)[0]] if "_" in pair else [])
    for name in names:
        path = run / name / folder
        if (path / "displacement.nii.gz").is_file():
            return path
    raise FileNotFoundError(
        f"common_labels: no {folder}/displacement.nii.gz for pair '{pair}' under {run} (tried {', '.join(names)}); "
        "pass run_benchmark.py output folders that ran this method on these pairs"
    )


def find_results(runs: list[Path], names: list[str], methods: list[str]) -> dict[tuple[str, str, str], Path]:
    """:func:`find_result` for every run, pair name and method, keyed ``(str(run), name, method)``:
    all looked up before any slow scoring, so a missing one stops the script at once with its
    message (``SystemExit``)."""
    try:
        return {(str(run), name, m): find_result(run, name, m) for name in names for run in runs for m in methods}
    except FileNotFoundError as exc:
        sys.exit(str(exc))


def score_on_labels(result: Path, pair: ImagePair) -> dict[str, float]:
    """Dice (nearest neighbour and label interpolation) of ``pair``'s moving labels warped onto its
    fixed grid through ``result/displacement.nii.gz``, wherever that field's grid lies.

    ``pair``: :func:`harness.score.load_eval_pair`'s (its moving labels on their own grid).
    """
    from harness.score import load_field, moving_labels_through

    from nir_lightning.core.transform_chain import DisplacementStep
    from nir_lightning.evaluation.metrics import dice_per_label, mean_dice

    disp, affine = load_field(str(result / "displacement.nii.gz"))
    chain = [DisplacementStep(disp_ras_mm=disp, affine=affine)]
    assert pair.fixed_labels is not None
    fixed = pair.fixed_labels[0, 0].cpu()
    return {key: mean_dice(dice_per_label(moving_labels_through(pair, chain, mode), fixed, pair.labels))
            for key, mode in (("dice_nn", "nearest"), ("dice_label", "label"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="common_labels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run_benchmark.py output folders")
    p.add_argument("--pairs", required=True, type=Path, help="CSV of the label maps to score on (run_benchmark.py's format)")
    p.add_argument("--method", default="nir", help="the method's folder name in each run (default nir)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from harness.pairs import read_pairs_csv
    from harness.score import load_eval_pair

    torch.set_num_threads(args.threads)
    pairs = read_pairs_csv(args.pairs, prog="common_labels")
    results = find_results(args.runs, [row["name"] for row in pairs], [args.method])
    print("| pair | run | Dice NN | Dice label interp. |\n|---|---|---|---|")
    means: dict[str, list[tuple[float, float]]] = {}
    for row in pairs:
        name = row["name"]
        pair = load_eval_pair(row["fixed"], row["moving"], row["fixed_labels"], row["moving_labels"], row["labels"])
        for run in args.runs:
            s = score_on_labels(results[(str(run), name, args.method)], pair)
            means.setdefault(str(run), []).append((s["dice_nn"], s["dice_label"]))
            print(f"| {name} | {run} | {s['dice_nn']:.4f} | {s['dice_label']:.4f} |", flush=True)
    for run, values in means.items():
        n = len(values)
        print(f"| **mean of {n}** | {run} | {sum(v[0] for v in values) / n:.4f} | {sum(v[1] for v in values) / n:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
