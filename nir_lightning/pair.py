"""Loading one fixed/moving pair (and optional label maps) onto the fixed grid with MONAI."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    CopyItemsd,
    EnsureChannelFirstd,
    LoadImaged,
    ResampleToMatchd,
    ScaleIntensityRangePercentilesd,
)
from torch import Tensor

from nir_lightning.coords import voxel_spacing
from nir_lightning.errors import InputError
from nir_lightning.io import (
    check_affine,
    check_image_file,
    check_label_volume,
    check_volume,
    parse_labels,
)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class ImagePair:
    """A pair on the fixed grid. Image tensors are ``(1, 1, D0, D1, D2)``.

    Attributes:
        fixed, moving: intensities scaled to [0, 1] (robust percentiles), float32.
        moving_raw: the moving image's original intensities (on the fixed grid), for output.
        fixed_affine: 4x4 voxel-to-world (RAS mm) affine of the fixed grid.
        fixed_labels, moving_labels: int32 label maps on the fixed grid, or ``None``.
        labels: labels to evaluate Dice over.
        notes: what loading did (resampling etc.), for the user and metrics.json.
    """

    fixed: Tensor
    moving: Tensor
    moving_raw: Tensor
    fixed_affine: np.ndarray
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    labels: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fixed_path: str | None = None
    moving_path: str | None = None
    reference_disp_vox: Tensor | None = None  # known true displacement (synthetic data), (D0, D1, D2, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        d0, d1, d2 = self.fixed.shape[2:]
        return (int(d0), int(d1), int(d2))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.fixed_affine)

    @property
    def has_labels(self) -> bool:
        return self.fixed_labels is not None and self.moving_labels is not None


def _same_grid(a: Tensor, b: Tensor) -> bool:
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and np.allclose(
        np.asarray(a.affine), np.asarray(b.affine), atol=1e-4
    )


def load_pair(
    fixed: PathLike,
    moving: PathLike,
    *,
    fixed_labels: PathLike | None = None,
    moving_labels: PathLike | None = None,
    labels: str | list[int] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> ImagePair:
    """Load, check and bring a pair onto the fixed grid.

    Bad input raises :class:`~nir_lightning.errors.InputError` naming the file and the fix.
    A moving image on another grid (shape, spacing or orientation) is resampled onto the
    fixed grid by its affine (labels with nearest neighbour), and the pair's ``notes`` say so.
    """
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("give both --fixed-labels and --moving-labels, or neither.")
    lo, hi = percentiles
    if not 0 <= lo < hi <= 100:
        raise InputError(f"intensity percentiles must satisfy 0 <= low < high <= 100, got {percentiles}.")
    paths: dict[str, Path] = {
        "fixed": check_image_file(fixed, "fixed"),
        "moving": check_image_file(moving, "moving"),
    }
    if fixed_labels is not None and moving_labels is not None:
        paths["fixed_labels"] = check_image_file(fixed_labels, "fixed label")
        paths["moving_labels"] = check_image_file(moving_labels, "moving label")
    keys = list(paths)
    loader = LoadImaged(keys=keys, image_only=True, dtype=None)
    try:
        data = loader({k: str(v) for k, v in paths.items()})
    except Exception as exc:
        raise InputError(f"could not read image data ({exc}); is one of {[str(p) for p in paths.values()]} truncated or corrupted?") from exc

    for key in keys:
        role = key.replace("_", " ")
        check_affine(np.asarray(data[key].affine), role, paths[key])
        checker = check_label_volume if key.endswith("labels") else check_volume
        arr = checker(np.asarray(data[key]), role, paths[key])
        tensor = torch.as_tensor(arr.astype(np.float32))
        data[key] = type(data[key])(tensor, affine=data[key].affine, meta=data[key].meta)
    data = EnsureChannelFirstd(keys=keys, channel_dim="no_channel")(data)

    notes: list[str] = []
    if "fixed_labels" in data and not _same_grid(data["fixed_labels"], data["fixed"]):
        raise InputError(f"fixed label map '{paths['fixed_labels']}' is not on the fixed image's grid (shape {tuple(data['fixed_labels'].shape[1:])} vs {tuple(data['fixed'].shape[1:])}, or different affine); pass the segmentation of that image.")
    if "moving_labels" in data and not _same_grid(data["moving_labels"], data["moving"]):
        raise InputError(f"moving label map '{paths['moving_labels']}' is not on the moving image's grid (shape {tuple(data['moving_labels'].shape[1:])} vs {tuple(data['moving'].shape[1:])}, or different affine); pass the segmentation of that image.")
    if not _same_grid(data["moving"], data["fixed"]):
        msg = (f"moving image '{paths['moving']}' (shape {tuple(data['moving'].shape[1:])}) is on a different grid than the fixed image "
               f"(shape {tuple(data['fixed'].shape[1:])}); resampled it onto the fixed grid through the affines.")
        log.warning(msg)
        notes.append(msg)
        data = ResampleToMatchd(keys=["moving"], key_dst="fixed", mode="bilinear", padding_mode="zeros")(data)
        if "moving_labels" in data:
            data = ResampleToMatchd(keys=["moving_labels"], key_dst="fixed", mode="nearest", padding_mode="zeros")(data)
    data = CopyItemsd(keys=["moving"], names=["moving_raw"])(data)
    data = ScaleIntensityRangePercentilesd(
        keys=["fixed", "moving"], lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True
    )(data)

    def plain(key: str, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(np.asarray(data[key])).to(dtype)[None]

    fixed_affine = np.asarray(data["fixed"].affine, dtype=np.float64)
    pair = ImagePair(
        fixed=plain("fixed", torch.float32),
        moving=plain("moving", torch.float32),
        moving_raw=plain("moving_raw", torch.float32),
        fixed_affine=fixed_affine,
        notes=notes,
        fixed_path=str(paths["fixed"]),
        moving_path=str(paths["moving"]),
    )
    for name in ("fixed", "moving"):
        if float(getattr(pair, name).max()) <= 0:
            raise InputError(f"{name} image '{paths[name]}' has no intensity above its {lo}th percentile after scaling; widen the percentiles (data.percentiles).")
    if "fixed_labels" in data:
        pair.fixed_labels = plain("fixed_labels", torch.int32)
        pair.moving_labels = plain("moving_labels", torch.int32)
        present_f = set(torch.unique(pair.fixed_labels).tolist()) - {0}
        present_m = set(torch.unique(pair.moving_labels).tolist()) - {0}
        common = sorted(present_f & present_m)
        if not common:
            raise InputError(f"the label maps share no label (fixed has {sorted(present_f)[:10]}..., moving has {sorted(present_m)[:10]}...); are they from the same atlas?")
        wanted = parse_labels(labels)
        if wanted is None:
            pair.labels = common
        else:
            absent = [lab for lab in wanted if lab not in present_f and lab not in present_m]
            if len(absent) == len(wanted):
                raise InputError(f"none of the requested labels {wanted} occurs in either label map (they hold {common[:20]}); check --labels.")
            if absent:
                msg = f"labels {absent} occur in neither label map; their Dice is reported as NaN and left out of the mean."
                log.warning(msg)
                notes.append(msg)
            pair.labels = list(wanted)
    elif labels is not None:
        raise InputError("--labels was given without --fixed-labels/--moving-labels; give the label maps too.")
    return pair
