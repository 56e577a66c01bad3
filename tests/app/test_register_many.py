"""`nir register-many`: CSV parsing, summary, resume, failure isolation, torchrun sharding."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nir_lightning.app.batch import SUMMARY_FIELDS, read_pairs
from nir_lightning.app.pairs_csv import with_missing_files
from nir_lightning.cli import main
from nir_lightning.data.phantom import write_demo_pair
from nir_lightning.errors import InputError

SHAPE = (36, 38, 36)  # about the smallest the phantom renders (its bias field needs >= 36 voxels a side)
OVERRIDES = ["--trainer.max_steps=5", "--trainer.log_every_n_steps=1"]
IN_PROCESS = ["--workers", "1", "--threads", "1"]  # this process, as the worker processes of test_workers_* fit


def _summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and tuple(rows[0]) == SUMMARY_FIELDS
    return rows


def _mtimes(out: Path, ids: list[str]) -> dict[str, int]:
    return {i: (out / i / "metrics.json").stat().st_mtime_ns for i in ids}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom pairs (seeds 0-2) and a fourth whose moving image is missing, in a CSV with
    relative paths, labels on two rows and ids on some."""
    root = tmp_path_factory.mktemp("many")
    for seed in range(3):
        write_demo_pair(root / "data" / f"s{seed}", shape=SHAPE, seed=seed)
    (root / "pairs.csv").write_text(
        "fixed,moving,fixed_labels,moving_labels,id\n"
        "data/s0/fixed.nii.gz,data/s0/moving.nii.gz,data/s0/fixed_labels.nii.gz,data/s0/moving_labels.nii.gz,a\n"
        "data/s1/fixed.nii.gz,data/s1/moving.nii.gz,data/s1/fixed_labels.nii.gz,data/s1/moving_labels.nii.gz,\n"
        "data/s2/fixed.nii.gz,data/s2/moving.nii.gz,,,c\n"
        "data/s2/fixed.nii.gz,data/broken/moving.nii.gz,,,broken\n"
    )
    return root


@pytest.fixture(scope="module")
def first_run(pairs: Path) -> Path:
    out = pairs / "out_single"
    status = main(["register-many", "--pairs", str(pairs / "pairs.csv"), "--output", str(out), *OVERRIDES, *IN_PROCESS])
    assert status == 1  # one failed pair
    return out


def test_read_pairs_ids_and_paths(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text(
        "\ufeffFixed, moving ,note\n"
        "# a comment\n"
        "a/f.nii.gz,a/m.nii.gz,x\n"
        "a/f.nii.gz,a/m.nii.gz,y\n"
        "/abs/sub 1/T1w.nii,b/m.nii.gz,z\n"
        "\n"
        "a/f.nii.gz,,\n"
    )
    specs = read_pairs(tmp_path / "p.csv")
    assert [s.id for s in specs] == ["f__m", "f__m_2", "T1w__m", "f__none"]
    assert specs[0].fixed == str(tmp_path / "a" / "f.nii.gz") and specs[2].fixed == "/abs/sub 1/T1w.nii"
    assert specs[0].problem is None and "fixed and moving" in str(specs[3].problem)
    # the files that do not exist, with the folder relative paths are read from; a row's own problem first
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "m.nii.gz").write_bytes(b"")
    checked = [with_missing_files(s, tmp_path) for s in specs]
    assert checked[0].problem == (
        f"line 3: fixed image not found: '{tmp_path}/a/f.nii.gz'; moving image not found: '{tmp_path}/a/m.nii.gz' "
        f"(relative paths are read from the CSV's folder '{tmp_path}')."
    )
    assert checked[2].problem is not None and checked[2].problem.startswith("line 5: fixed image not found: '/abs/sub 1/T1w.nii' (")
    assert checked[3] == specs[3]
    for name in ("a/f.nii.gz", "a/m.nii.gz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert with_missing_files(specs[0], tmp_path) is specs[0]
    (tmp_path / "dup.csv").write_text("fixed,moving,id\nf.nii,m.nii,x\nf.nii,m.nii,X\n")
    with pytest.raises(InputError, match="repeats line 2"):
        read_pairs(tmp_path / "dup.csv")
    (tmp_path / "bad.csv").write_text("fixed,moving,id\nf.nii,m.nii,../up\n")
    with pytest.raises(InputError, match="not a safe folder name"):
        read_pairs(tmp_path / "bad.csv")
    (tmp_path / "nocol.csv").write_text("image,moving\nf.nii,m.nii\n")
    with pytest.raises(InputError, match="lacks the column"):
        read_pairs(tmp_path / "nocol.csv")
    with pytest.raises(InputError, match="not found"):
        read_pairs(tmp_path / "missing.csv")


def test_cli_rejects_per_pair_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.csv").write_text("fixed,moving\nf.nii,m.nii\n")
    assert main(["register-many", "--pairs", str(tmp_path / "p.csv"), "--output", str(tmp_path / "o"), "--fixed=x.nii"]) == 2
    assert "put it in the --pairs CSV" in capsys.readouterr().err


def test_single_process_lightning_hides_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    from nir_lightning.app.distributed import single_process_lightning

    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x", "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with single_process_lightning():
        assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"} & set(os.environ)
        assert rank_zero_only.rank == 0
    assert os.environ["RANK"] == "1" and os.environ["SLURM_NTASKS"] == "2" and rank_zero_only.rank == 1


def test_many_pairs_failure_isolated(first_run: Path) -> None:
    rows = _summary(first_run)
    assert [r["id"] for r in rows] == ["a", "fixed__moving", "c", "broken"]
    assert [r["status"] for r in rows] == ["completed", "completed", "completed", "failed"]
    assert "moving image not found" in rows[3]["error"] and rows[3]["dice_after"] == ""
    for r in rows[:3]:
        assert r["error"] == "" and float(r["seconds"]) > 0 and r["folding_percent"] != ""
        # exactly what `nir register` writes
        files = {p.name for p in (first_run / r["id"]).iterdir()}
        assert {"warped.nii.gz", "displacement.nii.gz", "jacobian_det.nii.gz", "metrics.json", "logs"} <= files
        metrics = json.loads((first_run / r["id"] / "metrics.json").read_text())
        assert metrics["steps"] == 5 and abs(metrics["folding_percent"] - float(r["folding_percent"])) < 1e-5
    assert float(rows[0]["dice_after"]) > 0 and rows[2]["dice_after"] == ""  # pair c has no labels
    assert (first_run / "a" / "warped_labels.nii.gz").is_file() and not (first_run / "c" / "warped_labels.nii.gz").exists()
    assert (first_run / "broken" / "error.txt").is_file()
    # the cohort report: written at the end, the failed pair flagged first with its error
    page = (first_run / "report.html").read_text()
    assert "moving image not found" in page and page.index("broken") < page.index("fixed__moving")


def test_wandb_project_from_configs(tmp_path: Path) -> None:
    from nir_lightning.app.batch import wandb_project

    repo = Path(__file__).resolve().parents[2] / "configs" / "logger"
    assert wandb_project([str(repo / "wandb.yaml")], []) == "nir_lightning"
    assert wandb_project([str(repo / "wandb.yaml")], ["--trainer.logger.init_args.project=cohortA"]) == "cohortA"
    assert wandb_project([str(repo / "wandb.yaml"), str(repo / "csv.yaml")], []) is None  # the later logger wins
    assert wandb_project([], []) is None


def test_rerun_skips_complete_and_redoes_the_rest(pairs: Path, first_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = pairs / "out_resume"
    shutil.copytree(first_run, out)  # copy2 keeps mtimes
    before = _mtimes(out, ["a", "fixed__moving", "c"])
    (out / "c" / "jacobian_det.nii.gz").unlink()  # an interrupted pair: incomplete, to be redone
    shutil.copytree(pairs / "data" / "s2", pairs / "data" / "broken")  # the broken pair is fixed now
    try:
        capsys.readouterr()
        status = main(["register-many", "--pairs", str(pairs / "pairs.csv"), "--output", str(out), *OVERRIDES, *IN_PROCESS])
    finally:
        shutil.rmtree(pairs / "data" / "broken")
    printed = capsys.readouterr().out
    assert status == 0
    assert "4 pairs, 2 already complete, 2 to do" in printed
    assert "cohort report" in printed and "moving image not found" not in (out / "report.html").read_text()  # rewritten on resume
    assert "4/4 pairs completed (2 already complete, skipped), 0 failed" in printed
    rows = _summary(out)
    assert [r["id"] for r in rows] == ["a", "fixed__moving", "c", "broken"]  # no duplicated rows
    assert all(r["status"] == "completed" and r["error"] == "" for r in rows)
    after = _mtimes(out, ["a", "fixed__moving", "c"])
    assert after["a"] == before["a"] and after["fixed__moving"] == before["fixed__moving"]  # not re-run
    assert after["c"] != before["c"] and (out / "c" / "jacobian_det.nii.gz").is_file()
    assert not (out / "broken" / "error.txt").exists()
    assert [p.name for p in (out / "c" / "logs").iterdir()] == ["version_0"]  # old logs cleared
    # a third run has nothing to do and rewrites the same summary
    assert main(["register-many", "--pairs", str(pairs / "pairs.csv"), "--output", str(out), *OVERRIDES, *IN_PROCESS]) == 0
    assert _mtimes(out, ["a", "fixed__moving", "c"]) == after and len(_summary(out)) == 4


def test_rows_that_cannot_run_are_named_before_the_first_fit(pairs: Path, first_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = pairs / "out_upfront"
    shutil.copytree(first_run, out)
    (pairs / "upfront.csv").write_text(
        "fixed,moving,fixed_labels,moving_labels,id\n"
        "data/s0/fixed.nii.gz,data/s0/moving.nii.gz,data/s0/fixed_labels.nii.gz,data/s0/moving_labels.nii.gz,a\n"
        "data/s0/fixed.nii.gz,data/s0/moving.nii.gz,data/s0/fixed_labels.nii.gz,data/s0/missing_labels.nii.gz,typo\n"
    )
    capsys.readouterr()
    assert main(["register-many", "--pairs", str(pairs / "upfront.csv"), "--output", str(out), *OVERRIDES, *IN_PROCESS]) == 1
    captured = capsys.readouterr()
    assert "2 pairs, 1 already complete, 1 to do" in captured.out
    expected = f"1 of them cannot run and will be reported as failed: 'typo' (line 3: moving label map not found: '{pairs}/data/s0/missing_labels.nii.gz'"
    assert expected in captured.err
    assert captured.err.index(expected) < captured.err.index("pair 'typo' FAILED")  # named before its turn
    row = _summary(out)[1]
    assert row["id"] == "typo" and row["status"] == "failed" and "moving label map not found" in row["error"]
    assert "moving label map not found" in (out / "typo" / "error.txt").read_text()


def _disp(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(str(folder / "displacement.nii.gz")).dataobj)


def test_torchrun_two_ranks_matches_single_process(pairs: Path, first_run: Path) -> None:
    out = pairs / "out_torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "nir_lightning.cli", "register-many", "--pairs", str(pairs / "pairs.csv"), "--output", str(out), *OVERRIDES]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    print(log)
    assert proc.returncode != 0, log  # rank 0 exits with the failure count (1), so torchrun fails
    # every pair done exactly once, by the rank its shard gives it (pending[rank::2])
    done = re.findall(r"\[rank (\d)/2\] pair '([^']+)' (completed|FAILED)", log)
    assert sorted((i, int(r)) for r, i, _ in done) == [("a", 0), ("broken", 1), ("c", 0), ("fixed__moving", 1)], log
    rows, single = _summary(out), _summary(first_run)
    assert [(r["id"], r["status"]) for r in rows] == [(r["id"], r["status"]) for r in single]
    assert rows[3]["error"] == single[3]["error"]
    assert "3/4 pairs completed (0 already complete, skipped), 1 failed" in log
    assert not list(out.glob(".summary.rank*"))  # partial summaries merged and removed
    for r in rows[:3]:
        assert (out / r["id"] / "logs" / "version_0" / "metrics.csv").is_file()  # ranks > 0 log too
        np.testing.assert_allclose(_disp(out / r["id"]), _disp(first_run / r["id"]), atol=1e-3)
        for key in ("dice_after", "folding_percent"):
            if single[rows.index(r)][key]:
                assert abs(float(r[key]) - float(single[rows.index(r)][key])) < 1e-3


def test_two_jobs_on_one_csv_share_the_pairs(pairs: Path) -> None:
    """Two register-many launched together on one CSV: each pair registered once, one row per pair."""
    ids = ["p1", "p2", "p3", "p4"]
    csv_path = pairs / "twice.csv"
    csv_path.write_text("fixed,moving,id\n" + "".join(
        f"data/s{k % 3}/fixed.nii.gz,data/s{k % 3}/moving.nii.gz,{pid}\n" for k, pid in enumerate(ids)
    ))
    out = pairs / "out_twice"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nir_lightning.cli", "register-many", "--pairs", str(csv_path), "--output", str(out),
           "--threads", "1", "--workers", "1", "--data.affine.kind=none", *OVERRIDES]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    print(*logs, sep="\n----\n")
    assert [p.returncode for p in procs] == [0, 0], logs
    done = sorted(i for log in logs for i in re.findall(r"pair '([^']+)' completed in", log))
    assert done == ids, logs  # every pair registered by exactly one of the two jobs
    rows = _summary(out)
    assert [r["id"] for r in rows] == ids and all(r["status"] == "completed" for r in rows), rows
    assert not list(out.glob("*/.nir.lock")) and not (out / ".summary.csv.nir.lock").exists()


def test_workers_give_the_files_of_one_process(pairs: Path, first_run: Path) -> None:
    """`--workers 2`: two worker processes share the pairs as torchrun's ranks do, and each pair's
    files are those of the in-process run at the same thread count, bit for bit."""
    out = pairs / "out_workers"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "nir_lightning.cli", "register-many", "--pairs", str(pairs / "pairs.csv"), "--output", str(out),
           "--workers", "2", *OVERRIDES]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    print(log)
    assert proc.returncode == 1, log  # rank 0's status: the one failed pair (not a worker's death, not torchrun's failure)
    assert "2 worker processes of 1 thread each (--workers 2" in log and "terminate called" not in log
    done = re.findall(r"\[rank (\d)/2\] pair '([^']+)' (completed|FAILED)", log)
    assert sorted((i, int(r)) for r, i, _ in done) == [("a", 0), ("broken", 1), ("c", 0), ("fixed__moving", 1)], log
    rows, single = _summary(out), _summary(first_run)
    assert [(r["id"], r["status"], r["dice_after"], r["folding_percent"]) for r in rows] == [
        (r["id"], r["status"], r["dice_after"], r["folding_percent"]) for r in single
    ]
    assert "3/4 pairs completed (0 already complete, skipped), 1 failed" in log and (out / "report.html").is_file()
    assert not list(out.glob(".summary.rank*"))
    for r in rows[:3]:
        for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian_det.nii.gz"):
            a, b = nib.load(str(out / r["id"] / name)), nib.load(str(first_run / r["id"] / name))
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), (r["id"], name)
        metrics = json.loads((out / r["id"] / "metrics.json").read_text())
        assert metrics["torch_threads"] == 1
