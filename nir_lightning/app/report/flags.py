"""Flags: why a pair of a cohort deserves a look, in words, worst first.

Two kinds of evidence, both from what ``metrics.json`` holds:

* the run's own warnings (``notes``: label maps that look swapped, identical or foreign to their
  image, a moving image resampled or with another field of view, a Dice that fell), and
  ``failed`` rows with their message;
* the pair against its cohort: a robust z-score (median and MAD of the cohort's own values, so
  the bad pairs do not hide themselves by widening the spread) on Dice after, Dice after the
  affine stage, SDlogJ and the affine's scale and shear. The MAD has a floor per metric so that a
  very tight cohort does not flag differences nobody would care about.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nir_lightning.app.report.cohort import Cohort, PairResult

Z_OUTLIER = 3.5
"""|robust z| beyond which a value is an outlier (Iglewicz and Hoaglin's 3.5 on the modified z-score)."""
MIN_COHORT = 5
"""Fewer completed pairs than this: no cohort statistics, only the pairs' own warnings."""
DICE_FELL_TOLERANCE = 0.02
"""As ``nir_lightning.training.label_watch.DICE_TOLERANCE`` (not imported: it loads Lightning)."""
# Smallest spread assumed per metric (in its unit): below it, a difference is not worth a flag.
SCALE_FLOOR: dict[str, float] = {"dice_after": 0.02, "dice_affine": 0.03, "sdlogj": 0.02, "affine_log_scale": 0.03, "affine_shear": 0.03}

# Severity orders the flags; a row's severity is its worst flag's.
SEVERITY: dict[str, int] = {
    "failed": 100, "swapped": 90, "identical": 88, "foreign": 86, "dice_fell": 80, "dice_outlier": 70,
    "fov": 60, "coverage": 55, "affine_outlier": 50, "dice_affine_outlier": 48, "sdlogj": 45, "folds": 30,
    "version": 20, "resampled": 15, "labels_absent": 12, "note": 10,
}

# notes text (see nir_lightning.data.label_checks and data.pair) -> flag kind; first match wins.
_NOTE_KINDS: tuple[tuple[str, str], ...] = (
    ("look swapped", "swapped"),
    ("are identical, though the images differ", "identical"),
    ("does not fit", "foreign"),
    ("cover very different shares", "coverage"),
    ("Dice fell during registration", "dice_fell"),
    ("of the fixed grid lies inside the moving image's field of view", "fov"),
    ("on a different grid", "resampled"),
    ("occur in neither label map", "labels_absent"),
)
_NOTE_LABEL = {
    "swapped": "label maps look swapped",
    "identical": "fixed and moving label maps are identical",
    "foreign": "a label map does not fit its image (another subject's?)",
    "coverage": "label maps cover very different shares of the brain",
    "dice_fell": "Dice fell during registration",
    "fov": "moving image covers only part of the fixed field of view",
    "resampled": "moving image resampled onto the fixed grid",
    "labels_absent": "some requested labels are absent",
    "note": "note",
}


@dataclass(frozen=True)
class Flag:
    """One reason to look at a pair: ``kind`` (a key of :data:`SEVERITY`) and ``text`` in words."""

    kind: str
    text: str

    @property
    def severity(self) -> int:
        return SEVERITY.get(self.kind, 10)


def robust_z(values: Sequence[float | None], *, floor: float = 0.0) -> list[float | None]:
    """Modified z-scores ``(x - median) / (1.4826 MAD)``, the MAD at least ``floor / 1.4826``.

    ``None`` stays ``None``. With a single outlier the others keep scores near 0:

    >>> [round(z, 1) for z in robust_z([0.80, 0.81, 0.79, 0.80, 0.30])]
    [0.0, 0.7, -0.7, 0.0, -33.7]
    >>> [round(z, 3) for z in robust_z([0.8, 0.8, 0.8, 0.7], floor=0.02)]
    [0.0, 0.0, 0.0, -5.0]
    """
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return [None for _ in values]
    med = statistics.median(xs)
    scale = max(1.4826 * statistics.median(abs(v - med) for v in xs), floor, 1e-12)
    return [None if v is None or not math.isfinite(v) else (v - med) / scale for v in values]


def affine_shape(world: object) -> tuple[float, float] | None:
    """``(log scale, shear)`` of a 4x4 affine: the mean log singular value (0 for no scaling) and
    ``log(largest / smallest singular value)`` (0 for rotations and uniform scalings).

    >>> [round(v, 3) for v in affine_shape([[2, 0, 0, 5], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])]
    [0.693, 0.0]
    >>> affine_shape("nonsense") is None
    True
    """
    try:
        a = np.asarray(world, dtype=np.float64)[:3, :3]
        s = np.linalg.svd(a, compute_uv=False)
    except (ValueError, TypeError, IndexError, np.linalg.LinAlgError):
        return None
    if a.shape != (3, 3) or not np.all(np.isfinite(s)) or s.min() <= 0:
        return None
    return float(np.log(s).mean()), float(np.log(s.max() / s.min()))


def note_flags(notes: object) -> list[Flag]:
    """Flags from ``metrics.json``'s ``notes`` (the run's own warnings), one per note.

    >>> [f.kind for f in note_flags(["the label maps look swapped: ...", "something else"])]
    ['swapped', 'note']
    """
    out: list[Flag] = []
    if not isinstance(notes, list):
        return out
    for note in notes:
        text = " ".join(str(note).split())
        pattern, kind = next(((pat, k) for pat, k in _NOTE_KINDS if pat in text), ("", "note"))
        plain = kind == "note" or pattern in text[:40]  # the note says what it is up front already
        out.append(Flag(kind, text if plain else f"{_NOTE_LABEL[kind]}: {text}"))
    return out


def _pct(v: float) -> str:
    return f"{v:.3g}%"


def cohort_flags(cohort: Cohort) -> dict[str, list[Flag]]:
    """Flags of every pair (id -> flags, worst first; pairs without flags map to ``[]``)."""
    done = cohort.completed
    flags: dict[str, list[Flag]] = {p.id: [] for p in cohort.pairs}
    for p in cohort.pairs:
        if p.status == "failed":
            flags[p.id].append(Flag("failed", f"failed: {p.error}"))
    for p in done:
        flags[p.id].extend(note_flags(p.metrics.get("notes")))
        before, after = p.number("dice_before"), p.number("dice_after")
        has_fell = any(f.kind == "dice_fell" for f in flags[p.id])
        if before is not None and after is not None and after < before - DICE_FELL_TOLERANCE and not has_fell:
            flags[p.id].append(Flag("dice_fell", f"Dice fell during registration: {before:.3f} before, {after:.3f} after"))
        count, percent = p.metrics.get("folding_count"), p.number("folding_percent")
        if percent is not None and percent > 0:
            n = f"{int(count)} voxels, " if isinstance(count, (int, float)) else ""
            flags[p.id].append(Flag("folds", f"folds: {n}{_pct(percent)} of the foreground has det J <= 0"))
    versions = cohort.versions()
    if len(versions) > 1:
        common = versions.most_common(1)[0][0]
        for p in done:
            if (p.version or "unknown") != common:
                flags[p.id].append(Flag("version", f"written by version {p.version or 'unknown'}, most of the cohort by {common}: rerun it to compare like with like"))
    if len(done) >= MIN_COHORT:
        _outliers(done, flags)
    for items in flags.values():
        items.sort(key=lambda f: -f.severity)
    return flags


def _outliers(done: list[PairResult], flags: dict[str, list[Flag]]) -> None:
    """Cohort-relative flags (robust z-scores, see the module docstring)."""
    def column(key: str) -> list[float | None]:
        return [p.number(key) for p in done]

    for key, kind, what in (("dice_after", "dice_outlier", "Dice after"), ("dice_affine", "dice_affine_outlier", "Dice after the affine stage")):
        values = column(key)
        med = statistics.median([v for v in values if v is not None] or [math.nan])
        for p, v, z in zip(done, values, robust_z(values, floor=SCALE_FLOOR[key])):
            if v is not None and z is not None and z < -Z_OUTLIER:
                flags[p.id].append(Flag(kind, f"{what} {v:.3f} is an outlier for this cohort (median {med:.3f}, robust z {z:.1f})"))
    sd = column("sdlogj")
    med_sd = statistics.median([v for v in sd if v is not None] or [math.nan])
    for p, v, z in zip(done, sd, robust_z(sd, floor=SCALE_FLOOR["sdlogj"])):
        if v is not None and z is not None and z > Z_OUTLIER:
            flags[p.id].append(Flag("sdlogj", f"high SDlogJ {v:.3f} (cohort median {med_sd:.3f}, robust z {z:.1f}): an irregular deformation"))
    shapes = [affine_shape((p.metrics.get("affine") or {}).get("world")) for p in done]
    for idx, name in ((0, "affine_log_scale"), (1, "affine_shear")):
        vals = [s[idx] if s else None for s in shapes]
        med = statistics.median([v for v in vals if v is not None] or [math.nan])
        for p, v, z in zip(done, vals, robust_z(vals, floor=SCALE_FLOOR[name])):
            if v is None or z is None or abs(z) <= Z_OUTLIER:
                continue
            if idx == 0:
                text = f"affine scale {math.exp(v):.3f} is far from the cohort's (median {math.exp(med):.3f}, robust z {z:+.1f}): another field of view or a wrong optimum?"
            else:
                text = f"affine shear/anisotropy {math.exp(v):.3f} is far from the cohort's (median {math.exp(med):.3f}, robust z {z:+.1f}): a wrong optimum?"
            flags[p.id].append(Flag("affine_outlier", text))


def severity(flags: Sequence[Flag]) -> int:
    """A row's severity: its worst flag's (0 without flags).

    >>> severity([Flag("folds", "x"), Flag("failed", "y")]), severity([])
    (100, 0)
    """
    return max((f.severity for f in flags), default=0)


def worst_first(cohort: Cohort, flags: dict[str, list[Flag]]) -> list[PairResult]:
    """Pairs ordered worst first: by severity, then number of flags, then Dice after (lowest first); pending last."""
    def key(p: PairResult) -> tuple[int, int, int, float]:
        dice = p.number("dice_after")
        return (p.status == "pending", -severity(flags[p.id]), -len(flags[p.id]), dice if dice is not None else math.inf)

    return sorted(cohort.pairs, key=key)
