"""``benchmarks/cohort.py``: one process against worker processes on a tiny cohort (phantom
pairs, a few steps): the table, the file comparison and the target line it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nir_lightning.data.phantom import write_demo_pair

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cohort.py"


def test_cohort_benchmark_compares_one_process_with_workers(tmp_path: Path) -> None:
    for seed in range(2):
        write_demo_pair(tmp_path / f"s{seed}", shape=(36, 38, 36), seed=seed)
    (tmp_path / "pairs.csv").write_text("fixed,moving,id\n" + "".join(f"s{k}/fixed.nii.gz,s{k}/moving.nii.gz,p{k}\n" for k in range(2)))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--pairs", str(tmp_path / "pairs.csv"), "--modes", "1,2", "--threads", "1", "--repeat", "1",
         "--out", str(tmp_path / "runs"), "--nir-args", "--trainer.max_steps=2 --data.affine.kind=none"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and rows[0].startswith("| 1 | 1 | 1 x 1 |") and rows[1].startswith("| 2 | 1 | 2 x 1 |")
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    assert all(c[-2] == "yes" for c in cells)  # the workers wrote the one process's files, byte for byte
    assert all(c[-1] == "-" or 0 <= float(c[-1]) <= 100 for c in cells)  # the CPU steal while each ran (nir_lightning/app/host_load.py)
    assert "issue 25's register-many target" in proc.stdout
