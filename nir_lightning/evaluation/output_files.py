"""Names of the files a registration writes, and the check that none of them is one of its inputs
(no heavy imports: the CLI checks them first).

Inputs are never outputs. A registration writes fixed names into its output folder (``warped.nii.gz``, ``displacement.nii.gz``,
...), and ``--overwrite`` (or ``register-many`` redoing a pair) first removes an earlier run's files
and its ``logs/``. A chained run can point at those very files: ``--moving out/warped.nii.gz
--output out --overwrite`` registers the last result again and would replace its own moving image
while reading it. That is refused here, before anything is written or removed.

The test is on real paths: an input is at risk when the file it resolves to (through symbolic links)
is the directory entry that the run replaces (``out/<name>``, the folder resolved too) or lies in a
folder the run clears. A hard link or a copy elsewhere is safe (writes are atomic renames, which
replace the entry in ``out``, not the file another entry names), and so is a symbolic link that
lives in ``out`` and points elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from nir_lightning.errors import InputError

OUTPUT_FILES: tuple[str, ...] = (
    "warped.nii.gz",
    "warped_labels.nii.gz",
    "displacement.nii.gz",
    "affine.mat",
    "composed_displacement.nii.gz",
    "jacobian_det.nii.gz",
    "inverse_displacement.nii.gz",
    "metrics.json",
)
"""Files a registration writes (``qc.png`` and ``logs/`` aside); ``metrics.json`` is the last."""

CORE_FILES: tuple[str, ...] = ("warped.nii.gz", "displacement.nii.gz", "affine.mat", "jacobian_det.nii.gz")
"""Written by every successful registration; optional outputs (the inverse) are not required for completeness."""

WRITTEN_FILES: tuple[str, ...] = (*OUTPUT_FILES, "qc.png")
"""Files of the output folder that a run writes or removes (``register-many`` adds its ``error.txt``)."""
LOG_DIR = "logs"
"""The run's CSV logs (``--overwrite`` and ``register-many`` replace them)."""
CHECKPOINT_DIR = "checkpoints"
"""``last.ckpt`` and ``run.json`` while a fit runs (:mod:`nir_lightning.training.checkpoints`)."""
CLEARED_FOLDERS: tuple[str, ...] = (LOG_DIR, CHECKPOINT_DIR)
"""Folders of the output folder whose contents a run replaces (``--overwrite``, ``--resume``)."""


def _at_risk(path: Path, out: Path, written: tuple[str, ...]) -> str | None:
    """The output that would replace or remove ``path`` (an existing file), or ``None``."""
    real = path.resolve()
    if real.parent == out:
        from nir_lightning.io import temporary_prefix  # imports torch: only for an input in the output folder

        name = real.name
        if name in written or any(name.startswith(temporary_prefix(w)) for w in OUTPUT_FILES):  # atomic writes' temporaries
            return name
    for folder in CLEARED_FOLDERS:
        if real.is_relative_to(out / folder):
            return f"{folder}/"
    return None


def refuse_inputs_among_outputs(
    output: str | os.PathLike[str], inputs: Mapping[str, object], *, writer: str = "--output", also: tuple[str, ...] = (),
) -> None:
    """Raise :class:`~nir_lightning.errors.InputError` when a run into ``output`` would replace or
    remove one of ``inputs`` (role -> path; values that are not paths, or do not exist, are skipped).
    ``writer`` names ``output`` in the message (``"--output"``; ``register-many``: the pair's folder);
    ``also``: more file names the caller writes or removes there.

    >>> import tempfile
    >>> from nir_lightning.errors import InputError
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = (out / "warped.nii.gz").write_bytes(b"an earlier result")
    >>> try:
    ...     refuse_inputs_among_outputs(out, {"moving image": out / "warped.nii.gz"})
    ... except InputError as exc:
    ...     print("would write as 'warped.nii.gz'" in str(exc))
    True
    >>> refuse_inputs_among_outputs(out / "elsewhere", {"moving image": out / "warped.nii.gz"})  # another folder: fine
    """
    out = Path(output).resolve()
    written = (*WRITTEN_FILES, *also)
    for role, value in inputs.items():
        if not isinstance(value, (str, os.PathLike)) or not Path(value).exists():
            continue
        hit = _at_risk(Path(value), out, written)
        if hit is None:
            continue
        what = f"inside '{hit}' of {writer} '{output}', which a run clears" if hit.endswith("/") else f"the file that {writer} '{output}' would write as '{hit}'"
        raise InputError(f"{role} '{value}' is {what}: nir never overwrites its inputs. Choose another --output folder, or move the input out of it first.")

