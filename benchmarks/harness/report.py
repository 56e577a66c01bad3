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

A method ``NAME@KEY=VALUE,...`` is NAME at other settings (a regularisation sweep, issue 24); the
part before ``@`` is its *family*. :func:`pareto` gives one row per method setting (``pareto.csv``,
the "Accuracy vs regularity" section of ``results.md``), :func:`dominance` whether each nir family's
Dice-vs-SDlogJ curve lies above each peer family's, and :func:`plot_pareto` draws ``pareto.png``
(the same scatter as ``nir compare --pareto``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from nir_lightning.app.host_load import STEAL_NOTE_SHARE

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
    "cpu_steal_pct",
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


def family(method: str) -> str:
    """The method without its ``@`` settings: ``nir@model.alpha=1`` -> ``nir``, ``ants`` -> ``ants``."""
    return method.partition("@")[0]


def settings_of(method: str) -> str:
    """The ``@`` settings of a method (``model.alpha=1,model.lam=5``), ``default`` if none."""
    return method.partition("@")[2] or "default"


def short_settings(method: str) -> str:
    """Settings for a plot label: dotted keys cut to their last part (``model.alpha=1`` -> ``alpha=1``)."""
    text = settings_of(method)
    if text == "default":
        return text
    return ",".join(k.rsplit(".", 1)[-1] + eq + v for k, eq, v in (item.partition("=") for item in text.split(",")))


def is_peer(method: str) -> bool:
    """A method nir_lightning is compared with: any family but ``nir`` and ``nir:NAME`` (settings included)."""
    fam = family(method)
    return not (fam == "nir" or fam.startswith("nir:"))


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
            :data:`SUMMARY_MEANS`, ``folding_percent_max``, ``cpu_steal_pct_max`` (the largest CPU
            steal of its runs, :mod:`nir_lightning.app.host_load`) and, per peer ``P`` other than the
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
            "cpu_steal_pct_max",
            *(f"dice_minus_{p}" for p in self.peers),
            *(f"time_ratio_{p}" for p in self.peers),
        ]


STEAL_WARN_PCT = 100 * STEAL_NOTE_SHARE  # 5 %: the share from which `nir register` flags its own seconds
"""A run whose CPU steal (:mod:`nir_lightning.app.host_load`) reached this share gets a warning beside its seconds."""


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
                "cpu_steal_pct_max": max((float(r["cpu_steal_pct"]) for r in sel if _num(r.get("cpu_steal_pct"))), default=None),
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
    stolen = [r["cpu_steal_pct_max"] for r in summary.rows if _num(r.get("cpu_steal_pct_max"))]
    if stolen and max(stolen) >= STEAL_WARN_PCT:
        lines += [
            (
                f"**CPU steal up to {max(stolen):.0f} %** during these runs (column `CPU steal %` per pair): the host gave "
                "that share of this virtual machine's CPU time to others, so their seconds are not the machine's and "
                "do not compare with another run's."
            ),
            "",
        ]
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


# -- accuracy vs regularity (issue 24) ----------------------------------------------------------

PARETO_COLUMNS = [
    "family",
    "settings",
    "method",
    "pairs",
    "dice_after",
    "dice_onehot_linear",
    "sdlogj",
    "folding_count_total",
    "folding_count_max",
    "hd95_after",
    "seconds_reg",
]
"""``pareto.csv``'s header: per method setting, means over the common pairs (Dice NN, Dice of the
linear one-hot interpolation, SDlogJ, HD95, registration seconds), the det J <= 0 voxel count
summed over them and its largest value on one pair."""


@dataclass
class Pareto:
    """What :func:`pareto` returns.

    Attributes:
        rows: one per method that ran, keys :data:`PARETO_COLUMNS` (``None`` where missing),
            sorted by family (first-seen order) then mean SDlogJ.
        pairs: the pairs averaged over (finished ``ok`` by every method, as in :func:`summarize`).
        dropped: pair -> which methods did not finish it.
    """

    rows: list[dict[str, Any]]
    pairs: list[str]
    dropped: dict[str, str]

    def families(self) -> list[str]:
        return list(dict.fromkeys(r["family"] for r in self.rows))


def pareto(rows: Sequence[dict[str, Any]]) -> Pareto:
    """One row per method setting, averaged over the pairs every method finished (see :func:`summarize`)."""
    common = summarize(rows)
    out: list[dict[str, Any]] = []
    for s in common.rows:
        m = s["method"]
        sel = [r for r in rows if r["method"] == m and r["pair"] in common.pairs]
        folds: list[Any] = [r.get("folding_count") for r in sel]
        have_folds = bool(folds) and all(_num(x) for x in folds)
        out.append(
            {
                "family": family(m),
                "settings": settings_of(m),
                "method": m,
                "pairs": len(sel),
                "dice_after": s["dice_after"],
                "dice_onehot_linear": s["dice_onehot_linear"],
                "sdlogj": s["sdlogj"],
                "folding_count_total": int(sum(folds)) if have_folds else None,
                "folding_count_max": int(max(folds)) if have_folds else None,
                "hd95_after": _mean([r.get("hd95_after") for r in sel]),
                "seconds_reg": s["seconds_reg"],
            }
        )
    order = {f: i for i, f in enumerate(dict.fromkeys(r["family"] for r in out))}
    # a setting without SDlogJ sorts last in its family (it cannot sit on the curve)
    out.sort(key=lambda r: (order[r["family"]], 0 if _num(r["sdlogj"]) else 1, r["sdlogj"] if _num(r["sdlogj"]) else 0.0))
    return Pareto(rows=out, pairs=common.pairs, dropped=common.dropped)


def write_pareto(path: Path, result: Pareto) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PARETO_COLUMNS)
        w.writeheader()
        for r in result.rows:
            w.writerow({k: _blank(r.get(k)) for k in PARETO_COLUMNS})


PARETO_METRICS = {"dice_after": "Dice NN", "dice_onehot_linear": "Dice label interp."}
"""Dice columns :func:`dominance` and the figure compare against SDlogJ, with their names."""


@dataclass
class Dominance:
    """Whether ``family``'s curve lies above ``peer``'s wherever both are defined (:func:`dominance`).

    Attributes:
        above: ``True`` if the Dice margin (family minus peer) is > 0 at every SDlogJ where both
            curves are defined, ``False`` if not, ``None`` if their SDlogJ ranges do not overlap.
        worst_margin, at_sdlogj: the smallest margin and where (``None`` without overlap).
        own_range, peer_range: the SDlogJ ranges of the two curves (min, max); outside their
            overlap nothing is compared, and :meth:`sentence` says so.
    """

    family: str
    peer: str
    metric: str
    above: bool | None
    worst_margin: float | None
    at_sdlogj: float | None
    own_range: tuple[float, float]
    peer_range: tuple[float, float]

    def sentence(self) -> str:
        name = PARETO_METRICS.get(self.metric, self.metric)
        text = f"{self.family} above {self.peer} ({name}) at every SDlogJ it reaches: "
        if self.above is None or self.worst_margin is None or self.at_sdlogj is None:
            text += "not comparable (their SDlogJ ranges do not overlap)"
        else:
            text += f"{'yes' if self.above else 'no'} (worst margin {self.worst_margin:+.3f} at SDlogJ {self.at_sdlogj:.3f})"
        (lo, hi), (plo, phi) = self.own_range, self.peer_range
        if plo < lo or phi > hi:  # the curves' ranges differ: say what was not compared
            text += f"; {self.peer} reaches SDlogJ {_span(plo, phi)}, {self.family}'s settings {_span(lo, hi)}"
            if self.above is not None:
                text += f": compared on {_span(max(lo, plo), min(hi, phi))} only"
        return text + "."


def _span(a: float, b: float) -> str:
    return f"{a:.3f}" if a == b else f"{a:.3f}–{b:.3f}"


def _curve(result: Pareto, fam: str, metric: str) -> list[tuple[float, float]]:
    """A family's Pareto front: its (SDlogJ, Dice) points in SDlogJ order, without the dominated ones.

    A setting is dominated when another of the family is at most as rough (SDlogJ) and at least as
    accurate (Dice); no one would choose it, so it does not pull the family's curve down (a sweep
    along two knobs leaves such points). Along the front both SDlogJ and Dice rise.

    >>> rows = [{"family": "nir", "sdlogj": x, "dice_after": y} for x, y in ((0.2, 0.50), (0.25, 0.48), (0.3, 0.55), (0.3, 0.54))]
    >>> _curve(Pareto(rows=rows, pairs=[], dropped={}), "nir", "dice_after")
    [(0.2, 0.5), (0.3, 0.55)]
    """
    from nir_lightning.app.compare.pareto import pareto_front  # the front `nir compare --pareto` draws

    points = [(float(r["sdlogj"]), float(r[metric])) for r in result.rows if r["family"] == fam and _num(r.get("sdlogj")) and _num(r.get(metric))]
    front = pareto_front([x for x, _ in points], [y for _, y in points])
    return [points[i] for i in front]


def interp_curve(curve: Sequence[tuple[float, float]], x: float) -> float:
    """Linear interpolation of a curve of ``(sdlogj, dice)`` points, in SDlogJ order, at ``x`` inside
    its SDlogJ range (two points at one SDlogJ: the first's value).

    >>> round(interp_curve([(0.3, 0.5), (0.4, 0.7)], 0.35), 12)
    0.6
    """
    for (x0, y0), (x1, y1) in pairwise(curve):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[0][1]  # a one-point curve, at its own SDlogJ


def dominance(result: Pareto, metric: str = "dice_after") -> list[Dominance]:
    """For each nir family and each peer family with ``metric``: is the nir curve above the peer's?

    Each family's curve is its Pareto front (:func:`_curve`: settings that another of the family
    beats in both SDlogJ and Dice are left out). Both curves join their settings linearly in SDlogJ order, so their difference is linear
    between the SDlogJ values of either: its minimum over the overlap of the two ranges is at one
    of those or at an end of the overlap, so the worst margin is exact, not sampled. A family with
    one setting is a point, compared only where the other family's range contains its SDlogJ.
    """
    fams = [f for f in result.families() if _curve(result, f, metric)]
    out = []
    for fam in (f for f in fams if not is_peer(f)):
        mine = _curve(result, fam, metric)
        own = (mine[0][0], mine[-1][0])
        for peer in (f for f in fams if is_peer(f)):
            theirs = _curve(result, peer, metric)
            rng = (theirs[0][0], theirs[-1][0])
            a, b = max(own[0], rng[0]), min(own[1], rng[1])
            if a > b:
                out.append(Dominance(fam, peer, metric, None, None, None, own, rng))
                continue
            xs = sorted({a, b, *(x for x, _ in mine + theirs if a <= x <= b)})
            worst, at = min((interp_curve(mine, x) - interp_curve(theirs, x), x) for x in xs)
            out.append(Dominance(fam, peer, metric, worst > 0, worst, at, own, rng))
    return out


def pareto_markdown(result: Pareto) -> list[str]:
    """The "Accuracy vs regularity" section: the table by family then SDlogJ, and the dominance lines."""
    lines = ["## Accuracy vs regularity (Pareto)", ""]
    if not result.pairs:
        return [*lines, "No pair was finished by every method: no means.", ""]
    lines.append(
        f"Per method setting, means over the {len(result.pairs)} pair(s) every method finished; "
        "det J ≤ 0 voxels summed over them (and the most on one pair). Figure: `pareto.png`."
    )
    head = ["family", "settings", "pairs", "Dice (NN)", "Dice (lin. one-hot)", "SDlogJ", "det J ≤ 0 voxels total (max/pair)",
            "HD95 mm", "reg s"]  # fmt: skip
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        folds = (
            f"{r['folding_count_total']} ({r['folding_count_max']})" if _num(r.get("folding_count_total")) else "–"
        )
        cells = [r["family"], r["settings"], str(r["pairs"]), _fmt(r["dice_after"], ".3f"), _fmt(r["dice_onehot_linear"], ".3f"),
                 _fmt(r["sdlogj"], ".3f"), folds, _fmt(r["hd95_after"], ".2f"), _fmt(r["seconds_reg"], ".1f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    statements = [d for metric in PARETO_METRICS for d in dominance(result, metric)]
    lines += [f"- {d.sentence()}" for d in statements] or [
        "No dominance statement: it needs a nir family and a peer family with SDlogJ and Dice."
    ]
    lines += [f"- {note}" for note in pareto_notes(result)]
    lines.append("")
    return lines


def pareto_points(result: Pareto) -> list[Any]:
    """:class:`nir_lightning.app.compare.ParetoPoint` per method setting: grouped by family, labelled by setting."""
    from nir_lightning.app.compare import ParetoPoint

    return [
        ParetoPoint(
            group=r["family"],
            label=short_settings(r["method"]),
            values={k: float(r[k]) for k in ("sdlogj", *PARETO_METRICS) if _num(r.get(k))},
        )
        for r in result.rows
    ]


def pareto_notes(result: Pareto) -> list[str]:
    """Panels of ``pareto.png`` left out for lack of data (e.g. a run with ``--no-onehot``)."""
    notes = []
    for metric, name in PARETO_METRICS.items():
        if not any(_num(r.get("sdlogj")) and _num(r.get(metric)) for r in result.rows):
            notes.append(f"pareto.png: no '{name} vs SDlogJ' panel (no method setting has both {metric} and sdlogj).")
    return notes


def plot_pareto(path: Path, result: Pareto) -> bool:
    """``pareto.png``: Dice NN and Dice label interp. vs SDlogJ, a line per family; ``False`` (no file) if nothing to draw."""
    from nir_lightning.app.compare import plot_pareto as draw
    from nir_lightning.errors import InputError

    try:
        draw(pareto_points(result), path, title="Accuracy vs regularity: mean Dice vs mean SDlogJ per setting")
    except InputError:
        return False
    return True

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
    lines += pareto_markdown(pareto(rows))
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
            "| method | device | Dice (NN) | Dice (lin. one-hot) | HD95 mm | det J ≤ 0 % (count) | SDlogJ | reg s | wall s | CPU steal % | peak RSS MB | peak CUDA MB | Dice ratio | time ratio | own-warp agreement |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in prs:
            if r["status"] != "ok":
                lines.append(
                    f"| {r['method']} | {r.get('device', '')} | {r['status']}: {r.get('note', '')} |" + " |" * 12
                )
                continue
            lines.append(
                f"| {r['method']} | {r['device']} | {_fmt(r.get('dice_after'), '.3f')} | {_fmt(r.get('dice_onehot_linear'), '.3f')} | "
                f"{_fmt(r.get('hd95_after'), '.2f')} | {_fmt(r.get('folding_percent'), '.4f')} ({r.get('folding_count', '–')}) | "
                f"{_fmt(r.get('sdlogj'), '.3f')} | {_fmt(r.get('seconds_reg'), '.1f')} | {_fmt(r.get('seconds_wall'), '.1f')} | {_fmt(r.get('cpu_steal_pct'), '.0f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | "
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
