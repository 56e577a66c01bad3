"""Write a run's results: ``results.csv``, ``per_structure.csv``, ``summary.csv``, ``results.md``, ``dice_vs_seconds.png``.

Per pair, ratios are to the **best peer of the same run and pair**: the peer (ANTs or FireANTs, never a
nir_lightning configuration) with the highest mean Dice. ``dice_ratio = dice_after / dice_after_best_peer``
(> 1: better than it), ``time_ratio = seconds_reg / seconds_reg_best_peer`` (< 1: faster).

Rows carry the metric keys of ``metrics.json`` (``dice_after``, ``hd95_after``, ``folding_percent``,
...; see :mod:`nir_lightning.evaluation.scoring`), so the CSV columns have the same names.

Over several pairs, :func:`summarize` gives each method's means over the pairs that *every* method
finished (``summary.csv``, the first table of ``results.md``), so that all methods are averaged
over the same pairs, and each method's lead over each peer: ``dice_minus_PEER`` (mean Dice minus
the peer's) and ``time_ratio_PEER`` (mean registration seconds over the peer's).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CSV_COLUMNS = [
    "pair",
    "method",
    "status",
    "device",
    "dice_after",
    "dice_onehot_linear",
    "dice_before",
    "hd95_after",
    "hd95_before",
    "folding_percent",
    "folding_count",
    "jacobian_det_min",
    "sdlogj",
    "seconds_reg",
    "seconds_wall",
    "peak_rss_mb",
    "peak_cuda_mb",
    "dice_ratio",
    "time_ratio",
    "best_peer",
    "native_label_agreement",
    "dice_native",
    "dice_self_reported",
    "steps",
    "threads",
    "note",
]


SUMMARY_MEANS = ("dice_after", "dice_onehot_linear", "folding_percent", "sdlogj", "seconds_reg")
"""Row keys whose mean over the common pairs :func:`summarize` reports under the same name."""


def is_peer(method: str) -> bool:
    """A method nir_lightning is compared with (anything but ``nir`` and ``nir:NAME``)."""
    return not (method == "nir" or method.startswith("nir:"))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for pair in dict.fromkeys(r["pair"] for r in rows):
        peers = [
            r
            for r in rows
            if r["pair"] == pair and is_peer(r["method"]) and r["status"] == "ok" and _num(r.get("dice_after"))
        ]
        best = max(peers, key=lambda r: r["dice_after"]) if peers else None
        for r in rows:
            if r["pair"] != pair or best is None or r["status"] != "ok":
                continue
            r["best_peer"] = best["method"]
            r["dice_ratio"] = r["dice_after"] / best["dice_after"] if best["dice_after"] else None
            r["time_ratio"] = r["seconds_reg"] / best["seconds_reg"] if best["seconds_reg"] else None


@dataclass
class Summary:
    """What :func:`summarize` returns.

    Attributes:
        rows: one per method that ran: ``method``, ``pairs`` (how many), the means of
            :data:`SUMMARY_MEANS`, ``folding_percent_max`` and, per peer ``P`` other than the
            method itself, ``dice_minus_P`` and ``time_ratio_P``; ``None`` where a value is missing.
        peers: the peers, in the order of the rows.
        pairs: the pairs averaged over.
        dropped: pair -> which methods did not finish it ``ok`` (left out of every mean).
    """

    rows: list[dict[str, Any]]
    peers: list[str]
    pairs: list[str]
    dropped: dict[str, str]

    def columns(self) -> list[str]:
        """``summary.csv``'s header."""
        return [
            "method",
            "pairs",
            "dice_after",
            "dice_onehot_linear",
            "folding_percent",
            "folding_percent_max",
            "sdlogj",
            "seconds_reg",
            *(f"dice_minus_{p}" for p in self.peers),
            *(f"time_ratio_{p}" for p in self.peers),
        ]


def summarize(rows: Sequence[dict[str, Any]]) -> Summary:
    """Each method's means over the pairs that every method finished ``ok``.

    A pair one method failed is dropped for all, so no method's mean is over easier (or harder)
    pairs than another's. Methods skipped on every pair (not installed) are left out rather than
    emptying the summary. Leads over a peer compare means: Dice difference, ratio of mean seconds.
    """
    methods = list(dict.fromkeys(r["method"] for r in rows if r["status"] != "skipped"))
    peers = [m for m in methods if is_peer(m)]
    pairs: list[str] = []
    dropped: dict[str, str] = {}
    for pair in dict.fromkeys(r["pair"] for r in rows):
        status = {r["method"]: r["status"] for r in rows if r["pair"] == pair}
        bad = [f"{m} {status.get(m, 'missing')}" for m in methods if status.get(m) != "ok"]
        if bad:
            dropped[pair] = ", ".join(bad)
        else:
            pairs.append(pair)
    out: list[dict[str, Any]] = []
    for m in methods:
        sel = [r for r in rows if r["method"] == m and r["pair"] in pairs]
        folding: list[Any] = [r.get("folding_percent") for r in sel]
        out.append(
            {
                "method": m,
                "pairs": len(sel),
                **{k: _mean([r.get(k) for r in sel]) for k in SUMMARY_MEANS},
                "folding_percent_max": max(float(x) for x in folding)
                if folding and all(_num(x) for x in folding)
                else None,
            }
        )
    by_method = {s["method"]: s for s in out}
    for s in out:
        for p in peers:
            if p == s["method"]:
                continue
            peer = by_method[p]
            dice, sec, peer_dice, peer_sec = s["dice_after"], s["seconds_reg"], peer["dice_after"], peer["seconds_reg"]
            s[f"dice_minus_{p}"] = dice - peer_dice if _num(dice) and _num(peer_dice) else None
            s[f"time_ratio_{p}"] = sec / peer_sec if _num(sec) and _num(peer_sec) and peer_sec else None
    return Summary(rows=out, peers=peers, pairs=pairs, dropped=dropped)


def _mean(values: Sequence[Any]) -> float | None:
    """The mean, or ``None`` if any value is missing (a mean over fewer pairs would not compare)."""
    return sum(values) / len(values) if values and all(_num(x) for x in values) else None


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


def write_summary(path: Path, summary: Summary) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=summary.columns(), extrasaction="ignore")
        w.writeheader()
        for r in summary.rows:
            w.writerow({k: _blank(r.get(k)) for k in summary.columns()})


def summary_markdown(summary: Summary) -> list[str]:
    """The summary table, the pairs it leaves out, and one "lead" line per nir_lightning method."""
    lines = ["## Mean over pairs", ""]
    if not summary.pairs:
        return [*lines, "No pair was finished by every method: no means.", ""]
    lines.append(f"Means over the {len(summary.pairs)} pair(s) every method finished: {', '.join(summary.pairs)}.")
    if summary.dropped:
        lines.append(
            "Left out (not finished by every method): "
            + "; ".join(f"{p} ({why})" for p, why in summary.dropped.items())
            + "."
        )
    head = [
        "method",
        "pairs",
        "Dice (NN)",
        "Dice (lin. one-hot)",
        "det J ≤ 0 % mean",
        "det J ≤ 0 % max",
        "SDlogJ",
        "reg s",
    ]
    head += [f"Dice − {p}" for p in summary.peers] + [f"time ratio to {p}" for p in summary.peers]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.rows:
        cells = [
            r["method"],
            str(r["pairs"]),
            _fmt(r["dice_after"], ".3f"),
            _fmt(r["dice_onehot_linear"], ".3f"),
            _fmt(r["folding_percent"], ".4f"),
            _fmt(r["folding_percent_max"], ".4f"),
            _fmt(r["sdlogj"], ".3f"),
            _fmt(r["seconds_reg"], ".1f"),
        ]
        cells += [_fmt(r.get(f"dice_minus_{p}"), "+.3f") for p in summary.peers]
        cells += [_fmt(r.get(f"time_ratio_{p}"), ".2f") for p in summary.peers]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in summary.rows:
        if is_peer(r["method"]) or not summary.peers:
            continue
        peers = " / ".join(summary.peers)
        dice = " / ".join(_fmt(r.get(f"dice_minus_{p}"), "+.3f") for p in summary.peers)
        time = " / ".join(_fmt(r.get(f"time_ratio_{p}"), ".2f") for p in summary.peers)
        lines.append(
            f"**{r['method']} lead over {peers}**: Dice {dice} (> 0: more accurate), time ratio {time} (< 1: faster)."
        )
    lines.append("")
    return lines


def write_per_structure(path: Path, rows: Sequence[dict[str, Any]], names: dict[int, str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "method", "label", "name", "dice_after", "dice_onehot_linear", "hd95_after"])
        for r in rows:
            for lab, d in (r.get("dice_per_label") or {}).items():
                w.writerow(
                    [
                        r["pair"],
                        r["method"],
                        lab,
                        names.get(int(lab), ""),
                        "" if d is None else d,
                        _blank((r.get("dice_onehot_linear_per_label") or {}).get(lab)),
                        _blank((r.get("hd95_per_label") or {}).get(lab)),
                    ]
                )


def _blank(x: Any) -> Any:
    return "" if x is None else x


def markdown(rows: Sequence[dict[str, Any]], header: dict[str, Any], names: dict[int, str]) -> str:
    lines = [f"# Benchmark {header['date']}", ""]
    for key in ("command", "machine", "gpu", "threads", "git", "data", "label interpolation", "quick"):
        if header.get(key) not in (None, ""):
            lines.append(f"- **{key}**: {header[key]}")
    lines.append("")
    lines += summary_markdown(summarize(rows))
    for pair in dict.fromkeys(r["pair"] for r in rows):
        prs = [r for r in rows if r["pair"] == pair]
        best = next((r.get("best_peer") for r in prs if r.get("best_peer")), None)
        lines += [f"## {pair}", ""]
        if best:
            b = next(r for r in prs if r["method"] == best)
            lines.append(
                f"Best peer (highest Dice): **{best}**, Dice {b['dice_after']:.3f} in {b['seconds_reg']:.1f} s. "
                "Dice ratio > 1 = better than it; time ratio < 1 = faster."
            )
        before = next((r.get("dice_before") for r in prs if _num(r.get("dice_before"))), None)
        if before is not None:
            lines.append(f"Dice before registration: {before:.3f}.")
        lines += [
            "",
            "| method | device | Dice (NN) | Dice (lin. one-hot) | HD95 mm | det J ≤ 0 % (count) | SDlogJ | reg s | wall s | peak RSS MB | peak CUDA MB | Dice ratio | time ratio | own-warp agreement |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in prs:
            if r["status"] != "ok":
                lines.append(
                    f"| {r['method']} | {r.get('device', '')} | {r['status']}: {r.get('note', '')} |" + " |" * 11
                )
                continue
            lines.append(
                f"| {r['method']} | {r['device']} | {_fmt(r.get('dice_after'), '.3f')} | {_fmt(r.get('dice_onehot_linear'), '.3f')} | "
                f"{_fmt(r.get('hd95_after'), '.2f')} | {_fmt(r.get('folding_percent'), '.4f')} ({r.get('folding_count', '–')}) | "
                f"{_fmt(r.get('sdlogj'), '.3f')} | {_fmt(r.get('seconds_reg'), '.1f')} | {_fmt(r.get('seconds_wall'), '.1f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | "
                f"{_fmt(r.get('peak_cuda_mb'), '.0f')} | {_fmt(r.get('dice_ratio'), '.3f')} | {_fmt(r.get('time_ratio'), '.3f')} | "
                f"{_fmt(100 * r['native_label_agreement'] if _num(r.get('native_label_agreement')) else None, '.2f')} % |"
            )
        ok = [r for r in prs if r["status"] == "ok" and r.get("dice_per_label")]
        if ok:
            lines += [
                "",
                "<details><summary>Dice per structure (nearest neighbour)</summary>",
                "",
                "| label | structure | " + " | ".join(r["method"] for r in ok) + " |",
                "|---|---|" + "---|" * len(ok),
            ]
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
            "mean 95th-percentile Hausdorff distance (MONAI); det J ≤ 0 in the fixed foreground; SDlogJ = "
            "standard deviation of log det J there (det J clipped at 1e-9, as in Learn2Reg); reg s = "
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
            ax.annotate(
                label, (r["seconds_reg"], r["dice_after"]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
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
