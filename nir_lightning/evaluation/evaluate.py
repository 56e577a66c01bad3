"""Dense evaluation of a fitted field: the transform on every fixed voxel, warped images, metrics.

Plain PyTorch/numpy; the Lightning predict step and ``nir register`` both call these.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nir_lightning.coords import (
    identity_grid,
    normalized_to_voxel_displacement,
    normalized_to_voxel_scale,
    voxel_displacement_to_world,
    voxel_to_world,
    world_to_voxel,
)
from nir_lightning.core.chunked import DEFAULT_MAX_POINTS, grid_chunks, slabs
from nir_lightning.core.jacobian import chunked_jacobian_determinant
from nir_lightning.core.resample import dense_field
from nir_lightning.core.transform_chain import DisplacementStep, MatrixStep, ResampleMode, resample, resample_many
from nir_lightning.data.pair import ImagePair
from nir_lightning.evaluation.metrics import dice_per_label, mean_dice
from nir_lightning.evaluation.scoring import score_before, score_deformation, score_labels
from nir_lightning.fields.base import InverseField, NeuralField
from nir_lightning.fields.velocity import flow_jacobian_determinant


@dataclass
class RegistrationResult:
    """Dense results on the fixed grid (CPU tensors).

    The transform is ``W o (id + u)`` (:mod:`nir_lightning.coords`): the deformable part ``phi``
    (on the fixed grid) and the affine stage's world matrix ``pair.world``.

    Attributes:
        phi: ``(D0, D1, D2, 3)`` the deformable part: normalized fixed coordinates of each fixed
            voxel after ``u`` (the affinely aligned moving image is sampled there).
        disp_vox: ``(D0, D1, D2, 3)`` ``u`` in fixed voxels (array-axis order).
        det: ``(D0, D1, D2)`` Jacobian determinant of ``phi``.
        warped: ``(D0, D1, D2)`` moving image (original intensities) resampled once, from its
            own grid, through the whole chain (:func:`~nir_lightning.core.transform_chain.resample`).
        warped_labels: ``(D0, D1, D2)`` int32 moving labels through the chain with label
            interpolation (each label's indicator trilinearly, then the arg-max), or ``None``.
        disp_ras_mm: ``(D0, D1, D2, 3)`` float32 ``u`` in RAS millimetres, exactly what
            ``displacement.nii.gz`` holds (in LPS), so ``nir apply`` reproduces ``warped``.
        metrics: JSON-ready numbers.
        inv_disp_vox: ``(D0, D1, D2, 3)`` displacement of the inverse transform in voxels,
            for invertible (diffeomorphic) fields, else ``None``.
    """

    phi: Tensor
    disp_vox: Tensor
    det: Tensor
    warped: Tensor
    warped_labels: Tensor | None
    metrics: dict[str, Any] = field(default_factory=dict)
    inv_disp_vox: Tensor | None = None
    disp_ras_mm: np.ndarray | None = None
    warped_labels_nearest: Tensor | None = None  # (D0, D1, D2) int32, what dice_after scores


_dense_ready: ContextVar[Callable[[RegistrationResult], None] | None] = ContextVar("nir_dense_ready", default=None)


@contextmanager
def when_dense(callback: Callable[[RegistrationResult], None]) -> Iterator[None]:
    """Inside the block, :func:`evaluate` calls ``callback(result)`` as soon as the transform, its
    det J and the warped image exist, before the labels are warped and scored; ``result`` gets its
    label fields and metrics afterwards (the same object). ``nir register`` writes the transform
    files on a thread meanwhile (:class:`~nir_lightning.evaluation.outputs.TransformWriter`):
    evaluate runs inside the Lightning predict step, which has no other way to hand them out."""
    token = _dense_ready.set(callback)
    try:
        yield
    finally:
        _dense_ready.reset(token)


def moving_source(pair: ImagePair) -> tuple[Tensor, Tensor | None, np.ndarray]:
    """The moving image (original intensities) and labels as the chain resamples them:
    ``(C=1, I0, I1, I2)`` on the moving image's own grid when the pair keeps it, and its affine."""
    if pair.native is not None:
        nat = pair.native
        return nat.raw[0], None if nat.labels is None else nat.labels[0].float(), nat.affine
    labels = None if pair.moving_labels is None else pair.moving_labels[0].float()
    return pair.moving_raw[0], labels, pair.fixed_affine


def transform_chain(pair: ImagePair, disp_ras_mm: np.ndarray | None) -> list[DisplacementStep | MatrixStep]:
    """ANTs' chain ``-t displacement.nii.gz -t affine.mat``: ``u`` (when given), then ``W``."""
    chain: list[DisplacementStep | MatrixStep] = []
    if disp_ras_mm is not None:
        chain.append(DisplacementStep(disp_ras_mm=disp_ras_mm, affine=pair.fixed_affine))
    chain.append(MatrixStep(world=pair.world))
    return chain

def unregistered_labels(pair: ImagePair, *, max_points: int = DEFAULT_MAX_POINTS) -> Tensor | None:
    """The moving labels as the headers place them on the fixed grid, ``(D0, D1, D2)`` int32: what
    ``dice_before`` and ``hd95_before`` score. ``None`` where the pair keeps no moving image of its
    own (then ``pair.moving_labels`` are scored) or has no labels."""
    if pair.native is None or pair.native.labels is None:
        return None
    labels = pair.native.labels[0].float()
    if pair.native_on_fixed_grid():
        return labels[0].round().to(torch.int32)  # as they are
    out = resample(labels, pair.native.affine, pair.shape, pair.fixed_affine, [], mode="nearest", max_points=max_points)
    return out[0].round().to(torch.int32)


class BeforeScores:
    """The unregistered pair's ``dice_before``, ``dice_per_label_before`` and ``hd95_before``
    (:func:`~nir_lightning.evaluation.scoring.score_before`), computed on a thread of their own.

    They depend on the loaded labels only, so they need not wait for the fit: the data module
    starts them while the affine stage runs, which computes on one core (``alignment/cpu.py``)
    and leaves the other idle; :func:`evaluate` then takes them instead of computing them again
    (at 1 mm, HD95 before registration is about a second). The thread reads copies made here,
    not the pair the affine stage then aligns; its KD-tree queries run on one thread.

    >>> import numpy as np, torch
    >>> from nir_lightning.data.pair import ImagePair, NativeMoving
    >>> lab = torch.zeros(1, 1, 6, 6, 6, dtype=torch.int32); lab[..., 1:4, 1:4, 1:4] = 1
    >>> pair = ImagePair(fixed=lab.float(), moving=lab.float(), moving_raw=lab.float(), fixed_affine=np.eye(4),
    ...                  fixed_labels=lab, moving_labels=lab, labels=[1])
    >>> pair.native = NativeMoving(image=lab.float(), raw=lab.float(), affine=np.eye(4), labels=lab)
    >>> BeforeScores(pair).result()["dice_before"]
    1.0
    """

    def __init__(self, pair: ImagePair, *, hd95: bool = True) -> None:
        view = copy.copy(pair)  # the fields the scores read, as they are now
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        # daemon: a run that fails before evaluate (a bad label map) does not wait for it at exit
        self._thread = threading.Thread(target=self._run, args=(view, hd95), name="nir-before-scores", daemon=True)
        self._thread.start()

    def _run(self, pair: ImagePair, hd95: bool) -> None:
        try:
            before = unregistered_labels(pair)
            if before is not None:
                self._result = score_before(before, pair, hd95=hd95, workers=1)
        except Exception as exc:  # noqa: BLE001 -- raised again in the caller of result()
            self._error = exc

    def result(self) -> dict[str, Any] | None:
        """Wait for the scores: ``None`` where the pair has no moving labels of its own."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


@torch.no_grad()
def evaluate(
    field_: NeuralField,
    pair: ImagePair,
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    hd95: bool = True,
    inverse: bool | None = None,
    flow_jacobian: bool = True,
    before: BeforeScores | None = None,
) -> RegistrationResult:
    """Evaluate ``field_`` densely on ``pair``'s fixed grid and score it.

    ``folding_count``, ``folding_percent`` and ``jacobian_det_min`` come from central finite
    differences of the dense displacement (ANTs' ``CreateJacobianDeterminantImage``), for every
    field alike. For fields with an exact Jacobian (velocity fields and compositions of them,
    see :func:`~nir_lightning.fields.velocity.flow_with_jacobian`) and ``flow_jacobian``,
    ``flow_jacobian_det_min`` is the minimum over the foreground of the flow's own det J,
    integrated with the points: positive for a resolved flow even where the finite-difference
    estimate reads a fold; ``flow_folding_count`` counts the foreground voxels where it is <= 0
    (the solver's step does not resolve the velocity there). It costs about 8 dense forward passes per foreground voxel (three
    forward-mode tangents at every solver stage; measured 7.5x at the default diffeomorphic
    config on CPU); ``flow_jacobian=False`` skips it.

    For an invertible field (``field_.invertible``, e.g. a
    :class:`~nir_lightning.fields.VelocityField`) and ``inverse`` not ``False``, also the
    dense inverse transform and ``inverse_consistency_mm``: mean ``|phi^-1(phi(x)) - x|`` in
    millimetres over the fixed foreground (``inverse_consistency_max_mm``: its maximum).

    ``before``: the unregistered pair's scores, started earlier on a thread (:class:`BeforeScores`);
    without it they are computed here (the same numbers).
    """
    t_start = time.perf_counter()
    shape = pair.shape
    phi = dense_field(field_, shape, max_points=max_points).cpu()
    if not bool(torch.isfinite(phi).all()):
        raise FloatingPointError("the fitted field has non-finite values; refusing to write it (lower the learning rate or check the inputs).")
    disp = normalized_to_voxel_displacement(phi, shape)
    disp_mm = world_displacement_float32(disp, pair.fixed_affine, max_points=max_points)
    det = chunked_jacobian_determinant(disp, max_points=max_points)
    fg = pair.foreground_mask()
    metrics: dict[str, Any] = score_deformation(det, disp, pair)  # before the warps: its float64 copies and theirs never coexist
    image, labels, image_affine = moving_source(pair)
    chain = transform_chain(pair, disp_mm)
    # the image and the labels (nearest, label interpolation) through the chain in one pass:
    # every voxel's point is computed once for the three
    with_labels = pair.has_labels and labels is not None
    jobs: list[tuple[Tensor, ResampleMode]] = [(image, "linear")]
    if with_labels:
        assert labels is not None
        jobs += [(labels, "nearest"), (labels, "label")]
    through_chain = resample_many(jobs, image_affine, shape, pair.fixed_affine, chain, max_points=max_points)
    warped = through_chain[0][0]
    # the labels as int32 (nearest, label interpolation); their float32 copies go now, not at the end
    chain_labels = [out[0].round().to(torch.int32) for out in through_chain[1:]]
    del through_chain
    inv_disp = None
    if inverse is not False and field_.invertible:
        phi_inv = dense_field(InverseField(field_), shape, max_points=max_points).cpu()
        inv_disp = normalized_to_voxel_displacement(phi_inv, shape)
        err = inverse_consistency_error_mm(field_, phi, pair.fixed_affine, max_points=max_points)
        sel = err[fg] if bool(fg.any()) else err.reshape(-1)
        metrics["inverse_consistency_mm"] = float(sel.mean())
        metrics["inverse_consistency_max_mm"] = float(sel.max())
    if flow_jacobian:
        flow_det = flow_jacobian_determinant(field_, shape, mask=fg if bool(fg.any()) else None, max_points=max_points)
        if flow_det is not None:
            sel_flow = flow_det[fg] if bool(fg.any()) else flow_det.reshape(-1)
            metrics["flow_jacobian_det_min"] = float(sel_flow.min())
            # voxels where the map the solver computes is not locally invertible (a step too coarse for v)
            metrics["flow_folding_count"] = int((sel_flow <= 0).sum())
    if pair.reference_disp_vox is not None:
        true = pair.reference_disp_vox.cpu()
        full = whole_displacement_vox(disp, pair)
        metrics["epe_before_vox"] = float(true[fg].norm(dim=-1).mean())
        metrics["epe_after_vox"] = float((full - true)[fg].norm(dim=-1).mean())
    result = RegistrationResult(
        phi=phi, disp_vox=disp, det=det, warped=warped, warped_labels=None, metrics=metrics, inv_disp_vox=inv_disp, disp_ras_mm=disp_mm,
    )
    callback = _dense_ready.get()
    if callback is not None:
        callback(result)
    t_scoring = time.perf_counter()
    if with_labels:
        assert labels is not None

        def through(steps: list[DisplacementStep | MatrixStep], mode: Any) -> Tensor:
            return resample(labels, image_affine, shape, pair.fixed_affine, steps, mode=mode, max_points=max_points)[0].round().to(torch.int32)

        result.warped_labels_nearest = nearest = chain_labels[0]
        before_scores = before.result() if before is not None else None
        unregistered = unregistered_labels(pair, max_points=max_points) if before_scores is None else None
        metrics.update(score_labels(nearest, pair, hd95=hd95, before=unregistered, before_scores=before_scores))
        result.warped_labels = chain_labels[1]
        assert pair.fixed_labels is not None
        fixed_labels = pair.fixed_labels[0, 0].cpu()
        metrics["dice_after_label"] = mean_dice(dice_per_label(result.warped_labels, fixed_labels, pair.labels))
        metrics["dice_affine"] = mean_dice(dice_per_label(through(chain[-1:], "nearest"), fixed_labels, pair.labels))
    metrics["seconds_scoring"] = time.perf_counter() - t_scoring  # labels: Dice, HD95, the warps without the field
    metrics["seconds_evaluate"] = time.perf_counter() - t_start  # all of it: the dense pass, warps, det J, scoring
    return result


def world_displacement_float32(disp_vox: Tensor, affine: np.ndarray, *, max_points: int = DEFAULT_MAX_POINTS) -> np.ndarray:
    """``disp_vox`` ``(D0, D1, D2, 3)`` in RAS millimetres, float32 (what the field files hold, forward and inverse):
    :func:`~nir_lightning.coords.voxel_displacement_to_world` slab by slab, so that its float64
    copies never hold the whole volume (2 x 158 MB at 1 mm).

    >>> world_displacement_float32(torch.ones(2, 3, 4, 3), np.diag([2.0, 1.0, 0.5, 1.0]))[1, 2, 3].tolist()
    [2.0, 1.0, 0.5]
    """
    out = np.empty(tuple(disp_vox.shape), dtype=np.float32)
    plane = int(disp_vox.shape[1]) * int(disp_vox.shape[2])
    for sl in slabs(int(disp_vox.shape[0]), plane, max_points=max_points):
        out[sl] = voxel_displacement_to_world(disp_vox[sl].numpy(), affine)
    return out


def whole_displacement_vox(disp_vox: Tensor, pair: ImagePair) -> Tensor:
    """The whole transform ``W o (id + u)`` as a displacement in fixed voxels ``(D0, D1, D2, 3)``
    (for comparison with a known displacement; equal to ``disp_vox`` when ``W`` is the identity)."""
    if np.array_equal(pair.world, np.eye(4)):
        return disp_vox
    vox = identity_grid(pair.shape, dtype=torch.float64)
    vox = (vox + 1) * (torch.tensor(pair.shape, dtype=torch.float64) - 1) / 2
    moved = voxel_to_world(vox.numpy() + disp_vox.double().numpy(), pair.fixed_affine)
    moved = moved @ pair.world[:3, :3].T + pair.world[:3, 3]
    return torch.as_tensor(world_to_voxel(moved, pair.fixed_affine) - vox.numpy()).float()


@torch.no_grad()
def inverse_consistency_error_mm(
    field_: NeuralField, phi: Tensor, affine: np.ndarray, *, max_points: int = DEFAULT_MAX_POINTS
) -> Tensor:
    """``|phi^-1(phi(x)) - x|`` in millimetres at every fixed voxel ``x``, ``(D0, D1, D2)``.

    ``phi`` is the dense forward transform ``(D0, D1, D2, 3)`` (normalized); the inverse is
    evaluated exactly at ``phi(x)`` by ``field_.inverse`` (no resampling of a dense field).
    """
    shape = (int(phi.shape[0]), int(phi.shape[1]), int(phi.shape[2]))
    device = next(field_.parameters()).device
    to_vox = normalized_to_voxel_scale(shape).double()
    rot = torch.as_tensor(np.asarray(affine, dtype=np.float64)[:3, :3])
    out = torch.empty(shape, dtype=torch.float64)
    for sl, pts in grid_chunks(shape, max_points=max_points):
        back = field_.inverse(phi[sl].unsqueeze(0).to(device))[0].cpu()
        diff_mm = ((back - pts[0]).double() * to_vox) @ rot.T
        out[sl] = diff_mm.norm(dim=-1)
    return out.float()
