"""Shared test set-up: CPU only, no W&B, few threads, tiny phantom pairs.

The environment is fixed here, before torch is imported by any test module, so every test
(and every in-process ``nir`` call) runs on the CPU with a small, predictable thread pool.
"""

from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread by default: on a small machine shared with other jobs, two or more
# OpenMP threads spin against each other and a training step gets 5-20x slower.
_THREADS = int(os.environ.get("NIR_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(_THREADS)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
SHARED_BRAIN = REPO_ROOT.parent / "shared" / "data" / "brain-pair"

TINY_SHAPE = (24, 26, 22)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def configs_dir() -> Path:
    return CONFIGS


def write_pair(folder: Path, shape: tuple[int, int, int], seed: int = 1) -> dict[str, Path]:
    """The synthetic phantom pair (fixed, moving, both label maps, true displacement)."""
    from nir_lightning.data.phantom import write_demo_pair

    files = write_demo_pair(folder, shape=shape, seed=seed)
    assert set(files) >= {"fixed", "moving", "fixed_labels", "moving_labels", "true_displacement_vox"}
    return files


@pytest.fixture(scope="session")
def pair_writer():
    """``write(folder, shape, seed=1)``: write a phantom pair of any shape."""
    return write_pair


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny phantom pair ``TINY_SHAPE`` written once per session (treat as read-only)."""
    return write_pair(tmp_path_factory.mktemp("tiny_pair"), TINY_SHAPE)


@pytest.fixture
def phantom_pair(tmp_path: Path) -> dict[str, Path]:
    """A fresh tiny phantom pair in this test's ``tmp_path`` (free to modify)."""
    return write_pair(tmp_path / "pair", TINY_SHAPE)


@pytest.fixture(scope="session")
def shared_pair() -> Path:
    """Folder of the shared 2 mm brain pair (subjA/subjB T1 and aseg); skipped if absent."""
    folder = SHARED_BRAIN / "2mm"
    needed = ["subjA_t1.nii.gz", "subjB_t1.nii.gz", "subjA_aseg.nii.gz", "subjB_aseg.nii.gz"]
    if not all((folder / n).is_file() for n in needed):
        pytest.skip(f"shared brain pair not found under {folder}")
    return folder


def pytest_configure(config: pytest.Config) -> None:
    # Known-harmless third-party warnings (the CLI silences the same ones for users).
    for line in (
        "ignore:Setting affine, but the applied meta contains an affine:UserWarning",
        "ignore:.*always_return_as_numpy.*:FutureWarning",
        "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ):
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
