"""The pairs CSV of ``run_benchmark.py``, read one way by every script that reads a run's pairs.

Columns ``fixed,moving,fixed_labels,moving_labels[,labels][,name][,multimodal]``; relative paths are
relative to the CSV. A row's ``name`` is the folder ``run_benchmark.py`` writes its results into
(``RUN/NAME/METHOD/``), so the scripts that read a run afterwards (``common_labels.py``,
``smoothed_fields.py``) must name the rows the same way.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

__all__ = ["FILE_KEYS", "read_pairs_csv"]

FILE_KEYS = ("fixed", "moving", "fixed_labels", "moving_labels")
"""The columns every row must fill: the two images and their label maps."""


def read_pairs_csv(path: str | Path, labels: str | None = None, *, prog: str = "run_benchmark") -> list[dict[str, Any]]:
    """Each row as ``{name, fixed, moving, fixed_labels, moving_labels, labels, multimodal}``.

    Files are absolute; ``labels`` is ``labels`` if given (every pair's label list), else the row's
    own: a TSV made absolute, a list such as ``2,3,41`` kept as it is, empty as ``None``. A row
    without a ``name`` is ``pair<row number>`` (1 for the first row). A row lacking a file, or a
    CSV without rows, stops the script (``SystemExit``) with ``prog``, the file and the row named.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "p.csv").write_text("fixed,moving,fixed_labels,moving_labels,labels\\nf.nii,m.nii,fl.nii,ml.nii,2\\n")
    >>> row = read_pairs_csv(d / "p.csv")[0]
    >>> row["name"], row["labels"], row["fixed"] == str((d / "f.nii").resolve())
    ('pair1', '2', True)
    """
    csv_path = Path(path).resolve()
    pairs: list[dict[str, Any]] = []
    with csv_path.open(newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            missing = [k for k in FILE_KEYS if not (row.get(k) or "").strip()]
            if missing:
                sys.exit(f"{prog}: {csv_path} row {i + 2} lacks {', '.join(missing)} (columns: fixed,moving,fixed_labels,moving_labels[,labels][,name])")
            pair: dict[str, Any] = {k: str((csv_path.parent / row[k].strip()).resolve()) for k in FILE_KEYS}
            lab = (row.get("labels") or "").strip()
            pair["labels"] = labels or (str((csv_path.parent / lab).resolve()) if lab and not lab.replace(",", "").isdigit() else lab or None)
            pair["name"] = (row.get("name") or "").strip() or f"pair{i + 1}"
            pair["multimodal"] = (row.get("multimodal") or "").strip().lower() in ("1", "yes", "true")
            pairs.append(pair)
    if not pairs:
        sys.exit(f"{prog}: {csv_path} lists no pairs")
    return pairs
