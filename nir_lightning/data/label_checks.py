"""Does each label map belong to its image? Warnings for swapped, foreign or misplaced label maps.

A label map given with the wrong image loads without error and only shows in a falling Dice.
These checks compare each map with its own image and with the other image of the pair, on the
fixed grid as :func:`~nir_lightning.data.pair.load_pair` holds them (intensities scaled to
[0, 1], int32 labels):

* ``outside_fraction``: labelled voxels in the image's background (:func:`~nir_lightning.data.pair.foreground`).
* ``coverage``: labelled voxels per foreground voxel; a segmentation protocol covers a similar
  share of either brain.
* ``homogeneity``: ``1 - (pooled within-label intensity variance) / (foreground variance)``,
  1 when intensity is constant inside every label. A true segmentation is homogeneous on its
  own image and less so on another subject's, so each map's *advantage* (its homogeneity on
  its image minus the other map's there) is positive for a correct pair, negative for both maps
  of a swapped pair, and near zero for a map of a third subject.

Pure numpy/torch. Thresholds and the figures they were chosen from are below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nir_lightning.data.foreground import foreground
from nir_lightning.data.label_like import image_like_label_map

log = logging.getLogger(__name__)

# Calibrated on the 2 mm brain pair (aseg), 5 native and 4 affinely aligned Mindboggle pairs
# (DKT31+CMA), 3 cross-protocol/cross-grid pairs and the phantom (3 shapes x 3 seeds):
# correct pairs: outside <= 0.024, advantages >= +0.148, advantage ratio >= 0.51, coverage ratio <= 1.26;
# swapped pairs: both advantages <= -0.148; third subject's map: its advantage <= 0.22 x the other's.
OUTSIDE_MAX = 0.10
"""Warn when more of a map's labelled voxels than this lie in its image's background."""
COVERAGE_FACTOR = 2.0
"""Warn when one map covers its image's foreground this many times more than the other does."""
SWAP_MARGIN = 0.05
"""Swapped: both maps fit the *other* image better by more than this homogeneity."""
FOREIGN_RATIO = 0.3
"""Foreign: a map's advantage is below this fraction of the other map's advantage ..."""
FOREIGN_MIN_ADVANTAGE = 0.1
"""... and the other map's advantage is at least this (the subjects differ enough to tell)."""


@dataclass(frozen=True)
class LabelFit:
    """How one label map fits one image (see the module docstring)."""

    outside_fraction: float
    coverage: float
    homogeneity: float


@dataclass(frozen=True)
class PairLabelReport:
    """Each map on its own image, each map's homogeneity on the other image, and whether they are equal."""

    fixed: LabelFit
    moving: LabelFit
    fixed_on_moving: float
    moving_on_fixed: float
    identical: bool

    @property
    def fixed_advantage(self) -> float:
        """How much better the fixed map fits the fixed image than the moving map does."""
        return self.fixed.homogeneity - self.moving_on_fixed

    @property
    def moving_advantage(self) -> float:
        """How much better the moving map fits the moving image than the fixed map does."""
        return self.moving.homogeneity - self.fixed_on_moving


Volume = Tensor | np.ndarray


def _volume(x: Volume) -> np.ndarray:
    """A 3D numpy array (a view where possible) from ``(D0, D1, D2)`` or ``(1, 1, D0, D1, D2)`` data."""
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a 3D volume (optionally with leading singleton axes), got shape {a.shape}")
    return a


def _label_sums(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, sum and sum of squares of ``x`` (float64) per label value."""
    if labels.size and int(labels.min()) >= 0 and int(labels.max()) < 2**16:
        idx = labels  # typical label numbers: bincount directly, no sort
    else:
        idx = np.unique(labels, return_inverse=True)[1].reshape(-1)
    return np.bincount(idx), np.bincount(idx, weights=x), np.bincount(idx, weights=x * x)


@dataclass(frozen=True)
class _Scan:
    """An image with its foreground and the foreground's intensity variance, computed once."""

    image: np.ndarray
    fg: np.ndarray
    variance: float

    @classmethod
    def of(cls, image: np.ndarray) -> _Scan:
        fg = foreground(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))).numpy()
        values = image[fg].astype(np.float64)
        return cls(image, fg, float(values.var()) if values.size else 0.0)


def _same_shape(scan: _Scan, labels: np.ndarray) -> None:
    if scan.image.shape != labels.shape:
        raise ValueError(f"image and label map differ in shape: {scan.image.shape} vs {labels.shape}")


def _homogeneity(scan: _Scan, labels: np.ndarray) -> float:
    _same_shape(scan, labels)  # label 0 is not a structure; the background carries no label
    inside = np.flatnonzero(scan.fg & (labels != 0))
    if scan.variance <= 0 or inside.size == 0:
        return float("nan")
    x = scan.image.reshape(-1)[inside].astype(np.float64)
    n, s, ss = _label_sums(x, labels.reshape(-1)[inside])
    within = float((ss - s * s / np.maximum(n, 1)).sum()) / x.size
    return 1.0 - within / scan.variance


def _label_fit(scan: _Scan, labels: np.ndarray) -> LabelFit:
    _same_shape(scan, labels)
    labelled = labels != 0
    n_lab, n_fg = int(np.count_nonzero(labelled)), int(np.count_nonzero(scan.fg))
    return LabelFit(
        outside_fraction=int(np.count_nonzero(labelled & ~scan.fg)) / n_lab if n_lab else float("nan"),
        coverage=n_lab / n_fg if n_fg else float("nan"),
        homogeneity=_homogeneity(scan, labels),
    )


def _crop(*volumes: np.ndarray) -> tuple[np.ndarray, ...]:
    """The volumes cut to the box around all their non-zero voxels (a brain fills a fraction of its grid)."""
    if len({v.shape for v in volumes}) != 1:
        raise ValueError(f"volumes differ in shape: {[v.shape for v in volumes]}")
    occupied = volumes[0] != 0
    for v in volumes[1:]:
        occupied |= v != 0
    plane = occupied.any(axis=2)  # project once, then per axis on the small plane
    rows, cols, depth = plane.any(axis=1), plane.any(axis=0), occupied.any(axis=(0, 1))
    box = []
    for hits in (np.flatnonzero(rows), np.flatnonzero(cols), np.flatnonzero(depth)):
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0))
    return tuple(np.ascontiguousarray(v[tuple(box)]) for v in volumes)


def homogeneity(image: Volume, labels: Volume) -> float:
    """``1 - pooled within-label variance / variance of the foreground`` (NaN if undefined).

    Over the image's foreground voxels that carry a label (label 0 is not a structure), so
    unlabelled tissue and partial-volume voxels at the brain's edge do not count.

    >>> img = torch.tensor([[[0.2, 0.2, 0.8, 0.8]]])
    >>> homogeneity(img, torch.tensor([[[1, 1, 2, 2]]])), homogeneity(img, torch.tensor([[[1, 2, 1, 2]]]))
    (1.0, 0.0)
    """
    img, lab = _volume(image), _volume(labels)
    return _homogeneity(_Scan.of(img), lab)


def label_fit(image: Volume, labels: Volume) -> LabelFit:
    """Outside fraction, coverage and homogeneity of ``labels`` on ``image`` (same grid).

    >>> img = torch.tensor([[[0.0, 0.5, 0.5, 0.9]]])
    >>> label_fit(img, torch.tensor([[[1, 1, 1, 2]]]))
    LabelFit(outside_fraction=0.25, coverage=1.3333333333333333, homogeneity=1.0)
    """
    img, lab = _volume(image), _volume(labels)
    return _label_fit(_Scan.of(img), lab)


def pair_label_report(fixed: Volume, moving: Volume, fixed_labels: Volume, moving_labels: Volume) -> PairLabelReport:
    """Everything :func:`label_warnings` judges, for a pair on one grid."""
    # Background and unlabelled voxels change none of the figures: crop them away first.
    fi, mi, lf, lm = _crop(*(_volume(v) for v in (fixed, moving, fixed_labels, moving_labels)))
    f, m = _Scan.of(fi), _Scan.of(mi)
    return PairLabelReport(
        fixed=_label_fit(f, lf),
        moving=_label_fit(m, lm),
        fixed_on_moving=_homogeneity(m, lf),
        moving_on_fixed=_homogeneity(f, lm),
        identical=bool(np.array_equal(lf, lm)) and not bool(np.array_equal(fi, mi)),
    )


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _named(what: str, path: str | None) -> str:
    """``"the fixed label map 'x.nii.gz'"``, or without the quote when no path is known."""
    return f"the {what} '{path}'" if path else f"the {what}"


def label_warnings(
    report: PairLabelReport,
    *,
    fixed_labels_path: str | None = None,
    moving_labels_path: str | None = None,
    fixed_path: str | None = None,
    moving_path: str | None = None,
) -> list[str]:
    """Warnings (naming the files, the figures and the likely fix) for a :class:`PairLabelReport`.

    >>> ok = LabelFit(outside_fraction=0.0, coverage=0.6, homogeneity=0.8)
    >>> label_warnings(PairLabelReport(ok, ok, fixed_on_moving=0.4, moving_on_fixed=0.4, identical=False))
    []
    >>> swapped = PairLabelReport(ok, ok, fixed_on_moving=0.95, moving_on_fixed=0.95, identical=False)
    >>> "swapped?" in label_warnings(swapped)[0]
    True
    """
    maps = {"fixed": _named("fixed label map", fixed_labels_path), "moving": _named("moving label map", moving_labels_path)}
    images = {"fixed": _named("fixed image", fixed_path), "moving": _named("moving image", moving_path)}
    fa, ma = report.fixed_advantage, report.moving_advantage
    if report.identical:
        msg = (
            f"{maps['fixed']} and {maps['moving']} are identical, though the images differ: Dice before registration "
            "is 1 and measures nothing. Pass each image's own segmentation."
        )
        return [msg]
    if fa < -SWAP_MARGIN and ma < -SWAP_MARGIN:
        msg = (
            f"the label maps look swapped: {maps['fixed']} fits the moving image better than the fixed image "
            f"(label homogeneity {report.fixed_on_moving:.3f} vs {report.fixed.homogeneity:.3f}; "
            f"{_pct(report.fixed.outside_fraction)} of its labelled voxels in the fixed image's background), and "
            f"{maps['moving']} fits the fixed image better than the moving image ({report.moving_on_fixed:.3f} vs "
            f"{report.moving.homogeneity:.3f}; {_pct(report.moving.outside_fraction)} outside). "
            "Were --fixed-labels and --moving-labels swapped? Dice falls during registration if so."
        )
        return [msg]
    out: list[str] = []
    for side, other, fit, adv, other_adv in (
        ("fixed", "moving", report.fixed, fa, ma),
        ("moving", "fixed", report.moving, ma, fa),
    ):
        problems: list[str] = []
        if fit.outside_fraction > OUTSIDE_MAX:
            problems.append(
                f"{_pct(fit.outside_fraction)} of its labelled voxels lie in the image's background "
                f"(intensity <= 1% of its range; expected under {_pct(OUTSIDE_MAX)})"
            )
        if other_adv >= FOREIGN_MIN_ADVANTAGE and adv < FOREIGN_RATIO * other_adv:
            problems.append(
                f"it fits the {side} image hardly better than the {other} label map does (label homogeneity "
                f"{fit.homogeneity:.3f}, advantage {adv:+.3f}; the {other} map's advantage on its image is {other_adv:+.3f})"
            )
        if problems:
            out.append(
                f"{maps[side]} does not fit {images[side]}: {'; '.join(problems)}. Is it the segmentation of this "
                f"{side} image (not of another subject or of the {other} image), on the same grid? "
                "Dice computed with it is not meaningful."
            )
    cf, cm = report.fixed.coverage, report.moving.coverage
    if min(cf, cm) > 0 and max(cf, cm) / min(cf, cm) > COVERAGE_FACTOR:
        out.append(
            f"the label maps cover very different shares of their images' foreground: {maps['fixed']} {_pct(cf)}, "
            f"{maps['moving']} {_pct(cm)} (more than {COVERAGE_FACTOR:g}x apart). Are both segmentations of the "
            "same protocol (e.g. both FreeSurfer aseg) and of the right image?"
        )
    return out


def check_label_maps(
    fixed: Volume,
    moving: Volume,
    fixed_labels: Volume,
    moving_labels: Volume,
    *,
    fixed_labels_path: str | None = None,
    moving_labels_path: str | None = None,
    fixed_path: str | None = None,
    moving_path: str | None = None,
) -> list[str]:
    """:func:`pair_label_report` and :func:`label_warnings` in one: logs each warning and returns them.

    >>> img = torch.tensor([[[0.0, 0.3, 0.3, 0.9, 0.9]]])
    >>> check_label_maps(img, img, torch.tensor([[[0, 1, 1, 2, 2]]]), torch.tensor([[[0, 1, 1, 2, 2]]]))
    []
    """
    # an image given as a label map first: the checks below would only restate it less plainly
    images = [
        msg for labels, what in ((fixed_labels, _named("fixed label map", fixed_labels_path)), (moving_labels, _named("moving label map", moving_labels_path)))
        if (msg := image_like_label_map(_volume(labels), what))
    ]
    if images:
        for msg in images:
            log.warning(msg)
        return images
    report = pair_label_report(fixed, moving, fixed_labels, moving_labels)
    log.debug("label checks: %s", report)
    messages = label_warnings(
        report, fixed_labels_path=fixed_labels_path, moving_labels_path=moving_labels_path,
        fixed_path=fixed_path, moving_path=moving_path,
    )
    for msg in messages:
        log.warning(msg)
    return messages
