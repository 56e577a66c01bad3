"""Checks on what users give us: image and label files, label lists.

Each check fails with an :class:`~nir_lightning.errors.InputError` naming the file or option,
the problem and the fix. Only headers are read where that suffices, so a bad input is reported
before anything heavy is loaded or any output is created.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nir_lightning.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_PERCENTILES = (0.5, 99.5)
"""The intensity percentiles mapped to [0, 1] when a pair is loaded (``data.percentiles``)."""


def _nifti_sibling(p: Path) -> Path | None:
    """A file next to ``p`` that differs only in a NIfTI suffix (``x.nii`` given, ``x.nii.gz`` there)."""
    stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.name.removesuffix(".nii")
    for suffix in NIFTI_SUFFIXES:
        cand = p.with_name(stem + suffix)
        if cand != p and cand.is_file():
            return cand
    return None


def check_image_file(path: str | os.PathLike[str], role: str) -> Path:
    """Fail early, with a clear message, on a path that is not a readable NIfTI file.

    Only the header is read here (cheap); data that is cut short is reported by
    :func:`read_image_data`, which :func:`nir_lightning.data.pair.load_pair` calls when loading fails.
    """
    p = Path(path).expanduser()
    if not p.exists():
        sibling = _nifti_sibling(p)
        if sibling is not None:
            hint = f" Did you mean '{sibling}'?"
        else:
            hint = " Check the path" + ("" if p.is_absolute() else f" (relative paths start from {Path.cwd()})") + "."
        raise InputError(f"{role} image not found: '{p}'.{hint}")
    if p.is_dir():
        raise InputError(f"{role} image '{p}' is a directory; give a .nii or .nii.gz file (convert a DICOM series first, e.g. with dcm2niix).")
    if not os.access(p, os.R_OK):
        raise InputError(f"{role} image '{p}' is not readable (permission denied); fix its permissions, e.g. chmod a+r '{p}'.")
    if not p.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"{role} image '{p}' is not a NIfTI file (.nii or .nii.gz); convert it first, e.g. with SimpleITK or dcm2niix.")
    if p.stat().st_size == 0:
        raise InputError(f"{role} image '{p}' is an empty file (0 bytes); a copy or download was probably interrupted. Copy the file again.")
    try:
        img: Any = nib.load(str(p))
    except Exception as exc:  # nibabel raises several types for bad headers
        text = str(exc)
        if "not a gzip file" in text:
            problem = "is named .nii.gz but is not gzip-compressed"
            fix = "Rename it to .nii if it is an uncompressed NIfTI file, or re-export it."
        elif "data code" in text and "not supported" in text:
            problem = f"uses a NIfTI data type that cannot be read ({text})"
            fix = "Re-save it as uint8/int16 (labels, masks) or float32 (images), e.g. with SimpleITK."
        else:
            problem = f"is not a readable NIfTI file ({text})"
            fix = "Is it complete (not cut short by an interrupted copy) and really NIfTI, not renamed from another format? Copy or re-export it."
        raise InputError(f"{role} image '{p}' {problem}. {fix}") from exc
    # MONAI falls back to another affine when the sform is broken; nibabel's view is what the header says.
    check_affine(np.asarray(img.affine), role, p)
    # A 2D/4D/vector file is refused from its header alone, before any output exists.
    what = f"{role.removesuffix(' label')} label map '{p}'" if role.endswith(" label") else f"{role} image '{p}'"
    _squeeze_to_3d(np.broadcast_to(np.float32(0), tuple(int(n) for n in img.shape)), what)
    if p.name.endswith(".nii") and hasattr(img, "header"):
        # Uncompressed: a truncated file shows in its size, no need to read the data.
        hdr = img.header
        expected = int(hdr.get("vox_offset", 0)) + int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * hdr.get_data_dtype().itemsize
        if p.stat().st_size < expected:
            raise InputError(f"{role} image '{p}' is truncated ({p.stat().st_size} of {expected} bytes); a copy or download was probably interrupted. Copy the file again.")
    return p


def read_image_data(path: str | os.PathLike[str], role: str) -> np.ndarray:
    """All voxels of a NIfTI file, or an :class:`InputError` if the data is cut short or corrupted."""
    p = check_image_file(path, role)
    try:
        img: Any = nib.load(str(p))
        return np.asarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(
            f"{role} image '{p}' is truncated or corrupted: its header is readable but its voxel data is not ({exc}). "
            "A copy or download was probably interrupted; copy the file again."
        ) from exc


def check_affine(affine: np.ndarray, role: str, path: str | os.PathLike[str]) -> np.ndarray:
    """A 4x4 affine that is finite and invertible, or a clear error."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"{role} image '{path}' has a non-finite or malformed affine {a.tolist()}; fix the NIfTI header (qform/sform), e.g. copy it from the scan it was derived from.")
    if abs(np.linalg.det(a[:3, :3])) < 1e-8:
        raise InputError(f"{role} image '{path}' has a singular affine (zero voxel size or collinear axes); fix the NIfTI header (qform/sform), e.g. copy it from the scan it was derived from.")
    return a


def _squeeze_to_3d(data: np.ndarray, what: str) -> np.ndarray:
    """Drop trailing singleton axes; a clear error for 2D, 4D (time/channels) and vector data."""
    arr = np.asarray(data)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    shape = tuple(np.shape(data))
    if arr.ndim < 3:
        raise InputError(f"{what} is {arr.ndim}D (shape {shape}); a 3D volume is expected. Stack the slices into one 3D NIfTI file first (e.g. dcm2niix for a DICOM series).")
    if arr.ndim == 4:
        raise InputError(f"{what} is 4D (shape {shape}: {arr.shape[3]} volumes along axis 3, a time series or several channels); a 3D volume is expected. Extract one volume first, e.g. nibabel's img.slicer[..., 0] or fslroi.")
    if arr.ndim == 5 and arr.shape[3] == 1:
        raise InputError(f"{what} has {arr.shape[4]} components per voxel (shape {shape}: a vector or multi-channel image); a single-channel 3D volume is expected. Save one component (or their magnitude) as a 3D file first.")
    if arr.ndim != 3:
        raise InputError(f"{what} has shape {shape}; a 3D volume is expected (one channel, no time axis). Split it into 3D files first, e.g. with nibabel or fslsplit.")
    return arr


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_LABEL_MAX = 2**24  # labels travel as float32 through resampling: integers up to 2**24 stay exact


def check_volume(data: np.ndarray, role: str, path: str | os.PathLike[str]) -> np.ndarray:
    """Squeeze trailing singleton axes and require a finite, non-constant, real 3D volume.

    Any real dtype is accepted (uint8/16, int8-64, float16-64); ``bool`` becomes 0/1.
    """
    what = f"{role} image '{path}'"
    arr = _squeeze_to_3d(data, what)
    if min(arr.shape) < 2:
        raise InputError(f"{what} has shape {arr.shape}; every axis needs at least 2 voxels for 3D registration. Pass the full volume, not a single slice.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{what} is complex-valued ({arr.dtype}); save its magnitude (numpy.abs) as a real image first.")
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{what} has non-numeric voxels (dtype {arr.dtype}, e.g. RGB colour); convert it to a single-channel grey-scale image first.")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int(arr.size - np.count_nonzero(finite))
            raise InputError(f"{what} contains {bad} NaN/Inf voxels; replace them (e.g. numpy.nan_to_num) before registering.")
    lo, hi = arr.min(), arr.max()
    if max(abs(float(lo)), abs(float(hi))) > _FLOAT32_MAX:
        raise InputError(f"{what} has values up to {max(abs(float(lo)), abs(float(hi))):.3g}, beyond float32 range; rescale the intensities first.")
    if lo == hi:
        raise InputError(f"{what} is constant (all voxels = {lo}); there is nothing to register. Check that this is the intended file (not an empty mask or a blank export).")
    return arr


def check_label_volume(data: np.ndarray, role: str, path: str | os.PathLike[str]) -> np.ndarray:
    """A 3D integer-valued label map with at least one non-zero label, as int32 (``bool``: label 1)."""
    what = f"{role} label map '{path}'"
    arr = _squeeze_to_3d(data, what)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{what} has dtype {arr.dtype}; a label map of integers is expected. Pass a segmentation.")
    if np.issubdtype(arr.dtype, np.floating) and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise InputError(f"{what} is not integer-valued (dtype {arr.dtype}); pass a segmentation, not an image or a probability map.")
    if not np.any(arr):
        raise InputError(f"{what} is empty (all zero); pass a label map with at least one structure.")
    extreme = max(abs(float(arr.min())), abs(float(arr.max())))
    if extreme >= _LABEL_MAX:
        raise InputError(f"{what} has label values up to {extreme:.0f}; labels must lie below {_LABEL_MAX} in magnitude. Renumber the labels.")
    return arr.astype(np.int32)


def check_mask_volume(data: np.ndarray, role: str, path: str | os.PathLike[str]) -> np.ndarray:
    """A binary 3D mask (values 0 and 1, or bool) with at least one voxel set, as ``bool``.

    >>> int(check_mask_volume(np.array([0, 1, 1]).reshape(1, 1, 3).repeat(2, 0).repeat(2, 1), "fixed", "m.nii.gz").sum())
    8
    """
    what = f"{role} mask '{path}'"
    arr = _squeeze_to_3d(data, what)
    if arr.dtype == bool:
        out = arr
    else:
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise InputError(f"{what} has dtype {arr.dtype}; a binary mask (0 outside, 1 inside) is expected.")
        values = np.unique(arr)
        if not np.all(np.isin(values, (0, 1))):
            shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
            raise InputError(
                f"{what} is not binary (values {shown}); a mask holds 0 outside and 1 inside. "
                "Threshold it first (e.g. fslmaths mask -bin, or nibabel: (data > 0).astype('uint8')); "
                "pass a label map with --fixed-labels/--moving-labels instead."
            )
        out = arr == 1
    if not out.any():
        raise InputError(f"{what} is empty (no voxel is 1); the similarity would have nothing to count. Pass a mask that covers the region to register.")
    return out


def parse_labels(spec: str | Sequence[int] | None) -> list[int] | None:
    """Labels to evaluate: a TSV/CSV/text file whose first column is the label value
    (a header row is allowed), a comma-separated string, or a sequence of ints.

    >>> parse_labels("2, 3,41")
    [2, 3, 41]
    >>> parse_labels([4, 5])
    [4, 5]
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        return [int(v) for v in spec]
    text = spec.strip()
    path = Path(text).expanduser()
    if path.suffix.lower() in (".tsv", ".csv", ".txt") or path.exists():
        if not path.exists():
            raise InputError(f"label list file not found: '{path}'.")
        labels: list[int] = []
        for i, line in enumerate(path.read_text().splitlines()):
            first = line.replace(",", "\t").split("\t")[0].strip()
            if not first or first.startswith("#"):
                continue
            try:
                labels.append(int(first))
            except ValueError:
                if i == 0:
                    continue  # header row
                raise InputError(f"label list '{path}' line {i + 1}: first column {first!r} is not an integer label.") from None
        if not labels:
            raise InputError(f"label list '{path}' names no labels.")
        return labels
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--labels {spec!r}: expected a TSV file or comma-separated integers like '2,3,41'.") from None
    if not out:
        raise InputError(f"--labels {spec!r} names no labels.")
    return out


# errno values that mean "this output cannot be written here", reported as OutputError
