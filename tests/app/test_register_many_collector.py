"""`nir register-many` freezes what survives its first pair (imports, caches) for the rest of the
rank (:class:`nir_lightning.app.startup.RankCollector`), so that each later pair's full collection
scans only that pair's objects, and unfreezes at the end."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nir_lightning.app import batch
from nir_lightning.app.startup import RankCollector


def test_later_pairs_run_with_the_first_pairs_survivors_frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("f", "m"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")  # never read: register_pair is replaced
    (tmp_path / "pairs.csv").write_text("fixed,moving,id\nf.nii.gz,m.nii.gz,a\nf.nii.gz,m.nii.gz,b\nf.nii.gz,m.nii.gz,c\n")
    seen: list[int] = []

    def fake_register_pair(*args: Any, output: Path, **kwargs: Any) -> Any:
        seen.append(gc.get_freeze_count())
        return SimpleNamespace(metrics={"dice_after": 0.5, "seconds_total": 1.0})

    monkeypatch.setattr(batch, "register_pair", fake_register_pair)
    monkeypatch.setattr(batch, "cohort_report", lambda *a, **k: None)
    before = gc.isenabled(), gc.get_freeze_count()
    if before != (True, 0):
        pytest.skip("the collector is managed by the test session")
    result = batch.register_many(["--pairs", str(tmp_path / "pairs.csv"), "--output", str(tmp_path / "out"), "--threads", "1"])
    assert [r["status"] for r in result["rows"]] == ["completed"] * 3
    assert seen[0] == 0 and seen[1] > 1000 and seen[2] >= seen[1]  # the imports' objects, frozen from the second pair on
    assert (gc.isenabled(), gc.get_freeze_count()) == before  # and collectable again at the end


def test_a_full_collection_skips_the_frozen_objects() -> None:
    """The saving in numbers: a full collection after a rank's imports (~0.5 million objects in
    `nir register-many`; here those of this test session) against the same with them frozen."""
    if not gc.isenabled() or gc.get_freeze_count() > 0:
        pytest.skip("the collector is managed by the test session")
    t0 = time.perf_counter()
    gc.collect()
    full = time.perf_counter() - t0
    collector = RankCollector.after_first_pair()
    try:
        t0 = time.perf_counter()
        gc.collect()
        frozen = time.perf_counter() - t0
    finally:
        collector.close()
    assert gc.get_freeze_count() == 0
    assert frozen < 0.5 * full
