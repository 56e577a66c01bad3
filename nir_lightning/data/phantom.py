"""A synthetic brain-like pair with a known diffeomorphism (the data-free demo).

The phantom is analytic (ellipsoids in normalized coordinates), so the moving image is
rendered exactly at ``psi^-1(y)`` instead of interpolated, and the true transform
``phi_true = psi = exp(v)`` is known for the end-point error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nir_lightning.coords import identity_grid, normalized_to_voxel_scale
from nir_lightning.io import save_nifti

# (label, centre (x0, x1, x2), radii, intensity); painted in order, later ones on top.
# FreeSurfer label numbers so the demo reads like real data.
_STRUCTURES: list[tuple[int, tuple[float, float, float], tuple[float, float, float], float]] = [
    (3, (0.0, 0.0, 0.0), (0.85, 0.80, 0.88), 0.55),  # left cortex (split by hemisphere below)
    (2, (0.0, 0.05, 0.0), (0.70, 0.62, 0.74), 0.85),  # left white matter
    (8, (0.0, -0.62, -0.55), (0.55, 0.22, 0.28), 0.60),  # left cerebellum cortex
    (16, (0.0, -0.45, -0.10), (0.12, 0.35, 0.14), 0.75),  # brain stem
    (4, (0.16, 0.22, 0.05), (0.07, 0.14, 0.38), 0.15),  # left lateral ventricle
    (10, (0.18, 0.0, -0.05), (0.12, 0.10, 0.15), 0.70),  # left thalamus
    (11, (0.17, 0.25, 0.30), (0.06, 0.10, 0.12), 0.62),  # left caudate
    (12, (0.38, 0.05, 0.15), (0.08, 0.13, 0.17), 0.66),  # left putamen
    (17, (0.40, -0.20, -0.15), (0.07, 0.07, 0.20), 0.58),  # left hippocampus
    (14, (0.0, 0.02, -0.02), (0.03, 0.12, 0.15), 0.15),  # third ventricle
]
_RIGHT = {2: 41, 3: 42, 4: 43, 8: 47, 10: 49, 11: 50, 12: 51, 17: 53}


@dataclass
class Phantom:
    fixed: np.ndarray  # (D0, D1, D2) float32
    moving: np.ndarray
    fixed_labels: np.ndarray  # int32
    moving_labels: np.ndarray
    affine: np.ndarray
    true_disp_vox: np.ndarray  # (D0, D1, D2, 3): phi_true(x) - x in voxels


def _render(points: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and clean intensities of the analytic phantom at normalized ``points`` (..., 3)."""
    labels = torch.zeros(points.shape[:-1], dtype=torch.int32)
    inten = torch.zeros(points.shape[:-1])
    for lab, centre, radii, value in _STRUCTURES:
        for side in (1.0, -1.0):
            c = torch.tensor(centre) * torch.tensor([side, 1.0, 1.0])
            r = torch.tensor(radii)
            inside = (((points - c) / r) ** 2).sum(-1) <= 1.0
            if lab in _RIGHT:
                # hemisphere split on axis 0: left structures at x0 >= 0
                inside &= points[..., 0] >= 0 if side > 0 else points[..., 0] < 0
                name = lab if side > 0 else _RIGHT[lab]
            else:
                name = lab
            labels[inside] = name
            inten[inside] = value
            if lab not in _RIGHT:
                break
    return labels, inten


def _smooth_noise(shape: tuple[int, ...], sigma: float, gen: torch.Generator, channels: int) -> Tensor:
    noise = torch.randn(1, channels, *shape, generator=gen)
    radius = min(int(3 * sigma), min(shape) - 1)  # circular padding cannot wrap twice
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = noise
    for axis in range(3):
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        weight = k.reshape(view).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="circular"), weight, groups=channels)
    return out


def make_phantom(
    shape: tuple[int, int, int] = (64, 72, 60),
    *,
    spacing: float = 2.0,
    magnitude: float = 3.0,
    smoothness: float = 8.0,
    noise: float = 0.02,
    seed: int = 0,
) -> Phantom:
    """Render a fixed phantom and a moving one deformed by ``psi = exp(v)``.

    ``v`` is smooth Gaussian noise (``smoothness`` voxels) scaled to an RMS velocity of
    ``magnitude`` voxels; ``psi`` is diffeomorphic by construction (scaling and squaring).
    The affine is LSA (not RAS, so axis/sign mistakes show up), consistent with the anatomy of
    the structure table, so the QC figure shows the phantom upright.

    >>> p = make_phantom((24, 26, 22), seed=1)
    >>> p.fixed.shape, len(np.unique(p.fixed_labels)) - 1 >= 10
    ((24, 26, 22), True)
    """
    gen = torch.Generator().manual_seed(seed)
    v = _smooth_noise(shape, smoothness, gen, 3)
    v = v / v.pow(2).sum(1).mean().sqrt() * magnitude  # RMS |v| in voxels; array-axis order
    from monai.networks.blocks import DVF2DDF  # MONAI only when the phantom is made

    to_ddf = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")
    fwd = to_ddf(v)[0].permute(1, 2, 3, 0)  # psi(x) - x, voxels
    inv = to_ddf(-v)[0].permute(1, 2, 3, 0)
    scale = normalized_to_voxel_scale(shape)
    ident = identity_grid(shape)
    f_lab, f_int = _render(ident)
    m_lab, m_int = _render(ident + inv / scale)

    def corrupt(img: Tensor) -> Tensor:
        bias = 1.0 + 0.1 * torch.tanh(_smooth_noise(shape, 12.0, gen, 1)[0, 0] * 20)
        return (img * bias + noise * torch.randn(shape, generator=gen)).clamp(min=0)

    # LSA: axis 0 runs to the left, axis 1 up, axis 2 forward, as the structure table is laid
    # out (cerebellum at -x1, -x2: inferior and posterior); not RAS, so axis/sign mistakes show up.
    affine = np.array(
        [[-spacing, 0, 0, spacing * shape[0] / 2],
         [0, 0, spacing, -spacing * shape[2] / 2],
         [0, spacing, 0, -spacing * shape[1] / 2],
         [0, 0, 0, 1.0]]
    )
    return Phantom(
        fixed=corrupt(f_int).numpy().astype(np.float32),
        moving=corrupt(m_int).numpy().astype(np.float32),
        fixed_labels=f_lab.numpy(),
        moving_labels=m_lab.numpy(),
        affine=affine,
        true_disp_vox=fwd.numpy().astype(np.float32),
    )


def write_demo_pair(folder: str | Path, **kwargs: object) -> dict[str, Path]:
    """Write the phantom pair as NIfTI files into ``folder``; returns their paths."""
    p = make_phantom(**kwargs)  # type: ignore[arg-type]
    folder = Path(folder)
    files = {
        "fixed": folder / "fixed.nii.gz",
        "moving": folder / "moving.nii.gz",
        "fixed_labels": folder / "fixed_labels.nii.gz",
        "moving_labels": folder / "moving_labels.nii.gz",
        "true_displacement_vox": folder / "true_displacement_vox.nii.gz",
    }
    save_nifti(p.fixed, p.affine, files["fixed"])
    save_nifti(p.moving, p.affine, files["moving"])
    save_nifti(p.fixed_labels, p.affine, files["fixed_labels"])
    save_nifti(p.moving_labels, p.affine, files["moving_labels"])
    save_nifti(p.true_disp_vox, p.affine, files["true_displacement_vox"])
    return files
