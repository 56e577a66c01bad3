"""What a new user meets first: `nir --help`, progress in logs, threads, and bad input that writes nothing.

Each case is one of the surprises of the "newcomer's first hour" report; the tests pin the fix.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nir_lightning import register_pair
from nir_lightning.app.threads import usable_cores
from nir_lightning.cli import main
from nir_lightning.errors import InputError

FAST = ["--trainer.max_steps=4", "--checkpoint-every=0", "--model.field.init_args.width=16", "--model.field.init_args.levels=3"]
FAST_OVERRIDES = {"trainer.max_steps": 4, "model.field.init_args.width": 16, "model.field.init_args.levels": 3}
PROGRESS = re.compile(r"^nir: step (\d+)/(\d+) \((\d+)%\), loss -?\d+\.\d{4}, \d+:\d\d elapsed, ~\d+:\d\d left, (\d+) threads?$")


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("register", "register-many", "apply", "compare", "fit", "validate", "test", "predict"):
        assert re.search(rf"^  {re.escape(command)} +\S", out, re.MULTILINE), f"{command} missing from:\n{out}"


def test_missing_file_fails_fast_before_heavy_imports_and_writes_nothing(tmp_path: Path, tiny_pair: dict[str, Path]) -> None:
    out = tmp_path / "out"
    probe = (
        "import sys, time; t = time.perf_counter()\n"
        "from nir_lightning.cli import main\n"
        f"rc = main(['register', '--fixed', {str(tiny_pair['fixed'])!r}, '--moving', 'missing.nii.gz', '--output', {str(out)!r}])\n"
        "heavy = sorted(m for m in ('pytorch_lightning', 'monai', 'wandb', 'torch') if m in sys.modules)\n"
        "print(rc, heavy, round(time.perf_counter() - t, 2))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout.startswith("2 []"), (proc.stdout, proc.stderr)  # exit 2, none of the heavy modules loaded
    assert "moving image not found: 'missing.nii.gz'" in proc.stderr
    assert not out.exists()


def _four_d(tiny_pair: dict[str, Path], tmp_path: Path) -> Path:
    img = nib.load(str(tiny_pair["moving"]))
    data = np.stack([np.asarray(img.dataobj)] * 3, axis=-1)
    path = tmp_path / "moving_4d.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return path


def test_bad_inputs_leave_no_output_folder(tiny_pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    cases = {
        "typo": (["--fixed", str(tiny_pair["fixed"]) + "x", "--moving", str(tiny_pair["moving"])], "fixed image not found"),
        "4d": (["--fixed", str(tiny_pair["fixed"]), "--moving", str(_four_d(tiny_pair, tmp_path))], "is 4D"),
        "one_label_map": (["--fixed", str(tiny_pair["fixed"]), "--moving", str(tiny_pair["moving"]), "--fixed-labels", str(tiny_pair["fixed_labels"])],
                          "--fixed-labels was given without --moving-labels: Dice needs both label maps"),
        "bad_threads": (["--fixed", str(tiny_pair["fixed"]), "--moving", str(tiny_pair["moving"]), "--threads", "0"], "--threads must be >= 1"),
    }
    for name, (argv, message) in cases.items():
        capsys.readouterr()
        assert main(["register", *argv, "--output", str(out), *FAST]) == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
        assert not out.exists(), f"{name}: {sorted(p.name for p in out.rglob('*'))}"


def test_too_many_threads_are_refused(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"more than the {usable_cores()} CPU cores this process may use"):
        register_pair(tiny_pair["fixed"], tiny_pair["moving"], output=tmp_path / "o", threads=usable_cores() + 1)


def test_progress_lines_in_a_log_and_overwrite_replaces_the_logs(tiny_pair: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    for _ in range(2):
        assert main(["register", "--fixed", str(tiny_pair["fixed"]), "--moving", str(tiny_pair["moving"]), "--output", str(out),
                     "--overwrite", "--progress", "line", "--threads", "1", *FAST]) == 0
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("nir: step")]
    parsed = [PROGRESS.match(ln) for ln in lines]
    assert all(parsed), lines
    steps = [int(m.group(1)) for m in parsed if m]
    assert steps == [1, 2, 3, 4] * 2  # every 5 % of 4 steps is every step; the last step always prints
    assert {m.group(4) for m in parsed if m} == {"1"}
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["version_0"]  # --overwrite replaced, did not pile up
    assert json.loads((out / "metrics.json").read_text())["torch_threads"] == 1


def test_register_pair_takes_in_memory_images_and_returns_the_result(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    fixed, moving = nib.load(str(tiny_pair["fixed"])), nib.load(str(tiny_pair["moving"]))
    result = register_pair(fixed, moving, fixed_labels=str(tiny_pair["fixed_labels"]), moving_labels=str(tiny_pair["moving_labels"]),
                           output=tmp_path / "out", overrides=FAST_OVERRIDES, checkpoint_every=0, threads=1, quiet=True)
    assert result.output == tmp_path / "out" and (result.output / "metrics.json").is_file()
    assert result.metrics == json.loads((result.output / "metrics.json").read_text())
    assert result.metrics["steps"] == 4 and result.dice_after is not None
    assert tuple(result.result.phi.shape) == (*result.pair.shape, 3)
