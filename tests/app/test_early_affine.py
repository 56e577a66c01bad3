"""nir register's affine stage run by a second process during the imports (app/early_affine.py):
the same matrix bit for bit, used only when the parsed config asks for that stage on that loading."""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nir_lightning import register_pair
from nir_lightning.alignment import AffineResult, AffineStage, LevelHistory
from nir_lightning.app import early_affine
from nir_lightning.app.early_affine import EarlyStart, result_from_json, result_to_json
from nir_lightning.data.checks import DEFAULT_PERCENTILES
from nir_lightning.data.pair import load_pair
from nir_lightning.training.datamodule import PairDataModule

STAGE = {"kind": "affine", "rigid_iterations": [12, 8, 6], "affine_iterations": [12, 8, 6], "num_points": 2048}


@pytest.fixture(scope="module")
def moved(tmp_path_factory, pair_writer) -> dict[str, Path]:
    """The phantom pair with the moving header shifted by (4, -3, 2) mm and turned 6 degrees: work for the stage."""
    root = tmp_path_factory.mktemp("early")
    files = dict(pair_writer(root / "inputs", (24, 26, 22), seed=2))
    a = np.deg2rad(6.0)
    turn = np.array([[np.cos(a), -np.sin(a), 0, 4.0], [np.sin(a), np.cos(a), 0, -3.0], [0, 0, 1, 2.0], [0, 0, 0, 1]])
    for key in ("moving", "moving_labels"):
        img = nib.load(str(files[key]))
        path = root / "inputs" / f"{key}_moved.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), turn @ img.affine, img.header), str(path))
        files[key] = path
    return files


def _source(files: dict[str, Path]) -> dict[str, object]:
    return {
        "fixed": str(files["fixed"]), "moving": str(files["moving"]), "fixed_labels": None, "moving_labels": None,
        "labels": None, "percentiles": DEFAULT_PERCENTILES, "fixed_mask": None, "moving_mask": None, "stage_aligns": True,
    }


def test_default_percentiles_are_the_data_modules() -> None:
    assert inspect.signature(PairDataModule).parameters["percentiles"].default == DEFAULT_PERCENTILES


def test_result_survives_json_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    res = AffineResult(
        world=rng.normal(size=(4, 4)), kind="affine", seconds=1.25, similarity_before=-0.123456789012345, similarity_after=float("nan"),
        history=(LevelHistory(stage="rigid", shrink=4, iterations=30, loss_start=-0.1, loss_end=-0.2, settled=True),),
        initial=rng.normal(size=(4, 4)),
    )
    back = result_from_json(json.loads(json.dumps(result_to_json(res))), waited=0.5)
    assert back.world.tobytes() == res.world.tobytes() and back.initial.tobytes() == res.initial.tobytes()
    assert back.history == res.history and back.similarity_before == res.similarity_before and np.isnan(back.similarity_after)
    assert back.waited == 0.5 and res.waited is None


@pytest.fixture
def patient(monkeypatch) -> None:
    monkeypatch.setenv(early_affine.ENV, "1")  # wait for the second process however late it begins the stage


def test_the_second_process_computes_the_stage_of_this_one_bit_for_bit(moved, patient) -> None:
    source = _source(moved)
    early = EarlyStart(stage=STAGE, threads=1)
    early.load(source)
    pair = early.pair_for(source)
    got = early.take(AffineStage(**STAGE), source)
    here = AffineStage(**STAGE).fit(**load_pair(**{**source, "percentiles": DEFAULT_PERCENTILES}, keep_native=True).stage_inputs())
    assert pair is not None and got is not None and got.waited is not None
    assert got.world.tobytes() == here.world.tobytes()
    assert got.initial.tobytes() == here.initial.tobytes() and got.history == here.history
    assert np.abs(got.world - np.eye(4)).max() > 0.05  # the stage moved: the comparison is not between two identities


def test_a_second_process_that_has_not_begun_is_not_waited_for(moved, monkeypatch) -> None:
    monkeypatch.setenv(early_affine.ENV, "")
    source = _source(moved)
    early = EarlyStart(stage=STAGE, threads=1)
    early.load(source)
    assert early.pair_for(source) is not None
    # asked at once: the process is still importing torch, so the command runs the stage itself
    assert early.take(AffineStage(**STAGE), source) is None


def test_another_stage_or_loading_is_not_taken(moved, patient) -> None:
    source = _source(moved)
    early = EarlyStart(stage=STAGE, threads=1)
    early.load(source)
    assert early.pair_for({**source, "percentiles": [1.0, 99.0]}) is None
    assert early.take(AffineStage(**STAGE), source) is None  # stopped with the pair
    early = EarlyStart(stage=STAGE, threads=1)
    early.load(source)
    assert early.pair_for(source) is not None
    assert early.take(AffineStage(**{**STAGE, "kind": "rigid"}), source) is None
    early.close()


def test_a_failed_second_process_leaves_the_stage_to_the_command(moved, monkeypatch, patient) -> None:
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    source = _source(moved)
    early = EarlyStart(stage=STAGE, threads=1)
    early.load(source)
    assert early.pair_for(source) is not None
    assert early.take(AffineStage(**STAGE), source) is None


def test_wanted_follows_the_switch_and_skips_a_process_with_lightning(monkeypatch) -> None:
    monkeypatch.setenv(early_affine.ENV, "0")
    assert not early_affine.wanted(2)
    monkeypatch.setenv(early_affine.ENV, "1")
    assert early_affine.wanted(2)
    monkeypatch.delenv(early_affine.ENV)
    assert "pytorch_lightning" in sys.modules  # imported by this module's imports
    assert not early_affine.wanted(2)  # nothing left to overlap


@pytest.mark.parametrize("override", [[], ["--data.affine.num_points=1024"]])
def test_register_gives_the_same_outputs_with_the_early_stage(moved, tmp_path, monkeypatch, override) -> None:
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(early_affine.ENV, flag)
        r = register_pair(
            moved["fixed"], moved["moving"], fixed_labels=moved["fixed_labels"], moving_labels=moved["moving_labels"],
            output=tmp_path / flag, overrides=["--trainer.max_steps=3", *override], checkpoint_every=0, quiet=True,
        )
        runs[flag] = r.metrics
    assert (tmp_path / "1" / "affine.mat").read_bytes() == (tmp_path / "0" / "affine.mat").read_bytes()
    assert runs["1"]["dice_after"] == runs["0"]["dice_after"] and runs["1"]["affine"]["world"] == runs["0"]["affine"]["world"]
    # taken only when the config asks for the stage it ran (a config's num_points: another stage)
    assert ("seconds_affine_wait" in runs["1"]) is (not override)
    assert "seconds_affine_wait" not in runs["0"]


def test_configs_that_set_the_stage_or_the_loading_skip_the_early_start(configs_dir) -> None:
    from nir_lightning.app.early_affine import config_changes_stage

    assert config_changes_stage([str(configs_dir / "affine" / "none.yaml")], [])
    assert config_changes_stage([str(configs_dir / "affine" / "rigid.yaml")], [])
    assert not config_changes_stage([str(configs_dir / "data" / "pair.yaml"), str(configs_dir / "model" / "diffeomorphic.yaml")], [])
    assert config_changes_stage([], ["--data.percentiles=[1,99]"])
    assert not config_changes_stage([], ["--model.lam=3", "--trainer.max_steps=5"])


def test_the_process_answers_requests_in_order(moved, tmp_path) -> None:
    import torch

    from nir_lightning.app.early_affine import StageProcess

    inputs = load_pair(**{**_source(moved), "percentiles": DEFAULT_PERCENTILES}, keep_native=True).stage_inputs()
    stages = [STAGE, {**STAGE, "kind": "rigid"}]
    process = StageProcess(threads=1)
    try:
        for n, stage in enumerate(stages):
            path = tmp_path / f"inputs{n}.pt"
            torch.save({k: torch.from_numpy(v) if k.endswith("affine") else v for k, v in inputs.items()}, path)
            process.request(stage, path)
        answers = [process.result() for _ in stages]
    finally:
        process.stop()
    for stage, answer in zip(stages, answers, strict=True):
        assert answer is not None
        assert result_from_json(answer).world.tobytes() == AffineStage(**stage).fit(**inputs).world.tobytes()
    assert not (tmp_path / "inputs0.pt").exists()  # read and removed by the process


def test_no_interpreter_to_start_leaves_the_stage_to_the_command(monkeypatch) -> None:
    monkeypatch.setenv(early_affine.ENV, "1")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert early_affine.start(demo=False, affine=None, resume=False, configs=[], overrides=[], threads=1) is None
