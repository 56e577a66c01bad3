"""The hybrid two-phase schedule: NF1 on a coarse lattice, then NF2 on mini-patches.

Phase 1 fits ``model.field`` (NF1), normally with the ``downsize`` sampler. At
``switch_step`` NF1 is frozen and ``model.field2`` (NF2, a displacement or velocity field)
is fitted on full-resolution mini-patches, evaluated at NF1's output, so the transform is
``phi = phi2 o phi1`` (:class:`ComposedField`). :class:`HybridSchedule` drives it.

Resume at any step, across the switch included, works because nothing about the phase
lives outside the checkpoint:

* both fields' parameter groups exist from ``configure_optimizers`` on (adding a group
  mid-fit breaks ``load_state_dict`` of the optimizer); the frozen field has
  ``requires_grad=False``, so it has no gradient and Adam leaves it (and its moments)
  untouched;
* the phase is a persistent buffer of the module (``module.phase``), restored with the
  weights;
* the callback re-applies freezing, sampler and window in ``on_fit_start``, which runs after
  the module state is restored and before the optimizer state is;
* coordinate sampling is a function of ``(seed, global_step)`` only.

One optimizer under automatic optimization: two optimizers under manual optimization
would advance ``global_step`` twice per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from jsonargparse import lazy_instance
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from nir_lightning.errors import InputError
from nir_lightning.fields import NeuralField
from nir_lightning.sampling import CoordinateSampler, MinipatchSampler
from nir_lightning.schedule import linear_decay

if TYPE_CHECKING:
    from nir_lightning.registration_module import RegistrationModule

log = logging.getLogger(__name__)

PHASE_1 = 1
PHASE_2 = 2


class ComposedField(NeuralField):
    """``phi(x) = second(first(x))``; invertible when both parts are.

    >>> import torch
    >>> from nir_lightning.fields import DisplacementField
    >>> a, b = DisplacementField(width=8, depth=1), DisplacementField(width=8, depth=1)
    >>> x = torch.zeros(4, 3)
    >>> bool(torch.equal(ComposedField(a, b)(x), b(a(x))))
    True
    """

    def __init__(self, first: NeuralField, second: NeuralField) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @property
    def invertible(self) -> bool:
        return bool(getattr(self.first, "invertible", False) and getattr(self.second, "invertible", False))

    def inverse(self, y: Tensor) -> Tensor:
        """``phi^-1 = first^-1 o second^-1``."""
        if not self.invertible:
            raise TypeError("ComposedField.inverse needs two invertible fields (e.g. two VelocityFields)")
        return self.first.inverse(self.second.inverse(y))  # type: ignore[operator]


def two_phase_lr_lambdas(
    total_steps: int, switch_step: int, final_ratio: float
) -> list[Callable[[int], float]]:
    """LR factors of the two parameter groups: NF1 decays linearly over phase 1, NF2 is 0
    before the switch and decays linearly over phase 2 (both from 1 to ``final_ratio``).

    >>> f1, f2 = two_phase_lr_lambdas(10, 4, 0.1)
    >>> [round(f1(s), 3) for s in (0, 4)], [round(f2(s), 3) for s in (3, 4, 10)]
    ([1.0, 0.1], [0.0, 1.0, 0.1])
    """
    phase1 = linear_decay(max(1, switch_step), final_ratio)
    phase2 = linear_decay(max(1, total_steps - switch_step), final_ratio)

    def nf1(step: int) -> float:
        return phase1(step)

    def nf2(step: int) -> float:
        return 0.0 if step < switch_step else phase2(step - switch_step)

    return [nf1, nf2]


class HybridSchedule(Callback):
    """Drives the hybrid schedule of a :class:`~nir_lightning.registration_module.RegistrationModule`
    that has ``field2``.

    Steps ``0 .. switch_step - 1`` are phase 1 (NF1 trains with ``model.sampler``); from
    ``switch_step`` on, phase 2 (NF1 frozen, NF2 trains with ``phase2_sampler`` on ``NF2 o NF1``).

    Args:
        switch_step: the first step of phase 2. ``None``: ``switch_fraction * max_steps``.
        switch_fraction: used when ``switch_step`` is ``None``.
        phase2_sampler: sampler of phase 2 (full-resolution mini-patches in the paper).
        phase2_window: local-NCC window (lattice samples) in phase 2; ``None`` keeps
            ``model.window``. Full-resolution patches want a wider window than a stride-3 lattice.
    """

    def __init__(
        self,
        *,
        switch_step: int | None = None,
        switch_fraction: float = 0.5,
        phase2_sampler: CoordinateSampler = lazy_instance(MinipatchSampler),
        phase2_window: int | None = None,
    ) -> None:
        super().__init__()
        if switch_step is not None and switch_step < 0:
            raise InputError(f"HybridSchedule.switch_step must be >= 0, got {switch_step}")
        if not 0 <= switch_fraction <= 1:
            raise InputError(f"HybridSchedule.switch_fraction must be in [0, 1], got {switch_fraction}")
        if phase2_window is not None and phase2_window < 2:
            raise InputError(f"HybridSchedule.phase2_window must be >= 2, got {phase2_window}")
        patch = getattr(phase2_sampler, "patch_size", None)
        if phase2_window is not None and patch is not None and phase2_window > patch:
            raise InputError(f"HybridSchedule.phase2_window={phase2_window} is larger than the mini-patch ({patch}).")
        self.switch_step = switch_step
        self.switch_fraction = switch_fraction
        self.phase2_sampler = phase2_sampler
        self.phase2_window = phase2_window
        self._phase1_sampler: CoordinateSampler | None = None
        self._phase1_window: int | None = None

    # -- the schedule ----------------------------------------------------------------------
    def resolve_switch_step(self, trainer: pl.Trainer) -> int:
        """The step at which phase 2 starts, for this trainer."""
        if self.switch_step is not None:
            return int(self.switch_step)
        if trainer.max_steps is None or trainer.max_steps < 0:
            raise InputError("HybridSchedule needs trainer.max_steps (or an explicit switch_step).")
        return round(self.switch_fraction * trainer.max_steps)

    def lr_lambdas(self, trainer: pl.Trainer, total_steps: int, final_ratio: float) -> list[Callable[[int], float]]:
        """Per-group LR factors ``[NF1, NF2]`` (see :func:`two_phase_lr_lambdas`)."""
        return two_phase_lr_lambdas(total_steps, self.resolve_switch_step(trainer), final_ratio)

    # -- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "field2", None) is None:
            raise InputError(
                "HybridSchedule needs a second field: set model.field2 (e.g. -c configs/model/hybrid.yaml)."
            )
        if stage == "fit":
            switch = self.resolve_switch_step(trainer)
            if trainer.max_steps is not None and 0 < trainer.max_steps <= switch:
                log.warning(
                    "HybridSchedule: switch_step=%d >= trainer.max_steps=%d, so phase 2 never starts.",
                    switch, trainer.max_steps,
                )
            window = self.phase2_window or pl_module.similarity.window  # type: ignore[union-attr]
            patch = getattr(self.phase2_sampler, "patch_size", None)
            if patch is not None and window > patch:
                raise InputError(
                    f"model.window={window} is larger than the phase-2 mini-patch ({patch}); "
                    "set HybridSchedule.phase2_window <= patch_size."
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the module state (and so the phase buffer) is restored from a checkpoint.
        self._phase1_sampler = pl_module.sampler  # type: ignore[assignment]
        self._phase1_window = pl_module.similarity.window  # type: ignore[union-attr]
        self.apply_phase(pl_module, int(pl_module.phase))  # type: ignore[arg-type]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if int(pl_module.phase) == PHASE_1 and trainer.global_step >= self.resolve_switch_step(trainer):  # type: ignore[arg-type]
            log.info("HybridSchedule: phase 2 starts at step %d", trainer.global_step)
            self.apply_phase(pl_module, PHASE_2)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Leave the module trainable and with its configured sampler (the phase buffer stays).
        for p in pl_module.parameters():
            p.requires_grad_(True)
        if self._phase1_sampler is not None:
            pl_module.sampler = self._phase1_sampler
        if self._phase1_window is not None:
            pl_module.similarity.window = self._phase1_window  # type: ignore[union-attr]

    # -- state -----------------------------------------------------------------------------
    def apply_phase(self, module: RegistrationModule | pl.LightningModule, phase: int) -> None:
        """Set ``module.phase`` and the matching trainable field, sampler and window."""
        if phase not in (PHASE_1, PHASE_2):
            raise ValueError(f"phase must be 1 or 2, got {phase}")
        module.phase.fill_(phase)  # type: ignore[union-attr,operator]
        field1, field2 = module.field, module.field2  # type: ignore[union-attr]
        assert field2 is not None
        for p in field1.parameters():  # type: ignore[union-attr]
            p.requires_grad_(phase == PHASE_1)
            if phase != PHASE_1:
                p.grad = None
        for p in field2.parameters():  # type: ignore[union-attr]
            p.requires_grad_(phase == PHASE_2)
            if phase != PHASE_2:
                p.grad = None
        if phase == PHASE_2:
            module.sampler = self.phase2_sampler
            if self.phase2_window is not None:
                module.similarity.window = self.phase2_window  # type: ignore[union-attr]
        else:
            if self._phase1_sampler is not None:
                module.sampler = self._phase1_sampler
            if self._phase1_window is not None:
                module.similarity.window = self._phase1_window  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return (
            f"HybridSchedule(switch_step={self.switch_step}, switch_fraction={self.switch_fraction}, "
            f"phase2_sampler={self.phase2_sampler!r}, phase2_window={self.phase2_window})"
        )
