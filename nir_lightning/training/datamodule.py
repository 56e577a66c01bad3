"""LightningDataModule for one image pair: loads it once; batches are just step indices."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from nir_lightning.alignment import AffineResult, AffineStage
from nir_lightning.data.checks import DEFAULT_PERCENTILES
from nir_lightning.data.pair import ImagePair, load_pair
from nir_lightning.errors import InputError
from nir_lightning.evaluation.evaluate import BeforeScores

log = logging.getLogger(__name__)


class _Steps(Dataset[int]):
    """Indices only: coordinates are sampled on the device inside ``training_step``."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


class EarlyStart(Protocol):
    """The pair loaded, and its affine stage run, before Lightning was imported
    (:class:`nir_lightning.app.early_affine.EarlyStart`)."""

    def pair_for(self, source: dict[str, Any]) -> ImagePair | None:
        """The pair if it was loaded from ``source`` (:meth:`PairDataModule.load_source`); else ``None``."""

    def take(self, stage: AffineStage, source: dict[str, Any]) -> AffineResult | None:
        """The stage's result if it ran ``stage`` on the pair loaded from ``source``; else ``None``."""


class PairDataModule(pl.LightningDataModule):
    """One fixed/moving pair (optionally with label maps), loaded with MONAI transforms.

    Hooks: ``setup`` (load and check the pair), ``train/val/predict_dataloader``.
    Keyword arguments map one-to-one onto the CLI's ``data.*`` options.

    Args:
        fixed, moving: NIfTI paths. Required unless ``demo`` is set.
        fixed_labels, moving_labels: optional NIfTI label maps (for Dice/HD95).
        labels: labels to average Dice over: TSV path (first column) or ``"2,3,41"``.
        percentiles: robust intensity range mapped to [0, 1].
        steps_per_epoch: optimisation steps per "epoch" (sets validation cadence).
        demo: use the built-in synthetic phantom pair (needs no files).
        demo_dir: where the demo pair is written (a temporary folder if ``None``).
        fixed_mask, moving_mask: optional binary NIfTI masks on their image's grid: the
            similarity counts only inside them, the samplers draw inside the fixed mask.
        affine: the rigid/affine stage run before the neural field
            (:class:`~nir_lightning.alignment.AffineStage`; ``kind: none`` keeps the pair as
            its headers place it). Its world matrix is written as ``affine.mat``.
    """

    def __init__(
        self,
        *,
        fixed: str | None = None,
        moving: str | None = None,
        fixed_labels: str | None = None,
        moving_labels: str | None = None,
        labels: str | list[int] | None = None,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        steps_per_epoch: int = 100,
        demo: bool = False,
        demo_dir: str | None = None,
        fixed_mask: str | None = None,
        moving_mask: str | None = None,
        affine: AffineStage = AffineStage(),
    ) -> None:
        super().__init__()
        if steps_per_epoch < 1:
            raise InputError(f"data.steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if not demo and (fixed is None or moving is None):
            raise InputError("give data.fixed and data.moving (NIfTI paths), or set data.demo=true for the built-in phantom.")
        self.fixed, self.moving = fixed, moving
        self.fixed_labels, self.moving_labels = fixed_labels, moving_labels
        self.labels = labels
        self.percentiles = percentiles
        self.steps_per_epoch = steps_per_epoch
        self.demo = demo
        self.demo_dir = demo_dir
        self.fixed_mask, self.moving_mask = fixed_mask, moving_mask
        self.affine = affine
        self.affine_result: AffineResult | None = None
        self.pair: ImagePair | None = None
        self.before_scores: BeforeScores | None = None  # the unregistered pair's scores, on a thread
        self.early: EarlyStart | None = None  # nir register's pair loaded and stage run early (app/early_affine.py)

    def load_source(self) -> dict[str, Any]:
        """:func:`~nir_lightning.data.load_pair`'s keyword arguments but ``keep_native``."""
        return {
            "fixed": self.fixed, "moving": self.moving, "fixed_labels": self.fixed_labels, "moving_labels": self.moving_labels,
            "labels": self.labels, "percentiles": (float(self.percentiles[0]), float(self.percentiles[1])),
            "fixed_mask": self.fixed_mask, "moving_mask": self.moving_mask, "stage_aligns": self.affine.kind != "none",
        }

    def setup(self, stage: str | None = None) -> None:
        if self.pair is not None:
            return
        if self.demo:
            from nir_lightning.data.phantom import write_demo_pair

            folder = Path(self.demo_dir) if self.demo_dir else Path(tempfile.mkdtemp(prefix="nir_demo_"))
            files = write_demo_pair(folder)
            self.fixed, self.moving = str(files["fixed"]), str(files["moving"])
            self.fixed_labels, self.moving_labels = str(files["fixed_labels"]), str(files["moving_labels"])
        assert self.fixed is not None and self.moving is not None
        source = self.load_source()
        early = self.early.pair_for(source) if self.early is not None else None
        # outputs resample the moving image once, from its own grid: keep_native
        self.pair = early if early is not None else load_pair(**source, keep_native=True)
        pair = self.pair
        if self.affine.kind != "none":
            if pair.has_labels:  # Dice and HD95 before registration meanwhile: the stage computes on one core
                self.before_scores = BeforeScores(pair)
            res = self.early.take(self.affine, source) if self.early is not None and early is not None else None
            if res is None:
                res = self.affine.fit(**pair.stage_inputs())
            pair.align(res.world)
            self.affine_result = res
            log.info("affine stage (%s): %.1f s, similarity %.4f -> %.4f", res.kind, res.seconds, res.similarity_before, res.similarity_after)
        pair.check_labels()  # on the aligned pair: a swapped map shows only there
        if self.demo:
            import nibabel as nib

            img: Any = nib.load(str(files["true_displacement_vox"]))
            true = img.get_fdata(dtype="float32")
            self.pair.reference_disp_vox = torch.as_tensor(true)

    def train_dataloader(self) -> DataLoader[int]:
        return DataLoader(_Steps(self.steps_per_epoch), batch_size=1, num_workers=0)

    def val_dataloader(self) -> DataLoader[int]:
        return DataLoader(_Steps(1), batch_size=1, num_workers=0)

    def test_dataloader(self) -> DataLoader[int]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[int]:
        return self.val_dataloader()

    def transfer_batch_to_device(self, batch: torch.Tensor, device: torch.device, dataloader_idx: int) -> torch.Tensor:
        return batch  # step indices are not used on the device
