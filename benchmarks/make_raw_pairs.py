#!/usr/bin/env python
"""Pairs CSVs of mindboggle-dev subjects: raw (native space) and aligned by its prepare.py.

Development benchmark (the 6 aligned pairs of subjects 9-20; ``--resolution 1mm`` for 1 mm):

    python ../shared/data/mindboggle-dev/prepare.py CACHE/mb --subjects 9,10,11,12,13,14,15,16,17,18,19,20   # once (ANTs, ~1 min each)
    python benchmarks/make_raw_pairs.py CACHE --aligned-only [--resolution 1mm]
    python benchmarks/run_benchmark.py --pairs CACHE/dev_2mm.csv --methods nir,ants,fireants-greedy --threads 2 --no-hd95

Raw scans against whole chains (writes raw_RES.csv and aligned_RES.csv):

    python benchmarks/make_raw_pairs.py CACHE [--subjects 9,10,11,12,13,14,15,16] [--resolution 2mm]
    python benchmarks/run_benchmark.py --pairs CACHE/raw_2mm.csv --methods nir,ants-chain,fireants-chain
    python benchmarks/run_benchmark.py --pairs CACHE/aligned_2mm.csv --methods nir --nir-args=--data.affine.kind=none

Consecutive subjects form disjoint pairs (9->10, 11->12, ...: fixed, moving). ``raw_RES.csv``
lists the scans as they are in ``OASIS-TRT-20-N/`` (each head at its own position and size, raw
int16 intensities); at ``2mm`` they are first block-averaged 2x2x2 in their own native grid
(labels: the most frequent label of each block), which keeps each scan's position, orientation
and intensities but costs a 2-core machine an eighth of the time. ``aligned_RES.csv`` lists the
same pairs from ``prepare.py``'s output in ``CACHE/mb/RES`` (affinely aligned onto one grid).
``--aligned-only`` writes only ``dev_RES.csv`` (the aligned pairs, same content): no raw files,
and the CSVs of earlier raw runs stay as they are. Dice is averaged over the labels both subjects
share. The mindboggle licence forbids redistributing modified copies: keep CACHE outside the
repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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


def raw_files(subjects: list[int], resolution: str, raw_dir: Path) -> dict[int, tuple[Path, Path]]:
    """Subject -> (T1, labels) in native space: the shared files at 1 mm, block-averaged copies at 2 mm."""
    files: dict[int, tuple[Path, Path]] = {}
    for n in subjects:
        name = f"OASIS-TRT-20-{n}"
        t1, lab = SHARED / name / "t1weighted_brain.nii.gz", SHARED / name / "labels.DKT31_CMA.manual.nii.gz"
        if resolution == "1mm":
            files[n] = (t1, lab)
            continue
        raw_dir.mkdir(parents=True, exist_ok=True)
        out_t1, out_lab = raw_dir / f"{name}_t1.nii.gz", raw_dir / f"{name}_labels.nii.gz"
        if not out_lab.exists():
            img: Any = nib.load(str(t1))  # Nifti1Images
            seg: Any = nib.load(str(lab))
            aff = img.affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
            nib.save(nib.Nifti1Image(block2(np.asarray(img.dataobj, dtype=np.float32), False), aff), str(out_t1))
            nib.save(
                nib.Nifti1Image(block2(np.asarray(seg.dataobj).astype(np.int32), True).astype(np.int16), aff),
                str(out_lab),
            )
        files[n] = (out_t1, out_lab)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--subjects", default=",".join(str(n) for n in range(9, 21)), help="consecutive ones are paired")
    ap.add_argument("--resolution", choices=("1mm", "2mm"), default="2mm")
    ap.add_argument(
        "--aligned-only", action="store_true", help="only dev_RES.csv, the prepare.py-aligned pairs (no raw files)"
    )
    a = ap.parse_args()
    cache = Path(a.cache).resolve()
    subjects = [int(s) for s in a.subjects.split(",")]
    pairs = list(zip(subjects[::2], subjects[1::2]))
    prep = cache / "mb" / a.resolution
    missing = [
        str(f)
        for n in subjects
        for f in (prep / f"OASIS-TRT-20-{n}_t1.nii.gz", prep / f"OASIS-TRT-20-{n}_labels.nii.gz")
        if not f.is_file()
    ]
    if missing:
        print(f"warning: {len(missing)} aligned file(s) missing (run prepare.py first), e.g. {missing[0]}")
    header = "name,fixed,moving,fixed_labels,moving_labels"
    aligned = [header] + [
        f"s{f}-s{m},{prep}/OASIS-TRT-20-{f}_t1.nii.gz,{prep}/OASIS-TRT-20-{m}_t1.nii.gz,"
        f"{prep}/OASIS-TRT-20-{f}_labels.nii.gz,{prep}/OASIS-TRT-20-{m}_labels.nii.gz"
        for f, m in pairs
    ]
    if a.aligned_only:
        (cache / f"dev_{a.resolution}.csv").write_text("\n".join(aligned) + "\n")
        print(f"wrote {cache}/dev_{a.resolution}.csv ({len(pairs)} pairs)")
        return
    files = raw_files(subjects, a.resolution, cache / f"raw_{a.resolution}")
    raw = [header] + [f"s{f}-s{m},{files[f][0]},{files[m][0]},{files[f][1]},{files[m][1]}" for f, m in pairs]
    (cache / f"raw_{a.resolution}.csv").write_text("\n".join(raw) + "\n")
    (cache / f"aligned_{a.resolution}.csv").write_text("\n".join(aligned) + "\n")
    print(f"wrote {cache}/raw_{a.resolution}.csv and aligned_{a.resolution}.csv ({len(pairs)} pairs)")


if __name__ == "__main__":
    main()
