"""A run never replaces or deletes its own inputs, even with ``--overwrite`` or in ``register-many``.

Chained runs point at a result folder's files (``--moving out/warped.nii.gz --output out``); before
0.2.12 ``--overwrite`` then wrote the new ``warped.nii.gz`` over the moving image it was reading, and
``register-many`` deleted it while clearing the pair's folder.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nir_lightning.cli import main
from nir_lightning.errors import InputError
from nir_lightning.evaluation.output_files import refuse_inputs_among_outputs


def _nifti(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random((12, 13, 14), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["warped.nii.gz", "displacement.nii.gz", "jacobian_det.nii.gz", "metrics.json", "qc.png"])
def test_an_input_with_an_output_name_in_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"input")
    with pytest.raises(InputError, match=rf"moving image '.*{name}' is the file that --output '.*' would write as '{name}'.*never overwrites its inputs.*another --output"):
        refuse_inputs_among_outputs(tmp_path, {"moving image": path})


def test_names_the_caller_adds(tmp_path: Path) -> None:
    (tmp_path / "error.txt").write_bytes(b"input")
    refuse_inputs_among_outputs(tmp_path, {"moving image": tmp_path / "error.txt"})  # nir register writes no error.txt
    with pytest.raises(InputError, match=r"that pair 'p1' of --output '.*' would write as 'error.txt'"):
        refuse_inputs_among_outputs(tmp_path, {"moving image": tmp_path / "error.txt"}, writer="pair 'p1' of --output", also=("error.txt",))


def test_inputs_the_run_does_not_touch_pass(tmp_path: Path) -> None:
    (tmp_path / "moving.nii.gz").write_bytes(b"input")  # not an output's name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "warped.nii.gz").write_bytes(b"input")  # an output's name, another folder
    os.link(tmp_path / "other" / "warped.nii.gz", tmp_path / "hard_link.nii.gz")
    refuse_inputs_among_outputs(tmp_path, {
        "a": tmp_path / "moving.nii.gz", "b": tmp_path / "other" / "warped.nii.gz", "c": "2,3,41", "d": None, "e": tmp_path / "missing.nii.gz",
    })
    # a hard link elsewhere keeps its data when the entry in the folder is replaced (writes are renames)
    os.link(tmp_path / "other" / "warped.nii.gz", tmp_path / "warped.nii.gz")
    refuse_inputs_among_outputs(tmp_path, {"b": tmp_path / "other" / "warped.nii.gz"})
    # a symbolic link named like an output but pointing elsewhere: the rename replaces the link only
    (tmp_path / "displacement.nii.gz").symlink_to(tmp_path / "moving.nii.gz")
    refuse_inputs_among_outputs(tmp_path, {"m": tmp_path / "displacement.nii.gz"})


def test_links_are_followed_to_the_file_at_risk(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "warped.nii.gz").write_bytes(b"earlier result")
    (tmp_path / "link.nii.gz").symlink_to(out / "warped.nii.gz")
    with pytest.raises(InputError, match="would write as 'warped.nii.gz'"):
        refuse_inputs_among_outputs(tmp_path / "out", {"moving image": tmp_path / "link.nii.gz"})
    (tmp_path / "out_link").symlink_to(out)  # the folder given through a link
    with pytest.raises(InputError, match="would write as 'warped.nii.gz'"):
        refuse_inputs_among_outputs(tmp_path / "out_link", {"moving image": out / "warped.nii.gz"})
    (out / "logs" / "t1.nii.gz").write_bytes(b"input")  # a folder that --overwrite clears
    with pytest.raises(InputError, match=r"inside 'logs/' of --output .* which a run clears"):
        refuse_inputs_among_outputs(out, {"fixed image": out / "logs" / "t1.nii.gz"})
    (out / ".warped.nii.gz.tmp1").write_bytes(b"input")  # named like an atomic write's temporary
    with pytest.raises(InputError, match=r"would write as '\.warped\.nii\.gz\.tmp1'"):
        refuse_inputs_among_outputs(out, {"fixed image": out / ".warped.nii.gz.tmp1"})


@pytest.mark.parametrize("overwrite", [False, True])
def test_register_refuses_and_leaves_the_input(tmp_path: Path, overwrite: bool, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    fixed = _nifti(tmp_path / "fixed.nii.gz")
    moving = _nifti(out / "warped.nii.gz", seed=1)  # the result of an earlier run, registered again into its folder
    before = _digest(moving)
    argv = ["register", "--fixed", str(fixed), "--moving", str(moving), "--output", str(out), "--trainer.max_steps=2"]
    assert main([*argv, "--overwrite"] if overwrite else argv) == 2
    err = capsys.readouterr().err
    assert "moving image" in err and "would write as 'warped.nii.gz'" in err and "never overwrites its inputs" in err
    assert "already holds results" not in err  # not mistaken for an earlier run's result (whose fix, --overwrite, would destroy it)
    assert _digest(moving) == before
    assert sorted(p.name for p in out.iterdir()) == ["warped.nii.gz"]


def test_register_many_fails_that_pair_only_and_leaves_the_input(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    fixed = _nifti(tmp_path / "fixed.nii.gz")
    moving = _nifti(out / "p1" / "warped.nii.gz", seed=1)
    before = _digest(moving)
    (tmp_path / "pairs.csv").write_text(f"fixed,moving,id\n{fixed},{moving},p1\n")
    status = main(["register-many", "--pairs", str(tmp_path / "pairs.csv"), "--output", str(out), "--overwrite", "--workers", "1", "--trainer.max_steps=2"])
    assert status == 1
    assert _digest(moving) == before
    with open(out / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "failed" and "would write as 'warped.nii.gz'" in row["error"] and "pair 'p1' of --output" in row["error"]


def test_nifti_writer_refuses_before_predicting(tmp_path: Path) -> None:
    """``nir predict`` (``configs/trainer/predict.yaml``'s NiftiWriter) checks in its ``setup``, before the pair is loaded."""
    import pytorch_lightning as pl

    from nir_lightning.training import NiftiWriter, PairDataModule, RegistrationModule

    out = tmp_path / "predictions"
    fixed = _nifti(tmp_path / "fixed.nii.gz")
    moving = _nifti(out / "warped.nii.gz", seed=1)
    before = _digest(moving)
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[NiftiWriter(output_dir=str(out))], enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(InputError, match=r"data.moving '.*warped.nii.gz' is the file that NiftiWriter's output_dir '.*' would write as 'warped.nii.gz'"):
        trainer.predict(RegistrationModule(), datamodule=PairDataModule(fixed=str(fixed), moving=str(moving)), return_predictions=False)
    assert _digest(moving) == before
