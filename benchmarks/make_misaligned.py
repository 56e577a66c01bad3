#!/usr/bin/env python
"""Misaligned and T2-like versions of the shared 2 mm brain pair, and a pairs CSV for run_benchmark.py.

    python benchmarks/make_misaligned.py OUT [--seed 0] [--data-dir ../shared/data/brain-pair]
    python benchmarks/run_benchmark.py --pairs OUT/pairs.csv --methods nir,ants-chain,fireants-chain

The moving image (subjB) is moved by a random similarity-plus-scaling transform ``T`` about
the brain centre: rotation of ``--angle`` degrees (default 18, at least 15) about a random
oblique axis, translation of ``--shift`` mm (default 22, at least 20) in a random direction,
per-axis scales drawn from [0.9, 1.1]. ``T`` acts on world points (RAS mm), so a moving voxel's
world position becomes ``T (A v)``; the registration has to find ``W = T`` (fixed world ->
moving world) on top of the pair's own alignment. Written (OUT/):

* ``aligned/``: the pair as it is (the reference Dice);
* ``header/``: the same voxels, header ``T A`` (a moved scanner frame);
* ``resampled/``: the moved head resampled onto another grid (1.7 x 2.3 x 2.0 mm, RAS, other field
  of view; trilinear, labels nearest neighbour);
* ``t2like/``: ``resampled/`` with the moving intensities remapped non-monotonically (dark white
  matter, bright CSF-like extremes: no linear relation to the T1), for ``similarity: mi``;
* ``pairs.csv`` (``multimodal=yes`` on the T2-like row) and ``transform.json`` (``T`` and its draw).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

HERE = Path(__file__).resolve().parent


def draw_transform(rng: np.random.Generator, centre: np.ndarray, angle: float, shift: float) -> tuple[np.ndarray, dict]:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    if np.max(np.abs(axis)) > 0.9:  # keep it oblique: no axis within ~25 degrees of a coordinate axis
        axis = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    rot = Rotation.from_rotvec(np.deg2rad(angle) * axis).as_matrix()
    scales = rng.uniform(0.9, 1.1, size=3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    lin = rot @ np.diag(scales)
    t = np.eye(4)
    t[:3, :3] = lin
    t[:3, 3] = centre - lin @ centre + shift * direction
    return t, {"axis": axis.tolist(), "angle_deg": angle, "scales": scales.tolist(), "translation_mm": (shift * direction).tolist(),
               "centre_mm": centre.tolist()}


def resample_to(data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """``data`` (on ``affine``) at the world points of the grid ``(target_affine, shape)``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
    world = idx @ target_affine[:3, :3].T + target_affine[:3, 3]
    inv = np.linalg.inv(affine)
    src = world @ inv[:3, :3].T + inv[:3, 3]
    out = map_coordinates(data.astype(np.float32), src.T, order=order, mode="constant", cval=0.0)
    return out.reshape(shape)


def t2_like(t1: np.ndarray) -> np.ndarray:
    """A non-monotonic remap of T1 intensities: background stays 0, white matter goes dark,
    grey matter mid, the darkest tissue (CSF) bright."""
    fg = t1 > 0.02 * t1.max()
    s = np.clip(t1 / np.percentile(t1[fg], 99), 0, 1.2)
    out = np.where(fg, 1.05 - 0.8 * s + 0.25 * np.sin(3 * np.pi * s), 0.0)
    return (np.clip(out, 0, None) * 200).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "brain-pair"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--angle", type=float, default=18.0)
    ap.add_argument("--shift", type=float, default=22.0)
    a = ap.parse_args()
    src = Path(a.data_dir) / "2mm"
    out = Path(a.out)
    names = {"fixed": "subjA_t1", "moving": "subjB_t1", "fixed_labels": "subjA_aseg", "moving_labels": "subjB_aseg"}
    imgs = {k: nib.load(str(src / f"{v}.nii.gz")) for k, v in names.items()}
    mv = np.asarray(imgs["moving"].dataobj, dtype=np.float32)
    aff = imgs["moving"].affine
    vox = np.argwhere(mv > 0.1 * mv.max()).mean(0)
    centre = aff[:3, :3] @ vox + aff[:3, 3]
    rng = np.random.default_rng(a.seed)
    t, info = draw_transform(rng, centre, a.angle, a.shift)
    # another grid: RAS, other spacing and field of view, covering the moved head
    spacing = np.array([1.7, 2.3, 2.0])
    shape = (104, 84, 100)
    new_aff = np.diag([*spacing, 1.0])
    new_aff[:3, 3] = (t @ np.append(centre, 1.0))[:3] - spacing * (np.array(shape) - 1) / 2 + rng.uniform(-6, 6, 3)
    rows = ["name,fixed,moving,fixed_labels,moving_labels,labels,multimodal"]
    labels = str(Path(a.data_dir) / "labels30.tsv")
    for case in ("aligned", "header", "resampled", "t2like"):
        d = out / case
        d.mkdir(parents=True, exist_ok=True)
        for k in ("fixed", "fixed_labels"):
            nib.save(imgs[k], str(d / f"{names[k]}.nii.gz"))
        lab = np.asarray(imgs["moving_labels"].dataobj).astype(np.int16)
        if case == "aligned":
            m_img, m_lab, m_aff = mv, lab, aff
        elif case == "header":
            m_img, m_lab, m_aff = mv, lab, t @ aff
        else:
            m_img = resample_to(mv, t @ aff, new_aff, shape, order=1)
            m_lab = resample_to(lab, t @ aff, new_aff, shape, order=0).round().astype(np.int16)
            m_aff = new_aff
            if case == "t2like":
                m_img = t2_like(m_img)
        nib.save(nib.Nifti1Image(m_img.astype(np.float32), m_aff), str(d / "moving.nii.gz"))
        nib.save(nib.Nifti1Image(m_lab, m_aff), str(d / "moving_labels.nii.gz"))
        rows.append(f"{case},{case}/subjA_t1.nii.gz,{case}/moving.nii.gz,{case}/subjA_aseg.nii.gz,{case}/moving_labels.nii.gz,{labels},"
                    f"{'yes' if case == 't2like' else ''}")
    (out / "pairs.csv").write_text("\n".join(rows) + "\n")
    (out / "transform.json").write_text(json.dumps({"T_world": t.tolist(), **info, "seed": a.seed}, indent=2) + "\n")
    print(f"wrote {out}/pairs.csv; T: {a.angle} deg about {np.round(info['axis'], 3).tolist()}, "
          f"shift {np.round(info['translation_mm'], 1).tolist()} mm, scales {np.round(info['scales'], 3).tolist()}")


if __name__ == "__main__":
    main()
