"""Bounded memory on a 1 mm-sized volume (160 x 192 x 224, 6.9 M voxels).

Each measurement runs in a fresh subprocess and reads its peak resident set size, ``VmHWM`` of
``/proc/self/status`` (``ru_maxrss`` where there is no ``/proc``), so other tests do not blur it.
Not ``ru_maxrss`` on Linux: it survives ``exec``, so a child forked from a pytest process that had
grown to 1.3 GB reported 1.3 GB before doing anything. Dense inference
and metrics run in slabs of ``max_points`` points; without that, the field's activations and
the float64 Jacobian of the whole volume alone need several GB.

Measured on the CPU machine this project is tested on (torch 2.13, one thread):

* ``evaluate`` (dense field, det J, folding, warping, Dice) with a small field: peak about 1.0 GB,
  of which about 0.4 GB is importing torch/MONAI/Lightning and 0.25 GB the pair itself; the
  evaluation adds 0.52-0.55 GB in 0.2.9 (0.56-0.59 GB in 0.2.8, once 0.62 GB in CI; 0.9 GB more
  before det J was chunked); the peak RSS varies by some 30 MB from run to run with the allocator;
* the same with the default field (feature grids + MLP), HD95 and writing all outputs: peak about 1.1 GB;
* the whole ``nir register`` of the shared 1 mm brain pair (2 steps): peak about 1.6 GB in 0.2.9
  (4.9 GB with the 0.1 field and stride-2 lattice, dominated by the training step's graph).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SHAPE = (160, 192, 224)
GB = 1024.0  # MB

PEAK_MB = r'''
def peak_mb():
    try:  # this process's own peak (ru_maxrss keeps the forking parent's across exec on Linux)
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
'''
"""``peak_mb()`` of the subprocess scripts: the script's own peak RSS in MB."""

EVALUATE = r"""
import json, resource, sys
import numpy as np, torch
from nir_lightning.evaluation.evaluate import evaluate
from nir_lightning.evaluation.outputs import write_outputs
from nir_lightning.fields import DisplacementField, GridDisplacementField
from nir_lightning.data.pair import ImagePair

PEAK_MB

shape, kind, full = tuple(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3] == "full"
axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
fixed = ((1 - (x**2 + y**2 + z**2)).clip(0, 1) * (0.6 + 0.4 * np.sin(6 * x) * np.cos(5 * y))).astype(np.float32)
moving = np.roll(fixed, (2, -1, 1), axis=(0, 1, 2))
del x, y, z
labels = lambda img: np.digitize(img, [0.05, 0.3, 0.6, 0.8]).astype(np.int32)
t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None]
pair = ImagePair(fixed=t(fixed), moving=t(moving), moving_raw=t(moving * 255), fixed_affine=np.eye(4),
                 fixed_labels=t(labels(fixed)), moving_labels=t(labels(moving)), labels=[1, 2, 3, 4])
del fixed, moving
torch.manual_seed(0)
field = GridDisplacementField() if kind == "grid" else DisplacementField(width=16, num_frequencies=4)
baseline = peak_mb()
reg = evaluate(field, pair, hd95=full)
assert reg.det.shape == shape and reg.metrics["foreground_voxels"] > 10**6
if full:
    write_outputs(reg, pair, sys.argv[4])
print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_mb()}))
"""


NIR = r"""
import json, resource, sys
from nir_lightning.cli import main
PEAK_MB
rc = main(sys.argv[1:])
print(json.dumps({"peak_mb": peak_mb()}))
sys.exit(rc)
"""


def run_measured(script: str, args: list[str], timeout: int = 600) -> dict[str, Any]:
    """Run ``script`` (its line ``PEAK_MB`` replaced by :data:`PEAK_MB`) in a fresh Python; it
    reports its own peak RSS as JSON on its last line."""
    script = script.replace("\nPEAK_MB\n", "\n" + PEAK_MB)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate_peak(kind: str, mode: str, out: Path) -> dict[str, Any]:
    """``kind``: ``"grid"`` (the default field) or ``"siren"`` (a small SIREN)."""
    return run_measured(EVALUATE, [json.dumps(SHAPE), kind, mode, str(out)])


def test_dense_evaluation_of_a_1mm_volume_stays_under_1_3_gb(tmp_path: Path) -> None:
    m = evaluate_peak("siren", "metrics", tmp_path)
    added = m["peak_mb"] - m["baseline_mb"]
    print(f"dense evaluation at {SHAPE}: peak {m['peak_mb']:.0f} MB, {added:.0f} MB above the loaded pair")
    assert added < 0.6 * GB, m  # one float64 Jacobian of the volume would be 0.45 GB on its own
    assert m["peak_mb"] < 1.3 * GB, m


@pytest.mark.slow
def test_dense_evaluation_with_default_field_hd95_and_outputs_stays_under_1_6_gb(tmp_path: Path) -> None:
    m = evaluate_peak("grid", "full", tmp_path)
    print(f"evaluation + HD95 + outputs at {SHAPE}, default field: peak {m['peak_mb']:.0f} MB")
    assert (tmp_path / "displacement.nii.gz").is_file()
    assert m["peak_mb"] < 1.6 * GB, m


@pytest.mark.slow
def test_nir_register_of_the_1mm_brain_pair_stays_under_6_gb(tmp_path: Path) -> None:
    brain = Path(__file__).resolve().parents[3] / "shared" / "data" / "brain-pair"
    names = ["subjA_t1.nii.gz", "subjB_t1.nii.gz", "subjA_aseg.nii.gz", "subjB_aseg.nii.gz", "labels30.tsv"]
    if not all((brain / n).is_file() for n in names):
        pytest.skip(f"1 mm brain pair not found under {brain}")
    out = tmp_path / "out"
    args = [
        "register",
        "--fixed", str(brain / names[0]), "--moving", str(brain / names[1]),
        "--fixed-labels", str(brain / names[2]), "--moving-labels", str(brain / names[3]), "--labels", str(brain / names[4]),
        "--output", str(out), "--trainer.max_steps=2",
    ]
    peak = run_measured(NIR, args, timeout=900)["peak_mb"]
    print(f"nir register at 1 mm (2 steps): peak {peak:.0f} MB")
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert peak < 6 * GB
