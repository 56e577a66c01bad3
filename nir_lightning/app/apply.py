"""``nir apply``: apply a registration result to another image or label map (like ``antsApplyTransforms``).

Forward (default): an image in the moving space of the registration (the moving image, its
labels, another contrast of the same session) onto the fixed grid, through
``[displacement.nii.gz, affine.mat]``, which is
``antsApplyTransforms -i IMAGE -r FIXED -t RESULT/displacement.nii.gz -t RESULT/affine.mat``.

Inverse (``--inverse``): an image in the fixed space onto a moving-space grid, through
``[W^-1, inverse_displacement.nii.gz]``, which is ``antsApplyTransforms -i IMAGE -r MOVING
-t [RESULT/affine.mat,1] -t RESULT/inverse_displacement.nii.gz``.

The path is "load files -> build chain -> :func:`~nir_lightning.core.transform_chain.resample`
-> save" with no other arithmetic on the image, so applying a result to its own moving image
gives ``warped.nii.gz`` bit for bit (when that was resampled from the same float32 voxels).
Every check runs before anything is loaded or written; each failure is an
:class:`~nir_lightning.errors.InputError` (exit status 2) naming the file or option and the fix.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from nir_lightning.app.lock import lock_file
from nir_lightning.core.transform_chain import (
    RESAMPLE_MODES,
    DisplacementStep,
    MatrixStep,
    ResampleMode,
    Step,
    resample,
)
from nir_lightning.data.checks import check_image_file, read_image_data
from nir_lightning.data.label_like import interpolation_warning
from nir_lightning.errors import InputError
from nir_lightning.evaluation.output_files import OUTPUT_FILES
from nir_lightning.io import load_displacement_itk, load_itk_affine, save_nifti

DISPLACEMENT = "displacement.nii.gz"
INVERSE_DISPLACEMENT = "inverse_displacement.nii.gz"
AFFINE = "affine.mat"
METRICS = "metrics.json"
GRID_ATOL_MM = 1e-3
"""A forward ``--reference`` must match the displacement's grid: same shape, affines within this."""
_FLOAT32_EXACT = 2**24  # integers beyond this do not survive the float32 resampling
log = logging.getLogger(__name__)


def apply_parser() -> argparse.ArgumentParser:
    """Options of ``nir apply``."""
    p = argparse.ArgumentParser(
        prog="nir apply",
        description="Apply the transform of a `nir register` result to an image or label map "
        "(like antsApplyTransforms -t displacement.nii.gz -t affine.mat).",
        epilog="Exit status: 0 done, 2 bad input (nothing written), 1 failure while writing.",
    )
    p.add_argument("--transform", required=True, metavar="RESULT_DIR", help="output folder of `nir register` (with metrics.json)")
    p.add_argument("--input", required=True, help="image to resample (NIfTI): in the moving space, or in the fixed space with --inverse")
    p.add_argument("--reference", required=True,
                   help="image whose grid the output gets: the registration's fixed image, or a moving-space image with --inverse")
    p.add_argument("--output", required=True, help="output image (.nii or .nii.gz); never one of the inputs")
    p.add_argument("--interpolation", default="linear", metavar="MODE",
                   help="linear (default; float32 output), nearest, or label (label maps: each label's indicator "
                   "interpolated linearly, then the most likely label; keeps the input's integer type)")
    p.add_argument("--inverse", action="store_true",
                   help="map a fixed-space image into the moving space (needs inverse_displacement.nii.gz: a diffeomorphic registration)")
    return p


def main(argv: Sequence[str]) -> int:
    """``nir apply``: parse ``argv``, resample, write, print one line; returns 0."""
    args = apply_parser().parse_args(list(argv))
    out = apply_transform(
        args.transform, args.input, args.reference, args.output, interpolation=args.interpolation, inverse=args.inverse,
    )
    direction = "inverse" if args.inverse else "forward"
    print(f"nir apply: wrote {out} ({args.interpolation} interpolation, {direction} transform of {args.transform}, on the grid of {args.reference})", flush=True)
    return 0


def apply_transform(
    transform: str | os.PathLike[str],
    input: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    interpolation: str = "linear",
    inverse: bool = False,
) -> Path:
    """Resample ``input`` onto the grid of ``reference`` through the result in ``transform``; returns the output path.

    See the module docstring for the chains. The output is written atomically (and flushed to
    disk before its rename) while holding a lock beside it (``.<name>.nir.lock``): a second
    ``nir apply`` to the same file stops with a :class:`LockedError`. Float32 for
    ``"linear"``, the input's integer type for ``"nearest"``/``"label"`` (64-bit integers become int32).
    Logs a warning when the input looks like an image under ``"label"`` or like a label map under
    ``"linear"`` (:func:`~nir_lightning.data.label_like.interpolation_warning`).
    """
    mode = check_interpolation(interpolation)
    result = check_result_dir(transform)
    in_path = check_image_file(input, "--input")
    ref_path = check_image_file(reference, "--reference")
    out_path = check_output(output, reads=[in_path, ref_path], result=result)
    with lock_file(out_path, what=f"--output '{out_path}'"):  # one writer: a second `nir apply` to it stops at once
        ref_shape, ref_affine = image_grid(ref_path)
        chain = load_chain(result, inverse=inverse, reference=(ref_path, ref_shape, ref_affine))
        data, in_affine, out_dtype = read_input(in_path, mode)
        warning = interpolation_warning(data, mode, f"--input '{in_path}'")
        if warning:  # a warning, not an error: the values alone cannot prove the intent
            log.warning(warning)

        image = torch.from_numpy(data.astype(np.float32, copy=False))[None]
        warped = resample(image, in_affine, ref_shape, ref_affine, chain, mode=mode)[0].numpy()
        save_nifti(warped.astype(out_dtype, copy=False), ref_affine, out_path)  # temporary, fsync, rename
    return out_path


def check_interpolation(value: str) -> ResampleMode:
    if value not in RESAMPLE_MODES:
        raise InputError(f"--interpolation {value!r} is not an interpolation; use one of: {', '.join(RESAMPLE_MODES)} (label for label maps).")
    return value  # type: ignore[return-value]


def check_result_dir(path: str | os.PathLike[str]) -> Path:
    """A complete ``nir register`` output folder (metrics.json and displacement.nii.gz present)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"--transform '{p}' not found; give the --output folder of a finished `nir register` run.")
    if not p.is_dir():
        raise InputError(f"--transform '{p}' is not a folder; give the --output folder of `nir register` (it holds {DISPLACEMENT} and {METRICS}), not a file in it.")
    missing = [name for name in (METRICS, DISPLACEMENT) if not (p / name).is_file()]
    if missing:
        raise InputError(
            f"--transform '{p}' is an incomplete registration result (no {' and no '.join(missing)}): the run did not finish "
            "or this is another folder. Finish the run (nir register --resume with the same options) or pass a finished one."
        )
    return p


def check_output(output: str | os.PathLike[str], *, reads: Sequence[Path], result: Path) -> Path:
    """A writable new NIfTI path that is none of the files read and none of the result's own files."""
    p = Path(output).expanduser()
    if not p.name.endswith((".nii", ".nii.gz")):
        raise InputError(f"--output '{p}' must end in .nii or .nii.gz (the output is a NIfTI image).")
    if p.is_dir():
        raise InputError(f"--output '{p}' is a folder; give a file name such as '{p / 'warped.nii.gz'}'.")
    if not p.parent.is_dir():
        raise InputError(f"--output '{p}': the folder '{p.parent}' does not exist; create it first (mkdir -p '{p.parent}').")
    for src in reads:
        if p.resolve() == src.resolve() or (p.exists() and os.path.samefile(p, src)):
            raise InputError(f"--output '{p}' is the same file as the input '{src}'; inputs are never overwritten. Choose another --output.")
    if p.resolve().parent == result.resolve() and p.name in (*OUTPUT_FILES, AFFINE):
        raise InputError(f"--output '{p}' would overwrite {p.name} of the registration result '{result}'; choose another name or folder.")
    return p


def image_grid(path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape (trailing singleton axes dropped) and affine of a checked NIfTI file, from its header."""
    img: Any = nib.load(str(path))
    shape = tuple(int(n) for n in img.shape[:3])
    return (shape[0], shape[1], shape[2]), np.asarray(img.affine, dtype=np.float64)


def _load_field(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        return load_displacement_itk(path)
    except InputError:
        raise
    except Exception as exc:  # nibabel/zlib errors of a damaged file
        raise InputError(f"'{path}' could not be read ({exc}); the registration result is damaged. Run the registration again.") from exc


def load_chain(
    result: Path,
    *,
    inverse: bool = False,
    reference: tuple[Path, tuple[int, int, int], np.ndarray] | None = None,
) -> list[Step]:
    """The chain of a registration result: ``[u, W]``, or ``[W^-1, u^-1]`` with ``inverse``.

    ``W`` is ``affine.mat`` (identity without one: the images were aligned by their headers).
    ``reference`` (path, shape, affine) is checked against the displacement's grid (forward only).
    """
    affine_path = result / AFFINE
    world = load_itk_affine(affine_path) if affine_path.exists() else np.eye(4)
    disp, disp_affine = _load_field(result / DISPLACEMENT)
    if not inverse:
        if reference is not None:
            ref_path, ref_shape, ref_affine = reference
            if tuple(disp.shape[:3]) != tuple(ref_shape) or not np.allclose(ref_affine, disp_affine, rtol=0.0, atol=GRID_ATOL_MM):
                raise InputError(
                    f"--reference '{ref_path}' belongs to another reference grid (shape {tuple(ref_shape)}) than the result "
                    f"'{result}' (its {DISPLACEMENT} lies on shape {tuple(disp.shape[:3])}, affine "
                    f"{np.round(disp_affine, 3).tolist()}). Pass the registration's fixed image (or an image on its grid) as --reference."
                )
        return [DisplacementStep(disp, disp_affine), MatrixStep(world)]
    to_fixed = MatrixStep(world).inverse()
    inverse_path = result / INVERSE_DISPLACEMENT
    if inverse_path.is_file():
        inv, inv_affine = _load_field(inverse_path)
        return [to_fixed, DisplacementStep(inv, inv_affine)]
    if np.any(disp):
        raise InputError(
            f"--inverse: the result '{result}' has no {INVERSE_DISPLACEMENT}, and the deformable part is not invertible: "
            "register with -c configs/model/diffeomorphic.yaml for an inverse."
        )
    return [to_fixed]  # an affine-only result: W^-1 is the whole inverse


def read_input(path: Path, mode: ResampleMode) -> tuple[np.ndarray, np.ndarray, np.dtype[Any]]:
    """The 3D voxels of ``--input``, its affine, and the output dtype for ``mode``."""
    img: Any = nib.load(str(path))
    data = read_image_data(path, "--input")
    data = data.reshape(data.shape[:3])  # check_image_file let only trailing singleton axes through
    what = f"--input '{path}'"
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(f"{what} has voxels of type {data.dtype}; a real single-channel image is needed. Convert it (e.g. its magnitude, or grey-scale) first.")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise InputError(f"{what} contains NaN/Inf voxels; replace them (e.g. numpy.nan_to_num) first.")
    integer = np.issubdtype(data.dtype, np.integer)
    if mode == "linear":
        out_dtype: np.dtype[Any] = np.dtype(np.float32)
    else:
        if mode == "label" and not integer and not np.all(data == np.round(data)):
            raise InputError(f"{what} is not integer-valued (dtype {data.dtype}); --interpolation label is for label maps. Use --interpolation linear for images.")
        if data.size and (integer or mode == "label") and max(abs(float(data.min())), abs(float(data.max()))) >= _FLOAT32_EXACT:
            raise InputError(f"{what} has values beyond {_FLOAT32_EXACT}, which would not stay exact; renumber the labels below that first.")
        if integer:
            out_dtype = np.dtype(np.int32) if data.dtype.itemsize == 8 else data.dtype  # NIfTI tools rarely read 64-bit integers
        else:
            out_dtype = np.dtype(np.int32) if mode == "label" else np.dtype(np.float32)
    return data, np.asarray(img.affine, dtype=np.float64), out_dtype
