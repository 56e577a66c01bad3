#!/usr/bin/env python
"""Every method's field smoothed by the same Gaussians: Dice against SDlogJ, one knob for all.

Issue 24 compares methods at equal regularity through each method's own knob (nir's ``alpha``,
SyN's ``flow_sigma`` / ``total_sigma``, FireANTs' ``smooth_warp_sigma``), which differ in kind. This
script adds one knob applied alike to every method: each ``displacement.nii.gz`` of a
``run_benchmark.py`` run (the whole chain, affine stage included), every component convolved
with a Gaussian of ``sigma`` fixed voxels (SyN's ``total_sigma`` done once, after the fit), then
scored by the harness (:func:`harness.score.score_field`: Dice with nearest neighbour and label
interpolation, SDlogJ and det J <= 0 in the fixed foreground). The field's least-squares affine part
is taken out before the convolution and added back after it, so an affine field comes out
unchanged and the volume's border (``nearest`` padding) bends only the deformable part.

    python benchmarks/smoothed_fields.py RUN --pairs rp12.csv --methods nir,ants,fireants-greedy --sigmas 0,0.5,1

Prints the means by method and sigma as a Markdown table, then each method's curve read at the
SDlogJ of every method's unsmoothed field (linear between the two sigmas around it; blank outside
the curve): which method is ahead when both are as regular; then the harness's own dominance
lines (:func:`harness.report.dominance`: is each nir curve above each peer's wherever both are
defined, and by how little at worst). ``--plot curves.png`` draws the curves with the harness's
Pareto figure (a line per method, a point per sigma).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

__all__ = ["curve_at", "smooth_field"]


def smooth_field(disp: np.ndarray, sigma: float) -> np.ndarray:
    """``disp`` ``(X, Y, Z, 3)`` with each component's non-affine part smoothed by a Gaussian of
    ``sigma`` voxels (truncated at 4 sigma, ``nearest`` padding); ``sigma`` 0 returns ``disp``.

    The affine part (the least-squares fit of ``disp`` as a linear function of the voxel indices)
    is kept as it is: a Gaussian leaves a linear function unchanged away from the border, and
    this way near it too.

    >>> i, j, k = np.meshgrid(*(np.arange(6.0),) * 3, indexing="ij")
    >>> affine = np.stack([0.1 * i + 2, 0.2 * j - 0.3 * k, np.ones_like(i)], -1)
    >>> bool(np.allclose(smooth_field(affine, 1.0), affine, atol=1e-6))
    True
    >>> bump = affine.copy(); bump[3, 3, 3, 0] += 1
    >>> round(float(smooth_field(bump, 1.0)[3, 3, 3, 0] - affine[3, 3, 3, 0]), 3)
    0.064
    """
    if sigma <= 0:
        return disp
    from scipy.ndimage import gaussian_filter

    shape = disp.shape[:3]
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    design = np.concatenate([idx, np.ones((idx.shape[0], 1))], 1)
    flat = disp.reshape(-1, 3).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, flat, rcond=None)
    linear = (design @ coef).reshape(*shape, 3)
    rest = disp.astype(np.float64) - linear
    out = np.stack([gaussian_filter(rest[..., c], sigma, mode="nearest", truncate=4.0) for c in range(3)], -1)
    return (out + linear).astype(disp.dtype)


def curve_at(points: Sequence[tuple[float, float]], sdlogj: float) -> float | None:
    """The value of a curve of ``(sdlogj, dice)`` points at ``sdlogj``, linear between the two
    points around it (the harness's :func:`harness.report.interp_curve`); ``None`` outside the
    curve's range.

    >>> curve_at([(0.27, 0.57), (0.32, 0.60), (0.35, 0.61)], 0.335)
    0.605
    >>> curve_at([(0.27, 0.57), (0.35, 0.61)], 0.38) is None
    True
    """
    from harness.report import interp_curve

    pts = sorted(points)
    if not pts or not pts[0][0] <= sdlogj <= pts[-1][0]:
        return None
    return round(interp_curve(pts, sdlogj), 12)


def _setting(method: str, sigma: float) -> str:
    """The harness's method-setting name of ``method`` smoothed by ``sigma`` (``nir@smooth=0.5``)."""
    return method if sigma == 0 else f"{method}@smooth={sigma:g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoothed_fields.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run_benchmark.py output folder (RUN/PAIR/METHOD/displacement.nii.gz)")
    p.add_argument("--pairs", required=True, type=Path, help="the CSV the run was made from (run_benchmark.py's format)")
    p.add_argument("--methods", default="nir,ants,fireants-greedy", help="comma-separated method folders (default %(default)s)")
    p.add_argument("--sigmas", default="0,0.5,1", help="Gaussian sigmas in fixed voxels, comma-separated (default %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", type=Path, help="also draw Dice against SDlogJ, a line per method, into this PNG")
    args = p.parse_args(argv)
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        sys.exit(f"smoothed_fields: --sigmas must be numbers separated by commas, got '{args.sigmas}'")
    if not sigmas or min(sigmas) < 0:
        sys.exit(f"smoothed_fields: --sigmas must be >= 0 voxels, got '{args.sigmas}'")
    methods = [m for m in args.methods.split(",") if m]

    import torch
    from common_labels import find_results
    from harness.pairs import read_pairs_csv
    from harness.score import load_eval_pair, load_field, score_field

    torch.set_num_threads(args.threads)
    pairs = read_pairs_csv(args.pairs, prog="smoothed_fields")
    found = find_results([args.run], [row["name"] for row in pairs], methods)
    rows: list[dict[str, object]] = []  # the harness's result rows, one per pair, method and sigma
    print("| pair | method | sigma | Dice NN | Dice label interp. | SDlogJ | det J <= 0 |\n|---|---|---|---|---|---|---|")
    for row in pairs:
        name = row["name"]
        pair = load_eval_pair(row["fixed"], row["moving"], row["fixed_labels"], row["moving_labels"], row["labels"])
        for m in methods:
            disp, affine = load_field(str(found[(str(args.run), name, m)] / "displacement.nii.gz"))
            for s in sigmas:
                met = score_field(smooth_field(disp, s), affine, pair, hd95=False, onehot=True).metrics
                row_scores = (met["dice_after"], met["dice_onehot_linear"], met["sdlogj"], int(met["folding_count"]))
                rows.append({"pair": name, "method": _setting(m, s), "status": "ok", "dice_after": row_scores[0],
                             "dice_onehot_linear": row_scores[1], "sdlogj": row_scores[2], "folding_count": row_scores[3],
                             "folding_percent": float(met["folding_percent"]), "seconds_reg": None})
                print(f"| {name} | {m} | {s:g} | {row_scores[0]:.4f} | {row_scores[1]:.4f} | {row_scores[2]:.3f} | {row_scores[3]} |", flush=True)
    from harness.report import PARETO_METRICS, dominance, pareto, plot_pareto

    result = pareto(rows)  # the harness's means per method setting, over the pairs every one finished
    by_method = {r["method"]: r for r in result.rows}
    keys = ("dice_after", "dice_onehot_linear", "sdlogj", "folding_count_total")
    mean = {(m, s): tuple(by_method[_setting(m, s)][k] for k in keys) for m in methods for s in sigmas}
    print(f"\n| means of {len(pairs)} pairs: method | sigma (voxels) | Dice NN | Dice label interp. | SDlogJ | det J <= 0 |\n|---|---|---|---|---|---|")
    for m in methods:
        for s in sigmas:
            nn, li, sd, folds = mean[(m, s)]
            print(f"| {m} | {s:g} | {nn:.4f} | {li:.4f} | {sd:.3f} | {int(folds)} |")
    unsmoothed = min(sigmas)
    print("\n| curve | " + " | ".join(f"at {m}'s SDlogJ ({mean[(m, unsmoothed)][2]:.3f})" for m in methods) + " |")
    print("|---|" + "---|" * len(methods))
    for m in methods:
        cells = []
        for other in methods:
            at = mean[(other, unsmoothed)][2]
            nn = curve_at([(mean[(m, s)][2], mean[(m, s)][0]) for s in sigmas], at)
            li = curve_at([(mean[(m, s)][2], mean[(m, s)][1]) for s in sigmas], at)
            cells.append("" if nn is None or li is None else f"{nn:.4f} ({li:.4f})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    statements = [d.sentence() for metric in PARETO_METRICS for d in dominance(result, metric)]
    if statements:  # the harness's own check: is each nir curve above each peer's where both are defined?
        print("\n" + "\n".join(f"- {line}" for line in statements))
    if args.plot is not None:
        plot_pareto(args.plot, result)
        print(f"\n{args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
