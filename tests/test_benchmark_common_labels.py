"""``benchmarks/common_labels.py`` scores a field on label maps of another grid, as antsApplyTransforms would.

A 1 mm pair whose moving cubes sit 2 mm along x from the fixed ones, and fields on a 2 mm grid
that spans the same anatomy: a constant 2 mm field aligns the cubes exactly (Dice 1 with both
interpolations), the zero field scores the pair's own overlap (0.75 a cube), and a field of the
wrong sign scores less than that.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common_labels
from harness.score import load_eval_pair

from nir_lightning.io import save_displacement_itk

N = 24  # 1 mm voxels a side


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def cube_pair(d: Path) -> dict[str, str]:
    """Two label cubes at 1 mm, the moving ones 2 voxels (2 mm, RAS x) further along axis 0, and
    noisy images of them: the files' paths, and ``dir``."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fixed = np.zeros((N, N, N), np.int16)
    fixed[6:14, 6:14, 6:14] = 1
    fixed[12:20, 14:20, 10:18] = 2
    moving = np.roll(fixed, 2, axis=0)
    rng = np.random.default_rng(0)
    image = lambda labels: (40.0 * labels + rng.normal(100, 5, labels.shape)).astype(np.float32)
    return {
        "fixed": _write(d / "f.nii.gz", image(fixed), affine),
        "moving": _write(d / "m.nii.gz", image(moving), affine),
        "fixed_labels": _write(d / "fl.nii.gz", fixed, affine),
        "moving_labels": _write(d / "ml.nii.gz", moving, affine),
        "dir": str(d),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return cube_pair(tmp_path_factory.mktemp("common_labels"))


def _result(root: Path, pair: str, shift_mm: float) -> Path:
    """A run folder holding ``pair/nir/displacement.nii.gz``: a constant x shift on a 2 mm grid."""
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 0.5  # 2 mm voxel centres halfway between the 1 mm ones: the same anatomy
    disp = np.zeros((N // 2, N // 2, N // 2, 3), np.float32)
    disp[..., 0] = shift_mm
    folder = root / pair / "nir"
    folder.mkdir(parents=True)
    save_displacement_itk(disp, coarse, folder / "displacement.nii.gz")
    return root


@pytest.mark.parametrize(("shift", "expected"), [(2.0, 1.0), (0.0, 0.75)])
def test_a_coarse_field_is_scored_on_the_fine_labels(files: dict[str, str], tmp_path: Path, shift: float, expected: float) -> None:
    run = _result(tmp_path / "run", "p", shift)
    pair = load_eval_pair(files["fixed"], files["moving"], files["fixed_labels"], files["moving_labels"], None)
    s = common_labels.score_on_labels(common_labels.find_result(run, "p_1mm", "nir"), pair)
    assert s["dice_nn"] == pytest.approx(expected, abs=1e-6)
    assert s["dice_label"] == pytest.approx(expected, abs=1e-6)
    wrong = common_labels.score_on_labels(_result(tmp_path / "wrong", "p", -shift) / "p" / "nir", pair) if shift else None
    if wrong is not None:  # the check can fail: the other sign moves the cubes apart
        assert wrong["dice_nn"] < 0.75 - 0.1


def test_main_prints_each_run_and_the_means(files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _result(tmp_path / "a", "p", 2.0), _result(tmp_path / "b", "p", 0.0)
    csv = tmp_path / "pairs.csv"
    csv.write_text("name,fixed,moving,fixed_labels,moving_labels\n"
                   f"p_1mm,{files['fixed']},{files['moving']},{files['fixed_labels']},{files['moving_labels']}\n")
    assert common_labels.main(["--pairs", str(csv), "--threads", "1", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"| **mean of 1** | {a} | 1.0000 | 1.0000 |" in lines
    assert f"| **mean of 1** | {b} | 0.7500 | 0.7500 |" in lines


def test_a_missing_result_names_the_pair_and_the_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pair 's9-s10_1mm' under .*tried s9-s10_1mm, s9-s10"):
        common_labels.find_result(tmp_path, "s9-s10_1mm", "nir")


def test_main_stops_before_scoring_when_a_result_is_missing(files: dict[str, str], tmp_path: Path) -> None:
    good = _result(tmp_path / "good", "p", 2.0)
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"name,fixed,moving,fixed_labels,moving_labels\np_1mm,{files['fixed']},{files['moving']},{files['fixed_labels']},{files['moving_labels']}\n")
    with pytest.raises(SystemExit, match=r"no nir/displacement.nii.gz for pair 'p_1mm' under .*empty"):
        common_labels.main(["--pairs", str(csv), str(good), str(tmp_path / "empty")])


def test_the_pairs_csv_is_read_as_run_benchmark_names_its_folders(tmp_path: Path) -> None:
    """One reader (``harness.pairs``) for run_benchmark.py and the scripts that read its runs: an
    unnamed row gets the folder name run_benchmark.py wrote (``pair<row>``), not its index."""
    import doctest

    import harness.pairs
    from harness.pairs import read_pairs_csv

    assert doctest.testmod(harness.pairs).failed == 0
    csv = tmp_path / "pairs.csv"
    csv.write_text("name,fixed,moving,fixed_labels,moving_labels,labels\n"
                   "a,2mm/f.nii.gz,/data/m.nii.gz,2mm/fl.nii.gz,2mm/ml.nii.gz,\n"
                   ",f.nii.gz,m.nii.gz,fl.nii.gz,ml.nii.gz,l.tsv\n"
                   "c,f.nii.gz,m.nii.gz,fl.nii.gz,ml.nii.gz,\"2,41\"\n")
    a, b, c = read_pairs_csv(csv)
    assert (a["name"], b["name"], c["name"]) == ("a", "pair2", "c")
    base = tmp_path.resolve()
    assert a["fixed"] == str(base / "2mm" / "f.nii.gz") and a["moving"] == "/data/m.nii.gz" and a["labels"] is None
    assert b["labels"] == str(base / "l.tsv") and c["labels"] == "2,41"  # a TSV made absolute, a list kept
    assert read_pairs_csv(csv, "30.tsv")[1]["labels"] == "30.tsv"  # run_benchmark.py's --labels wins
    csv.write_text("name,fixed,moving,fixed_labels,moving_labels\nx,f.nii.gz,,fl.nii.gz,ml.nii.gz\n")
    with pytest.raises(SystemExit, match=r"common_labels: .*pairs.csv row 2 lacks moving"):
        read_pairs_csv(csv, prog="common_labels")
    csv.write_text("name,fixed,moving,fixed_labels,moving_labels\n")
    with pytest.raises(SystemExit, match="lists no pairs"):
        read_pairs_csv(csv)


def test_an_unnamed_row_finds_the_folder_run_benchmark_wrote(files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _result(tmp_path / "run", "pair1", 2.0)
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"fixed,moving,fixed_labels,moving_labels\n{files['fixed']},{files['moving']},{files['fixed_labels']},{files['moving_labels']}\n")
    assert common_labels.main(["--pairs", str(csv), str(run)]) == 0
    assert "| pair1 |" in capsys.readouterr().out
