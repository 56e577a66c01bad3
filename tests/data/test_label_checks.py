"""Label maps that do not belong to their images: warnings at loading, and when Dice falls.

Correct pairs stay silent; swapped maps, maps mostly outside the brain and identical maps are
named with the figures and the fix, in the log and in the pair's notes (metrics.json).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from nir_lightning.data.label_checks import (
    LabelFit,
    PairLabelReport,
    homogeneity,
    label_fit,
    label_warnings,
    pair_label_report,
)
from nir_lightning.data.pair import ImagePair, load_pair
from nir_lightning.training.label_watch import DiceWatch, dice_fell, dice_fell_message

CHECKS = "nir_lightning.data.label_checks"
WATCH = "nir_lightning.training.label_watch"


def _load(files: dict[str, Path], fixed_labels: str | Path = "fixed_labels", moving_labels: str | Path = "moving_labels") -> ImagePair:
    """``load_pair`` with label maps given by key in ``files`` or as a path."""
    def path(v: str | Path) -> Path:
        return files[v] if isinstance(v, str) else v

    return load_pair(files["fixed"], files["moving"], fixed_labels=path(fixed_labels), moving_labels=path(moving_labels))


def _warnings(caplog: pytest.LogCaptureFixture, logger: str = CHECKS) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def test_correct_pair_is_silent(tiny_pair: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=CHECKS):
        pair = _load(tiny_pair)
    assert _warnings(caplog) == []
    assert not any("label map" in note for note in pair.notes)


def test_swapped_label_maps_warn(tiny_pair: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=CHECKS):
        pair = _load(tiny_pair, fixed_labels="moving_labels", moving_labels="fixed_labels")
    (msg,) = _warnings(caplog)
    assert "swapped" in msg and "--fixed-labels and --moving-labels" in msg
    assert str(tiny_pair["moving_labels"]) in msg and str(tiny_pair["fixed_labels"]) in msg  # names the files
    assert msg in pair.notes  # ends up in metrics.json


def test_labels_outside_the_foreground_warn(tiny_pair: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The fixed labels with the image's foreground inverted: the labels lie in the background.
    img: Any = nib.load(str(tiny_pair["fixed_labels"]))
    fixed = np.asarray(nib.load(str(tiny_pair["fixed"])).dataobj)  # type: ignore[attr-defined]
    lab = np.asarray(img.dataobj).astype(np.int16)
    outside = np.where(fixed < 0.01 * fixed.max(), 3, 0).astype(np.int16)
    outside[lab == 17] = 17  # keep one real structure so both maps share a label
    path = tmp_path / "outside.nii.gz"
    nib.save(nib.Nifti1Image(outside, img.affine), str(path))
    with caplog.at_level(logging.WARNING, logger=CHECKS):
        pair = _load(tiny_pair, fixed_labels=path)
    msgs = _warnings(caplog)
    assert any(str(path) in m and "background" in m and "%" in m for m in msgs), msgs
    assert all(m in pair.notes for m in msgs)


def test_identical_label_maps_warn(tiny_pair: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=CHECKS):
        _load(tiny_pair, moving_labels="fixed_labels")
    assert any("identical" in m for m in _warnings(caplog))


def test_an_image_given_as_a_label_map_is_named(tiny_pair: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The fixed image itself, as 8-bit integers, passed as --fixed-labels: one plain warning, and
    none of the fit checks' (which would blame coverage or homogeneity)."""
    img: Any = nib.load(str(tiny_pair["fixed"]))
    grey = np.asarray(img.dataobj, dtype=np.float64)
    path = tmp_path / "t1_as_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.round(255 * grey / grey.max()).astype(np.int16), img.affine), str(path))
    with caplog.at_level(logging.WARNING, logger=CHECKS):
        pair = _load(tiny_pair, fixed_labels=path)
    (msg,) = _warnings(caplog)
    assert msg.startswith(f"the fixed label map '{path}' looks like an intensity image, not a label map")
    assert "Pass the segmentation of this image" in msg and msg in pair.notes


def test_figures_on_synthetic_volumes() -> None:
    img = torch.zeros(8, 8, 8)
    img[2:6, 2:6, 2:4], img[2:6, 2:6, 4:6] = 0.4, 0.9
    own = torch.zeros(8, 8, 8, dtype=torch.int32)
    own[2:6, 2:6, 2:4], own[2:6, 2:6, 4:6] = 1, 2
    assert homogeneity(img, own) == pytest.approx(1.0)
    shifted = torch.roll(own, shifts=1, dims=2)  # label 1 straddles both tissues, label 2 half outside
    fit = label_fit(img, shifted)
    assert fit.outside_fraction == pytest.approx(0.25) and fit.coverage == pytest.approx(1.0)
    assert fit.homogeneity == pytest.approx(1 / 3)
    report = pair_label_report(img, img, own, shifted)
    assert report.fixed_advantage > 0.5 and report.moving_advantage < 0
    with pytest.raises(ValueError, match="differ in shape"):
        label_fit(img, own[:4])


def test_foreign_map_is_named() -> None:
    own, foreign = LabelFit(0.0, 0.6, 0.8), LabelFit(0.02, 0.6, 0.45)
    report = PairLabelReport(own, foreign, fixed_on_moving=0.4, moving_on_fixed=0.4, identical=False)
    (msg,) = label_warnings(report, moving_labels_path="other.nii.gz")
    assert msg.startswith("the moving label map 'other.nii.gz' does not fit the moving image")
    assert "+0.050" in msg and "+0.400" in msg  # its advantage and the other map's


@pytest.mark.slow
def test_real_brain_pair(shared_pair: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = {
        "fixed": shared_pair / "subjA_t1.nii.gz", "moving": shared_pair / "subjB_t1.nii.gz",
        "fixed_labels": shared_pair / "subjA_aseg.nii.gz", "moving_labels": shared_pair / "subjB_aseg.nii.gz",
    }
    with caplog.at_level(logging.WARNING, logger=CHECKS):
        pair = _load(files)
    assert _warnings(caplog) == []
    assert pair.fixed_labels is not None and pair.moving_labels is not None
    report = pair_label_report(pair.fixed, pair.moving, pair.moving_labels, pair.fixed_labels)  # swapped
    assert report.fixed_advantage < -0.2 and report.moving_advantage < -0.2  # measured -0.35 / -0.58
    assert "swapped" in label_warnings(report)[0]


# -- Dice during and after the fit ---------------------------------------------------------

def _trainer(dice: float | None, step: int) -> SimpleNamespace:
    metrics = {} if dice is None else {"val/dice": torch.tensor(dice)}
    return SimpleNamespace(callback_metrics=metrics, global_step=step, sanity_checking=False)


def test_dice_watch_warns_once_when_dice_falls(caplog: pytest.LogCaptureFixture) -> None:
    watch = DiceWatch(tolerance=0.02)
    module = SimpleNamespace(pair=None)  # no label maps: the first val/dice is the reference
    watch.on_train_start(_trainer(None, 0), module)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger=WATCH):
        for step, dice in ((100, 0.52), (200, 0.51), (300, 0.45), (400, 0.35)):
            watch.on_validation_end(_trainer(dice, step), module)  # type: ignore[arg-type]
    (msg,) = _warnings(caplog, WATCH)
    assert "0.520" in msg and "0.450" in msg and "step 300" in msg and "swapped" in msg
    assert watch.state_dict() == {"reference": pytest.approx(0.52), "reference_source": "at step 100", "warned": True}


def test_dice_watch_silent_when_dice_rises(caplog: pytest.LogCaptureFixture) -> None:
    watch = DiceWatch()
    watch.load_state_dict({"reference": 0.52, "reference_source": "before registration", "warned": False})
    with caplog.at_level(logging.WARNING, logger=WATCH):
        for step, dice in ((100, 0.60), (200, 0.51), (300, float("nan")), (400, 0.75)):
            watch.on_validation_end(_trainer(dice, step), SimpleNamespace())  # type: ignore[arg-type]
    assert _warnings(caplog, WATCH) == []


def test_dice_fell() -> None:
    assert dice_fell(0.520, 0.347) and not dice_fell(0.52, 0.75)
    assert not dice_fell(0.52, 0.505, tol=0.02) and dice_fell(0.52, 0.505, tol=0.01)
    assert not dice_fell(float("nan"), 0.3) and not dice_fell(None, 0.3)
    msg = dice_fell_message(0.520, 0.347)
    assert msg is not None and "0.520" in msg and "0.347" in msg and "swapped" in msg
    assert dice_fell_message(0.52, 0.75) is None


def test_dice_watch_in_a_tiny_fit(tiny_pair: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """Swapped maps: val/dice falls below the Dice before registration within a few steps."""
    import pytorch_lightning as pl

    from nir_lightning.alignment import AffineStage
    from nir_lightning.fields.displacement import DisplacementField
    from nir_lightning.training.datamodule import PairDataModule
    from nir_lightning.training.module import RegistrationModule

    dm = PairDataModule(
        fixed=str(tiny_pair["fixed"]), moving=str(tiny_pair["moving"]),
        fixed_labels=str(tiny_pair["moving_labels"]), moving_labels=str(tiny_pair["fixed_labels"]), steps_per_epoch=10,
        affine=AffineStage(kind="none"),  # the watch, not the affine stage, is under test
    )
    model = RegistrationModule(field=DisplacementField(width=32, num_frequencies=8), lr=1e-3, jacobian_points=256)
    watch = DiceWatch()
    trainer = pl.Trainer(
        max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[watch],
    )
    with caplog.at_level(logging.WARNING, logger=WATCH):
        trainer.fit(model, datamodule=dm)
    assert watch.reference_source == "before registration" and watch.warned
    (msg,) = _warnings(caplog, WATCH)
    assert "val/dice fell from" in msg
