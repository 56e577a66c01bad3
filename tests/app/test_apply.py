"""``nir apply``: a hand-made registration result applied through the command line.

The result folder holds what ``nir register`` writes (displacement.nii.gz in ITK's LPS,
affine.mat, metrics.json, and for the inverse inverse_displacement.nii.gz); the output must be
exactly what ``core.transform_chain.resample`` gives for the same chain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import zoom
from scipy.spatial.transform import Rotation

from nir_lightning.app.apply import apply_transform
from nir_lightning.cli import main
from nir_lightning.coords import voxel_to_world, world_to_voxel
from nir_lightning.core.transform_chain import DisplacementStep, MatrixStep, Step, resample, transform_points
from nir_lightning.errors import InputError
from nir_lightning.io import load_displacement_itk, save_displacement_itk, save_itk_affine, save_nifti

FIXED_SHAPE = (16, 17, 15)
MOVING_SHAPE = (22, 21, 22)  # larger: the fixed grid maps inside it


def f32(a: np.ndarray) -> np.ndarray:
    """An affine as a NIfTI header stores it (float32): what nibabel reads back."""
    return a.astype(np.float32).astype(np.float64)


def grid_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float], angles: tuple[float, float, float]) -> np.ndarray:
    """An oblique grid centred on the world origin."""
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return f32(a)


FIXED_AFFINE = grid_affine(FIXED_SHAPE, (1.0, 1.1, 1.2), (4, -3, 2))
MOVING_AFFINE = grid_affine(MOVING_SHAPE, (1.1, 1.0, 1.0), (-2, 5, 1))


def world_matrix() -> np.ndarray:
    w = np.eye(4)
    w[:3, :3] = 1.02 * Rotation.from_euler("xyz", (2, -3, 1.5), degrees=True).as_matrix()
    w[:3, 3] = (0.6, -0.5, 0.4)
    return w


def smooth_displacement(scale: float, seed: int = 0) -> np.ndarray:
    coarse = np.random.default_rng(seed).normal(size=(3, 3, 3, 3))
    factors = [n / 3 for n in FIXED_SHAPE] + [1]
    return (scale * zoom(coarse, factors, order=3)).astype(np.float32)  # (D0, D1, D2, 3) RAS mm


def smooth_image(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """A smooth function of world position, so images on different grids show the same object."""
    v = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    x, y, z = np.moveaxis(voxel_to_world(v, affine), -1, 0)
    return (np.sin(x / 6.0) + np.cos(y / 7.0) * np.sin(z / 5.0 + 1.0)).astype(np.float32)


def inverse_of(disp: np.ndarray, iterations: int = 40) -> np.ndarray:
    """``v`` with ``q + v(q) = p`` whenever ``q = p + u(p)``: the fixed point of ``v = -u(q + v(q))``."""
    v = np.stack(np.meshgrid(*[np.arange(n) for n in FIXED_SHAPE], indexing="ij"), axis=-1).astype(np.float64)
    q = voxel_to_world(v, FIXED_AFFINE).reshape(-1, 3)
    step = DisplacementStep(disp, FIXED_AFFINE)
    inv = np.zeros_like(q)
    for _ in range(iterations):
        inv = -(transform_points(q + inv, [step]).numpy() - (q + inv))
    return inv.reshape(disp.shape).astype(np.float32)


def make_result(folder: Path, disp: np.ndarray, *, world: np.ndarray | None = None, inverse: np.ndarray | None = None, metrics: bool = True) -> Path:
    folder.mkdir()
    save_displacement_itk(disp, FIXED_AFFINE, folder / "displacement.nii.gz")
    if world is not None:
        save_itk_affine(world, folder / "affine.mat")
    if inverse is not None:
        save_displacement_itk(inverse, FIXED_AFFINE, folder / "inverse_displacement.nii.gz")
    if metrics:
        (folder / "metrics.json").write_text(json.dumps({"dice": None}))
    return folder


@pytest.fixture()
def case(tmp_path: Path) -> dict[str, Any]:
    disp = smooth_displacement(0.8)  # up to 1.9 mm, invertible (no folding)
    moving = smooth_image(MOVING_SHAPE, MOVING_AFFINE)
    labels = np.digitize(moving, [-1.0, 0.0, 0.8]).astype(np.int16) * 3  # labels 0, 3, 6, 9
    save_nifti(moving, MOVING_AFFINE, tmp_path / "moving.nii.gz")
    save_nifti(labels, MOVING_AFFINE, tmp_path / "moving_labels.nii.gz")
    save_nifti(smooth_image(FIXED_SHAPE, FIXED_AFFINE), FIXED_AFFINE, tmp_path / "fixed.nii.gz")
    result = make_result(tmp_path / "result", disp, world=world_matrix(), inverse=inverse_of(disp))
    return {"tmp": tmp_path, "result": result, "disp": disp, "moving": moving, "labels": labels}


def run(case: dict[str, Any], *extra: str, input: str = "moving.nii.gz", reference: str = "fixed.nii.gz", output: str = "out.nii.gz") -> int:
    tmp = case["tmp"]
    return main(["apply", "--transform", str(case["result"]), "--input", str(tmp / input), "--reference", str(tmp / reference), "--output", str(tmp / output), *extra])


def load(path: Path) -> np.ndarray:
    img: Any = nib.load(str(path))
    return np.asarray(img.dataobj)


def forward_chain(case: dict[str, Any]) -> list[Step]:
    return [DisplacementStep(case["disp"], FIXED_AFFINE), MatrixStep(world_matrix())]


def test_forward_output_is_bitwise_the_resampled_image(case: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(case) == 0
    out = case["tmp"] / "out.nii.gz"
    assert f"nir apply: wrote {out}" in capsys.readouterr().out
    expected = resample(torch.from_numpy(case["moving"])[None], MOVING_AFFINE, FIXED_SHAPE, FIXED_AFFINE, forward_chain(case))[0].numpy()
    got = load(out)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    img: Any = nib.load(str(out))
    np.testing.assert_array_equal(img.affine, FIXED_AFFINE)
    assert np.count_nonzero(got) > 0.8 * got.size  # the chain keeps most voxels inside the moving image


@pytest.mark.parametrize("mode", ["label", "nearest"])
def test_label_maps_keep_their_type_and_values(case: dict[str, Any], mode: str) -> None:
    assert run(case, "--interpolation", mode, input="moving_labels.nii.gz") == 0
    got = load(case["tmp"] / "out.nii.gz")
    image = torch.from_numpy(case["labels"].astype(np.float32))[None]
    expected = resample(image, MOVING_AFFINE, FIXED_SHAPE, FIXED_AFFINE, forward_chain(case), mode=mode)[0].numpy()  # type: ignore[arg-type]
    assert got.dtype == np.int16 and np.array_equal(got, expected.astype(np.int16))
    assert set(np.unique(got)) <= {0, 3, 6, 9} and len(np.unique(got)) == 4


def test_inverse_maps_a_forward_warped_image_back(case: dict[str, Any]) -> None:
    """moving -> fixed (forward) -> moving (inverse) returns the image up to two trilinear
    interpolations (the inverse field itself is converged to < 1e-7 mm inside): measured max
    0.023, mean 0.0072 on values in [-2, 2] over the ~2400 moving voxels whose inverse point lies
    1.5 voxels inside the fixed grid. Bound: max 0.05, mean 0.015."""
    assert run(case, output="forward.nii.gz") == 0
    assert run(case, "--inverse", input="forward.nii.gz", reference="moving.nii.gz", output="back.nii.gz") == 0
    back = load(case["tmp"] / "back.nii.gz")
    # moving voxels whose inverse point lies well inside the fixed grid
    v = np.stack(np.meshgrid(*[np.arange(n) for n in MOVING_SHAPE], indexing="ij"), axis=-1).astype(np.float64)
    inv = case["result"] / "inverse_displacement.nii.gz"
    chain: list[Step] = [MatrixStep(world_matrix()).inverse(), DisplacementStep(*load_displacement_itk(inv))]
    fv = world_to_voxel(transform_points(voxel_to_world(v, MOVING_AFFINE).reshape(-1, 3), chain).numpy(), FIXED_AFFINE)
    keep = ((fv >= 1.5) & (fv <= np.asarray(FIXED_SHAPE) - 2.5)).all(axis=-1).reshape(MOVING_SHAPE)
    assert keep.sum() > 1000
    err = np.abs(back - case["moving"])[keep]
    assert err.max() < 0.05 and err.mean() < 0.015, (err.max(), err.mean())
    # the other order, [u^-1, W^-1], does not invert: the test can tell
    fwd = torch.from_numpy(load(case["tmp"] / "forward.nii.gz"))[None]
    wrong = resample(fwd, FIXED_AFFINE, MOVING_SHAPE, MOVING_AFFINE, chain[::-1])[0].numpy()
    assert np.abs(wrong - case["moving"])[keep].mean() > 2 * err.mean()  # measured 0.021 vs 0.0072


def test_an_affine_only_result_can_be_inverted_without_an_inverse_file(case: dict[str, Any]) -> None:
    tmp = case["tmp"]
    case["result"] = make_result(tmp / "affine_only", np.zeros((*FIXED_SHAPE, 3), np.float32), world=world_matrix())
    assert run(case, "--inverse", input="fixed.nii.gz", reference="moving.nii.gz") == 0
    fixed = torch.from_numpy(smooth_image(FIXED_SHAPE, FIXED_AFFINE))[None]
    expected = resample(fixed, FIXED_AFFINE, MOVING_SHAPE, MOVING_AFFINE, [MatrixStep(world_matrix()).inverse()])[0].numpy()
    assert np.array_equal(load(tmp / "out.nii.gz"), expected)


def test_a_result_without_affine_mat_uses_the_identity(case: dict[str, Any]) -> None:
    tmp = case["tmp"]
    case["result"] = make_result(tmp / "no_affine", case["disp"])
    apply_transform(case["result"], tmp / "moving.nii.gz", tmp / "fixed.nii.gz", tmp / "out.nii.gz")
    chain = [DisplacementStep(case["disp"], FIXED_AFFINE)]
    expected = resample(torch.from_numpy(case["moving"])[None], MOVING_AFFINE, FIXED_SHAPE, FIXED_AFFINE, chain)[0].numpy()
    assert np.array_equal(load(tmp / "out.nii.gz"), expected)


def refused(case: dict[str, Any], capsys: pytest.CaptureFixture[str], *extra: str, **kw: str) -> str:
    assert run(case, *extra, **kw) == 2
    assert not (case["tmp"] / kw.get("output", "out.nii.gz")).exists() or kw.get("output") == kw.get("input")
    return capsys.readouterr().err


def test_bad_results_are_refused_with_the_fix(case: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    tmp = case["tmp"]
    result = case["result"]
    case["result"] = tmp / "nope"
    assert "--transform" in (err := refused(case, capsys)) and "not found" in err and "finished `nir register`" in err
    case["result"] = tmp / "fixed.nii.gz"
    assert "is not a folder" in refused(case, capsys)
    case["result"] = make_result(tmp / "unfinished", case["disp"], metrics=False)
    err = refused(case, capsys)
    assert "incomplete registration result (no metrics.json)" in err and "--resume" in err
    (tmp / "no_disp").mkdir()
    (tmp / "no_disp" / "metrics.json").write_text("{}")
    case["result"] = tmp / "no_disp"
    assert "no displacement.nii.gz" in refused(case, capsys)
    case["result"] = make_result(tmp / "not_invertible", case["disp"], world=world_matrix())
    err = refused(case, capsys, "--inverse", input="fixed.nii.gz", reference="moving.nii.gz")
    assert "no inverse_displacement.nii.gz" in err and "not invertible: register with -c configs/model/diffeomorphic.yaml for an inverse" in err
    case["result"] = result


def test_bad_references_inputs_and_outputs_are_refused(case: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    tmp = case["tmp"]
    err = refused(case, capsys, reference="moving.nii.gz")
    assert "--reference" in err and "belongs to another reference grid" in err and "fixed image" in err
    shifted = FIXED_AFFINE.copy()
    shifted[0, 3] += 0.01  # same shape, 0.01 mm off
    save_nifti(np.zeros(FIXED_SHAPE, np.float32), shifted, tmp / "shifted.nii.gz")
    assert "belongs to another reference grid" in refused(case, capsys, reference="shifted.nii.gz")
    err = refused(case, capsys, input="moving.nii.gz", output="moving.nii.gz")
    assert "same file as the input" in err and "never overwritten" in err
    assert "does not exist" in refused(case, capsys, output="missing/out.nii.gz")
    assert "must end in .nii or .nii.gz" in refused(case, capsys, output="out.png")
    assert "--interpolation 'cubic'" in refused(case, capsys, "--interpolation", "cubic")
    assert "not integer-valued" in refused(case, capsys, "--interpolation", "label")
    save_nifti(np.zeros((*MOVING_SHAPE, 2), np.float32), MOVING_AFFINE, tmp / "4d.nii.gz")
    assert "4D" in refused(case, capsys, input="4d.nii.gz")
    with pytest.raises(InputError, match="would overwrite displacement.nii.gz"):
        apply_transform(case["result"], tmp / "moving.nii.gz", tmp / "fixed.nii.gz", case["result"] / "displacement.nii.gz")


def test_the_wrong_interpolation_for_the_values_is_warned_about(case: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """An 8-bit-like image (the smooth image scaled to 0-255, integers) under ``label``, and the
    label map under ``linear``, write their output and warn; the suited modes do not warn."""
    tmp = case["tmp"]
    grey = np.round(255 * (case["moving"] + 2) / 4).astype(np.int16)  # ~1 grey value per 0.016 of the smooth image
    save_nifti(grey, MOVING_AFFINE, tmp / "grey.nii.gz")

    def warnings_of(*extra: str, input: str) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="nir_lightning.app.apply"):
            assert run(case, *extra, input=input) == 0
        assert (tmp / "out.nii.gz").exists()
        (tmp / "out.nii.gz").unlink()
        return [r.getMessage() for r in caplog.records]

    (msg,) = warnings_of("--interpolation", "label", input="grey.nii.gz")
    assert msg.startswith(f"--input '{tmp / 'grey.nii.gz'}' looks like an intensity image") and "Use --interpolation linear" in msg
    assert f"each of its {np.unique(grey).size} values" in msg
    (msg,) = warnings_of(input="moving_labels.nii.gz")  # linear, the default
    assert "looks like a label map (4 integer values" in msg and "use --interpolation label (or nearest)" in msg
    assert warnings_of("--interpolation", "label", input="moving_labels.nii.gz") == []
    assert warnings_of("--interpolation", "nearest", input="grey.nii.gz") == []
    assert warnings_of(input="grey.nii.gz") == []
    assert warnings_of(input="moving.nii.gz") == []
    mask = (case["labels"] > 0).astype(np.uint8)  # a binary mask: linear gives partial volumes, which is legitimate
    save_nifti(mask, MOVING_AFFINE, tmp / "mask.nii.gz")
    assert warnings_of(input="mask.nii.gz") == []
