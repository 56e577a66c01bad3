"""Every category of bad input gets an error that names the file or value, the problem and the fix.

``tests/test_io.py`` checks that the main loaders raise; here each message is held to the full
contract (what, why, how to fix), table-driven, plus the categories it does not cover: 2D/4D/
vector images, RGB/complex/overflowing dtypes, broken headers, non-overlapping grids, label maps
on another grid or with unusable values, and configuration errors seen through ``nir register``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from nir_lightning.cli import main
from nir_lightning.data.checks import check_label_volume, check_volume
from nir_lightning.data.pair import load_pair
from nir_lightning.errors import InputError

Files = dict[str, Path]


def save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: Any = None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine, dtype=dtype), str(path))
    return path


def image(files: Files, key: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(files[key]))
    return np.asarray(img.dataobj), img.affine


def moving_as(files: Files, tmp: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None, dtype: Any = None) -> dict[str, Any]:
    """load_pair arguments with ``data`` saved as the moving image."""
    aff = image(files, "moving")[1] if affine is None else affine
    return {"fixed": files["fixed"], "moving": save(data, aff, tmp / name, dtype=dtype)}


def moving_labels_as(files: Files, tmp: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None, **kw: Any) -> dict[str, Any]:
    aff = image(files, "moving_labels")[1] if affine is None else affine
    return {
        "fixed": files["fixed"], "moving": files["moving"], "fixed_labels": files["fixed_labels"],
        "moving_labels": save(data, aff, tmp / name), **kw,
    }


def raw_file(files: Files, tmp: Path, name: str, content: bytes) -> dict[str, Any]:
    path = tmp / name
    path.write_bytes(content)
    return {"fixed": files["fixed"], "moving": path}


def _moving_bytes(files: Files) -> bytes:
    return Path(files["moving"]).read_bytes()


def _broken_sform(files: Files, tmp: Path, name: str, aff: np.ndarray) -> dict[str, Any]:
    data, _ = image(files, "moving")
    img = nib.Nifti1Image(data.astype(np.float32), None)
    img.header.set_sform(aff, code=1)
    img.header.set_qform(None, code=0)
    path = tmp / name
    nib.save(img, str(path))
    return {"fixed": files["fixed"], "moving": path}


def _shifted(affine: np.ndarray, mm: float) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] += mm
    return out


@dataclass(frozen=True)
class Case:
    """A bad input and the three parts its message must contain (regular expressions)."""

    build: Callable[[Files, Path], dict[str, Any]]
    names: str
    problem: str
    fix: str


M = "moving"
CASES: dict[str, Case] = {
    # paths and files
    "missing_path": Case(lambda f, t: {"fixed": f["fixed"], "moving": t / "no_such_moving.nii.gz"},
                         r"'[^']*no_such_moving\.nii\.gz'", "moving image not found", "Check the path"),
    "missing_path_suffix_typo": Case(lambda f, t: {"fixed": f["fixed"], "moving": Path(f["moving"]).with_name("moving.nii")},
                                     r"moving\.nii'", "not found", r"Did you mean '[^']*moving\.nii\.gz'"),
    "directory": Case(lambda f, t: {"fixed": f["fixed"], "moving": t}, r"moving image '", "is a directory", "dcm2niix"),
    "text_named_nii_gz": Case(lambda f, t: raw_file(f, t, "notes.nii.gz", b"subject 12, scanned twice\n" * 20),
                              r"notes\.nii\.gz", "not gzip-compressed", r"Rename it to \.nii"),
    "garbage_nii": Case(lambda f, t: raw_file(f, t, "garbage.nii", bytes(range(256)) * 8),
                        r"garbage\.nii", "not a readable NIfTI file", "Copy or re-export it"),
    "gzip_of_text": Case(lambda f, t: raw_file(f, t, "text.nii.gz", gzip.compress(b"not an image\n" * 50)),
                         r"text\.nii\.gz", "not a readable NIfTI file", "Copy or re-export it"),
    "empty_file": Case(lambda f, t: raw_file(f, t, "empty.nii.gz", b""), r"empty\.nii\.gz", r"empty file \(0 bytes\)", "Copy the file again"),
    "truncated_nii_gz": Case(lambda f, t: raw_file(f, t, "cut.nii.gz", _moving_bytes(f)[: len(_moving_bytes(f)) // 2]),
                             r"moving image '[^']*cut\.nii\.gz'", "truncated or corrupted", "copy the file again"),
    "truncated_nii": Case(lambda f, t: raw_file(f, t, "cut.nii", gzip.decompress(_moving_bytes(f))[:20000]),
                          r"cut\.nii'", r"truncated \(20000 of \d+ bytes\)", "Copy the file again"),
    # shapes
    "image_2d": Case(lambda f, t: moving_as(f, t, "slice.nii.gz", image(f, M)[0][:, :, 10]),
                     r"slice\.nii\.gz", r"is 2D \(shape \(24, 26\)\)", "Stack the slices"),
    "image_4d_time_series": Case(lambda f, t: moving_as(f, t, "bold.nii.gz", np.stack([image(f, M)[0]] * 3, axis=-1)),
                                 r"bold\.nii\.gz", r"is 4D .*3 volumes along axis 3", "Extract one volume"),
    "image_multichannel_5d": Case(lambda f, t: moving_as(f, t, "vec.nii.gz", np.stack([image(f, M)[0]] * 3, axis=-1)[:, :, :, None, :]),
                                  r"vec\.nii\.gz", "3 components per voxel", "Save one component"),
    "image_one_voxel_thick": Case(lambda f, t: moving_as(f, t, "thin.nii.gz", image(f, M)[0][:, :1, :]),
                                  r"thin\.nii\.gz", "at least 2 voxels", "full volume"),
    # dtypes
    "rgb": Case(lambda f, t: moving_as(f, t, "rgb.nii.gz", _rgb(image(f, M)[0])), r"rgb\.nii\.gz", "non-numeric voxels .*RGB", "grey-scale"),
    "complex": Case(lambda f, t: moving_as(f, t, "cplx.nii.gz", image(f, M)[0].astype(np.complex64)),
                    r"cplx\.nii\.gz", "complex-valued", "magnitude"),
    "float64_beyond_float32": Case(lambda f, t: moving_as(f, t, "huge.nii.gz", image(f, M)[0].astype(np.float64) * 1e300),
                                   r"huge\.nii\.gz", "beyond float32 range", "rescale"),
    # headers
    "singular_affine": Case(lambda f, t: _broken_sform(f, t, "flat.nii.gz", np.diag([2.0, 2.0, 0.0, 1.0])),
                            r"flat\.nii\.gz", "singular affine", r"fix the NIfTI header \(qform/sform\)"),
    "non_finite_affine": Case(lambda f, t: _broken_sform(f, t, "nan_aff.nii.gz", np.where(np.eye(4) > 0, np.nan, 0.0)),
                              r"nan_aff\.nii\.gz", "non-finite or malformed affine", r"fix the NIfTI header \(qform/sform\)"),
    "no_world_overlap": Case(lambda f, t: moving_as(f, t, "far.nii.gz", image(f, M)[0], _shifted(image(f, M)[1], 500.0)),
                             r"far\.nii\.gz", "does not overlap the fixed image .* in world space", "Check the NIfTI headers"),
    # voxel values
    "nan_voxels": Case(lambda f, t: moving_as(f, t, "nan.nii.gz", _with_nan(image(f, M)[0])), r"nan\.nii\.gz", "2 NaN/Inf voxels", "nan_to_num"),
    "constant_image": Case(lambda f, t: moving_as(f, t, "flat_img.nii.gz", np.full(image(f, M)[0].shape, 3.0, np.float32)),
                           r"flat_img\.nii\.gz", r"constant \(all voxels = 3\.0\)", "intended file"),
    # label maps
    "labels_not_integer": Case(lambda f, t: moving_labels_as(f, t, "prob.nii.gz", image(f, "moving_labels")[0] * 0.3),
                               r"moving label map '[^']*prob\.nii\.gz'", "not integer-valued", "pass a segmentation"),
    "labels_on_another_grid": Case(lambda f, t: moving_labels_as(f, t, "shifted_seg.nii.gz", image(f, "moving_labels")[0],
                                                                 _shifted(image(f, "moving_labels")[1], 6.0)),
                                   r"moving label map '[^']*shifted_seg\.nii\.gz'", r"not on the moving image's grid .*centres 10\.4 mm apart",
                                   "pass the segmentation of that image, or resample it"),
    "labels_empty": Case(lambda f, t: moving_labels_as(f, t, "zeros_seg.nii.gz", np.zeros(image(f, M)[0].shape, np.uint8)),
                         r"zeros_seg\.nii\.gz", r"empty \(all zero\)", "at least one structure"),
    "labels_share_none": Case(lambda f, t: moving_labels_as(f, t, "atlas2.nii.gz", _offset_labels(image(f, "moving_labels")[0])),
                              r"fixed_labels\.nii\.gz' and the moving label map '[^']*atlas2\.nii\.gz'", "share no label",
                              "same atlas or protocol"),
    "labels_huge_values": Case(lambda f, t: moving_labels_as(f, t, "big_ids.nii.gz", _huge_labels(image(f, "moving_labels")[0])),
                               r"big_ids\.nii\.gz", r"label values up to 16777216", "Renumber the labels"),
    "labels_4d": Case(lambda f, t: moving_labels_as(f, t, "seg4d.nii.gz", np.stack([image(f, "moving_labels")[0]] * 2, axis=-1)),
                      r"seg4d\.nii\.gz", "is 4D", "Extract one volume"),
    "labels_option_absent_from_both": Case(lambda f, t: {**moving_labels_as(f, t, "ml.nii.gz", image(f, "moving_labels")[0]), "labels": "998,999"},
                                           r"--labels 998,999.*fixed_labels\.nii\.gz.*ml\.nii\.gz", "none of the requested labels",
                                           "fix --labels, or leave it out"),
    "labels_option_without_maps": Case(lambda f, t: {"fixed": f["fixed"], "moving": f["moving"], "labels": "2,3"},
                                       "--labels", "without --fixed-labels/--moving-labels", "give the label maps too"),
}


def _rgb(data: np.ndarray) -> np.ndarray:
    out = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    out["R"] = np.clip(data * 200, 0, 255).astype(np.uint8)
    return out


def _with_nan(data: np.ndarray) -> np.ndarray:
    out = data.astype(np.float32)
    out[3, 4, 5], out[1, 1, 1] = np.nan, np.inf
    return out


def _offset_labels(labels: np.ndarray) -> np.ndarray:
    out = labels.astype(np.int16)
    out[out > 0] += 1000
    return out


def _huge_labels(labels: np.ndarray) -> np.ndarray:
    out = labels.astype(np.int32)
    out[out == 2] = 2**24  # float32 could no longer tell it from 2**24 + 1
    return out


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_message_names_the_input_the_problem_and_the_fix(case: Case, tiny_pair: Files, tmp_path: Path) -> None:
    kwargs = case.build(tiny_pair, tmp_path)
    with pytest.raises(InputError) as info:
        load_pair(**kwargs)
    msg = str(info.value)
    for part in (case.names, case.problem, case.fix):
        assert re.search(part, msg), f"{part!r} not in: {msg}"


# -- what is accepted ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "scale", "offset", "atol"),
    [(np.uint16, 1000, 0, 0.01), (np.int32, 1000, 0, 0.01), (np.float64, 1, 0, 1e-6), (np.int8, 100, -50, 0.03), (np.int64, 10_000, 0, 0.01)],
    ids=["uint16", "int32", "float64", "int8", "int64"],
)
def test_any_real_dtype_is_accepted(tiny_pair: Files, tmp_path: Path, dtype: Any, scale: float, offset: float, atol: float) -> None:
    data, aff = image(tiny_pair, "moving")
    stored = np.round(data * scale + offset).astype(dtype) if scale != 1 else data.astype(dtype)
    ref = load_pair(tiny_pair["fixed"], tiny_pair["moving"])
    pair = load_pair(tiny_pair["fixed"], save(stored, aff, tmp_path / "m.nii.gz", dtype=dtype))
    assert np.array_equal(pair.moving_raw[0, 0].numpy(), stored.astype(np.float32))  # original values kept
    assert np.abs(pair.moving - ref.moving).max() < atol  # same [0, 1] scaling
    assert pair.notes == []


def test_trailing_singleton_axes_are_accepted(tiny_pair: Files, tmp_path: Path) -> None:
    data, aff = image(tiny_pair, "moving")
    pair = load_pair(tiny_pair["fixed"], save(data[..., None, None], aff, tmp_path / "m5d.nii.gz"))
    assert pair.shape == data.shape


def test_bool_and_binary_masks_are_images_with_values_0_1_and_label_maps_with_label_1(tiny_pair: Files, tmp_path: Path) -> None:
    """NIfTI has no bool type (masks are stored as uint8); bool arrays reach the checks from Python."""
    mask = image(tiny_pair, "fixed_labels")[0] > 0
    assert check_volume(mask, "moving", "m").dtype == np.uint8
    labels = check_label_volume(mask, "moving", "m")
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1}
    aff = image(tiny_pair, "fixed")[1]
    f = save(mask.astype(np.uint8), aff, tmp_path / "fmask.nii.gz")
    m = save((image(tiny_pair, "moving_labels")[0] > 0).astype(np.uint8), aff, tmp_path / "mmask.nii.gz")
    pair = load_pair(f, m, fixed_labels=f, moving_labels=m)
    assert pair.labels == [1]
    assert set(np.unique(pair.moving_raw.numpy())) == {0.0, 1.0}


def test_moving_on_another_orientation_is_resampled_exactly_and_the_note_says_how(tiny_pair: Files, tmp_path: Path) -> None:
    """A flipped and axis-permuted copy with the matching affine is the same image in world space."""
    data, aff = image(tiny_pair, "moving")
    flipped = np.flip(data, axis=0).transpose(2, 0, 1)
    # voxel (i, j, k) of the copy is voxel (n0 - 1 - j, k, i) of the original
    n0 = data.shape[0]
    p = np.array([[0, -1, 0, n0 - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    path = save(np.ascontiguousarray(flipped), aff @ p, tmp_path / "reoriented.nii.gz")
    pair = load_pair(tiny_pair["fixed"], path)
    assert np.allclose(pair.moving_raw[0, 0].numpy(), data, atol=1e-4)
    (note,) = pair.notes
    assert "reoriented.nii.gz" in note and "different grid" in note and "orientation" in note and "resampled" in note
    assert "shape (22, 24, 26) vs (24, 26, 22)" in note


def test_partial_field_of_view_is_noted(tiny_pair: Files, tmp_path: Path) -> None:
    data, aff = image(tiny_pair, "moving")
    pair = load_pair(tiny_pair["fixed"], save(data, _shifted(aff, 30.0), tmp_path / "part.nii.gz"))
    assert any(re.search(r"Only \d+% of the fixed grid lies inside", n) for n in pair.notes), pair.notes


# -- through `nir register`: configuration and options ---------------------------------------------------
FAST = ["--trainer.max_steps=2", "--checkpoint-every=0", "--model.field.init_args.width=16", "--model.field.init_args.levels=3"]


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


CLI_CASES: dict[str, tuple[Callable[[Path], list[str]], str, str, str]] = {
    "unknown_key": (lambda t: ["--model.lamda=3"], "'model.lamda'", "unknown option", "did you mean 'model.lam'"),
    "unknown_key_in_config_file": (lambda t: ["-c", _yaml(t / "mine.yaml", "model:\n  lamda: 3\n")],
                                   r"'model\.lamda' \(in '[^']*mine\.yaml'", "unknown option", "did you mean 'model.lam'"),
    "unknown_nested_key": (lambda t: ["--model.sampler=MinipatchSampler", "--model.sampler.init_args.patch_sise=8"],
                           "'model.sampler.init_args.patch_sise'", "unknown option", "did you mean 'model.sampler.init_args.patch_size'"),
    "wrong_type": (lambda t: ["--trainer.max_steps=many"], r"trainer\.max_steps.*many", "Expected a <class 'int'>", "nir fit --print_config"),
    "negative_lam": (lambda t: ["--model.lam=-1"], r"model\.lam .* got -1\.0", "must be a finite number >= 0", "lam=10"),
    "window_larger_than_patch": (lambda t: ["--model.sampler=MinipatchSampler", "--model.sampler.init_args.patch_size=4", "--model.window=9"],
                                 "model.window=9", r"larger than the mini-patch \(4\)", "use a window <= patch_size"),
    "stride_zero": (lambda t: ["--model.sampler=DownsizeSampler", "--model.sampler.init_args.stride=0"],
                    r"model\.sampler\.init_args\.stride .* got 0", "must be >= 1", "stride=3"),
    "ode_without_step_size": (lambda t: ["-c", _yaml(t / "ode.yaml", "model:\n  field:\n    class_path: nir_lightning.fields.GridVelocityField\n"
                                                                   "    init_args:\n      method: rk4\n      step_size: null\n")],
                              r"step_size .* 'rk4'", "required for the fixed-step method", "step_size=0.05"),
    "invalid_network_size": (lambda t: ["--model.field.init_args.width=0"], "width=0", "must be >= 1", "nir fit --print_config"),
    "missing_config_file": (lambda t: ["-c", str(t / "nope.yaml")], r"nope\.yaml", "config file not found", "Check the -c path"),
    "negative_checkpoint_every": (lambda t: ["--checkpoint-every=-5"], "got -5", "--checkpoint-every must be >= 0", "0 disables"),
    "resume_and_overwrite": (lambda t: ["--resume", "--overwrite"], "--resume .* --overwrite", "starts a new one", "pass only one of them"),
    "checkpoints_disabled_in_trainer": (lambda t: ["--checkpoint-every=5", "--trainer.enable_checkpointing=false"], "enable_checkpointing=False",
                                        "found `ModelCheckpoint`", "pass --checkpoint-every 0"),
}


@pytest.mark.parametrize("case", list(CLI_CASES.values()), ids=list(CLI_CASES))
def test_register_rejects_bad_configuration_before_writing(case: tuple, tiny_pair: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra, names, problem, fix = case
    out = tmp_path / "out"
    argv = ["register", "--fixed", str(tiny_pair["fixed"]), "--moving", str(tiny_pair["moving"]), "--output", str(out), *FAST, *extra(tmp_path)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("nir: error:")]
    for part in (names, problem, fix):
        assert re.search(part, line), f"{part!r} not in: {line}"
    assert "Traceback" not in err and "usage:" not in err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_command_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["regsiter", "--fixed", "f.nii.gz"]) == 2
    err = capsys.readouterr().err
    assert "nir: error: unknown command 'regsiter'; use one of: register, " in err and "--help" in err


def test_output_that_is_a_file_is_refused(tiny_pair: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert main(["register", "--fixed", str(tiny_pair["fixed"]), "--moving", str(tiny_pair["moving"]), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "results.txt' exists and is not a folder" in err and "give the path of a folder" in err
    assert out.read_text() == "keep me"


def test_resampling_note_reaches_metrics_json(tiny_pair: Files, tmp_path: Path) -> None:
    data, aff = image(tiny_pair, "moving")
    coarse_aff = aff.copy()
    coarse_aff[:3, :3] *= 2
    moving = save(data[::2, ::2, ::2], coarse_aff, tmp_path / "coarse.nii.gz")
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(tiny_pair["fixed"]), "--moving", str(moving), "--output", str(out), *FAST]) == 0
    notes = json.loads((out / "metrics.json").read_text())["notes"]
    assert any("coarse.nii.gz" in n and "resampled it onto the fixed grid" in n and "spacing (4, 4, 4) vs (2, 2, 2) mm" in n for n in notes), notes
