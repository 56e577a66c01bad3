"""The benchmark's per-method summary (``benchmarks/harness/report.py``) and its SDlogJ column.

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

from harness.report import CSV_COLUMNS, markdown, summarize, summary_markdown, write_summary
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
