"""The output folder of a registration: NIfTI files on the fixed grid, ``affine.mat``, ``qc.png`` and ``metrics.json``.

The transform is written in ANTs' convention (:mod:`nir_lightning.coords`):
``antsApplyTransforms -i moving -r fixed -t displacement.nii.gz -t affine.mat`` (and
``nir apply``) reproduce ``warped.nii.gz``; ``composed_displacement.nii.gz`` (on request) is the
whole chain as one displacement field.

Every file is written atomically; ``metrics.json`` is removed first and written last, so a
folder without it is incomplete (``--resume`` and ``register-many`` rely on that).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nir_lightning.coords import identity_grid, normalized_to_voxel, voxel_to_world
from nir_lightning.data.pair import ImagePair
from nir_lightning.evaluation.evaluate import RegistrationResult, world_displacement_float32
from nir_lightning.evaluation.output_files import OUTPUT_FILES
from nir_lightning.io import FIELD_COMPRESSLEVEL, save_displacement_itk, save_itk_affine, save_nifti, write_json_atomic

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; the package supports 3.10 (as app/lock.py)

__all__ = ["OUTPUT_FILES", "TransformWriter", "displacement_world", "write_outputs"]



def displacement_world(reg: RegistrationResult, affine: np.ndarray) -> np.ndarray:
    """The deformable part ``u`` as RAS millimetres ``(D0, D1, D2, 3)`` float32."""
    if reg.disp_ras_mm is not None:
        return reg.disp_ras_mm
    return world_displacement_float32(reg.disp_vox, affine)


def composed_displacement_world(disp_ras_mm: np.ndarray, pair: ImagePair) -> np.ndarray:
    """The whole chain ``W (p + u(p)) - p`` as RAS millimetres ``(D0, D1, D2, 3)`` float32: one
    displacement field that maps a fixed point to its moving point by itself."""
    vox = normalized_to_voxel(identity_grid(pair.shape, dtype=torch.float64), pair.shape).numpy()
    p = voxel_to_world(vox, pair.fixed_affine)
    q = p + disp_ras_mm.astype(np.float64)
    moved = q @ pair.world[:3, :3].T + pair.world[:3, 3]
    return (moved - p).astype(np.float32)


class TransformWriter:
    """Writes the transform files (everything but the warped labels, ``qc.png`` and ``metrics.json``)
    on a thread, started by :func:`~nir_lightning.evaluation.evaluate.evaluate` through
    :func:`~nir_lightning.evaluation.evaluate.when_dense` as soon as they exist: compressing them
    (zlib releases the GIL) overlaps warping and scoring the labels. :func:`write_outputs` with
    ``transform_files=`` waits for it and writes the rest.
    """

    def __init__(self, pair: ImagePair, output_dir: str | Path, *, composed: bool = False) -> None:
        self.pair, self.out, self.composed = pair, Path(output_dir), composed
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[None] | None = None

    def __call__(self, reg: RegistrationResult) -> None:
        if self._future is not None:
            return  # one registration, one set of files
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "metrics.json").unlink(missing_ok=True)  # incomplete from here until it is written again
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nir-outputs")
        self._future = self._pool.submit(_write_transform_files, reg, self.pair, self.out, composed=self.composed)
        self._pool.shutdown(wait=False)

    @property
    def started(self) -> bool:
        return self._future is not None

    def wait(self) -> None:
        """Until the files are written; their error, if any."""
        if self._future is not None:
            self._future.result()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """No thread still writing into the folder once the block is left; on an error in the block
        that error is the one raised (the writer's own, if any, is then dropped)."""
        if exc_type is None:
            self.wait()
        elif self._future is not None:
            with contextlib.suppress(Exception):
                self._future.result()


def write_outputs(
    reg: RegistrationResult,
    pair: ImagePair,
    output_dir: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    qc_title: str | None = None,
    composed: bool = False,
    started: float | None = None,
    transform_files: TransformWriter | None = None,
) -> dict[str, Any]:
    """Write the NIfTI outputs (fixed affine), ``affine.mat`` (the affine part, ITK), with
    ``composed`` the whole transform as ``composed_displacement.nii.gz``, ``qc.png`` when
    ``qc_title`` is given, and ``metrics.json``, each atomically; returns the metrics.

    ``metrics.json`` is removed first and written last: a folder without it is incomplete
    (``--resume`` and ``register-many`` rely on that). With ``started`` (a
    :func:`time.perf_counter` reading when the registration began), ``seconds_total`` is the
    time from then to ``metrics.json``, the outputs included. With ``transform_files`` (a
    :class:`TransformWriter` that ``evaluate`` started), the transform files are its; they are
    waited for here.
    """
    t_start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    # The QC figure renders (matplotlib, mostly Python) on a thread while this one compresses the
    # NIfTI files (zlib releases the GIL): on the shared 2 mm pair they cost about as much.
    pool = ThreadPoolExecutor(max_workers=1) if qc_title is not None else None
    qc = None
    if pool is not None:
        from nir_lightning.evaluation.qc_figure import save_qc_figure  # matplotlib only when asked

        qc = pool.submit(save_qc_figure, pair, out / "qc.png", phi=reg.phi, title=qc_title, metrics=reg.metrics)
        pool.shutdown(wait=False)
    try:
        if transform_files is not None and transform_files.started:
            transform_files.wait()
        else:
            _write_transform_files(reg, pair, out, composed=composed)
        if reg.warped_labels is not None:
            save_nifti(reg.warped_labels.numpy(), pair.fixed_affine, out / "warped_labels.nii.gz")
    finally:
        if transform_files is not None:
            transform_files.wait()  # never a thread still writing into the folder after an error here
        if qc is not None:
            qc.result()  # its error, if any, after the files (never a half-written folder without the cause)
    metrics = dict(reg.metrics)
    if pair.notes:
        metrics["notes"] = list(pair.notes)
    metrics.update(extra or {})
    metrics["seconds_outputs"] = time.perf_counter() - t_start  # every file but metrics.json itself
    if started is not None:
        metrics["seconds_total"] = time.perf_counter() - started
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _write_transform_files(reg: RegistrationResult, pair: ImagePair, out: Path, *, composed: bool) -> None:
    """The transform files of :func:`write_outputs`: everything but the warped labels, ``qc.png`` and ``metrics.json``."""
    aff = pair.fixed_affine
    save_nifti(reg.warped.numpy().astype(np.float32), aff, out / "warped.nii.gz")
    disp_mm = displacement_world(reg, aff)
    save_displacement_itk(disp_mm, aff, out / "displacement.nii.gz")
    save_itk_affine(pair.world, out / "affine.mat")
    if composed:
        save_displacement_itk(composed_displacement_world(disp_mm, pair), aff, out / "composed_displacement.nii.gz")
    else:  # never leave a composed field of an earlier run beside a new transform
        (out / "composed_displacement.nii.gz").unlink(missing_ok=True)
    save_nifti(reg.det.numpy().astype(np.float32), aff, out / "jacobian_det.nii.gz", compresslevel=FIELD_COMPRESSLEVEL)
    if reg.inv_disp_vox is not None:
        inv_mm = world_displacement_float32(reg.inv_disp_vox, aff)
        save_displacement_itk(inv_mm, aff, out / "inverse_displacement.nii.gz")
    else:  # an --overwrite run must not leave a stale inverse from an earlier diffeomorphic run
        (out / "inverse_displacement.nii.gz").unlink(missing_ok=True)
