"""File output: atomic writes, NIfTI images and ITK/ANTs displacement fields (and reading them back)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from nir_lightning.coords import itk_to_world_matrix, ras_to_lps, world_matrix_to_itk
from nir_lightning.errors import InputError, OutputError

_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for the file system",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def _output_error(exc: OSError, target: Path) -> OutputError:
    problem = _WRITE_ERRORS.get(exc.errno or -1, str(exc))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free space, or choose an --output folder on a disk with room, then run again"
    else:
        fix = "choose a writable --output folder (or fix its permissions), then run again"
    return OutputError(
        f"could not write '{target}': {problem} ({exc.strerror or exc}). Files written before it are complete "
        f"and any earlier '{target.name}' is untouched; {fix}."
    )


def _fsync(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    # Data on disk before the rename: a power cut must not leave a renamed but empty file.
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # some file systems do not let directories be opened; best effort
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success flush it to disk, rename it onto ``path``
    and flush the folder (so the new entry is on disk too before the next file is written).

    A crash, a kill or a power loss while writing leaves the old file (or none), never a truncated
    one; files written one after another reach the disk in that order (``metrics.json`` last). The
    temporary is removed on any error. Disk full, quota, read-only and permission errors are
    raised as :class:`~nir_lightning.errors.OutputError` naming ``path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(target.suffixes) or ".tmp"
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target.name), suffix=suffix, dir=target.parent)
    except OSError as exc:
        if exc.errno in _WRITE_ERRORS:
            raise _output_error(exc, target) from exc
        raise
    os.close(fd)
    try:
        # mkstemp creates 0600; outputs should get the permissions any new file gets (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent, directory=True)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError) and exc.errno in _WRITE_ERRORS:
            raise _output_error(exc, target) from exc
        raise


def temporary_prefix(name: str) -> str:
    """How the temporaries of :func:`atomic_path` for a file called ``name`` begin.

    >>> temporary_prefix("warped.nii.gz")
    '.warped.nii.gz.'
    """
    return f".{name}."


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete temporaries that :func:`atomic_path` left for ``names`` in ``folder`` when a
    process was killed mid-write (SIGKILL skips clean-up); returns what was removed."""
    removed: list[Path] = []
    base = Path(folder)
    if not base.is_dir():
        return removed
    for name in names:
        for tmp in base.glob(f"{temporary_prefix(name)}*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


FIELD_COMPRESSLEVEL = 0
"""gzip level of the float fields (displacements, det J): stored, not deflated. Their float32
mantissas are mostly noise: zlib level 1 took 2.1 s for a 1 mm displacement (83 MB) to save 14 %,
and 0.65 s for det J to save 19 % (2-core AMD EPYC), longer than the scoring it overlaps. The file
stays a ``.nii.gz`` every reader opens; images and labels, which do compress, keep nibabel's level 1."""


def save_nifti(
    array: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str], *, intent: str | None = None, compresslevel: int | None = None
) -> None:
    """Write ``array`` with ``affine`` (used as both sform and qform) atomically; ``compresslevel``
    (0-9) of a ``.gz`` path, by default nibabel's (1).

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "field.nii.gz"
    >>> save_nifti(np.ones((2, 3, 4), np.float32), np.eye(4), path, compresslevel=0)
    >>> float(np.asarray(nib.load(str(path)).dataobj).sum())
    24.0
    """
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    if intent is not None:
        img.header.set_intent(intent)
    with atomic_path(path) as tmp:
        if compresslevel is None or not str(path).endswith(".gz"):
            nib.save(img, str(tmp))
        else:  # nibabel's own gzip writer (no time stamp in the header: same bytes for the same data)
            with Opener(str(tmp), "wb", compresslevel=compresslevel) as f:
                img.to_stream(f.fobj)


def save_displacement_itk(disp_ras_mm: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a displacement ``(D0, D1, D2, 3)`` given in RAS millimetres as an ITK/ANTs field.

    On disk: shape ``(D0, D1, D2, 1, 3)``, float32, intent ``vector``, components in LPS mm
    (what ``antsApplyTransforms``, ``sitk.DisplacementFieldTransform`` and
    ``itk.DisplacementFieldTransform`` expect).
    """
    lps = ras_to_lps(np.asarray(disp_ras_mm, dtype=np.float32))
    finite = np.isfinite(lps)
    if not finite.all():  # a diverged fit must never leave a NaN transform behind
        bad = int(lps.size - np.count_nonzero(finite))
        raise FloatingPointError(f"refusing to write '{path}': the displacement has {bad} non-finite components (the fit diverged); lower model.lr or check the inputs.")
    save_nifti(lps[:, :, :, None, :], affine, path, intent="vector", compresslevel=FIELD_COMPRESSLEVEL)


def load_displacement_itk(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a field written by :func:`save_displacement_itk`: ``(D0, D1, D2, 3)`` RAS mm and the affine."""
    img: Any = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != 3:
        raise InputError(f"'{path}' is not an ITK displacement field (expected shape (X, Y, Z, 1, 3), got {data.shape}).")
    return ras_to_lps(data[:, :, :, 0, :]), img.affine


# -- JSON: the one sanitizer ------------------------------------------------------------
def finite_or_none(x: Any) -> float | None:
    """``float(x)``, or ``None`` for ``None``/NaN/Inf/non-numbers (strict JSON has no NaN).

    >>> finite_or_none(0.5), finite_or_none(float("nan")), finite_or_none("x")
    (0.5, None, None)
    """
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None``, numpy scalars as Python numbers, paths as strings.

    >>> json_safe({"a": [1.0, float("inf")], "b": np.float32(2.0)})
    {'a': [1.0, None], 'b': 2.0}
    """
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return finite_or_none(float(obj))
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Strict JSON (NaN/Inf written as ``null``, keys sorted, indented), written atomically."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomic(path, text + "\n")


# -- ITK/ANTs affine transforms -----------------------------------------------------------
_ITK_AFFINE_TYPES = tuple(
    f"{kind}_{scalar}_3_3" for kind in ("AffineTransform", "MatrixOffsetTransformBase") for scalar in ("double", "float")
)
"""ITK transform types that are a plain 3D affine (12 parameters: matrix row-major, translation)."""


def save_itk_affine(world: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write the world matrix ``W`` (4x4, fixed RAS mm -> moving RAS mm) as an ITK affine ``.mat``.

    MATLAB v4 file with ``AffineTransform_double_3_3`` (12x1: the 3x3 matrix row-major, then the
    translation, LPS) and ``fixed`` (3x1 centre, zero): what ``antsRegistration`` writes and
    ``antsApplyTransforms`` / ``sitk.ReadTransform`` read. Written atomically.
    """
    import scipy.io  # scipy is a dependency already; imported here to keep `import io` light

    w = np.asarray(world, dtype=np.float64)
    if w.shape != (4, 4) or not np.all(np.isfinite(w)):
        raise ValueError(f"refusing to write '{path}': the world matrix must be a finite 4x4 array, got {w.tolist()}")
    matrix, translation = world_matrix_to_itk(w)
    params = np.concatenate([matrix.reshape(-1), translation]).reshape(12, 1)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        scipy.io.savemat(fh, {"AffineTransform_double_3_3": params, "fixed": np.zeros((3, 1))}, format="4")


def load_itk_affine(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an ITK affine transform as the 4x4 RAS world matrix ``W`` (fixed -> moving).

    Accepts the MATLAB v4 ``.mat`` files of ITK/ANTs (as :func:`save_itk_affine` writes) and ITK
    text files (``#Insight Transform File V1.0``), each holding one ``AffineTransform`` or
    ``MatrixOffsetTransformBase`` (double or float). The centre (``fixed``/``FixedParameters``) is
    folded into the translation. Anything else raises an :class:`InputError` naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"affine transform '{p}' not found (or not a file); give an ITK .mat or .txt affine, e.g. the affine.mat of a registration result.")
    head = p.read_bytes()[:64]
    if head.lstrip().startswith(b"#Insight Transform File"):
        kind, params, fixed = _read_itk_text(p)
    else:
        kind, params, fixed = _read_itk_mat(p)
    if kind not in _ITK_AFFINE_TYPES:
        raise InputError(
            f"'{p}' holds an ITK {kind}, not an affine transform; only {', '.join(_ITK_AFFINE_TYPES)} can be read. "
            "Convert it to an affine first (e.g. sitk.AffineTransform(transform) in SimpleITK, then sitk.WriteTransform)."
        )
    if params.size != 12 or fixed.size not in (0, 3) or not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise InputError(
            f"'{p}' is a malformed {kind}: expected 12 finite parameters and a 3-vector centre, "
            f"got {params.size} parameters and a centre of {fixed.size}. Re-export the transform."
        )
    center = fixed if fixed.size == 3 else None
    return itk_to_world_matrix(params[:9].reshape(3, 3), params[9:], center)


def _read_itk_mat(p: Path) -> tuple[str, np.ndarray, np.ndarray]:
    import scipy.io

    try:
        data = scipy.io.loadmat(str(p), appendmat=False)
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError for non-MAT content
        raise InputError(
            f"'{p}' is neither an ITK text transform nor a readable MATLAB .mat transform ({exc}); "
            "give an ITK affine (.mat as written by ANTs/ITK, or .txt), e.g. the affine.mat of a registration result."
        ) from exc
    names = [k for k in data if not k.startswith("__") and k != "fixed"]
    if len(names) != 1:
        raise InputError(f"'{p}' does not hold exactly one ITK transform (variables: {sorted(k for k in data if not k.startswith('__'))}); give a single affine transform.")
    fixed = np.asarray(data.get("fixed", np.zeros(0)), dtype=np.float64).reshape(-1)
    return names[0], np.asarray(data[names[0]], dtype=np.float64).reshape(-1), fixed


def _read_itk_text(p: Path) -> tuple[str, np.ndarray, np.ndarray]:
    kinds: list[str] = []
    params: list[np.ndarray] = []
    fixed: list[np.ndarray] = []
    try:
        for line in p.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "Transform":
                kinds.append(value.strip())
            elif key == "Parameters":
                params.append(np.array([float(v) for v in value.split()]))
            elif key == "FixedParameters":
                fixed.append(np.array([float(v) for v in value.split()]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"'{p}' is not a readable ITK text transform ({exc}); re-export it (e.g. with sitk.WriteTransform).") from exc
    # A composite file lists "CompositeTransform_..." (no parameters) and then its parts.
    parts = [k for k in kinds if not k.startswith("CompositeTransform")]
    if len(parts) != 1 or len(params) != 1:
        raise InputError(
            f"'{p}' holds {len(parts)} ITK transforms ({', '.join(parts) or 'none'}); exactly one affine transform is needed. "
            "Split the composite first (e.g. with SimpleITK) and pass its affine part."
        )
    return parts[0], params[0], fixed[0] if fixed else np.zeros(0)
