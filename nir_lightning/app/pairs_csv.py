"""The pairs CSV of ``nir register-many`` (:func:`read_pairs`): one :class:`PairSpec` per row.

Read before anything heavy is imported: no torch, no Lightning.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from nir_lightning.errors import InputError

__all__ = ["CSV_COLUMNS", "PairSpec", "read_pairs", "with_missing_files"]

CSV_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "id")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class PairSpec:
    """One CSV row. Paths are absolute; ``problem`` is set for a row that cannot be run."""

    id: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    line: int = 0
    problem: str | None = None

    @property
    def has_labels(self) -> bool:
        return bool(self.fixed_labels and self.moving_labels)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return s or "pair"


def read_pairs(csv_path: str | os.PathLike[str]) -> list[PairSpec]:
    """Rows of a pairs CSV: ``fixed,moving`` and optional ``fixed_labels,moving_labels,id``.

    Relative paths are taken from the CSV's folder. A missing ``id`` becomes
    ``<fixed stem>__<moving stem>`` (sanitized; repeats get ``_2``, ``_3``, ... in row order, so
    appending rows never renames earlier pairs). Problems of the whole file (no such file, missing
    columns, bad or duplicate ids) raise :class:`InputError`; a row without a fixed/moving path or
    with only one label map is kept with ``problem`` set, to be reported as a failed pair
    (:func:`with_missing_files` adds the files that do not exist).
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise InputError(f"--pairs '{path}' not found (expected a CSV with columns fixed,moving[,fixed_labels,moving_labels,id]).")
    base = path.absolute().parent
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    for row in reader:
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            missing = [c for c in ("fixed", "moving") if c not in header]
            if missing:
                raise InputError(f"--pairs '{path}': the header row {row} lacks the column(s) {', '.join(missing)}; expected fixed,moving[,fixed_labels,moving_labels,id].")
            if len(set(header)) != len(header):
                raise InputError(f"--pairs '{path}': repeated column names in the header {row}.")
            unknown = [c for c in header if c and c not in CSV_COLUMNS]
            if unknown:
                print(f"nir register-many: ignoring column(s) {', '.join(unknown)} of {path} (known: {', '.join(CSV_COLUMNS)}).", file=sys.stderr)
            continue
        cells = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
        rows.append((reader.line_num, cells))
    if header is None or not rows:
        raise InputError(f"--pairs '{path}' lists no pairs (expected a header row fixed,moving[,...] and one row per pair).")

    def resolve(cell: str) -> str | None:
        if not cell:
            return None
        p = Path(cell).expanduser()
        return os.path.abspath(p if p.is_absolute() else base / p)

    taken: dict[str, int] = {}
    for line, cells in rows:
        rid = cells.get("id", "")
        if not rid:
            continue
        if not _SAFE_ID.match(rid) or rid.lower() == "summary.csv":
            raise InputError(f"--pairs '{path}' line {line}: id {rid!r} is not a safe folder name (use letters, digits, '.', '_' and '-', starting with a letter or digit).")
        if rid.lower() in taken:
            raise InputError(f"--pairs '{path}' line {line}: id {rid!r} repeats line {taken[rid.lower()]}; ids name the output folders and must be unique.")
        taken[rid.lower()] = line
    specs: list[PairSpec] = []
    for line, cells in rows:
        fixed, moving = resolve(cells.get("fixed", "")), resolve(cells.get("moving", ""))
        fixed_labels, moving_labels = resolve(cells.get("fixed_labels", "")), resolve(cells.get("moving_labels", ""))
        rid = cells.get("id", "")
        if not rid:
            stem = _sanitize(f"{_stem(fixed or 'none')}__{_stem(moving or 'none')}")
            rid, k = stem, 1
            while rid.lower() in taken:
                k += 1
                rid = f"{stem}_{k}"
            taken[rid.lower()] = line
        problem = None
        if not fixed or not moving:
            problem = f"line {line}: the fixed and moving columns must both name a NIfTI file."
        elif bool(fixed_labels) != bool(moving_labels):
            problem = f"line {line}: give both fixed_labels and moving_labels, or neither."
        specs.append(PairSpec(rid, fixed or "", moving or "", fixed_labels, moving_labels, line, problem))
    return specs


def with_missing_files(spec: PairSpec, csv_folder: Path) -> PairSpec:
    """``spec``, with the files it names that do not exist as its ``problem`` (a row's own problem
    comes first). Asked of the pairs still to run when a cohort starts, so that a typo in row 150 is
    reported before the first fit, not hours later; a finished pair whose inputs have since moved
    is not asked, and stays finished.

    >>> with_missing_files(PairSpec("x", "/no/f.nii.gz", "/no/m.nii.gz"), Path("/no")).problem
    "line 0: fixed image not found: '/no/f.nii.gz'; moving image not found: '/no/m.nii.gz' (relative paths are read from the CSV's folder '/no')."
    """
    if spec.problem:
        return spec
    files = {"fixed image": spec.fixed, "moving image": spec.moving, "fixed label map": spec.fixed_labels, "moving label map": spec.moving_labels}
    missing = [f"{what} not found: '{p}'" for what, p in files.items() if p and not Path(p).is_file()]
    if not missing:
        return spec
    return replace(spec, problem=f"line {spec.line}: {'; '.join(missing)} (relative paths are read from the CSV's folder '{csv_folder}').")
