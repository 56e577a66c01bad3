"""Watching Dice during a fit: a registration that makes the label maps agree *less* has wrong labels.

Swapped or foreign label maps load without error (see :mod:`nir_lightning.data.label_checks`
for the checks at loading); the field still aligns the images, so the warped moving labels
drift away from the fixed labels and Dice falls (0.520 -> 0.347 on the shared brain pair with
the maps swapped). :class:`DiceWatch` says so during the fit, :func:`dice_fell` /
:func:`dice_fell_message` at its end from ``dice_before`` / ``dice_after``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from nir_lightning.core.resample import sample_image
from nir_lightning.errors import InputError
from nir_lightning.evaluation.metrics import dice_per_label, mean_dice
from nir_lightning.sampling import DownsizeSampler

log = logging.getLogger(__name__)

DICE_TOLERANCE = 0.02
"""Dice may fall by this much (sampling noise of the coarse validation lattice) before a warning."""

_ADVICE = (
    "Registration makes the label maps agree less, so they probably do not belong to their images: "
    "were --fixed-labels and --moving-labels swapped, or is one the segmentation of another subject?"
)


def dice_fell(before: float | None, after: float | None, tol: float = DICE_TOLERANCE) -> bool:
    """Whether Dice fell by more than ``tol`` (``False`` when either value is missing or NaN).

    >>> dice_fell(0.520, 0.347), dice_fell(0.52, 0.51), dice_fell(0.52, None)
    (True, False, False)
    """
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
        return False
    return after < before - tol


def dice_fell_message(before: float | None, after: float | None, tol: float = DICE_TOLERANCE) -> str | None:
    """The end-of-run warning when :func:`dice_fell`, else ``None``.

    >>> dice_fell_message(0.75, 0.8) is None
    True
    >>> print(dice_fell_message(0.520, 0.347))  # doctest: +ELLIPSIS
    Dice fell during registration, from 0.520 before to 0.347 after (by more than 0.02). Registration ...
    """
    if not dice_fell(before, after, tol):
        return None
    assert before is not None and after is not None
    return f"Dice fell during registration, from {before:.3f} before to {after:.3f} after (by more than {tol:g}). {_ADVICE}"


def _value(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    number = float(value)  # a scalar tensor or a float
    return number if math.isfinite(number) else None


def identity_dice(pl_module: pl.LightningModule) -> float | None:
    """``val/dice`` of the identity transform: the pair's mean Dice before registration, on the
    same lattice as :meth:`RegistrationModule.validation_step` (``None`` without label maps).

    The lattice matters: on small images Dice on another stride-2 sub-lattice differs by 0.03.
    """
    pair = getattr(pl_module, "pair", None)
    if pair is None or not getattr(pair, "has_labels", False) or not pair.labels:
        return None
    shape = pair.shape
    stride = min(max(1, int(getattr(pl_module, "val_stride", 1))), min(shape))
    make_generator = getattr(pl_module, "_generator", None)  # the module's validation draws its offset from this
    generator = make_generator(0) if callable(make_generator) else torch.Generator(device=pl_module.device).manual_seed(0)
    points = DownsizeSampler(stride=stride).sample(shape, generator=generator).points
    fixed = sample_image(pair.fixed_labels.float().to(pl_module.device), points, mode="nearest")
    moving = sample_image(pair.moving_labels.float().to(pl_module.device), points, mode="nearest")
    value = mean_dice(dice_per_label(moving.round().cpu(), fixed.round().cpu(), pair.labels))
    return value if math.isfinite(value) else None


class DiceWatch(Callback):
    """Warns once when ``val/dice`` falls more than ``tolerance`` below its reference.

    The reference is the Dice before registration (:func:`identity_dice`, taken when training
    starts) if the module holds a pair with label maps, else the first ``val/dice`` logged. It
    is kept in checkpoints, so a resumed fit compares with the same value.

    Args:
        tolerance: how far ``val/dice`` may fall below the reference without a warning.
        key: the logged metric to watch.
    """

    def __init__(self, *, tolerance: float = DICE_TOLERANCE, key: str = "val/dice") -> None:
        super().__init__()
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise InputError(f"DiceWatch.tolerance must be a finite number >= 0, got {tolerance}; use e.g. 0.02.")
        self.tolerance = tolerance
        self.key = key
        self.reference: float | None = None
        self.reference_source = ""
        self.warned = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint is restored: a resumed fit keeps its reference.
        if self.reference is None:
            self.reference = identity_dice(pl_module)
            self.reference_source = "before registration" if self.reference is not None else ""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = _value(trainer.callback_metrics, self.key)
        if value is None:
            return
        step = int(trainer.global_step)
        if self.reference is None:
            self.reference, self.reference_source = value, f"at step {step}"
            return
        if not self.warned and dice_fell(self.reference, value, self.tolerance):
            self.warned = True
            log.warning(
                "%s fell from %.3f (%s) to %.3f at step %d (by more than %g). %s",
                self.key, self.reference, self.reference_source, value, step, self.tolerance, _ADVICE,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "reference_source": self.reference_source, "warned": self.warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self.reference_source = state_dict.get("reference_source", "")
        self.warned = bool(state_dict.get("warned", False))
