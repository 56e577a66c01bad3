#!/usr/bin/env python
"""Pairs CSVs of mindboggle-dev subjects: raw (native space) and aligned by its prepare.py.

    python ../shared/data/mindboggle-dev/prepare.py CACHE/mb --subjects 9,...,16   # once (ANTs, ~1 min each)
    python benchmarks/make_raw_pairs.py CACHE --subjects 9,10,11,12,13,14,15,16 [--resolution 2mm]
    python benchmarks/run_benchmark.py --pairs CACHE/raw_2mm.csv --methods nir,ants-chain,fireants-chain
    python benchmarks/run_benchmark.py --pairs CACHE/aligned_2mm.csv --methods nir --nir-args=--data.affine.kind=none

Consecutive subjects form disjoint pairs (9->10, 11->12, ...: fixed, moving). ``raw_RES.csv``
lists the scans as they are in ``OASIS-TRT-20-N/`` (each head at its own position and size, raw
int16 intensities); at ``2mm`` they are first block-averaged 2x2x2 in their own native grid
(labels: the most frequent label of each block), which keeps each scan's position, orientation
and intensities but costs a 2-core machine an eighth of the time. ``aligned_RES.csv`` lists the
same pairs from ``prepare.py``'s output (affinely aligned onto one grid). Dice is averaged over
the labels both subjects share. The mindboggle licence forbids redistributing modified copies:
keep CACHE outside the repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mindboggle-dev"


def block2(vol: np.ndarray, labels: bool) -> np.ndarray:
    s = np.array(vol.shape) // 2
    v = vol[: 2 * s[0], : 2 * s[1], : 2 * s[2]].reshape(s[0], 2, s[1], 2, s[2], 2)
    if not labels:
        return v.mean(axis=(1, 3, 5)).astype(np.float32)
    blocks = v.transpose(0, 2, 4, 1, 3, 5).reshape(-1, 8)
    best = np.zeros(len(blocks), dtype=np.int32)
    count = np.zeros(len(blocks), dtype=np.int32)
    for lab in np.unique(blocks):
        c = (blocks == lab).sum(1)
        take = c > count
        best[take], count[take] = lab, c[take]
    return best.reshape(tuple(s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--subjects", default="9,10,11,12,13,14,15,16")
    ap.add_argument("--resolution", choices=("1mm", "2mm"), default="2mm")
    a = ap.parse_args()
    cache = Path(a.cache).resolve()
    subjects = [int(s) for s in a.subjects.split(",")]
    raw_dir = cache / f"raw_{a.resolution}"
    raw_dir.mkdir(parents=True, exist_ok=True)
    files: dict[int, tuple[Path, Path]] = {}
    for n in subjects:
        name = f"OASIS-TRT-20-{n}"
        t1, lab = SHARED / name / "t1weighted_brain.nii.gz", SHARED / name / "labels.DKT31_CMA.manual.nii.gz"
        if a.resolution == "1mm":
            files[n] = (t1, lab)
            continue
        out_t1, out_lab = raw_dir / f"{name}_t1.nii.gz", raw_dir / f"{name}_labels.nii.gz"
        if not out_lab.exists():
            img, seg = nib.load(str(t1)), nib.load(str(lab))
            aff = img.affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
            nib.save(nib.Nifti1Image(block2(np.asarray(img.dataobj, dtype=np.float32), False), aff), str(out_t1))
            nib.save(nib.Nifti1Image(block2(np.asarray(seg.dataobj).astype(np.int32), True).astype(np.int16), aff), str(out_lab))
        files[n] = (out_t1, out_lab)
    header = "name,fixed,moving,fixed_labels,moving_labels"
    raw_rows, aligned_rows = [header], [header]
    for f, m in zip(subjects[::2], subjects[1::2]):
        name = f"s{f}-s{m}"
        raw_rows.append(f"{name},{files[f][0]},{files[m][0]},{files[f][1]},{files[m][1]}")
        prep = cache / "mb" / a.resolution
        aligned_rows.append(
            f"{name},{prep}/OASIS-TRT-20-{f}_t1.nii.gz,{prep}/OASIS-TRT-20-{m}_t1.nii.gz,"
            f"{prep}/OASIS-TRT-20-{f}_labels.nii.gz,{prep}/OASIS-TRT-20-{m}_labels.nii.gz"
        )
    (cache / f"raw_{a.resolution}.csv").write_text("\n".join(raw_rows) + "\n")
    (cache / f"aligned_{a.resolution}.csv").write_text("\n".join(aligned_rows) + "\n")
    print(f"wrote {cache}/raw_{a.resolution}.csv and aligned_{a.resolution}.csv ({len(raw_rows) - 1} pairs)")


if __name__ == "__main__":
    main()
