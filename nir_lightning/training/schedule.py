"""Schedules of a fit: the optimiser, the learning-rate decay and the hybrid two-phase schedule.

The hybrid schedule (the paper's answer to the sampler trade-off) is part of the model's
config, ``model.schedule``: phase 1 fits ``model.field`` (NF1), normally with the ``downsize``
sampler; from ``switch_step`` on, NF1 is frozen and ``model.field2`` (NF2) is fitted on
full-resolution mini-patches at NF1's output, so the transform is ``phi = phi2 o phi1``
(:class:`~nir_lightning.fields.ComposedField`). A callback runs it
(:class:`~nir_lightning.training.hybrid_callback.HybridPhases`), which the module adds itself
(``configure_callbacks``), so no config has to list it.

Resuming at any step, across the switch included, works because nothing about the phase lives
outside the checkpoint: both fields' parameter groups exist from ``configure_optimizers`` on
(adding a group mid-fit breaks the optimizer's ``load_state_dict``; the frozen field has
``requires_grad=False``, so Adam leaves it and its moments untouched), the phase is a
persistent buffer of the module, freezing/sampler/window are re-applied in ``on_fit_start``
(after the module state is restored, before the optimizer state), and coordinate sampling is a
function of ``(seed, global_step)`` only. One optimizer under automatic optimization: two
optimizers under manual optimization would advance ``global_step`` twice per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nir_lightning.errors import InputError
from nir_lightning.sampling import CoordinateSampler, MinipatchSampler
from nir_lightning.training.lazy_default import lazy_default

log = logging.getLogger(__name__)

PHASE_1 = 1
PHASE_2 = 2


def build_adam(groups: Iterable[dict[str, Any]], lr: float) -> torch.optim.Adam:
    """Adam over parameter ``groups``; fused (one kernel per tensor, about 4x faster than the
    per-operation update on the default 97^3 feature grid on a CPU) where every parameter
    allows it (float32 on a CPU or CUDA device). The same update to rounding.

    >>> p = torch.nn.Parameter(torch.zeros(3))
    >>> build_adam([{"params": [p]}], 0.1).defaults["fused"]
    True
    """
    groups = list(groups)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups for p in g["params"])
    return torch.optim.Adam(groups, lr=lr, fused=fused)


def linear_decay(total_steps: int, final_ratio: float = 0.1) -> Callable[[int], float]:
    """LR factor falling linearly from 1 at step 0 to ``final_ratio`` at ``total_steps``.

    >>> f = linear_decay(10, 0.1)
    >>> [round(f(s), 2) for s in (0, 5, 10, 20)]
    [1.0, 0.55, 0.1, 0.1]
    """
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        return 1.0 - (1.0 - final_ratio) * min(step, total) / total

    return factor


def optimizer_config(
    groups: Iterable[dict[str, Any]], lr: float, *, total_steps: int, final_ratio: float,
    schedule: HybridSchedule | None = None, max_steps: int = 0,
) -> dict[str, Any]:
    """``configure_optimizers``' answer: :func:`build_adam` over ``groups`` and a per-step LambdaLR,
    :func:`linear_decay` over ``total_steps``, or the hybrid ``schedule``'s two-phase factors."""
    optimizer = build_adam(groups, lr)
    lambdas: Any = linear_decay(total_steps, final_ratio) if schedule is None else schedule.lr_lambdas(max_steps, total_steps, final_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def two_phase_lr_lambdas(total_steps: int, switch_step: int, final_ratio: float) -> list[Callable[[int], float]]:
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


_DEFAULT_PHASE2_SAMPLER = lazy_default(MinipatchSampler)


class HybridSchedule:
    """When phase 2 starts and how it samples (``model.schedule`` in configs).

    Steps ``0 .. switch_step - 1`` are phase 1 (NF1 trains with ``model.sampler``); from
    ``switch_step`` on, phase 2 (NF1 frozen, NF2 trains with ``phase2_sampler`` on ``NF2 o NF1``).

    Args:
        switch_step: the first step of phase 2. ``None``: ``switch_fraction * max_steps``.
        switch_fraction: used when ``switch_step`` is ``None``.
        phase2_sampler: sampler of phase 2 (full-resolution mini-patches in the paper).
        phase2_window: local-NCC window (lattice samples) in phase 2; ``None`` keeps
            ``model.window``. Full-resolution patches want a wider window than a stride-3 lattice.

    >>> HybridSchedule(switch_step=100).resolve_switch_step(400)
    100
    >>> HybridSchedule(switch_fraction=0.25).resolve_switch_step(400)
    100
    """

    def __init__(
        self,
        *,
        switch_step: int | None = None,
        switch_fraction: float = 0.5,
        phase2_sampler: CoordinateSampler = _DEFAULT_PHASE2_SAMPLER,
        phase2_window: int | None = None,
    ) -> None:
        if switch_step is not None and switch_step < 0:
            raise InputError(f"HybridSchedule.switch_step must be >= 0, got {switch_step}", owner="HybridSchedule", param="switch_step", value=switch_step)
        if not 0 <= switch_fraction <= 1:
            raise InputError(f"HybridSchedule.switch_fraction must be in [0, 1], got {switch_fraction}", owner="HybridSchedule", param="switch_fraction", value=switch_fraction)
        if phase2_window is not None and phase2_window < 2:
            raise InputError(f"HybridSchedule.phase2_window must be >= 2, got {phase2_window}", owner="HybridSchedule", param="phase2_window", value=phase2_window)
        patch = getattr(phase2_sampler, "patch_size", None)
        if phase2_window is not None and patch is not None and phase2_window > patch:
            raise InputError(f"HybridSchedule.phase2_window={phase2_window} is larger than the mini-patch ({patch}); use a window <= patch_size.", owner="HybridSchedule", param="phase2_window", value=phase2_window)
        self.switch_step = switch_step
        self.switch_fraction = switch_fraction
        # a new one for the shared default, as RegistrationModule does with its field
        self.phase2_sampler = MinipatchSampler() if phase2_sampler is _DEFAULT_PHASE2_SAMPLER else phase2_sampler
        self.phase2_window = phase2_window

    def resolve_switch_step(self, max_steps: int | None) -> int:
        """The step at which phase 2 starts, for a fit of ``max_steps`` steps."""
        if self.switch_step is not None:
            return int(self.switch_step)
        if max_steps is None or max_steps < 0:
            raise InputError("the hybrid schedule needs trainer.max_steps (or an explicit model.schedule.init_args.switch_step).")
        return round(self.switch_fraction * max_steps)

    def check_fit(self, max_steps: int | None, window: int) -> None:
        """Before a fit of ``max_steps`` steps whose phase-1 local NCC window is ``window``: warn
        when phase 2 would never start; raise when phase 2's window exceeds its mini-patch.

        >>> HybridSchedule(switch_step=10).check_fit(100, window=5)
        >>> HybridSchedule(phase2_sampler=MinipatchSampler(patch_size=4)).check_fit(100, window=5)
        Traceback (most recent call last):
        ...
        nir_lightning.errors.InputError: model.window=5 is larger than the phase-2 mini-patch (4); set model.schedule.init_args.phase2_window <= patch_size.
        """
        switch = self.resolve_switch_step(max_steps)
        if max_steps is not None and 0 < max_steps <= switch:
            log.warning("hybrid schedule: switch_step=%d >= trainer.max_steps=%d, so phase 2 never starts.", switch, max_steps)
        phase2_window = self.phase2_window or window
        patch = getattr(self.phase2_sampler, "patch_size", None)
        if patch is not None and phase2_window > patch:
            raise InputError(
                f"model.window={phase2_window} is larger than the phase-2 mini-patch ({patch}); "
                "set model.schedule.init_args.phase2_window <= patch_size."
            )

    def lr_lambdas(self, max_steps: int | None, total_steps: int, final_ratio: float) -> list[Callable[[int], float]]:
        """Per-group LR factors ``[NF1, NF2]`` (see :func:`two_phase_lr_lambdas`)."""
        return two_phase_lr_lambdas(total_steps, self.resolve_switch_step(max_steps), final_ratio)

    def __repr__(self) -> str:
        return (
            f"HybridSchedule(switch_step={self.switch_step}, switch_fraction={self.switch_fraction}, "
            f"phase2_sampler={self.phase2_sampler!r}, phase2_window={self.phase2_window})"
        )
