"""Loading one fixed/moving pair (and optional label maps) onto the fixed grid with MONAI."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CopyItemsd,
    EnsureChannelFirstd,
    LoadImaged,
    ResampleToMatchd,
    ScaleIntensityRangePercentilesd,
)
from torch import Tensor

from nir_lightning.coords import voxel_spacing
from nir_lightning.data.checks import (
    check_affine,
    check_image_file,
    check_label_volume,
    check_volume,
    parse_labels,
    read_image_data,
)
from nir_lightning.data.foreground import foreground
from nir_lightning.data.label_checks import check_label_maps
from nir_lightning.errors import InputError

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

    def foreground_mask(self) -> Tensor:
        """Fixed-image foreground ``(D0, D1, D2)`` on the CPU (:func:`foreground`)."""
        return foreground(self.fixed[0, 0].cpu())


def _file_role(key: str) -> str:
    """``"moving_labels"`` -> ``"moving label"`` (messages read "moving label image '...'")."""
    return key.replace("_labels", " label")


def _data_role(key: str) -> str:
    """``"moving_labels"`` -> ``"moving"`` (the label checks say "moving label map '...'")."""
    return key.removesuffix("_labels")


def _same_grid(a: MetaTensor, b: MetaTensor) -> bool:
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and np.allclose(
        np.asarray(a.affine), np.asarray(b.affine), atol=1e-4
    )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _few(values: Iterable[int], n: int = 12) -> str:
    vals = sorted(values)
    return "[" + ", ".join(str(v) for v in vals[:n]) + (", ...]" if len(vals) > n else "]")


def grid_differences(a: MetaTensor, b: MetaTensor) -> list[str]:
    """How the grids of two MetaTensors ``(C, D0, D1, D2)`` differ, in words (``a`` first)."""
    aff_a, aff_b = np.asarray(a.affine, dtype=np.float64), np.asarray(b.affine, dtype=np.float64)
    out: list[str] = []
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        out.append(f"shape {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    sp_a, sp_b = voxel_spacing(aff_a), voxel_spacing(aff_b)
    if not np.allclose(sp_a, sp_b, atol=1e-4):
        out.append(f"spacing {_fmt(sp_a)} vs {_fmt(sp_b)} mm")
    ax_a, ax_b = "".join(nib.aff2axcodes(aff_a)), "".join(nib.aff2axcodes(aff_b))
    if ax_a != ax_b:
        out.append(f"orientation {ax_a} vs {ax_b}")
    elif not np.allclose(aff_a[:3, :3], aff_b[:3, :3], atol=1e-4):
        out.append("axes rotated")
    centre_a = aff_a[:3, :3] @ ((np.asarray(a.shape[1:]) - 1) / 2) + aff_a[:3, 3]
    centre_b = aff_b[:3, :3] @ ((np.asarray(b.shape[1:]) - 1) / 2) + aff_b[:3, 3]
    shift = float(np.linalg.norm(centre_a - centre_b))
    if shift > 1e-3:
        out.append(f"centres {shift:.1f} mm apart")
    return out


def _coverage(moving: MetaTensor, fixed: MetaTensor, step: int = 4) -> float:
    """Fraction of (a stride-``step`` subset of) the fixed grid inside the moving field of view."""
    axes = [np.arange(0, n, step, dtype=np.float64) for n in fixed.shape[1:]]
    vox = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    to_moving = np.linalg.inv(np.asarray(moving.affine, dtype=np.float64)) @ np.asarray(fixed.affine, dtype=np.float64)
    mv = vox @ to_moving[:3, :3].T + to_moving[:3, 3]
    inside = np.all((mv >= -0.5) & (mv <= np.asarray(moving.shape[1:]) - 0.5), axis=1)
    return float(inside.mean())


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
        raise InputError(f"data.percentiles must satisfy 0 <= low < high <= 100, got {percentiles}; the default is [0.5, 99.5].")
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
        data: Any = loader({k: str(v) for k, v in paths.items()})
    except Exception as exc:
        for key, path in paths.items():  # name the file at fault: one of these raises for it
            checker = check_label_volume if key.endswith("labels") else check_volume
            checker(read_image_data(path, _file_role(key)), _data_role(key), path)
        raise InputError(f"could not read image data ({exc}); is one of {[str(p) for p in paths.values()]} truncated or corrupted? Copy it again.") from exc

    for key in keys:
        check_affine(np.asarray(data[key].affine), _file_role(key), paths[key])
        checker = check_label_volume if key.endswith("labels") else check_volume
        arr = checker(np.asarray(data[key]), _data_role(key), paths[key])
        tensor = torch.as_tensor(arr.astype(np.float32))
        data[key] = type(data[key])(tensor, affine=data[key].affine, meta=data[key].meta)
    data = EnsureChannelFirstd(keys=keys, channel_dim="no_channel")(data)

    notes: list[str] = []
    for side in ("fixed", "moving"):
        key = f"{side}_labels"
        if key in data and not _same_grid(data[key], data[side]):
            raise InputError(
                f"{side} label map '{paths[key]}' is not on the {side} image's grid ('{paths[side]}': "
                f"{'; '.join(grid_differences(data[key], data[side])) or 'different affine'}); "
                f"pass the segmentation of that image, or resample it onto the image's grid with nearest-neighbour interpolation first."
            )
    if not _same_grid(data["moving"], data["fixed"]):
        coverage = _coverage(data["moving"], data["fixed"])
        if coverage == 0.0:
            raise InputError(
                f"moving image '{paths['moving']}' does not overlap the fixed image '{paths['fixed']}' in world space "
                f"(their affines place them apart: {'; '.join(grid_differences(data['moving'], data['fixed']))}). "
                "Check the NIfTI headers (qform/sform) or align the images first, e.g. with a rigid registration."
            )
        msg = (f"moving image '{paths['moving']}' is on a different grid than the fixed image "
               f"({'; '.join(grid_differences(data['moving'], data['fixed']))}); resampled it onto the fixed grid through "
               "the affines (trilinear; labels nearest neighbour). Resample it yourself beforehand to choose the interpolation.")
        if coverage < 0.5:
            msg += f" Only {100 * coverage:.0f}% of the fixed grid lies inside the moving image's field of view."
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
            where = " on the fixed grid" if notes else ""
            raise InputError(
                f"the fixed label map '{paths['fixed_labels']}' and the moving label map '{paths['moving_labels']}' share no label{where} "
                f"(fixed has {_few(present_f)}, moving has {_few(present_m)}); pass label maps of the same atlas or protocol (e.g. both FreeSurfer aseg)."
            )
        wanted = parse_labels(labels)
        if wanted is None:
            pair.labels = common
        else:
            absent = [lab for lab in wanted if lab not in present_f and lab not in present_m]
            if len(absent) == len(wanted):
                raise InputError(
                    f"--labels {labels if isinstance(labels, str) else wanted}: none of the requested labels {_few(wanted)} occurs in "
                    f"'{paths['fixed_labels']}' or '{paths['moving_labels']}' (they share {_few(common)}); "
                    "fix --labels, or leave it out to average over all shared labels."
                )
            if absent:
                msg = f"labels {absent} occur in neither label map; their Dice is reported as NaN and left out of the mean."
                log.warning(msg)
                notes.append(msg)
            pair.labels = list(wanted)
        # Swapped or foreign label maps load fine and only show as a falling Dice: say so now.
        notes.extend(check_label_maps(
            pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels,
            fixed_labels_path=str(paths["fixed_labels"]), moving_labels_path=str(paths["moving_labels"]),
            fixed_path=str(paths["fixed"]), moving_path=str(paths["moving"]),
        ))
    elif labels is not None:
        raise InputError("--labels was given without --fixed-labels/--moving-labels; give the label maps too.")
    return pair
