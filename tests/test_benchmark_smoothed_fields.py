"""``benchmarks/smoothed_fields.py`` smooths every method's field alike and scores it with the harness.

The smoothing keeps an affine field exactly and lowers the roughness of a noisy one. On a pair
whose moving cubes sit 2 mm along x, a constant 2 mm field scores Dice 1 at every sigma (a
constant is affine), and the same field with voxel noise added scores less, with an SDlogJ that
falls as sigma grows; the table reads each method's curve at the other's SDlogJ.
"""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import smoothed_fields

from nir_lightning.io import save_displacement_itk
from tests.test_benchmark_common_labels import N, cube_pair


def test_the_docstrings() -> None:
    assert doctest.testmod(smoothed_fields).failed == 0


def test_an_affine_field_is_kept_and_noise_is_smoothed() -> None:
    rng = np.random.default_rng(0)
    idx = np.stack(np.meshgrid(*(np.arange(14.0),) * 3, indexing="ij"), -1)
    affine = (idx @ rng.normal(0, 0.05, (3, 3)) + rng.normal(0, 2, 3)).astype(np.float32)
    assert smoothed_fields.smooth_field(affine, 0.0) is affine
    np.testing.assert_allclose(smoothed_fields.smooth_field(affine, 1.0), affine, atol=1e-5)
    noisy = affine + rng.normal(0, 0.3, affine.shape).astype(np.float32)
    rough = [float(np.std(smoothed_fields.smooth_field(noisy, s) - affine)) for s in (0.0, 0.5, 1.0)]
    assert rough[0] > rough[1] > rough[2] and rough[2] < 0.3 * rough[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pairs CSV and a run folder with two 'methods': a constant 2 mm shift, and that shift plus noise."""
    d = tmp_path_factory.mktemp("smoothed")
    files = cube_pair(d)
    csv = d / "pairs.csv"
    csv.write_text("name,fixed,moving,fixed_labels,moving_labels\np," + ",".join(files[k] for k in ("fixed", "moving", "fixed_labels", "moving_labels")) + "\n")
    rng = np.random.default_rng(1)
    shift = np.zeros((N, N, N, 3), np.float32)
    shift[..., 0] = 2.0
    for method, disp in (("exact", shift), ("noisy", shift + rng.normal(0, 0.4, shift.shape).astype(np.float32))):
        (d / "run" / "p" / method).mkdir(parents=True)
        save_displacement_itk(disp, np.eye(4), d / "run" / "p" / method / "displacement.nii.gz")
    return csv, d / "run"


def test_main_scores_each_method_at_each_sigma(run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv, folder = run
    png = tmp_path / "curves.png"
    argv = [str(folder), "--pairs", str(csv), "--methods", "exact,noisy", "--sigmas", "0,0.5,1", "--threads", "1", "--plot", str(png)]
    assert smoothed_fields.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    for s in ("0", "0.5", "1"):  # a constant field is affine: every sigma aligns the cubes, with no deformation
        assert f"| exact | {s} | 1.0000 | 1.0000 | 0.000 | 0 |" in lines
    noisy = [line.split(" | ") for line in lines if line.startswith("| noisy | ") and "(" not in line]
    assert len(noisy) == 3
    sdlogj = [float(cells[4]) for cells in noisy]
    dice = [float(cells[2]) for cells in noisy]
    assert sdlogj[0] > sdlogj[1] > sdlogj[2] > 0  # smoother as sigma grows
    assert dice[0] < 1.0 and dice[2] > dice[0]  # the noise cost Dice; smoothing it away gives some back
    curve = next(line for line in lines if line.startswith("| noisy | ") and "(" in line)
    assert curve.split(" | ")[1] == "", "the noisy curve never gets as smooth as the exact field's 0: blank"


@pytest.mark.parametrize(("sigmas", "message"), [("0,a", "must be numbers"), ("-1", "must be >= 0")])
def test_bad_sigmas_are_refused(run: tuple[Path, Path], sigmas: str, message: str) -> None:
    csv, folder = run
    with pytest.raises(SystemExit, match=f"--sigmas {message}"):
        smoothed_fields.main([str(folder), "--pairs", str(csv), "--sigmas", sigmas])


def test_a_missing_method_is_named_before_scoring(run: tuple[Path, Path]) -> None:
    csv, folder = run
    with pytest.raises(SystemExit, match=r"no ants/displacement.nii.gz for pair 'p'"):
        smoothed_fields.main([str(folder), "--pairs", str(csv), "--methods", "exact,ants"])
