"""The benchmark's per-method summary (``benchmarks/harness/report.py``), its SDlogJ column and
the accuracy-vs-regularity (Pareto) table, statement and figure of a regularisation sweep.

The summary is what the development benchmark is read by (nir's lead over ANTs and FireANTs), so
its means must be over the same pairs for every method, and leads must compare means. Fake
result rows: no registration runs here.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness.report import (
    CSV_COLUMNS,
    PARETO_COLUMNS,
    Pareto,
    dominance,
    family,
    is_peer,
    markdown,
    pareto,
    pareto_markdown,
    pareto_points,
    plot_pareto,
    short_settings,
    summarize,
    summary_markdown,
    write_pareto,
    write_summary,
)
from harness.score import score_field

from nir_lightning.data.pair import ImagePair

PEERS = ["ants", "fireants-greedy"]


def _row(
    pair: str, method: str, dice: float, seconds: float, folding: float, sdlogj: float, status: str = "ok"
) -> dict[str, Any]:
    if status != "ok":
        return {"pair": pair, "method": method, "status": status, "note": "exit code 1"}
    return {
        "pair": pair,
        "method": method,
        "status": "ok",
        "device": "cpu",
        "dice_after": dice,
        "dice_onehot_linear": dice + 0.01,
        "folding_percent": folding,
        "sdlogj": sdlogj,
        "seconds_reg": seconds,
    }


def _rows() -> list[dict[str, Any]]:
    """p1 and p2 complete; ANTs failed p3 (so p3 leaves every mean); fireants-syn never ran."""
    return [
        _row("p1", "nir", 0.80, 10.0, 0.01, 0.10),
        _row("p1", "ants", 0.78, 100.0, 0.00, 0.20),
        _row("p1", "fireants-greedy", 0.77, 30.0, 0.03, 0.30),
        {"pair": "p1", "method": "fireants-syn", "status": "skipped", "note": "fireants not installed"},
        _row("p2", "nir", 0.70, 30.0, 0.03, 0.30),
        _row("p2", "ants", 0.70, 300.0, 0.00, 0.40),
        _row("p2", "fireants-greedy", 0.71, 10.0, 0.01, 0.50),
        {"pair": "p2", "method": "fireants-syn", "status": "skipped", "note": "fireants not installed"},
        _row("p3", "nir", 0.99, 1.0, 5.00, 9.00),
        _row("p3", "ants", 0.0, 0.0, 0.0, 0.0, status="failed"),
        _row("p3", "fireants-greedy", 0.10, 1.0, 0.00, 0.10),
        {"pair": "p3", "method": "fireants-syn", "status": "skipped", "note": "fireants not installed"},
    ]


def test_summary_means_only_over_pairs_every_method_finished() -> None:
    s = summarize(_rows())
    assert s.pairs == ["p1", "p2"]
    assert s.dropped == {"p3": "ants failed"}
    assert s.peers == PEERS  # the skipped method neither counts as a peer nor empties the summary
    assert [r["method"] for r in s.rows] == ["nir", *PEERS]
    nir = s.rows[0]
    assert nir["pairs"] == 2
    assert nir["dice_after"] == pytest.approx(0.75)
    assert nir["dice_onehot_linear"] == pytest.approx(0.76)
    assert nir["folding_percent"] == pytest.approx(0.02)
    assert nir["folding_percent_max"] == pytest.approx(0.03)
    assert nir["sdlogj"] == pytest.approx(0.20)
    assert nir["seconds_reg"] == pytest.approx(20.0)


def test_leads_compare_means_and_skip_self() -> None:
    nir, ants, fire = summarize(_rows()).rows
    assert nir["dice_minus_ants"] == pytest.approx(0.75 - 0.74)
    assert nir["dice_minus_fireants-greedy"] == pytest.approx(0.75 - 0.74)
    assert nir["time_ratio_ants"] == pytest.approx(20 / 200)
    # a ratio of means: 20 / 20, where the mean of the per-pair ratios would be (1/3 + 3) / 2
    assert nir["time_ratio_fireants-greedy"] == pytest.approx(1.0)
    assert ants["time_ratio_fireants-greedy"] == pytest.approx(10.0)
    assert "dice_minus_ants" not in ants and "time_ratio_fireants-greedy" not in fire


def test_summary_csv_and_markdown(tmp_path: Path) -> None:
    s = summarize(_rows())
    write_summary(tmp_path / "summary.csv", s)
    with (tmp_path / "summary.csv").open(newline="") as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0]) == s.columns()
    assert [r["method"] for r in got] == ["nir", *PEERS]
    assert float(got[0]["time_ratio_ants"]) == pytest.approx(0.1)
    assert got[1]["dice_minus_ants"] == ""
    text = "\n".join(summary_markdown(s))
    assert "**nir lead over ants / fireants-greedy**: Dice +0.010 / +0.010" in text
    assert "time ratio 0.10 / 1.00" in text
    assert "p3 (ants failed)" in text
    md = markdown(_rows(), {"date": "today"}, {})
    assert md.index("## Mean over pairs") < md.index("## p1")  # the per-pair tables stay, after it


def test_summary_without_a_complete_pair() -> None:
    rows = [_row("p1", "nir", 0.8, 1.0, 0.0, 0.1), _row("p1", "ants", 0.0, 0.0, 0.0, 0.0, status="timeout")]
    s = summarize(rows)
    assert s.pairs == [] and s.dropped == {"p1": "ants timeout"}
    assert s.rows[0]["pairs"] == 0 and s.rows[0]["dice_after"] is None
    assert "No pair was finished by every method" in "\n".join(summary_markdown(s))


def test_sdlogj_of_zero_displacement_is_zero() -> None:
    lab = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int32)
    lab[..., 2:6, 2:6, 2:6] = 1
    pair = ImagePair(
        fixed=lab.float(),
        moving=lab.float(),
        moving_raw=lab.float(),
        fixed_affine=np.eye(4),
        fixed_labels=lab,
        moving_labels=lab,
        labels=[1],
    )
    m = score_field(np.zeros((8, 8, 8, 3), np.float32), np.eye(4), pair, hd95=False, onehot=False).metrics
    assert m["sdlogj"] == 0.0
    assert m["dice_after"] == 1.0
    assert "sdlogj" in CSV_COLUMNS


def test_nir_uses_mutual_information_on_multimodal_pairs_unless_told_otherwise() -> None:
    from harness.methods import nir_overrides

    one = nir_overrides({"device": "cpu"})
    two = nir_overrides({"device": "cpu", "multimodal": True})
    mine = nir_overrides({"device": "cpu", "multimodal": True, "nir_args": ["--model.similarity=lncc"]})
    assert "model.similarity" not in one
    assert two["model.similarity"] == "mi"
    assert mine["model.similarity"] == "lncc"


# -- accuracy vs regularity (issue 24) ----------------------------------------------------------

# method -> mean (SDlogJ, Dice NN, Dice label interp.) over p1, p2; nir's curve lies above ANTs'
# on NN Dice (worst margin +0.020 at SDlogJ 0.15) but not on label-interp Dice, where the ANTs
# default (0.83) beats nir's curve there (0.815): margin -0.015 at 0.15.
SWEEP = {
    "nir": (0.20, 0.82, 0.82),
    "nir@model.alpha=1": (0.10, 0.80, 0.81),
    "nir@model.alpha=3": (0.05, 0.76, 0.77),
    "ants": (0.15, 0.79, 0.83),
    "ants@total_sigma=1": (0.08, 0.74, 0.75),
    "ants@total_sigma=2": (0.04, 0.70, 0.71),
    "fireants-greedy": (0.30, 0.85, 0.86),
}


def _sweep_rows(onehot: bool = True) -> list[dict[str, Any]]:
    """p1 and p2 around the SWEEP means (det J <= 0 voxels 3 and 7, HD95 2 and 3 mm, 10 and 30 s);
    p3 dropped (fireants-greedy failed it, nir's wild values there must not count)."""
    rows: list[dict[str, Any]] = []
    for pair, sign, folds, hd95, sec in (("p1", -1, 3, 2.0, 10.0), ("p2", 1, 7, 3.0, 30.0)):
        for m, (sd, dice, lin) in SWEEP.items():
            row = _row(pair, m, dice + sign * 0.01, sec, 0.01, sd * (1 + sign * 0.5))
            row.update(folding_count=folds, hd95_after=hd95)
            row["dice_onehot_linear"] = lin - sign * 0.02 if onehot else None
            rows.append(row)
        rows.append({"pair": pair, "method": "fireants-syn", "status": "skipped", "note": "fireants not installed"})
    for m in SWEEP:
        bad = m == "fireants-greedy"
        rows.append({**_row("p3", m, 0.99, 1.0, 9.0, 9.0, status="failed" if bad else "ok"), "folding_count": 999})
    return rows


def test_families_and_settings_of_sweep_methods() -> None:
    assert [family(m) for m in ("nir@model.alpha=1", "nir:diffeo@model.lam=5", "ants")] == ["nir", "nir:diffeo", "ants"]
    assert not is_peer("nir@model.alpha=1") and not is_peer("nir:diffeo@a=1") and is_peer("ants@total_sigma=1")
    assert short_settings("nir@model.alpha=1,model.lam=5") == "alpha=1,lam=5"
    assert short_settings("ants") == "default"


def test_pareto_means_over_common_pairs_sorted_by_family_then_sdlogj(tmp_path: Path) -> None:
    result = pareto(_sweep_rows())
    assert result.pairs == ["p1", "p2"] and result.dropped == {"p3": "fireants-greedy failed"}
    assert [(r["family"], r["settings"]) for r in result.rows] == [
        ("nir", "model.alpha=3"), ("nir", "model.alpha=1"), ("nir", "default"),
        ("ants", "total_sigma=2"), ("ants", "total_sigma=1"), ("ants", "default"),
        ("fireants-greedy", "default"),
    ]  # fmt: skip
    for r in result.rows:
        sd, dice, lin = SWEEP[r["method"]]
        assert (r["sdlogj"], r["dice_after"], r["dice_onehot_linear"]) == (pytest.approx(sd), pytest.approx(dice), pytest.approx(lin))
        assert (r["pairs"], r["folding_count_total"], r["folding_count_max"]) == (2, 10, 7)
        assert (r["hd95_after"], r["seconds_reg"]) == (pytest.approx(2.5), pytest.approx(20.0))
    write_pareto(tmp_path / "pareto.csv", result)
    with (tmp_path / "pareto.csv").open(newline="") as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0]) == PARETO_COLUMNS and len(got) == 7
    assert (got[0]["method"], float(got[0]["sdlogj"]), got[0]["folding_count_total"]) == ("nir@model.alpha=3", pytest.approx(0.05), "10")


def test_dominance_true_on_nn_false_on_label_interpolation() -> None:
    result = pareto(_sweep_rows())
    nn_ants, nn_fire = dominance(result, "dice_after")
    assert (nn_ants.family, nn_ants.peer, nn_ants.above) == ("nir", "ants", True)
    assert nn_ants.worst_margin == pytest.approx(0.02) and nn_ants.at_sdlogj == pytest.approx(0.15)
    assert nn_ants.sentence() == (
        "nir above ants (Dice NN) at every SDlogJ it reaches: yes (worst margin +0.020 at SDlogJ 0.150); "
        "ants reaches SDlogJ 0.040–0.150, nir's settings 0.050–0.200: compared on 0.050–0.150 only."
    )
    # fireants-greedy is one point at SDlogJ 0.30, beyond nir's settings: no claim either way
    assert nn_fire.above is None and "not comparable" in nn_fire.sentence()
    lin_ants, _ = dominance(result, "dice_onehot_linear")
    assert lin_ants.above is False
    assert lin_ants.worst_margin == pytest.approx(-0.015) and lin_ants.at_sdlogj == pytest.approx(0.15)
    assert "(Dice label interp.) at every SDlogJ it reaches: no (worst margin -0.015 at SDlogJ 0.150)" in lin_ants.sentence()
    # a nir point inside the peer's range is compared there: nir alone at 0.10 vs ANTs' 0.7543
    keep = ("nir@model.alpha=1", "ants", "ants@total_sigma=1")
    lone = pareto([r for r in _sweep_rows() if r["method"] in keep and r["pair"] != "p3"])
    (d,) = dominance(lone)
    assert d.above is True and d.worst_margin == pytest.approx(0.80 - (0.74 + 0.05 * 2 / 7)) and d.at_sdlogj == pytest.approx(0.10)


def test_dominance_compares_pareto_fronts_not_dominated_settings() -> None:
    # nir's alpha=3 is rougher than alpha=1 and no more accurate: dominated, it must not pull nir's curve
    # below ANTs at 0.12, where the front (alpha=1 at 0.10 -> default at 0.20) is above ANTs' points
    rows = [
        {"family": "nir", "sdlogj": 0.10, "dice_after": 0.80}, {"family": "nir", "sdlogj": 0.15, "dice_after": 0.70},
        {"family": "nir", "sdlogj": 0.20, "dice_after": 0.84},
        {"family": "ants", "sdlogj": 0.08, "dice_after": 0.74}, {"family": "ants", "sdlogj": 0.15, "dice_after": 0.79},
    ]  # fmt: skip
    (d,) = dominance(Pareto(rows=rows, pairs=["p1"], dropped={}))
    assert d.above is True
    assert d.worst_margin == pytest.approx(0.80 + 0.04 * 0.5 - 0.79) and d.at_sdlogj == pytest.approx(0.15)
    assert d.own_range == (0.10, 0.20)
    # with the dominated point counted, the margin at 0.15 would be 0.70 - 0.79 < 0
    rows[1]["dice_after"] = 0.83  # now on the front: counted
    (d,) = dominance(Pareto(rows=rows, pairs=["p1"], dropped={}))
    assert d.worst_margin == pytest.approx(0.83 - 0.79)


def test_pareto_section_and_figure(tmp_path: Path) -> None:
    from nir_lightning.app.compare import plot_pareto as draw

    md = markdown(_sweep_rows(), {"date": "today"}, {})
    assert md.index("## Mean over pairs") < md.index("## Accuracy vs regularity (Pareto)") < md.index("## p1")
    assert "| nir | model.alpha=3 | 2 | 0.760 | 0.770 | 0.050 | 10 (7) | 2.50 | 20.0 |" in md
    assert "- nir above ants (Dice NN) at every SDlogJ it reaches: yes (worst margin +0.020 at SDlogJ 0.150)" in md
    assert plot_pareto(tmp_path / "pareto.png", pareto(_sweep_rows()))
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    fig, notes = draw(pareto_points(pareto(_sweep_rows())))
    assert len(fig.axes) == 2 and notes == []
    nn = fig.axes[0]
    assert [ln.get_label() for ln in nn.lines] == ["nir", "ants", "fireants-greedy"]
    assert nn.lines[0].get_xdata().tolist() == pytest.approx([0.05, 0.10, 0.20])  # joined in SDlogJ order
    assert nn.lines[2].get_linestyle() == "None"  # one setting: a lone point
    assert [t.get_text() for t in nn.texts][:3] == ["alpha=3", "alpha=1", "default"]
    # settings with the same result share one annotation rather than overprinting
    same = [dict(r, method="nir@model.lam=5") for r in _sweep_rows() if r["method"] == "nir"]
    fig, _ = draw(pareto_points(pareto(_sweep_rows() + same)))
    assert [t.get_text() for t in fig.axes[0].texts][:3] == ["alpha=3", "alpha=1", "default / lam=5"]
    # a run with --no-onehot: the label-interpolation panel is left out, with a note
    no_lin = pareto(_sweep_rows(onehot=False))
    fig, notes = draw(pareto_points(no_lin))
    assert len(fig.axes) == 1 and "Dice (label interpolation)" in notes[0]
    assert "no 'Dice label interp. vs SDlogJ' panel" in "\n".join(pareto_markdown(no_lin))
    # nothing to plot: no file, no exception
    assert not plot_pareto(tmp_path / "none.png", pareto([_row("p1", "nir", 0.8, 1.0, 0.0, float("nan"))]))
    assert not (tmp_path / "none.png").exists()


def test_the_summary_warns_where_a_run_lost_cpu_time_to_the_host() -> None:
    """The largest CPU steal of each method's runs (nir_lightning/app/host_load.py) and a warning
    beside the seconds once one reached 5 %; no claim where nothing was read."""
    rows = _rows()
    assert "CPU steal" not in "\n".join(summary_markdown(summarize(rows)))
    for r, steal in zip(rows, [0.0, 1.0, 2.0, None, 0.5, 30.0, 3.0, None, 0.0, None, 0.0, None]):
        if r["status"] == "ok":
            r["cpu_steal_pct"] = steal
    s = summarize(rows)
    assert {r["method"]: r["cpu_steal_pct_max"] for r in s.rows} == {"nir": 0.5, "ants": 30.0, "fireants-greedy": 3.0}
    assert "**CPU steal up to 30 %**" in "\n".join(summary_markdown(s))
    assert "| CPU steal % |" in markdown(rows, {"date": "today"}, {})


def test_interp_curve_between_points_and_at_a_repeated_sdlogj() -> None:
    import doctest

    import harness.report

    assert doctest.testmod(harness.report).failed == 0
    curve = [(0.30, 0.50), (0.35, 0.58), (0.35, 0.60), (0.40, 0.70)]
    assert harness.report.interp_curve(curve, 0.325) == pytest.approx(0.54)
    assert harness.report.interp_curve(curve, 0.35) == 0.58  # two points at one SDlogJ: no division by zero
    assert harness.report.interp_curve(curve, 0.375) == pytest.approx(0.65)
