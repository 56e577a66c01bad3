"""Read a cohort of ``nir register`` results back from disk, whatever state it is in.

A cohort folder is a ``nir register-many`` output (``summary.csv`` and ``<id>/`` per pair) or
any folder whose sub-folders (or sub-sub-folders) hold ``nir register`` results; a folder that
is itself one result counts as a cohort of one. A pair is

* ``completed``: its ``metrics.json`` is valid JSON (written last, atomically, by every run);
* ``failed``: ``summary.csv`` says so or its folder holds ``error.txt`` (register-many's traceback);
* ``pending``: listed in ``summary.csv`` as pending, or a folder with outputs but no readable
  ``metrics.json`` (a run in progress or cut short: half-written).

Only the standard library and numpy: reading 1,000 folders takes well under a second.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nir_lightning.errors import InputError

METRICS_FILE = "metrics.json"
ERROR_FILE = "error.txt"  # as nir_lightning.app.batch.ERROR_FILE (not imported: batch pulls in torch/Lightning)
SUMMARY_FILE = "summary.csv"
QC_FILE = "qc.png"
# Files/folders whose presence makes a folder a (possibly half-written) result.
RESULT_MARKERS = (METRICS_FILE, ERROR_FILE, "warped.nii.gz", "displacement.nii.gz", "affine.mat", "qc.png", "checkpoints", "logs")
_SKIP_DIRS = {"logs", "checkpoints", "wandb", "lightning_logs"}

# Config keys that differ between the pairs of one cohort by construction (paths, the rank's device).
PER_PAIR_CONFIG = (
    "data.fixed", "data.moving", "data.fixed_labels", "data.moving_labels", "data.fixed_mask", "data.moving_mask",
    "data.demo_dir", "trainer.default_root_dir", "trainer.logger", "trainer.devices", "trainer.callbacks",
    "config",
)
# Settings shown in the report's header: name -> dotted config key.
SHOWN_CONFIG: dict[str, str] = {
    "field": "model.field.class_path",
    "sampler": "model.sampler.class_path",
    "similarity": "model.similarity",
    "lam": "model.lam",
    "lr": "model.lr",
    "affine": "data.affine.kind",
    "max_steps": "trainer.max_steps",
    "seed": "seed_everything",
}


@dataclass
class PairResult:
    """One pair of the cohort as found on disk.

    Attributes:
        id: the pair's id (its folder relative to the cohort folder, ``.`` for the folder itself).
        status: ``completed``, ``failed`` or ``pending``.
        folder: the pair's folder, or ``None`` when only ``summary.csv`` names it.
        metrics: ``metrics.json`` (empty unless completed).
        error: the failure's message (summary.csv, else the last line of ``error.txt``).
        detail: why a pending row is pending (e.g. half-written), for the reader.
    """

    id: str
    status: str
    folder: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    detail: str = ""

    def number(self, key: str) -> float | None:
        """A finite float metric, or ``None``.

        >>> PairResult("a", "completed", metrics={"x": 0.5, "y": None, "z": "n"}).number("x")
        0.5
        """
        return _finite(self.metrics.get(key))

    @property
    def qc(self) -> Path | None:
        return self.folder / QC_FILE if self.folder is not None and (self.folder / QC_FILE).is_file() else None

    @property
    def version(self) -> str | None:
        v = self.metrics.get("version")
        return str(v) if v is not None else None


@dataclass
class Cohort:
    """Every pair of a cohort folder, in ``summary.csv`` order and then by folder name."""

    folder: Path
    pairs: list[PairResult]

    def by_status(self, status: str) -> list[PairResult]:
        return [p for p in self.pairs if p.status == status]

    @property
    def completed(self) -> list[PairResult]:
        return self.by_status("completed")

    def versions(self) -> Counter[str]:
        """How many completed pairs each package version wrote (``unknown`` when not recorded)."""
        return Counter(p.version or "unknown" for p in self.completed)

    def config_groups(self) -> list[tuple[dict[str, Any], list[str]]]:
        """Distinct run configurations (per-pair paths left out) with the ids that used each, largest first."""
        groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for p in self.completed:
            flat = shared_config(p.metrics.get("config"))
            key = json.dumps(flat, sort_keys=True, default=str)
            groups.setdefault(key, (flat, []))[1].append(p.id)
        return sorted(groups.values(), key=lambda g: -len(g[1]))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys.

    >>> flatten({"model": {"lr": 0.01, "field": {"class_path": "X"}}, "seed_everything": 0})
    {'model.lr': 0.01, 'model.field.class_path': 'X', 'seed_everything': 0}
    """
    out: dict[str, Any] = {}
    if not isinstance(config, Mapping):
        return out
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def shared_config(config: Any) -> dict[str, Any]:
    """The resolved config of ``metrics.json`` without what differs per pair by design (paths, device index).

    >>> shared_config({"data": {"fixed": "/a.nii", "labels": None}, "model": {"lr": 0.01}})
    {'data.labels': None, 'model.lr': 0.01}
    """
    return {k: v for k, v in flatten(config).items() if not any(k == p or k.startswith(p + ".") for p in PER_PAIR_CONFIG)}


def _read_summary(folder: Path) -> dict[str, dict[str, str]]:
    """Rows of ``summary.csv`` and, over them, of the per-rank partial summaries of a torchrun job in progress."""
    rows: dict[str, dict[str, str]] = {}
    for path in [folder / SUMMARY_FILE, *sorted(folder.glob(".summary.rank*-of-*.csv"))]:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    rid = (row.get("id") or "").strip()
                    if rid and (path.name == SUMMARY_FILE or row.get("status") != "pending"):
                        rows[rid] = row
        except (OSError, csv.Error, UnicodeDecodeError):
            continue  # missing, or being replaced right now: the folders still tell
    return rows


def _is_result(folder: Path) -> bool:
    return any((folder / name).exists() for name in RESULT_MARKERS)


def _result_folders(root: Path, depth: int = 2) -> Iterator[Path]:
    """Folders under ``root`` (up to ``depth`` levels) that hold results, in name order."""
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS and not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        if _is_result(child):
            yield child
        elif depth > 1:
            yield from _result_folders(child, depth - 1)


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def read_pair(folder: Path, pid: str, summary: Mapping[str, str] | None = None) -> PairResult:
    """One pair from its folder (may be absent) and its ``summary.csv`` row (may be ``None``)."""
    row = summary or {}
    metrics: Any = None
    problem = ""
    if (folder / METRICS_FILE).is_file():
        try:
            metrics = json.loads((folder / METRICS_FILE).read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            problem = f"metrics.json is unreadable ({type(exc).__name__}): half-written or damaged; rerun register-many to redo it"
        else:
            if not isinstance(metrics, dict):
                metrics, problem = None, "metrics.json holds no JSON object; rerun the pair"
    where = folder if folder.is_dir() else None
    if isinstance(metrics, dict):
        return PairResult(pid, "completed", where, metrics)
    error = " ".join((row.get("error") or "").split())
    if row.get("status") == "failed" or (folder / ERROR_FILE).is_file():
        return PairResult(pid, "failed", where, error=error or _last_line(folder / ERROR_FILE) or "failed (no message recorded)")
    if where is None:
        detail = "not started yet"
    elif problem:
        detail = problem
    else:
        files = sum(1 for p in folder.iterdir() if not p.name.startswith("."))
        detail = f"half-written: {files} file(s) but no metrics.json yet (running, or interrupted; rerun to finish)"
    return PairResult(pid, "pending", where, detail=detail)


def load_cohort(folder: str | Path) -> Cohort:
    """Every pair under ``folder`` (see the module docstring).

    Raises :class:`InputError` when ``folder`` is missing or holds no result at all.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"'{root}' is not a folder: give a `nir register-many` --output folder or a folder of `nir register` results.")
    summary = _read_summary(root)
    pairs: dict[str, PairResult] = {}
    for rid, row in summary.items():
        pairs[rid] = read_pair(root / rid, rid, row)
    if _is_result(root) and (root / METRICS_FILE).exists():
        pairs.setdefault(".", read_pair(root, "."))
    for sub in _result_folders(root):
        rid = sub.relative_to(root).as_posix()
        if rid not in pairs:
            pairs[rid] = read_pair(sub, rid)
    if not pairs:
        raise InputError(
            f"no registration results in '{root}': expected summary.csv or sub-folders holding metrics.json "
            "(the output of `nir register-many --output DIR` or of `nir register --output DIR/<id>`)."
        )
    return Cohort(root, list(pairs.values()))
