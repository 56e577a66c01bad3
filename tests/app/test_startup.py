"""The start-up of ``nir register``: which modules importing it loads."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("pytorch_lightning", "lightning_fabric", "monai", "matplotlib", "wandb")


def _loaded_after(modules: list[str]) -> list[str]:
    """The heavy modules in ``sys.modules`` after importing ``modules`` in a fresh interpreter."""
    code = f"import json, sys\nfor m in {modules!r}: __import__(m)\nprint(json.dumps(sorted(m for m in {HEAVY + ('torch',)!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_register_entry_modules_import_nothing_heavy() -> None:
    """`nir`'s module and the register API load no torch, Lightning, MONAI, matplotlib or W&B:
    a bad option or a missing file is reported in a fraction of a second."""
    assert _loaded_after(["nir_lightning.cli", "nir_lightning.app.cli", "nir_lightning.app.register"]) == []


def test_monai_matplotlib_and_wandb_load_only_where_they_run() -> None:
    """The pure layers, the dense evaluation and the outputs import torch, not MONAI (the loading
    transforms and the pyramid's filter import it when they run), nor matplotlib (the QC figure) or W&B;
    the LightningCLI's modules add Lightning, still without MONAI or W&B."""
    pure = ["nir_lightning.data.pair", "nir_lightning.core.smoothing", "nir_lightning.fields", "nir_lightning.alignment",
            "nir_lightning.evaluation.evaluate", "nir_lightning.evaluation.outputs", "nir_lightning.data.phantom"]
    assert _loaded_after(pure) == ["torch"]
    loaded = _loaded_after(["nir_lightning.training.lightning_cli", "nir_lightning.training"])
    assert "pytorch_lightning" in loaded and "monai" not in loaded and "wandb" not in loaded, loaded
