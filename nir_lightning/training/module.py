"""LightningModule that fits a neural field to one image pair: Lightning hooks only.

The method itself lives below this layer: sampling in :mod:`nir_lightning.sampling`, the
objective in :mod:`nir_lightning.losses.objective`, dense evaluation in
:mod:`nir_lightning.evaluation`, the hybrid schedule in :mod:`nir_lightning.training.schedule`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from nir_lightning.coords import voxel_spacing
from nir_lightning.core.smoothing import gaussian_smooth
from nir_lightning.data.pair import ImagePair
from nir_lightning.errors import InputError
from nir_lightning.evaluation.evaluate import RegistrationResult, evaluate
from nir_lightning.evaluation.validation import validation_metrics
from nir_lightning.fields import ComposedField, FeatureGrid, GridDisplacementField, GridVelocityField, NeuralField
from nir_lightning.fields.feature_grid import set_active_levels
from nir_lightning.losses import FoldingPenalty, Similarity, SmoothnessPenalty, registration_objective
from nir_lightning.losses.fold_guard import DEFAULT_FOLD_GUARD, FoldGuard
from nir_lightning.losses.folding import coarse_jacobian_points, scaled_jacobian_points, scaled_margin
from nir_lightning.sampling import (
    CoordinateSample,
    CoordinateSampler,
    PyramidSampler,
    foreground_domain,
)
from nir_lightning.training.hybrid_callback import HybridPhases
from nir_lightning.training.lazy_default import lazy_default
from nir_lightning.training.options import check_options, margin_floors
from nir_lightning.training.schedule import PHASE_1, HybridSchedule, optimizer_config
from nir_lightning.training.tracking import log_objective

log = logging.getLogger(__name__)


DEFAULT_LAM = {"lncc": 5.0, "ncc": 5.0, "mse": 5.0, "mi": 1.0}
"""``lam`` when none is given, by similarity. Adam sees only the ratio of the two terms' gradients,
and normalised MI moves far less than local NCC over a fit: at 5 the folding term held a T2-like
pair back (Dice 0.690 against 0.703 at 1, 0 folds either way; benchmarks/README.md, 0.2.2)."""


_DEFAULT_FIELD = lazy_default(GridDisplacementField)
_DEFAULT_SAMPLER = lazy_default(PyramidSampler)


class RegistrationModule(pl.LightningModule):
    """Optimises ``field`` so that ``moving(field(x))`` matches ``fixed(x)``.

    Hooks: ``setup`` (attach the datamodule's pair as non-persistent buffers; check the hybrid
    schedule), ``configure_callbacks`` (the hybrid schedule's phases, run by
    :class:`~nir_lightning.training.hybrid_callback.HybridPhases`), ``training_step`` (sample ->
    :func:`~nir_lightning.losses.registration_objective`), ``validation_step`` (cheap metrics on a coarse dense lattice), ``predict_step`` (dense
    evaluation, :func:`nir_lightning.evaluation.evaluate`), ``configure_optimizers`` (Adam
    with linear decay to ``lr_final_ratio * lr``). Keyword arguments map one-to-one onto
    the CLI's ``model.*`` options.

    Args:
        field: the neural field (NF1 of the hybrid schedule); default: feature grids and a
            small MLP (:class:`~nir_lightning.fields.GridDisplacementField`).
        field2: optional second field (NF2) for the hybrid schedule: trained in phase 2 on
            ``field``'s output, so the transform is ``field2 o field``. Needs ``schedule``.
            The current phase is the persistent buffer ``phase`` (1 or 2).
        schedule: the hybrid schedule (:class:`~nir_lightning.training.schedule.HybridSchedule`:
            switch step, phase-2 sampler and window); only with ``field2``.
        sampler: coordinate sampler used for training (default: coarse to fine,
            :class:`~nir_lightning.sampling.PyramidSampler`; its samples also choose the images'
            smoothing and the field's active feature-grid levels).
        similarity: ``"lncc"`` (squared local NCC), ``"ncc"`` (global), ``"mse"`` or ``"mi"``
            (mutual information, for pairs of different contrasts).
        window: local NCC window in lattice samples.
        regularizer: ``"jedt"`` (penalise det <= 0 only) or ``"unit"`` (|det - 1|).
        lam: weight of the folding barrier; ``None``: :data:`DEFAULT_LAM` of ``similarity``.
        smoothness: the smoothness prior on the sample's Jacobian
            (:mod:`~nir_lightning.losses.smoothness`): ``"bending"`` (change of J between
            neighbouring points: zero for affine maps), ``"diffusion"`` (``||J - I||^2``),
            ``"logdet"`` (``(log det J)^2``) or ``"none"``.
        alpha: weight of the smoothness prior (0: off). The prior is per millimetre
            (``"bending"``: mm^-2), so one ``alpha`` means the same at every voxel size (1.0 per
            mm is 0.25 per voxel on 2 mm images; the 0.2.4 default was 0.5 per voxel).
        margin: ``"jedt"`` penalises ``det J < margin`` (0: folds only, as in NIR): one number, or
            ``[at_2mm, at_1mm]`` by the fixed image's voxel size (:func:`~nir_lightning.losses.folding.scaled_margin`);
            ``None`` (the default): ``[0.35, 0.5]``.
        lr: Adam learning rate at step 0.
        lr_final_ratio: learning rate at the last step, as a fraction of ``lr``.
        jacobian_points: random foreground points per step whose det J the barrier also reads
            (coarse lattices miss folds between their points), at 2 mm; ``(2 mm / voxel size)^2``
            times as many on other images, within ``[1/4, 4]`` times
            (:func:`~nir_lightning.losses.folding.scaled_jacobian_points`: a fold is a few voxels
            wide at any resolution).
        jacobian_stencil: how those points get their det J: ``"analytic"`` (the field's exact
            Jacobian at points jittered inside their voxel; one evaluation), ``"forward"`` (4) or
            ``"central"`` (6: the folding metric's stencil, which also sees oscillations two voxels
            wide; the points are then added for every sampler, and one-voxel lattices penalise
            their interior central det J too). See :class:`~nir_lightning.losses.FoldingPenalty`.
        seed: seeds the coordinate sampling (step ``t`` uses ``seed`` and ``t``, so a resumed
            fit samples exactly what an uninterrupted one would).
        val_stride: lattice stride of the validation metrics.
        eval_max_points: points per chunk of dense inference (bounds memory).
        coarse_jacobian_ratio: the steps that leave the ``k`` finest grid levels out draw
            ``coarse_jacobian_ratio ** k`` of the 2 mm count of det J points
            (:func:`~nir_lightning.losses.folding.coarse_jacobian_points`; a coarser level folds
            only at a coarser scale). 1: every stage draws the full count (the diffeomorphic config).
        fold_guard: fractions of the fit's steps at which the folding metric's own det J is
            checked on every foreground voxel; from then on the barrier also holds where it was
            below 0.15 (:mod:`~nir_lightning.losses.fold_guard`; a fit that never runs that low is
            unchanged bit for bit). ``None``: off (the configs measured without it).
        symmetric: add ``similarity(moving(x), fixed(phi^-1(x)))`` to ``similarity(fixed(x),
            moving(phi(x)))`` (:func:`~nir_lightning.losses.registration_objective`); needs an
            invertible field (``configs/model/symmetric.yaml`` on the diffeomorphic config; ~1.5x its time).
        domain_margin: the fields' feature grids span the fixed foreground's bounding box (the
            user's fixed mask's, if given) grown by this many millimetres, so their cells are as
            fine in millimetres on a raw scan, whose head fills half the field of view, as on a
            cropped one; ``None``: the whole image.
    """

    # buffers (registered in __init__ / attach_pair), declared for type checkers
    phase: Tensor
    fixed: Tensor
    moving: Tensor
    mask: Tensor
    sample_mask: Tensor
    fixed_mask: Tensor | None
    moving_mask: Tensor | None
    moving_source: Tensor
    moving_chain: Tensor | None

    def __init__(
        self,
        *,
        field: NeuralField = _DEFAULT_FIELD,
        field2: NeuralField | None = None,
        schedule: HybridSchedule | None = None,
        sampler: CoordinateSampler = _DEFAULT_SAMPLER,
        similarity: Literal["lncc", "ncc", "mse", "mi"] = "lncc",
        window: int = 5,
        regularizer: Literal["jedt", "unit"] = "jedt",
        lam: float | None = None,
        smoothness: Literal["none", "bending", "diffusion", "logdet"] = "bending",
        alpha: float = 1.0,
        margin: float | list[float] | None = None,
        lr: float = 1e-2,
        lr_final_ratio: float = 0.1,
        jacobian_points: int = 16384,
        jacobian_stencil: Literal["forward", "central", "analytic"] = "analytic",
        seed: int = 0,
        val_stride: int = 2,
        eval_max_points: int = 2**18,
        domain_margin: float | None = 16.0,
        coarse_jacobian_ratio: float = 0.25,
        symmetric: bool = False,
        fold_guard: list[float] | None = list(DEFAULT_FOLD_GUARD),  # noqa: B006 -- read, never changed
    ) -> None:
        super().__init__()
        # Python builds a default argument once: without a new one, every module made without a
        # field would train the same field, the second starting where the first stopped
        field = GridDisplacementField() if field is _DEFAULT_FIELD else field
        sampler = PyramidSampler() if sampler is _DEFAULT_SAMPLER else sampler
        if lam is None:
            lam = DEFAULT_LAM.get(similarity, 5.0)
        check_options(
            lam=lam, alpha=alpha, lr=lr, lr_final_ratio=lr_final_ratio, window=window, sampler=sampler,
            field=field, field2=field2, schedule=schedule, jacobian_stencil=jacobian_stencil,
            coarse_jacobian_ratio=coarse_jacobian_ratio, val_stride=val_stride, eval_max_points=eval_max_points,
            domain_margin=domain_margin, symmetric=symmetric,
        )
        floors = margin_floors(margin)  # (at 2 mm, at 1 mm)
        try:
            # the floor by the fixed image's voxel size is set in attach_pair; the 2 mm one until then
            folding = FoldingPenalty(
                kind=regularizer, margin=floors[0],
                jacobian_points=jacobian_points, stencil=jacobian_stencil,
            )
            smooth = SmoothnessPenalty(kind=smoothness)
            guard = FoldGuard.from_option(fold_guard)
        except InputError as exc:
            raise InputError(f"model.{exc}") from None
        self.save_hyperparameters(logger=False, ignore=["field", "field2", "schedule", "sampler"])
        self.field = field
        self.field2 = field2
        self.schedule = schedule
        self.register_buffer("phase", torch.tensor(PHASE_1, dtype=torch.long))  # persistent: resumes in its phase
        self.sampler = sampler
        self.similarity = Similarity(similarity, window=window)
        self.folding = folding
        self._jacobian_points = jacobian_points  # per step at 2 mm: attach_pair scales it to the image
        self._margin = floors  # attach_pair takes the floor from the voxel size
        self._coarse_points = jacobian_points  # the 2 mm count, where coarse stages start (attach_pair)
        self._coarse_folding: dict[int, FoldingPenalty] = {}  # by grid levels left out (_folding_for)
        self.regularizer = regularizer
        self.lam = lam
        self.smoothness = smooth
        self.alpha = alpha
        self.lr = lr
        self.lr_final_ratio = lr_final_ratio
        self.seed = seed
        self.val_stride = val_stride
        self.eval_max_points = eval_max_points
        self.domain_margin = domain_margin
        self.coarse_jacobian_ratio = coarse_jacobian_ratio
        self.symmetric = symmetric
        self.fold_guard = guard
        self._guard_voxels: Tensor | None = None  # (K, 3) fixed voxels the fold guard holds; in checkpoints
        self.pair: ImagePair | None = None
        self._smoothed: dict[float, tuple[Tensor, Tensor]] = {}
        self._source_sigma_scale = (1.0, 1.0, 1.0)
        self._voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
        self._moving_fov = False  # attach_pair: the moving scan does not cover the fixed foreground

    # -- data ------------------------------------------------------------------------------
    def _datamodule(self) -> Any:
        """The trainer's data module (``None`` outside a trainer, or without one)."""
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if self.pair is None:
            if dm is None or getattr(dm, "pair", None) is None:
                raise RuntimeError("RegistrationModule needs a PairDataModule (or call attach_pair first).")
            self.attach_pair(dm.pair)
        if stage == "fit" and self.schedule is not None:
            self.schedule.check_fit(self.trainer.max_steps, self.similarity.window)

    def attach_pair(self, pair: ImagePair) -> None:
        """Register the pair's images as (non-persistent) buffers so they follow the device."""
        self.pair = pair
        self._smoothed = {}
        self._guard_voxels = None
        self.register_buffer("fixed", pair.fixed.float(), persistent=False)
        self.register_buffer("moving", pair.moving.float(), persistent=False)
        # The fit samples the moving image through the affine part from its own grid (one
        # interpolation, as the outputs): ImagePair.moving_sampling.
        source, chain = pair.moving_sampling()
        self.register_buffer("moving_source", source.float(), persistent=False)
        self.register_buffer("moving_chain", None if chain is None else torch.as_tensor(chain, dtype=torch.float32), persistent=False)
        self._source_sigma_scale = (1.0, 1.0, 1.0)
        self._voxel_size = voxel_spacing(pair.fixed_affine)  # the smoothness prior is per millimetre
        scaled = scaled_jacobian_points(self._jacobian_points, self._voxel_size)
        margin = scaled_margin(self._voxel_size, at_2mm=self._margin[0], at_1mm=self._margin[1])
        self.folding = dataclasses.replace(self.folding, jacobian_points=scaled, margin=margin)
        # Steps that fit only the coarser grid levels cannot fold at the finest voxels' scale: they
        # start from the 2 mm count (the points cost ~1.5 us each per step; 1 mm fits took twice as long).
        self._coarse_points = min(scaled, self._jacobian_points)
        self._coarse_folding = {}
        if chain is not None and pair.native is not None:
            # smooth the native image by the same millimetres as the fixed one
            fs, ns = voxel_spacing(pair.fixed_affine), voxel_spacing(pair.native.affine)
            self._source_sigma_scale = (fs[0] / ns[0], fs[1] / ns[1], fs[2] / ns[2])
        fg = pair.foreground_mask()
        self.register_buffer("mask", fg, persistent=False)
        self._moving_fov = pair.partial_moving_scan(fg)  # the similarity then counts only inside the scan
        # The user's masks: samplers draw inside the fixed one, the similarity counts inside both.
        # Without one the samplers share the foreground tensor, and so its cached index and box.
        sample_mask = pair.fixed_mask if pair.fixed_mask is not None else fg
        self.register_buffer("sample_mask", sample_mask, persistent=False)
        for name in ("fixed_mask", "moving_mask"):
            m = getattr(pair, name)
            self.register_buffer(name, None if m is None else m.float()[None, None], persistent=False)
        if self.domain_margin is not None:
            low, high = foreground_domain(sample_mask, voxel_spacing(pair.fixed_affine), self.domain_margin)
            for module in self.modules():
                if isinstance(module, FeatureGrid):
                    module.set_domain(low, high)

    @property
    def margin(self) -> float:
        return self.folding.margin

    @property
    def jacobian_points(self) -> int:
        """The configured count (per step on a 2 mm image); ``folding.jacobian_points`` is the one in use."""
        return self._jacobian_points

    @property
    def jacobian_stencil(self) -> str:
        return self.folding.stencil

    @property
    def shape(self) -> tuple[int, int, int]:
        assert self.pair is not None, "no pair attached"
        return self.pair.shape

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step)

    # -- the method ------------------------------------------------------------------------
    @property
    def in_phase2(self) -> bool:
        return self.field2 is not None and int(self.phase) >= 2

    def transform_field(self) -> NeuralField:
        """The transform being fitted: ``field``, or ``field2 o field`` in phase 2 of the hybrid schedule."""
        if self.in_phase2:
            assert self.field2 is not None
            return ComposedField(self.field, self.field2)
        return self.field

    def transform(self, x: Tensor) -> Tensor:
        """``phi(x)`` of :meth:`transform_field` for normalized points ``(..., 3)``."""
        return self.transform_field()(x)

    def transform_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``phi(x)`` and its exact Jacobian ``(..., 3, 3)`` (fields with ``has_jacobian``)."""
        return self.transform_field().forward_with_jacobian(x)

    def images(self, sigma: float) -> tuple[Tensor, Tensor]:
        """The fixed image and the moving image the fit samples (``moving_source``, on its own
        grid when ``moving_chain`` is set), smoothed by ``sigma`` fixed voxels (cached per sigma)."""
        if sigma <= 0:
            return self.fixed, self.moving_source
        key = round(float(sigma), 6)
        cached = self._smoothed.get(key)
        if cached is None or cached[0].device != self.fixed.device:
            source_sigma = [key * f for f in self._source_sigma_scale]
            cached = (gaussian_smooth(self.fixed, key), gaussian_smooth(self.moving_source, source_sigma))
            self._smoothed[key] = cached
        return cached

    def set_grid_levels(self, levels: int | None) -> int:
        """:func:`~nir_lightning.fields.feature_grid.set_active_levels` on this module's fields."""
        return set_active_levels(self, levels)

    def model_step(self, sample: CoordinateSample, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The objective of the current transform on one sample (see :func:`~nir_lightning.losses.registration_objective`)."""
        fixed, moving = self.images(sample.sigma)
        missing = self.set_grid_levels(sample.levels)
        out = registration_objective(
            self.transform, fixed, moving, sample,
            similarity=self.similarity, folding=self._folding_for(missing), lam=self.lam, smoothness=self.smoothness, alpha=self.alpha,
            mask=self.mask, generator=generator,
            fixed_mask=self.fixed_mask, moving_mask=self.moving_mask, moving_chain=self.moving_chain, moving_fov=self._moving_fov,
            transform_with_jacobian=self.transform_with_jacobian if self.folding.stencil == "analytic" else None,
            transform_lattice=self.transform_lattice(), voxel_size=self._voxel_size,
            inverse=self.field.inverse if self.symmetric else None, inverse_lattice=self.transform_lattice(inverse=True) if self.symmetric else None,
        )
        if self._guard_voxels is not None:
            voxels = self._guard_voxels.to(self.device)
            guard = FoldGuard.penalty(self.transform, voxels, self.shape, margin=self.folding.margin, per=self.folding.jacobian_points)
            out["loss"] = out["loss"] + self.lam * guard
            out["fold_guard"] = guard
        return out

    # -- the fold guard (losses/fold_guard.py) ---------------------------------------------
    def _check_folds(self, sample: CoordinateSample, total: int) -> None:
        """The fold guard's check at its steps, before the step's objective, on the transform the step fits."""
        if self.fold_guard is None or self.global_step not in self.fold_guard.check_steps(total):
            return
        self.set_grid_levels(sample.levels)
        voxels, lowest = self.fold_guard.check(
            self.transform, self.mask, self._guard_voxels, lattice=self.transform_lattice(), max_points=self.eval_max_points,
        )
        self._guard_voxels = voxels if len(voxels) else None
        log.info("fold guard at step %d: smallest det J %.3f, %d voxels guarded", self.global_step, lowest, len(voxels))
        self.log("train/fold_guard_voxels", float(len(voxels)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._guard_voxels is not None:
            checkpoint["nir_fold_guard"] = self._guard_voxels.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._guard_voxels = checkpoint.get("nir_fold_guard")  # a resumed fit holds the voxels found before

    def _folding_for(self, missing: int) -> FoldingPenalty:
        """The folding penalty of a step whose fields leave their ``missing`` finest grid levels out."""
        if not missing:
            return self.folding
        folding = self._coarse_folding.get(missing)
        if folding is None:
            points = coarse_jacobian_points(self._coarse_points, missing, self.coarse_jacobian_ratio)
            folding = self._coarse_folding[missing] = dataclasses.replace(self.folding, jacobian_points=points)
        return folding

    def transform_lattice(self, *, inverse: bool = False) -> Callable[[tuple[Tensor, Tensor, Tensor]], Tensor] | None:
        """The current transform's lattice reader (``phi``, or with ``inverse`` a velocity field's
        ``phi^-1``, from per-axis coordinates), or ``None`` where it has none (SIREN fields,
        phase 2 of the hybrid schedule)."""
        field = self.field
        if self.in_phase2 or not isinstance(field, (GridDisplacementField, GridVelocityField)):
            return None
        if inverse:
            return functools.partial(field.on_lattice, inverse=True) if isinstance(field, GridVelocityField) else None
        return field.on_lattice

    # -- the hybrid schedule (training/hybrid_callback.py) ----------------------------------
    def configure_callbacks(self) -> list[Callback]:
        """:class:`~nir_lightning.training.hybrid_callback.HybridPhases` when the module has a
        schedule and the trainer does not hold one for it yet (``predict`` after ``fit``)."""
        held = self._trainer is not None and any(isinstance(c, HybridPhases) and c.schedule is self.schedule for c in getattr(self.trainer, "callbacks", []))
        return [] if self.schedule is None or held else [HybridPhases(self.schedule)]

    def on_fit_end(self) -> None:
        self.set_grid_levels(None)  # the fitted transform has every level

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        gen = self._generator(self.global_step)
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 0
        progress = self.global_step / total if total else 1.0
        sample = self.sampler.sample(self.shape, generator=gen, mask=self.sample_mask, progress=progress, step=self.global_step, seed=self.seed)
        self._check_folds(sample, total)
        out = self.model_step(sample, gen)
        if not bool(torch.isfinite(out["loss"])):
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step} (similarity={float(out['sim'])}, penalty={float(out['jedt'])}); "
                "lower model.lr or check the inputs for extreme intensities."
            )
        log_objective(
            self, out, similarity=self.similarity.kind, regularizer=self.regularizer,
            smoothness=self.smoothness.kind if self.smoothness.active and self.alpha > 0 else None, symmetric=self.symmetric,
        )
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pair = self.pair
        labels = None
        if pair is not None and pair.has_labels:
            assert pair.fixed_labels is not None and pair.moving_labels is not None
            labels = (pair.fixed_labels, pair.moving_labels, pair.labels)
        metrics = validation_metrics(
            self.transform, self.fixed, self.moving, stride=self.val_stride, window=self.similarity.window,
            generator=self._generator(0), labels=labels,
        )
        for key, value in metrics.items():
            self.log(f"val/{key}", value)

    def predict_step(self, batch: Any, batch_idx: int) -> RegistrationResult:
        assert self.pair is not None
        dm = self._datamodule()  # its scores of the unregistered pair, if they are this pair's
        before = getattr(dm, "before_scores", None) if getattr(dm, "pair", None) is self.pair else None
        return evaluate(self.transform_field(), self.pair, max_points=self.eval_max_points, before=before)

    def configure_optimizers(self) -> Any:
        # One optimizer, one param group per field, all built now: a group added mid-fit would
        # break resuming (see nir_lightning.training.schedule). The frozen field has requires_grad=False.
        groups = [{"params": list(self.field.parameters()), "name": "field"}]
        if self.field2 is not None:
            groups.append({"params": list(self.field2.parameters()), "name": "field2"})
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        return optimizer_config(groups, self.lr, total_steps=total, final_ratio=self.lr_final_ratio, schedule=self.schedule, max_steps=self.trainer.max_steps)
