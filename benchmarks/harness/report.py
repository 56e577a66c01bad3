"""Write a run's results: ``results.csv``, ``per_structure.csv``, ``results.md``, ``dice_vs_seconds.png``.

Ratios are to the **best peer of the same run and pair**: the peer (ANTs or FireANTs, never a
nir_lightning configuration) with the highest mean Dice. ``dice_ratio = dice_after / dice_after_best_peer``
(> 1: better than it), ``time_ratio = seconds_reg / seconds_reg_best_peer`` (< 1: faster).

Rows carry the metric keys of ``metrics.json`` (``dice_after``, ``hd95_after``, ``folding_percent``,
...; see :mod:`nir_lightning.evaluation.scoring`), so the CSV columns have the same names.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CSV_COLUMNS = [
    "pair", "method", "status", "device", "dice_after", "dice_onehot_linear", "dice_before", "hd95_after",
    "hd95_before", "folding_percent", "folding_count", "jacobian_det_min", "seconds_reg", "seconds_wall",
    "peak_rss_mb", "peak_cuda_mb", "dice_ratio", "time_ratio", "best_peer",
    "native_label_agreement", "dice_native", "dice_self_reported", "steps", "threads", "note",
]


def is_peer(method: str) -> bool:
    return not (method == "nir" or method.startswith("nir:"))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for pair in dict.fromkeys(r["pair"] for r in rows):
        peers = [r for r in rows if r["pair"] == pair and is_peer(r["method"]) and r["status"] == "ok" and _num(r.get("dice_after"))]
        best = max(peers, key=lambda r: r["dice_after"]) if peers else None
        for r in rows:
            if r["pair"] != pair or best is None or r["status"] != "ok":
                continue
            r["best_peer"] = best["method"]
            r["dice_ratio"] = r["dice_after"] / best["dice_after"] if best["dice_after"] else None
            r["time_ratio"] = r["seconds_reg"] / best["seconds_reg"] if best["seconds_reg"] else None


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if _num(x) else "–"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def write_per_structure(path: Path, rows: Sequence[dict[str, Any]], names: dict[int, str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "method", "label", "name", "dice_after", "dice_onehot_linear", "hd95_after"])
        for r in rows:
            for lab, d in (r.get("dice_per_label") or {}).items():
                w.writerow([r["pair"], r["method"], lab, names.get(int(lab), ""), "" if d is None else d,
                            _blank((r.get("dice_onehot_linear_per_label") or {}).get(lab)),
                            _blank((r.get("hd95_per_label") or {}).get(lab))])


def _blank(x: Any) -> Any:
    return "" if x is None else x


def markdown(rows: Sequence[dict[str, Any]], header: dict[str, Any], names: dict[int, str]) -> str:
    lines = [f"# Benchmark {header['date']}", ""]
    for key in ("command", "machine", "gpu", "threads", "git", "data", "label interpolation", "quick"):
        if header.get(key) not in (None, ""):
            lines.append(f"- **{key}**: {header[key]}")
    lines.append("")
    for pair in dict.fromkeys(r["pair"] for r in rows):
        prs = [r for r in rows if r["pair"] == pair]
        best = next((r.get("best_peer") for r in prs if r.get("best_peer")), None)
        lines += [f"## {pair}", ""]
        if best:
            b = next(r for r in prs if r["method"] == best)
            lines.append(f"Best peer (highest Dice): **{best}**, Dice {b['dice_after']:.3f} in {b['seconds_reg']:.1f} s. "
                         "Dice ratio > 1 = better than it; time ratio < 1 = faster.")
        before = next((r.get("dice_before") for r in prs if _num(r.get("dice_before"))), None)
        if before is not None:
            lines.append(f"Dice before registration: {before:.3f}.")
        lines += ["",
                  "| method | device | Dice (NN) | Dice (lin. one-hot) | HD95 mm | det J ≤ 0 % (count) | reg s | wall s | peak RSS MB | peak CUDA MB | Dice ratio | time ratio | own-warp agreement |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in prs:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r.get('device', '')} | {r['status']}: {r.get('note', '')} |" + " |" * 11)
                continue
            lines.append(
                f"| {r['method']} | {r['device']} | {_fmt(r.get('dice_after'), '.3f')} | {_fmt(r.get('dice_onehot_linear'), '.3f')} | "
                f"{_fmt(r.get('hd95_after'), '.2f')} | {_fmt(r.get('folding_percent'), '.4f')} ({r.get('folding_count', '–')}) | "
                f"{_fmt(r.get('seconds_reg'), '.1f')} | {_fmt(r.get('seconds_wall'), '.1f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | "
                f"{_fmt(r.get('peak_cuda_mb'), '.0f')} | {_fmt(r.get('dice_ratio'), '.3f')} | {_fmt(r.get('time_ratio'), '.3f')} | "
                f"{_fmt(100 * r['native_label_agreement'] if _num(r.get('native_label_agreement')) else None, '.2f')} % |"
            )
        ok = [r for r in prs if r["status"] == "ok" and r.get("dice_per_label")]
        if ok:
            lines += ["", "<details><summary>Dice per structure (nearest neighbour)</summary>", "",
                      "| label | structure | " + " | ".join(r["method"] for r in ok) + " |",
                      "|---|---|" + "---|" * len(ok)]
            for lab in ok[0]["dice_per_label"]:
                vals = [_fmt((r["dice_per_label"] or {}).get(lab), ".3f") for r in ok]
                lines.append(f"| {lab} | {names.get(int(lab), '')} | " + " | ".join(vals) + " |")
            lines += ["", "</details>"]
        lines.append("")
    lines += [
        (
            "Columns: Dice = mean over the label list of the moving labels warped by each method's field with "
            "nearest neighbour (one evaluation path: nir_lightning's metrics on every method's ITK/LPS "
            "displacement field); lin. one-hot = trilinear interpolation of one-hot maps + arg-max; HD95 = "
            "mean 95th-percentile Hausdorff distance (MONAI); det J ≤ 0 in the fixed foreground; reg s = "
            "registration call only; wall s = the whole method subprocess (imports, I/O, conversion); "
            "own-warp agreement = share of foreground voxels where our warp of the converted field equals "
            "the method's own nearest-neighbour warp (a conversion check; should be ~100 %)."
        ),
        "",
    ]
    return "\n".join(lines)


def plot(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and _num(r.get("dice_after")) and _num(r.get("seconds_reg"))]
    pairs = list(dict.fromkeys(r["pair"] for r in ok))
    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, pair in enumerate(pairs):
        prs = [r for r in ok if r["pair"] == pair]
        for r in prs:
            color = "tab:red" if not is_peer(r["method"]) else "tab:blue"
            ax.scatter(r["seconds_reg"], r["dice_after"], marker=markers[i % len(markers)], color=color, s=40, zorder=3)
            label = r["method"] if len(pairs) == 1 else f"{r['method']} ({pair})"
            ax.annotate(label, (r["seconds_reg"], r["dice_after"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if ok and max(r["seconds_reg"] for r in ok) / max(min(r["seconds_reg"] for r in ok), 1e-3) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("registration seconds")
    ax.set_ylabel("mean Dice (nearest-neighbour labels)")
    ax.set_title("Dice vs registration time (red: nir_lightning, blue: peers)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def label_names(tsv: str | None) -> dict[int, str]:
    """Label -> name from a TSV (first column label, second name; header allowed)."""
    names: dict[int, str] = {}
    if not tsv or not Path(tsv).is_file():
        return names
    for line in Path(tsv).read_text().splitlines():
        parts = line.replace(",", "\t").split("\t")
        try:
            names[int(parts[0])] = parts[1].strip() if len(parts) > 1 else ""
        except ValueError:
            continue
    return names
