"""Whether a volume's values look like a label map or an intensity image, to catch the wrong interpolation.

A label map is uniform inside its regions: along each axis, few pairs of neighbouring labelled
voxels hold different values (4-18 % in the FreeSurfer aseg and Mindboggle label maps of
``../shared`` at 1 and 2 mm; 27-36 % subsampled to 6 mm, 39 % when cut into 5800 parcels of 3-voxel
cubes). An intensity image varies almost everywhere (91-97 % in their T1
images, stored as 8-bit integers). :func:`interpolation_warning` uses that gap to warn when
``nir apply --interpolation label`` gets an image (every grey value becomes a "label"), or
``--interpolation linear`` gets a label map (neighbouring labels blend into values that are other
labels or none: between 2 and 41, 17, which is another structure), as antsApplyTransforms users
learn the hard way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LABEL_CHANGE_MAX", "image_like_label_map", "interpolation_warning", "neighbour_change_fraction"]

LABEL_CHANGE_MAX = 0.5
"""A volume whose neighbouring non-zero voxels differ in more than this share of pairs is an image."""


def neighbour_change_fraction(data: np.ndarray) -> float:
    """Share of the pairs of face-neighbouring non-zero voxels (along every axis) whose values
    differ; NaN when there is no such pair (an empty or one-voxel foreground).

    >>> labels = np.zeros((4, 4, 4), np.int16); labels[:2] = 3; labels[2:] = 5
    >>> round(neighbour_change_fraction(labels), 3)  # one change across 16 of the 144 pairs
    0.111
    >>> neighbour_change_fraction(np.arange(64.0).reshape(4, 4, 4) + 1)
    1.0
    """
    nonzero = data != 0
    changed = pairs = 0
    for axis in range(data.ndim):
        head = tuple(slice(0, -1) if a == axis else slice(None) for a in range(data.ndim))
        tail = tuple(slice(1, None) if a == axis else slice(None) for a in range(data.ndim))
        both = nonzero[head] & nonzero[tail]
        pairs += int(np.count_nonzero(both))
        changed += int(np.count_nonzero(both & (data[head] != data[tail])))
    return changed / pairs if pairs else float("nan")


def _integer_valued(data: np.ndarray) -> bool:
    """Whole numbers only; an integer type is, without a rounded copy of the volume."""
    return bool(np.issubdtype(data.dtype, np.integer) or np.all(data == np.round(data)))


def _looks_like_an_image(what: str, change: float) -> str:
    return (
        f"{what} looks like an intensity image, not a label map: {100 * change:.0f}% of the pairs of neighbouring "
        f"non-zero voxels differ in value (under {100 * LABEL_CHANGE_MAX:.0f}% in a label map, whose regions are uniform)"
    )


def image_like_label_map(data: np.ndarray, what: str) -> str | None:
    """The warning for a label map (named ``what``) whose values vary between most neighbours: an
    image passed where a segmentation belongs (Dice would be computed over its grey values);
    ``None`` for a label map.

    >>> image_like_label_map(np.arange(64).reshape(4, 4, 4) + 1, "the fixed label map 'T1.nii.gz'")[:66]
    "the fixed label map 'T1.nii.gz' looks like an intensity image, not"
    >>> image_like_label_map(np.ones((4, 4, 4), np.int16), "x") is None
    True
    """
    change = neighbour_change_fraction(data)
    if not change > LABEL_CHANGE_MAX:
        return None
    values = np.unique(data).size
    return (
        f"{_looks_like_an_image(what, change)}: Dice and HD95 would be computed over its {values} values. "
        "Pass the segmentation of this image (e.g. FreeSurfer's aseg) instead."
    )


def interpolation_warning(data: np.ndarray, mode: str, what: str) -> str | None:
    """The warning for resampling ``data`` (named ``what``, e.g. ``"--input 'x.nii.gz'"``) with
    interpolation ``mode``, or ``None`` when the mode suits the values.

    ``"label"`` on values that vary between most neighbours (an image), and ``"linear"`` on
    integer values with at least two labels besides 0 that are uniform in their regions (a label
    map; a binary mask, interpolated linearly to partial volumes, is left alone). ``"nearest"``
    suits both.

    >>> labels = np.zeros((4, 4, 4), np.int16); labels[:2] = 3; labels[2:] = 5
    >>> interpolation_warning(labels, "label", "--input 'a.nii.gz'") is None
    True
    >>> print(interpolation_warning(labels, "linear", "--input 'a.nii.gz'"))  # doctest: +ELLIPSIS
    --input 'a.nii.gz' looks like a label map (2 integer values, ...; use --interpolation label (or nearest) for label maps.
    """
    if mode not in ("label", "linear") or data.size == 0:
        return None
    change = neighbour_change_fraction(data)
    if not np.isfinite(change):
        return None
    if mode == "label" and change > LABEL_CHANGE_MAX:
        values = np.unique(data).size
        return (
            f"{_looks_like_an_image(what, change)}, so --interpolation label treats each of its {values} values as a label. "
            "Use --interpolation linear for images."
        )
    if mode == "linear" and change <= LABEL_CHANGE_MAX and _integer_valued(data):
        values = np.unique(data).size
        if values - int(bool(np.any(data == 0))) >= 2:
            return (
                f"{what} looks like a label map ({values} integer values, uniform in their regions: "
                f"{100 * change:.0f}% of the pairs of neighbouring non-zero voxels differ), and linear interpolation blends "
                "neighbouring labels into values that are other labels or none; "
                "use --interpolation label (or nearest) for label maps."
            )
    return None
