"""The LightningCLI of nir_lightning (``nir fit|validate|test|predict``) and the objects it builds.

:class:`NIRCLI` is LightningCLI over :class:`~nir_lightning.training.module.RegistrationModule`
and :class:`~nir_lightning.training.datamodule.PairDataModule`; ``nir register`` and
:func:`nir_lightning.register_pair` build it with ``run=False``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.cli import LightningCLI

from nir_lightning.errors import InputError
from nir_lightning.training.callbacks import progress_bar_callbacks
from nir_lightning.training.datamodule import PairDataModule
from nir_lightning.training.module import RegistrationModule
from nir_lightning.training.tracking import ConfigToLoggers

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 293,  # the default pyramid's 80 / 151 / 62 steps by stage (0.2.25)
    "devices": 1,  # one pair is one small problem; several GPUs are for register-many
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "default_root_dir": "runs",
    "logger": {
        "class_path": "pytorch_lightning.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "nir"},
    },
}

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class NIRCLI(LightningCLI):
    """LightningCLI over :class:`RegistrationModule` and :class:`PairDataModule`."""

    def __init__(self, args: list[str] | None = None, *, run: bool = True, trainer_defaults: dict[str, Any] | None = None) -> None:
        # Parse errors raise (the caller turns them into one line naming the key) instead of printing the usage.
        no_exit = {"exit_on_error": False}
        super().__init__(
            RegistrationModule,
            PairDataModule,
            trainer_defaults={**TRAINER_DEFAULTS, **(trainer_defaults or {})},
            seed_everything_default=0,
            save_config_callback=ConfigToLoggers,  # config.yaml in the log folder + the W&B run config
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            parser_kwargs={**no_exit, **{c: no_exit for c in SUBCOMMANDS}} if run else no_exit,
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except InputError as exc:
            config = self.config[self.subcommand] if self.subcommand else self.config
            raise locate_error(exc, config.as_dict()) from None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # A bar that refreshes every step floods non-TTY logs (CI): add a throttled one unless
        # the config disables the bar or brings its own.
        return super()._instantiate_trainer(config, [*callbacks, *progress_bar_callbacks(config, callbacks), StartupClock()])


def process_start_time() -> float | None:
    """When this process started (Unix seconds, to a clock tick), from ``/proc``; ``None`` elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the command name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class StartupClock(Callback):
    """Records ``seconds_startup`` in the predictions' metrics: process start to the first fit
    step, less the affine stage (imports, parsing, building the CLI, loading the pair). For
    ``nir register`` that is the command's own start-up; in a long Python session it includes
    the session."""

    def __init__(self) -> None:
        self.first_step: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.first_step is None:
            self.first_step = time.time()

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        started, metrics = process_start_time(), getattr(outputs, "metrics", None)
        if self.first_step is None or started is None or not isinstance(metrics, dict):
            return
        affine = getattr(getattr(trainer, "datamodule", None), "affine_result", None)
        # less the part of the affine stage the command waited for (all of it, unless another process ran it)
        stage = 0.0 if affine is None else float(affine.seconds) if affine.waited is None else float(affine.waited)
        metrics["seconds_startup"] = self.first_step - started - stage


def config_keys_of(config: Any, owner: str, param: str, prefix: str = "") -> list[tuple[str, Any]]:
    """``(key, value)`` of every ``param`` in ``init_args`` of a class named ``owner`` in a config dict.

    >>> cfg = {"model": {"field2": {"class_path": "nir_lightning.fields.VelocityField", "init_args": {"step_size": None}}}}
    >>> config_keys_of(cfg, "VelocityField", "step_size")
    [('model.field2.init_args.step_size', None)]
    """
    found: list[tuple[str, Any]] = []
    if isinstance(config, dict):
        cls = str(config.get("class_path", ""))
        args = config.get("init_args")
        if cls.rsplit(".", 1)[-1] == owner and isinstance(args, dict) and param in args:
            found.append((f"{prefix}.init_args.{param}".lstrip("."), args[param]))
        for key, value in config.items():
            found += config_keys_of(value, owner, param, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found += config_keys_of(value, owner, param, f"{prefix}[{i}]")
    return found


def locate_error(exc: InputError, config: dict[str, Any]) -> InputError:
    """``exc`` with the config key its value came from, when a core class named its parameter."""
    if exc.owner is None or exc.param is None:
        return exc
    keys = config_keys_of(config, exc.owner, exc.param)
    if len(keys) > 1:  # e.g. model.field and model.field2 both VelocityFields: the one with the bad value
        keys = [(k, v) for k, v in keys if v == exc.value] or keys
    return exc.located(" or ".join(k for k, _ in keys)) if keys else exc


def quiet_third_party() -> None:
    """Silence known-harmless warnings of dependencies that would bury our own messages."""
    warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
    warnings.filterwarnings("ignore", message=".*Setting affine, but the applied meta contains an affine.*")
    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    # Batches are step indices and sampling depends on the global step only, so resuming
    # mid-epoch is exact (tests/training/test_faults.py) despite this warning.
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
