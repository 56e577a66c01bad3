"""NIfTI input/output: checks on what users give us, atomic writes, ITK-style fields."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from nir_lightning.coords import ras_to_lps
from nir_lightning.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_image_file(path: str | os.PathLike[str], role: str) -> Path:
    """Fail early, with a clear message, on a path that is not a readable NIfTI file."""
    p = Path(path).expanduser()
    if not p.exists():
        hint = "" if p.is_absolute() else f" (relative paths start from {Path.cwd()})"
        raise InputError(f"{role} image not found: '{p}'. Check the path{hint}.")
    if p.is_dir():
        raise InputError(f"{role} image '{p}' is a directory; give a .nii or .nii.gz file.")
    if not p.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"{role} image '{p}' is not a NIfTI file (.nii or .nii.gz); convert it first, e.g. with SimpleITK or dcm2niix.")
    try:
        nib.load(str(p))
    except Exception as exc:  # nibabel raises several types for bad headers
        raise InputError(f"{role} image '{p}' could not be read as NIfTI ({exc}). Is the file complete and not corrupted?") from exc
    return p


def check_affine(affine: np.ndarray, role: str, path: str | os.PathLike[str]) -> np.ndarray:
    """A 4x4 affine that is finite and invertible, or a clear error."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"{role} image '{path}' has a non-finite or malformed affine {a.tolist()}; fix the NIfTI header (qform/sform).")
    if abs(np.linalg.det(a[:3, :3])) < 1e-8:
        raise InputError(f"{role} image '{path}' has a singular affine (zero voxel size or collinear axes); fix the NIfTI header (qform/sform).")
    return a


def check_volume(data: np.ndarray, role: str, path: str | os.PathLike[str]) -> np.ndarray:
    """Squeeze trailing singleton axes and require a finite, non-constant 3D volume."""
    arr = np.asarray(data)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputError(f"{role} image '{path}' has shape {tuple(np.shape(data))}; a 3D volume is expected (one channel, no time axis). Split 4D/multi-channel files first, e.g. with nibabel or fslsplit.")
    if min(arr.shape) < 2:
        raise InputError(f"{role} image '{path}' has shape {arr.shape}; every axis needs at least 2 voxels for 3D registration.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{role} image '{path}' has non-numeric dtype {arr.dtype}.")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{role} image '{path}' contains {bad} NaN/Inf voxels; replace them (e.g. numpy.nan_to_num) before registering.")
    if np.ptp(arr) == 0:
        raise InputError(f"{role} image '{path}' is constant (all voxels = {arr.flat[0]}); there is nothing to register.")
    return arr


def check_label_volume(data: np.ndarray, role: str, path: str | os.PathLike[str]) -> np.ndarray:
    """A 3D integer-valued label map with at least one non-zero label, as int32."""
    arr = np.asarray(data)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputError(f"{role} label map '{path}' has shape {tuple(np.shape(data))}; a 3D integer label map is expected.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(f"{role} label map '{path}' is not integer-valued (dtype {arr.dtype}); pass a segmentation, not an image or a probability map.")
    if not np.any(arr):
        raise InputError(f"{role} label map '{path}' is empty (all zero); pass a label map with at least one structure.")
    return arr.astype(np.int32)


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    A crash while writing leaves the old file (or none), never a truncated one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    # mkstemp creates 0600; outputs should get the permissions any new file gets (umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str], *, intent: str | None = None) -> None:
    """Write ``array`` with ``affine`` (used as both sform and qform) atomically."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    if intent is not None:
        img.header.set_intent(intent)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def save_displacement_itk(disp_ras_mm: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a displacement ``(D0, D1, D2, 3)`` given in RAS millimetres as an ITK/ANTs field.

    On disk: shape ``(D0, D1, D2, 1, 3)``, float32, intent ``vector``, components in LPS mm
    (what ``antsApplyTransforms``, ``sitk.DisplacementFieldTransform`` and
    ``itk.DisplacementFieldTransform`` expect).
    """
    lps = ras_to_lps(np.asarray(disp_ras_mm, dtype=np.float32))
    save_nifti(lps[:, :, :, None, :], affine, path, intent="vector")


def load_displacement_itk(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a field written by :func:`save_displacement_itk`: ``(D0, D1, D2, 3)`` RAS mm and the affine."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != 3:
        raise InputError(f"'{path}' is not an ITK displacement field (expected shape (X, Y, Z, 1, 3), got {data.shape}).")
    return ras_to_lps(data[:, :, :, 0, :]), img.affine
