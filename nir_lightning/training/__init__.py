"""Lightning glue: the LightningModule (hooks only), the DataModule, callbacks, tracking, checkpoints.

The only layer that imports ``pytorch_lightning``. Configs name its classes by these short
paths, e.g. ``nir_lightning.training.QCLogger``.
"""

from nir_lightning.training.callbacks import NiftiWriter, ProgressLine, ThrottledProgressBar
from nir_lightning.training.datamodule import PairDataModule
from nir_lightning.training.hybrid_callback import HybridPhases
from nir_lightning.training.label_watch import DiceWatch
from nir_lightning.training.module import RegistrationModule
from nir_lightning.training.schedule import HybridSchedule
from nir_lightning.training.tracking import ConfigToLoggers, QCLogger

__all__ = [
    "ConfigToLoggers",
    "DiceWatch",
    "HybridPhases",
    "HybridSchedule",
    "NiftiWriter",
    "PairDataModule",
    "ProgressLine",
    "QCLogger",
    "RegistrationModule",
    "ThrottledProgressBar",
]
