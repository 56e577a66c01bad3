"""Faults: a kill or a full disk never leaves a truncated file, a killed fit resumes to the same
result, and a diverging fit stops with the step instead of writing NaN.

The kill tests use real processes and SIGKILL (no clean-up handlers run): a child that is killed
half-way through an atomic write, and a ``nir register`` child killed by a callback at a set step,
then resumed here with ``--resume``.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import nir_lightning.io as nio
from nir_lightning.cli import main
from nir_lightning.data.pair import load_pair
from nir_lightning.errors import OutputError
from nir_lightning.evaluation.evaluate import evaluate
from nir_lightning.evaluation.output_files import OUTPUT_FILES
from nir_lightning.fields.displacement import DisplacementField
from nir_lightning.io import (
    remove_stale_temporaries,
    save_displacement_itk,
    save_nifti,
    write_text_atomic,
)
from nir_lightning.training.checkpoints import AtomicCheckpointIO
from nir_lightning.training.module import RegistrationModule

TESTS = Path(__file__).resolve().parent
STEPS, EVERY = 12, 3
FAST = [
    f"--trainer.max_steps={STEPS}", f"--checkpoint-every={EVERY}", "--data.steps_per_epoch=5",
    "--model.field.init_args.width=32", "--model.field.init_args.levels=3", "--model.lr=1e-3", "--model.jacobian_points=256", "--trainer.log_every_n_steps=1",
    "--threads=1",  # the killed child, the reference and the resumed run: one thread count, so bitwise comparable
]


class KillAtStep(pl.Callback):
    """SIGKILL this process once ``global_step`` reaches ``step`` (used by the child ``nir register``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def register_argv(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
        "--fixed-labels", str(files["fixed_labels"]), "--moving-labels", str(files["moving_labels"]),
        "--output", str(out), *FAST, *extra,
    ]


def child_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}


def disp(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(str(folder / "displacement.nii.gz")).dataobj)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_pair: dict[str, Path]) -> Path:
    """An uninterrupted run with the same options."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert main(register_argv(tiny_pair, out)) == 0
    assert not (out / "checkpoints").exists()  # removed once the run is complete
    assert np.abs(disp(out)).max() > 0.3  # the field moved (0.45 with 0.2.25's stage shares): the comparison below means something
    return out


# -- atomic writes ------------------------------------------------------------------------------------
KILLED_WRITER = r"""
import sys, time
import numpy as np
import nir_lightning.io as nio

real_save = nio.nib.save

def half_then_hang(img, path):
    real_save(img, path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # the temporary now holds half a file, as if cut mid-write
        f.write(data[: len(data) // 2])
    print("mid-write", flush=True)
    time.sleep(600)

nio.nib.save = half_then_hang
nio.save_nifti(np.full((16, 18, 20), 7.0, np.float32), np.eye(4), sys.argv[1])
"""


def test_sigkill_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "warped.nii.gz"
    old = np.arange(16 * 18 * 20, dtype=np.float32).reshape(16, 18, 20)
    save_nifti(old, np.eye(4), target)
    before = target.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "mid-write"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == before  # the old file, whole
    assert np.array_equal(nib.load(str(target)).get_fdata(), old)
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]  # SIGKILL skips clean-up ...
    assert leftover.name.startswith(".warped.nii.gz.")
    with pytest.raises(Exception):  # noqa: B017 -- ... and it really was cut short
        np.asarray(nib.load(str(leftover)).dataobj)
    assert remove_stale_temporaries(tmp_path, OUTPUT_FILES) == [leftover]  # the next run tidies up
    assert [p.name for p in tmp_path.iterdir()] == ["warped.nii.gz"]


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_keeps_the_old_file_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "displacement.nii.gz"
    save_nifti(np.ones((4, 5, 6), np.float32), np.eye(4), target)
    before = target.read_bytes()
    real_save = nio.nib.save

    def half_then_full(img: Any, path: Any) -> None:
        real_save(img, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        _enospc()

    monkeypatch.setattr(nio.nib, "save", half_then_full)
    with pytest.raises(OutputError) as info:
        save_nifti(np.zeros((4, 5, 6), np.float32), np.eye(4), target)
    msg = str(info.value)
    assert f"could not write '{target}'" in msg and "no space left on the device" in msg
    assert "free space, or choose an --output folder on a disk with room" in msg
    assert isinstance(info.value, OSError)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["displacement.nii.gz"]  # no temporary left


@pytest.mark.parametrize(
    ("code", "problem", "fix"),
    [
        (errno.EDQUOT, "the disk quota is exceeded", "free space"),
        (errno.EROFS, "the file system is read-only", "choose a writable --output folder"),
        (errno.EACCES, "permission denied", "choose a writable --output folder"),
    ],
)
def test_other_write_failures_are_reported_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, problem: str, fix: str) -> None:
    def refuse(*args: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(nio.os, "replace", refuse)
    target = tmp_path / "jacobian_det.nii.gz"
    with pytest.raises(OutputError) as info:
        save_nifti(np.zeros((3, 4, 5), np.float32), np.eye(4), target)
    assert f"could not write '{target}': {problem}" in str(info.value) and fix in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_before_the_first_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nio.tempfile, "mkstemp", _enospc)
    with pytest.raises(OutputError, match=r"could not write '.*metrics\.json': no space left"):
        write_text_atomic(tmp_path / "metrics.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_register_then_resume(
    reference: Path, tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--overwrite over earlier results, the disk fills while writing the displacement: a message,
    no truncated file, no metrics.json claiming the mixed folder is complete; then --resume finishes."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    old_disp = (out / "displacement.nii.gz").read_bytes()
    real_write = gzip.GzipFile.write

    def full_on_displacement(self: gzip.GzipFile, data: Any) -> int:
        # the disk fills as the bytes go out, whichever gzip level the file is written at
        target = getattr(self.fileobj, "name", "") or self.name  # nibabel's gzip keeps no name of its own
        if ".displacement.nii.gz." in Path(str(target)).name:
            _enospc()
        return real_write(self, data)

    monkeypatch.setattr(gzip.GzipFile, "write", full_on_displacement)
    capsys.readouterr()
    assert main(register_argv(tiny_pair, out, "--overwrite")) == 1
    err = capsys.readouterr().err
    assert f"nir: error: could not write '{out / 'displacement.nii.gz'}': no space left on the device" in err
    assert "Traceback" not in err
    assert (out / "displacement.nii.gz").read_bytes() == old_disp
    assert not (out / "metrics.json").exists()  # the folder does not claim to be complete
    for nii in out.glob("*.nii.gz"):
        np.asarray(nib.load(str(nii)).dataobj)  # every file there is whole
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # the fit's end, which a complete run does not save, is saved after the failure
    assert int(torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]) == STEPS

    monkeypatch.undo()  # space freed
    assert main(register_argv(tiny_pair, out, "--resume")) == 0
    assert np.array_equal(disp(out), disp(reference))
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == STEPS - STEPS % EVERY


def test_a_finished_run_saves_no_checkpoint_at_its_end(tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """last.ckpt every EVERY steps, but none at the last step: the complete run removes it anyway
    (at 2 mm that save was 0.14 s and 50 MB)."""
    saved: list[int] = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self: AtomicCheckpointIO, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        saved.append(int(checkpoint["global_step"]))
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    out = tmp_path / "out"
    assert main(register_argv(tiny_pair, out)) == 0
    assert saved == list(range(EVERY, STEPS, EVERY))  # 3, 6, 9: not 12
    assert not (out / "checkpoints").exists()


# -- kill and resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kill_step", [2, 7], ids=["before-first-checkpoint", "mid-epoch"])
def test_sigkill_mid_fit_then_resume_equals_an_uninterrupted_run(reference: Path, tiny_pair: dict[str, Path], tmp_path: Path, kill_step: int) -> None:
    """Killed at step 2 (no checkpoint yet: --resume starts at 0) or 7 (epochs of 5 steps,
    one step after the checkpoint of step 6)."""
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(f"trainer:\n  callbacks:\n    - class_path: test_faults.KillAtStep\n      init_args:\n        step: {kill_step}\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "nir_lightning.cli", *register_argv(tiny_pair, out, "-c", str(cfg))],
        env=child_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    last = out / "checkpoints" / "last.ckpt"
    saved_step = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"]) if last.exists() else None
    assert (saved_step is None) == (kill_step < EVERY)
    assert saved_step is None or (0 < saved_step < kill_step and saved_step % EVERY == 0)

    # a plain re-run would start over; --resume continues from the checkpoint
    assert main(register_argv(tiny_pair, out, "--resume")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics.get("resumed_from_step") == saved_step and metrics["steps"] == STEPS
    np.testing.assert_allclose(disp(out), disp(reference), rtol=0, atol=1e-5)
    assert np.array_equal(disp(out), disp(reference))  # in fact bitwise, on CPU with a fixed thread count
    assert metrics["dice_after"] == pytest.approx(ref_metrics["dice_after"], abs=1e-6)
    assert not (out / "checkpoints").exists()


def _diverge_from_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    model_step = RegistrationModule.model_step

    def diverging(self: RegistrationModule, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        res = model_step(self, *args, **kwargs)
        if self.global_step >= step:
            res = {k: v * float("nan") if k in ("loss", "sim") else v for k, v in res.items()}
        return res

    monkeypatch.setattr(RegistrationModule, "model_step", diverging)


def test_resume_refuses_a_checkpoint_of_other_settings(
    tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _diverge_from_step(monkeypatch, 4)  # an interrupted run: checkpoint of step 3 left behind
    assert main(register_argv(tiny_pair, out)) == 1
    monkeypatch.undo()
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    capsys.readouterr()
    assert main(register_argv(tiny_pair, out, "--resume", "--trainer.max_steps=20")) == 2
    err = capsys.readouterr().err
    assert f"--resume: the checkpoint '{last}' was written with other settings (trainer.max_steps: 12 then, 20 now)" in err
    assert "Resume with the same options, or drop --resume to start over" in err
    assert last.read_bytes() == before


def test_resume_of_a_finished_run_is_refused(reference: Path, tiny_pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(reference)
    assert main(register_argv(tiny_pair, reference, "--resume")) == 2
    assert "already holds results" in capsys.readouterr().err
    assert snapshot(reference) == before


# -- non-finite values ------------------------------------------------------------------------------------
def test_non_finite_loss_stops_with_the_step_and_writes_nothing(
    reference: Path, tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)  # earlier results that --overwrite would replace
    before = snapshot(out)
    _diverge_from_step(monkeypatch, 4)
    capsys.readouterr()
    assert main(register_argv(tiny_pair, out, "--overwrite")) == 1
    err = capsys.readouterr().err
    assert "nir: error: non-finite loss at step 4" in err and "lower model.lr" in err
    assert "Traceback" not in err
    assert snapshot(out) == before  # no output replaced, none with NaN


def test_nan_field_is_never_written(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    pair = load_pair(tiny_pair["fixed"], tiny_pair["moving"])
    field = DisplacementField(width=8, num_frequencies=2)
    with torch.no_grad():
        field.mlp.output.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite values; refusing to write"):
        evaluate(field, pair, hd95=False)
    bad = np.zeros((4, 5, 6, 3), np.float32)
    bad[1, 2, 3, 0] = np.inf
    path = tmp_path / "displacement.nii.gz"
    with pytest.raises(FloatingPointError, match=r"refusing to write .*displacement\.nii\.gz.*1 non-finite"):
        save_displacement_itk(bad, np.eye(4), path)
    assert list(tmp_path.iterdir()) == []
