"""The unregistered pair's scores computed on a thread while the affine stage runs (issue 25):
the same numbers as computed inside ``evaluate``, errors reach the caller, and the data module
starts them only where an affine stage leaves a core idle."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nir_lightning.alignment import AffineStage
from nir_lightning.data.pair import ImagePair, load_pair
from nir_lightning.evaluation.evaluate import BeforeScores, evaluate, unregistered_labels
from nir_lightning.evaluation.metrics import dice_per_label, mean_dice
from nir_lightning.fields import GridDisplacementField
from nir_lightning.training.datamodule import PairDataModule


@pytest.fixture(scope="module")
def shifted_files(tiny_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pair with the moving image and labels on their own grid: origin moved by 3 mm."""
    folder = tmp_path_factory.mktemp("shifted")
    files = dict(tiny_pair)
    for key in ("moving", "moving_labels"):
        img = nib.load(str(tiny_pair[key]))
        affine = img.affine.copy()
        affine[:3, 3] += (3.0, -3.0, 3.0)
        out = folder / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), str(out))
        files[key] = out
    return files


def _pair(files: dict[str, Path]) -> ImagePair:
    return load_pair(files["fixed"], files["moving"], fixed_labels=files["fixed_labels"], moving_labels=files["moving_labels"], keep_native=True)


@pytest.mark.parametrize("grid", ["same grid", "own grid"])
def test_scores_from_the_thread_are_those_evaluate_computes(tiny_pair: dict[str, Path], shifted_files: dict[str, Path], grid: str) -> None:
    pair = _pair(tiny_pair if grid == "same grid" else shifted_files)
    field_ = GridDisplacementField(seed=3)
    inline = evaluate(field_, pair).metrics
    threaded = evaluate(field_, pair, before=BeforeScores(pair)).metrics
    timing = {k for k in inline if k.startswith("seconds")}
    assert {k: v for k, v in inline.items() if k not in timing} == {k: v for k, v in threaded.items() if k not in timing}
    unregistered = unregistered_labels(pair)
    assert unregistered is not None
    assert pair.fixed_labels is not None
    expected = mean_dice(dice_per_label(unregistered, pair.fixed_labels[0, 0], pair.labels))
    assert threaded["dice_before"] == expected
    assert 0 < expected < 1  # the phantom's labels differ before registration: a Dice that can fail


def test_the_thread_reads_the_pair_as_it_was_when_started(shifted_files: dict[str, Path]) -> None:
    pair = _pair(shifted_files)
    reference = BeforeScores(pair).result()
    started = BeforeScores(pair)
    pair.align(np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 4.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    pair.labels = pair.labels[:1]  # what the caller changes afterwards does not reach the thread
    assert started.result() == reference


def test_an_error_on_the_thread_reaches_the_caller(tiny_pair: dict[str, Path]) -> None:
    pair = copy.copy(_pair(tiny_pair))
    pair.fixed_labels = None
    pending = BeforeScores(pair)
    with pytest.raises(ValueError, match="needs the fixed and the moving label maps"):
        pending.result()


def test_a_pair_without_native_labels_has_no_scores(tiny_pair: dict[str, Path]) -> None:
    pair = load_pair(tiny_pair["fixed"], tiny_pair["moving"], keep_native=True)
    assert BeforeScores(pair).result() is None


@pytest.mark.parametrize("kind", ["none", "rigid"])
def test_the_data_module_starts_them_only_with_an_affine_stage(tiny_pair: dict[str, Path], kind: str) -> None:
    dm = PairDataModule(fixed=str(tiny_pair["fixed"]), moving=str(tiny_pair["moving"]), fixed_labels=str(tiny_pair["fixed_labels"]),
                        moving_labels=str(tiny_pair["moving_labels"]), affine=AffineStage(kind=kind))
    dm.setup("fit")
    if kind == "none":
        assert dm.before_scores is None
    else:
        assert dm.before_scores is not None
        scores = dm.before_scores.result()
        assert scores is not None and 0 < scores["dice_before"] <= 1 and np.isfinite(scores["hd95_before"])
