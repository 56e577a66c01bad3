"""Checks of the registration module's options, each error naming the option, the value and a fix.

Kept out of :mod:`nir_lightning.training.module` so that the LightningModule holds its hooks; the
checks run before anything is built (``RegistrationModule.__init__``), as the CLI parses a config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from nir_lightning.errors import InputError
from nir_lightning.fields import NeuralField
from nir_lightning.losses.folding import DEFAULT_MARGIN_FLOORS
from nir_lightning.sampling import CoordinateSampler, MinipatchSampler
from nir_lightning.training.schedule import HybridSchedule


def check_options(
    *,
    lam: float,
    alpha: float,
    lr: float,
    lr_final_ratio: float,
    window: int,
    sampler: CoordinateSampler,
    field: NeuralField,
    field2: NeuralField | None,
    schedule: HybridSchedule | None,
    jacobian_stencil: str,
    coarse_jacobian_ratio: float,
    val_stride: int,
    eval_max_points: int,
    domain_margin: float | None,
    symmetric: bool = False,
) -> None:
    """Raise :class:`~nir_lightning.errors.InputError` for the first option of ``model.*`` out of range.

    >>> from nir_lightning.fields import GridDisplacementField
    >>> from nir_lightning.sampling import PyramidSampler
    >>> check_options(lam=-1.0, alpha=1.0, lr=1e-2, lr_final_ratio=0.1, window=5, sampler=PyramidSampler(),
    ...               field=GridDisplacementField(levels=2), field2=None, schedule=None, jacobian_stencil="analytic",
    ...               coarse_jacobian_ratio=0.25, val_stride=2, eval_max_points=1024, domain_margin=16.0)
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: model.lam (weight of the folding penalty) must be a finite number >= 0, got -1.0; use e.g. lam=10, or 0 to switch the penalty off.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise InputError(f"model.lam (weight of the folding penalty) must be a finite number >= 0, got {lam}; use e.g. lam=10, or 0 to switch the penalty off.")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise InputError(f"model.alpha (weight of the smoothness prior) must be a finite number >= 0, got {alpha}; use e.g. alpha=1, or 0 to switch it off.")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"model.lr must be a finite number > 0, got {lr}; use e.g. lr=1e-4.")
    if not 0 < lr_final_ratio <= 1:
        raise InputError(f"model.lr_final_ratio must be in (0, 1], got {lr_final_ratio}")
    if window < 2:
        raise InputError(f"model.window (local NCC window, in lattice samples) must be >= 2, got {window}; use e.g. window=5.")
    if isinstance(sampler, MinipatchSampler) and window > sampler.patch_size:
        raise InputError(f"model.window={window} is larger than the mini-patch ({sampler.patch_size}); use a window <= patch_size.")
    if (field2 is None) != (schedule is None):
        raise InputError(
            "model.field2 and model.schedule go together (the hybrid schedule: NF1, then NF2 on NF1's output); "
            "use -c configs/model/hybrid.yaml, or set both, or neither."
        )
    if jacobian_stencil == "analytic":
        for key, f in (("field", field), ("field2", field2)):
            if f is not None and not f.has_jacobian:
                raise InputError(
                    f"model.jacobian_stencil=analytic needs the exact Jacobian of model.{key} ({type(f).__name__} has none); "
                    "use model.jacobian_stencil=forward or central with it."
                )
    if not 0 < coarse_jacobian_ratio <= 1:
        raise InputError(
            f"model.coarse_jacobian_ratio must be in (0, 1] (the share of det J points kept per grid level left out), got {coarse_jacobian_ratio}; "
            "use 0.25 (the default) or 1 (every stage draws the full count)."
        )
    if val_stride < 1 or eval_max_points < 1:
        raise InputError("model.val_stride and model.eval_max_points must be >= 1")
    if domain_margin is not None and not (math.isfinite(domain_margin) and domain_margin >= 0):
        raise InputError(
            f"model.domain_margin must be a finite number of millimetres >= 0 (or null: the whole image), got {domain_margin}; e.g. 16."
        )
    if symmetric and (not field.invertible or schedule is not None):
        why = "the hybrid schedule composes two fields" if schedule is not None else f"{type(field).__name__} has no inverse"
        raise InputError(
            f"model.symmetric=true needs an invertible field and no hybrid schedule ({why}); "
            "use it with -c configs/model/diffeomorphic.yaml (a velocity field), or leave model.symmetric false."
        )



def margin_floors(margin: float | Sequence[float] | None) -> tuple[float, float]:
    """``model.margin`` as the folding barrier's det J floors ``(at 2 mm, at 1 mm)``, which
    :func:`~nir_lightning.losses.folding.scaled_margin` interpolates by the fixed image's voxel size:
    ``None`` is :data:`~nir_lightning.losses.folding.DEFAULT_MARGIN_FLOORS`, one number is both floors
    (the same at every voxel size, exactly). Each floor must lie in [0, 1).

    >>> margin_floors(None), margin_floors(0.3), margin_floors([0.3, 0.45])
    ((0.35, 0.5), (0.3, 0.3), (0.3, 0.45))
    >>> margin_floors([0.3, 1.2])
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: model.margin must be a det J floor in [0, 1) or two of them [at 2 mm, at 1 mm], got [0.3, 1.2]; e.g. 0.35 or [0.3, 0.45].
    """
    if margin is None:
        return DEFAULT_MARGIN_FLOORS
    single = isinstance(margin, (int, float)) and not isinstance(margin, bool)
    values: list[Any] = [margin] if single else list(margin) if isinstance(margin, Sequence) and not isinstance(margin, str) else []
    if len(values) != (1 if single else 2) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1 for v in values
    ):
        raise InputError(
            f"model.margin must be a det J floor in [0, 1) or two of them [at 2 mm, at 1 mm], got {margin!r}; e.g. 0.35 or [0.3, 0.45]."
        )
    return float(values[0]), float(values[-1])
