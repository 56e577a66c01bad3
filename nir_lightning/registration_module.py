"""LightningModule that fits a neural field to one image pair."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from jsonargparse import lazy_instance
from torch import Tensor

from nir_lightning.coords import (
    normalized_to_voxel,
    normalized_to_voxel_scale,
    voxel_to_normalized,
)
from nir_lightning.errors import InputError
from nir_lightning.evaluate import Registration, evaluate, foreground_mask
from nir_lightning.fields import DisplacementField, NeuralField
from nir_lightning.hybrid import ComposedField, HybridSchedule
from nir_lightning.jacobian import determinant, jacobian_central, jacobian_forward
from nir_lightning.losses import Similarity, jacobian_penalty, local_ncc
from nir_lightning.metrics import dice_per_label, mean_dice
from nir_lightning.pair import ImagePair
from nir_lightning.sampling import (
    CoordinateSample,
    CoordinateSampler,
    DownsizeSampler,
    MinipatchSampler,
    RandomSampler,
)
from nir_lightning.schedule import linear_decay
from nir_lightning.warp import sample_image


class RegistrationModule(pl.LightningModule):
    """Optimises ``field`` so that ``moving(field(x))`` matches ``fixed(x)``.

    Hooks: ``setup`` (attach the datamodule's pair as non-persistent buffers),
    ``training_step`` (sample -> field -> warp -> similarity + lam * folding penalty),
    ``validation_step`` (cheap metrics on a coarse dense lattice), ``predict_step`` (dense
    evaluation, see :func:`nir_lightning.evaluate.evaluate`), ``configure_optimizers`` (Adam
    with linear decay to ``lr_final_ratio * lr``). Keyword arguments map one-to-one onto
    the CLI's ``model.*`` options.

    Args:
        field: the neural field (NF1 of the hybrid schedule).
        field2: optional second field (NF2) for the hybrid schedule: trained in phase 2 on
            ``field``'s output, so the transform is ``field2 o field`` (see
            :mod:`nir_lightning.hybrid`; needs the :class:`~nir_lightning.hybrid.HybridSchedule`
            callback). The current phase is the persistent buffer ``phase`` (1 or 2).
        sampler: coordinate sampler used for training.
        similarity: ``"lncc"`` (squared local NCC), ``"ncc"`` (global) or ``"mse"``.
        window: local NCC window in lattice samples.
        regularizer: ``"jedt"`` (penalise det <= 0 only) or ``"unit"`` (|det - 1|).
        lam: weight of the regulariser.
        margin: ``"jedt"`` penalises ``det J < margin`` (0: folds only, as in NIR).
        lr: Adam learning rate at step 0.
        lr_final_ratio: learning rate at the last step, as a fraction of ``lr``.
        jacobian_points: random foreground points per step whose det J is taken with a
            one-voxel stencil (coarse lattices miss folds between their points).
        jacobian_stencil: finite differences of those points: ``"forward"`` (x, x+h; 4
            evaluations per point) or ``"central"`` (x-h, x+h; 6 evaluations, the stencil of
            the folding metric and of ANTs' ``CreateJacobianDeterminantImage``). Forward
            differences cannot see an oscillation two voxels wide, which central ones report as
            a fold; ``"central"`` penalises those too, so the extra points are then also added
            for samplers whose own Jacobian is already one voxel fine, and one-voxel lattices
            (mini-patches, ``stride=1``) also penalise their interior central-difference det J
            (no extra field evaluations).
        seed: seeds the coordinate sampling (step ``t`` uses ``seed`` and ``t``, so a resumed
            fit samples exactly what an uninterrupted one would).
        val_stride: lattice stride of the validation metrics.
        eval_max_points: points per chunk of dense inference (bounds memory).
    """

    def __init__(
        self,
        *,
        field: NeuralField = lazy_instance(DisplacementField),
        field2: NeuralField | None = None,
        sampler: CoordinateSampler = lazy_instance(DownsizeSampler),
        similarity: Literal["lncc", "ncc", "mse"] = "lncc",
        window: int = 5,
        regularizer: Literal["jedt", "unit"] = "jedt",
        lam: float = 10.0,
        margin: float = 0.3,
        lr: float = 3e-4,
        lr_final_ratio: float = 0.1,
        jacobian_points: int = 4096,
        jacobian_stencil: Literal["forward", "central"] = "forward",
        seed: int = 0,
        val_stride: int = 2,
        eval_max_points: int = 2**18,
    ) -> None:
        super().__init__()
        if not (math.isfinite(lam) and lam >= 0):
            raise InputError(f"model.lam (weight of the folding penalty) must be a finite number >= 0, got {lam}; use e.g. lam=10, or 0 to switch the penalty off.")
        if not 0 <= margin < 1:
            raise InputError(f"model.margin must be in [0, 1) (a det J floor), got {margin}")
        if not (math.isfinite(lr) and lr > 0):
            raise InputError(f"model.lr must be a finite number > 0, got {lr}; use e.g. lr=1e-4.")
        if not 0 < lr_final_ratio <= 1:
            raise InputError(f"model.lr_final_ratio must be in (0, 1], got {lr_final_ratio}")
        if window < 2:
            raise InputError(f"model.window (local NCC window, in lattice samples) must be >= 2, got {window}; use e.g. window=5.")
        if isinstance(sampler, MinipatchSampler) and window > sampler.patch_size:
            raise InputError(f"model.window={window} is larger than the mini-patch ({sampler.patch_size}); use a window <= patch_size.")
        if regularizer not in ("jedt", "unit"):
            raise InputError(f"model.regularizer must be 'jedt' or 'unit', got {regularizer!r}")
        if jacobian_points < 0:
            raise InputError(f"model.jacobian_points must be >= 0, got {jacobian_points}")
        if jacobian_stencil not in ("forward", "central"):
            raise InputError(f"model.jacobian_stencil must be 'forward' or 'central', got {jacobian_stencil!r}")
        if val_stride < 1 or eval_max_points < 1:
            raise InputError("model.val_stride and model.eval_max_points must be >= 1")
        self.save_hyperparameters(logger=False, ignore=["field", "field2", "sampler"])
        self.field = field
        self.field2 = field2
        self.register_buffer("phase", torch.tensor(1, dtype=torch.long))  # persistent: resumes in its phase
        self.sampler = sampler
        self.similarity = Similarity(similarity, window=window)
        self.regularizer = regularizer
        self.lam = lam
        self.margin = margin
        self.lr = lr
        self.lr_final_ratio = lr_final_ratio
        self.jacobian_points = jacobian_points
        self.jacobian_stencil = jacobian_stencil
        self.seed = seed
        self.val_stride = val_stride
        self.eval_max_points = eval_max_points
        self.pair: ImagePair | None = None

    # -- data ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.pair is None:
            if dm is None or getattr(dm, "pair", None) is None:
                raise RuntimeError("RegistrationModule needs a PairDataModule (or call attach_pair first).")
            self.attach_pair(dm.pair)

    def attach_pair(self, pair: ImagePair) -> None:
        """Register the pair's images as (non-persistent) buffers so they follow the device."""
        self.pair = pair
        self.register_buffer("fixed", pair.fixed.float(), persistent=False)
        self.register_buffer("moving", pair.moving.float(), persistent=False)
        self.register_buffer("mask", foreground_mask(pair), persistent=False)

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
        y = self.field(x)
        return self.field2(y) if self.in_phase2 else y  # type: ignore[misc]

    def _voxel_offsets(self, like: Tensor) -> Tensor:
        """``(3, 3)``: row ``a`` is one fixed voxel along axis ``a``, in normalized units."""
        return torch.diag((1.0 / normalized_to_voxel_scale(self.shape)).to(like))

    def _stencil_det(self, pts: Tensor) -> tuple[Tensor, Tensor]:
        """Field at ``pts`` ``(1, N, 1, 1, 3)`` and det J by one-voxel forward differences."""
        offsets = self._voxel_offsets(pts)
        stencil = torch.cat([pts] + [pts + offsets[a] for a in range(3)], dim=0)
        out_vox = normalized_to_voxel(self.transform(stencil), self.shape)
        jac = torch.stack([out_vox[a + 1] - out_vox[0] for a in range(3)], dim=-1)
        return out_vox[:1], determinant(jac)

    def _central_det(self, pts: Tensor) -> Tensor:
        """det J at ``pts`` ``(1, N, 1, 1, 3)`` by one-voxel central differences."""
        offsets = self._voxel_offsets(pts)
        stencil = torch.cat([pts + offsets[a] for a in range(3)] + [pts - offsets[a] for a in range(3)], dim=0)
        out_vox = normalized_to_voxel(self.transform(stencil), self.shape)
        jac = torch.stack([(out_vox[a] - out_vox[a + 3]) / 2 for a in range(3)], dim=-1)
        return determinant(jac)

    def needs_extra_points(self, sample: CoordinateSample) -> bool:
        """Whether ``sample``'s own det J misses folds that ``jacobian_points`` would see: on
        lattices coarser than one voxel, and always with ``jacobian_stencil="central"`` (every
        sample's own stencil is a forward one)."""
        coarse = sample.is_grid and max(sample.spacing or (1, 1, 1)) > 1
        return self.jacobian_points > 0 and (coarse or self.jacobian_stencil == "central")

    def _penalty(self, det: Tensor) -> Tensor:
        return jacobian_penalty(det, kind=self.regularizer, margin=self.margin)  # type: ignore[arg-type]

    def lattice_penalty(self, sample: CoordinateSample, phi_vox: Tensor) -> Tensor:
        """Penalty of a lattice sample's own det J, from the transformed lattice ``phi_vox``
        ``(B, d0, d1, d2, 3)`` (fixed voxels): forward differences at the lattice step; with
        ``jacobian_stencil="central"`` on a one-voxel lattice (mini-patches, ``stride=1``) plus,
        as a separate mean, central differences at its interior points (no extra field
        evaluations)."""
        assert sample.spacing is not None
        reg = self._penalty(determinant(jacobian_forward(phi_vox, sample.spacing)))
        if self.jacobian_stencil == "central" and tuple(sample.spacing) == (1, 1, 1) and min(phi_vox.shape[1:4]) >= 3:
            reg = reg + self._penalty(determinant(jacobian_central(phi_vox)[:, 1:-1, 1:-1, 1:-1]))
        return reg

    def extra_penalty(self, generator: torch.Generator) -> Tensor:
        """Penalty on ``jacobian_points`` random foreground points, with its own mean: folds
        between lattice points must not be diluted by the lattice."""
        extra = RandomSampler(num_points=self.jacobian_points).sample(self.shape, generator=generator, mask=self.mask)
        if self.jacobian_stencil == "central":
            return self._penalty(self._central_det(extra.points))
        return self._penalty(self._stencil_det(extra.points)[1])

    def model_step(self, sample: CoordinateSample, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Similarity and folding penalty of ``self.field`` on one coordinate sample.

        The sample's own det J uses forward differences (one voxel fine for random points and
        mini-patches, ``stride`` voxels on the downsize lattice). ``jacobian_points`` extra
        points with a one-voxel stencil are added where that misses folds: on lattices coarser
        than one voxel, and always with ``jacobian_stencil="central"``, which on one-voxel
        lattices also adds the penalty of their interior central-difference det J (a separate
        mean, like the extra points').
        """
        pts = sample.points
        if sample.is_grid:
            phi = self.transform(pts)
            reg = self.lattice_penalty(sample, normalized_to_voxel(phi, self.shape))
        else:
            phi_vox, det = self._stencil_det(pts)
            phi = voxel_to_normalized(phi_vox, self.shape)
            reg = self._penalty(det)
        if generator is not None and self.needs_extra_points(sample):
            reg = reg + self.extra_penalty(generator)
        warped = sample_image(self.moving, phi)
        fixed = sample_image(self.fixed, pts)
        sim = self.similarity(fixed, warped, is_grid=sample.is_grid)
        return {"loss": sim + self.lam * reg, "sim": sim, "jedt": reg}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        gen = self._generator(self.global_step)
        sample = self.sampler.sample(self.shape, generator=gen, mask=self.mask)
        out = self.model_step(sample, gen)
        if not bool(torch.isfinite(out["loss"])):
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step} (similarity={float(out['sim'])}, penalty={float(out['jedt'])}); "
                "lower model.lr or check the inputs for extreme intensities."
            )
        key = self.similarity.kind
        self.log(f"train/{key}", out["sim"], prog_bar=False)
        self.log("train/jedt", out["jedt"])
        self.log("train/loss", out["loss"], prog_bar=True)
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        sampler = DownsizeSampler(stride=min(self.val_stride, min(self.shape)))
        sample = sampler.sample(self.shape, generator=self._generator(0))
        phi = self.transform(sample.points)
        out_vox = normalized_to_voxel(phi, self.shape)
        assert sample.spacing is not None
        det = determinant(jacobian_forward(out_vox, sample.spacing))
        fixed = sample_image(self.fixed, sample.points)
        warped = sample_image(self.moving, phi)
        self.log("val/ncc", local_ncc(fixed, warped, window=self.similarity.window))
        mask = fixed[:, 0, :-1, :-1, :-1] > 0.01
        folded = (det <= 0) & mask
        self.log("val/folding_percent", 100.0 * folded.sum() / mask.sum().clamp(min=1))
        if self.pair is not None and self.pair.has_labels:
            assert self.pair.fixed_labels is not None and self.pair.moving_labels is not None
            ml = sample_image(self.pair.moving_labels.float().to(self.device), phi, mode="nearest")
            fl = sample_image(self.pair.fixed_labels.float().to(self.device), sample.points, mode="nearest")
            self.log("val/dice", mean_dice(dice_per_label(ml.round().cpu(), fl.round().cpu(), self.pair.labels)))

    def predict_step(self, batch: Any, batch_idx: int) -> Registration:
        assert self.pair is not None
        return evaluate(self.transform_field(), self.pair, max_points=self.eval_max_points)

    def configure_optimizers(self) -> Any:
        # One optimizer, one param group per field, all built now: a group added mid-fit would
        # break resuming (see nir_lightning.hybrid). The frozen field has requires_grad=False.
        groups = [{"params": list(self.field.parameters()), "name": "field"}]
        if self.field2 is not None:
            groups.append({"params": list(self.field2.parameters()), "name": "field2"})
        optimizer = torch.optim.Adam(groups, lr=self.lr)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        lambdas: Any = linear_decay(total, self.lr_final_ratio)
        if self.field2 is not None:
            schedules = [cb for cb in self.trainer.callbacks if isinstance(cb, HybridSchedule)]  # type: ignore[attr-defined]
            if len(schedules) != 1:
                raise InputError(
                    "model.field2 is set, so the fit needs exactly one HybridSchedule callback "
                    f"(found {len(schedules)}); use -c configs/model/hybrid.yaml or add "
                    "nir_lightning.hybrid.HybridSchedule to trainer.callbacks."
                )
            lambdas = schedules[0].lr_lambdas(self.trainer, total, self.lr_final_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
