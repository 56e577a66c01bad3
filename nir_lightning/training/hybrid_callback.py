"""The callback that runs the hybrid two-phase schedule (``model.schedule``) during a fit.

:class:`~nir_lightning.training.module.RegistrationModule` returns it from
``configure_callbacks`` whenever it has a schedule, so ``nir register``, ``nir fit`` and a
notebook's own ``Trainer`` all run it without listing it in a config. What the phases are and
why resuming works is in :mod:`nir_lightning.training.schedule`; the switch itself (freezing a
field, swapping the sampler and the window) is :func:`apply_phase`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol, cast

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

from nir_lightning.losses import Similarity
from nir_lightning.sampling import CoordinateSampler
from nir_lightning.training.schedule import PHASE_1, PHASE_2, HybridSchedule

__all__ = ["HybridPhases", "apply_phase"]

log = logging.getLogger(__name__)


class PhasedModule(Protocol):
    """What the schedule changes on a :class:`~nir_lightning.training.module.RegistrationModule`
    (declared here, so this module need not import that one, which imports this one)."""

    phase: Tensor
    field: nn.Module
    field2: nn.Module | None
    sampler: CoordinateSampler
    similarity: Similarity

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class HybridPhases(Callback):
    """Applies the module's phase when a fit starts, switches to phase 2 at the schedule's step,
    and leaves the module trainable with its phase-1 sampler and window when the fit ends.

    The phase itself is the module's persistent ``phase`` buffer, so a checkpoint holds it and
    this callback keeps no state of its own in checkpoints.

    Args:
        schedule: the module's :class:`~nir_lightning.training.schedule.HybridSchedule`.
    """

    def __init__(self, schedule: HybridSchedule) -> None:
        self.schedule = schedule
        self.phase1: tuple[CoordinateSampler, int] | None = None  # phase 1's sampler and window, from on_fit_start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the module state (and so the phase buffer) is restored from a checkpoint,
        # before the optimizer state: the frozen field's requires_grad is set before Adam resumes.
        module = _registration_module(pl_module)
        self.phase1 = (module.sampler, module.similarity.window)
        apply_phase(module, int(module.phase), self.schedule, phase1=self.phase1)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        module = _registration_module(pl_module)
        if int(module.phase) != PHASE_1:
            return
        if trainer.global_step >= self.schedule.resolve_switch_step(trainer.max_steps):
            log.info("hybrid schedule: phase 2 starts at step %d", trainer.global_step)
            apply_phase(module, PHASE_2, self.schedule)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the module trainable again, with its configured sampler and window (the phase buffer stays)
        module = _registration_module(pl_module)
        for p in module.parameters():
            p.requires_grad_(True)
        if self.phase1 is not None:
            module.sampler, module.similarity.window = self.phase1


def apply_phase(
    module: PhasedModule,
    phase: int,
    schedule: HybridSchedule,
    *,
    phase1: tuple[CoordinateSampler, int] | None = None,
) -> None:
    """Set ``module.phase`` and the matching trainable field (the other one frozen, its gradients
    dropped), sampler and window: ``schedule``'s in phase 2, ``phase1`` (sampler, window) in phase 1."""
    if phase not in (PHASE_1, PHASE_2):
        raise ValueError(f"phase must be 1 or 2, got {phase}")
    if module.field2 is None:
        raise ValueError("the hybrid schedule needs model.field2")
    module.phase.fill_(phase)
    for field_, trains in ((module.field, phase == PHASE_1), (module.field2, phase == PHASE_2)):
        for p in field_.parameters():
            p.requires_grad_(trains)
            if not trains:
                p.grad = None
    if phase == PHASE_2:
        module.sampler = schedule.phase2_sampler
        if schedule.phase2_window is not None:
            module.similarity.window = schedule.phase2_window
    elif phase1 is not None:
        module.sampler, module.similarity.window = phase1


def _registration_module(pl_module: pl.LightningModule) -> PhasedModule:
    if not all(hasattr(pl_module, name) for name in ("phase", "field", "field2", "sampler", "similarity")):
        raise TypeError(f"HybridPhases runs a RegistrationModule's schedule, got {type(pl_module).__name__}")
    return cast(PhasedModule, pl_module)
