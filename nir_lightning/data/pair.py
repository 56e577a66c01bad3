"""Loading one fixed/moving pair (and optional label maps) onto the fixed grid with MONAI."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nir_lightning.coords import (
    apply_matrix,
    identity_grid,
    inside_grid,
    normalized_chain_matrix,
    voxel_spacing,
    voxel_to_normalized,
)
from nir_lightning.core.resample import sample_image
from nir_lightning.data.checks import (
    DEFAULT_PERCENTILES,
    check_affine,
    check_image_file,
    check_label_volume,
    check_mask_volume,
    check_volume,
    parse_labels,
    read_image_data,
)
from nir_lightning.data.foreground import foreground
from nir_lightning.data.grids import box_maps_inside, grid_differences, refuse_without_overlap, same_grid
from nir_lightning.data.label_checks import check_label_maps
from nir_lightning.errors import InputError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]



@dataclass
class NativeMoving:
    """The moving image on its own grid, kept when an affine stage will align it.

    Tensors are ``(1, 1, I0, I1, I2)`` on the moving grid; ``affine`` is its 4x4 voxel-to-world
    matrix. :meth:`ImagePair.align` resamples these onto the fixed grid through a world matrix.
    """

    image: Tensor  # scaled to [0, 1] (percentiles of the moving image itself)
    raw: Tensor
    affine: np.ndarray
    labels: Tensor | None = None  # int32
    mask: Tensor | None = None  # bool

    @property
    def shape(self) -> tuple[int, int, int]:
        d0, d1, d2 = self.image.shape[2:]
        return (int(d0), int(d1), int(d2))


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
    fixed_mask: Tensor | None = None  # user mask (D0, D1, D2) bool: the similarity counts only inside
    moving_mask: Tensor | None = None  # user moving mask on the fixed grid (after alignment), bool
    native: NativeMoving | None = None  # the moving image on its own grid (affine stage)
    fixed_labels_path: str | None = None
    moving_labels_path: str | None = None
    world: np.ndarray = field(default_factory=lambda: np.eye(4))  # fixed world -> moving world (coords.py)

    def check_labels(self) -> None:
        """Warn (and add to ``notes``) when a label map looks swapped or foreign
        (:func:`~nir_lightning.data.label_checks.check_label_maps`); they load fine and would
        only show as a falling Dice. Needs the pair aligned (on the fixed grid)."""
        if self.fixed_labels is None or self.moving_labels is None:
            return
        self.notes.extend(check_label_maps(
            self.fixed, self.moving, self.fixed_labels, self.moving_labels,
            fixed_labels_path=self.fixed_labels_path, moving_labels_path=self.moving_labels_path,
            fixed_path=self.fixed_path, moving_path=self.moving_path,
        ))

    def align(self, world: np.ndarray) -> None:
        """Resample the native moving image (and labels, mask) onto the fixed grid through the
        world matrix ``world`` (one interpolation: trilinear; labels and mask nearest), and keep
        ``world`` as the affine part of the transform (see :mod:`nir_lightning.coords`)."""
        if self.native is None:
            raise ValueError("align() needs the moving image on its own grid (load_pair(..., keep_native=True))")
        nat = self.native
        self.world = np.asarray(world, dtype=np.float64)
        if self._moving_on_fixed_grid():
            pts = None  # one grid, no transform: the voxels as they are
        else:
            chain = normalized_chain_matrix(self.shape, self.fixed_affine, nat.shape, nat.affine, self.world)
            pts = apply_matrix(identity_grid(self.shape, dtype=torch.float64), chain).float()[None]

        def resample(img: Tensor, mode: Any) -> Tensor:
            return img if pts is None else sample_image(img, pts, mode=mode)

        if pts is None:
            self.moving, self.moving_raw = nat.image, nat.raw
        else:  # both intensity copies in one pass (grid_sample's channels share the weights: the same values)
            both = sample_image(torch.cat([nat.image, nat.raw], dim=1), pts, mode="bilinear")
            self.moving, self.moving_raw = both[:, :1].contiguous(), both[:, 1:].contiguous()
        if nat.labels is not None:
            self.moving_labels = resample(nat.labels.float(), "nearest").round().to(torch.int32)
        if nat.mask is not None:
            self.moving_mask = resample(nat.mask.float()[None, None], "nearest")[0, 0] > 0.5

    def native_on_fixed_grid(self) -> bool:
        """The native moving image (and its labels) lies on the fixed grid: same shape and affine."""
        nat = self.native
        return nat is not None and nat.shape == self.shape and np.allclose(nat.affine, self.fixed_affine, atol=1e-6)

    def _moving_on_fixed_grid(self) -> bool:
        """The native moving image is on the fixed grid and there is no affine part: its voxels are the aligned ones."""
        return self.native_on_fixed_grid() and np.array_equal(self.world, np.eye(4))

    def moving_coverage(self, foreground: Tensor | None = None) -> float:
        """The fraction of the fixed foreground (``foreground``, by default :meth:`foreground_mask`)
        whose point, through the affine part, lies inside the moving image's grid (1.0 when the
        moving image is sampled on the fixed grid). Below 1: the moving scan covers only part of
        the fixed anatomy."""
        _, chain = self.moving_sampling()
        if chain is None:
            return 1.0
        fg = self.foreground_mask() if foreground is None else foreground.cpu()
        if box_maps_inside(fg, self.shape, chain):
            return 1.0  # every voxel's point too: the map is affine, the moving grid convex
        vox = torch.nonzero(fg).to(torch.float64)
        if vox.numel() == 0:
            return 1.0
        pts = voxel_to_normalized(vox, self.shape)
        at = apply_matrix(pts, torch.as_tensor(chain, dtype=torch.float64))
        return float(inside_grid(at).double().mean())  # the fit's own test (registration_objective)

    def partial_moving_scan(self, foreground: Tensor | None = None) -> bool:
        """Whether the moving scan covers only part of the fixed foreground (:meth:`moving_coverage`
        below 1); if so, a warning and a note (once) say that the fit compares only inside it."""
        coverage = self.moving_coverage(foreground)
        if coverage < 1.0:
            note = (f"the moving image covers {100 * coverage:.1f}% of the fixed foreground after the affine stage; "
                    "the similarity counts only the points that land inside its field of view.")
            if note not in self.notes:
                log.warning(note)
                self.notes.append(note)
        return coverage < 1.0

    def moving_sampling(self) -> tuple[Tensor, np.ndarray | None]:
        """The moving image a fit samples, and the matrix to sample it through.

        ``(moving, None)`` when the moving image lies on the fixed grid as loaded (same grid, no
        affine part); else the native moving image (scaled intensities, its own grid) and the
        4x4 chain matrix ``N_m V_m^-1 W V_f N_f^-1`` (:func:`~nir_lightning.coords.normalized_chain_matrix`):
        ``moving(M phi(x))`` interpolates the native voxels once, as the outputs do, instead of
        the copy that :meth:`align` resampled (a second trilinear pass blurs fine detail).
        """
        nat = self.native
        if nat is None or self._moving_on_fixed_grid():
            return self.moving, None
        return nat.image, normalized_chain_matrix(self.shape, self.fixed_affine, nat.shape, nat.affine, self.world)

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

    def stage_inputs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`~nir_lightning.alignment.AffineStage.fit` for this pair
        (loaded with ``keep_native``): the fixed image, the moving image on its own grid, their
        affines and masks; the points come from the user's fixed mask, else from the foreground
        rule (not just > 0, which on a raw scan's noisy background would take most of them)."""
        nat = self.native
        if nat is None:
            raise ValueError("stage_inputs needs the pair loaded with keep_native=True")
        return {
            "fixed": self.fixed, "fixed_affine": self.fixed_affine, "moving": nat.image, "moving_affine": nat.affine,
            "fixed_mask": self.fixed_mask, "moving_mask": nat.mask,
            "foreground": self.foreground_mask() if self.fixed_mask is None else None,
        }


def _file_role(key: str) -> str:
    """``"moving_labels"`` -> ``"moving label"`` (messages read "moving label image '...'")."""
    return key.replace("_labels", " label")


def _data_role(key: str) -> str:
    """``"moving_labels"`` -> ``"moving"``, ``"fixed_mask"`` -> ``"fixed"`` (the checks say
    "moving label map '...'", "fixed mask '...'")."""
    return key.removesuffix("_labels").removesuffix("_mask")


def _checker(key: str) -> Any:
    if key.endswith("labels"):
        return check_label_volume
    if key.endswith("mask"):
        return check_mask_volume
    return check_volume


def _few(values: Iterable[int], n: int = 12) -> str:
    vals = sorted(values)
    return "[" + ", ".join(str(v) for v in vals[:n]) + (", ...]" if len(vals) > n else "]")


def present_labels(labels: Tensor) -> set[int]:
    """The values that occur in an integer label map (any shape).

    Counted by one ``bincount`` when they are small non-negative integers (a third of
    ``torch.unique``'s time, which sorts: 0.6 s for a 1 mm brain's labels), else by ``torch.unique``.

    >>> sorted(present_labels(torch.tensor([[0, 3], [3, 17]], dtype=torch.int32)))
    [0, 3, 17]
    """
    flat = labels.detach().cpu().reshape(-1)
    if flat.numel() and not flat.is_floating_point() and int(flat.min()) >= 0 and int(flat.max()) < 2**20:
        return {int(v) for v in np.flatnonzero(np.bincount(flat.numpy().astype(np.intp, copy=False)))}
    return {int(v) for v in torch.unique(flat).tolist()}


def load_pair(
    fixed: PathLike,
    moving: PathLike,
    *,
    fixed_labels: PathLike | None = None,
    moving_labels: PathLike | None = None,
    labels: str | list[int] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    fixed_mask: PathLike | None = None,
    moving_mask: PathLike | None = None,
    keep_native: bool = False,
    stage_aligns: bool = True,
) -> ImagePair:
    """Load, check and bring a pair onto the fixed grid.

    Bad input raises :class:`~nir_lightning.errors.InputError` naming the file and the fix.
    A moving image on another grid (shape, spacing or orientation) is resampled onto the
    fixed grid by its affine (labels with nearest neighbour), and the pair's ``notes`` say so.

    With ``keep_native`` (an affine stage will align the pair), the moving image, its labels
    and mask are also kept on their own grid (:class:`NativeMoving`, intensities scaled by the
    moving image's own percentiles) and resampled once through the headers
    (:meth:`ImagePair.align` with the identity); :meth:`ImagePair.check_labels` is then left to
    the caller, after alignment. Masks (binary NIfTI on their image's grid) restrict the
    similarity; they are checked like every other input.

    ``stage_aligns`` (with ``keep_native``): an affine stage follows, starting from the centres of
    mass, so the headers may place the moving image outside the fixed field of view (raw scans);
    ``False`` (``--affine none``): the headers are the alignment, and such a pair is refused as
    without ``keep_native``.
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
    if fixed_mask is not None:
        paths["fixed_mask"] = check_image_file(fixed_mask, "fixed mask")
    if moving_mask is not None:
        paths["moving_mask"] = check_image_file(moving_mask, "moving mask")
    from monai.transforms import (  # MONAI (seconds to import) only here, where its transforms run
        CopyItemsd,
        EnsureChannelFirstd,
        LoadImaged,
        ResampleToMatchd,
        ScaleIntensityRangePercentilesd,
    )

    keys = list(paths)
    loader = LoadImaged(keys=keys, image_only=True, dtype=None)
    try:
        data: Any = loader({k: str(v) for k, v in paths.items()})
    except Exception as exc:
        for key, path in paths.items():  # name the file at fault: one of these raises for it
            _checker(key)(read_image_data(path, _file_role(key)), _data_role(key), path)
        raise InputError(f"could not read image data ({exc}); is one of {[str(p) for p in paths.values()]} truncated or corrupted? Copy it again.") from exc

    for key in keys:
        check_affine(np.asarray(data[key].affine), _file_role(key), paths[key])
        arr = _checker(key)(np.asarray(data[key]), _data_role(key), paths[key])
        tensor = torch.as_tensor(arr.astype(np.float32))
        data[key] = type(data[key])(tensor, affine=data[key].affine, meta=data[key].meta)
    data = EnsureChannelFirstd(keys=keys, channel_dim="no_channel")(data)

    notes: list[str] = []
    for side in ("fixed", "moving"):
        for kind, what, fix in (("labels", "label map", "segmentation"), ("mask", "mask", "mask")):
            key = f"{side}_{kind}"
            if key in data and not same_grid(data[key], data[side]):
                raise InputError(
                    f"{side} {what} '{paths[key]}' is not on the {side} image's grid ('{paths[side]}': "
                    f"{'; '.join(grid_differences(data[key], data[side])) or 'different affine'}); "
                    f"pass the {fix} of that image, or resample it onto the image's grid with nearest-neighbour interpolation first."
                )
    native_keys = [k for k in ("moving", "moving_labels", "moving_mask") if k in data]
    native: dict[str, Any] = {}
    on_fixed_grid = same_grid(data["moving"], data["fixed"])
    if keep_native:  # the affine stage aligns the pair: nothing is resampled here
        native = {k: data[k] for k in native_keys}
        native["moving_raw"] = data["moving"]
        if not on_fixed_grid:
            if not stage_aligns:
                refuse_without_overlap(data, paths)
            msg = (f"moving image '{paths['moving']}' is on a different grid than the fixed image "
                   f"({'; '.join(grid_differences(data['moving'], data['fixed']))}); resampled it onto the fixed grid through "
                   "the affines (and the affine stage's transform, if it runs), once, from its own grid (trilinear; labels nearest "
                   "neighbour; the outputs label-interpolated).")
            log.warning(msg)
            notes.append(msg)
    elif not on_fixed_grid:
        coverage = refuse_without_overlap(data, paths)
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
    if keep_native:
        native["moving_raw"], native["moving"] = data["moving_raw"], data["moving"]

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
    if "fixed_mask" in data:
        pair.fixed_mask = plain("fixed_mask", torch.bool)[0, 0]
    if keep_native:
        pair.native = NativeMoving(
            image=plain("moving", torch.float32),
            raw=plain("moving_raw", torch.float32),
            affine=np.asarray(data["moving"].affine, dtype=np.float64),
            labels=plain("moving_labels", torch.int32) if "moving_labels" in data else None,
            mask=plain("moving_mask", torch.bool)[0, 0] if "moving_mask" in data else None,
        )
        pair.align(np.eye(4))
    elif "moving_mask" in data:
        pair.moving_mask = plain("moving_mask", torch.bool)[0, 0]
    for name in ("fixed", "moving"):
        # before an affine stage, the moving image on its own grid: the headers alone may place it
        # outside the fixed field of view (raw scans), which the stage's centre-of-mass start undoes
        scaled = pair.native.image if name == "moving" and pair.native is not None else getattr(pair, name)
        if float(scaled.max()) <= 0:
            raise InputError(f"{name} image '{paths[name]}' has no intensity above its {lo}th percentile after scaling; widen the percentiles (data.percentiles).")
    if "fixed_labels" in data:
        pair.fixed_labels = plain("fixed_labels", torch.int32)
        if not keep_native:
            pair.moving_labels = plain("moving_labels", torch.int32)
        assert pair.moving_labels is not None
        pair.fixed_labels_path, pair.moving_labels_path = str(paths["fixed_labels"]), str(paths["moving_labels"])
        present_f = present_labels(pair.fixed_labels) - {0}
        source = pair.native.labels if pair.native is not None and pair.native.labels is not None else pair.moving_labels
        present_m = present_labels(source) - {0}
        common = sorted(present_f & present_m)
        if not common:
            where = " on the fixed grid" if notes and not keep_native else ""
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
        if not keep_native:  # an affine stage checks them once the pair is aligned
            pair.check_labels()
    elif labels is not None:
        raise InputError("--labels was given without --fixed-labels/--moving-labels; give the label maps too.")
    return pair
