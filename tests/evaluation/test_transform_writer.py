"""The transform files written on a thread while the labels are scored (issue 25): evaluate hands
the result out through ``when_dense`` before the labels exist, the files are the same bytes as
written after it, and an error of the writer reaches the caller."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from nir_lightning.data.pair import ImagePair, load_pair
from nir_lightning.evaluation.evaluate import RegistrationResult, evaluate, when_dense
from nir_lightning.evaluation.outputs import TransformWriter, write_outputs
from nir_lightning.fields import GridDisplacementField

FILES = ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz", "jacobian_det.nii.gz", "affine.mat")


@pytest.fixture(scope="module")
def pair(tiny_pair: dict[str, Path]) -> ImagePair:
    return load_pair(
        tiny_pair["fixed"],
        tiny_pair["moving"],
        fixed_labels=tiny_pair["fixed_labels"],
        moving_labels=tiny_pair["moving_labels"],
    )


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


def test_evaluate_hands_out_the_result_before_the_labels(pair: ImagePair) -> None:
    seen: list[tuple[RegistrationResult, bool, bool]] = []

    def record(reg: RegistrationResult) -> None:
        seen.append((reg, reg.warped_labels is None, "dice_after" in reg.metrics))

    with when_dense(record):
        reg = evaluate(GridDisplacementField(), pair)
    assert len(seen) == 1
    handed, labels_missing, dice_there = seen[0]
    assert handed is reg and labels_missing and not dice_there  # then filled in, on the same object
    assert reg.warped_labels is not None and "dice_after" in reg.metrics
    evaluate(GridDisplacementField(), pair)  # outside the block: no call
    assert len(seen) == 1


def test_files_written_during_the_scoring_are_the_same_bytes(pair: ImagePair, tmp_path: Path) -> None:
    field_ = GridDisplacementField()
    plain = evaluate(field_, pair)
    write_outputs(plain, pair, tmp_path / "after")
    (tmp_path / "during").mkdir()
    (tmp_path / "during" / "metrics.json").write_text("{}")  # an earlier run's: the folder is incomplete from the start
    with TransformWriter(pair, tmp_path / "during") as writer:
        with when_dense(writer):
            reg = evaluate(field_, pair)
        assert writer.started and not (tmp_path / "during" / "metrics.json").exists()
        write_outputs(reg, pair, tmp_path / "during", transform_files=writer)
    assert _digests(tmp_path / "during") == _digests(tmp_path / "after")
    assert (tmp_path / "during" / "metrics.json").exists()


def test_an_error_of_the_writer_reaches_the_caller(pair: ImagePair, tmp_path: Path) -> None:
    reg = evaluate(GridDisplacementField(), pair)
    assert reg.disp_ras_mm is not None
    reg.disp_ras_mm = np.full_like(reg.disp_ras_mm, np.nan)  # a diverged fit: refused, never written
    writer = TransformWriter(pair, tmp_path / "out")
    writer(reg)
    with pytest.raises(FloatingPointError, match="non-finite"):
        write_outputs(reg, pair, tmp_path / "out", transform_files=writer)
    assert not (tmp_path / "out" / "displacement.nii.gz").exists() and not (tmp_path / "out" / "metrics.json").exists()
